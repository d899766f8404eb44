"""`umm eval`, `umm zoo build`, `umm import-gguf`: output, JSON and exit codes."""

import json

import pytest
from click.testing import CliRunner

from merging.testbed.harness import evaluate
from merging.testbed.models import ModelLoadError, load_pretrained, packaged_gguf
from node.cli import cli


def test_eval_prints_a_table_and_writes_json_with_retention(micro_zoo, tmp_path):
    out = tmp_path / "eval.json"
    expert = str(micro_zoo.experts["logic"])
    args = ["eval", expert, "--base", str(micro_zoo.base), "--tasks", "logic,lists", "--limit", "6"]
    result = CliRunner().invoke(cli, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "exact match, test split" in result.output and "gain retention" in result.output
    summary = json.loads(out.read_text())
    model, tok = load_pretrained(expert)
    direct = evaluate(model, tok, ["logic", "lists"], limit=6)
    assert summary["models"][expert]["accuracy"] == direct.accuracy
    assert summary["experts"]["logic"] == expert  # declared by the zoo's metadata
    assert summary["base"] == str(micro_zoo.base) and summary["tasks"] == ["logic", "lists"]
    assert set(summary["retention"][expert]) == {"logic", "lists"}


def test_eval_rejects_an_unknown_task(micro_zoo):
    result = CliRunner().invoke(cli, ["eval", str(micro_zoo.base), "--tasks", "poetry"])
    assert result.exit_code == 2
    assert (
        "Error: expected a task among arithmetic, lists, logic, tracing, list_arith, bool_trace"
        in result.output
    )


def test_zoo_build_reuses_the_cache(micro_zoo):
    result = CliRunner().invoke(
        cli, ["zoo", "build", "--size", "micro", "--cache-dir", str(micro_zoo.root.parent)]
    )
    assert result.exit_code == 0, result.output
    assert "trained" not in result.output  # nothing retrained
    assert str(micro_zoo.experts["tracing"]) in result.output


def test_import_gguf_of_a_missing_file_is_one_error_line(tmp_path):
    result = CliRunner().invoke(cli, ["import-gguf", str(tmp_path / "none.gguf"), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.startswith("Error: expected ")


def test_loading_errors_are_typed(tmp_path):
    with pytest.raises(ModelLoadError, match=r"expected an HF model folder with config\.json"):
        load_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="expected a packaged model among smollm2, gemma3"):
        packaged_gguf("llama-70b")


def test_every_testbed_command_has_help_with_an_example():
    for args in (["eval"], ["zoo", "build"], ["import-gguf"]):
        result = CliRunner().invoke(cli, [*args, "--help"])
        assert result.exit_code == 0 and "Example: umm" in result.output
