"""Writing a safetensors file from stored chunks: same tensors as decoding, same checks."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch
from safetensors.torch import load_file

from node.assemble import EXPONENT_MASKS, all_finite, finite_checker, write_safetensors
from protocol.aggregate import encode_result
from protocol.chunks import encode_tensors
from protocol.codecs import CodecSpec
from protocol.errors import HashMismatchError, NonFiniteValuesError, TensorMismatchError

CHUNK = 4096


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {
        "b.weight": torch.randn(70, 33, generator=gen),  # 9240 bytes: two full chunks and a short one
        "a.bias": torch.randn(5, generator=gen).to(torch.bfloat16),
        "c.count": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "d.empty": torch.zeros(0, 4),
    }


def test_raw_entries_round_trip_through_the_file(tmp_path):
    tensors = _tensors()
    entries, chunks, _ = encode_result(tensors, CHUNK)
    data_bytes = write_safetensors(entries, chunks.__getitem__, CHUNK, tmp_path / "m.safetensors")
    loaded = load_file(tmp_path / "m.safetensors")
    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    assert data_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_other_codecs_are_decoded_like_the_protocol_does(tmp_path):
    tensors = {"w": torch.randn(40, 40, generator=torch.Generator().manual_seed(4))}
    entries, chunks = encode_tensors(tensors, CodecSpec(name="bf16", zstd=True, k=0, block_size=0), CHUNK)
    write_safetensors(entries, chunks.__getitem__, CHUNK, tmp_path / "m.safetensors")
    expected = tensors["w"].to(torch.bfloat16).float()  # bf16 deltas decode to float32
    assert torch.equal(load_file(tmp_path / "m.safetensors")["w"], expected)


def test_wrong_bytes_lengths_and_values_are_refused(tmp_path):
    values = torch.arange(2048, dtype=torch.float32)  # 8192 bytes: two different chunks
    (entry,), chunks, _ = encode_result({"w": values}, CHUNK)
    first, second = entry.chunks
    out = tmp_path / "m.safetensors"

    # Two genuine chunks in the wrong order: each one verifies, the tensor's digest does not.
    swapped = dataclasses.replace(entry, chunks=(second, first))
    with pytest.raises(HashMismatchError, match="w bytes to hash to"):
        write_safetensors([swapped], chunks.__getitem__, CHUNK, out)

    short = {first: chunks[first][:100], second: chunks[second]}
    with pytest.raises(TensorMismatchError, match="chunk 0 of w to be 4096 bytes, got 100"):
        write_safetensors([entry], short.__getitem__, CHUNK, out)

    with_nan = values.clone()
    with_nan[7] = float("nan")
    raw = with_nan.numpy().tobytes()
    poisoned = dataclasses.replace(entry, digest=hashlib.sha256(raw).hexdigest())
    lookup = {first: raw[:CHUNK], second: raw[CHUNK:]}
    with pytest.raises(NonFiniteValuesError, match="finite values in w"):
        write_safetensors([poisoned], lookup.__getitem__, CHUNK, out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_finite_check_by_exponent_bits_matches_torch(dtype):
    special = torch.tensor([0.0, -0.0, 1.5, -2.0, 1e-40, float("inf"), float("-inf"), float("nan")])
    values = special.to(dtype)
    for index in range(len(values)):
        one = values[index : index + 1].contiguous()
        raw = one.view(torch.uint8).numpy().tobytes()
        expected = bool(torch.isfinite(one).all())
        name = str(dtype).removeprefix("torch.")
        assert all_finite(raw, *EXPONENT_MASKS[name]) is expected
        assert finite_checker(name)(raw) is expected
    big = torch.randn(1000, dtype=torch.float32).to(dtype)
    assert all_finite(big.view(torch.uint8).numpy().tobytes(), *EXPONENT_MASKS[str(dtype)[6:]])
    assert finite_checker(str(dtype)[6:])(big.view(torch.uint8).numpy().tobytes())
    assert finite_checker("int64") is None
