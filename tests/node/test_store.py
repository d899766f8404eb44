"""The content-addressed store: hashing, verification on read, and recovery after a kill."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import time

import pytest

from merging import atomic as atomic_module
from node.errors import ChunkHashMismatchError, ChunkNotFoundError, InvalidDigestError, StoreQuotaError
from node.store import ContentStore


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_put_get_roundtrip_and_addressing(tmp_path):
    with ContentStore(tmp_path) as store:
        digest = store.put(b"hello chunk")
        assert digest == _digest(b"hello chunk")
        assert store.get(digest) == b"hello chunk"
        assert (tmp_path / "blobs" / digest[:2] / digest).read_bytes() == b"hello chunk"
        assert store.size(digest) == 11
        assert store.put(b"hello chunk") == digest
        assert len(store) == 1
        assert store.total_bytes() == 11


def test_put_with_expected_digest_rejects_other_bytes(tmp_path):
    with ContentStore(tmp_path) as store:
        with pytest.raises(ChunkHashMismatchError, match="expected bytes hashing to"):
            store.put(b"evil", digest=_digest(b"good"))
        assert len(store) == 0
        assert list((tmp_path / "tmp").iterdir()) == []


def test_bad_digest_and_missing_chunk(tmp_path):
    with ContentStore(tmp_path) as store:
        with pytest.raises(InvalidDigestError):
            store.get("ABC")
        with pytest.raises(InvalidDigestError):
            store.has("g" * 64)
        with pytest.raises(ChunkNotFoundError):
            store.get(_digest(b"absent"))
        with pytest.raises(ChunkNotFoundError):
            store.size(_digest(b"absent"))


def test_missing_keeps_order_without_repeats(tmp_path):
    with ContentStore(tmp_path) as store:
        held = store.put(b"a")
        wanted = [_digest(b"c"), held, _digest(b"b"), _digest(b"c")]
        assert store.missing(wanted) == [_digest(b"c"), _digest(b"b")]
        assert sorted(store) == [held]


def test_corrupted_blob_is_detected_and_removed(tmp_path):
    with ContentStore(tmp_path) as store:
        digest = store.put(b"x" * 1000)
        blob = tmp_path / "blobs" / digest[:2] / digest
        blob.write_bytes(b"x" * 999 + b"y")
        with pytest.raises(ChunkHashMismatchError, match="expected stored chunk to hash to"):
            store.get(digest)
        assert not store.has(digest)
        assert not blob.exists()


def test_deleted_blob_file_reports_not_found(tmp_path):
    with ContentStore(tmp_path) as store:
        digest = store.put(b"gone")
        (tmp_path / "blobs" / digest[:2] / digest).unlink()
        with pytest.raises(ChunkNotFoundError, match="missing blob file"):
            store.get(digest)
        assert not store.has(digest)


def test_state_survives_reopen(tmp_path):
    payloads = [os.urandom(4096) for _ in range(5)]
    with ContentStore(tmp_path) as store:
        digests = [store.put(p) for p in payloads]
    with ContentStore(tmp_path) as store:
        assert sorted(store) == sorted(digests)
        assert [store.get(d) for d in digests] == payloads


def _run_in_child(fn) -> int:
    """Run `fn` in a forked child that dies by os._exit; return its exit status."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            fn()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_kill_after_temp_write_before_rename_leaves_no_trace(tmp_path, monkeypatch):
    payload = b"p" * 100_000

    def child():
        store = ContentStore(tmp_path)
        monkeypatch.setattr(atomic_module.os, "replace", lambda *a: os._exit(17))
        store.put(payload)

    assert _run_in_child(child) == 17
    assert len(list((tmp_path / "tmp").iterdir())) == 1  # the partial write the "kill" left behind
    with ContentStore(tmp_path) as store:
        assert list((tmp_path / "tmp").iterdir()) == []
        assert not store.has(_digest(payload))
        assert store.put(payload) == _digest(payload)
        assert store.get(_digest(payload)) == payload


def test_kill_after_rename_before_index_row_is_recovered(tmp_path, monkeypatch):
    payload = b"q" * 100_000
    real_fsync_dir = atomic_module.fsync_dir

    def child():
        store = ContentStore(tmp_path)

        def fsync_then_die(path):
            real_fsync_dir(path)
            os._exit(18)

        monkeypatch.setattr(atomic_module, "fsync_dir", fsync_then_die)
        store.put(payload)

    assert _run_in_child(child) == 18
    with ContentStore(tmp_path) as store:
        assert store.has(_digest(payload))
        assert store.get(_digest(payload)) == payload


def test_unindexed_blob_with_wrong_bytes_is_dropped_on_open(tmp_path):
    with ContentStore(tmp_path) as store:
        digest = store.put(b"right bytes")
    # Simulate a blob whose index row never landed and whose bytes were damaged afterwards.
    import sqlite3

    db = sqlite3.connect(tmp_path / "index.sqlite")
    db.execute("DELETE FROM chunks")
    db.commit()
    db.close()
    (tmp_path / "blobs" / digest[:2] / digest).write_bytes(b"wrong bytes")
    (tmp_path / "blobs" / digest[:2] / "not-a-digest").write_bytes(b"junk")
    with ContentStore(tmp_path) as store:
        assert len(store) == 0
        assert list((tmp_path / "blobs" / digest[:2]).iterdir()) == []


def test_sigkill_during_writes_keeps_every_indexed_chunk_valid(tmp_path):
    rng = random.Random(5)
    payloads = [bytes([i]) * (1 << 20) for i in range(200)]
    expected = {_digest(p) for p in payloads}
    for delay in (0.05, 0.15, 0.3):
        pid = os.fork()
        if pid == 0:  # child: write until killed
            try:
                store = ContentStore(tmp_path)
                for payload in payloads:
                    store.put(payload)
            finally:
                os._exit(0)
        time.sleep(delay * (0.5 + rng.random()))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with ContentStore(tmp_path) as store:
            held = set(store)
            assert held <= expected
            for digest in held:
                assert _digest(store.get(digest)) == digest
            assert list((tmp_path / "tmp").iterdir()) == []


def test_partial_write_of_a_live_process_is_kept_on_open(tmp_path):
    ContentStore(tmp_path).close()
    live = tmp_path / "tmp" / "1.0123456789abcdef.partial"  # pid 1 is alive and is not us
    live.write_bytes(b"in progress")
    dead = tmp_path / "tmp" / f"{2**22 + 7}.0123456789abcdef.partial"  # above Linux's pid_max
    dead.write_bytes(b"abandoned")
    with ContentStore(tmp_path):
        assert live.exists()
        assert not dead.exists()


def test_a_cache_store_skips_fsync_and_still_verifies(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(atomic_module.os, "fsync", lambda fd: synced.append(fd))
    with ContentStore(tmp_path, durable=False) as store:
        digest = store.put(b"cached bytes", digest=_digest(b"cached bytes"))
        assert synced == [] and store.get(digest) == b"cached bytes"
        assert list((tmp_path / "tmp").iterdir()) == []
        (tmp_path / "blobs" / digest[:2] / digest).write_bytes(b"garbled by a power cut")
        with pytest.raises(ChunkHashMismatchError):
            store.get(digest)
        assert not store.has(digest)  # removed, so the next fetch brings it again
    with ContentStore(tmp_path) as store:
        store.put(b"durable bytes")
        assert len(synced) == 2  # the blob and its folder


def test_a_quota_refuses_the_chunk_that_would_pass_it_and_deletes_make_room(tmp_path):
    with ContentStore(tmp_path, quota=100) as store:
        first = store.put(b"a" * 60)
        assert store.put(b"a" * 60) == first  # a chunk already held costs nothing
        with pytest.raises(
            StoreQuotaError, match="quota of 100 bytes, got 60 bytes stored and a chunk of 41"
        ):
            store.put(b"b" * 41)
        assert not (tmp_path / "blobs" / _digest(b"b" * 41)[:2] / _digest(b"b" * 41)).exists()
        assert list(store) == [first] and store.total_bytes() == 60
        assert store.put(b"b" * 40) == _digest(b"b" * 40)  # exactly at the quota
        store.delete(first)
        assert store.put(b"c" * 60) == _digest(b"c" * 60)
        assert store.total_bytes() == 100
    # what is stored counts after a reopen too
    with ContentStore(tmp_path, quota=50) as reopened, pytest.raises(StoreQuotaError):
        reopened.put(b"d")


def test_a_store_refuses_a_quota_that_is_not_positive(tmp_path):
    with pytest.raises(ValueError, match="positive store quota"):
        ContentStore(tmp_path, quota=0)
