import math

import msgpack
import pytest

from protocol.encoding import MAX_DEPTH, pack, sha256_hex, unpack
from protocol.errors import MalformedError, OversizeError


def test_pack_sorts_keys_and_round_trips():
    value = {"b": 1, "a": [1.5, b"\x00\xff", None, True, "é", -5, 2**64 - 1]}
    data = pack(value)
    # keys sorted: "a" before "b", whatever the insertion order
    assert data == pack({"a": value["a"], "b": 1})
    assert data.index(b"\xa1a") < data.index(b"\xa1b")
    assert unpack(data, max_size=1000) == value


def test_pack_known_bytes():
    # hand-assembled: fixmap(2) "a" -> fixint 1, "b" -> bin8 len 1 0x07
    assert pack({"b": b"\x07", "a": 1}) == b"\x82\xa1a\x01\xa1b\xc4\x01\x07"
    # floats are always float64
    assert pack(1.5) == b"\xcb" + bytes.fromhex("3ff8000000000000")
    assert pack((1, 2)) == pack([1, 2]) == b"\x92\x01\x02"


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb({"b": 1, "a": 2}),  # unsorted keys
        msgpack.packb(1.5, use_single_float=True),  # float32
        b"\xcd\x00\x05",  # uint16 for a fixint value
        b"\x82\xa1a\x01\xa1a\x02",  # duplicate key
        b"\x01\x02",  # trailing bytes
        b"\xc1",  # never-used byte
        b"\xd4\x01\x02",  # ext type
        b"\xa2\xff\xfe",  # invalid UTF-8
        msgpack.packb({1: 2}),  # non-str key
        b"\x92\x01",  # truncated
    ],
)
def test_unpack_rejects_non_canonical_or_malformed(data):
    with pytest.raises(MalformedError):
        unpack(data, max_size=1000)


def test_unpack_rejects_nan_and_deep_nesting():
    with pytest.raises(MalformedError):
        unpack(msgpack.packb(math.nan), max_size=100)
    nested = b"\x91" * (MAX_DEPTH + 2) + b"\x01"
    with pytest.raises(MalformedError):
        unpack(nested, max_size=1000)


def test_unpack_enforces_size_and_type():
    with pytest.raises(OversizeError):
        unpack(pack("x" * 100), max_size=50)
    with pytest.raises(MalformedError):
        unpack(bytearray(b"\x01"), max_size=10)


def test_pack_rejects_unsupported_values():
    for value in (math.inf, {1: 2}, {"a": object()}, 2**64, -(2**63) - 1, {1.5}):
        with pytest.raises(MalformedError):
            pack(value)


def test_sha256_hex_known_value():
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
