"""Contributions on bf16 and float32 bases: the lossless codec, experts in another float dtype,
and the merged dtype a new network defaults to."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from node_models import make_base, make_expert
from safetensors.torch import load_file, save_file

from node.cli import cli
from node.contribute import ArchitectureMismatchError, contribute
from node.genesis import create_genesis, open_genesis
from node.state import NodeState
from node.store import ContentStore
from protocol.chunks import decode_entry, reconstruct
from protocol.envelope import open_envelope
from protocol.genesis import read_base_manifest
from protocol.identity import Identity
from protocol.messages import DeltaManifest


def _as_dtype(src: Path, dst: Path, dtype: torch.dtype, only: str | None = None) -> None:
    """A copy of a model folder with its tensors (or the one named `only`) in `dtype`."""
    dst.mkdir(parents=True)
    tensors = load_file(src / "model.safetensors")
    converted = {k: (v.to(dtype) if only in (None, k) else v).contiguous() for k, v in tensors.items()}
    save_file(converted, dst / "model.safetensors", metadata={"format": "pt"})
    for side in src.iterdir():
        if side.name != "model.safetensors":
            (dst / side.name).write_bytes(side.read_bytes())


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dtypes")
    make_base(root / "base32", seed=11)
    make_expert(root / "base32", root / "expert32", seed=12)
    _as_dtype(root / "base32", root / "base16", torch.bfloat16)
    _as_dtype(root / "expert32", root / "expert16", torch.bfloat16)
    return {p.name: p for p in root.iterdir()}


def _network(base: Path, data: Path, **settings):
    with ContentStore(data / "store") as store, NodeState(data) as state:
        genesis, record = create_genesis(
            "dtype-net", base, Identity.from_seed(b"\x07" * 32), store, **settings
        )
        state.set("genesis", record)
    return genesis


def _restored(data: Path, manifest_id: str, genesis) -> dict[str, torch.Tensor]:
    """base + decoded delta per tensor, from the node's store (the experts the network merges)."""
    with ContentStore(data / "store") as store:
        manifest = open_envelope(store.get(manifest_id), DeltaManifest, network_id=genesis.network_id).message
        base = {e.name: e for e in read_base_manifest(store.get(genesis.base_manifest))}
        assert manifest.architecture_fingerprint == genesis.architecture_fingerprint
        assert all(t.dtype == base[t.name].dtype for t in manifest.tensors)
        return {
            t.name: reconstruct(
                decode_entry(base[t.name], store.get, 1 << 20), decode_entry(t, store.get, 1 << 20)
            )
            for t in manifest.tensors
        }


@pytest.mark.parametrize(
    ("base", "expert"), [("base16", "expert16"), ("base32", "expert32"), ("base32", "expert16")]
)
def test_raw_contributions_carry_the_experts_values_exactly(models, tmp_path, base, expert):
    genesis = _network(models[base], tmp_path / "n1")
    done = contribute(tmp_path / "n1", models[expert], codec="raw+zstd")
    restored = _restored(tmp_path / "n1", done.manifest_id, genesis)
    original = load_file(models[expert] / "model.safetensors")
    assert sorted(restored) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(restored[name], tensor.float()), name


def test_a_lossy_codec_on_a_bf16_base_stays_within_its_bound(models, tmp_path):
    genesis = _network(models["base16"], tmp_path / "n1")
    done = contribute(tmp_path / "n1", models["expert16"], codec="int8")
    restored = _restored(tmp_path / "n1", done.manifest_id, genesis)
    base = load_file(models["base16"] / "model.safetensors")
    for name, tensor in load_file(models["expert16"] / "model.safetensors").items():
        delta = tensor.float() - base[name].float()
        bound = delta.abs().max() / 127 * 0.5 + 1e-6  # int8 blocks: half a step of the block's absmax
        assert (restored[name] - tensor.float()).abs().max() <= bound, name


def test_an_expert_with_a_non_float_dtype_change_is_refused_naming_the_dtypes(models, tmp_path):
    _network(models["base32"], tmp_path / "n1")
    odd = tmp_path / "odd"
    _as_dtype(models["expert32"], odd, torch.int32, only="model.norm.weight")
    with pytest.raises(ArchitectureMismatchError, match=r"model\.norm\.weight in dtype float32 .* got int32"):
        contribute(tmp_path / "n1", odd)


@pytest.mark.parametrize(("base", "dtype"), [("base16", "bfloat16"), ("base32", "float32")])
def test_network_create_defaults_the_merged_dtype_to_the_bases(models, tmp_path, base, dtype):
    data = tmp_path / "n1"
    result = CliRunner().invoke(
        cli, ["network", "create", "dt", "--base", str(models[base]), "--data-dir", str(data)]
    )
    assert result.exit_code == 0, result.output
    with NodeState(data) as state:
        assert open_genesis(state.get("genesis")).dtype == dtype
    explicit = tmp_path / "n2"
    args = [
        "network",
        "create",
        "dt",
        "--base",
        str(models[base]),
        "--data-dir",
        str(explicit),
        "--dtype",
        "float16",
    ]
    assert CliRunner().invoke(cli, args).exit_code == 0
    with NodeState(explicit) as state:
        assert open_genesis(state.get("genesis")).dtype == "float16"


def test_contribute_help_lists_the_lossless_codec():
    result = CliRunner().invoke(cli, ["contribute", "--help"])
    assert "raw (lossless" in result.output
