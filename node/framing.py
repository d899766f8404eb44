"""Length-prefixed frames over a byte stream (a libp2p stream through hivemind's p2pd, or TCP).

A frame is a 5-byte header — kind (u8) and payload length (u32, big-endian) — then the payload.
Every read has a timeout and a size limit; a peer that sends an oversized, truncated or late frame
gets a FramingError / RemoteTimeoutError, never an unbounded buffer.

`read_frame` / `write_frame` work on asyncio streams. `FrameStream` is the receiving side for bulk
bytes: an `asyncio.BufferedProtocol` that has the kernel copy each payload straight into the
buffer it is returned in (a StreamReader copies every byte twice more), and reads from the socket
only while a frame is being read.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable

from node.errors import FramingError, RemoteTimeoutError

HEADER = struct.Struct(">BI")
WRITE_PIECE_BYTES = 1 << 20
DEFAULT_MAX_FRAME_BYTES = 64 << 20


async def read_frame(
    reader: asyncio.StreamReader, *, timeout: float, max_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> tuple[int, bytes] | None:
    """Read one frame; None at a clean end of stream (EOF before any header byte)."""
    try:
        header = await asyncio.wait_for(reader.readexactly(HEADER.size), timeout)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise FramingError(
            f"expected a {HEADER.size}-byte frame header, got {len(exc.partial)} bytes"
        ) from None
    except TimeoutError:
        raise RemoteTimeoutError(f"expected a frame header within {timeout:g} s, got none") from None
    kind, length = HEADER.unpack(header)
    if length > max_bytes:
        raise FramingError(f"expected a frame of at most {max_bytes} bytes, got a header announcing {length}")
    try:
        payload = await asyncio.wait_for(reader.readexactly(length), timeout)
    except asyncio.IncompleteReadError as exc:
        raise FramingError(f"expected a {length}-byte frame payload, got {len(exc.partial)} bytes") from None
    except TimeoutError:
        raise RemoteTimeoutError(f"expected a {length}-byte frame payload within {timeout:g} s") from None
    return kind, payload


async def write_frame(
    writer: asyncio.StreamWriter, kind: int, payload: bytes | memoryview, *, timeout: float
) -> None:
    """Write one frame in pieces of at most 1 MiB, waiting for the stream to drain between them."""
    view = memoryview(payload)
    try:
        writer.write(HEADER.pack(kind, len(view)))
        for start in range(0, len(view), WRITE_PIECE_BYTES):
            writer.write(view[start : start + WRITE_PIECE_BYTES])
            await asyncio.wait_for(writer.drain(), timeout)
        await asyncio.wait_for(writer.drain(), timeout)
    except TimeoutError:
        raise RemoteTimeoutError(
            f"expected the peer to accept {len(view)} bytes within {timeout:g} s"
        ) from None


class BufferPool:
    """Reusable payload buffers by size: fresh 1 MiB buffers cost page faults on every frame."""

    def __init__(self, max_buffers: int = 64) -> None:
        self.max_buffers = max_buffers
        self._free: dict[int, list[bytearray]] = {}
        self._count = 0

    def take(self, size: int) -> bytearray:
        """A buffer of exactly `size` bytes (old contents)."""
        free = self._free.get(size)
        if free:
            self._count -= 1
            return free.pop()
        return bytearray(size)

    def give(self, buffer: bytearray) -> None:
        """Return a buffer nobody uses any more."""
        if self._count < self.max_buffers:
            self._free.setdefault(len(buffer), []).append(buffer)
            self._count += 1


class FrameStream(asyncio.BufferedProtocol):
    """Frames over a transport, each payload received in place; see the module docstring.

    Attach to an open stream with `FrameStream.attach(writer)` (nothing may be buffered unread in
    its StreamReader: use it on a stream whose peer speaks only when asked), or pass the class as
    the protocol factory of `loop.create_connection`.
    """

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._owner: asyncio.StreamWriter | None = None
        self._target: memoryview | None = None
        self._filled = 0
        self._waiter: asyncio.Future[None] | None = None
        self._closed: BaseException | None = None  # why no more bytes will come
        self._writable = asyncio.Event()
        self._writable.set()

    @classmethod
    def attach(cls, writer: asyncio.StreamWriter) -> FrameStream:
        """Take over the transport of an open asyncio stream (its reader and writer are no longer used)."""
        stream = cls()
        stream._owner = writer  # a collected StreamWriter closes its transport
        transport = writer.transport
        transport.set_protocol(stream)
        stream.connection_made(transport)  # type: ignore[arg-type]
        return stream

    # ---------------------------------------------------------------- protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._transport.pause_reading()  # read only into a frame being read

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is None:  # not reachable while reading is paused between frames
            raise RuntimeError("FrameStream got bytes while no frame was being read")
        return self._target[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if self._target is not None and self._filled == len(self._target):
            self._target = None
            self._transport.pause_reading()  # type: ignore[union-attr]
            self._wake(None)

    def eof_received(self) -> bool:
        self._closed = self._closed or EOFError("end of stream")
        self._wake(self._closed)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = self._closed or exc or EOFError("end of stream")
        self._wake(self._closed)
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def _wake(self, exc: BaseException | None) -> None:
        if self._waiter is not None and not self._waiter.done():
            if exc is None:
                self._waiter.set_result(None)
            else:
                self._waiter.set_exception(exc)

    # ---------------------------------------------------------------- reading and writing
    async def _read_into(self, view: memoryview) -> int:
        """Fill `view` from the stream; the count of bytes received before an end of stream."""
        if not len(view):
            return 0
        self._target, self._filled = view, 0
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            if self._closed is not None:
                return 0
            self._transport.resume_reading()  # type: ignore[union-attr]
            with contextlib.suppress(EOFError, ConnectionError, OSError):
                await self._waiter
            return self._filled
        finally:
            if self._target is not None:  # cancelled, timed out or cut: stop reading into it
                self._target = None
                if not self._transport.is_closing():  # type: ignore[union-attr]
                    self._transport.pause_reading()  # type: ignore[union-attr]
            self._waiter = None

    async def read_frame(
        self,
        *,
        timeout: float,
        max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        allocate: Callable[[int], bytearray] = bytearray,
    ) -> tuple[int, bytearray] | None:
        """Read one frame, as `read_frame`, into a buffer of `allocate(length)` bytes (a `BufferPool`'s)."""
        header = bytearray(HEADER.size)
        try:
            async with asyncio.timeout(timeout):
                got = await self._read_into(memoryview(header))
        except TimeoutError:
            raise RemoteTimeoutError(f"expected a frame header within {timeout:g} s, got none") from None
        if got == 0:
            return None
        if got < HEADER.size:
            raise FramingError(f"expected a {HEADER.size}-byte frame header, got {got} bytes")
        kind, length = HEADER.unpack(header)
        if length > max_bytes:
            raise FramingError(
                f"expected a frame of at most {max_bytes} bytes, got a header announcing {length}"
            )
        payload = allocate(length)
        try:
            async with asyncio.timeout(timeout):
                got = await self._read_into(memoryview(payload))
        except TimeoutError:
            raise RemoteTimeoutError(f"expected a {length}-byte frame payload within {timeout:g} s") from None
        if got < length:
            raise FramingError(f"expected a {length}-byte frame payload, got {got} bytes")
        return kind, payload

    async def write_frame(self, kind: int, payload: bytes | memoryview, *, timeout: float) -> None:
        """Write one frame and wait until the transport takes more (as `write_frame`)."""
        if self._closed is not None or self._transport is None or self._transport.is_closing():
            raise ConnectionResetError("expected an open stream to write to, got a closed one")
        self._transport.write(HEADER.pack(kind, len(payload)))
        self._transport.write(payload)
        try:
            async with asyncio.timeout(timeout):
                await self._writable.wait()
        except TimeoutError:
            raise RemoteTimeoutError(
                f"expected the peer to accept {len(payload)} bytes within {timeout:g} s"
            ) from None

    def close(self) -> None:
        """Close the transport."""
        if self._transport is not None:
            self._transport.close()
