"""Prepare a contribution: an expert's signed card and delta manifest, chunks in the node's store.

`contribute` runs next to a node (same ``--data-dir``; the store and state are safe to share
between processes): it computes (expert - base) per tensor against the network's base, encodes
the deltas with the chosen codec, signs an ExpertCard and a DeltaManifest with the node's
identity, stores every chunk and the manifest envelope, and records the contribution for the
round; the running node announces it on the DHT at its next poll.

An expert of another architecture cannot be merged in weight space: if the network has a probe
set, it publishes a DistributionSummary instead — its top-k next-token log-probs on the probe
texts (FuseLLM-style), with the token strings needed to align vocabularies.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from merging.distribution import token_strings, top_k_distribution
from node.datafolder import check_node_folder, load_or_create_identity
from node.errors import NodeError
from node.genesis import load_base
from node.round_state import OwnContribution, OwnSummary, RoundState
from node.state import NodeState
from node.store import ContentStore
from protocol.chunks import decode_tensors, encode_deltas
from protocol.codecs import parse_codec
from protocol.envelope import sign_message
from protocol.fingerprint import fingerprint_model
from protocol.genesis import Genesis, open_genesis, read_base_manifest, read_probe_set
from protocol.messages import SCHEMA_VERSION, DeltaManifest, DistributionSummary, ExpertCard
from protocol.summary import encode_summary


class ArchitectureMismatchError(NodeError):
    """The expert's architecture or base differs from the network's."""


@dataclasses.dataclass(frozen=True)
class PreparedContribution:
    """What `contribute` stored: ids and sizes; `kind` is ``delta`` or ``summary``."""

    round: int
    card_id: str
    manifest_id: str
    total_bytes: int
    chunks: int
    kind: str = "delta"


def contribute(
    data_dir: str | Path,
    expert_dir: str | Path,
    *,
    codec: str = "bf16",
    name: str | None = None,
    domains: tuple[str, ...] = (),
    license: str = "unknown",
    round_number: int | None = None,
    k: int = 10,
) -> PreparedContribution:
    """Sign and store `expert_dir`'s deltas (or its distribution summary) for the node in `data_dir`."""
    data_dir = check_node_folder(data_dir)  # before anything is created there
    with NodeState(data_dir) as state, ContentStore(data_dir / "store") as store:
        rounds = RoundState(state)
        record = rounds.genesis_record()
        if record is None:
            raise NodeError(f"expected a node data folder with a network genesis at {data_dir}, got none")
        genesis: Genesis = open_genesis(record)
        fingerprints = fingerprint_model(expert_dir)
        identity = load_or_create_identity(data_dir)
        r = rounds.round if round_number is None else round_number
        card = _sign_card(genesis, identity, fingerprints, name or Path(expert_dir).name, domains, license)
        if fingerprints.architecture != genesis.architecture_fingerprint:
            if not genesis.probe_set_fingerprint:
                raise ArchitectureMismatchError(
                    f"expected an expert of architecture {genesis.architecture_fingerprint[:16]} "
                    f"(or a network with a probe set for distribution summaries), "
                    f"got {fingerprints.architecture[:16]}"
                )
            return _contribute_summary(genesis, identity, card, expert_dir, store, rounds, r, k)
        base = decode_tensors(
            read_base_manifest(store.get(genesis.base_manifest)), store.get, genesis.chunk_size
        )
        entries, chunks = encode_deltas(base, load_base(expert_dir), parse_codec(codec), genesis.chunk_size)
        now = int(time.time())
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
        total = manifest.message.total_bytes
        _save(store, manifest, chunks)
        rounds.set_contribution(r, OwnContribution(card.raw, manifest.id))
        return PreparedContribution(r, card.id, manifest.id, total, len(chunks), "delta")


def _sign_card(genesis: Genesis, identity, fingerprints, name: str, domains, license: str):
    return sign_message(
        ExpertCard(
            v=SCHEMA_VERSION,
            network_id=genesis.network_id,
            signer=identity.public_key,
            created_at=int(time.time()),
            name=name,
            base_fingerprint=genesis.base_fingerprint,
            architecture_fingerprint=fingerprints.architecture,
            tokenizer_fingerprint=fingerprints.tokenizer,
            domains=tuple(domains),
            license=license,
        ),
        identity,
    )


def _contribute_summary(
    genesis, identity, card, expert_dir, store, rounds: RoundState, r: int, k: int
) -> PreparedContribution:
    """Publish the expert's top-k distributions on the network's probe set (FuseLLM-style)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = read_probe_set(store.get(genesis.probe_set_fingerprint))
    model = AutoModelForCausalLM.from_pretrained(expert_dir)
    tokenizer = AutoTokenizer.from_pretrained(expert_dir)
    with torch.no_grad():
        distribution = top_k_distribution(model, tokenizer, texts, k=k)
    entries, chunks = encode_summary(
        distribution, token_strings(tokenizer, distribution), chunk_size=genesis.chunk_size
    )
    summary = sign_message(
        DistributionSummary(
            v=SCHEMA_VERSION,
            network_id=genesis.network_id,
            signer=identity.public_key,
            created_at=int(time.time()),
            round=r,
            card_id=card.id,
            probe_set_fingerprint=genesis.probe_set_fingerprint,
            tokenizer_fingerprint=card.message.tokenizer_fingerprint,
            k=k,
            num_examples=len(texts),
            chunk_size=genesis.chunk_size,
            tensors=entries,
        ),
        identity,
    )
    total = sum(e.nbytes for e in entries)
    _save(store, summary, chunks)
    rounds.set_summary(r, OwnSummary(card.raw, summary.id))
    return PreparedContribution(r, card.id, summary.id, total, len(chunks), "summary")


def _save(store, signed, chunks) -> None:
    """Store the chunks and the signed envelope (before the round state names them)."""
    for digest, data in chunks.items():
        store.put(data, digest)
    store.put(signed.raw, signed.id)
