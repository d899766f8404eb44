"""Sampled attestations: the sample rule, its byte budget, its proofs, the quorum rule and recomputation."""

from __future__ import annotations

import dataclasses
import hashlib
import statistics

import pytest
import torch

from protocol.aggregate import aggregate, encode_result
from protocol.encoding import pack
from protocol.errors import QuorumError, SchemaError, SignatureError
from protocol.identity import Identity
from protocol.messages import SCHEMA_VERSION, MergeResult
from protocol.quorum import full_quorum
from protocol.shards import plan_shards
from protocol.spotcheck import (
    check_attestation_claim,
    recheck,
    result_sample,
    sample_input,
    sample_tensors,
    sign_sample,
)
from protocol.verify import check_quorum, verify_quorum

CONTRIBUTIONS = ("11" * 32, "22" * 32, "33" * 32, "44" * 32)
NAMES = [f"model.layers.{i}.mlp.weight" for i in range(12)]


def drawn(proof: bytes, names, contributions: int, deltas: int = 2) -> list[str]:
    """The rule written out by hand: sha256(tag || proof || name)[:8] as an integer below f * 2**64."""
    scores = {
        n: int.from_bytes(hashlib.sha256(b"umm-spot-tensor-v1" + proof + n.encode()).digest()[:8], "big")
        for n in names
    }
    threshold = min(deltas, contributions) * 2**64 // contributions  # exact: f * 2**64 rounded down
    picked = sorted(n for n, h in scores.items() if h < threshold or (deltas >= contributions))
    return picked or [min(scores, key=lambda n: (scores[n], n))]


def test_the_sample_is_the_hand_written_rule_and_never_empty():
    for seed in range(40):
        proof = hashlib.sha512(bytes([seed])).digest()
        for contributions in (1, 2, 3, 8, 50):
            expected = drawn(proof, NAMES, contributions)
            assert list(sample_tensors(proof, NAMES, contributions)) == expected
    assert sample_tensors(b"\x00" * 64, ["only"], 1000) == ("only",)
    assert sample_tensors(b"\x00" * 64, NAMES, 2) == tuple(sorted(NAMES))  # f = 1: everything


@pytest.mark.parametrize("contributions", [4, 8, 16, 32])
def test_input_bytes_are_about_two_deltas_plus_at_most_one_tensor_per_shard(contributions):
    # a model of 64 tensors of mixed sizes in `contributions` shards; a checker samples every shard
    sizes = [(f"t{i:02d}", 1000 * (1 + i % 7)) for i in range(64)]
    shards = plan_shards(sizes, min(contributions, len(sizes)))
    size = dict(sizes)
    model = sum(size.values())  # one delta: a model's worth of bytes
    f = min(2, contributions) / contributions
    # expected fetch in deltas: each tensor with probability f from every contribution, and when a
    # shard draws nothing, one of its tensors (uniformly: the smallest of i.i.d. scores)
    expected = 0.0
    for names in shards:
        shard_bytes = sum(size[t] for t in names)
        expected += contributions * (f * shard_bytes + (1 - f) ** len(names) * shard_bytes / len(names))
    expected /= model
    assert 2.0 <= expected <= 2.0 + contributions * len(shards) / len(sizes)  # the documented bound
    ratios = []
    for n in range(60):
        checker = Identity.from_seed(hashlib.sha256(b"checker" + bytes([n])).digest())
        fetched = 0
        for j, names in enumerate(shards):
            proof = checker.sign(pack(["test", j]))
            fetched += contributions * sum(size[t] for t in sample_tensors(proof, names, contributions))
        ratios.append(fetched / model)
    assert abs(statistics.mean(ratios) - expected) < 0.15 * expected, (statistics.mean(ratios), expected)


def _merged_result(who: Identity, f, forge: str | None = None):
    """A shard result of a real ties merge of 4 contributions (optionally one tensor forged), inputs."""
    gen = torch.Generator().manual_seed(7)
    base = {name: torch.randn(8, 16, generator=gen) for name in NAMES}
    deltas = {cid: {n: torch.randn(8, 16, generator=gen) * 0.01 for n in NAMES} for cid in CONTRIBUTIONS}
    recipe = f.recipe(contributions=CONTRIBUTIONS)
    merged = aggregate(recipe, base, deltas)
    if forge is not None:
        merged[forge] = merged[forge] + 0.01
    entries, _, fingerprint = encode_result(merged, f.CHUNK)
    message = MergeResult(
        v=SCHEMA_VERSION,
        network_id=f.NETWORK,
        signer=who.public_key,
        created_at=f.NOW - 10,
        round=1,
        recipe=recipe,
        chunk_size=f.CHUNK,
        tensors=entries,
        merged_fingerprint=fingerprint,
        shard=0,
        shards=1,
        candidates=CONTRIBUTIONS,
    )
    return f.sign(message, who), base, deltas


def _sampled(f, checker: Identity, signed, **changes):
    proof = sign_sample(checker, signed.message)
    names = result_sample(proof, signed.message)
    sizes = {t.name: t.nbytes for t in signed.message.tensors}
    fields = dict(
        kind="sampled",
        checked_tensors=len(names),
        checked_bytes=sum(sizes[n] for n in names),
        sample_proof=proof,
    )
    fields.update(changes)
    return f.sign(f.attestation(checker, signed, **fields), checker)


def test_the_proof_is_the_checkers_deterministic_signature_of_the_results_content(f):
    signed, _, _ = _merged_result(f.identity(1), f)
    m = signed.message
    by_hand = pack(["umm-spot-v1", f.NETWORK, 1, 0, 1, m.recipe.id, m.merged_fingerprint])
    assert sample_input(m) == by_hand
    checker, other = f.identity(5), f.identity(6)
    assert sign_sample(checker, m) == checker.sign(by_hand) == sign_sample(checker, m)
    assert sign_sample(other, m) != sign_sample(checker, m)  # another key draws another sample
    forged, _, _ = _merged_result(f.identity(1), f, forge=NAMES[0])
    assert sample_input(forged.message) != by_hand  # other result content: a fresh, unknown draw


def test_a_quorum_needs_full_attestations_and_counts_sampled_ones(f):
    signed, _, _ = _merged_result(f.identity(1), f)
    full = [f.sign(f.attestation(f.identity(n), signed), f.identity(n)) for n in (1, 2)]
    sampled = [_sampled(f, f.identity(n), signed) for n in (3, 4, 5)]
    assert full_quorum(5) == 2 and full_quorum(1) == 1
    outcome = check_quorum(signed, [a.raw for a in full + sampled], quorum=5, network_id=f.NETWORK)
    assert outcome.ok and len(outcome.full_signers) == 2 and len(outcome.signers) == 5
    one_full = [full[0].raw] + [a.raw for a in sampled]
    outcome = check_quorum(signed, one_full, quorum=4, network_id=f.NETWORK)
    assert not outcome.ok and outcome.missing == 1
    with pytest.raises(QuorumError, match="full attestations from at least 2 distinct signers, got 1"):
        verify_quorum(signed, one_full, quorum=4, network_id=f.NETWORK)


def test_a_sampled_attestation_must_claim_exactly_its_proofs_sample(f):
    signed, _, _ = _merged_result(f.identity(1), f)
    m = signed.message
    good = _sampled(f, f.identity(3), signed).message
    check_attestation_claim(good, m)
    wrong_count = dataclasses.replace(good, checked_tensors=good.checked_tensors + 1)
    with pytest.raises(SchemaError, match="to claim"):
        check_attestation_claim(wrong_count, m)
    borrowed = dataclasses.replace(good, sample_proof=sign_sample(f.identity(4), m))  # another key's draw
    with pytest.raises(SignatureError):
        check_attestation_claim(borrowed, m)
    full_claiming_less = f.attestation(f.identity(2), signed, checked_tensors=1)
    with pytest.raises(SchemaError, match="full attestation to claim 12 tensors"):
        check_attestation_claim(full_claiming_less, m)
    rejected = check_quorum(
        signed, [f.sign(wrong_count, f.identity(3)).raw], quorum=1, network_id=f.NETWORK, full=0
    )
    assert not rejected.ok and "to claim" in rejected.rejected[0][1]
    with pytest.raises(SchemaError, match="64-byte sample_proof for a sampled"):
        f.attestation(f.identity(3), signed, kind="sampled", sample_proof=b"")


def test_a_forged_tensor_is_caught_exactly_when_the_checkers_sample_holds_it(f):
    publisher, checker = f.identity(1), f.identity(9)
    honest, base, deltas = _merged_result(publisher, f)
    assert recheck(honest.message, NAMES, base, deltas, NAMES) == ()
    caught = {}
    for name in NAMES:
        forged, _, _ = _merged_result(publisher, f, forge=name)
        m = forged.message
        # the checker's draw, computed here by hand: its signature of the forged result's content
        content = pack(
            ["umm-spot-v1", f.NETWORK, m.round, m.shard, m.shards, m.recipe.id, m.merged_fingerprint]
        )
        sample = drawn(checker.sign(content), NAMES, len(CONTRIBUTIONS))
        assert list(result_sample(sign_sample(checker, m), m)) == sample
        caught[name] = name in sample
        assert recheck(m, sample, base, deltas, NAMES) == ((name,) if caught[name] else ())
    assert set(caught.values()) == {True, False}  # some forgeries are caught, others escape this checker
