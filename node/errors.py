"""The node's error family: store, transport and DHT failures a user or a peer can cause."""

from __future__ import annotations

import enum

from merging.errors import UmmError


class NodeError(UmmError):
    """A node operation cannot be carried out."""


class StoreError(NodeError):
    """The content-addressed store refused or lost a chunk."""


class ChunkNotFoundError(StoreError):
    """A chunk with the requested digest is not in the store."""


class ChunkHashMismatchError(StoreError):
    """Bytes do not hash to the digest they were stored or requested under."""


class InvalidDigestError(StoreError):
    """A digest is not 64 lowercase hex characters (a sha256)."""


class StoreQuotaError(StoreError):
    """A chunk would take the store past its quota (`umm node start --store-quota`)."""


class TransportError(NodeError):
    """A remote call failed: the peer is gone, too slow, or answered outside the framing."""


class RemoteTimeoutError(TransportError):
    """A remote call did not finish within its timeout."""


class FramingError(TransportError):
    """A peer sent bytes that break the length-prefixed framing (size, type, or truncation)."""


class ErrorCode(enum.IntEnum):
    """Typed status codes a chunk server answers with, one byte on the wire."""

    OK = 0
    NOT_FOUND = 1
    BAD_REQUEST = 2
    BUSY = 3
    INTERNAL = 4
    ELSEWHERE = 5  # held, but just sent to another peer: ask the others first


class RemoteError(TransportError):
    """A peer answered a request with a non-OK status code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class DHTError(NodeError):
    """A DHT call failed or timed out."""


class FetchError(TransportError):
    """Some chunks could not be fetched from any of the given peers."""

    def __init__(
        self,
        message: str,
        missing: tuple[str, ...],
        bytes_received: int = 0,
        dropped: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing = missing
        self.bytes_received = bytes_received
        self.dropped = dict(dropped or {})  # peer id -> why the fetch dropped it
