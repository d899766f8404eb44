"""The deterministic rules of a round, applied identically by every node (no I/O here).

1. `select_contributions`: from every (card, manifest) pair seen for a round, keep those whose
   manifest is signed by the card's signer, names that card, targets this round, applies to the
   genesis base and architecture, and (with an allowlist) comes from a member; one per signer —
   the newest ``created_at``, ties broken by the smaller manifest id.
2. `admit`: every selected contribution's tensors must be exactly the base's names and shapes;
   then `protocol.faults.tensor_faults`, tensor by tensor: a delta that does not decode (codec
   checks reject malformed bytes and NaN/Inf) or, among three or more decodable ones, whose L2
   norm exceeds ``outlier_factor`` x the median of that tensor's norms, excludes the contribution.
3. The recipe is `Genesis.recipe(round, admitted ids)` (sorted ids, content-derived seed), so two
   nodes that saw the same contributions build byte-identical recipes.

Sharded rounds (`plan_round`, rules in protocol.shards): the workers are the selected
contributions' signers; the base's tensors are split into byte-balanced shards, each computed in
full by ``R`` workers, ``R = replica_count(W, full_quorum(quorum))`` (3 when there are 3 or more
workers, whatever the quorum); the other nodes spot-check it (protocol.spotcheck). `admit` then
runs per shard on the shard's tensors; a fault it finds there is published and checked by every
node, and excludes the contribution from every shard (node.faults), so every shard admits the
same contributions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from node.errors import NodeError
from protocol.envelope import Signed
from protocol.errors import ProtocolError
from protocol.faults import TensorFault, tensor_faults
from protocol.genesis import Genesis
from protocol.messages import DeltaManifest, ExpertCard, TensorEntry
from protocol.quorum import full_quorum
from protocol.shards import plan_for, replica_count, shard_count, shard_workers, shards_of_worker
from protocol.verify import verify_message


@dataclasses.dataclass(frozen=True)
class Contribution:
    """A verified expert card and the delta manifest it backs (`card` is None for a contribution
    known only by the manifest a decided result names: node.unplanned)."""

    card: Signed | None
    manifest: Signed

    @property
    def id(self) -> str:
        """The contribution id a recipe lists: the manifest envelope's sha256."""
        return self.manifest.id

    @property
    def signer(self) -> bytes:
        return self.manifest.message.signer


def contribution_problem(genesis: Genesis, round_number: int, card: Signed, manifest: Signed) -> str | None:
    """Why a (card, manifest) pair cannot count in this round, or None if it can."""
    c: ExpertCard = card.message
    m: DeltaManifest = manifest.message
    if not isinstance(c, ExpertCard) or not isinstance(m, DeltaManifest):
        return "expected an expert card and a delta manifest"
    if m.signer != c.signer:
        return "expected the manifest signed by the card's signer"
    if m.card_id != card.id:
        return f"expected card_id {card.id}, got {m.card_id}"
    return manifest_problem(genesis, round_number, manifest)


def manifest_problem(genesis: Genesis, round_number: int, manifest: Signed) -> str | None:
    """Why a verified delta manifest cannot be a contribution of this round, or None if it can
    (the checks of `contribution_problem` that need no card)."""
    m: DeltaManifest = manifest.message
    if not isinstance(m, DeltaManifest):
        return "expected a delta manifest"
    if m.round != round_number:
        return f"expected round {round_number}, got {m.round}"
    if (m.base_fingerprint, m.architecture_fingerprint) != (
        genesis.base_fingerprint,
        genesis.architecture_fingerprint,
    ):
        return "expected the genesis base and architecture fingerprints"
    if m.chunk_size != genesis.chunk_size:
        return f"expected chunk size {genesis.chunk_size}, got {m.chunk_size}"
    if genesis.members is not None and m.signer not in genesis.members:
        return "expected a member of the network's allowlist"
    return None


def named_candidates(
    genesis: Genesis, round_number: int, candidates: Sequence[str], get: Callable[[str], bytes], now: int
) -> list[Contribution]:
    """The contributions a result names as its `candidates` (delta manifest ids), each read with
    `get` and verified (envelope, `manifest_problem`), one per signer, sorted by id; ProtocolError
    naming the first that is missing or does not verify."""
    contributions = []
    for cid in candidates:
        try:
            data = get(cid)
        except NodeError as exc:
            raise ProtocolError(f"expected candidate {cid[:8]}'s delta manifest, got: {exc}") from exc
        manifest = verify_message(data, DeltaManifest, network_id=genesis.network_id, now=now)
        problem = manifest_problem(genesis, round_number, manifest)
        if problem is not None:
            raise ProtocolError(f"candidate {cid[:8]}: {problem}")
        contributions.append(Contribution(None, manifest))
    if len({c.signer for c in contributions}) != len(contributions):
        raise ProtocolError("expected one candidate per signer, got two of one signer")
    return sorted(contributions, key=lambda c: c.id)


def select_contributions(
    genesis: Genesis, round_number: int, pairs: Iterable[tuple[Signed, Signed]]
) -> list[Contribution]:
    """Rule 1 of the module docstring; the result is sorted by contribution id."""
    best: dict[bytes, Contribution] = {}
    for card, manifest in pairs:
        if contribution_problem(genesis, round_number, card, manifest) is not None:
            continue
        candidate = Contribution(card, manifest)
        held = best.get(candidate.signer)
        key = (-candidate.manifest.message.created_at, candidate.id)
        if held is None or key < (-held.manifest.message.created_at, held.id):
            best[candidate.signer] = candidate
    return sorted(best.values(), key=lambda c: c.id)


@dataclasses.dataclass(frozen=True)
class Admission:
    """Rule 2's outcome: admitted contribution ids (sorted), rejected ones with reasons, and the
    fault (tensor, `TensorFault`) behind each rejection that came from the bytes."""

    admitted: tuple[str, ...]
    rejected: dict[str, str]
    faults: dict[str, tuple[str, TensorFault]]


def admit(
    genesis: Genesis,
    contributions: Iterable[Contribution],
    base_entries: Iterable[TensorEntry],
    decode: Callable[[Contribution, tuple[str, ...]], Mapping[str, torch.Tensor]],
    names: Sequence[str] | None = None,
    excluded: Iterable[str] = (),
) -> tuple[Admission, dict[str, Mapping[str, torch.Tensor]]]:
    """Rule 2 of the module docstring for the tensors `names` (a shard; None: every base tensor).

    `decode(contribution, names)` returns that contribution's decoded deltas of `names` (a mapping
    that may decode each tensor when it is read; ProtocolError for bad bytes). Contributions in
    `excluded` (faults confirmed elsewhere in the round) are rejected without being read. Also
    returns the deltas of the admitted contributions (`decode`'s mappings).
    """
    expected = {e.name: tuple(e.shape) for e in base_entries}
    wanted = tuple(sorted(expected if names is None else names))
    if not set(wanted) <= set(expected):
        raise RuntimeError("admit: the shard's tensors must be base tensors")
    excluded = set(excluded)
    rejected: dict[str, str] = {}
    readable: dict[str, Contribution] = {}
    for contribution in contributions:
        shapes = {t.name: tuple(t.shape) for t in contribution.manifest.message.tensors}
        if shapes != expected:
            rejected[contribution.id] = "expected exactly the base's tensor names and shapes"
        elif contribution.id in excluded:
            rejected[contribution.id] = "excluded by a confirmed fault of the round"
        else:
            readable[contribution.id] = contribution
    faults = shard_faults(genesis.outlier_factor, wanted, readable, decode)
    for cid, (_, fault) in faults.items():
        rejected[cid] = fault.detail
    admitted = tuple(sorted(cid for cid in readable if cid not in faults))
    return Admission(admitted, rejected, faults), {cid: decode(readable[cid], wanted) for cid in admitted}


def shard_faults(
    factor: float,
    names: Sequence[str],
    contributions: Mapping[str, Contribution],
    decode: Callable[[Contribution, tuple[str, ...]], Mapping[str, torch.Tensor]],
) -> dict[str, tuple[str, TensorFault]]:
    """`protocol.faults.tensor_faults` over tensors `names`: each contribution's first fault (in
    name order). Contributions undecodable in any of the tensors are left out of every tensor's
    norm comparison (the rule compares the decodable contributions), so the rule runs again
    without them until no new undecodable one appears."""
    found: dict[str, tuple[str, TensorFault]] = {}
    while True:
        members = [cid for cid in sorted(contributions) if cid not in found]
        outliers: dict[str, tuple[str, TensorFault]] = {}
        undecodable: dict[str, tuple[str, TensorFault]] = {}
        for name in names:

            def one(cid: str, name: str = name) -> torch.Tensor:
                return decode(contributions[cid], (name,))[name]

            for cid, fault in tensor_faults(factor, name, members, one).items():
                target = undecodable if fault.kind == "undecodable" else outliers
                target.setdefault(cid, (name, fault))
        if not undecodable:
            return {**found, **outliers}
        found.update(undecodable)


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    """Who computes which tensors in a round: the public, deterministic split of the merge.

    ``candidates``: the selected contribution ids (sorted); ``workers``: their distinct signers
    (sorted public keys); ``shards``: the base's tensor names per shard; ``replicas``: workers that
    merge each shard in full; ``quorum``: distinct attestations (full or sampled) each shard needs.
    """

    candidates: tuple[str, ...]
    workers: tuple[bytes, ...]
    shards: tuple[tuple[str, ...], ...]
    replicas: int
    quorum: int

    def workers_of(self, shard: int) -> tuple[bytes, ...]:
        """The signers that compute `shard`."""
        positions = shard_workers(shard, len(self.workers), self.replicas)
        return tuple(self.workers[p] for p in positions)

    def shards_of(self, signer: bytes) -> tuple[int, ...]:
        """The shards `signer` computes (none if it is not one of the round's workers)."""
        if signer not in self.workers:
            return ()
        position = self.workers.index(signer)
        return shards_of_worker(position, len(self.shards), len(self.workers), self.replicas)


def plan_round(
    genesis: Genesis, contributions: Sequence[Contribution], base_entries: Sequence[TensorEntry]
) -> RoundPlan:
    """The round's plan from its selected contributions and the base's tensor list."""
    if not contributions:
        raise RuntimeError("plan_round: a round needs at least one contribution")
    workers = tuple(sorted({c.signer for c in contributions}))
    quorum = genesis.quorum_for(len(contributions))
    shards = plan_for(base_entries, shard_count(len(workers), len(base_entries)))
    return RoundPlan(
        candidates=tuple(sorted(c.id for c in contributions)),
        workers=workers,
        shards=shards,
        replicas=replica_count(len(workers), full_quorum(quorum)),
        quorum=quorum,
    )
