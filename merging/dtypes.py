"""The one dtype table (name, torch dtype, safetensors code) and the one safetensors header writer.

Every layer reads dtypes from here: the merge engine's folders (merging.folders), the protocol's
tensor entries (protocol.codecs) and the node's assembled files (node.assemble, node.partial).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence

import torch

# name: (torch dtype, safetensors code)
DTYPE_TABLE: dict[str, tuple[torch.dtype, str]] = {
    "float64": (torch.float64, "F64"),
    "float32": (torch.float32, "F32"),
    "float16": (torch.float16, "F16"),
    "bfloat16": (torch.bfloat16, "BF16"),
    "int64": (torch.int64, "I64"),
    "int32": (torch.int32, "I32"),
    "int16": (torch.int16, "I16"),
    "int8": (torch.int8, "I8"),
    "uint8": (torch.uint8, "U8"),
    "bool": (torch.bool, "BOOL"),
}
TORCH_DTYPES: dict[str, torch.dtype] = {name: dtype for name, (dtype, _) in DTYPE_TABLE.items()}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPES.items()}
SAFETENSORS_CODES: dict[str, str] = {name: code for name, (_, code) in DTYPE_TABLE.items()}
NAMES_BY_CODE: dict[str, str] = {code: name for name, code in SAFETENSORS_CODES.items()}


def safetensors_header(
    layout: Sequence[tuple[str, str, Sequence[int], int]], metadata: dict[str, str] | None = None
) -> tuple[bytes, int]:
    """A safetensors file's first bytes (length prefix + JSON header, padded to 8) for tensors laid
    out in order; `layout` lists (name, dtype name, shape, bytes). Returns the prefix and the bytes
    of tensor data that follow it."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape, size in layout:
        header[name] = {
            "dtype": SAFETENSORS_CODES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded, offset
