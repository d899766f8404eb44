"""Reproduce a network's merge offline: the experts as the network sees them, then `umm merge`.

A network merges every admitted expert as ``reconstruct(base, decode(encode(expert - base)))``
(`protocol.chunks`), i.e. after its delta went through the contributor's codec. `codec_experts`
writes each expert of a merge config that way (float32 folders under a work folder, one tensor in
memory at a time while computing, one expert while saving) and returns the config pointing at
them; `umm merge CONFIG OUT --codec CODEC` merges those, which is the network's model for the
same method, parameters, dtype and experts. With the lossless codec ``raw`` the folders hold the
experts' own values, so the plain `umm merge` gives the same bytes.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from merging.config import MergeConfig
from merging.errors import ConfigError
from node.genesis import side_files
from node.lazy_tensors import FolderTensors
from protocol.chunks import decode_entry, encode_deltas, reconstruct
from protocol.codecs import parse_codec


def parse_codec_options(values: tuple[str, ...], models: list[str]) -> dict[str, str]:
    """``CODEC`` (every expert) or ``MODEL=CODEC`` items -> codec per expert of `models`."""
    default, chosen = None, {}
    for value in values:
        model, equals, codec = value.rpartition("=")
        parse_codec(codec)
        if not equals:
            default = codec
        elif model not in models:
            raise ConfigError(f"expected --codec MODEL=CODEC to name one of {models}, got {model!r}")
        else:
            chosen[model] = codec
    return {m: chosen.get(m, default) for m in models if chosen.get(m, default) is not None}


def expert_as_merged(base_dir: Path, expert_dir: Path, codec: str, out: Path) -> None:
    """Write `expert_dir` as a network merges it: base + the codec round trip of its delta (float32)."""
    choice = parse_codec(codec)
    base, expert = FolderTensors(base_dir), FolderTensors(expert_dir)
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(expert):
        base_tensor = base[name]
        (entry,), chunks = encode_deltas({name: base_tensor}, {name: expert[name]}, choice, 1 << 20)
        tensors[name] = reconstruct(base_tensor, decode_entry(entry, chunks, 1 << 20)).contiguous()
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for name, path in side_files(expert_dir).items():
        shutil.copyfile(path, out / name)


def codec_experts(config: MergeConfig, codecs: Mapping[str, str], work: Path) -> MergeConfig:
    """`config` with each expert named in `codecs` replaced by `expert_as_merged` under `work`."""
    if config.base_model is None or config.slices:
        raise ConfigError("expected a merge config with a base_model and models (no slices) for --codec")
    data = config.to_dict()
    for index, entry in enumerate(data["models"]):
        codec = codecs.get(entry["model"])
        if codec is None or entry["model"] == config.base_model:
            continue
        folder = work / f"expert-{index}"
        expert_as_merged(Path(config.base_model), Path(entry["model"]).expanduser(), codec, folder)
        entry["model"] = str(folder)
    return MergeConfig.from_dict(data)
