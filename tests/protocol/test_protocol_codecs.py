import hashlib
import struct

import numpy as np
import pytest
import torch
import zstandard

from protocol.chunks import (
    apply_delta,
    decode_entry,
    decode_tensors,
    encode_deltas,
    encode_entry,
    encode_tensors,
)
from protocol.codecs import CodecSpec, decode_tensor, encode_tensor, parse_codec
from protocol.errors import (
    CodecError,
    HashMismatchError,
    NonFiniteValuesError,
    SchemaError,
    TensorMismatchError,
)


def spec(name, zstd=False, k=0, block_size=0):
    return CodecSpec(name=name, zstd=zstd, k=k, block_size=block_size)


def sample(shape=(40, 50), seed=0, scale=0.01):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("zstd", [False, True])
def test_raw_is_exact_for_every_dtype(zstd):
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8):
        t = (sample((7, 3)) * 1000).to(dtype)
        out = decode_tensor(encode_tensor(t, spec("raw", zstd)), spec("raw", zstd), (7, 3), str(dtype)[6:])
        assert out.dtype == dtype and torch.equal(out, t)


@pytest.mark.parametrize("zstd", [False, True])
def test_dense_half_error_bounds(zstd):
    t = sample()
    for name, rel in (("bf16", 2.0**-8), ("fp16", 2.0**-11)):
        out = decode_tensor(encode_tensor(t, spec(name, zstd)), spec(name, zstd), (40, 50), "float32")
        assert out.dtype == torch.float32
        assert bool(((out - t).abs() <= rel * t.abs() + 2.0**-24).all())


def test_bf16_bytes_by_hand():
    # 1.0 is 0x3f80 in bf16, -2.0 is 0xc000; little-endian on the wire
    assert encode_tensor(torch.tensor([1.0, -2.0]), spec("bf16")) == bytes([0x80, 0x3F, 0x00, 0xC0])


@pytest.mark.parametrize("zstd", [False, True])
def test_topk_keeps_largest_entries(zstd):
    t = sample()
    k = 200
    out = decode_tensor(
        encode_tensor(t, spec("topk", zstd, k=k)), spec("topk", zstd, k=k), (40, 50), "float32"
    )
    flat, got = t.flatten().numpy(), out.flatten().numpy()
    expected_kept = set(np.argsort(-np.abs(flat), kind="stable")[:k].tolist())  # independent reference
    kept = set(np.nonzero(got)[0].tolist())
    assert kept == expected_kept
    idx = sorted(kept)
    assert np.all(np.abs(got[idx] - flat[idx]) <= 2.0**-8 * np.abs(flat[idx]))
    dropped = [i for i in range(flat.size) if i not in kept]
    assert np.abs(flat[dropped]).max() <= np.abs(flat[idx]).min()


def test_topk_layout_by_hand():
    t = torch.tensor([[0.5, -3.0], [2.0, 0.25]])
    data = encode_tensor(t, spec("topk", k=2))
    assert data[:8] == struct.pack("<II", 1, 1)  # indices 1 (-3.0) and 2 (2.0) as gaps: 1, then 2 - 1
    assert data[8:] == bytes([0x40, 0xC0, 0x00, 0x40])  # bf16 -3.0 = 0xc040, 2.0 = 0x4000


def test_topk_ties_pick_lower_index():
    t = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    out = decode_tensor(encode_tensor(t, spec("topk", k=2)), spec("topk", k=2), (1, 4), "float32")
    assert out.tolist() == [[1.0, 1.0, 0.0, 0.0]]


@pytest.mark.parametrize("zstd", [False, True])
@pytest.mark.parametrize("block", [1, 7, 64, 4096])
def test_int8_error_bound(zstd, block):
    t = sample(seed=block)
    out = decode_tensor(
        encode_tensor(t, spec("int8", zstd, block_size=block)),
        spec("int8", zstd, block_size=block),
        (40, 50),
        "float32",
    )
    flat = t.flatten()
    padded = torch.cat([flat, torch.zeros(-flat.numel() % block)])
    absmax = padded.view(-1, block).abs().amax(1).repeat_interleave(block)[: flat.numel()]
    assert bool(((out.flatten() - flat).abs() <= absmax / 254 * (1 + 1e-5)).all())


def test_int8_layout_by_hand():
    t = torch.tensor([1.27, -0.635, 0.0, 0.3, 0.0])
    data = encode_tensor(t, spec("int8", block_size=4))
    scales = np.frombuffer(data[:8], dtype="<f4")
    assert np.allclose(scales, [1.27 / 127, 0.0])
    assert list(np.frombuffer(data[8:], dtype=np.int8)) == [127, -64, 0, 30, 0]  # -63.5 rounds to even
    out = decode_tensor(data, spec("int8", block_size=4), (5,), "float32")
    assert torch.allclose(out, torch.tensor([1.27, -0.64, 0.0, 0.30, 0.0]), atol=1e-6)


def test_encode_rejects_bad_input():
    with pytest.raises(NonFiniteValuesError):
        encode_tensor(torch.tensor([1.0, float("nan")]), spec("bf16"))
    with pytest.raises(CodecError, match="fp16 range"):
        encode_tensor(torch.tensor([1e6]), spec("fp16"))
    with pytest.raises(SchemaError, match="float dtype"):
        encode_tensor(torch.tensor([1, 2]), spec("bf16"))
    with pytest.raises(SchemaError, match="k <= 4"):
        encode_tensor(torch.zeros(2, 2), spec("topk", k=5))


def test_decode_rejects_wrong_length_and_values():
    good = encode_tensor(torch.ones(4), spec("bf16"))
    with pytest.raises(TensorMismatchError, match="expected 8 encoded bytes"):
        decode_tensor(good[:-1], spec("bf16"), (4,), "float32")
    with pytest.raises(TensorMismatchError):
        decode_tensor(good, spec("bf16"), (5,), "float32")
    nan_bf16 = bytes([0xC0, 0x7F]) * 4
    with pytest.raises(NonFiniteValuesError):
        decode_tensor(nan_bf16, spec("bf16"), (4,), "float32")
    with pytest.raises(NonFiniteValuesError):
        decode_tensor(struct.pack("<f", float("inf")) * 2, spec("raw"), (2,), "float32")


def test_decode_rejects_bad_topk_and_int8():
    values = bytes([0x80, 0x3F]) * 2
    assert decode_tensor(
        struct.pack("<II", 0, 3) + values, spec("topk", k=2), (2, 2), "float32"
    ).tolist() == [
        [1.0, 0.0],
        [0.0, 1.0],
    ]
    with pytest.raises(CodecError, match="strictly increasing"):
        decode_tensor(struct.pack("<II", 1, 0) + values, spec("topk", k=2), (2, 2), "float32")
    with pytest.raises(CodecError, match="below 4, got 4"):
        decode_tensor(struct.pack("<II", 1, 3) + values, spec("topk", k=2), (2, 2), "float32")
    with pytest.raises(CodecError, match="below 4"):
        decode_tensor(struct.pack("<II", 2**32 - 1, 1) + values, spec("topk", k=2), (2, 2), "float32")
    with pytest.raises(CodecError, match=r"int8 values in \[-127, 127\]"):
        decode_tensor(struct.pack("<f", 0.1) + bytes([0x80, 1]), spec("int8", block_size=2), (2,), "float32")
    with pytest.raises(NonFiniteValuesError, match="scales"):
        decode_tensor(struct.pack("<f", -0.1) + bytes([1, 1]), spec("int8", block_size=2), (2,), "float32")


def test_decode_rejects_bad_zstd():
    raw = encode_tensor(torch.ones(8), spec("bf16"))
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(raw)
    assert decode_tensor(frame, spec("bf16", True), (8,), "float32").tolist() == [1.0] * 8
    with pytest.raises(CodecError, match="trailing"):
        decode_tensor(frame + b"x", spec("bf16", True), (8,), "float32")
    with pytest.raises(TensorMismatchError, match="declaring 16"):
        decode_tensor(frame, spec("bf16", True), (4,), "float32")
    with pytest.raises(CodecError, match="frame header"):
        decode_tensor(raw, spec("bf16", True), (8,), "float32")
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    with pytest.raises(CodecError, match="declaring its size"):
        decode_tensor(no_size, spec("bf16", True), (8,), "float32")


def test_parse_codec():
    assert str(parse_codec("int8+zstd")) == "int8:64+zstd"
    assert parse_codec("topk:0.05").density == 0.05
    assert parse_codec("int8:128").block_size == 128
    assert parse_codec("bf16").spec_for((3, 3)) == spec("bf16")
    choice = parse_codec("topk:0.1+zstd")
    assert choice.spec_for((10, 10)) == spec("topk", True, k=10)
    assert choice.spec_for((10,)) == spec("bf16", True)  # vectors stay dense
    for bad in ("gzip", "int8+gzip", "topk:2", "topk:x", "int8:0", "bf16+zstd+zstd"):
        with pytest.raises(CodecError):
            parse_codec(bad)


def test_chunks_round_trip_and_checks():
    tensors = {"b": sample((30, 100), 1), "a": sample((5,), 2)}
    entries, chunks = encode_tensors(tensors, spec("raw"), chunk_size=4096)
    assert [e.name for e in entries] == ["a", "b"]
    assert len(entries[1].chunks) == 3 and entries[1].nbytes == 12000
    decoded = decode_tensors(entries, chunks, 4096)
    assert all(torch.equal(decoded[n], tensors[n]) for n in tensors)
    first, last = entries[1].chunks[0], entries[1].chunks[-1]
    tampered = {**chunks, first: b"\x00" + chunks[first][1:]}
    with pytest.raises(HashMismatchError, match=f"expected chunk {first}"):
        decode_entry(entries[1], tampered, 4096)
    truncated = {**chunks, last: chunks[last][:-1]}
    with pytest.raises(HashMismatchError):
        decode_entry(entries[1], truncated, 4096)
    missing = {k: v for k, v in chunks.items() if k != last}
    with pytest.raises(HashMismatchError, match="got none"):
        decode_entry(entries[1], missing, 4096)
    with pytest.raises(HashMismatchError):
        decode_entry(entries[1], lambda address: chunks[first], 4096)


def test_deltas_reconstruct_expert_within_int8_bound():
    base = {"w": sample((16, 64), 3, 1.0).bfloat16(), "n": torch.ones(64, dtype=torch.bfloat16)}
    expert = {k: (v.float() + sample(tuple(v.shape), 4)).bfloat16() for k, v in base.items()}
    entries, chunks = encode_deltas(base, expert, parse_codec("int8+zstd"), chunk_size=4096)
    assert {e.dtype for e in entries} == {"bfloat16"}
    for entry in entries:
        delta = decode_entry(entry, chunks, 4096)
        true_delta = expert[entry.name].float() - base[entry.name].float()
        restored = apply_delta(base[entry.name], entry, delta)
        assert (restored - expert[entry.name].float()).abs().max() <= true_delta.abs().max() / 254 * 1.0001
    with pytest.raises(TensorMismatchError, match="dtype bfloat16"):
        apply_delta(base["w"].float(), entries[1], torch.zeros(16, 64))
    with pytest.raises(TensorMismatchError, match="same tensor names"):
        encode_deltas(base, {"w": expert["w"]}, parse_codec("bf16"))


def test_entry_dtype_and_shape_come_from_tensor():
    entry, chunks = encode_entry("x", torch.zeros(2, 3, dtype=torch.float16), spec("raw"))
    assert (entry.shape, entry.dtype, entry.nbytes, len(chunks)) == ((2, 3), "float16", 12, 1)


def test_blobs_split_and_join():
    from protocol.chunks import join_blob, split_blob
    from protocol.errors import OversizeError

    data = bytes((i * 7919) % 251 for i in range(12800))  # no two 4096-byte pieces alike
    digest, addresses, chunks = split_blob(data, 4096)
    assert len(addresses) == 4 and digest == hashlib.sha256(data).hexdigest()
    assert join_blob(digest, addresses, chunks, max_size=len(data)) == data
    with pytest.raises(OversizeError):
        join_blob(digest, addresses, chunks, max_size=len(data) - 1)
    with pytest.raises(HashMismatchError, match="join into"):
        join_blob(digest, addresses[::-1], chunks, max_size=len(data))
    with pytest.raises(HashMismatchError, match="got none"):
        join_blob(digest, addresses, {}, max_size=len(data))


@pytest.mark.parametrize("zstd", [False, True])
@pytest.mark.parametrize("block", [1, 7, 64, 4096])
def test_int4_error_bound(zstd, block):
    t = sample((41, 50), seed=block)  # odd count: a padding nibble
    s = spec("int4", zstd, block_size=block)
    out = decode_tensor(encode_tensor(t, s), s, (41, 50), "float32")
    flat = t.flatten()
    padded = torch.cat([flat, torch.zeros(-flat.numel() % block)])
    absmax = padded.view(-1, block).abs().amax(1).repeat_interleave(block)[: flat.numel()]
    assert bool(((out.flatten() - flat).abs() <= absmax / 14 * (1 + 1e-5)).all())


def test_int4_layout_by_hand():
    t = torch.tensor([0.7, -0.35, 0.0, 0.1, -0.7])
    data = encode_tensor(t, spec("int4", block_size=8))
    assert np.allclose(np.frombuffer(data[:4], dtype="<f4"), [0.1])
    # q = [7, -4 (round half to even of -3.5), 0, 1, -7] -> nibbles q + 8 = [15, 4, 8, 9, 1], padding 0
    assert data[4:] == bytes([15 | 4 << 4, 8 | 9 << 4, 1 | 0 << 4])
    out = decode_tensor(data, spec("int4", block_size=8), (5,), "float32")
    assert torch.allclose(out, torch.tensor([0.7, -0.4, 0.0, 0.1, -0.7]), atol=1e-6)


def test_int4_rejects_bad_nibbles():
    scale = struct.pack("<f", 0.1)
    with pytest.raises(CodecError, match=r"int4 values in \[-7, 7\]"):
        decode_tensor(scale + bytes([0x80]), spec("int4", block_size=2), (2,), "float32")  # low nibble 0
    with pytest.raises(CodecError, match="padding nibble"):
        decode_tensor(scale + bytes([0x18, 0x18]), spec("int4", block_size=4), (3,), "float32")
    assert decode_tensor(
        scale + bytes([0x98]), spec("int4", block_size=2), (2,), "float32"
    ).tolist() == pytest.approx([0.0, 0.1])
    assert str(parse_codec("int4+zstd")) == "int4:64+zstd"
    assert parse_codec("int4:32").spec_for((4, 4)) == spec("int4", block_size=32)
