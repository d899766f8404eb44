"""The lossless delta codec (``raw``): every expert value comes back exactly, on bf16 and fp32 bases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protocol.chunks import decode_entry, encode_deltas, reconstruct
from protocol.codecs import CodecSpec, decode_tensor, encode_tensor, parse_codec
from protocol.errors import CodecError


def _pair(dtype: torch.dtype, seed: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    base = {
        "w": (torch.randn(32, 48, generator=g) * 0.05).to(dtype),
        "b": (torch.randn(48, generator=g) * 0.01).to(dtype),
    }
    # fine-tune-like changes, plus sign flips and values near zero (inexact in float32 arithmetic)
    expert = {k: (v.float() + torch.randn(v.shape, generator=g) * 0.02).to(dtype) for k, v in base.items()}
    expert["b"][:4] = torch.tensor([1e-7, -3e-6, 0.0, 2.5e-5]).to(dtype)
    return base, expert


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_raw_deltas_give_back_every_expert_value(dtype):
    base, expert = _pair(dtype, 1)
    entries, chunks = encode_deltas(base, expert, parse_codec("raw"), chunk_size=1024)
    assert {e.dtype for e in entries} == {str(dtype).removeprefix("torch.")}
    for entry in entries:
        restored = reconstruct(base[entry.name], decode_entry(entry, chunks, 1024))
        assert torch.equal(restored, expert[entry.name].float()), entry.name


def test_raw_deltas_of_bf16_weights_travel_as_float32():
    base, expert = _pair(torch.bfloat16, 2)
    entries, _ = encode_deltas(base, expert, parse_codec("raw+zstd"), chunk_size=1024)
    assert {str(e.codec) for e in entries} == {"fp32+zstd"}  # a bf16 difference is exact in float32


def test_float32_weights_whose_difference_float32_rounds_travel_as_float64():
    base = {"x": torch.tensor([0.3, 0.5], dtype=torch.float32)}
    expert = {"x": torch.tensor([1e-7, 0.5], dtype=torch.float32)}
    b, e = np.float32(0.3), np.float32(1e-7)
    assert np.float32(b + np.float32(e - b)) != e  # float32 arithmetic alone loses this value
    (entry,), chunks = encode_deltas(base, expert, parse_codec("raw"), chunk_size=1024)
    assert entry.codec.name == "fp64"
    delta = decode_entry(entry, chunks, 1024)
    assert delta.dtype == torch.float64
    assert torch.equal(reconstruct(base["x"], delta), expert["x"])


def test_an_expert_value_beyond_float64_reach_is_refused():
    base = {"x": torch.tensor([1.0], dtype=torch.float32)}
    expert = {"x": torch.tensor([1e-20], dtype=torch.float32)}
    with pytest.raises(CodecError, match="x's expert values"):
        encode_deltas(base, expert, parse_codec("raw"))


def test_float32_expert_on_a_bf16_base_keeps_its_float32_values():
    base, _ = _pair(torch.bfloat16, 3)
    g = torch.Generator().manual_seed(4)
    expert = {k: v.float() + torch.randn(v.shape, generator=g) * 1e-3 for k, v in base.items()}
    entries, chunks = encode_deltas(base, expert, parse_codec("raw"), chunk_size=1024)
    assert {e.dtype for e in entries} == {"bfloat16"}  # the manifest applies to the base
    for entry in entries:
        restored = reconstruct(base[entry.name], decode_entry(entry, chunks, 1024))
        assert torch.equal(restored, expert[entry.name])
    lossy, _ = encode_deltas(base, expert, parse_codec("bf16"), chunk_size=1024)
    assert {e.dtype for e in lossy} == {"bfloat16"}


def test_reconstruct_of_a_float32_delta_is_the_float32_sum():
    g = torch.Generator().manual_seed(5)
    base = (torch.randn(4096, generator=g) * torch.logspace(-8, 3, 4096)).bfloat16()
    delta = torch.randn(4096, generator=g) * torch.logspace(3, -8, 4096)
    expected = base.float().numpy() + delta.numpy()  # numpy float32 arithmetic
    assert np.array_equal(reconstruct(base, delta).numpy(), expected)
    # the float64 sum rounded to float32 gives the same bits (why float32 deltas may skip it)
    assert np.array_equal((base.double() + delta.double()).float().numpy(), expected)


@pytest.mark.parametrize(("name", "dtype", "width"), [("fp32", torch.float32, 4), ("fp64", torch.float64, 8)])
def test_dense_wide_codecs_round_trip(name, dtype, width):
    spec = CodecSpec(name=name, zstd=False, k=0, block_size=0)
    values = torch.tensor([[1.0, -2.5e-12], [3.0e5, 0.0]], dtype=dtype)
    data = encode_tensor(values, spec)
    assert len(data) == 4 * width
    out = decode_tensor(data, spec, (2, 2), "bfloat16")
    assert out.dtype == (torch.float64 if name == "fp64" else torch.float32)
    assert torch.equal(out, values)
