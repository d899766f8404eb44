"""`umm merge`: exit codes and exact output."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from node.cli import cli


def _model(folder: Path, scale: float) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["TinyForCausalLM"], "model_type": "tiny"})
    )
    generator = torch.Generator().manual_seed(1)
    save_file(
        {
            "model.layers.0.w": torch.randn(4, 3, generator=generator) * scale,
            "model.norm.weight": torch.ones(3) * scale,
        },
        folder / "model.safetensors",
    )
    return folder


@pytest.fixture
def config_file(tmp_path) -> Path:
    a, b = _model(tmp_path / "a", 1.0), _model(tmp_path / "b", 3.0)
    path = tmp_path / "merge.yaml"
    path.write_text(
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n"
        f"  - model: {b}\n    parameters: {{weight: 1}}\n"
    )
    return path


def test_merge_writes_the_model_and_says_where(config_file, tmp_path):
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["merge", str(config_file), str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"merged model written to {out}\n"
    merged = load_file(out / "model.safetensors")
    assert torch.equal(merged["model.norm.weight"], torch.full((3,), 2.0))
    assert (out / "umm_merge.json").is_file()


def test_progress_bar_reports_tensors(config_file, tmp_path):
    result = CliRunner().invoke(cli, ["merge", str(config_file), str(tmp_path / "m")])
    assert result.exit_code == 0
    assert "2/2 tensors" in result.stderr


def test_config_error_is_one_line_and_exit_code_2(config_file, tmp_path):
    config_file.write_text(config_file.read_text().replace("linear", "lineer"))
    result = CliRunner().invoke(cli, ["merge", str(config_file), str(tmp_path / "m")])
    assert result.exit_code == 2
    assert result.stderr == (
        "Error: unknown merge_method 'lineer'; valid methods: breadcrumbs, breadcrumbs_ties, dare_linear, "
        "dare_ties, della, della_linear, linear, model_stock, passthrough, regmean, sce, slerp, "
        "task_arithmetic, ties, tsv, varm\n"
    )
    assert not (tmp_path / "m").exists()


def test_missing_config_and_bad_shard_size_exit_2(tmp_path, config_file):
    result = CliRunner().invoke(cli, ["merge", str(tmp_path / "none.yaml"), str(tmp_path / "m")])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: cannot read merge config '{tmp_path / 'none.yaml'}'")
    result = CliRunner().invoke(
        cli, ["merge", str(config_file), str(tmp_path / "m"), "--max-shard-size", "lots"]
    )
    assert result.exit_code == 2
    assert result.stderr == "Error: expected a size such as 500MB or 2GB for --max-shard-size, got 'lots'\n"


def test_help_has_an_example():
    result = CliRunner().invoke(cli, ["merge", "--help"])
    assert result.exit_code == 0
    assert "Example:\n    umm merge ties.yaml ./merged\n" in result.output
