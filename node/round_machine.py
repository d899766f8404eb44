"""The round state machine: what a node does for its current round at each poll.

`RoundMachine.step(r)`:

1. collects the round's contributions (`collect_contributions`: each card and manifest verified,
   manifests fetched from their holders, then `node.rounds.select_contributions`);
2. once at least ``min_contributions`` are in and the set (the candidates) has not changed for
   ``settle_seconds``, (in a network with search, once node.search_round has chosen the round's
   recipe) plans the round (`node.rounds.plan_round`) and picks the shards to merge in
   full (`shards_to_compute`: its own; every shard when the workers alone cannot reach the quorum;
   after ``fallback_seconds`` also the shards still lacking a quorum);
3. merges and attests those (`node.shard_worker`) and spot-checks every other shard
   (`node.spotcheck`);
4. looks for the round's attested result (`node.discover.find_attested_result`) and, if found,
   records it and moves on (`node.decided.record_decided`); else logs, every
   ``WAITING_LOG_SECONDS``, what each shard's records attest.

The machine keeps only what it learns within a run in memory (when the candidates last changed,
polls without a contribution's chunks); everything else lives in the `RoundState`.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from node.decided import record_decided
from node.discover import find_attested_result
from node.errors import NodeError
from node.lookups import RecordReader
from node.records import contrib_key, parse_record
from node.round_context import RoundContext
from node.rounds import Contribution, RoundPlan, plan_round, select_contributions
from node.search_round import SearchRound
from node.settings import FALLBACK_SECONDS, checked_fallback_seconds
from node.shard_worker import FetchPatience, ShardWorker
from node.spotcheck import spot_check_shards
from protocol.decision import AttestedRound
from protocol.errors import ProtocolError
from protocol.messages import DeltaManifest, ExpertCard
from protocol.verify import verify_message

if TYPE_CHECKING:  # node.search_round loads transformers: a network without search never imports it
    from node.search_round import SearchRound

logger = logging.getLogger("node.service")  # the round log keeps its name: log readers match it

WAITING_LOG_SECONDS = 20.0


async def collect_contributions(ctx: RoundContext, board: RecordReader, r: int) -> list[Contribution]:
    """The round's selected contributions: verified cards, manifests fetched and verified, rule 1."""
    now = int(time.time())
    pairs = []
    for value in (await board.aread(contrib_key(ctx.network_id, r))).values():
        record = parse_record("contrib", value)
        if record is None:
            continue
        try:
            card = verify_message(record["card"], ExpertCard, network_id=ctx.network_id, now=now)
            await ctx.fetch([record["manifest"]], [record["p2p"]], attempts=1)
            manifest = verify_message(
                ctx.store.get(record["manifest"]), DeltaManifest, network_id=ctx.network_id, now=now
            )
        except (NodeError, ProtocolError) as exc:
            logger.info("ignoring a contribution record: %s", exc)
            continue
        pairs.append((card, manifest))
    return select_contributions(ctx.genesis, r, pairs)


class RoundMachine:
    """One node's rounds (the module docstring); `board` reads the DHT."""

    def __init__(
        self,
        ctx: RoundContext,
        board: RecordReader,
        *,
        fallback_seconds: float = FALLBACK_SECONDS,
        search: SearchRound | None = None,
    ) -> None:
        self.ctx = ctx
        self.board = board
        self.search = search  # a network with search: the round's recipe is proposed and verified
        if search is not None:
            ctx.recipes = search
        self.fallback_seconds = checked_fallback_seconds(fallback_seconds)
        self.patience = FetchPatience()
        self.worker = ShardWorker(ctx, self.patience)
        self._seen: dict[int, tuple[tuple[str, ...], float]] = {}
        self._waiting_logged = 0.0

    async def step(self, r: int, *, aggregate: bool = True) -> None:
        """One poll of round `r`: merge and check it (unless `aggregate` is off), then decide it."""
        if aggregate:
            await self.aggregate(r)
        await self.decide(r)

    async def aggregate(self, r: int) -> None:
        """Steps 1-3 of the module docstring."""
        ctx = self.ctx
        contributions = await collect_contributions(ctx, self.board, r)
        if len(contributions) < ctx.genesis.min_contributions:
            return
        ids = tuple(c.id for c in contributions)
        seen = self._seen.get(r)
        if seen is None or seen[0] != ids:  # a new set: wait until it has been stable for settle_seconds
            self._seen[r] = (ids, time.monotonic())
            return
        if time.monotonic() - seen[1] < ctx.genesis.settle_seconds:
            return
        base_entries = ctx.base_entries()
        plan = plan_round(ctx.genesis, contributions, base_entries)
        settled_at = seen[1] + ctx.genesis.settle_seconds
        if self.search is not None and not await self.search.ready(
            r, plan, contributions, base_entries, settled_at
        ):
            return  # proposals are searched, verified or waited for (node.search_round)
        waited = time.monotonic() - seen[1] - ctx.genesis.settle_seconds
        shards = await self.shards_to_compute(r, plan, waited)
        await self.worker.merge_shards(r, plan, contributions, shards, base_entries)
        others = [j for j in range(len(plan.shards)) if j not in shards]
        await spot_check_shards(ctx, r, plan, contributions, others, base_entries)

    async def shards_to_compute(self, r: int, plan: RoundPlan, waited: float) -> tuple[int, ...]:
        """This node's shards; every shard when the workers alone cannot reach the quorum; after
        ``fallback_seconds`` without a decided round, also the shards that still lack a quorum."""
        if len(plan.workers) < plan.quorum:
            return tuple(range(len(plan.shards)))
        mine = set(plan.shards_of(self.ctx.identity.public_key))
        if waited >= self.fallback_seconds:
            mine |= await self.lacking_shards(r, plan)
        return tuple(sorted(j for j in mine if j < len(plan.shards)))

    async def lacking_shards(self, r: int, plan: RoundPlan) -> set[int]:
        """Shards of `plan` whose results do not (yet) carry a quorum of valid attestations."""
        lacking = set()
        for j in range(len(plan.shards)):
            records = await self.ctx.read_shard(r, j)
            if not records.attestations.reaches(plan.quorum):
                lacking.add(j)
        return lacking

    async def decide(self, r: int) -> None:
        """Step 4 of the module docstring."""
        ctx = self.ctx
        found = await find_attested_result(
            self.board, ctx.genesis, r, ctx.fetch, ctx.store, opened=ctx.opened
        )
        if found is None:
            await self.log_waiting(r)
            return
        await self.record(r, found)

    async def record(self, r: int, found: AttestedRound) -> bool:
        """Record `found` as round `r`'s result if this node's view agrees (`node.decided`)."""
        return await record_decided(self.ctx, self.worker, self.patience, r, found)

    async def log_waiting(self, r: int) -> None:
        """Every WAITING_LOG_SECONDS without a decided round: what each shard's records attest."""
        view = self.ctx.rounds.view(r)
        if view is None or time.monotonic() - self._waiting_logged < WAITING_LOG_SECONDS:
            return
        self._waiting_logged = time.monotonic()
        tallies = []
        for j in range(view.shards):
            records = await self.ctx.read_shard(r, j)
            tallies.append(f"shard {j}: {records.attestations.tally()}")
        logger.info("round %d: no quorum yet; %s", r, "; ".join(tallies))
