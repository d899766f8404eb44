"""Chunks by hash over hivemind's P2P (the bundled go-libp2p daemon): a server and a parallel fetcher.

Wire protocol on the stream handler `umm.chunks/1`, in frames of `node.framing`:
    request  kind 1 GET   payload: 1..MAX_BATCH raw 32-byte sha256 digests
             kind 2 HAVE  payload: 1..MAX_BATCH raw 32-byte sha256 digests
    response kind = an `ErrorCode`; GET: one frame per digest, in order, OK carrying the chunk's bytes;
             HAVE: one OK frame with one byte (0 or 1) per digest; errors carry a UTF-8 message.
A stream carries any number of requests; the server closes it on a bad request.

The fetcher pulls different chunks from several peers at once (a few streams per peer, each
pipelining a batch of chunks), verifies every chunk's sha256 before it reaches the sink, retries a
chunk on another peer when a peer lacks it, dies, times out or serves corrupt bytes (such a peer is
dropped), and skips chunks the sink already holds — so an interrupted fetch resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
from collections.abc import Iterable, Sequence
from typing import Protocol

from hivemind.p2p import P2P, PeerID

from node.errors import (
    ChunkHashMismatchError,
    ChunkNotFoundError,
    ErrorCode,
    FetchError,
    FramingError,
    RemoteError,
    RemoteTimeoutError,
    StoreError,
    TransportError,
)
from node.framing import read_frame, write_frame
from node.store import check_digest

logger = logging.getLogger(__name__)

HANDLER_NAME = "umm.chunks/1"
DIGEST_BYTES = 32
MAX_BATCH = 256
DEFAULT_TIMEOUT = 30.0


class RequestKind(enum.IntEnum):
    """Request frame kinds."""

    GET = 1
    HAVE = 2


class ChunkSource(Protocol):
    """What a server serves from (a `ContentStore` is one)."""

    def get(self, digest: str) -> bytes: ...


class ChunkSink(Protocol):
    """What a fetch writes into (a `ContentStore` is one): `put` must verify the digest."""

    def missing(self, digests: Iterable[str]) -> list[str]: ...

    def put(self, data: bytes, digest: str | None = None) -> str: ...


def pack_digests(digests: Sequence[str]) -> bytes:
    """Raw 32-byte digests, concatenated, for a request payload."""
    return b"".join(bytes.fromhex(check_digest(d)) for d in digests)


def unpack_digests(payload: bytes) -> list[str]:
    """The inverse of `pack_digests`; raises FramingError on a payload of the wrong size."""
    count, rest = divmod(len(payload), DIGEST_BYTES)
    if rest or not 1 <= count <= MAX_BATCH:
        raise FramingError(
            f"expected 1..{MAX_BATCH} digests of {DIGEST_BYTES} bytes, got a {len(payload)}-byte payload"
        )
    return [payload[i : i + DIGEST_BYTES].hex() for i in range(0, len(payload), DIGEST_BYTES)]


class ChunkServer:
    """Serves chunks of a `ChunkSource` to any peer, with at most `max_concurrent` chunk reads at once."""

    def __init__(
        self,
        source: ChunkSource,
        *,
        max_concurrent: int = 8,
        timeout: float = DEFAULT_TIMEOUT,
        busy_timeout: float = 10.0,
    ) -> None:
        self.source = source
        self.timeout = timeout
        self.busy_timeout = busy_timeout
        self._slots = asyncio.Semaphore(max_concurrent)
        self.bytes_sent = 0

    async def start(self, p2p: P2P) -> None:
        """Register the handler on `p2p` (the node's daemon)."""
        await p2p.add_binary_stream_handler(HANDLER_NAME, self.rpc_chunks)

    async def stop(self, p2p: P2P) -> None:
        """Unregister the handler."""
        await p2p.remove_binary_stream_handler(HANDLER_NAME)

    async def rpc_chunks(self, _info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer requests on one stream until the peer closes it or breaks the protocol."""
        try:
            while (
                frame := await read_frame(reader, timeout=self.timeout, max_bytes=MAX_BATCH * DIGEST_BYTES)
            ) is not None:
                kind, payload = frame
                try:
                    digests = unpack_digests(payload)
                    request = RequestKind(kind)
                except (FramingError, ValueError) as exc:
                    message = (
                        str(exc)
                        if isinstance(exc, FramingError)
                        else f"expected a request kind 1 or 2, got {kind}"
                    )
                    await write_frame(writer, ErrorCode.BAD_REQUEST, message.encode(), timeout=self.timeout)
                    return
                if request is RequestKind.HAVE:
                    await self._answer_have(writer, digests)
                else:
                    for digest in digests:
                        await self._answer_get(writer, digest)
        except (TransportError, ConnectionError) as exc:
            logger.debug("chunk stream ended: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _answer_have(self, writer: asyncio.StreamWriter, digests: list[str]) -> None:
        flags = bytes(int(self._has(d)) for d in digests)
        await write_frame(writer, ErrorCode.OK, flags, timeout=self.timeout)

    def _has(self, digest: str) -> bool:
        has = getattr(self.source, "has", None)
        if has is not None:
            return bool(has(digest))
        try:
            self.source.get(digest)
        except StoreError:
            return False
        return True

    async def _answer_get(self, writer: asyncio.StreamWriter, digest: str) -> None:
        try:
            await asyncio.wait_for(self._slots.acquire(), self.busy_timeout)
        except TimeoutError:
            await write_frame(writer, ErrorCode.BUSY, b"all chunk slots are busy", timeout=self.timeout)
            return
        try:
            try:
                data = await asyncio.to_thread(self.source.get, digest)
            except ChunkNotFoundError as exc:
                await write_frame(writer, ErrorCode.NOT_FOUND, str(exc).encode(), timeout=self.timeout)
                return
            except StoreError as exc:
                await write_frame(writer, ErrorCode.INTERNAL, str(exc).encode(), timeout=self.timeout)
                return
            await write_frame(writer, ErrorCode.OK, data, timeout=self.timeout)
            self.bytes_sent += len(data)
        finally:
            self._slots.release()


class ChunkStream:
    """A client's open stream to one peer's chunk server; use as an async context manager."""

    def __init__(
        self, p2p: P2P, peer_id: PeerID, *, timeout: float = DEFAULT_TIMEOUT, max_chunk_bytes: int = 64 << 20
    ):
        self.p2p = p2p
        self.peer_id = peer_id
        self.timeout = timeout
        self.max_chunk_bytes = max_chunk_bytes
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> ChunkStream:
        try:
            _, self._reader, self._writer = await asyncio.wait_for(
                self.p2p.call_binary_stream_handler(self.peer_id, HANDLER_NAME), self.timeout
            )
        except TimeoutError:
            raise RemoteTimeoutError(
                f"expected a stream to {self.peer_id} within {self.timeout:g} s"
            ) from None
        except Exception as exc:  # the daemon bindings raise plain exceptions for unreachable peers
            raise TransportError(
                f"expected a stream to {self.peer_id}, got {type(exc).__name__}: {exc}"
            ) from exc
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()

    def _io(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            raise RuntimeError("a ChunkStream must be opened with `async with` before use")
        return self._reader, self._writer

    async def _read_response(self) -> tuple[ErrorCode, bytes]:
        frame = await read_frame(self._io()[0], timeout=self.timeout, max_bytes=self.max_chunk_bytes)
        if frame is None:
            raise TransportError(f"expected a response from {self.peer_id}, got end of stream")
        kind, payload = frame
        try:
            return ErrorCode(kind), payload
        except ValueError:
            raise FramingError(f"expected a response status code, got {kind}") from None

    async def call_have(self, digests: Sequence[str]) -> list[bool]:
        """Which of `digests` the peer holds."""
        await write_frame(self._io()[1], RequestKind.HAVE, pack_digests(digests), timeout=self.timeout)
        code, payload = await self._read_response()
        if code is not ErrorCode.OK:
            raise RemoteError(code, payload.decode(errors="replace"))
        if len(payload) != len(digests) or set(payload) - {0, 1}:
            raise FramingError(f"expected {len(digests)} flags of 0 or 1, got {len(payload)} bytes")
        return [bool(flag) for flag in payload]

    async def request_get(self, digests: Sequence[str]) -> None:
        """Send a GET; read the answers with `read_chunk`, one per digest, in order."""
        await write_frame(self._io()[1], RequestKind.GET, pack_digests(digests), timeout=self.timeout)

    async def read_chunk(self) -> tuple[ErrorCode, bytes]:
        """The next GET answer: (OK, bytes) or (error code, message bytes). The bytes are not verified."""
        return await self._read_response()


@dataclasses.dataclass
class FetchReport:
    """What a fetch did: chunks and bytes per peer, peers dropped and why."""

    requested: int = 0
    already_held: int = 0
    fetched: int = 0
    bytes_by_peer: dict[str, int] = dataclasses.field(default_factory=dict)
    dropped_peers: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def bytes_received(self) -> int:
        return sum(self.bytes_by_peer.values())


class _FetchState:
    """Shared bookkeeping of one fetch: which chunks wait, which peer failed which chunk."""

    def __init__(self, digests: list[str]) -> None:
        self.pending: dict[str, None] = dict.fromkeys(digests)  # an ordered set
        self.failed: dict[str, set[str]] = {d: set() for d in digests}  # digest -> peers that failed it
        self.in_flight: set[str] = set()
        self.dead_peers: set[str] = set()
        self.changed = asyncio.Condition()

    def servable_by(self, peer: str) -> list[str]:
        return [d for d in self.pending if peer not in self.failed[d]]


async def fetch_chunks(
    p2p: P2P,
    digests: Sequence[str],
    peers: Sequence[PeerID],
    sink: ChunkSink,
    *,
    streams_per_peer: int = 2,
    batch: int = 4,
    timeout: float = DEFAULT_TIMEOUT,
    max_chunk_bytes: int = 64 << 20,
    max_busy_retries: int = 5,
) -> FetchReport:
    """Fetch every chunk of `digests` the sink lacks from `peers` in parallel, verified, into `sink`.

    Raises FetchError (with `.missing`) if some chunks could not be had from any peer; the chunks
    that did arrive stay in the sink, so calling again resumes.
    """
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"expected a batch of 1..{MAX_BATCH} chunks, got {batch}")
    wanted = list(dict.fromkeys(check_digest(d) for d in digests))
    todo = sink.missing(wanted)
    report = FetchReport(requested=len(wanted), already_held=len(wanted) - len(todo))
    if not todo:
        return report
    if not peers:
        raise FetchError(
            f"expected at least one peer to fetch {len(todo)} chunks from, got none", tuple(todo)
        )
    state = _FetchState(todo)
    names = [str(p) for p in peers]

    async def worker(peer_id: PeerID) -> None:
        peer = str(peer_id)
        busy = 0
        while True:
            async with state.changed:
                while True:
                    if peer in state.dead_peers:
                        return
                    choice = state.servable_by(peer)[:batch]
                    if choice:
                        break
                    if not state.in_flight and not state.servable_by(peer):
                        state.changed.notify_all()
                        return
                    await state.changed.wait()
                for digest in choice:
                    del state.pending[digest]
                    state.in_flight.add(digest)
            outcome = await _fetch_batch(p2p, peer_id, choice, sink, timeout, max_chunk_bytes, state, report)
            if outcome == "busy":
                busy += 1
                if busy > max_busy_retries:
                    _drop_peer(state, report, peer, f"busy more than {max_busy_retries} times")
                await asyncio.sleep(0.05 * busy)
            async with state.changed:
                state.changed.notify_all()

    workers = [asyncio.create_task(worker(p)) for p in peers for _ in range(streams_per_peer)]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
    missing = tuple(d for d in todo if d in state.pending)
    if missing:
        raise FetchError(
            f"expected all {len(todo)} chunks from {len(names)} peers, got {len(todo) - len(missing)}; "
            f"peers dropped: {report.dropped_peers or 'none'}",
            missing,
            report.bytes_received,
        )
    return report


def _drop_peer(state: _FetchState, report: FetchReport, peer: str, reason: str) -> None:
    state.dead_peers.add(peer)
    report.dropped_peers.setdefault(peer, reason)


async def _fetch_batch(
    p2p: P2P,
    peer_id: PeerID,
    digests: list[str],
    sink: ChunkSink,
    timeout: float,
    max_chunk_bytes: int,
    state: _FetchState,
    report: FetchReport,
) -> str:
    """Fetch one batch from one peer; every digest ends done, or back in `pending` marked as failed."""
    peer = str(peer_id)
    remaining = list(digests)
    outcome = "ok"

    def give_back(digest: str, *, failed: bool) -> None:
        state.in_flight.discard(digest)
        state.pending[digest] = None
        if failed:
            state.failed[digest].add(peer)

    try:
        async with ChunkStream(p2p, peer_id, timeout=timeout, max_chunk_bytes=max_chunk_bytes) as stream:
            await stream.request_get(remaining)
            while remaining:
                digest = remaining[0]
                code, payload = await stream.read_chunk()
                remaining.pop(0)
                if code is ErrorCode.BUSY:
                    give_back(digest, failed=False)
                    outcome = "busy"
                    continue
                if code is not ErrorCode.OK:
                    give_back(digest, failed=True)
                    continue
                try:
                    await asyncio.to_thread(sink.put, payload, digest)
                except ChunkHashMismatchError as exc:
                    give_back(digest, failed=True)
                    _drop_peer(state, report, peer, f"served a corrupt chunk: {exc}")
                    break
                state.in_flight.discard(digest)
                report.fetched += 1
                report.bytes_by_peer[peer] = report.bytes_by_peer.get(peer, 0) + len(payload)
    except (TransportError, ConnectionError, OSError) as exc:
        _drop_peer(state, report, peer, f"{type(exc).__name__}: {exc}")
    for digest in remaining:
        give_back(digest, failed=peer in state.dead_peers)
    return outcome
