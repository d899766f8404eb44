"""Which chunk a fetch asks of which peer, how many at once, and when a late chunk is asked twice.

Windows (`PeerWindow`): a peer may have at most its window of chunks asked and not yet answered,
over all its streams. The window starts at one batch and follows each chunk's time from request
to bytes received, which includes the wait behind the chunks queued before it at the peer: a chunk
within `ScheduleRule.target_seconds` grows the window by one chunk (up to `largest`), a later one
halves it (down to one chunk), at most once per window (chunks asked before the last cut do not
cut it again); a chunk given up on (an error answer, a broken stream, the fetch's end) past the
target time counts as late too. So a peer's window settles near what it delivers within the
target time: a slow uplink is asked for about one target time of chunks by each fetcher, not
for a fixed share.

Hedging: once nothing is left to hand out to a peer, it may ask for a chunk that one other peer
alone was asked for longer than `hedge_factor` times the median chunk time of this fetch (the
target time until a chunk has arrived). The first copy to arrive is stored; a later copy is only
verified against its digest, counted in `FetchReport.raced_bytes`, and dropped.

Rechecks: a peer that answered that it lacks a chunk may be asked for it again
`ScheduleRule.recheck_seconds` later, while some other peer may still hold it (one has not said
it lacks it): a chunk that only a slow peer had at first is then taken from a fast one that copied
it meanwhile. A peer that answered ELSEWHERE (it holds the chunk but just sent it to another peer,
node.first_copies) is asked again the same way, and counts as a holder meanwhile. Each fetch asks
for its chunks in its own order (`order_key`: sha256 of the key and the digest), so fetchers that
want the same chunks of one source ask it for different ones first and can copy the rest from
each other.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import itertools
import math
import statistics
from collections.abc import Callable, Iterable


@dataclasses.dataclass
class FetchReport:
    """What a fetch did: chunks and bytes per peer, peers dropped and why."""

    requested: int = 0
    already_held: int = 0
    fetched: int = 0
    bytes_by_peer: dict[str, int] = dataclasses.field(default_factory=dict)
    dropped_peers: dict[str, str] = dataclasses.field(default_factory=dict)
    raced_bytes: int = 0  # bytes of second copies of chunks asked of two holders (not counted above)

    @property
    def bytes_received(self) -> int:
        return sum(self.bytes_by_peer.values())


@dataclasses.dataclass(frozen=True)
class ScheduleRule:
    """The numbers of the window and hedging rules (see the module docstring)."""

    start: int = 4  # chunks a peer may have in flight before any arrived (one batch)
    largest: int = 16  # the most chunks in flight at one peer
    target_seconds: float = 1.0  # a chunk arriving within this long of its request is on time
    hedge_factor: float = 3.0  # a chunk asked this many median chunk times ago may be asked again
    samples: int = 64  # the median chunk time is over this many latest arrivals
    recheck_seconds: float = 0.25  # a peer that lacked a chunk may be asked again this long after

    def __post_init__(self) -> None:
        if not 1 <= self.start <= self.largest:
            raise ValueError(f"expected 1 <= start <= largest chunks, got {self.start} and {self.largest}")
        positive = (self.target_seconds, self.hedge_factor, self.recheck_seconds)
        if min(positive) <= 0 or self.samples < 1:
            raise ValueError(
                "expected a positive target_seconds, hedge_factor and recheck_seconds and samples >= 1, "
                f"got {self.target_seconds}, {self.hedge_factor}, {self.recheck_seconds} and {self.samples}"
            )


class PeerWindow:
    """How many chunks one peer may have in flight: AIMD on each chunk's time from request to arrival.

    On time (within `target_seconds`): one chunk more, up to `largest`. Late: half (rounded down,
    at least one), unless the late chunk was asked before the last cut (it queued behind the
    window that was cut already). `FetchSchedule.release` also reports chunks given up on late.
    """

    def __init__(self, rule: ScheduleRule) -> None:
        self.rule = rule
        self.size = rule.start
        self._cut_at = -math.inf

    def arrived(self, asked_at: float, arrived_at: float) -> None:
        if arrived_at - asked_at <= self.rule.target_seconds:
            self.size = min(self.rule.largest, self.size + 1)
        elif asked_at >= self._cut_at:
            self.size = max(1, self.size // 2)
            self._cut_at = arrived_at


class FetchSchedule:
    """The bookkeeping of one fetch: chunks waiting, asked (of whom, since when), being stored, done.

    Workers (one per stream) `take` chunks for their peer, report each answer (`received`,
    `release`) and each store's outcome (`stored`, `unstored`); `complete` is set once every
    chunk is stored. Times come from `clock` (the event loop's by default). `windows` (peer ->
    window) carries what earlier fetches learnt of each peer; new peers start at `rule.start`.
    `peers` names every peer of the fetch (rechecks need to know whether another may hold a
    chunk); `order_key` orders the chunks (the module docstring), empty for the given order.
    """

    def __init__(
        self,
        digests: list[str],
        report: FetchReport,
        rule: ScheduleRule = ScheduleRule(),
        clock: Callable[[], float] | None = None,
        windows: dict[str, PeerWindow] | None = None,
        *,
        peers: Iterable[str] = (),
        order_key: str = "",
    ) -> None:
        self.rule = rule
        self.clock = clock or asyncio.get_running_loop().time
        self.total = len(digests)
        self.peers = set(peers)
        if order_key:
            digests = sorted(digests, key=lambda d: hashlib.sha256(f"{order_key}/{d}".encode()).digest())
        self.pending: dict[str, None] = dict.fromkeys(digests)  # an ordered set
        self.failed: dict[str, set[str]] = {d: set() for d in digests}  # digest -> peers that failed it
        self.lacking: dict[str, dict[str, float]] = {}  # digest -> peer -> when it said it lacks it
        self.lacked_by: dict[str, dict[str, float]] = {}  # the same by peer, in the order answered
        self.deferring: set[tuple[str, str]] = set()  # (digest, peer): it holds it but sent it elsewhere
        self.asked: dict[str, dict[str, float]] = {}  # digest -> peer -> when asked (unanswered)
        self.storing: set[str] = set()
        self.completed: set[str] = set()
        self.outstanding: collections.Counter[str] = collections.Counter()  # peer -> chunks unanswered
        self.windows = {} if windows is None else windows  # may outlive the fetch (`Fetcher`)
        self.latencies: collections.deque[float] = collections.deque(maxlen=rule.samples)
        self.dead_peers: set[str] = set()
        self.report = report
        self.sink_error: Exception | None = None
        self.complete = asyncio.Event()
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ queries
    def window(self, peer: str) -> PeerWindow:
        if peer not in self.windows:
            self.windows[peer] = PeerWindow(self.rule)
        return self.windows[peer]

    def room(self, peer: str) -> int:
        """Chunks `peer` may be asked for now, within its window (0 while over a cut window)."""
        return max(0, self.window(peer).size - self.outstanding[peer])

    def servable_by(self, peer: str, limit: int) -> list[str]:
        now = self.clock()
        return list(itertools.islice((d for d in self.pending if self._may_ask(d, peer, now)), limit))

    def _may_ask(self, digest: str, peer: str, now: float) -> bool:
        """Whether `peer` may be asked for `digest` now: it has not failed it, and if it said it
        lacks it, that was `recheck_seconds` ago and another peer may still hold it."""
        if peer in self.failed[digest]:
            return False
        said = self.lacking.get(digest, {}).get(peer)
        due = said is not None and now - said >= self.rule.recheck_seconds
        return said is None or (due and self._may_hold(digest, peer))

    def _may_hold(self, digest: str, peer: str) -> bool:
        """Whether asking `peer` again for `digest` may help: it deferred it, or another may hold it."""
        return (digest, peer) in self.deferring or self._held_elsewhere(digest, peer)

    def _held_elsewhere(self, digest: str, peer: str) -> bool:
        """Some peer other than `peer`, alive, has neither failed `digest` nor said it lacks it."""
        failed, lacking = self.failed[digest], self.lacking.get(digest, {})
        return any(
            p != peer
            and p not in failed
            and p not in self.dead_peers
            and (p not in lacking or (digest, p) in self.deferring)
            for p in self.peers
        )

    def next_recheck_in(self, peer: str) -> float | None:
        """Seconds until `peer` may be asked again for a waiting chunk it lacked (None if never)."""
        lacked = self.lacked_by.get(peer, {})
        settled = []
        due = None
        for digest, said in lacked.items():  # in the order they were answered: the earliest first
            if digest not in self.pending:
                if digest in self.completed:
                    settled.append(digest)
                continue
            if peer not in self.failed[digest] and self._may_hold(digest, peer):
                due = said + self.rule.recheck_seconds
                break
        for digest in settled:
            del lacked[digest]
        return None if due is None else max(1e-3, due - self.clock())

    def hedge_after(self) -> float:
        """Seconds a chunk stays asked of one peer before another may ask for it too."""
        typical = statistics.median(self.latencies) if self.latencies else self.rule.target_seconds
        return self.rule.hedge_factor * typical

    def _hedge_candidates(self, peer: str):
        """(digest, when asked) of chunks asked of one other peer only, that `peer` may be asked for."""
        now = self.clock()
        for digest, at in self.asked.items():
            alone = len(at) == 1 and peer not in at and self._may_ask(digest, peer, now)
            if alone and digest not in self.completed and digest not in self.storing:
                yield digest, next(iter(at.values()))

    def hedgeable_by(self, peer: str, limit: int) -> list[str]:
        """Chunks `peer` may ask for although another peer has them in flight (see the module doc)."""
        due = self.clock() - self.hedge_after()
        found = (d for d, asked_at in self._hedge_candidates(peer) if asked_at <= due)
        return list(itertools.islice(found, limit))

    def next_hedge_in(self, peer: str) -> float | None:
        """Seconds until a chunk becomes hedgeable by `peer` (None if none will without a change)."""
        times = [asked_at for _, asked_at in self._hedge_candidates(peer)]
        if not times:
            return None
        return max(1e-3, min(times) + self.hedge_after() - self.clock())

    def finished_for(self, peer: str) -> bool:
        """Nothing left that `peer` could ever serve in this fetch."""
        if peer in self.dead_peers or self.sink_error is not None:
            return True
        unsettled = self.storing or any(d not in self.completed for d in self.asked)
        return not unsettled and not self.servable_by(peer, 1) and self.next_recheck_in(peer) is None

    # ------------------------------------------------------------------ handing out
    def take(self, peer: str, count: int) -> list[str]:
        """Up to `count` waiting chunks for `peer`, within its window, now asked of it; [] when none."""
        if peer in self.dead_peers or self.sink_error is not None:
            return []
        choice = self.servable_by(peer, min(count, self.room(peer)))
        for digest in choice:
            del self.pending[digest]
        self._ask(peer, choice)
        return choice

    async def wait_take(self, peer: str, count: int) -> list[str]:
        """`take`, or else chunks to hedge, waiting for either; [] once `finished_for(peer)`."""
        while True:
            choice = self.take(peer, count)
            room = self.room(peer)
            if not choice and room > 0 and peer not in self.dead_peers and self.sink_error is None:
                choice = self.hedgeable_by(peer, min(count, room))
                self._ask(peer, choice)
            if choice or self.finished_for(peer):
                return choice
            due = [self.next_hedge_in(peer), self.next_recheck_in(peer)] if room > 0 else []
            delay = min((t for t in due if t is not None), default=None)
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await changed.wait()

    def _ask(self, peer: str, digests: list[str]) -> None:
        now = self.clock()
        for digest in digests:
            self.asked.setdefault(digest, {})[peer] = now
        self.outstanding[peer] += len(digests)

    # ------------------------------------------------------------------ answers
    def received(self, digest: str, peer: str, arrived_at: float) -> bool:
        """A chunk's bytes came from `peer`: True if they are the copy to store, False if a copy
        is stored or being stored already (then they are only verified)."""
        asked_at = self._unask(digest, peer)
        if asked_at is not None:
            self.latencies.append(arrived_at - asked_at)
            self.window(peer).arrived(asked_at, arrived_at)
        keep = digest not in self.completed and digest not in self.storing
        if keep:
            self.storing.add(digest)
        self.notify()
        return keep

    def release(
        self, digest: str, peer: str, *, failed: bool, lacking: bool = False, deferred: bool = False
    ) -> None:
        """`peer` will not deliver `digest` (it answered an error, or its stream or the fetch
        ended); unanswered past the target time, it counts as late for the peer's window.
        `lacking`: it answered that it does not hold the chunk (it may be asked again later);
        `deferred`: it holds it but is sending it to another peer (asked again later, like `lacking`,
        but still counted as a holder)."""
        asked_at = self._unask(digest, peer)
        now = self.clock()
        if asked_at is not None and now - asked_at > self.rule.target_seconds:
            self.window(peer).arrived(asked_at, now)
        if (lacking or deferred) and digest in self.failed:
            self.lacking.setdefault(digest, {})[peer] = now
            if deferred:
                self.deferring.add((digest, peer))
            else:
                self.deferring.discard((digest, peer))
            lacked = self.lacked_by.setdefault(peer, {})
            lacked.pop(digest, None)  # re-inserted last: the dict stays in answer order
            lacked[digest] = now
        elif failed and digest in self.failed:
            self.failed[digest].add(peer)
        self._repend(digest)
        self.notify()

    def stored(self, digest: str, peer: str, size: int) -> None:
        self.storing.discard(digest)
        if digest not in self.completed:
            self.completed.add(digest)
            self.report.fetched += 1
            self.report.bytes_by_peer[peer] = self.report.bytes_by_peer.get(peer, 0) + size
        if len(self.completed) == self.total:
            self.complete.set()
        self.notify()

    def unstored(self, digest: str) -> None:
        """Storing `digest` failed: it waits again unless another peer still has it in flight."""
        self.storing.discard(digest)
        self._repend(digest)
        self.notify()

    def raced(self, size: int) -> None:
        """A second copy arrived and matched its digest; it is not stored."""
        self.report.raced_bytes += size

    def corrupt(self, digest: str, peer: str, reason: str) -> None:
        if digest in self.failed:
            self.failed[digest].add(peer)
        self.drop(peer, reason)

    def drop(self, peer: str, reason: str) -> None:
        self.dead_peers.add(peer)
        self.report.dropped_peers.setdefault(peer, reason)
        self.notify()

    def fail_sink(self, error: Exception) -> None:
        self.sink_error = error
        self.notify()

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def missing(self) -> tuple[str, ...]:
        """Chunks not stored (after the fetch: those no peer could deliver)."""
        return tuple(d for d in self.failed if d not in self.completed)

    def _unask(self, digest: str, peer: str) -> float | None:
        at = self.asked.get(digest)
        if at is None or peer not in at:
            return None
        asked_at = at.pop(peer)
        if not at:
            del self.asked[digest]
        self.outstanding[peer] -= 1
        return asked_at

    def _repend(self, digest: str) -> None:
        settled = digest in self.completed or digest in self.storing or digest in self.asked
        if not settled and digest in self.failed:
            self.pending[digest] = None
