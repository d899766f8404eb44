"""Signed expert cards, delta manifests (random bf16 deltas of a base) and attestations built in tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from node.genesis import Genesis
from protocol.chunks import encode_tensors, split_blob
from protocol.codecs import parse_codec
from protocol.envelope import Signed, sign_message
from protocol.identity import Identity
from protocol.messages import SCHEMA_VERSION, Attestation, DeltaManifest, ExpertCard


def unit_genesis(*, chunk_size: int, now: int, **changes: Any) -> Genesis:
    """A genesis for unit tests (no base stored anywhere): ties, majority quorum, outlier factor 3."""
    fields: dict[str, Any] = dict(
        name="unit",
        created_at=now - 1000,
        creator=Identity.from_seed(b"\x09" * 32).public_key,
        base_fingerprint="ba" * 32,
        architecture_fingerprint="ac" * 32,
        tokenizer_fingerprint="70" * 32,
        base_manifest="bb" * 32,
        base_files={},
        chunk_size=chunk_size,
        method="ties",
        parameters={"density": 0.5, "weight": 1.0},
        dtype="float32",
        quorum=0,
        members=None,
        outlier_factor=3.0,
        min_contributions=2,
        settle_seconds=2.0,
        probe_set_fingerprint="",
    )
    fields.update(changes)
    return Genesis(**fields)


def signed_contribution(
    who: Identity,
    genesis: Genesis,
    base: dict[str, torch.Tensor],
    *,
    chunk_size: int,
    now: int,
    name: str = "expert",
    scale: float = 0.01,
    seed: int = 0,
    manifest_changes: Mapping[str, Any] | None = None,
    fused_from: tuple[str, ...] = (),
) -> tuple[Signed, Signed, dict[str, bytes]]:
    """(card, manifest, chunks) of an expert `who` whose deltas are `scale` x normal noise of `seed`,
    encoded in chunks of `chunk_size`; `manifest_changes` replace manifest fields; `fused_from`
    makes it a fused copy of those summaries."""
    card = sign_message(
        ExpertCard(
            v=SCHEMA_VERSION,
            network_id=genesis.network_id,
            signer=who.public_key,
            created_at=now - 100,
            name=name,
            base_fingerprint=genesis.base_fingerprint,
            architecture_fingerprint=genesis.architecture_fingerprint,
            tokenizer_fingerprint=genesis.tokenizer_fingerprint,
            domains=("math",),
            license="mit",
            fused_from=fused_from,
        ),
        who,
    )
    gen = torch.Generator().manual_seed(seed)
    deltas = {k: torch.randn(v.shape, generator=gen) * scale for k, v in base.items()}
    entries, chunks = encode_tensors(deltas, parse_codec("bf16"), chunk_size)
    fields = dict(
        v=SCHEMA_VERSION,
        network_id=genesis.network_id,
        signer=who.public_key,
        created_at=now - 50,
        round=0,
        card_id=card.id,
        base_fingerprint=genesis.base_fingerprint,
        architecture_fingerprint=genesis.architecture_fingerprint,
        chunk_size=chunk_size,
        total_bytes=sum(e.nbytes for e in entries),
        tensors=entries,
    )
    fields.update(manifest_changes or {})
    return card, sign_message(DeltaManifest(**fields), who), chunks


def full_attestation(result: Signed, who: Identity, *, created_at: int) -> Signed:
    """`who`'s full attestation of `result` (a signed MergeResult), made by hand: a test's attester
    signs whatever it likes, checked or not."""
    m = result.message
    return sign_message(
        Attestation(
            v=SCHEMA_VERSION,
            network_id=m.network_id,
            signer=who.public_key,
            created_at=created_at,
            round=m.round,
            recipe_id=m.recipe.id,
            result_id=result.id,
            merged_fingerprint=m.merged_fingerprint,
            shard=m.shard,
            shards=m.shards,
            kind="full",
            checked_tensors=len(m.tensors),
            checked_bytes=sum(t.nbytes for t in m.tensors),
            sample_proof=b"",
        ),
        who,
    )


NAN_BYTES = {"bf16": b"\xc0\x7f", "fp32": b"\x00\x00\xc0\x7f"}  # a NaN as the first value


def with_nan(
    who: Identity, manifest: Signed, get: Callable[[str], bytes], tensor: str
) -> tuple[Signed, dict[str, bytes]]:
    """`manifest` (a bf16 or fp32 delta manifest, no zstd) re-signed by `who` with the first
    value of `tensor`'s delta made NaN, and the new chunks of that tensor (`get` reads the old)."""
    m: DeltaManifest = manifest.message
    entry = next(t for t in m.tensors if t.name == tensor)
    nan = NAN_BYTES[entry.codec.name]
    data = b"".join(get(address) for address in entry.chunks)
    digest, addresses, pieces = split_blob(nan + data[len(nan) :], m.chunk_size)
    changed = dataclasses.replace(entry, digest=digest, chunks=addresses)
    tensors = tuple(changed if t.name == tensor else t for t in m.tensors)
    return sign_message(dataclasses.replace(m, tensors=tensors), who), pieces
