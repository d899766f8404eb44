"""`umm evolve`: outputs, the recipe reproduced by `umm merge` byte for byte, resume, errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from node.cli import cli
from tests.search.tiny_models import build_tiny_models, write_config

FAST = [
    "--tasks",
    "arithmetic,lists",
    "--limit",
    "3",
    "--report-limit",
    "2",
    "--metric",
    "loglik",
    "--no-progress",
]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    models = build_tiny_models(tmp_path_factory.mktemp("tiny-models"))
    return write_config(tmp_path_factory.mktemp("cfg") / "ties.yaml", models)


def test_evolve_writes_a_recipe_that_umm_merge_reproduces_byte_for_byte(config, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(
        cli, ["evolve", str(config), "--budget", "7", "--popsize", "3", "--out", str(out), *FAST]
    )
    assert result.exit_code == 0, result.output
    assert "best dev fitness" in result.output
    for name in (
        "journal.jsonl",
        "recipe.yaml",
        "report.json",
        "report.md",
        "fitness.png",
        "model/model.safetensors",
    ):
        assert (out / name).exists(), name
    assert (out / "fitness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evals = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    assert sum(r["type"] == "eval" for r in evals) == 7
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) >= {"base", "uniform", "searched"}
    assert report["search"]["evaluations"] == 7

    again = runner.invoke(
        cli, ["merge", str(out / "recipe.yaml"), str(tmp_path / "remerged"), "--no-progress"]
    )
    assert again.exit_code == 0, again.output
    assert (tmp_path / "remerged" / "model.safetensors").read_bytes() == (
        out / "model" / "model.safetensors"
    ).read_bytes()

    refused = runner.invoke(
        cli, ["evolve", str(config), "--budget", "7", "--popsize", "3", "--out", str(out), *FAST]
    )
    assert refused.exit_code == 2
    assert refused.output.startswith("Error: ") and "--resume" in refused.output

    recipe = (out / "recipe.yaml").read_bytes()
    resumed = runner.invoke(
        cli, ["evolve", str(config), "--budget", "7", "--popsize", "3", "--out", str(out), "--resume", *FAST]
    )
    assert resumed.exit_code == 0, resumed.output
    assert (out / "recipe.yaml").read_bytes() == recipe


def test_bad_granularity_is_one_error_line(config, tmp_path):
    result = CliRunner().invoke(
        cli, ["evolve", str(config), "--out", str(tmp_path / "x"), "--granularity", "rows", *FAST]
    )
    assert result.exit_code == 2
    assert result.output.startswith("Error: expected a granularity among")
