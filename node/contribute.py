"""Prepare a contribution: an expert's signed card and delta manifest, chunks in the node's store.

`contribute` runs next to a node (same ``--data-dir``; the store and state are safe to share
between processes): it computes (expert - base) per tensor against the network's base, encodes
the deltas with the chosen codec, signs an ExpertCard and a DeltaManifest with the node's
identity, stores every chunk and the manifest envelope, and records the contribution for the
round; the running node announces it on the DHT at its next poll.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from node.errors import NodeError
from node.genesis import Genesis, load_base, open_genesis, read_base_manifest
from node.service import load_or_create_identity
from node.state import NodeState
from node.store import ContentStore
from protocol.chunks import decode_tensors, encode_deltas
from protocol.codecs import parse_codec
from protocol.envelope import sign_message
from protocol.fingerprint import fingerprint_model
from protocol.messages import SCHEMA_VERSION, DeltaManifest, ExpertCard


class ArchitectureMismatchError(NodeError):
    """The expert's architecture or base differs from the network's."""


@dataclasses.dataclass(frozen=True)
class PreparedContribution:
    """What `contribute` stored: ids and sizes."""

    round: int
    card_id: str
    manifest_id: str
    total_bytes: int
    chunks: int


def contribute(
    data_dir: str | Path,
    expert_dir: str | Path,
    *,
    codec: str = "bf16",
    name: str | None = None,
    domains: tuple[str, ...] = (),
    license: str = "unknown",
    round_number: int | None = None,
) -> PreparedContribution:
    """Sign and store `expert_dir`'s deltas for the node in `data_dir` (see the module docstring)."""
    data_dir = Path(data_dir)
    with NodeState(data_dir) as state, ContentStore(data_dir / "store") as store:
        record = state.get("genesis")
        if record is None:
            raise NodeError(f"expected a node data folder with a network genesis at {data_dir}, got none")
        genesis: Genesis = open_genesis(record)
        fingerprints = fingerprint_model(expert_dir)
        if fingerprints.architecture != genesis.architecture_fingerprint:
            raise ArchitectureMismatchError(
                f"expected an expert of architecture {genesis.architecture_fingerprint[:16]}, "
                f"got {fingerprints.architecture[:16]}"
            )
        identity = load_or_create_identity(data_dir)
        r = state.get("round", 0) if round_number is None else round_number
        base = decode_tensors(
            read_base_manifest(store.get(genesis.base_manifest)), store.get, genesis.chunk_size
        )
        entries, chunks = encode_deltas(base, load_base(expert_dir), parse_codec(codec), genesis.chunk_size)
        now = int(time.time())
        card = sign_message(
            ExpertCard(
                v=SCHEMA_VERSION,
                network_id=genesis.network_id,
                signer=identity.public_key,
                created_at=now,
                name=name or Path(expert_dir).name,
                base_fingerprint=genesis.base_fingerprint,
                architecture_fingerprint=fingerprints.architecture,
                tokenizer_fingerprint=fingerprints.tokenizer,
                domains=tuple(domains),
                license=license,
            ),
            identity,
        )
        manifest = sign_message(
            DeltaManifest(
                v=SCHEMA_VERSION,
                network_id=genesis.network_id,
                signer=identity.public_key,
                created_at=now,
                round=r,
                card_id=card.id,
                base_fingerprint=genesis.base_fingerprint,
                architecture_fingerprint=fingerprints.architecture,
                chunk_size=genesis.chunk_size,
                total_bytes=sum(e.nbytes for e in entries),
                tensors=entries,
            ),
            identity,
        )
        for digest, data in chunks.items():
            store.put(data, digest)
        store.put(manifest.raw, manifest.id)
        state.set(f"contribution/{r}", {"card": card.raw, "manifest": manifest.id})
        return PreparedContribution(r, card.id, manifest.id, manifest.message.total_bytes, len(chunks))
