"""Creating a network's genesis from a model folder: fingerprints, the base's chunks, the signature.

The genesis message itself and its checks are protocol data (`protocol.genesis`); this module does
the disk work of `umm network create`: it reads the base folder, puts its tensors (raw chunks), its
tensor list and side files into the node's store, and signs the genesis.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from merging.config import DTYPES as OUTPUT_DTYPES
from node.store import ContentStore
from protocol.aggregate import RAW
from protocol.chunks import encode_tensors
from protocol.codecs import FLOAT_DTYPES
from protocol.encoding import pack
from protocol.fingerprint import fingerprint_model, read_tensor_infos
from protocol.genesis import (
    DEFAULT_DTYPE,
    DEFAULT_METHOD,
    DEFAULT_MIN_CONTRIBUTIONS,
    DEFAULT_OUTLIER_FACTOR,
    DEFAULT_PARAMETERS,
    DEFAULT_QUORUM,
    DEFAULT_SETTLE_SECONDS,
    Genesis,
    GenesisError,
    check_proposed_settings,
    check_settings,
    open_genesis,
    probe_set_bytes,
    read_base_manifest,
    read_probe_set,
    sign_genesis,
)
from protocol.identity import Identity
from protocol.messages import DEFAULT_CHUNK_SIZE
from protocol.search_rules import SearchSettings, SearchSettingsError

__all__ = [  # the genesis message is protocol data; these names stay importable from here
    "Genesis",
    "GenesisError",
    "base_dtype",
    "create_genesis",
    "load_base",
    "open_genesis",
    "read_base_manifest",
    "read_probe_set",
    "side_files",
    "store_base",
]

SIDE_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja")


def load_base(base_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder's ``*.safetensors`` files."""
    files = sorted(Path(base_dir).glob("*.safetensors"))
    if not files:
        raise GenesisError(f"expected *.safetensors files in {base_dir}, got none")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def base_dtype(base_dir: str | Path) -> str:
    """The float dtype holding most of the base's bytes (what ``--dtype`` defaults to); float32
    when that dtype is not one a merge can output (e.g. float64) or the base has no float tensor."""
    totals: dict[str, int] = {}
    for info in read_tensor_infos(base_dir).values():
        if info.dtype in FLOAT_DTYPES:
            totals[info.dtype] = totals.get(info.dtype, 0) + info.end - info.start
    if not totals:
        return DEFAULT_DTYPE
    dtype = max(sorted(totals), key=totals.__getitem__)
    return dtype if dtype in OUTPUT_DTYPES else DEFAULT_DTYPE


def side_files(folder: str | Path) -> dict[str, Path]:
    """The model folder's non-weight files a loadable folder needs (config, tokenizer, ...)."""
    folder = Path(folder)
    return {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix in SIDE_FILE_SUFFIXES and not p.name.endswith(".index.json")
    }


def store_base(
    base_dir: str | Path, store: ContentStore, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[str, dict]:
    """Put the base's tensors (raw chunks), tensor list and side files in `store`; their digests."""
    entries, chunks = encode_tensors(load_base(base_dir), RAW, chunk_size)
    for digest, data in chunks.items():
        store.put(data, digest)
    manifest = store.put(pack([entry.to_dict() for entry in entries]))
    files = {name: store.put(path.read_bytes()) for name, path in side_files(base_dir).items()}
    return manifest, files


def create_genesis(
    name: str,
    base_dir: str | Path,
    identity: Identity,
    store: ContentStore,
    *,
    method: str = DEFAULT_METHOD,
    parameters: dict[str, Any] | None = None,
    dtype: str | None = None,
    quorum: int = DEFAULT_QUORUM,
    members: tuple[bytes, ...] | None = None,
    outlier_factor: float = DEFAULT_OUTLIER_FACTOR,
    min_contributions: int = DEFAULT_MIN_CONTRIBUTIONS,
    settle_seconds: float = DEFAULT_SETTLE_SECONDS,
    probe_set: list[str] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    search: SearchSettings | None = None,
) -> tuple[Genesis, bytes]:
    """Check the settings, fingerprint the base, put its chunks (and the probe texts) in `store`,
    sign a genesis; nothing is written before the settings and the probe set are checked.
    `dtype` (the merged model's) defaults to the base's (`base_dtype`); `search` enables searched
    merges (protocol.search_rules), None keeps the genesis recipe."""
    dtype = base_dtype(base_dir) if dtype is None else dtype
    check_proposed_settings(
        name,
        method=method,
        parameters=parameters,
        dtype=dtype,
        quorum=quorum,
        outlier_factor=outlier_factor,
        min_contributions=min_contributions,
        settle_seconds=settle_seconds,
    )
    if search is not None:
        try:
            search.check_method(method)
        except SearchSettingsError as exc:
            raise GenesisError(f"expected search settings every node can apply, got: {exc}") from exc
    if probe_set is not None and (not probe_set or not all(isinstance(t, str) and t for t in probe_set)):
        raise GenesisError("expected a probe set of non-empty texts, got an empty set or an empty text")
    fingerprints = fingerprint_model(base_dir)
    manifest, files = store_base(base_dir, store, chunk_size)
    probe = store.put(probe_set_bytes(probe_set)) if probe_set else ""
    genesis = Genesis(
        name=name,
        created_at=int(time.time()),
        creator=identity.public_key,
        base_fingerprint=fingerprints.base,
        architecture_fingerprint=fingerprints.architecture,
        tokenizer_fingerprint=fingerprints.tokenizer,
        base_manifest=manifest,
        base_files=files,
        chunk_size=chunk_size,
        method=method,
        parameters=dict(parameters if parameters is not None else DEFAULT_PARAMETERS),
        dtype=dtype,
        quorum=quorum,
        members=tuple(sorted(members)) if members is not None else None,
        outlier_factor=float(outlier_factor),
        min_contributions=min_contributions,
        settle_seconds=float(settle_seconds),
        probe_set_fingerprint=probe,
        search=None if search is None else search.to_dict(),
    )
    check_settings(genesis)
    return genesis, sign_genesis(genesis, identity)
