"""sha256 of input files for provenance records, remembered across merges.

Hashing is the largest fixed cost of a merge (about 1 to 2 GB/s on one core, every input byte),
and nodes merge the same local experts again and again. A file's digest is reused when its
identity and change stamps all match the remembered ones: device, inode, size, modification and
status-change times in nanoseconds (the status-change time cannot be set by a user, and any
rewrite or rename changes it or the inode), as git's index does. The record lives in
`$UMM_CACHE_DIR/file-sha256.json` (default `$XDG_CACHE_HOME/umm`, else `~/.cache/umm`) and is
written atomically; a missing, unreadable or unwritable record only means hashing again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from merging.atomic import write_atomic

RECORD_NAME = "file-sha256.json"
WINDOW_BYTES = 64 << 20  # a multiple of every page size
HASH_THREADS = min(2, os.cpu_count() or 1)
_lock = threading.Lock()


def cache_dir() -> Path:
    """Where the digest record lives."""
    if os.environ.get("UMM_CACHE_DIR"):
        return Path(os.environ["UMM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "umm"


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in full.

    The bytes are hashed straight from the page cache through mapped windows of `WINDOW_BYTES`
    (about an eighth less CPU than copying them into a read buffer; the window bounds memory).
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        for offset in range(0, size, WINDOW_BYTES):
            length = min(WINDOW_BYTES, size - offset)
            with mmap.mmap(handle.fileno(), length, offset=offset, access=mmap.ACCESS_READ) as window:
                digest.update(window)
    return digest.hexdigest()


def _stamp(path: Path) -> list[int]:
    status = os.stat(path)
    return [status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns]


def _load(record: Path) -> dict:
    try:
        entries = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def file_digests(paths: list[Path]) -> list[str]:
    """sha256 of each file, reusing remembered digests of unchanged files.

    Files not remembered are hashed `HASH_THREADS` at a time (hashlib releases the GIL).
    """
    record = cache_dir() / RECORD_NAME
    with _lock:
        entries = _load(record)
    digests: list[str | None] = []
    missing: list[tuple[int, str, list[int]]] = []  # (position, record key, stamp before hashing)
    for position, path in enumerate(paths):
        key = str(Path(path).resolve())
        stamp = _stamp(path)
        entry = entries.get(key)
        remembered = isinstance(entry, dict) and entry.get("stamp") == stamp
        digests.append(entry["sha256"] if remembered and isinstance(entry.get("sha256"), str) else None)
        if digests[-1] is None:
            missing.append((position, key, stamp))
    with ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="umm-hash") as pool:
        computed = list(pool.map(lambda item: sha256_file(paths[item[0]]), missing))
    changed = False
    for (position, key, stamp), digest in zip(missing, computed, strict=True):
        digests[position] = digest
        if _stamp(paths[position]) == stamp:  # unchanged while it was read
            entries[key] = {"stamp": stamp, "sha256": digest}
            changed = True
    if changed:
        with _lock:
            merged = {k: v for k, v in {**_load(record), **entries}.items() if os.path.exists(k)}
            with contextlib.suppress(OSError):  # a read-only home: digests right, only not remembered
                write_atomic(record, json.dumps(merged, sort_keys=True).encode())
    return digests
