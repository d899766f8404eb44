"""A worker's shards: fetch their inputs, admit, merge in full, and attest the canonical result.

For each shard of a settled round that the plan gives this node (or, after the fallback delay,
that still lacks a quorum), each poll:

1. a shard already merged for these candidates is final (admission is a function of their bytes),
   unless a fault confirmed since excludes one of the contributions it admitted: the node only
   re-attests it (step 4);
2. otherwise it fetches the shard's tensors of every candidate; a contribution whose chunks do not
   arrive is waited for `FETCH_PATIENCE` polls, then left out (`FetchPatience`);
3. it admits per shard (`node.rounds.admit`); a contribution that fails admission in any of its
   shards' tensors is reported as a fault (node.faults: published, checked by every node, and
   excluded from every shard) and nothing is merged that poll; then it merges the contributions
   no confirmed fault excludes with `protocol.aggregate` one tensor at a
   time (inputs decoded from the store as each tensor is merged, its chunks stored at once: no
   whole shard is held in memory), stores a signed MergeResult, and keeps a `ShardMerge` in its
   round state;
4. it attests, of the published results of its merge (`merge_content`: equal but for signer and
   time), the first in `ShardAttestations.rank` order — the order spot checkers follow too — and
   publishes its result record.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence

from node.errors import FetchError, NodeError, StoreError
from node.lazy_tensors import EntryTensors, release_memory
from node.round_context import RoundContext
from node.round_state import RoundView, ShardMerge
from node.rounds import Contribution, RoundPlan, admit
from protocol.aggregate import encode_merged, iter_aggregate
from protocol.envelope import Signed, sign_message
from protocol.errors import ProtocolError
from protocol.messages import SCHEMA_VERSION, Attestation, MergeRecipe, MergeResult, TensorEntry

logger = logging.getLogger("node.service")  # the round log keeps its name: log readers match it

FETCH_PATIENCE = 10  # polls a contribution's missing chunks are waited for before it is left out


async def refetch_missing(
    ctx: RoundContext,
    names: set[str],
    base_entries: Sequence[TensorEntry],
    contributions: Sequence[Contribution],
) -> None:
    """Fetch again the chunks of tensors `names` (of the base and of `contributions`) that the store
    dropped after a failed read; a chunk no peer serves now is tried again next poll."""
    digests = [d for e in base_entries if e.name in names for d in e.chunks]
    for c in contributions:
        digests += [d for t in c.manifest.message.tensors if t.name in names for d in t.chunks]
    with contextlib.suppress(FetchError):
        await ctx.fetch(ctx.store.missing(digests), [], attempts=1)


def merge_content(result: MergeResult) -> tuple:
    """What two nodes' results of one shard must share to be the same merge: all but signer and time
    (the same recipe, fingerprint and candidates, and the same chunk list: a result whose chunks do
    not hold its tensors would pass the fingerprint yet fail every pull)."""
    return (
        result.recipe.id,
        result.merged_fingerprint,
        result.round,
        result.shard,
        result.shards,
        result.candidates,
        result.chunk_size,
        result.tensors,
    )


@dataclasses.dataclass
class FetchPatience:
    """Polls each contribution's chunks were missing, and those given up on that were retried once."""

    missing: dict[str, int] = dataclasses.field(default_factory=dict)
    retried: set[str] = dataclasses.field(default_factory=set)

    def still_waiting(self, contribution_id: str) -> bool:
        """Count one more poll without the chunks; whether to keep waiting for them."""
        self.missing[contribution_id] = self.missing.get(contribution_id, 0) + 1
        return self.missing[contribution_id] < FETCH_PATIENCE

    def given_up_on(self) -> set[str]:
        """Contributions whose chunks are left out now (after `FETCH_PATIENCE` polls)."""
        return {c for c, polls in self.missing.items() if polls >= FETCH_PATIENCE}

    def given_up(self) -> set[str]:
        """Contributions left out after `FETCH_PATIENCE` polls and not yet retried."""
        return {c for c, polls in self.missing.items() if polls >= FETCH_PATIENCE} - self.retried

    def retry(self, contribution_ids: set[str]) -> None:
        """Wait for these contributions' chunks again (once per contribution)."""
        self.retried |= contribution_ids
        for contribution_id in contribution_ids:
            del self.missing[contribution_id]


class ShardWorker:
    """Merges and attests this node's shards (the module docstring)."""

    def __init__(self, ctx: RoundContext, patience: FetchPatience) -> None:
        self.ctx = ctx
        self.patience = patience

    async def merge_shards(
        self,
        r: int,
        plan: RoundPlan,
        contributions: Sequence[Contribution],
        shards: Sequence[int],
        base_entries: Sequence[TensorEntry],
    ) -> None:
        """Merge (or re-attest) shards `shards` of the round in full."""
        ctx = self.ctx
        todo = []
        for j in shards:
            own = ctx.rounds.shard(r, j)
            if (
                own is not None
                and own.view() == RoundView(plan.candidates, len(plan.shards))
                and self.recipe_current(r, own)
                and not self.admits_excluded(r, own)
            ):
                await self.attest_canonical(r, j, own)
            else:
                todo.append(j)
        if not todo:
            return
        names = {name for j in todo for name in plan.shards[j]}
        started = time.monotonic()
        excluded = ctx.faults.excluded(r)
        undecodable = {cid for cid, fault in excluded.items() if fault.kind == "undecodable"}
        comparable = [c for c in contributions if c.id not in undecodable]
        available = await self._fetch_inputs(comparable, names)
        if available is None:
            return  # wait for the chunks rather than decide on a partial view
        logger.info(
            "round %d: shards %s of %d: inputs of %d contributions in %.1f s",
            r,
            todo,
            len(plan.shards),
            len(available),
            time.monotonic() - started,
        )
        admissions = {}
        try:
            for j in todo:
                admissions[j] = await asyncio.to_thread(
                    admit,
                    ctx.genesis,
                    available,
                    base_entries,
                    self._lazy_decode,
                    plan.shards[j],
                    undecodable,
                )
        except StoreError as exc:  # our own store lost a chunk: fetch it again, blame no one
            logger.warning("round %d shards %s: store fault, fetching the chunk again: %s", r, todo, exc)
            await refetch_missing(ctx, names, base_entries, available)
            return
        found = {cid: f for admission, _ in admissions.values() for cid, f in admission.faults.items()}
        if ctx.faults.unreported(r, found):
            # a fault from the bytes excludes the contribution from every shard (node.faults): publish
            # it and merge next poll, once the other nodes can read it
            given_up = self.patience.given_up_on()
            await ctx.faults.report(ctx, r, found, contributions, given_up)
            return
        for j in todo:
            admission, deltas = admissions[j]
            admitted = tuple(cid for cid in admission.admitted if cid not in excluded)
            try:
                if not admitted:
                    continue
                deltas = {cid: deltas[cid] for cid in admitted}
                recipe = ctx.round_recipe(r, admitted)
                own = await asyncio.to_thread(self._merge_shard, r, plan, j, recipe, deltas, base_entries)
            except StoreError as exc:  # our own store lost a chunk: fetch it again, blame no one
                logger.warning("round %d shard %d: store fault, fetching the chunk again: %s", r, j, exc)
                await refetch_missing(ctx, names, base_entries, available)
                return
            ctx.rounds.set_shard(r, j, own)
            ctx.rounds.set_view(r, own.view())
            await self.attest_canonical(r, j, own)

    def _lazy_decode(self, contribution: Contribution, names: Sequence[str]) -> EntryTensors:
        """`ctx.decode` without holding the tensors: each is decoded when admission's rule reads
        it (ProtocolError for bad bytes) and again when the merge reads it."""
        entries = [t for t in contribution.manifest.message.tensors if t.name in set(names)]
        return EntryTensors(entries, self.ctx.store.get, contribution.manifest.message.chunk_size)

    def admits_excluded(self, r: int, own: ShardMerge) -> bool:
        """Whether our merge of a shard admitted a contribution a confirmed fault now excludes (it
        is merged again without it)."""
        excluded = self.ctx.faults.excluded(r)
        if not excluded:
            return False
        try:
            merged = self.ctx.stored_result(own.result).message.recipe.contributions
        except (NodeError, ProtocolError):
            return True
        return bool(set(merged) & set(excluded))

    def recipe_current(self, r: int, own: ShardMerge) -> bool:
        """Whether our merge of a shard used the recipe the round adopts now (a network with search
        may adopt a better verified proposal after it merged; then the shard is merged again)."""
        if self.ctx.recipes is None:
            return True
        try:
            merged = self.ctx.stored_result(own.result).message.recipe
        except (NodeError, ProtocolError):
            return False
        return self.ctx.round_recipe(r, merged.contributions).id == own.recipe

    async def _fetch_inputs(
        self, contributions: Sequence[Contribution], names: set[str]
    ) -> list[Contribution] | None:
        """Fetch the tensors `names` of every contribution; those whose chunks arrived (None: wait)."""
        store = self.ctx.store
        wanted = {
            c.id: [d for t in c.manifest.message.tensors if t.name in names for d in t.chunks]
            for c in contributions
        }
        with contextlib.suppress(FetchError):
            await self.ctx.fetch([d for digests in wanted.values() for d in digests], [], attempts=1)
        available = []
        for c in contributions:
            if store.missing(wanted[c.id]):
                if self.patience.still_waiting(c.id):
                    return None
                continue
            available.append(c)
        return available

    def _merge_shard(
        self,
        r: int,
        plan: RoundPlan,
        j: int,
        recipe: MergeRecipe,
        deltas,
        base_entries: Sequence[TensorEntry],
    ) -> ShardMerge:
        ctx, genesis = self.ctx, self.ctx.genesis
        names = set(plan.shards[j])
        base = EntryTensors([e for e in base_entries if e.name in names], ctx.store.get, genesis.chunk_size)
        merged = iter_aggregate(recipe, base, deltas, model_tensors=[e.name for e in base_entries])
        entries, fingerprint = encode_merged(
            merged, lambda digest, data: ctx.store.put(data, digest), genesis.chunk_size
        )
        release_memory()
        result = sign_message(
            MergeResult(
                v=SCHEMA_VERSION,
                network_id=ctx.network_id,
                signer=ctx.identity.public_key,
                created_at=int(time.time()),
                round=r,
                recipe=recipe,
                chunk_size=genesis.chunk_size,
                tensors=entries,
                merged_fingerprint=fingerprint,
                shard=j,
                shards=len(plan.shards),
                candidates=plan.candidates,
            ),
            ctx.identity,
        )
        ctx.store.put(result.raw, result.id)
        logger.info(
            "round %d: merged shard %d/%d (%d tensors) of %d contributions, fingerprint %s",
            r,
            j,
            len(plan.shards),
            len(entries),
            len(recipe.contributions),
            fingerprint,
        )
        return ShardMerge(recipe.id, result.id, fingerprint, plan.candidates, len(plan.shards))

    async def attest_canonical(self, r: int, j: int, own: ShardMerge) -> None:
        """Attest, of the results of shard j of our merge, the first in rank order (most full
        attesters, then most attesters, then the smallest id: the order spot checkers follow too),
        and publish our result record.

        Following the most attested result, not simply the smallest id, keeps a quorum once it is
        reached: a node that records the round keeps the attestations it then holds
        (`attest_decided`), so switching to a smaller id published later would split the
        attestations between two ids of the same merge and leave the nodes that have not yet
        recorded the round without a quorum on either.
        """
        ctx = self.ctx
        now = int(time.time())
        mine = ctx.stored_result(own.result).message
        ours = merge_content(mine)
        records = await ctx.read_shard(r, j)
        ranked = records.attestations
        canonical = own.result
        rank = {result_id: ranked.rank(result_id) for result_id in {*records.holders, canonical}}
        for result_id in sorted(rank, key=rank.__getitem__):
            if rank[result_id] >= rank[canonical]:
                break
            try:
                await ctx.fetch([result_id], sorted(records.holders[result_id]), attempts=1)
                other = ctx.stored_result(result_id, now=now).message
            except (NodeError, ProtocolError):
                continue
            if merge_content(other) == ours:
                canonical = result_id
                break
        if own.attests != canonical:
            own = self.attest_full(r, j, own, canonical, mine)
            logger.info(
                "round %d shard %d: attests %s in full (records: %s)", r, j, canonical[:8], ranked.tally()
            )
        await ctx.announce_result(r, j, own.result, own.attestation)

    def attest_full(self, r: int, j: int, own: ShardMerge, result_id: str, mine: MergeResult) -> ShardMerge:
        """Sign a full attestation of `result_id` (a result of our merge `mine` of shard j), keep it in
        our shard state; the updated merge."""
        ctx = self.ctx
        attestation = sign_message(
            Attestation(
                v=SCHEMA_VERSION,
                network_id=ctx.network_id,
                signer=ctx.identity.public_key,
                created_at=int(time.time()),
                round=r,
                recipe_id=own.recipe,
                result_id=result_id,
                merged_fingerprint=own.fingerprint,
                shard=j,
                shards=own.shards,
                kind="full",
                checked_tensors=len(mine.tensors),
                checked_bytes=sum(t.nbytes for t in mine.tensors),
                sample_proof=b"",
            ),
            ctx.identity,
        )
        own = dataclasses.replace(own, attests=result_id, attestation=attestation.raw)
        ctx.rounds.set_shard(r, j, own)
        return own

    def attest_decided(self, r: int, own: ShardMerge, result: Signed) -> tuple[str, bytes]:
        """What this node keeps announcing for a shard it merged once it records the round on
        `result`: a full attestation of `result` itself when it is our merge (`merge_content`), so
        the attestation counts towards the quorum the nodes still deciding the round read (else, or
        if our result cannot be read back, the attestation it holds)."""
        if own.attests != result.id:
            with contextlib.suppress(NodeError, ProtocolError):
                mine = self.ctx.stored_result(own.result).message
                if merge_content(mine) == merge_content(result.message):
                    own = self.attest_full(r, result.message.shard, own, result.id, mine)
        return own.attests, own.attestation
