"""Input digests are remembered across merges and recomputed when a file changes."""

import hashlib
import mmap
import os

from merging import filehash


def test_digests_are_sha256_and_reused_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("UMM_CACHE_DIR", str(tmp_path / "cache"))
    first, second = tmp_path / "a.bin", tmp_path / "b.bin"
    first.write_bytes(b"umm" * 1000)
    second.write_bytes(b"")
    expected = [hashlib.sha256(b"umm" * 1000).hexdigest(), hashlib.sha256(b"").hexdigest()]
    assert filehash.file_digests([first, second]) == expected
    hashed = []
    original = filehash.sha256_file
    monkeypatch.setattr(filehash, "sha256_file", lambda path: hashed.append(path) or original(path))
    assert filehash.file_digests([first, second]) == expected
    assert hashed == []  # both remembered
    stamp = os.stat(first)
    first.write_bytes(b"UMM" * 1000)  # same size; the write changes the change time
    os.utime(first, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # even with the old mtime restored
    assert filehash.file_digests([first, second]) == [hashlib.sha256(b"UMM" * 1000).hexdigest(), expected[1]]
    assert hashed == [first]


def test_an_unreadable_or_unwritable_record_only_means_hashing_again(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / filehash.RECORD_NAME).write_text("{not json")
    monkeypatch.setenv("UMM_CACHE_DIR", str(cache))
    path = tmp_path / "a.bin"
    path.write_bytes(b"x")
    assert filehash.file_digests([path]) == [hashlib.sha256(b"x").hexdigest()]
    monkeypatch.setenv("UMM_CACHE_DIR", str(path))  # a file, not a folder: the record cannot be written
    assert filehash.file_digests([path]) == [hashlib.sha256(b"x").hexdigest()]


def test_sha256_file_over_several_windows_and_empty(tmp_path, monkeypatch):
    monkeypatch.setattr(filehash, "WINDOW_BYTES", mmap.ALLOCATIONGRANULARITY)
    data = bytes(range(256)) * (3 * mmap.ALLOCATIONGRANULARITY // 256) + b"tail"
    (tmp_path / "big").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    assert filehash.sha256_file(tmp_path / "big") == hashlib.sha256(data).hexdigest()
    assert filehash.sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
