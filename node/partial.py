"""A pulled model folder written in place as its chunks arrive: verified, resumable, atomic.

`PartialModel` is the sink a pull hands to `fetch_chunks`. Before the first chunk arrives it lays
out ``model.safetensors`` — the header, then every tensor at its final offset (a merge result's
entries use the raw codec: their chunks are the tensor's own bytes) — and knows where each chunk
goes. Each arriving chunk is hashed against its address, checked (its length at each place it
fills, finite floats) and written at each of its places with `os.pwrite`, on the fetch's writer
threads while the transfer goes on. Side files (config, tokenizer) are written whole.

Why the chunk hashes suffice (no tensor is hashed again): the entries come from a MergeResult
with a quorum of attestations, and an attestation signs the result's id, the sha256 of that exact
signed message (protocol.verify.check_quorum counts only attestations naming it). A node attests
a result only when its whole content, the chunk list of every tensor included, equals the result
of its own merge (`node.shard_worker.merge_content`), whose chunk digests it computed from its own
bytes. So attestation -> result id -> chunk list -> chunk hashes: every byte written has the
sha256 its attesters computed, in the place they computed it, and the tensor digests and the
fingerprint (over the same bytes) hold without reading the bytes again.

Work folder (`root`):
    model/      becomes the output folder (renamed into place by `finish`)
    received    journal: the raw 32-byte digest of each chunk written, appended after the write
    lock        an flock held while a pull writes here (a second pull into it is refused)

Resuming: the digests the journal names are checked again against the bytes at their places (a
power cut may have lost a write the journal kept); those that match count as received, the rest
are fetched again. `finish` fsyncs every file and the folder and renames the folder into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from merging.atomic import fsync_dir, start_writeback, write_atomic
from node.assemble import finite_checker, safetensors_header, streams_raw
from node.errors import StoreError
from node.store import check_digest, verified_digest
from protocol.codecs import DTYPES, numel_of
from protocol.encoding import sha256_hex
from protocol.errors import NonFiniteValuesError, TensorMismatchError
from protocol.messages import TensorEntry

MODEL_FILE = "model.safetensors"
DIGEST_BYTES = 32


class PullBusyError(StoreError):
    """Another pull holds the work folder."""


class UnexpectedChunkError(StoreError):
    """A chunk that belongs nowhere in the model, or a model that is not complete."""


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One tensor of the model file: its entry and the check its values must pass."""

    entry: TensorEntry
    finite: Callable[[bytes | bytearray | memoryview], bool] | None  # for floats


@dataclasses.dataclass(frozen=True)
class _Place:
    """Where a chunk's bytes go: chunk `index` of tensor `tensor`, or the side file `file`."""

    tensor: int = -1
    index: int = 0
    offset: int = 0
    length: int = 0
    file: str = ""


def _check_file_name(name: str) -> str:
    if not name or name in (".", "..", MODEL_FILE) or Path(name).name != name:
        raise TensorMismatchError(f"expected a plain side file name other than {MODEL_FILE}, got {name!r}")
    return name


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class PartialModel:
    """The sink of a streaming pull (see the module docstring); use as a context manager.

    `put` may run on several threads at once and keeps no reference to `data`. `progress(done,
    total)` (chunks) is called from those threads after each chunk is written.
    """

    def __init__(
        self,
        root: str | Path,
        entries: Sequence[TensorEntry],
        chunk_size: int,
        side_files: Mapping[str, str],
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.root = Path(root)
        self.folder = self.root / "model"
        self.progress = progress
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._fd = -1
        self._journal = -1
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise PullBusyError(
                f"expected no other pull writing {self.root}, got one holding its lock"
            ) from None
        try:
            self._layout(entries, chunk_size, side_files)
            self._resume()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ layout and resume
    def _layout(self, entries: Sequence[TensorEntry], chunk_size: int, side_files: Mapping[str, str]) -> None:
        ordered = sorted(entries, key=lambda e: e.name)
        names = [entry.name for entry in ordered]
        if len(set(names)) != len(names):
            twice = sorted({name for name in names if names.count(name) > 1})
            raise TensorMismatchError(f"expected each tensor name once, got {twice} more than once")
        layout = []
        for entry in ordered:
            if not streams_raw(entry, chunk_size):
                raise TensorMismatchError(
                    f"expected raw entries in chunks of whole elements for {entry.name}, got codec "
                    f"{entry.codec.name} with chunks of {chunk_size} bytes"
                )
            size = numel_of(entry.shape) * DTYPES[entry.dtype].itemsize
            if entry.nbytes != size or len(entry.chunks) != math.ceil(size / chunk_size):
                raise TensorMismatchError(
                    f"expected {size} bytes in {math.ceil(size / chunk_size)} chunks for raw {entry.name} "
                    f"of shape {list(entry.shape)}, got {entry.nbytes} bytes in {len(entry.chunks)} chunks"
                )
            layout.append((entry.name, entry.dtype, tuple(entry.shape), size))
        header, data_bytes = safetensors_header(layout)
        self.size = len(header) + data_bytes
        self._places: dict[str, list[_Place]] = {}
        self._tensors: list[_Tensor] = []
        start = len(header)
        for entry, (_, _, _, size) in zip(ordered, layout, strict=True):
            for index, digest in enumerate(entry.chunks):
                length = min(chunk_size, size - index * chunk_size)
                place = _Place(len(self._tensors), index, start + index * chunk_size, length)
                self._places.setdefault(check_digest(digest), []).append(place)
            self._tensors.append(_Tensor(entry, finite_checker(entry.dtype)))
            start += size
        for name, digest in side_files.items():
            self._places.setdefault(check_digest(digest), []).append(_Place(file=_check_file_name(name)))
        self.wanted = list(self._places)  # in file order
        for stray in self.folder.iterdir():  # left by a pull of another result
            if stray.name in side_files or stray.name == MODEL_FILE:
                continue
            if stray.is_dir():
                shutil.rmtree(stray)
            else:
                stray.unlink()
        self._fd = os.open(self.folder / MODEL_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self._fd, self.size)
        _pwrite_all(self._fd, header, 0)

    def _resume(self) -> None:
        """Count the journal's chunks whose bytes are still in place as received; keep only those."""
        journal = self.root / "received"
        named = journal.read_bytes() if journal.exists() else b""
        self._received: set[str] = set()
        for at in range(0, len(named) - DIGEST_BYTES + 1, DIGEST_BYTES):
            digest = named[at : at + DIGEST_BYTES].hex()
            if digest in self._places and digest not in self._received:
                places = self._places[digest]
                pieces = [self._read_place(place) for place in places]
                if all(
                    piece is not None and sha256_hex(piece) == digest and self._fits(place, piece) is None
                    for place, piece in zip(places, pieces, strict=True)
                ):
                    self._received.add(digest)
        write_atomic(journal, b"".join(bytes.fromhex(d) for d in self._received))
        self._journal = os.open(journal, os.O_WRONLY | os.O_APPEND)
        self.resumed = len(self._received)

    def _read_place(self, place: _Place) -> bytes | None:
        if place.file:
            path = self.folder / place.file
            return path.read_bytes() if path.exists() else None
        return os.pread(self._fd, place.length, place.offset)

    # ------------------------------------------------------------------ the sink
    def missing(self, digests: Iterable[str]) -> list[str]:
        """The digests of `digests` (in order, without repeats) not yet written."""
        return [d for d in dict.fromkeys(digests) if d not in self._received]

    def put(self, data: bytes | bytearray | memoryview, digest: str | None = None) -> str:
        """Verify a chunk and write it at each of its places; returns its digest."""
        actual = verified_digest(data, digest)
        places = self._places.get(actual)
        if places is None:
            raise UnexpectedChunkError(f"expected a chunk of the pulled model, got {actual}")
        if actual in self._received:
            return actual
        for place in places:
            problem = self._fits(place, data)
            if problem is not None:
                raise problem
        for place in places:
            if place.file:
                (self.folder / place.file).write_bytes(data)
                continue
            _pwrite_all(self._fd, data, place.offset)
            start_writeback(self._fd, place.offset, place.length)
        os.write(self._journal, bytes.fromhex(actual))  # one small O_APPEND write: never interleaved
        self._received.add(actual)
        if self.progress is not None:
            self.progress(len(self._received), len(self._places))
        return actual

    def _fits(self, place: _Place, data: bytes | bytearray | memoryview) -> Exception | None:
        """Why a chunk's bytes cannot fill `place` (its length, its values), or None if they can."""
        if place.file:
            return None
        tensor = self._tensors[place.tensor]
        if len(data) != place.length:
            return TensorMismatchError(
                f"expected chunk {place.index} of {tensor.entry.name} to be {place.length} bytes, "
                f"got {len(data)}"
            )
        if tensor.finite is not None and not tensor.finite(data):
            return NonFiniteValuesError(f"expected finite values in {tensor.entry.name}, got NaN or Inf")
        return None

    # ------------------------------------------------------------------ the end
    def finish(self, out: str | Path) -> None:
        """Check that every chunk is in; fsync and rename the folder into `out`.

        The folder is copied beside `out` first if the work folder is on another file system.
        """
        missing = self.missing(self.wanted)
        if missing:
            raise UnexpectedChunkError(f"expected a complete model, got {len(missing)} chunks missing")
        os.close(self._fd)
        self._fd = -1
        out = Path(out)
        folder = self.folder
        if os.stat(folder).st_dev != os.stat(out.parent).st_dev:  # a rename cannot cross file systems
            folder = out.with_name(f".{out.name}.partial-{os.getpid()}")
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(self.folder, folder)
        replace_folder(folder, out)
        self.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def close(self) -> None:
        """Close the files and release the lock; the work folder stays for a later resume."""
        for attribute in ("_fd", "_journal", "_lock_fd"):
            fd = getattr(self, attribute)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, attribute, -1)

    def __enter__(self) -> PartialModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    fsync_dir(folder)


def replace_folder(temp: Path, out: Path) -> None:
    """Move a complete folder into place; an existing `out` is replaced only after `temp` is whole."""
    _fsync_tree(temp)
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(temp, out)
    fsync_dir(out.parent)  # the rename itself
    shutil.rmtree(old, ignore_errors=True)
