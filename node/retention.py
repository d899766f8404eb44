"""Retention: a node keeps its latest decided rounds and what they need, and deletes the rest.

When a round is recorded (`note_decided`), the node writes ``decided/<round>`` (the decided
results and the round's candidates). `sweep` then keeps the latest `keep` decided rounds and every
round after them, and for each older decided round deletes what only that round needed: the
tensors and envelopes of its results, of its candidates' manifests (the node holds some of each)
and of its own merges, then the round's keys in ``state.sqlite``. The base (tensors, tensor list,
side files, probe set) and everything a kept round names are never deleted.

A kill at any moment leaves a consistent store: tensor chunks go first, then the envelopes that
list them, then the round's state keys (``decided/<round>`` last), so a sweep interrupted anywhere
is finished by the next one from what is left; a chunk whose index row was deleted but whose file
was not is indexed again when the store opens, and deleted again by a later sweep only if a
round still names it (else it stays, counted in the store's size).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from node.errors import NodeError
from node.round_state import RoundState
from node.settings import KEEP_ROUNDS
from node.store import ContentStore
from protocol.decision import AttestedRound
from protocol.envelope import open_envelope
from protocol.errors import ProtocolError
from protocol.genesis import Genesis, read_base_manifest
from protocol.messages import DeltaManifest, MergeResult

logger = logging.getLogger("node.service")  # the round log keeps its name: log readers match it

_ROUND_PREFIXES = ("shard", "spot", "view", "refused", "contribution", "summary", "faults")


def note_decided(rounds: RoundState, r: int, found: AttestedRound) -> None:
    """Remember what decided round `r` needs (its results and candidates) for `sweep`."""
    results = [s.result.id for s in found.shards]
    rounds.state.set(f"decided/{r}", {"results": results, "candidates": list(found.candidates)})


def decided_rounds(rounds: RoundState) -> list[int]:
    """The rounds with a ``decided/<round>`` record, ascending."""
    return sorted(int(key.rsplit("/", 1)[1]) for key in rounds.state.keys("decided/"))


def base_chunks(genesis: Genesis, store: ContentStore) -> set[str]:
    """Every chunk the network's base needs: tensors, tensor list, side files, probe set."""
    keep = {genesis.base_manifest, *genesis.base_files.values()}
    if genesis.probe_set_fingerprint:
        keep.add(genesis.probe_set_fingerprint)
    if store.has(genesis.base_manifest):
        keep |= {d for e in read_base_manifest(store.get(genesis.base_manifest)) for d in e.chunks}
    return keep


def round_chunks(
    rounds: RoundState, store: ContentStore, genesis: Genesis, r: int
) -> tuple[set[str], set[str]]:
    """(tensor chunks, envelope ids) that round `r` names: its decided results, its candidates'
    manifests (from ``decided/<r>`` or ``view/<r>``), its own merges and contribution."""
    envelopes: set[str] = set()
    decided = rounds.state.get(f"decided/{r}") or {}
    envelopes |= set(decided.get("results", ())) | set(decided.get("candidates", ()))
    view = rounds.view(r)
    if view is not None:
        envelopes |= set(view.candidates)
    for key in rounds.state.keys(f"shard/{r}/"):
        own = rounds.state.get(key)
        if own:
            envelopes.add(own["result"])
    own_contribution = rounds.contribution(r)
    if own_contribution is not None:
        envelopes.add(own_contribution.manifest)
    chunks: set[str] = set()
    for envelope in envelopes:
        chunks |= _listed_chunks(store, genesis, envelope)
    return chunks, envelopes


def _listed_chunks(store: ContentStore, genesis: Genesis, envelope: str) -> set[str]:
    """The tensor chunks a stored manifest or result lists (none if it is not held or not one)."""
    if not store.has(envelope):
        return set()
    try:
        data = store.get(envelope)
    except NodeError:
        return set()
    for kind in (MergeResult, DeltaManifest):
        try:
            message = open_envelope(data, kind, network_id=genesis.network_id).message
        except ProtocolError:
            continue
        return {d for t in message.tensors for d in t.chunks}
    return set()


def sweep(rounds: RoundState, store: ContentStore, genesis: Genesis, keep: int = KEEP_ROUNDS) -> int:
    """Delete what only decided rounds older than the latest `keep` need; the chunks deleted."""
    decided = decided_rounds(rounds)
    if keep < 1 or len(decided) <= keep:
        return 0
    dropped = decided[:-keep]
    later = {int(k.split("/")[1]) for p in _ROUND_PREFIXES for k in rounds.state.keys(f"{p}/")}
    protected = base_chunks(genesis, store)
    for r in sorted(later | set(decided[-keep:])):
        if r > dropped[-1]:
            chunks, envelopes = round_chunks(rounds, store, genesis, r)
            protected |= chunks | envelopes
    latest = rounds.latest()
    if latest is not None:
        protected |= set(latest.results)
    deleted = 0
    for r in dropped:
        chunks, envelopes = round_chunks(rounds, store, genesis, r)
        deleted += _delete(store, chunks - protected)  # tensors first: their lists stay readable
        deleted += _delete(store, envelopes - protected)
        for prefix in _ROUND_PREFIXES:
            for key in rounds.state.keys(f"{prefix}/{r}"):
                if key == f"{prefix}/{r}" or key.startswith(f"{prefix}/{r}/"):
                    rounds.state.delete(key)
        rounds.state.delete(f"decided/{r}")
    if deleted:
        logger.info(
            "retention: deleted %d chunks of rounds %s (keeping %d decided rounds)", deleted, dropped, keep
        )
    return deleted


def _delete(store: ContentStore, digests: Iterable[str]) -> int:
    count = 0
    for digest in sorted(digests):
        if store.has(digest):
            store.delete(digest)
            count += 1
    return count


def store_usage(data_dir: Path) -> dict:
    """What `umm status --data-dir` reports: the store's bytes and chunks, the decided rounds kept."""
    from node.state import NodeState

    with ContentStore(data_dir / "store") as store, NodeState(data_dir) as state:
        return {
            "bytes": store.total_bytes(),
            "chunks": len(store),
            "decided_rounds": decided_rounds(RoundState(state)),
            "keep_default": KEEP_ROUNDS,
        }
