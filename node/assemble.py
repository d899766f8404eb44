"""Write a safetensors file straight from stored chunks, one chunk at a time.

A merge result's tensors use the ``raw`` codec: their encoded bytes are the tensor's bytes in
safetensors' layout (flat, little-endian). Each chunk is therefore written at its place in the
file as it is read from the store, with the checks `protocol.chunks.decode_entry` makes (chunk
sizes, total length, the entry's sha256, finite floats) — but without holding the decoded model
in memory, joining chunks, or hashing each chunk again (the store verifies every chunk it returns).
Entries in other codecs are decoded by the protocol and written whole.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from merging.dtypes import safetensors_header
from protocol.chunks import decode_entry
from protocol.codecs import DTYPE_NAMES, DTYPES, numel_of
from protocol.errors import HashMismatchError, NonFiniteValuesError, TensorMismatchError
from protocol.messages import TensorEntry

# A float is NaN or infinite exactly when all its exponent bits are set: (unsigned view, mask).
EXPONENT_MASKS = {
    "float64": (np.uint64, 0x7FF0000000000000),
    "float32": (np.uint32, 0x7F800000),
    "float16": (np.uint16, 0x7C00),
    "bfloat16": (np.uint16, 0x7F80),
}


def all_finite(data: bytes, unsigned: type[np.unsignedinteger], mask: int) -> bool:
    """Whether every float in `data` (little-endian, of the width of `unsigned`) is finite.

    Bit arithmetic on one thread: torch's `isfinite` spreads tiny tensors over busy cores.
    """
    bits = np.frombuffer(data, dtype=unsigned)
    return not bool(np.any((bits & unsigned(mask)) == unsigned(mask)))


NUMPY_FLOATS = {"float64": "<f8", "float32": "<f4", "float16": "<f2"}


def finite_checker(dtype: str) -> Callable[[bytes | bytearray | memoryview], bool] | None:
    """A test that every `dtype` value in a buffer is finite; None for integer dtypes.

    numpy's `isfinite` where numpy has the type (twice as fast as the bits), exponent bits for
    bfloat16; both on the calling thread.
    """
    if dtype in NUMPY_FLOATS:
        kind = np.dtype(NUMPY_FLOATS[dtype])
        return lambda data: bool(np.isfinite(np.frombuffer(data, dtype=kind)).all())
    if dtype in EXPONENT_MASKS:
        unsigned, mask = EXPONENT_MASKS[dtype]
        return lambda data: all_finite(data, unsigned, mask)
    return None


def streams_raw(entry: TensorEntry, chunk_size: int) -> bool:
    """Whether `entry`'s chunks are the tensor's own bytes, each a whole number of elements."""
    itemsize = DTYPES[entry.dtype].itemsize
    return entry.codec.name == "raw" and not entry.codec.zstd and chunk_size % itemsize == 0


def write_safetensors(
    entries: Sequence[TensorEntry],
    read_chunk: Callable[[str], bytes],
    chunk_size: int,
    path: str | Path,
    metadata: dict[str, str] | None = None,
) -> int:
    """Write the tensors of `entries` (sorted by name) to `path`; returns the bytes of tensor data.

    `read_chunk` must return a chunk's bytes verified against its address (`ContentStore.get`).
    Raises the protocol's errors on a chunk, length, digest or value that breaks a rule; `path`
    is then left partial (write it inside a temp folder, fsync and rename it).
    """
    ordered = sorted(entries, key=lambda e: e.name)
    decoded: dict[str, torch.Tensor] = {}
    layout: list[tuple[str, str, tuple[int, ...], int]] = []
    for entry in ordered:
        if streams_raw(entry, chunk_size):
            dtype, size = entry.dtype, numel_of(entry.shape) * DTYPES[entry.dtype].itemsize
        else:
            tensor = decode_entry(entry, read_chunk, chunk_size).contiguous()
            decoded[entry.name] = tensor
            dtype, size = DTYPE_NAMES[tensor.dtype], tensor.numel() * tensor.element_size()
        layout.append((entry.name, dtype, tuple(entry.shape), size))
    encoded, offset = safetensors_header(layout, metadata)
    with open(path, "wb") as handle:
        handle.write(encoded)
        for entry in ordered:
            if entry.name in decoded:
                handle.write(decoded.pop(entry.name).reshape(-1).view(torch.uint8).numpy().data)
            else:
                _copy_raw_entry(entry, read_chunk, chunk_size, handle.write)
    return offset


def _copy_raw_entry(
    entry: TensorEntry, read_chunk: Callable[[str], bytes], chunk_size: int, write: Callable
) -> None:
    expected = numel_of(entry.shape) * DTYPES[entry.dtype].itemsize
    if entry.nbytes != expected:
        raise TensorMismatchError(
            f"expected {expected} encoded bytes for raw {entry.name} of shape {list(entry.shape)}, "
            f"got an entry of {entry.nbytes}"
        )
    digest = hashlib.sha256()
    written = 0
    exponent = EXPONENT_MASKS.get(entry.dtype)
    for index, address in enumerate(entry.chunks):
        piece = read_chunk(address)
        last = index == len(entry.chunks) - 1
        if len(piece) > chunk_size or (not last and len(piece) != chunk_size):
            raise TensorMismatchError(
                f"expected chunk {index} of {entry.name} to be {chunk_size} bytes, got {len(piece)}"
            )
        if exponent is not None and not all_finite(piece, *exponent):
            raise NonFiniteValuesError(f"expected finite values in {entry.name}, got NaN or Inf")
        digest.update(piece)
        write(piece)
        written += len(piece)
    if written != entry.nbytes:
        raise TensorMismatchError(f"expected {entry.nbytes} bytes for {entry.name}, got {written}")
    if digest.hexdigest() != entry.digest:
        raise HashMismatchError(f"expected {entry.name} bytes to hash to {entry.digest}, got another hash")
