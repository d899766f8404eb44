"""Chunks by hash over hivemind's P2P (the bundled go-libp2p daemon): a server and a parallel fetcher.

Wire protocol on the stream handler `umm.chunks/1`, in frames of `node.framing`:
    request  kind 1 GET   payload: 1..MAX_BATCH raw 32-byte sha256 digests
             kind 2 HAVE  payload: 1..MAX_BATCH raw 32-byte sha256 digests
    response kind = an `ErrorCode`; GET: one frame per digest, in order, OK carrying the chunk's bytes
             (ELSEWHERE: held, but sent to another peer moments ago, node.first_copies);
             HAVE: one OK frame with one byte (0 or 1) per digest; errors carry a UTF-8 message.
A stream carries any number of requests; after a bad request the server answers, waits (bounded)
for the peer to close, and closes.

The fetcher (`fetch_chunks`, run by node.chunk_fetch, scheduled by node.fetch_schedule) pulls
different chunks from several peers at once (a few streams per peer, each pipelining batches of
chunks within a window sized by what the peer delivers), verifies every chunk's sha256 before it
reaches the sink, retries a chunk on another peer when a peer lacks it, dies, times out or serves
corrupt bytes (such a peer is dropped), asks a second holder for a chunk late at a slow one once
nothing else is left, and skips chunks the sink already holds — so an interrupted fetch resumes
where it stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Protocol

from hivemind.p2p import P2P, PeerID

from node.chunk_fetch import ChunkSink, fetch_over_streams
from node.errors import (
    ChunkNotFoundError,
    ErrorCode,
    FramingError,
    RemoteError,
    RemoteTimeoutError,
    StoreError,
    TransportError,
)
from node.fetch_schedule import FetchReport, PeerWindow, ScheduleRule
from node.first_copies import FirstCopies
from node.framing import FrameStream, read_frame, write_frame
from node.store import check_digest

logger = logging.getLogger(__name__)

HANDLER_NAME = "umm.chunks/1"
DIGEST_BYTES = 32
MAX_BATCH = 256
DEFAULT_TIMEOUT = 30.0
SEND_BUFFER_BYTES = 4 << 20  # Linux caps it at net.core.wmem_max
ELSEWHERE_MESSAGE = b"sent to another peer moments ago: ask the others, then ask again"
LINGER_SECONDS = 5.0  # how long a server waits for the peer to close after a final error reply


class RequestKind(enum.IntEnum):
    """Request frame kinds."""

    GET = 1
    HAVE = 2


class ChunkSource(Protocol):
    """What a server serves from (a `ContentStore` is one)."""

    def get(self, digest: str) -> bytes: ...


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


async def _await_peer_close(reader: asyncio.StreamReader, timeout: float) -> None:
    """Drop what the peer still sends until it closes its side, for at most `timeout` seconds.

    A server that closes first races its own reply: the daemon closes the libp2p stream both ways,
    its copy from the stream then fails and resets it, and a reset discards the reply the peer's
    daemon has not yet handed on.
    """
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(timeout):
            while await reader.read(1 << 16):
                pass


class ChunkServer:
    """Serves chunks of a `ChunkSource` to any peer, with at most `max_concurrent` chunk reads at once.

    Each stream reads up to `read_ahead` chunks beyond the one it is sending. A chunk sent to one
    peer moments ago is answered ELSEWHERE to another (`first_copies`, node.first_copies).
    """

    def __init__(
        self,
        source: ChunkSource,
        *,
        max_concurrent: int = 8,
        timeout: float = DEFAULT_TIMEOUT,
        busy_timeout: float = 10.0,
        read_ahead: int = 1,
        first_copies: FirstCopies | None = None,
    ) -> None:
        self.source = source
        self.first_copies = FirstCopies() if first_copies is None else first_copies
        self.read_ahead = read_ahead
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

    async def rpc_chunks(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer requests on one stream until the peer closes it or breaks the protocol."""
        peer = str(getattr(info, "peer_id", ""))  # a StreamInfo from the daemon
        sock = writer.get_extra_info("socket")
        if sock is not None:  # a socket buffer that takes a whole chunk spares the event loop a copy
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
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
                    await _await_peer_close(reader, min(self.timeout, LINGER_SECONDS))
                    return
                if request is RequestKind.HAVE:
                    await self._answer_have(writer, digests)
                else:
                    await self._answer_gets(writer, digests, peer)
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

    async def _answer_gets(self, writer: asyncio.StreamWriter, digests: list[str], peer: str) -> None:
        """Answer a GET in order, reading the next chunk from the source while the current one is
        sent; a chunk another peer was sent moments ago is answered ELSEWHERE."""
        loads = [asyncio.ensure_future(self._load(d)) for d in digests[: self.read_ahead + 1]]
        try:
            for index in range(len(digests)):
                code, data = await loads[index]
                loads[index] = None  # type: ignore[call-overload]  # let the bytes go once sent
                first = code is ErrorCode.OK and not self.first_copies.defer(digests[index], peer)
                if code is ErrorCode.OK and not first:
                    code, data = ErrorCode.ELSEWHERE, ELSEWHERE_MESSAGE
                if index + self.read_ahead + 1 < len(digests):
                    loads.append(asyncio.ensure_future(self._load(digests[index + self.read_ahead + 1])))
                try:
                    await self._send(writer, code, data)
                except BaseException:
                    if first:
                        self.first_copies.failed(digests[index], peer)
                    raise
                if first:
                    self.first_copies.sent(digests[index], peer)
        finally:
            for load in loads:
                if load is not None:
                    load.cancel()

    async def _send(self, writer: asyncio.StreamWriter, code: ErrorCode, data: bytes) -> None:
        await write_frame(writer, code, data, timeout=self.timeout)
        if code is ErrorCode.OK:
            self.bytes_sent += len(data)

    async def _load(self, digest: str) -> tuple[ErrorCode, bytes]:
        """One GET answer: (OK, the chunk) or an error code and message, with a read slot held meanwhile."""
        try:
            await asyncio.wait_for(self._slots.acquire(), self.busy_timeout)
        except TimeoutError:
            return ErrorCode.BUSY, b"all chunk slots are busy"
        try:
            return ErrorCode.OK, await asyncio.to_thread(self.source.get, digest)
        except ChunkNotFoundError as exc:
            return ErrorCode.NOT_FOUND, str(exc).encode()
        except StoreError as exc:
            return ErrorCode.INTERNAL, str(exc).encode()
        finally:
            self._slots.release()


class ChunkStream:
    """A client's open stream to one peer's chunk server; use as an async context manager.

    Responses are received through a `FrameStream` (each chunk lands in its own buffer in one copy);
    the server speaks only when asked, so nothing is left unread in the daemon stream's reader.
    """

    def __init__(
        self, p2p: P2P, peer_id: PeerID, *, timeout: float = DEFAULT_TIMEOUT, max_chunk_bytes: int = 64 << 20
    ):
        self.p2p = p2p
        self.peer_id = peer_id
        self.timeout = timeout
        self.max_chunk_bytes = max_chunk_bytes
        self._frames: FrameStream | None = None

    async def __aenter__(self) -> ChunkStream:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> ChunkStream:
        """Open the stream (a libp2p stream through the local daemon)."""
        try:
            _, _, writer = await asyncio.wait_for(
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
        self._frames = FrameStream.attach(writer)
        return self

    async def close(self) -> None:
        """Close the stream; the server sees a clean end of stream."""
        if self._frames is not None:
            frames, self._frames = self._frames, None
            frames.close()

    def _io(self) -> FrameStream:
        if self._frames is None:
            raise RuntimeError("a ChunkStream must be opened with `async with` before use")
        return self._frames

    async def _read_response(
        self, allocate: Callable[[int], bytearray] = bytearray
    ) -> tuple[ErrorCode, bytearray]:
        frame = await self._io().read_frame(
            timeout=self.timeout, max_bytes=self.max_chunk_bytes, allocate=allocate
        )
        if frame is None:
            raise TransportError(f"expected a response from {self.peer_id}, got end of stream")
        kind, payload = frame
        try:
            return ErrorCode(kind), payload
        except ValueError:
            raise FramingError(f"expected a response status code, got {kind}") from None

    async def call_have(self, digests: Sequence[str]) -> list[bool]:
        """Which of `digests` the peer holds."""
        await self._io().write_frame(RequestKind.HAVE, pack_digests(digests), timeout=self.timeout)
        code, payload = await self._read_response()
        if code is not ErrorCode.OK:
            raise RemoteError(code, payload.decode(errors="replace"))
        if len(payload) != len(digests) or set(payload) - {0, 1}:
            raise FramingError(f"expected {len(digests)} flags of 0 or 1, got {len(payload)} bytes")
        return [bool(flag) for flag in payload]

    async def request_get(self, digests: Sequence[str]) -> None:
        """Send a GET; read the answers with `read_chunk`, one per digest, in order."""
        await self._io().write_frame(RequestKind.GET, pack_digests(digests), timeout=self.timeout)

    async def read_chunk(
        self, allocate: Callable[[int], bytearray] = bytearray
    ) -> tuple[ErrorCode, bytearray]:
        """The next GET answer: (OK, bytes) or (error code, message bytes). The bytes are not verified."""
        return await self._read_response(allocate)


async def fetch_chunks(
    p2p: P2P,
    digests: Sequence[str],
    peers: Sequence[PeerID],
    sink: ChunkSink,
    *,
    streams_per_peer: int = 2,
    batch: int = 4,
    depth: int = 2,
    writers: int = 4,
    timeout: float = DEFAULT_TIMEOUT,
    max_chunk_bytes: int = 64 << 20,
    max_busy_retries: int = 5,
    rule: ScheduleRule | None = None,
    windows: dict[str, PeerWindow] | None = None,
    order_key: str = "",
) -> FetchReport:
    """Fetch every chunk of `digests` the sink lacks from `peers` in parallel, verified, into `sink`.

    Each of `streams_per_peer` streams per peer keeps up to `depth` requests of `batch` chunks in
    flight, within the peer's window (node.fetch_schedule: one batch at first, sized by what the
    peer delivers within the target time, at most `streams_per_peer * depth * batch` chunks);
    received chunks go to `sink.put` (which hashes and stores them) on `writers` threads while the
    streams go on receiving; `windows` carries each peer's window from fetch to fetch (`Fetcher`
    keeps one); `order_key` (this peer's id) gives the fetch its own chunk order. Raises
    FetchError (with `.missing`) if some chunks could not be had from any peer; the chunks that
    did arrive stay in the sink, so calling again resumes.
    """
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"expected a batch of 1..{MAX_BATCH} chunks, got {batch}")
    if depth < 1 or writers < 1 or streams_per_peer < 1:
        raise ValueError(
            f"expected depth, writers and streams_per_peer >= 1, got {depth}, {writers}, {streams_per_peer}"
        )

    async def open_stream(peer_id: PeerID) -> ChunkStream:
        return await ChunkStream(p2p, peer_id, timeout=timeout, max_chunk_bytes=max_chunk_bytes).open()

    return await fetch_over_streams(
        open_stream,
        digests,
        peers,
        sink,
        streams_per_peer=streams_per_peer,
        batch=batch,
        depth=depth,
        writers=writers,
        max_busy_retries=max_busy_retries,
        rule=rule,
        windows=windows,
        order_key=order_key,
    )
