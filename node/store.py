"""A content-addressed chunk store on disk: SQLite index + one blob file per chunk.

Layout under `root`:
    index.sqlite            table `chunks(digest TEXT PRIMARY KEY, size INTEGER)`
    blobs/ab/abcdef...      the chunk's bytes, named by their sha256 (hex)
    tmp/                    partial writes, named after the writing process; a dead writer's are
                            removed on open (several processes may share one store)

A write goes: hash -> temp file -> fsync -> rename into blobs/ -> fsync the folder -> index row
(committed without waiting for the disk; see `_recover`). Writes may run on several threads.
A read verifies the sha256 again; a blob that no longer matches is removed and reported.
With a `quota`, a write that would take the indexed bytes (plus this process's writes in flight)
past it is refused with `StoreQuotaError` before any byte is written; the bytes of peers'
contributions, results and records all count, so whatever peers announce, the store stays under it.
A kill at any moment leaves either no trace of the chunk, a stray temp file (removed on the next
open), or a blob without an index row (verified and indexed on the next open); never a row that
points at wrong or partial bytes.
"""

from __future__ import annotations

import os
import re
import sqlite3
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from merging.atomic import write_atomic
from node.errors import ChunkHashMismatchError, ChunkNotFoundError, InvalidDigestError, StoreQuotaError
from protocol.encoding import sha256_hex

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


def check_digest(digest: str) -> str:
    """Return `digest` if it is 64 lowercase hex characters, else raise InvalidDigestError."""
    if not isinstance(digest, str) or _DIGEST_RE.fullmatch(digest) is None:
        raise InvalidDigestError(f"expected a sha256 digest of 64 lowercase hex characters, got {digest!r}")
    return digest


def verified_digest(data: bytes | bytearray | memoryview, digest: str | None = None) -> str:
    """The sha256 of `data`; ChunkHashMismatchError if `digest` is given and differs."""
    actual = sha256_hex(data)
    if digest is not None and check_digest(digest) != actual:
        raise ChunkHashMismatchError(f"expected bytes hashing to {digest}, got bytes hashing to {actual}")
    return actual


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ContentStore:
    """Chunks addressed by sha256, checked on write and on read; safe across threads and kills.

    `durable=False` (a download cache, e.g. a pull's) skips the fsyncs: a power cut may then leave
    a blob with wrong bytes under its row, which `get` detects, removes and reports. `quota`
    (bytes, None: none) bounds the stored bytes (see the module docstring).
    """

    def __init__(self, root: str | Path, *, durable: bool = True, quota: int | None = None) -> None:
        if quota is not None and quota <= 0:
            raise ValueError(f"expected a positive store quota in bytes, got {quota}")
        self.root = Path(root)
        self.durable = durable
        self.quota = quota
        self._in_flight = 0  # bytes this process is writing, reserved against the quota
        self._blobs = self.root / "blobs"
        self._tmp = self.root / "tmp"
        for folder in (self.root, self._blobs, self._tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.dropped: set[str] = set()  # digests `get` found corrupt or lost and removed (to refetch)
        self._db = sqlite3.connect(
            self.root / "index.sqlite", check_same_thread=False, isolation_level=None, timeout=60
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a WAL commit may be lost to a power cut, which leaves a blob without its row; the
        # blob was fsynced before its row was written, and `_recover` verifies and indexes it again.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS chunks (digest TEXT PRIMARY KEY, size INTEGER NOT NULL)")
        self._recover()

    # ------------------------------------------------------------------ paths and recovery
    def _blob_path(self, digest: str) -> Path:
        return self._blobs / digest[:2] / digest

    def _recover(self) -> None:
        """Bring index and blobs back in line after a crash (see the module docstring)."""
        for leftover in self._tmp.iterdir():
            writer = leftover.name.split(".", 1)[0]
            if not writer.isdigit() or not _pid_alive(int(writer)) or int(writer) == os.getpid():
                leftover.unlink(missing_ok=True)
        indexed = {row[0] for row in self._db.execute("SELECT digest FROM chunks")}
        on_disk: set[str] = set()
        for shard in self._blobs.iterdir():
            for blob in shard.iterdir():
                if _DIGEST_RE.fullmatch(blob.name) is None:
                    blob.unlink(missing_ok=True)
                    continue
                on_disk.add(blob.name)
                if blob.name not in indexed:
                    data = blob.read_bytes()
                    if sha256_hex(data) == blob.name:
                        self._db.execute("INSERT OR IGNORE INTO chunks VALUES (?, ?)", (blob.name, len(data)))
                    else:
                        blob.unlink(missing_ok=True)
        for digest in indexed - on_disk:
            self._db.execute("DELETE FROM chunks WHERE digest = ?", (digest,))

    # ------------------------------------------------------------------ writes
    def put(self, data: bytes | bytearray | memoryview, digest: str | None = None) -> str:
        """Store `data` and return its digest; if `digest` is given, the bytes must hash to it."""
        actual = verified_digest(data, digest)
        if self.has(actual):
            return actual
        self._reserve(len(data))
        try:
            final = self._blob_path(actual)
            final.parent.mkdir(exist_ok=True)
            prefix = f"{os.getpid()}.{actual[:16]}."
            if self.durable:
                write_atomic(final, data, temp_dir=self._tmp, temp_prefix=prefix)
            else:  # a cache: renamed whole, not flushed; `get` catches what a power cut may garble
                fd, temp = tempfile.mkstemp(dir=self._tmp, prefix=prefix)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(temp, final)
            with self._lock:
                self._db.execute("INSERT OR IGNORE INTO chunks VALUES (?, ?)", (actual, len(data)))
        finally:
            with self._lock:
                self._in_flight -= len(data)
        return actual

    def _reserve(self, size: int) -> None:
        """Count `size` bytes as in flight, or raise StoreQuotaError if they would pass the quota."""
        with self._lock:
            if self.quota is not None:
                used = self._indexed_bytes()
                if used + self._in_flight + size > self.quota:
                    raise StoreQuotaError(
                        f"expected the store at {self.root} to stay within its quota of {self.quota} bytes, "
                        f"got {used + self._in_flight} bytes stored and a chunk of {size} more "
                        "(raise --store-quota or lower --keep-rounds)"
                    )
            self._in_flight += size

    def delete(self, digest: str) -> None:
        """Remove a chunk (index row first, then the blob); absent chunks are ignored."""
        check_digest(digest)
        with self._lock:
            self._db.execute("DELETE FROM chunks WHERE digest = ?", (digest,))
        self._blob_path(digest).unlink(missing_ok=True)

    # ------------------------------------------------------------------ reads
    def has(self, digest: str) -> bool:
        """Whether the index lists `digest`."""
        check_digest(digest)
        with self._lock:
            row = self._db.execute("SELECT 1 FROM chunks WHERE digest = ?", (digest,)).fetchone()
        return row is not None

    def size(self, digest: str) -> int:
        """The stored chunk's length in bytes."""
        check_digest(digest)
        with self._lock:
            row = self._db.execute("SELECT size FROM chunks WHERE digest = ?", (digest,)).fetchone()
        if row is None:
            raise ChunkNotFoundError(f"expected chunk {digest} in the store, got no such chunk")
        return int(row[0])

    def get(self, digest: str) -> bytes:
        """The chunk's bytes, verified against `digest`; a corrupted blob is removed, reported, and
        its digest kept in `dropped` (node.scrub fetches it again)."""
        if not self.has(digest):
            raise ChunkNotFoundError(f"expected chunk {digest} in the store, got no such chunk")
        try:
            data = self._blob_path(digest).read_bytes()
        except FileNotFoundError:
            self.delete(digest)
            self.dropped.add(digest)
            raise ChunkNotFoundError(f"expected chunk {digest} on disk, got a missing blob file") from None
        actual = sha256_hex(data)
        if actual != digest:
            self.delete(digest)
            self.dropped.add(digest)
            raise ChunkHashMismatchError(f"expected stored chunk to hash to {digest}, got {actual}")
        return data

    def missing(self, digests: Iterable[str]) -> list[str]:
        """The digests of `digests` (in order, without repeats) that the store does not hold."""
        seen: set[str] = set()
        result = []
        for digest in digests:
            if digest not in seen and not self.has(digest):
                result.append(digest)
            seen.add(digest)
        return result

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            rows = self._db.execute("SELECT digest FROM chunks ORDER BY digest").fetchall()
        return iter(row[0] for row in rows)

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])

    def total_bytes(self) -> int:
        """The sum of the stored chunks' sizes."""
        with self._lock:
            return self._indexed_bytes()

    def _indexed_bytes(self) -> int:
        """The sum of the indexed chunks' sizes (the caller holds `_lock`)."""
        return int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM chunks").fetchone()[0])

    def close(self) -> None:
        """Close the index; the store must not be used afterwards."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> ContentStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
