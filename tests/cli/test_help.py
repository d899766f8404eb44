"""Every `umm` command and option explains itself, and every `--help` answers without heavy imports."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from node.cli import cli

HEAVY_MODULES = ("torch", "transformers", "hivemind", "numba", "safetensors")


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    found = []
    for name, command in sorted(group.commands.items()):
        found.append(((*path, name), command))
        if isinstance(command, click.Group):
            found += _commands(command, (*path, name))
    return found


COMMANDS = _commands(cli)


def test_the_walk_finds_the_documented_commands():
    names = {" ".join(path) for path, _ in COMMANDS}
    expected = {"merge", "keygen", "network create", "node start", "contribute", "pull", "status", "demo"}
    assert expected <= names and {"zoo build", "eval", "import-gguf"} <= names


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_command_and_option_has_help_text(path, command):
    assert (command.help or "").strip(), f"`umm {' '.join(path)}` has no help text"
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert (param.help or "").strip(), f"`umm {' '.join(path)} {param.opts[0]}` has no help text"
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert f"Usage: cli {' '.join(path)}" in result.output


def test_help_imports_no_heavy_library():
    """`umm --help` and a command's `--help` load only click and light helpers (the check behind
    answering at once: torch, transformers and hivemind alone take seconds to import)."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from node.cli import cli\n"
        "for args in ([], ['node', 'start'], ['zoo', 'build'], ['network', 'create'], ['status']):\n"
        "    assert CliRunner().invoke(cli, [*args, '--help']).exit_code == 0, args\n"
        f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("level", ["debug", "WARNING", "Info"])
def test_log_level_takes_any_case_of_a_python_level(level, tmp_path):
    data = tmp_path / "node"
    args = ["node", "start", "--data-dir", str(data), "--log-level", level, "--fallback-seconds", "0"]
    result = CliRunner().invoke(cli, args)
    # the level is accepted; the bad fallback delay is what stops the node (before its folder exists)
    assert result.exit_code == 2 and "fallback delay" in result.output and not data.exists()


def test_an_unknown_log_level_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(
        cli, ["node", "start", "--data-dir", str(tmp_path / "n"), "--log-level", "foo"]
    )
    assert result.exit_code == 2
    assert "Invalid value for '--log-level': 'foo' is not one of" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["network", "create", "n", "--method", "blend"], "--method"),
        (["network", "create", "n", "--dtype", "int8"], "--dtype"),
        (["demo", "--size", "huge"], "--size"),
        (["zoo", "build", "--size", "huge"], "--size"),
    ],
)
def test_choices_are_checked_by_the_command_line(args, option, tmp_path):
    if args[0] == "network":
        args = [*args, "--base", str(tmp_path), "--data-dir", str(tmp_path / "d")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert f"Invalid value for '{option}'" in result.output
    assert not (tmp_path / "d").exists()


def test_network_create_checks_its_settings_before_writing_anything(tmp_path):
    data = tmp_path / "d"
    args = ["network", "create", "Bad Name", "--base", str(tmp_path), "--data-dir", str(data)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert result.output.startswith("Error: expected a network name matching")
    assert not data.exists()


def test_status_needs_initial_peers_and_a_well_formed_network_id(tmp_path):
    result = CliRunner().invoke(cli, ["status", "--network", "demo.0123456789abcdef"])
    assert result.exit_code == 2
    assert result.output == "Error: expected --initial-peers or --initial-peers-file, got neither\n"
    result = CliRunner().invoke(cli, ["status", "--network", "demo", "--initial-peers", "/ip4/127.0.0.1"])
    assert result.exit_code == 2 and result.output.startswith("Error: expected a network id NAME.<16 hex")


@pytest.mark.parametrize("command", [["node", "start", "--data-dir", "DATA"], ["pull", "--out", "DATA"]])
def test_a_malformed_network_id_is_refused_before_anything_is_created(command, tmp_path):
    data = tmp_path / "d"
    args = [str(data) if a == "DATA" else a for a in command]
    result = CliRunner().invoke(cli, [*args, "--network", "demo-0123", "--initial-peers", "/ip4/127.0.0.1"])
    assert result.exit_code == 2
    assert result.output == "Error: expected a network id NAME.<16 hex digits>, got 'demo-0123'\n"
    assert not data.exists()
