"""Prepare a contribution: an expert's signed card and delta manifest, chunks in the node's store.

`contribute` runs next to a node (same ``--data-dir``; the store and state are safe to share
between processes): it computes (expert - base) per tensor against the network's base, encodes
the deltas with the chosen codec, signs an ExpertCard and a DeltaManifest with the node's
identity, stores every chunk and the manifest envelope, and records the contribution for the
round; the running node announces it on the DHT at its next poll.

An expert saved in another float dtype than the base (e.g. bf16 from a float32 base) is merged
from its own values: its deltas are computed in float32 and its manifest states the network's
architecture. Tensors are read and encoded one at a time, so no whole model is held in memory.

An expert of another architecture cannot be merged in weight space: if the network has a probe
set, it publishes a DistributionSummary instead — its response summary (FuseLLM / FuseChat-style):
its greedy responses to the probe prompts, its top-k next-token log-probs along them and the
token strings needed to align vocabularies. A fuser distills it into a copy of the base, whose
card lists the summaries it came from (``fused_from``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from node.datafolder import check_node_folder, load_or_create_identity
from node.errors import NodeError
from node.lazy_tensors import EntryTensors, FolderTensors
from node.round_state import OwnContribution, OwnSummary, RoundState
from node.state import NodeState
from node.store import ContentStore
from protocol.chunks import encode_deltas
from protocol.codecs import FLOAT_DTYPES, parse_codec
from protocol.envelope import sign_message
from protocol.fingerprint import architecture_fingerprint, fingerprint_model, read_tensor_infos
from protocol.genesis import Genesis, open_genesis, read_base_manifest, read_probe_set
from protocol.messages import SCHEMA_VERSION, DeltaManifest, DistributionSummary, ExpertCard, TensorEntry
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


@dataclasses.dataclass(frozen=True)
class SummarySettings:
    """How an expert of another architecture summarizes itself: top-k, longest greedy response."""

    k: int = 10
    max_new_tokens: int = 128
    progress: bool = False


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
    max_new_tokens: int = 128,
    fused_from: tuple[str, ...] = (),
    progress: bool = False,
) -> PreparedContribution:
    """Sign and store `expert_dir`'s deltas (or its distribution summary) for the node in `data_dir`.

    `k` and `max_new_tokens` shape a summary (top-k, longest greedy response; `progress` draws a
    bar over its prompts); `fused_from` lists the DistributionSummary ids a fused copy of the base
    was distilled from (its card carries them, sorted).
    """
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
        base_entries = read_base_manifest(store.get(genesis.base_manifest))
        architecture = _architecture_against_base(
            genesis, fingerprints.architecture, expert_dir, base_entries
        )
        card_name = name or Path(expert_dir).name
        about = (card_name, tuple(domains), license, tuple(sorted(fused_from)))
        if architecture is None:
            card = _sign_card(genesis, identity, fingerprints, *about)
            settings = SummarySettings(k, max_new_tokens, progress)
            return _contribute_summary(genesis, identity, card, expert_dir, store, rounds, r, settings)
        fingerprints = dataclasses.replace(fingerprints, architecture=architecture)
        card = _sign_card(genesis, identity, fingerprints, *about)
        rounds.set_pending(r, int(time.time()))  # the node announces it is on its way (node.settle)
        try:
            return _contribute_deltas(genesis, identity, card, expert_dir, codec, store, rounds, r)
        finally:
            rounds.set_pending(r, None)


def _contribute_deltas(
    genesis: Genesis, identity, card, expert_dir, codec: str, store: ContentStore, rounds: RoundState, r: int
) -> PreparedContribution:
    """Encode the expert's deltas tensor by tensor into the store; sign and record the manifest."""
    base_entries = read_base_manifest(store.get(genesis.base_manifest))
    entries, _ = encode_deltas(
        EntryTensors(base_entries, store.get, genesis.chunk_size),
        FolderTensors(expert_dir),
        parse_codec(codec),
        genesis.chunk_size,
        sink=lambda digest, data: store.put(data, digest),
    )
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
            architecture_fingerprint=card.message.architecture_fingerprint,
            chunk_size=genesis.chunk_size,
            total_bytes=sum(e.nbytes for e in entries),
            tensors=entries,
        ),
        identity,
    )
    total = manifest.message.total_bytes
    store.put(manifest.raw, manifest.id)  # after its chunks, before the round state names it
    rounds.set_contribution(r, OwnContribution(card.raw, manifest.id))
    chunks = len({d for e in entries for d in e.chunks})
    return PreparedContribution(r, card.id, manifest.id, total, chunks, "delta")


def _architecture_against_base(
    genesis: Genesis, architecture: str, expert_dir: str | Path, base_entries: tuple[TensorEntry, ...]
) -> str | None:
    """The architecture fingerprint the expert's manifest states (the genesis' when the expert
    differs from the base only by float dtypes: its deltas are then computed from its values in
    float32), or None for another architecture in a network with a probe set (a summary)."""
    if architecture == genesis.architecture_fingerprint:
        return architecture
    base_dtypes = {e.name: e.dtype for e in base_entries}
    if architecture_fingerprint(expert_dir, dtypes=base_dtypes) == genesis.architecture_fingerprint:
        for info in read_tensor_infos(expert_dir).values():
            wanted = base_dtypes[info.name]
            if info.dtype != wanted and not {info.dtype, wanted} <= FLOAT_DTYPES:
                raise ArchitectureMismatchError(
                    f"expected {info.name} in dtype {wanted} like the base (float dtypes may differ), "
                    f"got {info.dtype}"
                )
        return genesis.architecture_fingerprint
    if genesis.probe_set_fingerprint:
        return None
    raise ArchitectureMismatchError(
        f"expected an expert of architecture {genesis.architecture_fingerprint[:16]} (config fields, "
        f"tensor names and shapes; float dtypes may differ), or a network with a probe set for "
        f"distribution summaries, got {architecture[:16]}"
    )


def _sign_card(
    genesis: Genesis, identity, fingerprints, name: str, domains, license: str, fused_from: tuple[str, ...]
):
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
            fused_from=fused_from,
        ),
        identity,
    )


def _contribute_summary(
    genesis, identity, card, expert_dir, store, rounds: RoundState, r: int, settings: SummarySettings
) -> PreparedContribution:
    """Publish the expert's response summary on the network's probe set (its greedy responses and
    the top-k along them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merging.fusion.progress import counted_progress
    from merging.fusion.summary import ProbeSet, summarize

    texts = read_probe_set(store.get(genesis.probe_set_fingerprint))
    model = AutoModelForCausalLM.from_pretrained(expert_dir)
    tokenizer = AutoTokenizer.from_pretrained(expert_dir)
    with torch.no_grad(), counted_progress("summarizing", len(texts), settings.progress) as advance:
        response_summary = summarize(
            model,
            tokenizer,
            ProbeSet(tuple(texts)),
            k=settings.k,
            max_new_tokens=settings.max_new_tokens,
            model_name=card.message.name,
            prompt_style="auto",
            advance=advance,
        )
    entries, chunks = encode_summary(response_summary, chunk_size=genesis.chunk_size)
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
            k=settings.k,
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
