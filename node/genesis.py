"""A network's genesis: the settings every node applies, content-addressed and signed by its creator.

The genesis body (canonical msgpack, protocol.encoding) names the base model (weights, architecture
and tokenizer fingerprints, plus the digests of its tensor list and side files, which are served as
chunks like any delta), the default merge method and layer-wise parameters, the output dtype,
the quorum, the membership policy (an allowlist of Ed25519 keys, or open) and the admission rule.
Its sha256 is the genesis id; the network id is ``NAME.<first 16 hex of the id>``, so messages of
another genesis (even one with the same name) carry another network id and are rejected.

The genesis record is ``pack({"body": body bytes, "signature": creator's Ed25519 signature over
pack(["umm-genesis-v1", body bytes])})``; `open_genesis` checks the signature and the body.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from node.errors import NodeError
from node.store import ContentStore
from protocol.aggregate import RAW, recipe_config
from protocol.chunks import encode_tensors
from protocol.encoding import pack, sha256_hex, unpack
from protocol.errors import ProtocolError
from protocol.fingerprint import fingerprint_model
from protocol.identity import PUBLIC_KEY_SIZE, Identity, verify_signature
from protocol.messages import DEFAULT_CHUNK_SIZE, MergeRecipe, TensorEntry

GENESIS_DOMAIN = "umm-genesis-v1"
GENESIS_VERSION = 1
MAX_GENESIS_BYTES = 6 * 1024
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,46}")
SIDE_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja")
MAX_BASE_MANIFEST_BYTES = 64 << 20
PROBE_SET_DOMAIN = "umm-probe-set-v1"


class GenesisError(NodeError):
    """A genesis record or its settings are invalid."""


@dataclasses.dataclass(frozen=True)
class Genesis:
    """The settings of one network (see the module docstring)."""

    name: str
    created_at: int
    creator: bytes
    base_fingerprint: str
    architecture_fingerprint: str
    tokenizer_fingerprint: str
    base_manifest: str
    base_files: dict[str, str]
    chunk_size: int
    method: str
    parameters: dict[str, Any]
    dtype: str
    quorum: int
    members: tuple[bytes, ...] | None
    outlier_factor: float
    min_contributions: int
    settle_seconds: float
    probe_set_fingerprint: str
    v: int = GENESIS_VERSION

    def body_bytes(self) -> bytes:
        """Canonical bytes of the body (what the id hashes and the creator signs)."""
        fields = dataclasses.asdict(self)
        fields["members"] = list(self.members) if self.members is not None else None
        return pack(fields)

    @property
    def id(self) -> str:
        """sha256 of the body bytes: the network's chain id."""
        return sha256_hex(self.body_bytes())

    @property
    def network_id(self) -> str:
        """``NAME.<16 hex of the genesis id>``: the network id every message carries."""
        return f"{self.name}.{self.id[:16]}"

    @property
    def allowed_signers(self) -> frozenset[bytes] | None:
        """The allowlist as protocol verification wants it (None in open mode)."""
        return frozenset(self.members) if self.members is not None else None

    def quorum_for(self, contributions: int) -> int:
        """Attestations a result needs: the fixed quorum, or a majority of the contributors (>= 2)."""
        if self.quorum > 0:
            return self.quorum
        return max(2, contributions // 2 + 1)

    def recipe(self, round_number: int, contributions: list[str]) -> MergeRecipe:
        """The deterministic recipe of a round from the network's settings."""
        return MergeRecipe.build(
            network_id=self.network_id,
            round=round_number,
            method=self.method,
            parameters=self.parameters,
            base_fingerprint=self.base_fingerprint,
            architecture_fingerprint=self.architecture_fingerprint,
            contributions=contributions,
            dtype=self.dtype,
        )


def sign_genesis(genesis: Genesis, identity: Identity) -> bytes:
    """The signed genesis record bytes."""
    if genesis.creator != identity.public_key:
        raise RuntimeError("sign_genesis: the genesis creator is not this identity's public key")
    body = genesis.body_bytes()
    return pack({"body": body, "signature": identity.sign(pack([GENESIS_DOMAIN, body]))})


def open_genesis(data: bytes, *, expected_id: str | None = None) -> Genesis:
    """Verify a genesis record (signature, fields, and its id if given) and return its settings."""
    try:
        record = unpack(data, max_size=MAX_GENESIS_BYTES)
        if not isinstance(record, dict) or set(record) != {"body", "signature"}:
            raise GenesisError(
                "expected a genesis record with exactly 'body' and 'signature', got another map"
            )
        body = unpack(record["body"], max_size=MAX_GENESIS_BYTES)
        genesis = _genesis_from_dict(body)
        if genesis.body_bytes() != record["body"]:
            raise GenesisError("expected the genesis body in canonical form, got other bytes")
        verify_signature(genesis.creator, record["signature"], pack([GENESIS_DOMAIN, record["body"]]))
    except ProtocolError as exc:
        raise GenesisError(f"expected a valid genesis record, got: {exc}") from exc
    if expected_id is not None and not genesis.id.startswith(expected_id):
        raise GenesisError(f"expected genesis {expected_id}, got genesis {genesis.id}")
    return genesis


def _genesis_from_dict(body: Any) -> Genesis:
    if not isinstance(body, dict):
        raise GenesisError(f"expected a genesis body map, got {type(body).__name__}")
    names = {f.name for f in dataclasses.fields(Genesis)}
    if set(body) != names:
        odd = sorted(set(body) ^ names)
        raise GenesisError(f"expected genesis fields {sorted(names)}, got a difference at {odd}")
    members = body["members"]
    if members is not None:
        if not isinstance(members, list) or not all(
            isinstance(m, bytes) and len(m) == PUBLIC_KEY_SIZE for m in members
        ):
            raise GenesisError("expected members to be a list of 32-byte Ed25519 public keys or nil")
        body = {**body, "members": tuple(members)}
    genesis = Genesis(**body)
    _check_settings(genesis)
    return genesis


def _check_settings(genesis: Genesis) -> None:
    if genesis.v != GENESIS_VERSION:
        raise GenesisError(f"expected genesis version {GENESIS_VERSION}, got {genesis.v}")
    if not isinstance(genesis.name, str) or NAME_RE.fullmatch(genesis.name) is None:
        raise GenesisError(f"expected a network name matching {NAME_RE.pattern}, got {genesis.name!r}")
    if not isinstance(genesis.quorum, int) or genesis.quorum < 0:
        raise GenesisError(f"expected a quorum >= 0 (0 = majority of contributors), got {genesis.quorum!r}")
    if not isinstance(genesis.min_contributions, int) or genesis.min_contributions < 1:
        raise GenesisError(f"expected min_contributions >= 1, got {genesis.min_contributions!r}")
    if not isinstance(genesis.settle_seconds, float) or not 0.0 <= genesis.settle_seconds <= 3600.0:
        raise GenesisError(f"expected settle_seconds in [0, 3600], got {genesis.settle_seconds!r}")
    if not isinstance(genesis.outlier_factor, float) or genesis.outlier_factor <= 1.0:
        raise GenesisError(f"expected an outlier factor > 1.0, got {genesis.outlier_factor!r}")
    try:
        recipe_config(genesis.recipe(0, ["00" * 32]))
    except ProtocolError as exc:
        raise GenesisError(f"expected merge settings the engine accepts, got: {exc}") from exc


def read_probe_set(data: bytes) -> list[str]:
    """The probe texts from the bytes of the probe-set chunk (``pack(["umm-probe-set-v1", texts])``)."""
    try:
        value = unpack(data, max_size=64 << 20)
    except ProtocolError as exc:
        raise GenesisError(f"expected a probe-set chunk, got: {exc}") from exc
    if (
        not isinstance(value, list)
        or len(value) != 2
        or value[0] != PROBE_SET_DOMAIN
        or not isinstance(value[1], list)
        or not all(isinstance(t, str) for t in value[1])
    ):
        raise GenesisError("expected a probe-set chunk holding a list of texts, got another value")
    return value[1]


def probe_set_bytes(texts: list[str]) -> bytes:
    """The probe-set chunk; its sha256 equals `protocol.summary.probe_set_fingerprint(texts)`."""
    return pack([PROBE_SET_DOMAIN, list(texts)])


def load_base(base_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder's ``*.safetensors`` files."""
    files = sorted(Path(base_dir).glob("*.safetensors"))
    if not files:
        raise GenesisError(f"expected *.safetensors files in {base_dir}, got none")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


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


def read_base_manifest(data: bytes) -> tuple[TensorEntry, ...]:
    """The base's tensor entries from the bytes of its manifest chunk."""
    try:
        rows = unpack(data, max_size=MAX_BASE_MANIFEST_BYTES)
        if not isinstance(rows, list):
            raise GenesisError(f"expected a list of base tensor entries, got {type(rows).__name__}")
        return tuple(TensorEntry.from_dict(row) for row in rows)
    except ProtocolError as exc:
        raise GenesisError(f"expected a valid base manifest, got: {exc}") from exc


def create_genesis(
    name: str,
    base_dir: str | Path,
    identity: Identity,
    store: ContentStore,
    *,
    method: str = "ties",
    parameters: dict[str, Any] | None = None,
    dtype: str = "float32",
    quorum: int = 0,
    members: tuple[bytes, ...] | None = None,
    outlier_factor: float = 3.0,
    min_contributions: int = 2,
    settle_seconds: float = 2.0,
    probe_set: list[str] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Genesis, bytes]:
    """Fingerprint the base, put its chunks (and the probe texts) in `store`, sign a genesis."""
    fingerprints = fingerprint_model(base_dir)
    manifest, files = store_base(base_dir, store, chunk_size)
    if probe_set is not None and (not probe_set or not all(isinstance(t, str) and t for t in probe_set)):
        raise GenesisError("expected a probe set of non-empty texts, got an empty set or an empty text")
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
        parameters=dict(parameters if parameters is not None else {"density": 0.5, "weight": 1.0}),
        dtype=dtype,
        quorum=quorum,
        members=tuple(sorted(members)) if members is not None else None,
        outlier_factor=float(outlier_factor),
        min_contributions=min_contributions,
        settle_seconds=float(settle_seconds),
        probe_set_fingerprint=probe,
    )
    _check_settings(genesis)
    return genesis, sign_genesis(genesis, identity)
