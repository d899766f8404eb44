"""Hugging Face model folders: lazy tensor reads in, sharded safetensors out.

Reading validates every `*.safetensors` shard's header with `safe_open`, maps each shard private
and writable, and gives operators views of a tensor's rows in the map: no copy (a copy into fresh
buffers cost more CPU time than some whole merges). Mapped pages count toward the process's
resident memory until dropped, so each block's pages are dropped once it is used (`releaser`): the
resident memory stays at the blocks in use while the file stays in the page cache. Writing
streams row blocks straight into shard files whose safetensors header is written first (every
output shape and dtype is known before merging), so an output tensor never has to be whole in
memory.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from merging.atomic import start_writeback
from merging.blocks import Reader, Releaser, matrix_shape
from merging.dtypes import DTYPE_NAMES, NAMES_BY_CODE, safetensors_header
from merging.errors import MergeError, MissingTensorError, ShapeMismatchError
from merging.layout import TensorInfo

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 1000**3
WRITEBACK_BYTES = 64 << 20  # start writing output back to disk after this many new bytes


def _read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(first data byte, tensor entries) of a safetensors file."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        entries = json.loads(handle.read(length))
    entries.pop("__metadata__", None)
    return 8 + length, entries


def _map_file(path: Path) -> mmap.mmap | None:
    """The whole file mapped private and writable (copy on write), or None if it is empty."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return None
        return mmap.mmap(handle.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def _row_layout(info: TensorInfo) -> tuple[torch.dtype, int, int]:
    """(dtype, width, bytes per row) of a stored tensor's `[rows, width]` view."""
    dtype = getattr(torch, info.dtype)
    width = matrix_shape(info.shape)[1]
    return dtype, width, width * torch.empty((), dtype=dtype).element_size()


class ModelFolder:
    """A local Hugging Face model folder opened for lazy reads (use as a context manager).

    Shards are memory-mapped: tensors are read in place from the page cache, without a copy. Their
    headers and sizes are checked when the folder opens; a shard truncated by another process while
    it is open ends this one with SIGBUS, not with a wrong merge.
    """

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        if not path.is_dir():
            raise MergeError(f"model {name!r} is not a local folder ({str(path)!r} does not exist)")
        config_path = path / "config.json"
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MergeError(f"model {name!r} has no config.json in {str(path)!r}") from None
        except (OSError, ValueError) as exc:
            raise MergeError(f"cannot read config.json of model {name!r}: {exc}") from None
        self.shards = self._shard_files()
        self._maps: dict[Path, mmap.mmap | None] = {}  # None: an empty file
        self.tensors: dict[str, TensorInfo] = {}
        self._location: dict[str, tuple[Path, int]] = {}  # tensor -> (shard, absolute byte offset)
        for shard in self.shards:
            try:
                with safe_open(str(shard), framework="pt"):
                    pass  # validates the header: offsets, dtypes, shapes
            except Exception as exc:  # safetensors raises its own error types for bad headers
                raise MergeError(f"cannot open {shard.name} of model {name!r}: {exc}") from None
            data_start, entries = _read_header(shard)
            for key, entry in entries.items():
                dtype = NAMES_BY_CODE.get(entry["dtype"])
                if dtype is None:
                    raise MergeError(
                        f"tensor {key!r} of model {name!r} has unsupported dtype {entry['dtype']}"
                    )
                self.tensors[key] = TensorInfo(tuple(entry["shape"]), dtype)
                self._location[key] = (shard, data_start + entry["data_offsets"][0])
            self._maps[shard] = _map_file(shard)

    def _shard_files(self) -> list[Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise MergeError(f"cannot read {INDEX_FILE} of model {self.name!r}: {exc}") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.path / f).is_file()]
            if missing:
                raise MissingTensorError(
                    f"model {self.name!r} lacks the shard {missing[0]!r} its index lists"
                )
            return [self.path / f for f in files]
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise MissingTensorError(f"model {self.name!r} has no *.safetensors file in {str(self.path)!r}")
        return shards

    def input_files(self) -> list[Path]:
        """Every file the merge reads from this folder (for the provenance record)."""
        files = [self.path / "config.json", *self.shards]
        if (self.path / INDEX_FILE).is_file():
            files.append(self.path / INDEX_FILE)
        return sorted(files)

    def reader(self, tensor: str) -> Reader:
        """Rows `[start, end)` of a tensor's `[rows, width]` view: a view of the mapped file, no copy.

        The map is private and writable, so writing into a view changes a private copy of the
        page, never the file.
        """
        info = self.tensors[tensor]
        shard, offset = self._location[tensor]
        mapped, dtype, width, row_bytes = self._maps[shard], *_row_layout(info)

        def read(start: int, end: int) -> torch.Tensor:
            if len(info.shape) <= 1:
                start, end = 0, 1
            size = (end - start) * row_bytes
            if not size:
                return torch.empty(0, dtype=dtype).reshape(end - start, width)
            first = offset + start * row_bytes
            if mapped is None or first + size > len(mapped):
                raise MergeError(
                    f"shard {shard.name} of model {self.name!r} is truncated at tensor {tensor!r}"
                )
            data = torch.frombuffer(mapped, dtype=torch.uint8, count=size, offset=first)
            return data.view(dtype).reshape(end - start, width)

        return read

    def releaser(self, tensor: str) -> Releaser:
        """Drop the mapped pages of a tensor's rows `[start, end)` (whole pages around them).

        Only page-table entries go: the file's pages stay in the page cache, and reading a dropped
        page maps it again with the file's bytes (a view of it stays valid).
        """
        info = self.tensors[tensor]
        shard, offset = self._location[tensor]
        mapped, row_bytes = self._maps[shard], _row_layout(info)[2]

        def release(start: int, end: int) -> None:
            if mapped is None or len(info.shape) <= 1:
                return
            first = (offset + start * row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
            last = min(len(mapped), offset + end * row_bytes)
            if last > first:
                mapped.madvise(mmap.MADV_DONTNEED, first, last - first)

        return release

    def close(self) -> None:
        """Forget the maps; each is unmapped once no tensor read from it is left."""
        self._maps.clear()

    def __enter__(self) -> ModelFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_architectures(folders: Sequence[ModelFolder]) -> None:
    """Inputs must declare the same architecture and model type in config.json."""
    reference = folders[0]
    for key in ("architectures", "model_type"):
        for folder in folders[1:]:
            if folder.config.get(key) != reference.config.get(key):
                raise ShapeMismatchError(
                    f"model {folder.name!r} has {key} {folder.config.get(key)!r}, expected "
                    f"{reference.config.get(key)!r} as in model {reference.name!r}"
                )


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def assign_shards(tensors: Sequence[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _header(tensors: Sequence[OutputTensor]) -> bytes:
    layout = [(t.name, DTYPE_NAMES[t.dtype], t.shape, t.nbytes) for t in tensors]
    return safetensors_header(layout)[0]


class ShardWriter:
    """Writes tensors, in the order given at construction, into sharded safetensors files in `folder`."""

    def __init__(self, folder: Path, tensors: Sequence[OutputTensor], max_shard_bytes: int) -> None:
        self.folder = folder
        self.shards = assign_shards(tensors, max_shard_bytes)
        self.files = shard_names(len(self.shards))
        self._queue = [(shard_no, t) for shard_no, shard in enumerate(self.shards) for t in shard]
        self._position = 0
        self._written = 0  # bytes of the current tensor so far
        self._shard_no = -1
        self._file = None
        self._unsynced = 0  # bytes written since writeback was last started

    def write(self, name: str, rows: torch.Tensor) -> None:
        """Append the next block of rows of tensor `name` (blocks arrive in order)."""
        shard_no, tensor = self._queue[self._position]
        if tensor.name != name or rows.dtype != tensor.dtype:
            raise RuntimeError(f"expected rows of {tensor.name} ({tensor.dtype}), got {name} ({rows.dtype})")
        if shard_no != self._shard_no:
            self._open(shard_no)
        data = rows.contiguous().view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._written += data.nbytes
        self._unsynced += data.nbytes
        if self._unsynced >= WRITEBACK_BYTES:  # write back as we go: the closing fsync has little left
            self._file.flush()
            start_writeback(self._file.fileno(), 0, 0)  # 0, 0: the whole file so far
            self._unsynced = 0
        if self._written == tensor.nbytes:
            self._position += 1
            self._written = 0

    def _open(self, shard_no: int) -> None:
        self._close_file()
        self._shard_no = shard_no
        self._file = open(self.folder / self.files[shard_no], "wb")  # noqa: SIM115 - closed in _close_file
        self._file.write(_header(self.shards[shard_no]))

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def finish(self) -> None:
        """Close the last shard and write the index when there are several shards."""
        if self._position != len(self._queue):
            raise RuntimeError(f"only {self._position} of {len(self._queue)} tensors were written")
        self._close_file()
        if len(self.shards) > 1:
            weight_map = {t.name: self.files[n] for n, shard in enumerate(self.shards) for t in shard}
            total = sum(t.nbytes for shard in self.shards for t in shard)
            write_json(
                self.folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map}
            )

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_json(path: Path, data: Any) -> None:
    """Write JSON and fsync it (inside a temp folder that is renamed later)."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
