"""A network's genesis: the settings every node applies, content-addressed and signed by its creator.

The genesis body (canonical msgpack, protocol.encoding) names the base model (weights, architecture
and tokenizer fingerprints, plus the digests of its tensor list and side files, which are served as
chunks like any delta), the default merge method and layer-wise parameters, the output dtype,
the quorum, the membership policy (an allowlist of Ed25519 keys, or open) and the admission rule.
Its sha256 is the genesis id; the network id is ``NAME.<first 16 hex of the id>``, so messages of
another genesis (even one with the same name) carry another network id and are rejected.

The genesis record is ``pack({"body": body bytes, "signature": creator's Ed25519 signature over
pack(["umm-genesis-v1", body bytes])})``; `open_genesis` checks the signature and the body.
Creating one from a model folder (fingerprints, the base's chunks) is the node's job
(`node.genesis.create_genesis`). torch is imported only when a recipe is built or checked, so the
command line reads the defaults below at once.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from protocol.encoding import pack, sha256_hex, unpack
from protocol.errors import ProtocolError
from protocol.identity import PUBLIC_KEY_SIZE, Identity, verify_signature
from protocol.quorum import quorum_for

if TYPE_CHECKING:
    from protocol.messages import MergeRecipe, TensorEntry
    from protocol.search_rules import SearchSettings

GENESIS_DOMAIN = "umm-genesis-v1"
GENESIS_VERSION = 1
MAX_GENESIS_BYTES = 6 * 1024
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,46}")
MAX_BASE_MANIFEST_BYTES = 64 << 20
PROBE_SET_DOMAIN = "umm-probe-set-v1"

# the settings `umm network create` proposes
DEFAULT_METHOD = "ties"
DEFAULT_PARAMETERS: dict[str, Any] = {"density": 0.5, "weight": 1.0}
DEFAULT_DTYPE = "float32"
DEFAULT_QUORUM = 0  # a majority of the round's contributors, at least 2
DEFAULT_MIN_CONTRIBUTIONS = 2
DEFAULT_SETTLE_SECONDS = 2.0
DEFAULT_OUTLIER_FACTOR = 3.0


class GenesisError(ProtocolError):
    """A genesis record or its settings are invalid."""

    reason = "genesis"


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
    search: dict[str, Any] | None = None  # protocol.search_rules; None: no searched merges

    def body_bytes(self) -> bytes:
        """Canonical bytes of the body (what the id hashes and the creator signs); a genesis
        without search has no ``search`` field, so its bytes are those of networks before it."""
        fields = dataclasses.asdict(self)
        fields["members"] = list(self.members) if self.members is not None else None
        if self.search is None:
            del fields["search"]
        return pack(fields)

    @property
    def search_settings(self) -> SearchSettings | None:
        """The checked search settings, or None when the network merges with its recipe only."""
        from protocol.search_rules import SearchSettings

        return None if self.search is None else SearchSettings.from_dict(self.search)

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
        """Attestations a result of `contributions` candidates needs (`protocol.quorum.quorum_for`)."""
        return quorum_for(self.quorum, contributions)

    def recipe(self, round_number: int, contributions: list[str]) -> MergeRecipe:
        """The deterministic recipe of a round from the network's settings."""
        from protocol.messages import MergeRecipe

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
    if "search" not in body:
        names.discard("search")
    elif body["search"] is None:
        raise GenesisError("expected no search field rather than a nil one (a genesis without search)")
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
    check_settings(genesis)
    return genesis


def check_settings(genesis: Genesis) -> None:
    """Raise GenesisError unless the settings are ones every node can apply."""
    from merging.methods import METHODS
    from protocol.aggregate import recipe_config

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
    if METHODS[genesis.method].needs_grams:
        raise GenesisError(
            f"expected a merge method that reads only the experts' weights, got {genesis.method!r}, "
            "which reads their input Grams (contributions do not carry them)"
        )
    if genesis.search is not None:
        try:
            genesis.search_settings.check_method(genesis.method)
        except ProtocolError as exc:
            raise GenesisError(f"expected search settings every node can apply, got: {exc}") from exc


def check_proposed_settings(
    name: str,
    *,
    method: str = DEFAULT_METHOD,
    parameters: dict[str, Any] | None = None,
    dtype: str = DEFAULT_DTYPE,
    quorum: int = DEFAULT_QUORUM,
    outlier_factor: float = DEFAULT_OUTLIER_FACTOR,
    min_contributions: int = DEFAULT_MIN_CONTRIBUTIONS,
    settle_seconds: float = DEFAULT_SETTLE_SECONDS,
) -> None:
    """`check_settings` on settings alone (GenesisError), before a base is read or anything written."""
    placeholder = Genesis(
        name=name,
        created_at=0,
        creator=bytes(PUBLIC_KEY_SIZE),
        base_fingerprint="00" * 32,
        architecture_fingerprint="00" * 32,
        tokenizer_fingerprint="00" * 32,
        base_manifest="",
        base_files={},
        chunk_size=0,
        method=method,
        parameters=dict(DEFAULT_PARAMETERS if parameters is None else parameters),
        dtype=dtype,
        quorum=quorum,
        members=None,
        outlier_factor=float(outlier_factor),
        min_contributions=min_contributions,
        settle_seconds=float(settle_seconds),
        probe_set_fingerprint="",
    )
    check_settings(placeholder)


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


def read_base_manifest(data: bytes) -> tuple[TensorEntry, ...]:
    """The base's tensor entries from the bytes of its manifest chunk."""
    from protocol.messages import TensorEntry

    try:
        rows = unpack(data, max_size=MAX_BASE_MANIFEST_BYTES)
        if not isinstance(rows, list):
            raise GenesisError(f"expected a list of base tensor entries, got {type(rows).__name__}")
        return tuple(TensorEntry.from_dict(row) for row in rows)
    except ProtocolError as exc:
        raise GenesisError(f"expected a valid base manifest, got: {exc}") from exc


def network_genesis_id(network_id: str) -> str:
    """The genesis id prefix inside ``NAME.<16 hex>``."""
    name, dot, suffix = network_id.rpartition(".")
    if not dot or not name or len(suffix) != 16 or not all(c in "0123456789abcdef" for c in suffix):
        raise GenesisError(f"expected a network id NAME.<16 hex digits>, got {network_id!r}")
    return suffix


def genesis_from_records(values: Iterable[bytes], network_id: str) -> tuple[Genesis, bytes] | None:
    """The first of `values` (genesis records) that is the genesis of `network_id`; None if none is."""
    expected = network_genesis_id(network_id)
    for value in values:
        try:
            genesis = open_genesis(value, expected_id=expected)
        except GenesisError:
            continue
        if genesis.network_id == network_id:
            return genesis, value
    return None
