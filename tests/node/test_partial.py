"""A model folder written chunk by chunk as chunks arrive: any order, verified, resumable, atomic."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from node.assemble import write_safetensors
from node.errors import ChunkHashMismatchError
from node.partial import MODEL_FILE, PartialModel, PullBusyError, UnexpectedChunkError
from protocol.aggregate import encode_result
from protocol.errors import NonFiniteValuesError, TensorMismatchError

CHUNK = 4096
CONFIG = b'{"model_type": "llama"}'


def _model() -> tuple[dict[str, torch.Tensor], list, dict[str, bytes]]:
    gen = torch.Generator().manual_seed(11)
    tensors = {
        "layers.0.w": torch.randn(64, 40, generator=gen),  # 10240 bytes: 2 full chunks and a short one
        "layers.1.w": torch.zeros(64, 40),  # its two full chunks are the same chunk
        "norm": torch.randn(7, generator=gen).to(torch.bfloat16),
        "steps": torch.arange(6, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
    }
    entries, chunks, _ = encode_result(tensors, CHUNK)
    return tensors, list(entries), dict(chunks)


def _side_files() -> tuple[dict[str, str], dict[str, bytes]]:
    digest = hashlib.sha256(CONFIG).hexdigest()
    return {"config.json": digest}, {digest: CONFIG}


def _file_digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _expected_file(tmp_path, entries, chunks) -> str:
    """The digest of the same model written by `write_safetensors` from all chunks at once."""
    reference = tmp_path / "reference.safetensors"
    write_safetensors(entries, chunks.__getitem__, CHUNK, reference)
    return _file_digest(reference)


def test_chunks_in_any_order_make_the_same_file(tmp_path):
    tensors, entries, chunks = _model()
    sides, side_chunks = _side_files()
    everything = {**chunks, **side_chunks}
    reported = []
    with PartialModel(
        tmp_path / "work", entries, CHUNK, sides, progress=lambda done, total: reported.append((done, total))
    ) as partial:
        wanted = partial.wanted
        assert sorted(wanted) == sorted(everything)  # each distinct chunk once, the zero chunk included
        order = list(wanted)
        random.Random(5).shuffle(order)
        for digest in order:
            assert partial.put(everything[digest], digest) == digest
        assert partial.missing(wanted) == []
        partial.finish(tmp_path / "out")
    assert reported == [(i, len(wanted)) for i in range(1, len(wanted) + 1)]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", MODEL_FILE]
    assert (out / "config.json").read_bytes() == CONFIG
    loaded = load_file(out / MODEL_FILE)
    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    assert _file_digest(out / MODEL_FILE) == _expected_file(tmp_path, entries, chunks)
    assert not (tmp_path / "work").exists()


def test_an_interrupted_write_resumes_with_only_the_rest(tmp_path):
    _, entries, chunks = _model()
    sides, side_chunks = _side_files()
    everything = {**chunks, **side_chunks}
    work = tmp_path / "work"
    partial = PartialModel(work, entries, CHUNK, sides)
    order = list(reversed(partial.wanted))
    first, rest = order[:3], order[3:]
    for digest in first:
        partial.put(everything[digest], digest)
    partial.close()  # as a killed pull leaves it: the folder, the journal, no lock
    assert not (tmp_path / "out").exists()

    with PartialModel(work, entries, CHUNK, sides) as resumed:
        assert resumed.resumed == 3
        assert resumed.missing(order) == rest
        for digest in rest:
            resumed.put(everything[digest], digest)
        resumed.finish(tmp_path / "out")
    assert _file_digest(tmp_path / "out" / MODEL_FILE) == _expected_file(tmp_path, entries, chunks)


def test_a_journaled_chunk_whose_bytes_were_lost_is_fetched_again(tmp_path):
    _, entries, chunks = _model()
    work = tmp_path / "work"
    weights = next(e for e in entries if e.name == "layers.0.w")
    with PartialModel(work, entries, CHUNK, {}) as partial:
        for digest in weights.chunks:
            partial.put(chunks[digest], digest)
    model = work / "model" / MODEL_FILE
    data = bytearray(model.read_bytes())
    start = data.index(chunks[weights.chunks[1]])
    data[start : start + 10] = bytes(10)  # a write the journal names but the disk lost
    model.write_bytes(bytes(data))
    with PartialModel(work, entries, CHUNK, {}) as resumed:
        assert resumed.resumed == 2
        assert resumed.missing(weights.chunks) == [weights.chunks[1]]
        for digest in resumed.missing(resumed.wanted):
            resumed.put(chunks[digest], digest)
        resumed.finish(tmp_path / "out")
    assert _file_digest(tmp_path / "out" / MODEL_FILE) == _expected_file(tmp_path, entries, chunks)


def test_bad_chunks_and_layouts_are_refused(tmp_path):
    _, entries, chunks = _model()
    weights = next(e for e in entries if e.name == "layers.0.w")
    first, second, third = weights.chunks
    with PartialModel(tmp_path / "a", [weights], CHUNK, {}) as partial:
        with pytest.raises(ChunkHashMismatchError):
            partial.put(chunks[first], second)
        with pytest.raises(UnexpectedChunkError, match="chunk of the pulled model"):
            partial.put(b"not part of it")
        with pytest.raises(UnexpectedChunkError, match="3 chunks missing"):
            partial.finish(tmp_path / "out")
    assert not (tmp_path / "out").exists()

    # A corrupted chunk (one bit flipped) is refused and nothing of it is written or journaled.
    corrupt = bytearray(chunks[second])
    corrupt[100] ^= 1
    with PartialModel(tmp_path / "b", [weights], CHUNK, {}) as partial:
        with pytest.raises(ChunkHashMismatchError, match=f"expected bytes hashing to {second}"):
            partial.put(corrupt, second)
        with pytest.raises(UnexpectedChunkError, match="chunk of the pulled model"):
            partial.put(corrupt)
        assert partial.missing(weights.chunks) == list(weights.chunks)
        model = tmp_path / "b" / "model" / MODEL_FILE
        assert model.read_bytes().count(bytes(corrupt[:200])) == 0
        partial.put(chunks[second], second)
        assert partial.missing(weights.chunks) == [first, third]
    assert (tmp_path / "b" / "received").read_bytes() == bytes.fromhex(second)

    values = torch.arange(2048, dtype=torch.float32)
    (entry,), _, _ = encode_result({"w": values}, CHUNK)
    values[3] = float("inf")  # the protocol refuses to encode it: lay out the bytes by hand
    raw = values.numpy().tobytes()
    pieces = [raw[:CHUNK], raw[CHUNK:]]
    poisoned = dataclasses.replace(
        entry,
        chunks=tuple(hashlib.sha256(p).hexdigest() for p in pieces),
        digest=hashlib.sha256(raw).hexdigest(),
    )
    with (
        PartialModel(tmp_path / "c", [poisoned], CHUNK, {}) as partial,
        pytest.raises(NonFiniteValuesError, match="finite values in w"),
    ):
        partial.put(pieces[0])

    short = dataclasses.replace(weights, chunks=(first, second))
    with pytest.raises(TensorMismatchError, match=r"in 3 chunks for raw layers\.0\.w"):
        PartialModel(tmp_path / "d", [short], CHUNK, {})
    with pytest.raises(TensorMismatchError, match=r"each tensor name once, got \['layers\.0\.w'\]"):
        PartialModel(tmp_path / "f", [weights, weights], CHUNK, {})
    with pytest.raises(TensorMismatchError, match="plain side file name"):
        PartialModel(tmp_path / "e", [weights], CHUNK, {"../config.json": first})


def test_one_pull_at_a_time_per_work_folder(tmp_path):
    _, entries, _ = _model()
    with (
        PartialModel(tmp_path / "work", entries, CHUNK, {}),
        pytest.raises(PullBusyError, match="no other pull writing"),
    ):
        PartialModel(tmp_path / "work", entries, CHUNK, {})
    PartialModel(tmp_path / "work", entries, CHUNK, {}).close()  # free again


def test_finish_replaces_an_existing_folder_whole(tmp_path):
    _, entries, chunks = _model()
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("from an earlier pull")
    with PartialModel(tmp_path / "work", entries, CHUNK, {}) as partial:
        for digest in partial.wanted:
            partial.put(chunks[digest], digest)
        partial.finish(out)
    assert os.listdir(out) == [MODEL_FILE]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_work_folder_on_another_file_system_is_copied_beside_the_output(tmp_path):
    _, entries, chunks = _model()
    work = Path(tempfile.mkdtemp(prefix="umm-partial-", dir="/dev/shm"))  # tmpfs: another device
    try:
        assert os.stat(work).st_dev != os.stat(tmp_path).st_dev
        with PartialModel(work / "pull", entries, CHUNK, {}) as partial:
            for digest in partial.wanted:
                partial.put(chunks[digest], digest)
            partial.finish(tmp_path / "out")
        assert _file_digest(tmp_path / "out" / MODEL_FILE) == _expected_file(tmp_path, entries, chunks)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "reference.safetensors"]
        assert not (work / "pull").exists()
    finally:
        shutil.rmtree(work, ignore_errors=True)
