"""`umm node start --fallback-seconds`: a bad delay is one error line and exit code 2, before any start."""

import pytest
from click.testing import CliRunner

from node.cli import cli


@pytest.mark.parametrize(("given", "shown"), [("0", "0.0"), ("-1.5", "-1.5"), ("nan", "nan"), ("inf", "inf")])
def test_a_fallback_delay_that_is_not_a_positive_number_is_one_error_line(tmp_path, given, shown):
    data = tmp_path / "node"
    result = CliRunner().invoke(cli, ["node", "start", "--data-dir", str(data), "--fallback-seconds", given])
    assert result.exit_code == 2
    assert (
        result.output
        == f"Error: expected the fallback delay to be a positive number of seconds, got {shown}\n"
    )
    assert not data.exists()  # refused before the node made its folder


def test_a_fallback_delay_that_is_not_a_number_is_a_usage_error(tmp_path):
    data = tmp_path / "node"
    result = CliRunner().invoke(cli, ["node", "start", "--data-dir", str(data), "--fallback-seconds", "soon"])
    assert result.exit_code == 2
    assert (
        result.output.splitlines()[-1]
        == "Error: Invalid value for '--fallback-seconds': 'soon' is not a valid float."
    )
    assert not data.exists()


def test_the_fallback_delay_is_in_the_help_with_its_default():
    result = CliRunner().invoke(cli, ["node", "start", "--help"])
    assert result.exit_code == 0
    assert "--fallback-seconds" in result.output and "[default: 120.0]" in " ".join(result.output.split())
