"""Crash-safe file writes: a temp file beside the target, fsync, rename, fsync the folder.

A crash at any moment leaves the old file or the new one, never a half. Every part of umm that
writes a file (merged folders, the test-bed zoo, the node's store and records) goes through here.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

_SYNC_FILE_RANGE_WRITE = 2


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _writeback_starter() -> Callable[[int, int, int], object]:
    """Linux's `sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)`, or a no-op elsewhere."""
    function = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if function is None:
        return lambda fd, offset, length: None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd, offset, length: function(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


start_writeback = _writeback_starter()
start_writeback.__doc__ = """Start writing a range of an open file to disk now, without waiting for it.

A later fsync then waits only for what is still in flight: large outputs are written back while the
work that produces them goes on. It promises nothing about durability; only fsync does."""


def write_atomic(
    path: str | Path,
    data: bytes | memoryview,
    *,
    temp_dir: Path | None = None,
    temp_prefix: str | None = None,
) -> Path:
    """Write `data` to `path` through a temp file (in `temp_dir`, default the target's folder).

    The temp file is created with mode 0600 and keeps it, so key files need nothing more.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=temp_dir or path.parent, prefix=temp_prefix or f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as tmp_file:
            tmp_file.write(data)
            tmp_file.flush()
            os.fsync(tmp_file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`write_atomic` for UTF-8 text."""
    return write_atomic(path, text.encode("utf-8"))
