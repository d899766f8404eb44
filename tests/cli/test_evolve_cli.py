"""`umm evolve`: outputs, the recipe reproduced by `umm merge` byte for byte, resume, errors."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

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


def assert_umm_merge_reproduces(out, remerged):
    """`umm merge` of the search's recipe.yaml writes the bytes of the search's model."""
    again = CliRunner().invoke(cli, ["merge", str(out / "recipe.yaml"), str(remerged), "--no-progress"])
    assert again.exit_code == 0, again.output
    assert (remerged / "model.safetensors").read_bytes() == (out / "model" / "model.safetensors").read_bytes()


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

    assert_umm_merge_reproduces(out, tmp_path / "remerged")

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


def test_a_regmean_search_reads_the_experts_grams_and_umm_merge_reproduces_it(tmp_path):
    models = build_tiny_models(tmp_path / "models")
    runner = CliRunner()
    config = write_config(tmp_path / "regmean.yaml", models, method="task_arithmetic")
    config.write_text(config.read_text().replace("task_arithmetic", "regmean"))
    lacking = runner.invoke(cli, ["merge", str(config), str(tmp_path / "none"), "--no-progress"])
    assert lacking.exit_code == 2 and "umm grams" in lacking.output
    for name in ("alpha", "beta"):
        wrote = runner.invoke(cli, ["grams", str(models[name]), "--tasks", "arithmetic", "--examples", "2"])
        assert wrote.exit_code == 0, wrote.output
        assert (models[name] / "input_grams.umm").is_file()
    out = tmp_path / "run"
    args = ["--budget", "4", "--popsize", "2", "--params", "weight,lambda", "--out", str(out), *FAST]
    result = runner.invoke(cli, ["evolve", str(config), *args])
    assert result.exit_code == 0, result.output
    assert_umm_merge_reproduces(out, tmp_path / "remerged")


def test_a_gradient_search_writes_a_recipe_umm_merge_reproduces(tmp_path):
    models = build_tiny_models(tmp_path / "models")
    runner = CliRunner()
    ties = write_config(tmp_path / "ties.yaml", models)
    refused = runner.invoke(
        cli, ["evolve", str(ties), "--optimizer", "gradient", "--out", str(tmp_path / "x"), *FAST]
    )
    assert refused.exit_code == 2
    assert refused.output.startswith("Error: the gradient search needs a merge linear in its weights")
    config = write_config(tmp_path / "ta.yaml", models, method="task_arithmetic")
    out = tmp_path / "run"
    args = ["--optimizer", "gradient", "--budget", "4", "--granularity", "module", "--out", str(out), *FAST]
    result = runner.invoke(cli, ["evolve", str(config), *args])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    assert [r["number"] for r in records if r["type"] == "eval"] == [0, 1, 2, 3]
    assert_umm_merge_reproduces(out, tmp_path / "remerged")


def test_a_row_search_writes_its_row_weights_beside_the_recipe(tmp_path):
    models = build_tiny_models(tmp_path / "models")
    runner = CliRunner()
    config = write_config(tmp_path / "ta.yaml", models, method="task_arithmetic")
    cma = runner.invoke(
        cli, ["evolve", str(config), "--granularity", "row", "--out", str(tmp_path / "x"), *FAST]
    )
    assert cma.exit_code == 2
    assert cma.output.startswith("Error: the row granularity needs the gradient optimizer")
    out = tmp_path / "run"
    args = ["--optimizer", "gradient", "--budget", "3", "--granularity", "row", "--out", str(out), *FAST]
    result = runner.invoke(cli, ["evolve", str(config), *args])
    assert result.exit_code == 0, result.output
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["row_weights"] == str((out / "recipe.rows.safetensors").resolve())
    rows = load_file(out / "recipe.rows.safetensors")
    # every changed matrix of the two experts: 2 layers x 7 projections, one weight per output row
    assert len(rows) == 2 * 2 * 7
    assert rows["models.0.model.layers.0.mlp.down_proj.weight"].shape == (16,)
    assert rows["models.1.model.layers.1.mlp.up_proj.weight"].shape == (32,)
    assert len({tuple(v.tolist()) for v in rows.values()}) > 1  # the steps moved rows apart
    assert_umm_merge_reproduces(out, tmp_path / "remerged")
