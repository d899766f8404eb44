import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from merging.distribution import token_strings, top_k_distribution
from merging.errors import MergeError
from protocol.errors import HashMismatchError, SchemaError
from protocol.messages import SCHEMA_VERSION, DistributionSummary
from protocol.summary import decode_summary, encode_summary, probe_set_fingerprint

VOCAB = [f"<{c}>" for c in "abcdefghijklmnopqrstuvwx"]


class CharTokenizer:
    """One token per letter a..x (id = position in the alphabet), enough for a tiny LM."""

    def __call__(self, text, truncation=True, max_length=512, return_tensors="pt"):
        ids = [ord(c) - ord("a") for c in text][:max_length]
        return {"input_ids": torch.tensor([ids], dtype=torch.int64)}

    def convert_ids_to_tokens(self, ids):
        return [VOCAB[i] for i in ids]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


TEXTS = ["abcab", "xw", "hello"]


def test_top_k_matches_a_plain_reference(model):
    dist = top_k_distribution(model, CharTokenizer(), TEXTS, k=3)
    assert dist.offsets.tolist() == [0, 5, 7, 12]
    assert dist.input_ids.dtype == torch.int32 and dist.token_ids.shape == (12, 3)
    for index, text in enumerate(TEXTS):
        ids = [ord(c) - ord("a") for c in text]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        inputs, top_ids, top_logps = dist.example(index)
        assert inputs.tolist() == ids
        for pos in range(len(ids)):
            row = logits[pos].tolist()
            norm = torch.logsumexp(logits[pos], 0).item()
            best = sorted(range(len(row)), key=lambda j: (-row[j], j))[:3]
            assert top_ids[pos].tolist() == best
            assert top_logps[pos].tolist() == pytest.approx([row[j] - norm for j in best], abs=1e-5)


def test_top_k_errors(model):
    with pytest.raises(MergeError, match="at least one text"):
        top_k_distribution(model, CharTokenizer(), [])
    with pytest.raises(MergeError, match="vocabulary size 24"):
        top_k_distribution(model, CharTokenizer(), ["ab"], k=25)
    with pytest.raises(MergeError, match="at least one token"):
        top_k_distribution(model, CharTokenizer(), [""])


def summary_for(f, dist, strings):
    entries, chunks = encode_summary(dist, strings, chunk_size=f.CHUNK)
    who = f.identity(1)
    summary = DistributionSummary(
        v=SCHEMA_VERSION,
        network_id=f.NETWORK,
        signer=who.public_key,
        created_at=f.NOW,
        round=1,
        card_id="cc" * 32,
        probe_set_fingerprint=probe_set_fingerprint(TEXTS),
        tokenizer_fingerprint="70" * 32,
        k=dist.k,
        num_examples=len(dist.offsets) - 1,
        chunk_size=f.CHUNK,
        tensors=entries,
    )
    return summary, chunks


def test_summary_round_trip(f, model):
    dist = top_k_distribution(model, CharTokenizer(), TEXTS, k=4)
    strings = token_strings(CharTokenizer(), dist)
    summary, chunks = summary_for(f, dist, strings)
    signed = f.sign(summary, f.identity(1))
    assert len(signed.raw) < DistributionSummary.MAX_SIZE
    back, back_strings = decode_summary(summary, chunks)
    assert back_strings == strings and set(strings) >= set(dist.input_ids.tolist())
    for name in ("offsets", "input_ids", "token_ids", "logprobs"):
        assert torch.equal(getattr(back, name), getattr(dist, name))


def test_summary_consistency_checks(f, model):
    dist = top_k_distribution(model, CharTokenizer(), TEXTS, k=4)
    strings = token_strings(CharTokenizer(), dist)
    missing = {i: s for i, s in strings.items() if i != int(dist.token_ids[0, 0])}
    summary, chunks = summary_for(f, dist, missing)
    with pytest.raises(SchemaError, match="token string for every id"):
        decode_summary(summary, chunks)
    unsorted = dataclasses.replace(dist, logprobs=dist.logprobs.flip(1))
    summary, chunks = summary_for(f, unsorted, strings)
    with pytest.raises(SchemaError, match="sorted most likely first"):
        decode_summary(summary, chunks)
    bad_offsets = dataclasses.replace(dist, offsets=torch.tensor([0, 6, 5, 12]))
    summary, chunks = summary_for(f, bad_offsets, strings)
    with pytest.raises(SchemaError, match="offsets"):
        decode_summary(summary, chunks)
    summary, chunks = summary_for(f, dist, strings)
    with pytest.raises(HashMismatchError):
        decode_summary(summary, {k: v + b"x" for k, v in chunks.items()})
    with pytest.raises(SchemaError, match=r"5\.\.5 items"):
        dataclasses.replace(summary, tensors=summary.tensors[:4])
    renamed = dataclasses.replace(summary.tensors[4], name="zz")
    with pytest.raises(SchemaError, match="summary tensors"):
        dataclasses.replace(summary, tensors=(*summary.tensors[:4], renamed))


def test_probe_set_fingerprint_depends_on_order():
    assert probe_set_fingerprint(["a", "b"]) != probe_set_fingerprint(["b", "a"])
    assert len(probe_set_fingerprint(["a"])) == 64
