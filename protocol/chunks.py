"""Tensors as content-addressed chunks: encode into `TensorEntry` + chunks, decode with every check.

A tensor's encoded bytes are cut into pieces of the manifest's ``chunk_size`` (the last may be
shorter); each piece is addressed by its sha256. Decoding verifies each chunk's hash and size, the
reassembled length and digest, then decodes with the entry's codec (shape, dtype, NaN/Inf checks).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import torch

from protocol.codecs import DTYPE_NAMES, CodecChoice, CodecSpec, decode_tensor, encode_tensor
from protocol.encoding import sha256_hex
from protocol.errors import CodecError, HashMismatchError, OversizeError, TensorMismatchError
from protocol.messages import CHUNK_SIZE_LIMIT, DEFAULT_CHUNK_SIZE, TensorEntry

ChunkSource = Mapping[str, bytes] | Callable[[str], bytes]


def verify_chunk(address: str, data: bytes, *, max_size: int = CHUNK_SIZE_LIMIT) -> None:
    """Raise OversizeError or HashMismatchError unless `data` (<= `max_size` bytes) hashes to `address`."""
    if len(data) > max_size:
        raise OversizeError(f"expected a chunk of at most {max_size} bytes, got {len(data)}")
    actual = sha256_hex(data)
    if actual != address:
        raise HashMismatchError(f"expected chunk {address}, got bytes hashing to {actual}")


def check_chunk(address: str, data: bytes, *, max_size: int = CHUNK_SIZE_LIMIT) -> bool:
    """True when `data` is a valid chunk for `address` (the non-raising form of `verify_chunk`)."""
    return len(data) <= max_size and sha256_hex(data) == address


def encode_entry(
    name: str, tensor: torch.Tensor, spec: CodecSpec, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[TensorEntry, dict[str, bytes]]:
    """Encode one tensor: its entry and its chunks by address."""
    data = encode_tensor(tensor, spec)
    pieces = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    chunks = {sha256_hex(piece): piece for piece in pieces}
    entry = TensorEntry(
        name=name,
        shape=tuple(tensor.shape),
        dtype=DTYPE_NAMES[tensor.dtype],
        codec=spec,
        nbytes=len(data),
        digest=sha256_hex(data),
        chunks=tuple(sha256_hex(piece) for piece in pieces),
    )
    return entry, chunks


def encode_tensors(
    tensors: Mapping[str, torch.Tensor],
    codec: CodecChoice | CodecSpec,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[tuple[TensorEntry, ...], dict[str, bytes]]:
    """Encode every tensor (sorted by name) with `codec`: the entries and all chunks by address."""
    entries = []
    chunks: dict[str, bytes] = {}
    for name in sorted(tensors):
        tensor = tensors[name]
        spec = codec.spec_for(tuple(tensor.shape)) if isinstance(codec, CodecChoice) else codec
        entry, pieces = encode_entry(name, tensor, spec, chunk_size)
        entries.append(entry)
        chunks.update(pieces)
    return tuple(entries), chunks


def encode_deltas(
    base: Mapping[str, torch.Tensor],
    expert: Mapping[str, torch.Tensor],
    codec: CodecChoice,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    sink: Callable[[str, bytes], None] | None = None,
) -> tuple[tuple[TensorEntry, ...], dict[str, bytes]]:
    """Encode (expert - base) per tensor; entries keep the base tensor's dtype.

    An expert tensor may be in another float dtype than the base's (its values are taken as they
    are). The delta is computed in float32 for the lossy codecs; the lossless choice ``raw`` sends
    per tensor the narrowest of float32 / float64 whose `reconstruct` gives back the expert's
    float32 values exactly (`lossless_delta`). Tensors are read one at a time (`base` and `expert`
    may be lazy mappings); with `sink`, chunks go to `sink(digest, data)` as they are made and the
    returned chunk map stays empty, so no whole model is ever held.
    """
    if set(base) != set(expert):
        missing = sorted(set(base) ^ set(expert))[0]
        raise TensorMismatchError(
            f"expected the same tensor names in base and expert, got {missing!r} in one only"
        )
    entries = []
    chunks: dict[str, bytes] = {}
    for name in sorted(expert):
        base_tensor, expert_tensor = base[name], expert[name]
        check_delta_inputs(name, base_tensor, expert_tensor)
        if codec.name == "raw":
            delta, spec = lossless_delta(name, base_tensor, expert_tensor, codec.zstd)
        else:
            delta = expert_tensor.float() - base_tensor.float()
            spec = codec.spec_for(tuple(delta.shape))
        entry, pieces = encode_entry(name, delta, spec, chunk_size)
        entries.append(TensorEntry.from_dict({**entry.to_dict(), "dtype": DTYPE_NAMES[base_tensor.dtype]}))
        if sink is None:
            chunks.update(pieces)
        else:
            for digest, data in pieces.items():
                sink(digest, data)
    return tuple(entries), chunks


def check_delta_inputs(name: str, base: torch.Tensor, expert: torch.Tensor) -> None:
    """Raise TensorMismatchError unless `expert` has `base`'s shape and its dtype (or both are floats)."""
    same_dtype = base.dtype == expert.dtype or (base.is_floating_point() and expert.is_floating_point())
    if tuple(base.shape) != tuple(expert.shape) or not same_dtype:
        check_matches(name, tuple(base.shape), DTYPE_NAMES.get(base.dtype), expert)


def reconstruct(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The expert tensor a delta stands for: base + delta added in float64, rounded to float32.

    For a float32 delta this equals the float32 sum ``base.float() + delta`` bit for bit (a float64
    sum of two float32 values rounds to the same float32), so the float64 step only matters for
    ``fp64`` deltas, which it makes exact.
    """
    if delta.dtype == torch.float32:
        return base.float() + delta  # the same bits as the float64 sum rounded, at a third of the memory
    return (base.double() + delta.double()).float()


def lossless_delta(
    name: str, base: torch.Tensor, expert: torch.Tensor, zstd: bool
) -> tuple[torch.Tensor, CodecSpec]:
    """(delta, spec) with ``reconstruct(base, delta) == expert.float()``: float32 when that is
    exact, else float64 (exact unless an expert value is below 2**-29 of its base value for float32
    weights, 2**-45 for bfloat16, and not zero; CodecError then). Signed zeros count as equal."""
    target = expert.float()
    exact = expert.double() - base.double()
    for delta, codec in ((exact.float(), "fp32"), (exact, "fp64")):
        if torch.equal(reconstruct(base, delta), target):
            return delta, CodecSpec(name=codec, zstd=zstd, k=0, block_size=0)
    raise CodecError(
        f"expected {name}'s expert values to be reachable from the base's exactly in float64, "
        "got values more than 2**29 times smaller than their base values; use a lossy codec"
    )


def check_matches(name: str, shape: tuple[int, ...], dtype: str | None, tensor: torch.Tensor) -> None:
    """Raise TensorMismatchError unless `tensor` has `shape` and `dtype`."""
    if tuple(tensor.shape) != tuple(shape) or DTYPE_NAMES.get(tensor.dtype) != dtype:
        raise TensorMismatchError(
            f"expected {name} of shape {list(shape)} and dtype {dtype}, "
            f"got shape {list(tensor.shape)} and dtype {DTYPE_NAMES.get(tensor.dtype, tensor.dtype)}"
        )


def read_entry_bytes(entry: TensorEntry, source: ChunkSource, chunk_size: int) -> bytes:
    """The entry's encoded bytes from verified chunks (hash, size, total length and digest)."""
    get = source.__getitem__ if isinstance(source, Mapping) else source
    pieces = []
    for index, address in enumerate(entry.chunks):
        try:
            piece = get(address)
        except KeyError:
            raise HashMismatchError(f"expected chunk {address} of {entry.name}, got none") from None
        verify_chunk(address, piece, max_size=chunk_size)
        if index < len(entry.chunks) - 1 and len(piece) != chunk_size:
            raise TensorMismatchError(
                f"expected chunk {index} of {entry.name} to be {chunk_size} bytes, got {len(piece)}"
            )
        pieces.append(piece)
    data = b"".join(pieces)
    if len(data) != entry.nbytes:
        raise TensorMismatchError(f"expected {entry.nbytes} bytes for {entry.name}, got {len(data)}")
    if hashlib.sha256(data).hexdigest() != entry.digest:
        raise HashMismatchError(f"expected {entry.name} bytes to hash to {entry.digest}, got another hash")
    return data


def decode_entry(entry: TensorEntry, source: ChunkSource, chunk_size: int) -> torch.Tensor:
    """The decoded tensor of `entry` (float32 for delta codecs, the entry dtype for raw)."""
    data = read_entry_bytes(entry, source, chunk_size)
    return decode_tensor(data, entry.codec, entry.shape, entry.dtype)


def decode_tensors(
    entries: tuple[TensorEntry, ...], source: ChunkSource, chunk_size: int
) -> dict[str, torch.Tensor]:
    """Decode every entry from verified chunks."""
    return {entry.name: decode_entry(entry, source, chunk_size) for entry in entries}


def apply_delta(base: torch.Tensor, entry: TensorEntry, delta: torch.Tensor) -> torch.Tensor:
    """`reconstruct(base, delta)` (the expert's weights as the engine sees them); checks base vs entry."""
    check_matches(entry.name, entry.shape, entry.dtype, base)
    return reconstruct(base, delta)


def split_blob(
    data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[str, tuple[str, ...], dict[str, bytes]]:
    """Cut any bytes (e.g. a large signed envelope) into chunks: (sha256 of all, addresses, chunks).

    DHT values must stay small, so a node announces a large message by its id and chunk addresses
    and peers fetch the chunks; `join_blob` reassembles and checks them.
    """
    pieces = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    return sha256_hex(data), tuple(sha256_hex(p) for p in pieces), {sha256_hex(p): p for p in pieces}


def join_blob(digest: str, addresses: tuple[str, ...], source: ChunkSource, *, max_size: int) -> bytes:
    """The bytes `split_blob` cut, from verified chunks; OversizeError beyond `max_size` bytes."""
    get = source.__getitem__ if isinstance(source, Mapping) else source
    pieces, total = [], 0
    for address in addresses:
        try:
            piece = get(address)
        except KeyError:
            raise HashMismatchError(f"expected chunk {address}, got none") from None
        verify_chunk(address, piece)
        total += len(piece)
        if total > max_size:
            raise OversizeError(f"expected at most {max_size} bytes in all, got more")
        pieces.append(piece)
    data = b"".join(pieces)
    if sha256_hex(data) != digest:
        raise HashMismatchError(f"expected the chunks to join into {digest}, got other bytes")
    return data
