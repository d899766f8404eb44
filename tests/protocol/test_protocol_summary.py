"""The response summary on the wire: encode/decode round trip, refusals, the message's shape rules."""

import dataclasses

import msgpack
import pytest
import torch

from merging.fusion.align import Vocabulary
from merging.fusion.summary import ProbeSet, ResponseSummary
from protocol.chunks import encode_tensors
from protocol.codecs import CodecSpec
from protocol.errors import HashMismatchError, SchemaError
from protocol.messages import SCHEMA_VERSION, DistributionSummary
from protocol.summary import decode_summary, encode_summary, probe_set_fingerprint

PROMPTS = ("Sort: 3 1 2\n", "Reverse: a b\n")
EOS = 9
STRINGS = {1: "1", 2: "Ġ2", 3: "Ġ3", 5: "b", 7: "Ġa", EOS: "<|endoftext|>"}
LOGPROBS = [[-0.0625, -2.5], [-0.25, -1.5], [-0.5, -0.75], [-0.125, -3.0], [-1.0, -1.25]]  # exact in float32
RAW = CodecSpec(name="raw", zstd=False, k=0, block_size=0)


def hand_made(**changes) -> ResponseSummary:
    """Two prompts: responses of 3 and 2 positions (EOS last), k = 2."""
    fields = dict(
        probe=ProbeSet(PROMPTS),
        responses=("1 2 3", "b a"),
        offsets=torch.tensor([0, 3, 5], dtype=torch.int64),
        target_ids=torch.tensor([1, 2, 3, 5, 7], dtype=torch.int32),
        token_ids=torch.tensor([[1, 3], [2, 3], [3, EOS], [5, 7], [7, EOS]], dtype=torch.int32),
        logprobs=torch.tensor(LOGPROBS, dtype=torch.float32),
        vocabulary=Vocabulary("byte_level", dict(STRINGS), {"eos": EOS, "pad": EOS}),
        model_name="gpt2-lists",
        prompt_style="plain",
    )
    fields.update(changes)
    return ResponseSummary(**fields)


def message(f, entries, *, prompts=PROMPTS, k=2, num_examples=None) -> DistributionSummary:
    return DistributionSummary(
        v=SCHEMA_VERSION,
        network_id=f.NETWORK,
        signer=f.identity(1).public_key,
        created_at=f.NOW,
        round=1,
        card_id="cc" * 32,
        probe_set_fingerprint=probe_set_fingerprint(prompts),
        tokenizer_fingerprint="70" * 32,
        k=k,
        num_examples=len(prompts) if num_examples is None else num_examples,
        chunk_size=f.CHUNK,
        tensors=entries,
    )


def encoded(f, summary: ResponseSummary, **options):
    entries, chunks = encode_summary(summary, chunk_size=f.CHUNK)
    return message(f, entries, **options), chunks


def test_probe_set_fingerprint_is_the_fusion_probe_sets():
    for prompts in (("a",), PROMPTS, ("é ✓\n", "two", "three")):
        assert probe_set_fingerprint(list(prompts)) == ProbeSet(prompts).fingerprint()
    assert probe_set_fingerprint(["a", "b"]) != probe_set_fingerprint(["b", "a"])


def test_round_trip_keeps_every_value(f):
    summary = hand_made()
    signed_message, chunks = encoded(f, summary)
    assert [e.name for e in signed_message.tensors] == [
        "header",
        "logprobs",
        "offsets",
        "target_ids",
        "token_ids",
    ]
    assert all(e.codec.name == "raw" and e.codec.zstd for e in signed_message.tensors)
    assert len(f.sign(signed_message, f.identity(1)).raw) < DistributionSummary.MAX_SIZE
    back = decode_summary(signed_message, chunks, list(PROMPTS))
    assert back.probe.prompts == PROMPTS and back.responses == ("1 2 3", "b a")
    assert back.offsets.tolist() == [0, 3, 5]
    assert back.target_ids.dtype == torch.int32 and back.target_ids.tolist() == [1, 2, 3, 5, 7]
    assert back.token_ids.tolist() == [[1, 3], [2, 3], [3, 9], [5, 7], [7, 9]]
    assert back.logprobs.dtype == torch.float32 and back.logprobs.tolist() == LOGPROBS
    assert back.vocabulary.style == "byte_level"
    assert back.vocabulary.strings == STRINGS
    assert back.vocabulary.specials == {"eos": 9, "pad": 9}
    assert (back.model_name, back.prompt_style, back.k) == ("gpt2-lists", "plain", 2)


def test_header_is_the_canonical_map_of_the_documented_keys(f):
    entries, chunks = encode_summary(hand_made(), zstd=False, chunk_size=f.CHUNK)
    header = next(e for e in entries if e.name == "header")
    raw = b"".join(chunks[c] for c in header.chunks)
    by_hand = {
        "model_name": "gpt2-lists",
        "prompt_style": "plain",
        "responses": ["1 2 3", "b a"],
        "specials": [["eos", 9], ["pad", 9]],
        "strings": [[1, "1"], [2, "Ġ2"], [3, "Ġ3"], [5, "b"], [7, "Ġa"], [9, "<|endoftext|>"]],
        "style": "byte_level",
    }  # keys already in sorted order
    assert raw == msgpack.packb(by_hand, use_bin_type=True)
    assert header.shape == (len(raw),) and header.dtype == "uint8"
    # without zstd the numeric tensors are their little-endian bytes
    offsets = next(e for e in entries if e.name == "offsets")
    assert b"".join(chunks[c] for c in offsets.chunks) == b"".join(v.to_bytes(8, "little") for v in (0, 3, 5))


def test_a_summary_for_another_probe_set_is_refused(f):
    signed_message, chunks = encoded(f, hand_made())
    other = ["Sort: 3 1 2\n", "Reverse: b a\n"]
    ours, theirs = probe_set_fingerprint(other)[:16], probe_set_fingerprint(PROMPTS)[:16]
    with pytest.raises(SchemaError, match=f"another probe set.*{theirs}") as caught:
        decode_summary(signed_message, chunks, other)
    assert ours in str(caught.value)


def test_a_count_other_than_the_probe_sets_is_refused(f):
    three = [*PROMPTS, "third\n"]
    signed_message, chunks = encoded(f, hand_made(), prompts=three, num_examples=2)
    with pytest.raises(SchemaError, match="3 probe prompts, got num_examples 2"):
        decode_summary(signed_message, chunks, three)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"offsets": torch.tensor([0, 0, 5])}, "offsets rising from 0 to 5"),
        ({"offsets": torch.tensor([0, 3, 4])}, "offsets rising from 0 to 5"),
        ({"logprobs": hand_made().logprobs.flip(1)}, "sorted most likely first"),
        ({"logprobs": hand_made().logprobs.abs()}, "log-probs <= 0"),
        ({"vocabulary": Vocabulary("byte_level", {i: s for i, s in STRINGS.items() if i != 7})}, "id 7"),
        ({"responses": ("1 2 3", "b a", "extra")}, "one response and offset per probe prompt"),
        ({"prompt_style": "poem"}, "prompt style"),
    ],
)
def test_inconsistent_summaries_are_refused(f, changes, match):
    signed_message, chunks = encoded(f, hand_made(**changes))
    with pytest.raises(SchemaError, match=match):
        decode_summary(signed_message, chunks, PROMPTS)


def _with_header(f, header: bytes):
    """A message whose header tensor holds `header` and whose other tensors are the hand-made ones."""
    summary = hand_made()
    tensors = {
        "header": torch.frombuffer(bytearray(header), dtype=torch.uint8),
        "logprobs": summary.logprobs,
        "offsets": summary.offsets,
        "target_ids": summary.target_ids,
        "token_ids": summary.token_ids,
    }
    entries, chunks = encode_tensors(tensors, RAW, f.CHUNK)
    return message(f, entries), chunks


GOOD_HEADER = {
    "model_name": "m",
    "prompt_style": "plain",
    "responses": ["1 2 3", "b a"],
    "specials": [["eos", 9]],
    "strings": [[i, s] for i, s in sorted(STRINGS.items())],
    "style": "byte_level",
}


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (b"\xc1not msgpack", "canonical msgpack"),
        (msgpack.packb({"model_name": "m"}), "keys"),
        (msgpack.packb([1, 2]), "keys"),
        (msgpack.packb({**GOOD_HEADER, "strings": [[2, "a"], [1, "b"]]}), "strings sorted"),
        (msgpack.packb({**GOOD_HEADER, "strings": [[1, "a"], [1, "b"]]}), "strings sorted"),
        (msgpack.packb({**GOOD_HEADER, "strings": [[-1, "a"]]}), r"strings rows \[int, str\]"),
        (msgpack.packb({**GOOD_HEADER, "specials": [["pad", 9], ["eos", 9]]}), "specials sorted"),
        (msgpack.packb({**GOOD_HEADER, "specials": [[9, "eos"]]}), r"specials rows \[str, int\]"),
        (msgpack.packb({**GOOD_HEADER, "responses": "1 2 3"}), "responses to be a list"),
        (msgpack.packb({**GOOD_HEADER, "style": 3}), "style to be a str"),
        (msgpack.packb({**GOOD_HEADER, "style": "morse"}), "token style"),
    ],
)
def test_malformed_headers_are_refused(f, header, match):
    signed_message, chunks = _with_header(f, header)
    with pytest.raises(SchemaError, match=match):
        decode_summary(signed_message, chunks, PROMPTS)


def test_the_good_header_decodes(f):
    signed_message, chunks = _with_header(f, msgpack.packb(GOOD_HEADER))
    assert decode_summary(signed_message, chunks, PROMPTS).vocabulary.specials == {"eos": 9}


def test_altered_chunks_are_refused(f):
    signed_message, chunks = encoded(f, hand_made())
    with pytest.raises(HashMismatchError):
        decode_summary(signed_message, {k: v + b"x" for k, v in chunks.items()}, PROMPTS)


def test_message_shape_rules(f):
    signed_message, _ = encoded(f, hand_made())
    with pytest.raises(SchemaError, match=r"5\.\.5 items"):
        dataclasses.replace(signed_message, tensors=signed_message.tensors[:4])
    renamed = dataclasses.replace(signed_message.tensors[0], name="input_ids")
    with pytest.raises(SchemaError, match="summary tensors"):
        dataclasses.replace(signed_message, tensors=(renamed, *signed_message.tensors[1:]))
    with pytest.raises(SchemaError, match=r"token_ids and logprobs of shape \[n, 3\]"):
        dataclasses.replace(signed_message, k=3)
    with pytest.raises(SchemaError, match=r"offsets of shape \[4\]"):
        dataclasses.replace(signed_message, num_examples=3)
    targets = next(e for e in signed_message.tensors if e.name == "target_ids")
    short, _ = encode_tensors({"target_ids": torch.tensor([1, 2], dtype=torch.int32)}, targets.codec, f.CHUNK)
    tensors = tuple(short[0] if e.name == "target_ids" else e for e in signed_message.tensors)
    with pytest.raises(SchemaError, match=r"target_ids of shape \[5\]"):
        dataclasses.replace(signed_message, tensors=tensors)
    header = signed_message.tensors[0]
    huge = dataclasses.replace(header, shape=(64 * 1024 * 1024 + 1,))
    with pytest.raises(SchemaError, match=r"summary header of 1\.\.67108864 bytes"):
        dataclasses.replace(signed_message, tensors=(huge, *signed_message.tensors[1:]))
