"""Human-readable numbers and lazily loaded choices of the command line (node.cli.options)."""

from __future__ import annotations

import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from node.cli.options import LazyChoice, format_bytes, format_seconds


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (13_421_773, "12.8 MiB"),  # 12.8 x 2^20 rounded to a byte
        (2 * 1024**3, "2.00 GiB"),
        (5 * 1024**4, "5.00 TiB"),
        (2048 * 1024**4, "2048.0 TiB"),
    ],
)
def test_byte_counts_read_in_binary_units(count, text):
    assert format_bytes(count) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.04, "0.0 s"), (12.34, "12.3 s"), (59.9, "59.9 s"), (245, "4 min 05 s"), (7380, "2 h 03 min")],
)
def test_durations_read_in_seconds_minutes_or_hours(seconds, text):
    assert format_seconds(seconds) == text


def test_a_lazy_choice_loads_its_constant_only_when_a_value_is_checked():
    choice = LazyChoice("node.settings:__all_choices_probe__", metavar="THING")
    assert choice.get_metavar(click.Option(["--thing"])) == "THING"  # help imports nothing

    @click.command()
    @click.option("--size", type=LazyChoice("merging.config:DTYPES", extra=("raw",), metavar="SIZE"))
    def command(size):
        click.echo(size)

    runner = CliRunner()
    assert "--size SIZE" in runner.invoke(command, ["--help"]).output
    assert runner.invoke(command, ["--size", "raw"]).output == "raw\n"
    assert runner.invoke(command, ["--size", "bfloat16"]).output == "bfloat16\n"
    bad = runner.invoke(command, ["--size", "int3"])
    assert bad.exit_code == 2 and "'int3' is not one of 'float32', 'float16', 'bfloat16', 'raw'" in bad.output


@pytest.mark.parametrize(("verbose", "expected"), [(False, "False 40"), (True, "True 30")])
def test_third_party_progress_bars_and_warnings_are_off_unless_verbose(verbose, expected):
    """In a fresh process (the settings are process-wide): transformers' bars and its warnings."""
    code = (
        "from node.cli.options import quiet_third_parties\n"
        f"quiet_third_parties({verbose})\n"
        "import transformers.utils.logging as hf\n"
        "print(hf.is_progress_bar_enabled(), hf.get_verbosity())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_", "HF_HUB_", "TQDM"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split("\n")[-2] == expected
