"""Fingerprints of a model folder: weights, architecture and tokenizer (sha256 hex each).

- weights (``base``): `state_fingerprint` of every tensor's (name, shape, dtype, sha256 of its raw
  bytes), read straight from the safetensors files by offset; independent of sharding and file
  order, and equal to `fingerprint_state_dict` of the same tensors in memory;
- architecture: sha256 of the config's architecture fields plus every tensor's name, shape and
  dtype (safetensors headers only, no tensor data read);
- tokenizer: sha256 of ``tokenizer.json`` re-serialised as canonical JSON (or of the legacy
  vocabulary files when there is no ``tokenizer.json``).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from merging.dtypes import NAMES_BY_CODE
from protocol.codecs import DTYPE_NAMES
from protocol.encoding import pack, sha256_hex
from protocol.errors import ModelFolderError
from protocol.messages import state_fingerprint

ARCHITECTURE_FIELDS = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "hidden_act",
    "max_position_embeddings",
    "rope_theta",
    "rope_scaling",
    "rms_norm_eps",
    "layer_norm_eps",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
)
MAX_HEADER_SIZE = 100 * 1024 * 1024
_READ_SIZE = 16 * 1024 * 1024
LEGACY_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.model", "vocab.txt")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path
    start: int
    end: int


@dataclass(frozen=True)
class ModelFingerprint:
    """The three fingerprints of a model folder."""

    base: str
    architecture: str
    tokenizer: str


def read_tensor_infos(folder: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of the folder's ``*.safetensors`` files, from their headers only."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFolderError(f"expected *.safetensors files in {folder}, got none")
    infos: dict[str, TensorInfo] = {}
    for file in files:
        for info in _read_header(file):
            if info.name in infos:
                raise ModelFolderError(f"expected each tensor once in {folder}, got {info.name!r} twice")
            infos[info.name] = info
    return infos


def _read_header(file: Path) -> list[TensorInfo]:
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ModelFolderError(f"expected a safetensors header in {file}, got {len(prefix)} bytes")
        (size,) = struct.unpack("<Q", prefix)
        if size > MAX_HEADER_SIZE:
            raise ModelFolderError(
                f"expected a safetensors header under {MAX_HEADER_SIZE} bytes in {file}, got {size}"
            )
        try:
            header = json.loads(handle.read(size))
        except (ValueError, UnicodeDecodeError):
            raise ModelFolderError(
                f"expected a JSON safetensors header in {file}, got invalid JSON"
            ) from None
    data_start = 8 + size
    infos = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = NAMES_BY_CODE.get(meta["dtype"], meta["dtype"].lower())
            start, end = (int(x) for x in meta["data_offsets"])
            shape = tuple(int(x) for x in meta["shape"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ModelFolderError(f"expected dtype, shape and data_offsets for {name!r} in {file}") from None
        infos.append(TensorInfo(name, shape, dtype, file, data_start + start, data_start + end))
    return infos


def _hash_range(file: Path, start: int, end: int) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        handle.seek(start)
        remaining = end - start
        while remaining > 0:
            block = handle.read(min(_READ_SIZE, remaining))
            if not block:
                raise ModelFolderError(f"expected {end - start} bytes of tensor data in {file}, got fewer")
            digest.update(block)
            remaining -= len(block)
    return digest.hexdigest()


def weights_fingerprint(folder: str | Path) -> str:
    """`state_fingerprint` of the folder's tensors (reads every tensor's bytes once)."""
    infos = read_tensor_infos(folder)
    return state_fingerprint(
        (i.name, i.shape, i.dtype, _hash_range(i.file, i.start, i.end)) for i in infos.values()
    )


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw little-endian bytes in its own dtype (what safetensors stores)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return sha256_hex(flat.view(torch.uint8).numpy().tobytes())


def fingerprint_state_dict(tensors: Mapping[str, torch.Tensor]) -> str:
    """`state_fingerprint` of in-memory tensors; equals `weights_fingerprint` of them saved."""
    return state_fingerprint(
        (name, tuple(t.shape), DTYPE_NAMES.get(t.dtype, str(t.dtype)), tensor_digest(t))
        for name, t in tensors.items()
    )


def architecture_fingerprint(folder: str | Path, dtypes: Mapping[str, str] | None = None) -> str:
    """sha256 of the config's architecture fields and every tensor's name, shape and dtype.

    `dtypes` (tensor name -> dtype) replaces the stored dtypes of the tensors it names: the
    fingerprint the folder would have with those dtypes (how an expert saved in another float
    dtype is compared with its base).
    """
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    fields = {key: config[key] for key in ARCHITECTURE_FIELDS if key in config}
    dtypes = dtypes or {}
    tensors = sorted(
        [i.name, list(i.shape), dtypes.get(i.name, i.dtype)] for i in read_tensor_infos(folder).values()
    )
    return sha256_hex(pack(["umm-architecture-v1", json.dumps(fields, sort_keys=True), tensors]))


def tokenizer_fingerprint(folder: str | Path) -> str:
    """sha256 of canonical ``tokenizer.json`` (or of the legacy vocabulary files)."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if path.exists():
        canonical = json.dumps(_read_json(path), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return sha256_hex(pack(["umm-tokenizer-v1", "tokenizer.json", canonical]))
    parts = [
        [name, (folder / name).read_bytes()] for name in LEGACY_TOKENIZER_FILES if (folder / name).exists()
    ]
    if not parts:
        raise ModelFolderError(
            f"expected tokenizer.json or {', '.join(LEGACY_TOKENIZER_FILES)} in {folder}, got none"
        )
    return sha256_hex(pack(["umm-tokenizer-v1", parts]))


def fingerprint_model(folder: str | Path) -> ModelFingerprint:
    """All three fingerprints of a model folder."""
    return ModelFingerprint(
        base=weights_fingerprint(folder),
        architecture=architecture_fingerprint(folder),
        tokenizer=tokenizer_fingerprint(folder),
    )


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFolderError(f"expected {path.name} in {path.parent}, got none") from None
    except (ValueError, UnicodeDecodeError):
        raise ModelFolderError(f"expected valid JSON in {path}, got invalid JSON") from None
    if not isinstance(value, dict):
        raise ModelFolderError(f"expected a JSON object in {path}, got {type(value).__name__}")
    return value
