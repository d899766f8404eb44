"""`umm merge --codec`: the offline merge of the experts as a network merges them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from node_models import make_base, make_expert
from safetensors.torch import load_file, save_file

from merging.engine import merge_state_dicts
from node.cli import cli


def _bf16(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v.bfloat16() for k, v in tensors.items()}, folder / "model.safetensors")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reproduce")
    make_base(root / "base", seed=21)
    for i in (1, 2):
        make_expert(root / "base", root / f"e{i}", seed=21 + i)
    for name in ("base", "e1", "e2"):
        _bf16(root / name)
    (root / "ties.yaml").write_text(
        f"merge_method: ties\nbase_model: {root / 'base'}\ndtype: bfloat16\n"
        f"parameters: {{density: 0.5, weight: 1.0}}\n"
        f"models:\n  - model: {root / 'e1'}\n  - model: {root / 'e2'}\n"
    )
    return root


def _merge(config: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    result = CliRunner().invoke(cli, ["merge", str(config), str(out), "--no-progress", *extra])
    assert result.exit_code == 0, result.output
    return load_file(out / "model.safetensors")


def _int8(delta: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Blockwise absmax int8 written out in numpy: scale = absmax / 127, value = round(x / scale) * scale."""
    flat = delta.reshape(-1).numpy().astype(np.float32)
    padded = np.zeros(-(-flat.size // block) * block, dtype=np.float32)
    padded[: flat.size] = flat
    grid = padded.reshape(-1, block)
    scales = (np.abs(grid).max(axis=1) / np.float32(127)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1))
    q = np.clip(np.round(grid / safe[:, None]), -127, 127)
    return torch.from_numpy((q * scales[:, None]).reshape(-1)[: flat.size].astype(np.float32)).reshape(
        delta.shape
    )


def test_the_lossless_codec_reproduces_the_plain_merge(models, tmp_path):
    plain = _merge(models / "ties.yaml", tmp_path / "plain")
    coded = _merge(models / "ties.yaml", tmp_path / "coded", "--codec", "raw+zstd")
    assert sorted(plain) == sorted(coded)
    assert all(torch.equal(plain[k], coded[k]) for k in plain)


def test_a_lossy_codec_merges_the_decoded_experts(models, tmp_path):
    coded = _merge(models / "ties.yaml", tmp_path / "coded", "--codec", "int8")
    base = load_file(models / "base" / "model.safetensors")
    experts = {}
    for name in ("e1", "e2"):
        tensors = load_file(models / name / "model.safetensors")
        experts[name] = {k: base[k].float() + _int8(v.float() - base[k].float()) for k, v in tensors.items()}
    config = {
        "merge_method": "ties",
        "base_model": "base",
        "dtype": "bfloat16",
        "parameters": {"density": 0.5, "weight": 1.0},
        "models": [{"model": "e1"}, {"model": "e2"}],
    }
    expected = merge_state_dicts(config, {"base": {k: v.float() for k, v in base.items()}, **experts})
    assert all(torch.equal(expected[k], coded[k]) for k in expected)
    plain = _merge(models / "ties.yaml", tmp_path / "plain")
    assert any(not torch.equal(plain[k], coded[k]) for k in plain)  # the codec changed the merge


def test_a_codec_for_a_model_not_in_the_config_is_one_error_line(models, tmp_path):
    result = CliRunner().invoke(
        cli, ["merge", str(models / "ties.yaml"), str(tmp_path / "out"), "--codec", "elsewhere=int8"]
    )
    assert result.exit_code == 2
    assert result.output.startswith("Error: expected --codec MODEL=CODEC to name one of")
    assert not (tmp_path / "out").exists()
