"""Bad inputs to `umm`: every failure is one `Error: ...` line on stderr, exit code 2, nothing on disk.

The classes: an output under a file or where nothing can be created (`merge`, `pull`, `network
create`), out-of-range ports, click's usage errors (no usage block), a multi-line YAML error, and
`network create` / `node start` runs that fail after their checks (no data folder left behind).
The last two run `umm` as a process, where hivemind and asyncio would print their own lines.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from node.cli import cli

NETWORK = "bad.0123456789abcdef"


def assert_one_error(exit_code: int, stderr: str, *expected: str) -> str:
    """The single non-empty stderr line, checked: ``Error: `` first, each of `expected` inside."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert exit_code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def invoke(args: list[str]):
    return CliRunner().invoke(cli, args)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def place(tmp_path: Path) -> Path:
    """A folder holding one regular file, ``a-file`` (nothing can be created under it)."""
    (tmp_path / "a-file").write_text("not a folder")
    config = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1.0}\n"
    (tmp_path / "config.yaml").write_text(config)
    return tmp_path


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["merge", "{tmp}/config.yaml", "{tmp}/a-file/out"], "OUT_DIR"),
        (["merge", "{tmp}/config.yaml", "{tmp}/a-file/deeper/out"], "OUT_DIR"),
        (["pull", "--network", NETWORK, "--out", "{tmp}/a-file/out", "--initial-peers", "/ip4/1"], "--out"),
        (["network", "create", "n", "--base", "{tmp}", "--data-dir", "{tmp}/a-file/d"], "--data-dir"),
        (
            ["network", "create", "n", "--base", "{tmp}", "--data-dir", "{tmp}/d", "--out", "{tmp}/a-file/g"],
            "--out",
        ),
        (["node", "start", "--data-dir", "{tmp}/a-file/d", "--network", NETWORK], "--data-dir"),
    ],
)
def test_an_output_under_a_file_is_one_error_before_anything_is_written(place, args, option):
    before = listing(place)
    result = invoke([a.replace("{tmp}", str(place)) for a in args])
    assert_one_error(result.exit_code, result.stderr, option, "a file, not a folder")
    assert listing(place) == before


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, where nothing can be created")
@pytest.mark.parametrize(
    "args",
    [
        ["merge", "{tmp}/config.yaml", "/proc/umm-out"],
        ["network", "create", "n", "--base", "{tmp}", "--data-dir", "/proc/umm-data"],
    ],
)
def test_an_output_where_the_system_refuses_to_create_it_is_one_error(place, args):
    before = listing(place)
    result = invoke([a.replace("{tmp}", str(place)) for a in args])
    assert_one_error(result.exit_code, result.stderr, "/proc/")
    assert listing(place) == before and not Path("/proc/umm-out").exists()


@pytest.mark.parametrize(
    ("quota", "reason"), [("12XB", "such as 2GiB"), ("0", "positive"), ("-5MiB", "positive")]
)
def test_a_bad_store_quota_is_refused_before_the_data_folder_exists(tmp_path, quota, reason):
    result = invoke(
        ["node", "start", "--data-dir", str(tmp_path / "d"), "--network", NETWORK, "--store-quota", quota]
    )
    assert_one_error(result.exit_code, result.stderr, "'--store-quota'", reason)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("port", ["-1", "65536", "70000"])
def test_a_port_out_of_range_is_refused_before_the_data_folder_exists(tmp_path, port):
    result = invoke(
        ["node", "start", "--data-dir", str(tmp_path / "d"), "--network", NETWORK, "--port", port]
    )
    assert_one_error(result.exit_code, result.stderr, "'--port'", port, "0<=x<=65535")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["merge"], "Missing argument 'CONFIG'"),
        (["node", "start", "--no-such-option"], "No such option '--no-such-option'"),
        (["pull", "--out", "x"], "Missing option '--network'"),
        (["no-such-command"], "No such command 'no-such-command'"),
    ],
)
def test_a_usage_error_is_one_line_without_the_usage_block(args, expected):
    result = invoke(args)
    assert_one_error(result.exit_code, result.stderr, expected)
    assert "Usage:" not in result.output and "Try " not in result.output


def test_a_multi_line_yaml_error_is_one_line_with_its_place(tmp_path):
    args = ["network", "create", "n", "--base", str(tmp_path), "--data-dir", str(tmp_path / "d")]
    result = invoke([*args, "--params", "density: [0.5\nweight: 1"])
    line = assert_one_error(result.exit_code, result.stderr, "--params", "line 2")
    assert "^" not in line
    assert not (tmp_path / "d").exists()


def test_a_network_create_that_fails_after_its_checks_leaves_no_data_folder(tmp_path):
    (tmp_path / "empty-base").mkdir()  # passes click's check (a folder), then holds no model
    data = tmp_path / "d"
    result = invoke(
        ["network", "create", "n", "--base", str(tmp_path / "empty-base"), "--data-dir", str(data)]
    )
    assert_one_error(result.exit_code, result.stderr)
    assert not data.exists()
    data.mkdir()  # a folder that was there before stays, whatever fails
    result = invoke(
        ["network", "create", "n", "--base", str(tmp_path / "empty-base"), "--data-dir", str(data)]
    )
    assert_one_error(result.exit_code, result.stderr)
    assert data.is_dir()


def umm(*args: str, timeout: float = 240.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.network
def test_failed_process_runs_print_one_line_and_leave_no_folder(tmp_path):
    """A node whose DHT cannot start (a malformed initial peer): hivemind would print that it
    generates an identity, asyncio that a loop is closed; a pull likewise. One line each."""
    data = tmp_path / "d"
    node = umm("node", "start", "--data-dir", str(data), "--network", NETWORK, "--initial-peers", "garbage")
    assert_one_error(node.returncode, node.stderr, "DHT")
    assert not data.exists()
    out = tmp_path / "pulled"
    pull = umm(
        "pull", "--network", NETWORK, "--out", str(out), "--initial-peers", "garbage", "--timeout", "5"
    )
    assert_one_error(pull.returncode, pull.stderr, "DHT")
    assert listing(tmp_path) == []
