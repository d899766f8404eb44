"""Delta codecs: a tensor's bytes on the wire, and back, with strict checks on decode.

A layer delta is (expert - base) per tensor. Codecs (all little-endian, optionally zstd-compressed):

- ``raw``: the tensor's exact bytes in its own dtype (base weights, merge results; lossless);
- ``bf16`` / ``fp16``: dense half precision;
- ``fp32`` / ``fp64``: dense single / double precision (what the lossless choice ``raw`` sends for a
  delta, see `protocol.chunks.encode_deltas`); ``fp64`` decodes to float64;
- ``topk``: the ``k`` largest-magnitude entries: their flat indices in increasing order as ``k``
  uint32 gaps (the first index, then each index minus the previous one, so >= 1; small numbers
  that zstd compresses well), then ``k`` bf16 values; ties broken by the lower index;
- ``int8``: blockwise absmax: one float32 scale per block of ``block_size`` flat entries
  (scale = absmax / 127), then one int8 in [-127, 127] per entry; value = q * scale;
- ``int4``: the same with scale = absmax / 7 and q in [-7, 7], two entries per byte stored as
  q + 8 (1..15), the first entry in the low nibble; an odd count leaves a zero high nibble.

Decoding returns float32 for the delta codecs (float64 for ``fp64``) and the entry's dtype for
``raw``; every length, index, range and finiteness rule is checked and violations raise `CodecError`,
`TensorMismatchError` or `NonFiniteValuesError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from merging.dtypes import TORCH_DTYPES
from protocol.errors import CodecError, NonFiniteValuesError, SchemaError, TensorMismatchError
from protocol.schema import Record, boolean, field, integer, text

DTYPES: dict[str, torch.dtype] = {
    name: t for name, t in TORCH_DTYPES.items() if name != "bool"
}  # on the wire
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16"})
CODEC_NAMES = ("raw", "bf16", "fp16", "fp32", "fp64", "topk", "int8", "int4")
_LEVELS = {"int8": 127, "int4": 7}
ZSTD_LEVEL = 3
MAX_BLOCK_SIZE = 1 << 16
DEFAULT_BLOCK_SIZE = 64
_DENSE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


@dataclass(frozen=True)
class CodecSpec(Record):
    """How one tensor is encoded: codec name, zstd on/off, ``k`` (topk only), ``block_size`` (int8/int4)."""

    name: str = field(text(8))
    zstd: bool = field(boolean)
    k: int = field(integer(0, 2**32 - 1))
    block_size: int = field(integer(0, MAX_BLOCK_SIZE))

    def _validate(self) -> None:
        if self.name not in CODEC_NAMES:
            raise SchemaError(f"expected codec name in {CODEC_NAMES}, got {self.name!r}")
        if (self.name == "topk") != (self.k > 0):
            raise SchemaError(f"expected k > 0 exactly for topk, got k={self.k} for {self.name}")
        if (self.name in _LEVELS) != (self.block_size > 0):
            raise SchemaError(
                f"expected block_size > 0 exactly for int8/int4, got {self.block_size} for {self.name}"
            )

    def __str__(self) -> str:
        extra = f":k={self.k}" if self.k else f":block={self.block_size}" if self.block_size else ""
        return f"{self.name}{extra}{'+zstd' if self.zstd else ''}"


def numel_of(shape: tuple[int, ...]) -> int:
    """Number of entries of a tensor of `shape`."""
    return math.prod(shape)


def raw_size(spec: CodecSpec, numel: int, dtype: str) -> int:
    """Bytes of the encoding before zstd, for `numel` entries of `dtype`."""
    if spec.name == "raw":
        return numel * DTYPES[dtype].itemsize
    if spec.name in _DENSE:
        return numel * _DENSE[spec.name].itemsize
    if spec.name == "topk":
        return spec.k * 6
    blocks = -(-numel // spec.block_size)
    return blocks * 4 + (numel if spec.name == "int8" else -(-numel // 2))


def check_compatible(spec: CodecSpec, shape: tuple[int, ...], dtype: str) -> None:
    """Raise SchemaError if `spec` cannot describe a tensor of `shape` and `dtype`."""
    if dtype not in DTYPES:
        raise SchemaError(f"expected dtype in {sorted(DTYPES)}, got {dtype!r}")
    if spec.name != "raw" and dtype not in FLOAT_DTYPES:
        raise SchemaError(f"expected a float dtype for codec {spec.name}, got {dtype}")
    numel = numel_of(shape)
    if spec.name == "topk" and (spec.k > numel or numel >= 2**32):
        raise SchemaError(f"expected topk k <= {numel} entries (< 2**32), got k={spec.k}")


def encode_tensor(tensor: torch.Tensor, spec: CodecSpec) -> bytes:
    """The wire bytes of `tensor` under `spec` (float tensors only, except for ``raw``)."""
    dtype = DTYPE_NAMES.get(tensor.dtype)
    if dtype is None:
        raise CodecError(f"expected a tensor dtype in {sorted(DTYPES)}, got {tensor.dtype}")
    check_compatible(spec, tuple(tensor.shape), dtype)
    if dtype in FLOAT_DTYPES and not bool(torch.isfinite(tensor).all()):
        raise NonFiniteValuesError("expected finite values to encode, got NaN or Inf")
    flat = tensor.detach().reshape(-1).contiguous()
    if spec.name == "raw":
        data = _to_bytes(flat)
    elif spec.name in _DENSE:
        half = flat.to(_DENSE[spec.name])
        if not bool(torch.isfinite(half).all()):
            raise CodecError(f"expected values within the {spec.name} range, got an overflow")
        data = _to_bytes(half)
    elif spec.name == "topk":
        data = _encode_topk(flat.float(), spec.k)
    else:
        data = _encode_blocks(flat.float(), spec.block_size, spec.name)
    if spec.zstd:
        data = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(data)
    return data


def decode_tensor(data: bytes, spec: CodecSpec, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    """The tensor encoded in `data`: float32 for delta codecs, `dtype` for ``raw``; checks every rule."""
    check_compatible(spec, shape, dtype)
    numel = numel_of(shape)
    expected = raw_size(spec, numel, dtype)
    if spec.zstd:
        data = _decompress(data, expected)
    if len(data) != expected:
        raise TensorMismatchError(
            f"expected {expected} encoded bytes for {spec} of shape {list(shape)}, got {len(data)}"
        )
    if spec.name == "raw":
        out = _from_bytes(data, DTYPES[dtype])
    elif spec.name in _DENSE:
        dense = _from_bytes(data, _DENSE[spec.name])
        out = dense if spec.name == "fp64" else dense.float()
    elif spec.name == "topk":
        out = _decode_topk(data, spec.k, numel)
    else:
        out = _decode_blocks(data, spec.block_size, numel, spec.name)
    if out.is_floating_point() and not bool(torch.isfinite(out).all()):
        raise NonFiniteValuesError(f"expected finite decoded values for {spec}, got NaN or Inf")
    return out.reshape(shape)


def _to_bytes(flat: torch.Tensor) -> bytes:
    return flat.contiguous().view(torch.uint8).numpy().tobytes()


def _from_bytes(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)


def _decompress(data: bytes, expected: int) -> bytes:
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        raise CodecError("expected a zstd frame, got bytes without a valid frame header") from None
    if declared < 0:
        raise CodecError("expected a zstd frame declaring its size, got one without a content size")
    if declared != expected:
        raise TensorMismatchError(f"expected a zstd frame of {expected} bytes, got one declaring {declared}")
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = decompressor.decompress(data)
    except zstandard.ZstdError as exc:
        raise CodecError(f"expected a valid zstd frame, got {exc}") from None
    if not decompressor.eof or decompressor.unused_data:
        raise CodecError("expected exactly one complete zstd frame, got a truncated frame or trailing bytes")
    return out


def _encode_topk(flat: torch.Tensor, k: int) -> bytes:
    magnitude = flat.abs()
    numel = magnitude.numel()
    threshold = float(np.partition(magnitude.numpy(), numel - k)[numel - k])  # the k-th largest magnitude
    above = torch.nonzero(magnitude > threshold).flatten()  # fewer than k, all kept
    at = torch.nonzero(magnitude == threshold).flatten()[: k - above.numel()]  # ties: lower index first
    indices = torch.sort(torch.cat([above, at])).values  # [k], increasing
    gaps = torch.diff(indices, prepend=torch.zeros(1, dtype=indices.dtype))
    return _to_bytes(gaps.to(torch.int32)) + _to_bytes(flat[indices].to(torch.bfloat16))


def _decode_topk(data: bytes, k: int, numel: int) -> torch.Tensor:
    gaps = _from_bytes(data[: 4 * k], torch.int32).to(torch.int64) & 0xFFFFFFFF  # uint32 on the wire
    values = _from_bytes(data[4 * k :], torch.bfloat16).float()
    if bool((gaps[1:] < 1).any()):
        raise CodecError("expected topk index gaps >= 1 (strictly increasing indices), got a zero gap")
    indices = torch.cumsum(gaps, dim=0)  # [k], fits int64: k * 2**32 < 2**63
    if int(indices[-1]) >= numel:
        raise CodecError(f"expected topk indices below {numel}, got {int(indices[-1])}")
    out = torch.zeros(numel, dtype=torch.float32)
    out[indices] = values
    return out


def _encode_blocks(flat: torch.Tensor, block_size: int, name: str) -> bytes:
    levels = _LEVELS[name]
    numel = flat.numel()
    blocks = -(-numel // block_size)
    padded = torch.zeros(blocks * block_size, dtype=torch.float32)
    padded[:numel] = flat
    grid = padded.view(blocks, block_size)  # [blocks, block_size]
    scales = grid.abs().amax(dim=1) / levels  # [blocks]
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(grid / safe[:, None]).clamp_(-levels, levels).to(torch.int8).reshape(-1)[:numel]
    if name == "int8":
        return _to_bytes(scales) + _to_bytes(q)
    nibbles = torch.zeros(numel + numel % 2, dtype=torch.uint8)
    nibbles[:numel] = (q + 8).to(torch.uint8)  # 1..15; a padding nibble stays 0
    return _to_bytes(scales) + _to_bytes(nibbles[0::2] | (nibbles[1::2] << 4))


def _decode_blocks(data: bytes, block_size: int, numel: int, name: str) -> torch.Tensor:
    levels = _LEVELS[name]
    blocks = -(-numel // block_size)
    scales = _from_bytes(data[: 4 * blocks], torch.float32)
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise NonFiniteValuesError(f"expected finite non-negative {name} block scales, got others")
    if name == "int8":
        q = _from_bytes(data[4 * blocks :], torch.int8)
    else:
        packed = _from_bytes(data[4 * blocks :], torch.uint8)
        nibbles = torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)  # [2 * bytes]
        if numel % 2 and int(nibbles[-1]) != 0:
            raise CodecError("expected a zero padding nibble after an odd count of int4 values, got another")
        q = nibbles[:numel].to(torch.int8) - 8
    if bool((q < -levels).any()) or bool((q > levels).any()):
        raise CodecError(f"expected {name} values in [-{levels}, {levels}], got others")
    padded = torch.zeros(blocks * block_size, dtype=torch.float32)
    padded[:numel] = q.float()
    return (padded.view(blocks, block_size) * scales[:, None]).reshape(-1)[:numel]


@dataclass(frozen=True)
class CodecChoice:
    """A codec as a user names it (``int8+zstd``, ``topk:0.05``, ``bf16``); `spec_for` picks per tensor.

    For ``topk`` the density applies to matrices; tensors with fewer than two dimensions (norms,
    biases) are sent dense in bf16, where a sparse index would cost more than it saves.
    """

    name: str
    zstd: bool = False
    density: float = 0.1
    block_size: int = 0

    def __post_init__(self) -> None:
        if self.name in _LEVELS and not self.block_size:
            object.__setattr__(self, "block_size", DEFAULT_BLOCK_SIZE)

    def spec_for(self, shape: tuple[int, ...]) -> CodecSpec:
        """The `CodecSpec` for one tensor of `shape`."""
        numel = numel_of(shape)
        if self.name == "topk":
            if len(shape) < 2 or numel == 0:
                return CodecSpec(name="bf16", zstd=self.zstd, k=0, block_size=0)
            k = max(1, math.ceil(self.density * numel))
            return CodecSpec(name="topk", zstd=self.zstd, k=min(k, numel), block_size=0)
        block = self.block_size if self.name in _LEVELS else 0
        return CodecSpec(name=self.name, zstd=self.zstd, k=0, block_size=block)

    def __str__(self) -> str:
        option = (
            f":{self.density}" if self.name == "topk" else f":{self.block_size}" if self.block_size else ""
        )
        return f"{self.name}{option}{'+zstd' if self.zstd else ''}"


def parse_codec(text_value: str) -> CodecChoice:
    """Parse ``NAME[:OPTION][+zstd]``: ``raw``, ``bf16``, ``fp16``, ``topk:DENSITY``, ``int8|int4:BLOCK``."""
    body, plus, suffix = text_value.strip().partition("+")
    if plus and suffix != "zstd":
        raise CodecError(f"expected '+zstd' as the only codec suffix, got {text_value!r}")
    name, colon, option = body.partition(":")
    if name not in CODEC_NAMES:
        raise CodecError(f"expected a codec in {CODEC_NAMES} (e.g. int8+zstd), got {text_value!r}")
    choice = CodecChoice(name=name, zstd=bool(plus))
    if not colon:
        return choice
    try:
        if name == "topk":
            density = float(option)
            if not 0.0 < density <= 1.0:
                raise ValueError
            return CodecChoice(name=name, zstd=bool(plus), density=density)
        if name in _LEVELS:
            block = int(option)
            if not 1 <= block <= MAX_BLOCK_SIZE:
                raise ValueError
            return CodecChoice(name=name, zstd=bool(plus), block_size=block)
    except ValueError:
        pass
    raise CodecError(
        f"expected topk:DENSITY in (0, 1] or int8/int4:BLOCK in [1, {MAX_BLOCK_SIZE}], got {text_value!r}"
    )
