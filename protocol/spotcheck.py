"""Sampled attestations (spot checks): which tensors of a shard result a checker recomputes.

A shard is merged in full by a few workers (protocol.shards: ``FULL_ATTESTATIONS + 1`` of them,
protocol.quorum); every other node checks a sample of its tensors. The sample is unpredictable to the result's
publisher, yet anyone can verify it afterwards:

- the checker signs `sample_input` — the network, round, shard, shard count, recipe id and merged
  fingerprint that the result states — with its Ed25519 key (`sign_sample`). Ed25519 signatures
  are deterministic, so the proof is fixed per (checker, result content), and nobody without the
  checker's private key can compute it before the checker publishes it;
- tensor ``name`` is in the sample when the first 8 bytes of ``sha256("umm-spot-tensor-v1" ||
  proof || name)``, read as a big-endian integer ``h``, satisfy ``h × contributions < deltas ×
  2^64`` — each tensor independently with probability ``f = min(1, deltas / contributions)``
  (`sample_fraction`, `contributions` = the recipe's admitted contributions); if none qualifies,
  the one with the smallest ``h`` (ties: name) is the sample (`sample_tensors`);
- the checker fetches only the sampled tensors of the recipe's contributions, a fraction ``f`` of
  the shard's delta bytes from each, so over all the shards it checks it receives about
  ``deltas`` contributions' worth of delta bytes however many peers contribute (`SPOT_CHECK_DELTAS`);
- it recomputes them with the engine (`recheck`; the engine merges tensor by tensor, so a subset
  of a shard's tensors gives exactly those tensors' bytes) and attests, with ``kind`` ``sampled``,
  only if every one equals the result's entry. `check_attestation_claim` checks what an
  attestation says it checked: the proof's signature and the sample it selects.

A forged tensor escapes one sampled checker with probability ``1 - f`` and ``q`` independent
checkers with ``(1 - f)^q``; a round needs at least `protocol.quorum.full_quorum` full attestations
per shard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

import torch

from protocol.aggregate import aggregate, encode_result
from protocol.chunks import ChunkSource, decode_tensors
from protocol.encoding import pack
from protocol.errors import SchemaError
from protocol.identity import Identity, verify_signature
from protocol.messages import Attestation, DeltaManifest, MergeResult, TensorEntry

SPOT_CHECK_DELTAS = 2  # a checker's expected spot-check input per round, in contributions' deltas
SAMPLE_DOMAIN = "umm-spot-v1"
TENSOR_DOMAIN = b"umm-spot-tensor-v1"


def sample_input(result: MergeResult | Attestation) -> bytes:
    """The bytes a checker signs to draw its sample: the content a result and its attestations share."""
    recipe_id = result.recipe.id if isinstance(result, MergeResult) else result.recipe_id
    fields = [result.network_id, result.round, result.shard, result.shards, recipe_id]
    return pack([SAMPLE_DOMAIN, *fields, result.merged_fingerprint])


def sign_sample(identity: Identity, result: MergeResult) -> bytes:
    """The checker's sample proof for `result`: its deterministic Ed25519 signature of `sample_input`."""
    return identity.sign(sample_input(result))


def sample_fraction(contributions: int, deltas: int = SPOT_CHECK_DELTAS) -> tuple[int, int]:
    """The per-tensor sampling probability ``min(1, deltas / contributions)`` as (numerator, denominator)."""
    if contributions < 1 or deltas < 1:
        raise RuntimeError("sample_fraction: contributions and deltas must be at least 1")
    return min(deltas, contributions), contributions


def tensor_score(proof: bytes, name: str) -> int:
    """The 64-bit draw of tensor `name` under `proof`."""
    return int.from_bytes(hashlib.sha256(TENSOR_DOMAIN + proof + name.encode()).digest()[:8], "big")


def sample_tensors(
    proof: bytes, names: Iterable[str], contributions: int, deltas: int = SPOT_CHECK_DELTAS
) -> tuple[str, ...]:
    """The sorted tensor names of `names` that `proof` selects (module docstring; never empty)."""
    numerator, denominator = sample_fraction(contributions, deltas)
    scores = {name: tensor_score(proof, name) for name in names}
    if not scores:
        raise RuntimeError("sample_tensors: a shard has at least one tensor")
    chosen = [name for name, h in scores.items() if h * denominator < numerator << 64]
    if not chosen:
        chosen = [min(scores, key=lambda name: (scores[name], name))]
    return tuple(sorted(chosen))


def result_sample(proof: bytes, result: MergeResult, deltas: int = SPOT_CHECK_DELTAS) -> tuple[str, ...]:
    """The tensors of `result` that `proof` selects, drawn at the rate its recipe's contributions give."""
    return sample_tensors(proof, (t.name for t in result.tensors), len(result.recipe.contributions), deltas)


def check_attestation_claim(att: Attestation, result: MergeResult) -> None:
    """Raise unless `att` claims what its kind checks of `result`.

    Full: every tensor and byte of the result, no proof. Sampled: a valid proof by the attestation's
    signer over the result's content, and exactly the count and bytes of the sample it selects.
    SchemaError for a wrong claim, SignatureError for a proof by another key or of other content.
    """
    if att.kind == "full":
        names = tuple(t.name for t in result.tensors)
    else:
        verify_signature(att.signer, att.sample_proof, sample_input(result))
        names = result_sample(att.sample_proof, result)
    sizes = {t.name: t.nbytes for t in result.tensors}
    claim = (att.checked_tensors, att.checked_bytes)
    expected = (len(names), sum(sizes[name] for name in names))
    if claim != expected:
        raise SchemaError(
            f"expected a {att.kind} attestation to claim {expected[0]} tensors and {expected[1]} bytes "
            f"checked, got {claim[0]} and {claim[1]}"
        )


def recheck(
    result: MergeResult,
    names: Sequence[str],
    base: Mapping[str, torch.Tensor],
    deltas: Mapping[str, Mapping[str, torch.Tensor]],
    model_tensors: Iterable[str],
) -> tuple[str, ...]:
    """Recompute tensors `names` of `result` from its recipe; the names whose entry differs (sorted).

    `base` and each of `deltas` (one per recipe contribution) need at least the tensors `names`;
    `model_tensors` are the whole model's tensor names (layer-wise parameters resolve against them).
    An entry differs unless name, shape, dtype, codec, size, digest and chunk list are all equal.
    """
    wanted = sorted(names)
    merged = aggregate(
        result.recipe,
        {name: base[name] for name in wanted},
        {cid: {name: delta[name] for name in wanted} for cid, delta in deltas.items()},
        model_tensors=model_tensors,
    )
    entries, _, _ = encode_result(merged, result.chunk_size)
    held = {t.name: t for t in result.tensors}
    return tuple(sorted(e.name for e in entries if held.get(e.name) != e))


def sampled_entries(entries: Iterable[TensorEntry], names: Iterable[str]) -> tuple[TensorEntry, ...]:
    """The entries of `entries` whose tensor is one of `names`, in their order."""
    wanted = set(names)
    return tuple(e for e in entries if e.name in wanted)


def recheck_digests(
    result: MergeResult,
    names: Sequence[str],
    base_entries: Sequence[TensorEntry],
    manifests: Mapping[str, DeltaManifest],
) -> list[str]:
    """The chunks `recheck_chunks` reads: the sampled tensors of the base and of every contribution
    `result`'s recipe admits (`manifests` by contribution id), without repeats."""
    entries = [*sampled_entries(base_entries, names)]
    for cid in result.recipe.contributions:
        entries += sampled_entries(manifests[cid].tensors, names)
    return list(dict.fromkeys(d for e in entries for d in e.chunks))


def recheck_chunks(
    result: MergeResult,
    names: Sequence[str],
    base_entries: Sequence[TensorEntry],
    base_chunk_size: int,
    manifests: Mapping[str, DeltaManifest],
    source: ChunkSource,
) -> tuple[str, ...]:
    """`recheck` of tensors `names` of `result` from chunks: the base's and each admitted
    contribution's sampled tensors decoded from `source` (`recheck_digests` lists them).

    ProtocolError for bytes that do not decode or inputs that do not merge; whatever `source`
    raises for a chunk it lacks.
    """
    deltas = {
        cid: decode_tensors(sampled_entries(manifests[cid].tensors, names), source, manifests[cid].chunk_size)
        for cid in result.recipe.contributions
    }
    base = decode_tensors(sampled_entries(base_entries, names), source, base_chunk_size)
    return recheck(result, names, base, deltas, [e.name for e in base_entries])
