"""The round state machine: what a node does for its current round at each poll.

`RoundMachine.step(r)`:

1. collects the round's contributions (`collect_contributions`: each card and manifest verified,
   manifests fetched from their holders, then `node.rounds.select_contributions`); in a network
   with a probe set, a fused contribution counts only once this node has checked it
   (node.fusion_check), and counts as on its way until then;
2. once at least ``min_contributions`` are in, the set (the candidates) has not changed for
   ``settle_seconds`` and no announced contribution is still on its way (`node.settle`) (in a
   network with search, once node.search_round has chosen the round's recipe), plans
   the round (`node.rounds.plan_round`) and picks the shards to merge in full
   (`shards_to_compute`: its own; every shard when the workers alone cannot reach the quorum;
   after ``fallback_seconds`` also the shards still lacking a quorum);
3. reads and checks the round's fault claims (`node.faults`: a contribution that fails admission
   in one shard is excluded from every shard), merges and attests its shards (`node.shard_worker`)
   and spot-checks every other shard (`node.spotcheck`);
4. looks for the round's attested result (`node.discover.find_attested_rounds`: the one of its own
   view if it has one, else the best it has not failed to verify) and, if found —
   after verifying it as a round it did not plan when it has no view of the round
   (`node.unplanned`), and unless any shard admits a contribution a confirmed fault excludes —
   records it and moves on (`node.decided.record_decided`), deleting
   rounds older than the latest ``keep_rounds`` decided ones (`node.retention`); else logs, every
   ``WAITING_LOG_SECONDS``, what each shard's records attest.

The machine keeps only what it learns within a run in memory (when the candidates last changed,
polls without a contribution's chunks); everything else lives in the `RoundState`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from node.decided import record_decided
from node.discover import find_attested_rounds
from node.errors import NodeError
from node.lazy_tensors import release_memory
from node.lookups import RecordReader
from node.records import contrib_key, parse_record, pending_key
from node.retention import note_decided, sweep
from node.round_context import RoundContext
from node.round_state import RoundView
from node.rounds import Contribution, RoundPlan, plan_round, select_contributions
from node.search_round import SearchRound
from node.settings import FALLBACK_SECONDS, KEEP_ROUNDS, checked_fallback_seconds
from node.settle import SettleClock, pending_signers
from node.shard_worker import FetchPatience, ShardWorker
from node.spotcheck import spot_check_shards
from node.unplanned import verify_unplanned
from protocol.decision import AttestedRound
from protocol.errors import ProtocolError
from protocol.messages import DeltaManifest, ExpertCard
from protocol.verify import verify_message

if TYPE_CHECKING:  # node.search_round loads transformers: a network without search never imports it
    from node.fusion_check import FusionChecks
    from node.search_round import SearchRound

logger = logging.getLogger("node.service")  # the round log keeps its name: log readers match it

WAITING_LOG_SECONDS = 20.0


MANIFEST_WAIT = 2.0  # seconds a poll waits for the manifests it starts fetching; the rest go on


class ManifestFetches:
    """The contributions' manifest fetches, in the background: a poll waits at most `MANIFEST_WAIT`
    for the fetches it starts, and a fetch still running (a stalled holder) is not started again
    nor waited for again, so a peer that never answers costs no poll more than that. A fetched
    manifest that does not verify is deleted from the store and never fetched again."""

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Task] = {}
        self.fetched: set[str] = set()  # ids this fetcher brought into the store (a rejected one is deleted)
        self.rejected: set[str] = set()  # ids that did not verify: never fetched again

    async def fetch(self, ctx: RoundContext, wanted: dict[str, str]) -> None:
        """Fetch the missing manifests of `wanted` (manifest id -> the holder its record names)."""
        started = []
        for manifest_id in ctx.store.missing(wanted):
            if manifest_id in self._running or manifest_id in self.rejected:
                continue
            self.fetched.add(manifest_id)
            task = asyncio.create_task(ctx.fetch([manifest_id], [wanted[manifest_id]], attempts=1))
            task.add_done_callback(lambda done, key=manifest_id: self._finished(key, done))
            self._running[manifest_id] = task
            started.append(task)
        if started:
            await asyncio.wait(started, timeout=MANIFEST_WAIT)

    def _finished(self, manifest_id: str, task: asyncio.Task) -> None:
        self._running.pop(manifest_id, None)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("a contribution manifest could not be fetched: %s", task.exception())


async def collect_contributions(
    ctx: RoundContext, board: RecordReader, r: int, fetches: ManifestFetches | None = None
) -> list[Contribution]:
    """The round's selected contributions: verified cards, manifests fetched (`fetches`) and
    verified, rule 1."""
    now = int(time.time())
    records = []
    for value in (await board.aread(contrib_key(ctx.network_id, r))).values():
        record = parse_record("contrib", value)
        if record is not None:
            records.append(record)
    fetches = fetches or ManifestFetches()
    await fetches.fetch(ctx, {rec["manifest"]: rec["p2p"] for rec in records})
    pairs = []
    for record in records:
        try:
            card = verify_message(record["card"], ExpertCard, network_id=ctx.network_id, now=now)
            manifest = verify_message(
                ctx.store.get(record["manifest"]), DeltaManifest, network_id=ctx.network_id, now=now
            )
        except NodeError:  # its manifest is not here (yet): fetching it goes on in the background
            continue
        except ProtocolError as exc:
            logger.info("ignoring a contribution record: %s", exc)
            if record["manifest"] in fetches.fetched:  # rejected bytes do not stay on disk
                fetches.rejected.add(record["manifest"])
                ctx.store.delete(record["manifest"])
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
        keep_rounds: int = KEEP_ROUNDS,
        search: SearchRound | None = None,
        fusion: FusionChecks | None = None,
    ) -> None:
        self.ctx = ctx
        self.fusion = fusion  # a network with a probe set: fused contributions are checked
        self.keep_rounds = keep_rounds
        self.board = board
        self.search = search  # a network with search: the round's recipe is proposed and verified
        if search is not None:
            ctx.recipes = search
        self.fallback_seconds = checked_fallback_seconds(fallback_seconds)
        self.patience = FetchPatience()
        self.worker = ShardWorker(ctx, self.patience)
        self._unverifiable: set[tuple[int, tuple[str, ...]]] = set()
        self.manifests = ManifestFetches()
        self.settle = SettleClock(ctx.genesis.settle_seconds)
        self._waiting_logged = 0.0
        self._candidates: dict[int, list[Contribution]] = {}  # the settled candidates of a round

    async def step(self, r: int, *, aggregate: bool = True) -> None:
        """One poll of round `r`: merge and check it (unless `aggregate` is off), then decide it."""
        if aggregate:
            await self.aggregate(r)
        await self.decide(r)

    async def aggregate(self, r: int) -> None:
        """Steps 1-3 of the module docstring."""
        ctx = self.ctx
        selected = await collect_contributions(ctx, self.board, r, self.manifests)
        contributions, checking = selected, set()
        if self.fusion is not None:  # fused contributions count once checked (node.fusion_check)
            contributions, checking = await self.fusion.filter(r, selected)
        if len(contributions) < ctx.genesis.min_contributions:
            return
        pending = checking | pending_signers(  # a refused contribution is no longer on its way
            (await self.board.aread(pending_key(ctx.network_id, r))).values(),
            {c.signer for c in selected},
            now=time.time(),
            members=ctx.genesis.allowed_signers,
        )
        waited = self.settle.settled(r, tuple(c.id for c in contributions), pending)
        if waited is None:  # not settled yet (node.settle)
            return
        base_entries = ctx.base_entries()
        plan = plan_round(ctx.genesis, contributions, base_entries)
        self._candidates[r] = contributions
        await ctx.faults.refresh(ctx, self.board, r, contributions, self.patience.given_up_on())
        settled_at = time.monotonic() - waited
        if self.search is not None and not await self.search.ready(
            r, plan, contributions, base_entries, settled_at
        ):
            return  # proposals are searched, verified or waited for (node.search_round)
        waited = time.monotonic() - settled_at
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
        complete = await find_attested_rounds(
            self.board, ctx.genesis, r, ctx.fetch, ctx.store, opened=ctx.opened
        )
        view = ctx.rounds.view(r)
        if view is not None:  # a result of the round this node merged or checked, if one has a quorum
            complete = [f for f in complete if RoundView(f.candidates, len(f.shards)) == view] or complete
        else:
            complete = [f for f in complete if (r, tuple(f.candidates)) not in self._unverifiable]
        if complete and r in self._candidates:  # the faults published since this poll's first read
            await ctx.faults.refresh(ctx, self.board, r, self._candidates[r], self.patience.given_up_on())
        complete = [f for f in complete if not self.admits_excluded(r, f)]
        if not complete:
            await self.log_waiting(r)
            return
        found = complete[0]
        if view is None and not await self.verified_unplanned(r, found):
            return
        if self.admits_excluded(r, found):  # a fault learned while verifying the round
            return
        await self.record(r, found)

    def admits_excluded(self, r: int, found: AttestedRound) -> bool:
        """Whether any shard of `found` admits a contribution that a confirmed fault excludes
        (node.faults): this node records no such round, whatever its quorum."""
        return bool(set(found.contributions) & set(self.ctx.faults.excluded(r)))

    async def verified_unplanned(self, r: int, found: AttestedRound) -> bool:
        """Whether `found`, a result of a round this node did not plan, passed `verify_unplanned`
        (one try per candidate set and run: a set that fails is logged once and not fetched again)."""
        key = (r, tuple(found.candidates))
        if key in self._unverifiable:
            return False
        try:
            await verify_unplanned(self.ctx, r, found, self.ctx.base_entries(), self.board)
        except ProtocolError as exc:
            self._unverifiable.add(key)
            logger.warning("round %d: not adopting the attested result %s: %s", r, found.fingerprint, exc)
            return False
        return True

    async def record(self, r: int, found: AttestedRound) -> bool:
        """Record `found` as round `r`'s result if this node's view agrees (`node.decided`), then
        delete what only rounds older than the latest `keep_rounds` decided ones need
        (`node.retention`)."""
        recorded = await record_decided(self.ctx, self.worker, self.patience, r, found)
        if recorded:
            self.ctx.faults.forget_before(r)
            self._candidates = {k: v for k, v in self._candidates.items() if k > r}
            note_decided(self.ctx.rounds, r, found)
            await asyncio.to_thread(
                sweep, self.ctx.rounds, self.ctx.store, self.ctx.genesis, self.keep_rounds
            )
            release_memory()
        return recorded

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
