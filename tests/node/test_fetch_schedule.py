"""Fetch scheduling with fake peers on a virtual clock: windows sized by delivery, hedging at the tail.

The fetch runs on an event loop whose clock jumps to the next timer instead of waiting, and whose
executor runs sink writes inline, so every run is the same sequence of events: the tests assert
counts (chunks asked of and served by each fake peer, copies stored), never times.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib

import pytest

from benchmarks.fetch_sim import run_virtual
from node.chunk_fetch import fetch_over_streams
from node.errors import ErrorCode, FetchError, RemoteTimeoutError
from node.fetch_schedule import FetchReport, FetchSchedule, PeerWindow, ScheduleRule
from node.store import verified_digest

TIMEOUT = 60.0  # a fake stream's read timeout, in virtual seconds


class FakeHolder:
    """A peer serving `chunks` through one uplink: each chunk takes `seconds_per_chunk` after the
    previous one asked of it (over all its streams); chunks in `stalled` are never answered."""

    def __init__(self, name: str, chunks: dict[str, bytes], seconds_per_chunk: float, stalled=()):
        self.name = name
        self.chunks = chunks
        self.seconds_per_chunk = seconds_per_chunk
        self.stalled = set(stalled)
        self.corrupt = False
        self.free_at = 0.0
        self.asked: collections.Counter[str] = collections.Counter()
        self.delivered: collections.Counter[str] = collections.Counter()  # copies read by the fetch

    def __str__(self) -> str:
        return self.name


class FakeStream:
    def __init__(self, holder: FakeHolder) -> None:
        self.holder = holder
        self.queue: collections.deque[tuple[str, float]] = collections.deque()

    async def request_get(self, digests) -> None:
        now = asyncio.get_running_loop().time()
        for digest in digests:
            self.holder.asked[digest] += 1
            self.holder.free_at = max(now, self.holder.free_at) + self.holder.seconds_per_chunk
            self.queue.append((digest, self.holder.free_at))

    async def read_chunk(self, allocate=bytearray):
        digest, ready_at = self.queue.popleft()
        loop = asyncio.get_running_loop()
        if digest in self.holder.stalled:
            await asyncio.sleep(TIMEOUT)
            raise RemoteTimeoutError(f"expected a chunk from {self.holder} within {TIMEOUT:g} s")
        await asyncio.sleep(max(0.0, ready_at - loop.time()))
        if digest not in self.holder.chunks:
            return ErrorCode.NOT_FOUND, bytearray(b"no such chunk")
        self.holder.delivered[digest] += 1
        data = self.holder.chunks[digest]
        if self.holder.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 1])
        payload = allocate(len(data))
        payload[:] = data
        return ErrorCode.OK, payload

    async def close(self) -> None:
        self.queue.clear()


async def open_fake(holder: FakeHolder) -> FakeStream:
    return FakeStream(holder)


class CountingSink:
    """A sink in memory that verifies like a store and counts every write per digest."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.puts: collections.Counter[str] = collections.Counter()

    def missing(self, digests):
        return [d for d in digests if d not in self.data]

    def put(self, data, digest=None):
        actual = verified_digest(data, digest)
        self.puts[actual] += 1
        self.data[actual] = bytes(data)
        return actual


def make_chunks(count: int, size: int = 512) -> dict[str, bytes]:
    chunks = [hashlib.sha256(f"chunk {i}".encode()).digest() * (size // 32) for i in range(count)]
    return {hashlib.sha256(c).hexdigest(): c for c in chunks}


def fetch(chunks: dict[str, bytes], holders: list[FakeHolder], sink: CountingSink) -> FetchReport:
    return run_virtual(fetch_over_streams(open_fake, list(chunks), holders, sink))


def test_window_grows_on_time_and_halves_once_per_window_when_late():
    window = PeerWindow(ScheduleRule(start=4, largest=6, target_seconds=1.0))
    sizes = []
    for asked_at, arrived_at in [(0.0, 0.5), (0.0, 1.0), (0.0, 0.9), (0.0, 0.2)]:  # on time
        window.arrived(asked_at, arrived_at)
        sizes.append(window.size)
    assert sizes == [5, 6, 6, 6]  # +1 each, capped at largest
    window.arrived(1.0, 2.5)  # late: 6 // 2
    assert window.size == 3
    window.arrived(1.2, 2.8)  # late, but asked before the cut at 2.5: queued behind the old window
    assert window.size == 3
    window.arrived(2.6, 4.0)  # late and asked after the cut
    assert window.size == 1
    window.arrived(4.1, 6.0)
    assert window.size == 1  # never below one chunk


def test_a_chunk_is_hedged_after_a_few_median_chunk_times_once():
    now = [0.0]
    digests = ["a" * 64, "b" * 64]
    schedule = FetchSchedule(digests, FetchReport(), ScheduleRule(start=1, hedge_factor=3.0), lambda: now[0])
    assert schedule.take("slow", 4) == ["a" * 64]  # a window of one chunk
    assert schedule.take("fast", 4) == ["b" * 64]
    assert schedule.hedgeable_by("fast", 4) == []  # pending is empty, but "a" is not late yet
    now[0] = 0.2
    assert schedule.received("b" * 64, "fast", 0.2)  # the median chunk time is now 0.2 s
    assert schedule.hedge_after() == pytest.approx(0.6)
    now[0] = 0.59
    assert schedule.hedgeable_by("fast", 4) == [] and schedule.next_hedge_in("fast") == pytest.approx(0.01)
    now[0] = 0.61
    assert schedule.hedgeable_by("fast", 4) == ["a" * 64]
    schedule._ask("fast", ["a" * 64])
    assert schedule.hedgeable_by("third", 4) == []  # asked of two peers already: no third copy


def test_a_slow_holder_of_the_same_chunks_is_asked_for_few_of_them():
    chunks = make_chunks(120)
    fast = FakeHolder("fast", chunks, seconds_per_chunk=0.01)
    slow = FakeHolder("slow", chunks, seconds_per_chunk=0.5)
    sink = CountingSink()
    report = fetch(chunks, [slow, fast], sink)
    assert sink.data == chunks
    assert set(sink.puts.values()) == {1}  # no chunk stored twice
    size = len(next(iter(chunks.values())))
    # The old fixed share asked the slow holder for 2 streams x 2 requests x 4 chunks = 16 at once;
    # its window starts at one batch (4) and grows by one per chunk it delivers on time.
    assert sum(slow.asked.values()) <= 4 + sum(slow.delivered.values())
    assert report.bytes_by_peer.get("slow", 0) <= 4 * size
    assert report.bytes_received == 120 * size  # each chunk counted once
    served = sum(slow.delivered.values()) + sum(fast.delivered.values())
    assert report.raced_bytes == (served - 120) * size  # every copy read beyond the first is raced


def test_a_window_learnt_in_one_fetch_starts_the_next():
    first, second = make_chunks(120), {d: c for d, c in make_chunks(240).items() if d not in make_chunks(120)}
    fast = FakeHolder("fast", {**first, **second}, seconds_per_chunk=0.01)
    slow = FakeHolder("slow", {**first, **second}, seconds_per_chunk=2.0)
    windows = {}

    async def both():
        await fetch_over_streams(open_fake, list(first), [slow, fast], CountingSink(), windows=windows)
        learnt = windows["slow"].size
        asked_before = sum(slow.asked.values())
        await fetch_over_streams(open_fake, list(second), [slow, fast], CountingSink(), windows=windows)
        return learnt, sum(slow.asked.values()) - asked_before

    learnt, asked_in_second = run_virtual(both())
    # every slow chunk of the first fetch is late (2 s > the 1 s target): halved from 4 to 2
    assert learnt == 2
    assert asked_in_second == 2  # not a fresh batch of 4


def test_a_chunk_stuck_at_a_stalled_holder_comes_from_another_before_the_timeout():
    chunks = make_chunks(40)
    stalled = FakeHolder("stalled", chunks, seconds_per_chunk=0.01, stalled=chunks)
    fast = FakeHolder("fast", chunks, seconds_per_chunk=0.01)
    sink = CountingSink()
    report = fetch(chunks, [stalled, fast], sink)
    assert sink.data == chunks and set(sink.puts.values()) == {1}
    assert sum(stalled.asked.values()) == 4  # one batch, never answered: its window never grew
    assert all(fast.asked[d] == 1 for d in chunks)  # including the four hedged ones
    assert report.bytes_by_peer == {"fast": sum(map(len, chunks.values()))}
    assert report.dropped_peers == {}  # done before the stalled holder's timeout ran out
    assert report.raced_bytes == 0


def test_late_copies_are_verified_stored_once_and_counted_once():
    chunks = make_chunks(30)
    slow = FakeHolder("slow", chunks, seconds_per_chunk=0.3)
    fast = FakeHolder("fast", chunks, seconds_per_chunk=0.01)
    # one more chunk, last in order, that only the slow holder has: it is queued at the slow
    # holder behind common chunks, so the fetch lasts until their late copies arrive
    extra = {d: c for d, c in make_chunks(31).items() if d not in chunks}
    slow.chunks = {**chunks, **extra}
    fast.chunks = dict(chunks)
    sink = CountingSink()
    wanted = {**chunks, **extra}
    report = run_virtual(fetch_over_streams(open_fake, list(chunks) + list(extra), [slow, fast], sink))
    assert sink.data == wanted and set(sink.puts.values()) == {1}
    size = len(next(iter(chunks.values())))
    served = sum(slow.delivered.values()) + sum(fast.delivered.values())
    assert report.bytes_received == 31 * size
    assert served > 31 and report.raced_bytes == (served - 31) * size


def test_a_corrupt_copy_drops_its_peer_whether_it_comes_first_or_late():
    chunks = make_chunks(12)
    corrupt_first = FakeHolder("corrupt", chunks, seconds_per_chunk=0.01)
    corrupt_first.corrupt = True
    honest = FakeHolder("honest", chunks, seconds_per_chunk=0.05)
    sink = CountingSink()
    report = fetch(chunks, [corrupt_first, honest], sink)
    assert sink.data == chunks and set(sink.puts.values()) == {1}
    assert "served a corrupt chunk" in report.dropped_peers["corrupt"]
    assert report.bytes_by_peer == {"honest": sum(map(len, chunks.values()))}

    # A slow corrupt holder's copies lose the race to hedged ones; a chunk that only a slower
    # honest holder has keeps the fetch going until they arrive, and they are verified anyway.
    (extra,) = [d for d in make_chunks(13) if d not in chunks]
    late = FakeHolder("late", {extra: make_chunks(13)[extra]}, seconds_per_chunk=2.0)
    corrupt_late = FakeHolder("corrupt", chunks, seconds_per_chunk=0.3)
    corrupt_late.corrupt = True
    fast = FakeHolder("fast", chunks, seconds_per_chunk=0.01)
    sink = CountingSink()
    report = run_virtual(fetch_over_streams(open_fake, [*chunks, extra], [corrupt_late, fast, late], sink))
    assert len(sink.data) == 13 and set(sink.puts.values()) == {1}
    assert sum(corrupt_late.delivered.values()) >= 1
    assert "served a corrupt chunk" in report.dropped_peers["corrupt"]
    assert "corrupt" not in report.bytes_by_peer


def test_no_holder_left_raises_fetch_error_with_the_missing_chunks():
    chunks = make_chunks(3)
    stalled = FakeHolder("stalled", chunks, seconds_per_chunk=0.01, stalled=chunks)
    sink = CountingSink()
    with pytest.raises(FetchError) as caught:
        fetch(chunks, [stalled], sink)
    assert caught.value.missing == tuple(chunks)
    assert "RemoteTimeoutError" in caught.value.dropped["stalled"]


def test_a_peer_that_lacked_chunks_is_asked_again_once_it_holds_copies():
    # Ten chunks exist only at a slow holder at first (1 s each); a fast peer copies all of them
    # 0.5 s into the fetch (as a fast fetcher of the same source would). Asked again after it said
    # it lacks them, the fast peer serves what the slow holder has not been asked for yet.
    chunks = make_chunks(10)
    slow = FakeHolder("slow", chunks, seconds_per_chunk=1.0)
    copier = FakeHolder("copier", {}, seconds_per_chunk=0.01)
    sink = CountingSink()

    async def run():
        asyncio.get_running_loop().call_later(0.5, copier.chunks.update, chunks)
        return await fetch_over_streams(open_fake, list(chunks), [slow, copier], sink)

    report = run_virtual(run())
    assert sink.data == chunks and set(sink.puts.values()) == {1}
    assert sum(slow.asked.values()) == 4  # its first window, never more
    assert sum(copier.delivered.values()) >= 6
    assert report.bytes_received == sum(map(len, chunks.values()))


def test_a_chunk_every_peer_lacks_fails_without_endless_rechecks():
    chunks = make_chunks(3)
    (absent,) = [d for d in make_chunks(4) if d not in chunks]
    first = FakeHolder("first", dict(chunks), seconds_per_chunk=0.01)
    second = FakeHolder("second", dict(chunks), seconds_per_chunk=0.01)
    sink = CountingSink()
    with pytest.raises(FetchError) as caught:
        run_virtual(fetch_over_streams(open_fake, [*chunks, absent], [first, second], sink))
    assert caught.value.missing == (absent,)
    assert first.asked[absent] + second.asked[absent] <= 3  # each once, and at most one recheck
    assert sink.data == chunks


def test_fetchers_with_different_order_keys_ask_for_different_chunks_first():
    digests = list(make_chunks(16))
    firsts = []
    for key in ("n1", "n2", "n3"):
        schedule = FetchSchedule(digests, FetchReport(), ScheduleRule(start=4), lambda: 0.0, order_key=key)
        taken = schedule.take("source", 4)
        assert len(taken) == 4 and set(taken) <= set(digests)
        firsts.append(set(taken))
    assert len(firsts[0] | firsts[1] | firsts[2]) > 8  # mostly different chunks, not the same four
    unordered = FetchSchedule(digests, FetchReport(), ScheduleRule(start=4), lambda: 0.0)
    assert unordered.take("source", 4) == digests[:4]  # no key: the order given


class DeferringHolder(FakeHolder):
    """Answers ELSEWHERE the first `defers` times each chunk is asked for, then serves it."""

    def __init__(self, name, chunks, seconds_per_chunk, defers):
        super().__init__(name, chunks, seconds_per_chunk)
        self.defers = defers


class DeferringStream(FakeStream):
    async def read_chunk(self, allocate=bytearray):
        digest = self.queue[0][0]
        if self.holder.asked[digest] <= self.holder.defers:
            self.queue.popleft()
            await asyncio.sleep(0.01)
            return ErrorCode.ELSEWHERE, bytearray(b"sent elsewhere")
        return await super().read_chunk(allocate)


def test_a_holder_that_answered_elsewhere_is_asked_again_and_counts_as_a_holder():
    chunks = make_chunks(6)
    holder = DeferringHolder("source", chunks, seconds_per_chunk=0.01, defers=2)
    lacking = FakeHolder("empty", {}, seconds_per_chunk=0.01)  # says it lacks every chunk
    sink = CountingSink()

    async def open_stream(peer):
        return DeferringStream(peer) if peer is holder else FakeStream(peer)

    report = run_virtual(fetch_over_streams(open_stream, list(chunks), [holder, lacking], sink))
    assert sink.data == chunks  # not a FetchError although the only holder deferred every chunk
    assert all(holder.asked[d] == 3 for d in chunks)  # twice deferred, then served
    assert report.bytes_by_peer == {"source": sum(map(len, chunks.values()))}


def test_first_copies_make_slow_sources_send_fewer_copies_in_the_simulated_round():
    from benchmarks.fetch_sim import round_fetch

    rates = [20.0, 20.0] + [200.0] * 6
    without = run_virtual(round_fetch(rates, ScheduleRule(), own_order=True, first_copies=False))
    with_first = run_virtual(round_fetch(rates, ScheduleRule(), own_order=True, first_copies=True))
    # each slow node's delta: 16 chunks, wanted 42 times in all by the other nodes
    assert all(16 <= sent <= 42 for _, sent in without[:2] + with_first[:2])
    assert sum(sent for _, sent in with_first[:2]) < sum(sent for _, sent in without[:2])
    assert max(t for t, _ in with_first[2:]) < max(t for t, _ in without[2:])  # virtual seconds
