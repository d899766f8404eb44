"""Length-prefixed frames over a byte stream (a libp2p stream through hivemind's p2pd, or TCP).

A frame is a 5-byte header — kind (u8) and payload length (u32, big-endian) — then the payload.
Every read has a timeout and a size limit; a peer that sends an oversized, truncated or late frame
gets a FramingError / RemoteTimeoutError, never an unbounded buffer.
"""

from __future__ import annotations

import asyncio
import struct

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
