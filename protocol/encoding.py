"""Canonical msgpack: one byte string per value, so signatures and hashes are reproducible.

Rules (every encoder and decoder in the network applies them):

- allowed types: None, bool, int in [-2**63, 2**64 - 1], finite float (always float64), str (UTF-8),
  bytes (msgpack bin), list (tuples become lists), map with str keys;
- map keys are sorted by their UTF-8 bytes; no duplicate keys; nesting depth at most `MAX_DEPTH`;
- ints use the shortest msgpack form (msgpack-python's packer does this), floats never float32;
- no ext types, no trailing bytes.

`unpack` decodes and then re-encodes: input that is valid msgpack but not in this one canonical form
is rejected, so a message has exactly one accepted byte string.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import msgpack

from protocol.errors import MalformedError, OversizeError

MAX_DEPTH = 16
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """Hex sha256 of `data`: the content address of chunks and messages."""
    return hashlib.sha256(data).hexdigest()


def canonicalize(value: Any, _depth: int = 0) -> Any:
    """Return `value` with tuples as lists and maps sorted by key; raise MalformedError on other types."""
    if _depth > MAX_DEPTH:
        raise MalformedError(f"expected nesting depth at most {MAX_DEPTH}, got deeper")
    kind = type(value)
    if value is None or kind is bool or kind is str or kind is bytes:
        return value
    if kind is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise MalformedError(f"expected an int in the 64-bit range, got {value}")
        return value
    if kind is float:
        if not math.isfinite(value):
            raise MalformedError(f"expected a finite float, got {value}")
        return value
    if kind is list or kind is tuple:
        return [canonicalize(item, _depth + 1) for item in value]
    if kind is dict:
        for key in value:
            if type(key) is not str:
                raise MalformedError(f"expected str map keys, got {type(key).__name__}")
        return {key: canonicalize(value[key], _depth + 1) for key in sorted(value)}
    raise MalformedError(f"expected a msgpack-canonical type, got {kind.__name__}")


def pack(value: Any) -> bytes:
    """Canonical msgpack bytes of `value`."""
    return msgpack.packb(canonicalize(value), use_bin_type=True, strict_types=True, use_single_float=False)


def _reject_ext(code: int, data: bytes) -> Any:
    raise MalformedError(f"expected no msgpack ext types, got ext type {code}")


def unpack(data: bytes, *, max_size: int) -> Any:
    """Decode canonical msgpack of at most `max_size` bytes; raise a ProtocolError otherwise."""
    if type(data) is not bytes:
        raise MalformedError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise OversizeError(f"expected at most {max_size} bytes, got {len(data)}")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_reject_ext,
        )
    except MalformedError:
        raise
    except Exception as exc:  # msgpack signals bad input with many exception types
        detail = f"{type(exc).__name__}: {str(exc)[:200]}" if str(exc) else type(exc).__name__
        raise MalformedError(f"expected valid msgpack, got {detail}") from None
    if pack(value) != data:
        raise MalformedError(
            "expected canonical msgpack (sorted keys, shortest ints, float64), got other bytes"
        )
    return value
