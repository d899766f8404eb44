"""The network's messages: frozen dataclasses with validating `from_dict` / `to_dict`.

Every signed message carries ``v`` (schema version), ``network_id``, ``signer`` (the 32-byte Ed25519
public key that signs it) and ``created_at`` (Unix seconds); all but `ExpertCard` carry ``round``.
Signed messages travel inside an `Envelope` (protocol.envelope). `MergeRecipe` is not signed: every
node derives it from public data, and `MergeResult` embeds it. Unknown fields are rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from protocol.codecs import DTYPES, CodecSpec, check_compatible, numel_of, raw_size
from protocol.encoding import pack, sha256_hex
from protocol.errors import SchemaError
from protocol.identity import PUBLIC_KEY_SIZE, peer_id_from_public_key
from protocol.schema import (
    Record,
    field,
    hex64,
    integer,
    nested,
    plain_value,
    raw_bytes,
    sequence,
    text,
)

SCHEMA_VERSION = 3  # 2: attestations say what they checked; 3: summaries carry responses, cards fused_from
KiB = 1024
MiB = 1024 * KiB
CHUNK_SIZE_LIMIT = 4 * MiB
DEFAULT_CHUNK_SIZE = 1 * MiB
MIN_CHUNK_SIZE = 4 * KiB
MAX_TENSORS = 100_000
MAX_CHUNKS_PER_TENSOR = 1 << 20
NETWORK_ID = r"[a-z0-9][a-z0-9._-]{0,63}"
TENSOR_NAME = r"[A-Za-z0-9_.\-/:]{1,512}"

version = integer(SCHEMA_VERSION, SCHEMA_VERSION)
network_id = text(64, NETWORK_ID)
signer_key = raw_bytes(PUBLIC_KEY_SIZE)
timestamp = integer(0, 2**40)
round_number = integer(0, 2**40)


def _shape(name: str, value: Any) -> tuple[int, ...]:
    return sequence(integer(0, 2**40), max_items=8)(name, value)


codec_spec = nested(CodecSpec)
parameters_value = plain_value()


@dataclass(frozen=True)
class TensorEntry(Record):
    """One tensor: name, shape, dtype, codec, encoded size, sha256 of the encoded bytes, chunk hashes."""

    name: str = field(text(512, TENSOR_NAME))
    shape: tuple[int, ...] = field(_shape)
    dtype: str = field(text(16))
    codec: CodecSpec = field(codec_spec)  # noqa: RUF009 (a dataclasses.field)
    nbytes: int = field(integer(0, 2**42))
    digest: str = field(hex64)
    chunks: tuple[str, ...] = field(sequence(hex64, MAX_CHUNKS_PER_TENSOR))

    def _validate(self) -> None:
        if self.dtype not in DTYPES:
            raise SchemaError(f"expected {self.name} dtype in {sorted(DTYPES)}, got {self.dtype!r}")
        check_compatible(self.codec, self.shape, self.dtype)
        if numel_of(self.shape) > 2**40:
            raise SchemaError(f"expected {self.name} to have at most 2**40 entries, got more")
        expected = raw_size(self.codec, numel_of(self.shape), self.dtype)
        if not self.codec.zstd and self.nbytes != expected:
            raise SchemaError(f"expected {self.name} nbytes {expected} for {self.codec}, got {self.nbytes}")

    def check_chunking(self, chunk_size: int) -> None:
        """Raise SchemaError unless the chunk count matches `nbytes` split into `chunk_size` pieces."""
        expected = -(-self.nbytes // chunk_size)
        if len(self.chunks) != expected:
            raise SchemaError(
                f"expected {expected} chunks for {self.name} ({self.nbytes} bytes), got {len(self.chunks)}"
            )


def _check_tensors(tensors: tuple[TensorEntry, ...], chunk_size: int, where: str) -> None:
    names = [t.name for t in tensors]
    if names != sorted(set(names)):
        raise SchemaError(f"expected {where} tensors sorted by name without duplicates, got another order")
    for entry in tensors:
        entry.check_chunking(chunk_size)


def state_fingerprint(tensors: Any) -> str:
    """sha256 over the sorted (name, shape, dtype, sha256 of raw bytes) of a model's tensors.

    `tensors` is an iterable of (name, shape, dtype, digest); the same function fingerprints a base
    model folder (protocol.fingerprint), a merged state dict and a MergeResult's entries.
    """
    rows = sorted([name, list(shape), dtype, digest] for name, shape, dtype, digest in tensors)
    return sha256_hex(pack(["umm-state-v1", rows]))


@dataclass(frozen=True)
class SignedMessage(Record):
    """Base of signed message types: the common fields; `TYPE` names the envelope type, `MAX_SIZE`
    bounds the payload."""

    TYPE: ClassVar[str]
    MAX_SIZE: ClassVar[int]

    v: int = field(version)
    network_id: str = field(network_id)
    signer: bytes = field(signer_key)
    created_at: int = field(timestamp)

    @property
    def peer_id(self) -> str:
        """The printable peer id of the signer."""
        return peer_id_from_public_key(self.signer)


@dataclass(frozen=True)
class RoundMessage(SignedMessage):
    """A signed message that belongs to one aggregation round."""

    round: int = field(round_number)


@dataclass(frozen=True)
class ExpertCard(SignedMessage):
    """Who hosts which expert: fingerprints of its base, architecture and tokenizer, domains, license.

    ``fused_from``: for a copy of the base distilled from other experts' summaries (heterogeneous
    fusion), the ids of the DistributionSummary envelopes it was distilled from, sorted; empty for
    an ordinary expert.
    """

    TYPE: ClassVar[str] = "expert_card"
    MAX_SIZE: ClassVar[int] = 16 * KiB

    name: str = field(text(128))
    base_fingerprint: str = field(hex64)
    architecture_fingerprint: str = field(hex64)
    tokenizer_fingerprint: str = field(hex64)
    domains: tuple[str, ...] = field(sequence(text(64), 32))
    license: str = field(text(128))
    fused_from: tuple[str, ...] = field(sequence(hex64, 64, strictly_sorted=True), default=())


@dataclass(frozen=True)
class DeltaManifest(RoundMessage):
    """An expert's layer deltas (expert - base) for one round: every tensor's entry and chunk hashes."""

    TYPE: ClassVar[str] = "delta_manifest"
    MAX_SIZE: ClassVar[int] = 8 * MiB

    card_id: str = field(hex64)
    base_fingerprint: str = field(hex64)
    architecture_fingerprint: str = field(hex64)
    chunk_size: int = field(integer(MIN_CHUNK_SIZE, CHUNK_SIZE_LIMIT))
    total_bytes: int = field(integer(0, 2**50))
    tensors: tuple[TensorEntry, ...] = field(sequence(nested(TensorEntry), MAX_TENSORS, min_items=1))

    def _validate(self) -> None:
        _check_tensors(self.tensors, self.chunk_size, "DeltaManifest")
        for entry in self.tensors:
            if entry.codec.name == "raw":
                raise SchemaError(f"expected a delta codec for {entry.name}, got raw")
        total = sum(t.nbytes for t in self.tensors)
        if total != self.total_bytes:
            raise SchemaError(f"expected total_bytes {total} (sum of tensors), got {self.total_bytes}")


SUMMARY_TENSORS = ("header", "logprobs", "offsets", "target_ids", "token_ids")
MAX_SUMMARY_HEADER_BYTES = 64 * MiB


@dataclass(frozen=True)
class DistributionSummary(RoundMessage):
    """An expert's response summary on the network's probe set (FuseLLM / FuseChat-style fusion).

    Tensors (raw codec, zstd allowed): ``offsets`` int64 [examples + 1] (prompt j owns positions
    offsets[j]:offsets[j + 1]), ``target_ids`` int32 [positions] (the expert's greedy response
    tokens, end-of-sequence last), ``token_ids`` int32 [positions, k] and ``logprobs`` float32
    [positions, k] (the top-k next tokens at each position, most likely first), and ``header``
    uint8 [n] (canonical msgpack map: the responses' texts, the tokenizer's marker style, the token
    strings of every id used, the special tokens by role, the prompt style and the model's name;
    protocol.summary). The prompts do not travel: the genesis holds the probe set.
    """

    TYPE: ClassVar[str] = "distribution_summary"
    MAX_SIZE: ClassVar[int] = 64 * KiB

    card_id: str = field(hex64)
    probe_set_fingerprint: str = field(hex64)
    tokenizer_fingerprint: str = field(hex64)
    k: int = field(integer(1, 1024))
    num_examples: int = field(integer(1, 2**32))
    chunk_size: int = field(integer(MIN_CHUNK_SIZE, CHUNK_SIZE_LIMIT))
    tensors: tuple[TensorEntry, ...] = field(sequence(nested(TensorEntry), 5, min_items=5))

    def _validate(self) -> None:
        _check_tensors(self.tensors, self.chunk_size, "DistributionSummary")
        by_name = {t.name: t for t in self.tensors}
        if tuple(by_name) != SUMMARY_TENSORS:
            raise SchemaError(f"expected summary tensors {SUMMARY_TENSORS}, got {tuple(by_name)}")
        expected = {
            "header": ("uint8", 1),
            "logprobs": ("float32", 2),
            "offsets": ("int64", 1),
            "target_ids": ("int32", 1),
            "token_ids": ("int32", 2),
        }
        for name, (dtype, ndim) in expected.items():
            entry = by_name[name]
            if entry.dtype != dtype or len(entry.shape) != ndim or entry.codec.name != "raw":
                raise SchemaError(f"expected {name} to be raw {dtype} with {ndim} dims, got {entry.dtype}")
        if by_name["offsets"].shape != (self.num_examples + 1,):
            got = list(by_name["offsets"].shape)
            raise SchemaError(f"expected offsets of shape [{self.num_examples + 1}], got {got}")
        positions = by_name["token_ids"].shape
        if positions[1] != self.k or by_name["logprobs"].shape != positions:
            raise SchemaError(f"expected token_ids and logprobs of shape [n, {self.k}], got others")
        if by_name["target_ids"].shape != positions[:1]:
            raise SchemaError(
                f"expected target_ids of shape [{positions[0]}], got {list(by_name['target_ids'].shape)}"
            )
        header_bytes = by_name["header"].shape[0]
        if not 1 <= header_bytes <= MAX_SUMMARY_HEADER_BYTES:
            raise SchemaError(
                f"expected a summary header of 1..{MAX_SUMMARY_HEADER_BYTES} bytes, got {header_bytes}"
            )


@dataclass(frozen=True)
class MergeRecipe(Record):
    """What to merge: method, parameters, the sorted contribution ids, a content-derived seed, the round.

    Not signed: every node derives it from public data. ``seed`` must equal `derive_seed` of the
    other fields, so nobody can pick a favourable seed. Its id is the sha256 of its canonical bytes.
    """

    MAX_SIZE: ClassVar[int] = 1 * MiB

    v: int = field(version)
    network_id: str = field(network_id)
    round: int = field(round_number)
    method: str = field(text(64, r"[a-z0-9_]+"))
    parameters: dict = field(parameters_value)  # noqa: RUF009 (a dataclasses.field)
    base_fingerprint: str = field(hex64)
    architecture_fingerprint: str = field(hex64)
    contributions: tuple[str, ...] = field(sequence(hex64, 4096, min_items=1, strictly_sorted=True))
    dtype: str = field(text(16))
    seed: int = field(integer(0, 2**63 - 1))

    def _validate(self) -> None:
        if not isinstance(self.parameters, dict):
            got = type(self.parameters).__name__
            raise SchemaError(f"expected MergeRecipe.parameters to be a map, got {got}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise SchemaError(f"expected MergeRecipe.dtype float32, float16 or bfloat16, got {self.dtype!r}")
        if self.seed != derive_seed(self.to_dict()):
            raise SchemaError("expected MergeRecipe.seed derived from the recipe's content, got another seed")

    @classmethod
    def build(cls, **fields: Any) -> MergeRecipe:
        """A recipe whose contributions are sorted and whose seed is derived from its content."""
        fields["contributions"] = sorted(set(fields["contributions"]))
        fields.setdefault("v", SCHEMA_VERSION)
        fields["seed"] = derive_seed(fields)
        return cls(**fields)

    def to_bytes(self) -> bytes:
        """Canonical bytes (what `id` hashes)."""
        return pack(self.to_dict())

    @property
    def id(self) -> str:
        """sha256 of the canonical bytes."""
        return sha256_hex(self.to_bytes())


def derive_seed(fields: dict[str, Any]) -> int:
    """The recipe seed: the first 63 bits of sha256 over the canonical recipe fields except the seed."""
    body = {k: v for k, v in fields.items() if k != "seed"}
    return int(sha256_hex(pack(["umm-seed-v1", body]))[:16], 16) >> 1


recipe_value = nested(MergeRecipe)


MAX_SHARDS = 4096
shard_index = integer(0, MAX_SHARDS - 1)
shard_count = integer(1, MAX_SHARDS)


def _check_shard(shard: int, shards: int, where: str) -> None:
    if shard >= shards:
        raise SchemaError(f"expected {where}.shard below shards ({shards}), got {shard}")


@dataclass(frozen=True)
class MergeResult(RoundMessage):
    """One shard of a round's merge: that shard's output tensors (raw codec) and their fingerprint.

    A round's merge is split by tensor into ``shards`` shards (protocol.shards); this message holds
    shard ``shard``. ``candidates`` are the round's selected contribution ids (sorted), before
    admission; the recipe lists those admitted for this shard's tensors (a subset). An unsharded
    merge is shard 0 of 1. ``merged_fingerprint`` is `state_fingerprint` of this message's tensors.
    """

    TYPE: ClassVar[str] = "merge_result"
    MAX_SIZE: ClassVar[int] = 16 * MiB

    recipe: MergeRecipe = field(recipe_value)  # noqa: RUF009 (a dataclasses.field)
    chunk_size: int = field(integer(MIN_CHUNK_SIZE, CHUNK_SIZE_LIMIT))
    tensors: tuple[TensorEntry, ...] = field(sequence(nested(TensorEntry), MAX_TENSORS, min_items=1))
    merged_fingerprint: str = field(hex64)
    shard: int = field(shard_index)
    shards: int = field(shard_count)
    candidates: tuple[str, ...] = field(sequence(hex64, 4096, min_items=1, strictly_sorted=True))

    def _validate(self) -> None:
        _check_tensors(self.tensors, self.chunk_size, "MergeResult")
        _check_shard(self.shard, self.shards, "MergeResult")
        if self.recipe.round != self.round or self.recipe.network_id != self.network_id:
            raise SchemaError("expected MergeResult round and network_id equal to its recipe's, got others")
        outside = sorted(set(self.recipe.contributions) - set(self.candidates))
        if outside:
            raise SchemaError(
                f"expected the recipe's contributions among MergeResult.candidates, got {outside[0]} outside"
            )
        for entry in self.tensors:
            if entry.codec.name != "raw" or entry.codec.zstd:
                raise SchemaError(
                    f"expected raw codec without zstd for result {entry.name}, got {entry.codec}"
                )
        fingerprint = state_fingerprint((t.name, t.shape, t.dtype, t.digest) for t in self.tensors)
        if fingerprint != self.merged_fingerprint:
            got = self.merged_fingerprint
            raise SchemaError(f"expected merged_fingerprint {fingerprint} of the tensors, got {got}")


ATTESTATION_KINDS = ("full", "sampled")
SAMPLE_PROOF_SIZE = 64  # an Ed25519 signature (protocol.spotcheck)


def _sample_proof(name: str, value: Any) -> bytes:
    if type(value) is not bytes or len(value) not in (0, SAMPLE_PROOF_SIZE):
        got = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
        raise SchemaError(f"expected {name} to be 0 or {SAMPLE_PROOF_SIZE} bytes, got {got}")
    return value


@dataclass(frozen=True)
class Attestation(RoundMessage):
    """A signer who recomputed one shard's result, in full or a sample of its tensors, and got its bytes.

    ``kind`` ``full``: the signer merged the whole shard and got this result's merged fingerprint
    (``checked_tensors`` and ``checked_bytes`` are all of the result's tensors and bytes,
    ``sample_proof`` is empty). ``sampled``: the signer recomputed the tensors that
    ``sample_proof`` (its signature over the result's content) selects by protocol.spotcheck's
    rule, ``checked_tensors`` of them holding ``checked_bytes`` result bytes, and every one equals
    the result's entry.
    """

    TYPE: ClassVar[str] = "attestation"
    MAX_SIZE: ClassVar[int] = 4 * KiB

    recipe_id: str = field(hex64)
    result_id: str = field(hex64)
    merged_fingerprint: str = field(hex64)
    shard: int = field(shard_index)
    shards: int = field(shard_count)
    kind: str = field(text(16, "|".join(ATTESTATION_KINDS)))
    checked_tensors: int = field(integer(1, MAX_TENSORS))
    checked_bytes: int = field(integer(0, 2**50))
    sample_proof: bytes = field(_sample_proof)

    def _validate(self) -> None:
        _check_shard(self.shard, self.shards, "Attestation")
        expected = 0 if self.kind == "full" else SAMPLE_PROOF_SIZE
        if len(self.sample_proof) != expected:
            raise SchemaError(
                f"expected a {expected}-byte sample_proof for a {self.kind} attestation, "
                f"got {len(self.sample_proof)} bytes"
            )


MESSAGE_TYPES: dict[str, type[SignedMessage]] = {
    cls.TYPE: cls for cls in (ExpertCard, DeltaManifest, DistributionSummary, MergeResult, Attestation)
}
