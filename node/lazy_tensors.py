"""Tensors read one at a time: a model folder's, or a manifest's from the store.

`encode_deltas`, the shard merge and the offline reproduction take these as mappings and read each
tensor when they reach it, so none of them holds a whole model in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from protocol.chunks import decode_entry
from protocol.fingerprint import read_tensor_infos
from protocol.messages import TensorEntry


class FolderTensors(Mapping[str, torch.Tensor]):
    """A model folder's tensors (every ``*.safetensors`` file), each read when it is asked for."""

    def __init__(self, folder: str | Path) -> None:
        self._files = {name: info.file for name, info in read_tensor_infos(folder).items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(self._files[name], framework="pt") as handle:
            return handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._files))

    def __len__(self) -> int:
        return len(self._files)


class EntryTensors(Mapping[str, torch.Tensor]):
    """The decoded tensors of manifest entries, each decoded from verified chunks when asked for."""

    def __init__(self, entries: Sequence[TensorEntry], get: Callable[[str], bytes], chunk_size: int) -> None:
        self._entries = {entry.name: entry for entry in entries}
        self._get = get
        self._chunk_size = chunk_size

    def __getitem__(self, name: str) -> torch.Tensor:
        return decode_entry(self._entries[name], self._get, self._chunk_size)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc `malloc_trim`; a no-op elsewhere), so a
    node's resident memory drops after a merge instead of staying at its peak."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        return
