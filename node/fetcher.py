"""The one way chunks are fetched by digest: from a result's holders and the announced peers, retried.

`Fetcher.fetch(digests, holders)` asks `fetch_chunks` (node.transport) for the chunks the sink lacks
from the peers `find_peers` names plus the `holders` a record named, and on failure tries again
after `FetchPolicy.retry_delay` with the peers named anew, up to `attempts` times. Every timeout
and count is a named field of `FetchPolicy`. A peer dropped from a fetch (it stalled past
`request_timeout`, broke its stream or served corrupt bytes) is benched with a doubling penalty
(`PeerPenalties`); holders race for chunks late at a slow peer, and each peer's window of chunks
in flight (node.fetch_schedule) carries over from one fetch to the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

from hivemind.p2p import P2P, PeerID

from node.errors import FetchError
from node.fetch_schedule import PeerWindow
from node.transport import ChunkSink, FetchReport, fetch_chunks
from protocol.envelope import MAX_ENVELOPE_SIZE

FindPeers = Callable[[int], Awaitable[Sequence[PeerID]]]  # attempt number -> peers to ask


@dataclasses.dataclass(frozen=True)
class FetchPolicy:
    """How a fetch waits and retries.

    ``request_timeout``: seconds a peer may take to open a stream or answer one request before it
    is dropped from this fetch; ``attempts``: whole fetches tried before FetchError; ``retry_delay``:
    seconds between attempts; ``max_chunk_bytes``: the largest chunk accepted (checked on the
    frame header, before the bytes are read: `node_chunk_limit` for a node).
    """

    request_timeout: float = 20.0
    attempts: int = 3
    retry_delay: float = 0.5
    penalty: float = 5.0  # seconds a peer dropped once is not asked again; doubles per drop
    max_penalty: float = 300.0
    max_chunk_bytes: int = 64 << 20  # a larger chunk is refused from its frame header, before its bytes


class PeerPenalties:
    """Penalty memory: a peer dropped from a fetch (stalled, broken stream, corrupt chunk) is not
    asked again for ``penalty * 2**(drops - 1)`` seconds (at most ``max_penalty``); a peer that
    serves a chunk is forgiven. So one stalled peer costs one timeout per penalty, not per fetch."""

    def __init__(self, policy: FetchPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self._drops: dict[str, int] = {}
        self._until: dict[str, float] = {}

    def benched(self, peer: str) -> bool:
        return self._until.get(peer, 0.0) > self.clock()

    def penalize(self, peer: str) -> None:
        drops = self._drops.get(peer, 0) + 1
        self._drops[peer] = drops
        delay = min(self.policy.max_penalty, self.policy.penalty * 2 ** (drops - 1))
        self._until[peer] = self.clock() + delay

    def forgive(self, peer: str) -> None:
        self._drops.pop(peer, None)
        self._until.pop(peer, None)


def node_chunk_limit(chunk_size: int) -> int:
    """The largest chunk a node of a network with `chunk_size` accepts: a signed message of the
    largest type, or a tensor chunk with room for codec overhead."""
    return max(MAX_ENVELOPE_SIZE, 2 * chunk_size)


def holder_peers(holders: Iterable[str], *, exclude: str | None = None) -> list[PeerID]:
    """The libp2p peer ids among `holders` (base58 strings; unparsable ones and `exclude` skipped)."""
    found = []
    for holder in holders:
        if holder == exclude:
            continue
        with contextlib.suppress(Exception):
            found.append(PeerID.from_base58(holder))
    return found


class Fetcher:
    """Fetches chunks into `sink` over `p2p` from the peers `find_peers(attempt)` names and holders.

    `exclude` is this process's own peer id (never asked); `bytes_received` counts every chunk
    byte received, failed attempts included.
    """

    def __init__(
        self,
        p2p: P2P,
        sink: ChunkSink,
        find_peers: FindPeers,
        *,
        policy: FetchPolicy = FetchPolicy(),
        exclude: str | None = None,
    ) -> None:
        self.p2p = p2p
        self.sink = sink
        self.find_peers = find_peers
        self.policy = policy
        self.exclude = exclude
        self.bytes_received = 0
        self.penalties = PeerPenalties(policy)
        self.windows: dict[str, PeerWindow] = {}  # peer -> chunks it may have in flight, as learnt

    async def fetch(
        self, digests: Sequence[str], holders: Iterable[str] = (), *, attempts: int | None = None
    ) -> FetchReport | None:
        """Fetch the chunks of `digests` the sink lacks (None if it lacks none); FetchError if some
        cannot be had after `attempts` (default: the policy's) tries."""
        if not self.sink.missing(digests):
            return None
        extra = holder_peers(holders, exclude=self.exclude)
        error: FetchError | None = None
        for attempt in range(attempts or self.policy.attempts):
            if attempt:
                await asyncio.sleep(self.policy.retry_delay)
            peers = await self.find_peers(attempt)
            usable = {p for p in (*peers, *extra) if str(p) != self.exclude}
            sources = sorted((p for p in usable if not self.penalties.benched(str(p))), key=str)
            try:
                report = await fetch_chunks(
                    self.p2p,
                    digests,
                    sources,
                    self.sink,
                    timeout=self.policy.request_timeout,
                    max_chunk_bytes=self.policy.max_chunk_bytes,
                    windows=self.windows,
                    order_key=self.exclude or "",
                )
            except FetchError as exc:
                self.bytes_received += exc.bytes_received
                for peer in exc.dropped:
                    self.penalties.penalize(peer)
                error = exc
                continue
            self.bytes_received += report.bytes_received
            for peer in report.dropped_peers:
                self.penalties.penalize(peer)
            for peer in report.bytes_by_peer:
                self.penalties.forgive(peer)
            return report
        assert error is not None
        raise error
