"""Signed expert cards and delta manifests built in tests (random bf16 deltas of a base)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from node.genesis import Genesis
from protocol.chunks import encode_tensors
from protocol.codecs import parse_codec
from protocol.envelope import Signed, sign_message
from protocol.identity import Identity
from protocol.messages import SCHEMA_VERSION, DeltaManifest, ExpertCard


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
) -> tuple[Signed, Signed, dict[str, bytes]]:
    """(card, manifest, chunks) of an expert `who` whose deltas are `scale` x normal noise of `seed`,
    encoded in chunks of `chunk_size`; `manifest_changes` replace manifest fields."""
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
