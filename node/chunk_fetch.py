"""Fetching chunks over streams to many peers at once: the per-stream workers and the sink writers.

`fetch_over_streams` runs `streams_per_peer` workers per peer. Each opens a stream when it has
chunks to ask for, pipelines up to `depth` requests of up to `batch` chunks, within its peer's
window, as `FetchSchedule` (node.fetch_schedule) hands them out, and hands every chunk received to
a writer thread: `sink.put` verifies and stores the copy to keep, a second copy of a chunk asked
of two peers is only verified. A peer that serves corrupt bytes, breaks its stream or times out
is dropped and its chunks go to the others; the fetch ends once every chunk is stored.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol, TypeVar

from node.errors import ChunkHashMismatchError, ErrorCode, FetchError, TransportError
from node.fetch_schedule import FetchReport, FetchSchedule, PeerWindow, ScheduleRule
from node.framing import BufferPool
from node.store import check_digest, verified_digest

Peer = TypeVar("Peer")


class ChunkSink(Protocol):
    """What a fetch writes into (a `ContentStore` is one): `put` must verify the digest.

    `put` may run on several threads at once and must not keep `data` after it returns (the
    fetch reuses the buffer for a later chunk).
    """

    def missing(self, digests: Iterable[str]) -> list[str]: ...

    def put(self, data: bytes | bytearray | memoryview, digest: str | None = None) -> str: ...


class ChunkRequests(Protocol):
    """An open stream to one peer's chunk server, as a worker uses it (`ChunkStream` is one)."""

    async def request_get(self, digests: Sequence[str]) -> None: ...

    async def read_chunk(
        self, allocate: Callable[[int], bytearray] = bytearray
    ) -> tuple[ErrorCode, bytearray]: ...

    async def close(self) -> None: ...


async def fetch_over_streams(
    open_stream: Callable[[Peer], Awaitable[ChunkRequests]],
    digests: Sequence[str],
    peers: Sequence[Peer],
    sink: ChunkSink,
    *,
    streams_per_peer: int = 2,
    batch: int = 4,
    depth: int = 2,
    writers: int = 4,
    max_busy_retries: int = 5,
    rule: ScheduleRule | None = None,
    windows: dict[str, PeerWindow] | None = None,
    order_key: str = "",
) -> FetchReport:
    """Fetch every chunk of `digests` the sink lacks from `peers` (named by `str(peer)`), verified.

    The arguments are as `node.transport.fetch_chunks` checks them; `open_stream(peer)` opens a
    stream to a peer. `rule` defaults to windows from one `batch` up to
    `streams_per_peer * depth * batch` chunks per peer; `windows` (peer -> window) carries
    what earlier fetches learnt of each peer's window into this one and out of it; `order_key`
    (the fetching peer's name) gives this fetch its own order of the chunks. Raises
    FetchError (with `.missing`) if some chunks could not be had from any peer; the chunks that
    did arrive stay in the sink, so calling again resumes.
    """
    wanted = list(dict.fromkeys(check_digest(d) for d in digests))
    todo = sink.missing(wanted)
    report = FetchReport(requested=len(wanted), already_held=len(wanted) - len(todo))
    if not todo:
        return report
    if not peers:
        raise FetchError(
            f"expected at least one peer to fetch {len(todo)} chunks from, got none", tuple(todo)
        )
    rule = rule or ScheduleRule(start=batch, largest=streams_per_peer * depth * batch)
    schedule = FetchSchedule(
        todo, report, rule, windows=windows, peers=[str(p) for p in peers], order_key=order_key
    )
    loop = asyncio.get_running_loop()
    put_slots = asyncio.Semaphore(2 * writers)  # received chunks waiting for a writer: bounds memory
    stores: set[asyncio.Task] = set()
    buffers = BufferPool()

    async def settle(digest: str, payload: bytearray, peer: str, keep: bool) -> None:
        """Store the copy to keep; verify a second copy and drop it."""
        try:
            if keep:
                await loop.run_in_executor(pool, sink.put, payload, digest)
            else:
                await loop.run_in_executor(pool, verified_digest, payload, digest)
        except ChunkHashMismatchError as exc:
            if keep:
                schedule.unstored(digest)
            schedule.corrupt(digest, peer, f"served a corrupt chunk: {exc}")
        except asyncio.CancelledError:
            if keep:
                schedule.unstored(digest)
            raise
        except Exception as exc:  # the sink itself failed (disk full, closed store): stop the fetch
            if keep:
                schedule.unstored(digest)
            schedule.fail_sink(exc)
        else:
            if keep:
                schedule.stored(digest, peer, len(payload))
            else:
                schedule.raced(len(payload))
        finally:
            buffers.give(payload)
            put_slots.release()

    async def worker(peer_id: Peer) -> None:
        peer = str(peer_id)
        asked: collections.deque[str] = collections.deque()  # requested on the stream, answers unread
        stream: ChunkRequests | None = None
        busy = 0
        try:
            while True:
                while len(asked) < depth * batch:
                    choice = schedule.take(peer, batch)
                    if not choice:
                        if asked:
                            break
                        if stream is not None:  # a server closes idle streams; open anew after a wait
                            await stream.close()
                            stream = None
                        choice = await schedule.wait_take(peer, batch)
                        if not choice:
                            break
                    asked.extend(choice)  # before the request, so a failure gives them back
                    if stream is None:
                        stream = await open_stream(peer_id)
                    await stream.request_get(choice)
                if not asked:
                    return
                code, payload = await stream.read_chunk(buffers.take)
                arrived_at = schedule.clock()
                if code is ErrorCode.OK:
                    await put_slots.acquire()
                digest = asked.popleft()
                if code is ErrorCode.OK:
                    keep = schedule.received(digest, peer, arrived_at)
                    task = asyncio.create_task(settle(digest, payload, peer, keep))
                    stores.add(task)
                    task.add_done_callback(stores.discard)
                elif code is ErrorCode.BUSY:
                    schedule.release(digest, peer, failed=False)
                    busy += 1
                    if busy > max_busy_retries:
                        schedule.drop(peer, f"busy more than {max_busy_retries} times")
                    await asyncio.sleep(0.05 * busy)
                else:
                    schedule.release(
                        digest,
                        peer,
                        failed=True,
                        lacking=code is ErrorCode.NOT_FOUND,
                        deferred=code is ErrorCode.ELSEWHERE,
                    )
                if peer in schedule.dead_peers or schedule.sink_error is not None:
                    return
        except (TransportError, ConnectionError, OSError) as exc:
            schedule.drop(peer, f"{type(exc).__name__}: {exc}")
        finally:
            for digest in asked:
                schedule.release(digest, peer, failed=peer in schedule.dead_peers)
            if stream is not None:
                await stream.close()

    with concurrent.futures.ThreadPoolExecutor(writers, thread_name_prefix="umm-fetch-put") as pool:
        workers = [asyncio.create_task(worker(p)) for p in peers for _ in range(streams_per_peer)]
        try:
            everyone = asyncio.gather(*workers, return_exceptions=True)
            finished = asyncio.ensure_future(schedule.complete.wait())
            await asyncio.wait([everyone, finished], return_when=asyncio.FIRST_COMPLETED)
            finished.cancel()
            if everyone.done():  # a worker's unexpected error surfaces as before
                for outcome in everyone.result():
                    if isinstance(outcome, Exception):
                        raise outcome
            while stores:
                await asyncio.gather(*list(stores))
        finally:
            for task in [*workers, *stores]:
                task.cancel()
            await asyncio.gather(*workers, *stores, return_exceptions=True)
    if schedule.sink_error is not None:
        raise schedule.sink_error
    missing = schedule.missing()
    if missing:
        raise FetchError(
            f"expected all {len(todo)} chunks from {len(peers)} peers, got {len(todo) - len(missing)}; "
            f"peers dropped: {report.dropped_peers or 'none'}",
            missing,
            report.bytes_received,
            report.dropped_peers,
        )
    return report
