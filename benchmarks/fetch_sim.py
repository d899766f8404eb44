"""The input fetch of a round on mixed links, simulated on a virtual clock: fetch windows vs fixed shares.

8 nodes each hold a delta of 16 chunks (1 MiB each: 2 per shard); node i fetches the chunks of
shards i, i+1, i+2 of the 7 other deltas (42 chunks) from all 7 peers at once, with
`node.chunk_fetch.fetch_over_streams`, and serves what it has stored to the others. Links: each
node's uplink and downlink are first-come-first-served queues at its rate (1 MiB takes 0.42 s at
20 Mbit/s, 0.042 s at 200 Mbit/s); a peer that lacks a chunk answers at once. The event loop's
clock jumps to the next timer and sink writes run inline, so a run is deterministic and takes
seconds of CPU. "fixed shares" stands in for the scheduling before windows: 16 chunks in flight
per peer from the start, and an idle peer asks again for any chunk in flight elsewhere at once;
"windows + hedging" is commit c72f3ee's (no rechecks, every node in delta order); "+ own order,
rechecks" is commit 912276a's (each node asks in its own order and asks again a peer that lacked
a chunk); the last row is today's: servers also answer ELSEWHERE for a chunk they sent to another
peer moments ago (node.first_copies), and rechecks come after 0.25 s.

    python -m benchmarks.fetch_sim [--slow-rate 20] [--fast-rate 200] [--slow 2] [--nodes 8]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import selectors

from node.chunk_fetch import fetch_over_streams
from node.errors import ErrorCode
from node.fetch_schedule import ScheduleRule
from node.first_copies import FirstCopies
from node.store import verified_digest

MIB = 1 << 20
NEVER = 1e9
FIXED_SHARES = ScheduleRule(
    start=16, largest=16, target_seconds=NEVER, hedge_factor=1e-9, recheck_seconds=NEVER
)
WINDOWS = ScheduleRule(recheck_seconds=NEVER)  # commit c72f3ee: windows and hedging, no rechecks
RECHECKS = ScheduleRule(recheck_seconds=0.5)  # commit 912276a: own order, rechecks, every request served


class _VirtualSelector(selectors.DefaultSelector):
    """Polls without waiting; a wait for the next timer moves the virtual clock there instead."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None):
        ready = super().select(0)
        if ready or (timeout is not None and timeout <= 0):
            return ready
        if timeout is None:
            raise RuntimeError("every task waits and no timer is set: the fetch is stuck")
        self.now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on a virtual clock that runs executor jobs inline (deterministic)."""

    def __init__(self) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(self._virtual)

    def time(self) -> float:
        return self._virtual.now

    def run_in_executor(self, executor, func, *args):
        future = self.create_future()
        try:
            future.set_result(func(*args))
        except Exception as exc:
            future.set_exception(exc)
        return future


def run_virtual(coroutine):
    """Run `coroutine` to its end on a fresh `VirtualTimeLoop`."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


class Link:
    """One direction of a node's link: chunks pass one after another, `seconds` each."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.free_at = 0.0

    def book(self, start: float) -> float:
        self.free_at = max(start, self.free_at) + self.seconds
        return self.free_at


class SimNode:
    """A node's store (a sink the others fetch from), its links and what its uplink sent."""

    def __init__(self, name: str, seconds_per_chunk: float, first_copies: FirstCopies | None = None) -> None:
        self.name = name
        self.first_copies = first_copies  # None: every request is served (the scheduling before it)
        self.data: dict[str, bytes] = {}
        self.up, self.down = Link(seconds_per_chunk), Link(seconds_per_chunk)
        self.sent = 0

    def __str__(self) -> str:
        return self.name

    def missing(self, digests):
        return [d for d in digests if d not in self.data]

    def put(self, data, digest=None):
        actual = verified_digest(data, digest)
        self.data[actual] = bytes(data)
        return actual


class SimStream:
    """A stream from `fetcher` to `server`: requests queue at the server's uplink in order."""

    def __init__(self, fetcher: SimNode, server: SimNode) -> None:
        self.fetcher, self.server = fetcher, server
        self.queue: collections.deque[tuple[str, float]] = collections.deque()
        self.last = 0.0

    async def request_get(self, digests) -> None:
        now = asyncio.get_running_loop().time()
        for digest in digests:
            code = ErrorCode.OK if digest in self.server.data else ErrorCode.NOT_FOUND
            copies = self.server.first_copies
            if code is ErrorCode.OK and copies is not None and copies.defer(digest, self.fetcher.name):
                code = ErrorCode.ELSEWHERE
            self.last = self.server.up.book(now) if code is ErrorCode.OK else max(now, self.last)
            if code is ErrorCode.OK:
                self.server.sent += 1
                if copies is not None:
                    copies.sent(digest, self.fetcher.name, at=self.last)
            self.queue.append((digest, self.last, code))

    async def read_chunk(self, allocate=bytearray):
        digest, sent_at, code = self.queue.popleft()
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, sent_at - loop.time()))
        if code is not ErrorCode.OK:
            return code, bytearray(b"not sent")
        await asyncio.sleep(max(0.0, self.fetcher.down.book(sent_at) - loop.time()))
        payload = allocate(MIB)
        payload[:] = self.server.data[digest]
        return ErrorCode.OK, payload

    async def close(self) -> None:
        self.queue.clear()


def _delta(node: int, shards: int) -> list[tuple[int, str, bytes]]:
    """(shard, digest, bytes) of a node's delta: 2 chunks per shard."""
    out = []
    for index in range(2 * shards):
        chunk = hashlib.sha256(f"{node}/{index}".encode()).digest() * (MIB // 32)
        out.append((index // 2, hashlib.sha256(chunk).hexdigest(), chunk))
    return out


async def round_fetch(
    rates: list[float], rule: ScheduleRule | None, own_order: bool = True, first_copies: bool = True
) -> list[tuple[float, int]]:
    """(seconds to its last input, chunks its uplink sent) per node; `own_order`: each node asks
    for its chunks in its own order (its name as the fetch's order key), else in delta order;
    `first_copies`: servers answer ELSEWHERE as node.first_copies says, else serve every request."""
    count = len(rates)
    loop = asyncio.get_running_loop()
    nodes = [
        SimNode(f"n{i}", MIB * 8 / (rate * 1e6), FirstCopies(clock=loop.time) if first_copies else None)
        for i, rate in enumerate(rates)
    ]
    wanted: list[list[str]] = [[] for _ in nodes]
    for owner, node in enumerate(nodes):
        for shard, digest, chunk in _delta(owner, count):
            node.data[digest] = chunk
            for fetcher in range(count):
                if fetcher != owner and (shard - fetcher) % count < 3:
                    wanted[fetcher].append(digest)
    done = [0.0] * count

    async def fetch(i: int) -> None:
        node = nodes[i]

        async def open_stream(server: SimNode) -> SimStream:
            return SimStream(node, server)

        peers = [p for p in nodes if p is not node]
        order_key = node.name if own_order else ""
        await fetch_over_streams(open_stream, wanted[i], peers, node, rule=rule, order_key=order_key)
        done[i] = loop.time()

    await asyncio.gather(*(fetch(i) for i in range(count)))
    return [(done[i], nodes[i].sent) for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--slow", type=int, default=2)
    parser.add_argument("--slow-rate", type=float, default=20.0, help="Mbit/s")
    parser.add_argument("--fast-rate", type=float, default=200.0, help="Mbit/s")
    args = parser.parse_args()
    mixed = [args.slow_rate] * args.slow + [args.fast_rate] * (args.nodes - args.slow)
    print(f"{args.nodes} nodes, {args.slow} at {args.slow_rate:g} Mbit/s, the rest at {args.fast_rate:g}")
    print("| scheduling | links | fast nodes' last input (s) | slow nodes' (s) | chunks each slow sent |")
    print("|---|---|---|---|---|")
    schedulings = (
        ("fixed shares", FIXED_SHARES, False, False),
        ("windows + hedging", WINDOWS, False, False),
        ("+ own order, rechecks", RECHECKS, True, False),
        ("+ first copies first", None, True, True),
    )
    for label, rule, own_order, first_copies in schedulings:
        for links, rates in (("mixed", mixed), ("all fast", [args.fast_rate] * args.nodes)):
            result = run_virtual(round_fetch(rates, rule, own_order, first_copies))
            fast = max(t for (t, _), r in zip(result, rates, strict=True) if r == args.fast_rate)
            slow = [f"{t:.2f}" for (t, _), r in zip(result, rates, strict=True) if r != args.fast_rate]
            sent = [str(s) for (_, s), r in zip(result, rates, strict=True) if r != args.fast_rate]
            print(f"| {label} | {links} | {fast:.2f} | {', '.join(slow) or '-'} | {', '.join(sent) or '-'} |")


if __name__ == "__main__":
    main()
