"""protocol.quorum and protocol.decision: the quorum rule and the one verifier of a sharded round."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from protocol.aggregate import RAW
from protocol.chunks import encode_tensors
from protocol.decision import ShardAttestations, decide_round, wanted_results
from protocol.errors import SchemaError
from protocol.quorum import full_quorum, least_quorum, quorum_for
from protocol.shards import assembled_fingerprint, plan_shards
from protocol.verify import check_quorum


@dataclasses.dataclass
class _Entries:
    tensors: tuple


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {f"t{i}": torch.randn(3 + i, 4, generator=gen) for i in range(4)}


def _round(f, *, publisher=1, candidates=("11" * 32, "22" * 32), count=2, round_number=1):
    """A round's shard results by `publisher` for the plan of `count` shards, and the base sizes."""
    tensors = _tensors()
    sizes = [(n, t.numel() * 4) for n, t in tensors.items()]
    who = f.identity(publisher)
    results = []
    for j, names in enumerate(plan_shards(sizes, count)):
        entries, _ = encode_tensors({n: tensors[n] for n in names}, RAW, f.CHUNK)
        message, _ = f.result(
            who,
            round_number=round_number,
            tensors=entries,
            merged_fingerprint=assembled_fingerprint([_Entries(entries)]),
            shard=j,
            shards=count,
            candidates=tuple(sorted(candidates)),
        )
        results.append(f.sign(message, who))
    return tensors, sizes, results


def _attest(f, result, *signers, **changes) -> list[bytes]:
    return [f.sign(f.attestation(f.identity(n), result, **changes), f.identity(n)).raw for n in signers]


def _shards(f, results, signers_per_shard, round_number=1) -> list[ShardAttestations]:
    return [
        ShardAttestations.verify(
            _attest(f, result, *signers), network_id=f.NETWORK, round_number=round_number, shard=j, now=f.NOW
        )
        for j, (result, signers) in enumerate(zip(results, signers_per_shard, strict=True))
    ]


def _decide(f, shards, results, sizes, quorum_setting=2, **kwargs):
    return decide_round(
        1,
        shards,
        {r.id: r.raw for r in results},
        base_sizes=sizes,
        network_id=f.NETWORK,
        quorum_setting=quorum_setting,
        now=f.NOW,
        **kwargs,
    )


def test_the_quorum_rule_is_fixed_or_a_majority_of_at_least_two():
    assert [quorum_for(0, n) for n in (0, 1, 2, 3, 4, 5, 8)] == [2, 2, 2, 2, 3, 3, 5]
    assert [quorum_for(4, n) for n in (0, 3, 9)] == [4, 4, 4]
    assert (least_quorum(0), least_quorum(1), least_quorum(7)) == (2, 1, 7)
    assert [full_quorum(q) for q in (1, 2, 3, 9)] == [1, 2, 2, 2]


def test_a_round_with_a_quorum_on_every_shard_is_decided_with_the_whole_models_fingerprint(f):
    tensors, sizes, results = _round(f)
    found = _decide(f, _shards(f, results, [(1, 2), (2, 3, 4)]), results, sizes)
    entries, _ = encode_tensors(tensors, RAW, f.CHUNK)
    assert found is not None
    assert found.fingerprint == assembled_fingerprint([_Entries(tuple(entries))])
    assert [s.result.id for s in found.shards] == [r.id for r in results]
    assert (found.signers, found.round, found.candidates) == (2, 1, ("11" * 32, "22" * 32))
    assert [t.name for t in found.tensors] == sorted(tensors)


def test_a_shard_short_of_its_quorum_or_of_its_result_bytes_leaves_the_round_undecided(f):
    _, sizes, results = _round(f)
    assert _decide(f, _shards(f, results, [(1, 2), (3,)]), results, sizes) is None
    shards = _shards(f, results, [(1, 2), (2, 3)])
    assert _decide(f, shards, results[:1], sizes) is None  # shard 1's result could not be fetched
    assert _decide(f, shards, results, sizes, quorum_setting=3) is None


def test_only_allowed_signers_count(f):
    _, sizes, results = _round(f)
    shards = _shards(f, results, [(1, 2), (1, 2)])
    allowed = frozenset({f.identity(1).public_key, f.identity(3).public_key})
    assert _decide(f, shards, results, sizes, allowed_signers=allowed) is None
    allowed |= {f.identity(2).public_key}
    assert _decide(f, shards, results, sizes, allowed_signers=allowed) is not None


def test_of_two_complete_rounds_the_one_with_more_signers_wins(f):
    _, sizes, few = _round(f, candidates=("11" * 32, "22" * 32))
    _, _, many = _round(f, candidates=("11" * 32, "22" * 32, "33" * 32))
    raws = [_attest(f, few[j], 1, 2) + _attest(f, many[j], 1, 2, 3) for j in range(2)]
    shards = [
        ShardAttestations.verify(raw, network_id=f.NETWORK, round_number=1, shard=j)
        for j, raw in enumerate(raws)
    ]
    found = _decide(f, shards, [*few, *many], sizes)
    assert found.candidates == ("11" * 32, "22" * 32, "33" * 32) and found.signers == 3


def test_attestations_are_opened_once_and_those_of_other_rounds_shards_or_networks_dropped(f):
    _, _, results = _round(f)
    good = _attest(f, results[0], 1, 2)
    other_shard = _attest(f, results[1], 3)
    other_round = _attest(f, results[0], 4, round=2)
    forged = good[0][:-3] + b"abc"
    other_network = _attest(f, results[0], 5, network_id="othernet")
    raws = [*good, good[0], *other_shard, *other_round, forged, *other_network, b"junk"]
    held = ShardAttestations.verify(raws, network_id=f.NETWORK, round_number=1, shard=0)
    assert list(held.by_result) == [results[0].id]
    assert held.raw(results[0].id) == good  # the duplicate once
    assert held.attesters(results[0].id)[0] == {f.identity(1).public_key, f.identity(2).public_key}
    assert held.counts == {2}


def test_results_rank_by_full_then_all_attesters_then_id(f):
    _, _, (a, _) = _round(f, publisher=1)
    _, _, (b, _) = _round(f, publisher=2)
    sampled = dict(kind="sampled", checked_tensors=1, checked_bytes=4, sample_proof=b"p" * 64)
    raws = _attest(f, a, 1) + _attest(f, b, 2) + _attest(f, b, 3, 4, **sampled)
    held = ShardAttestations.verify(raws, network_id=f.NETWORK, round_number=1, shard=0)
    assert held.rank(a.id) == (-1, -1, a.id) and held.rank(b.id) == (-1, -3, b.id)
    assert held.ranked() == [b.id, a.id]
    assert held.tally() == ", ".join(
        sorted([f"{a.id[:8]} 1f+0s", f"{b.id[:8]} 1f+2s"], key=lambda part: part[:8])
    )
    # b has 3 attesters but 1 full: a quorum of 3 needs 2 full ones
    assert not held.reaches(3) and held.reaches(1)
    more = ShardAttestations.verify([*raws, *_attest(f, b, 5)], network_id=f.NETWORK, round_number=1, shard=0)
    assert more.ranked()[0] == b.id and more.reaches(3) and more.reaches(4) and not more.reaches(5)


def test_results_worth_fetching_have_the_least_quorum_of_distinct_attesters(f):
    _, _, (a, b) = _round(f)
    shards = _shards(f, [a, b], [(1,), (1, 2)])
    assert wanted_results(shards, 0) == {b.id}  # least quorum 2
    assert wanted_results(shards, 1) == {a.id, b.id}
    assert wanted_results(shards, 3) == set()


def test_a_pre_verified_attestation_of_another_network_is_refused_by_the_quorum_check(f):
    _, _, (a, _) = _round(f)
    foreign = ShardAttestations.verify(
        _attest(f, a, 1, network_id="othernet"), network_id="othernet", round_number=1, shard=0
    )
    outcome = check_quorum(a, foreign.by_result[a.id], quorum=1, network_id=f.NETWORK)
    assert not outcome.ok and outcome.rejected[0][1].startswith(SchemaError.reason)
    held = ShardAttestations.verify(_attest(f, a, 1), network_id=f.NETWORK, round_number=1, shard=0)
    assert check_quorum(a, held.by_result[a.id], quorum=1, network_id=f.NETWORK, full=1).ok


@pytest.mark.parametrize("late", [10_000, 100])
def test_attestations_from_the_far_future_are_dropped_when_read(f, late):
    _, _, (a, _) = _round(f)
    raw = _attest(f, a, 1, created_at=f.NOW + late)
    held = ShardAttestations.verify(raw, network_id=f.NETWORK, round_number=1, shard=0, now=f.NOW)
    assert (a.id in held.by_result) == (late == 100)  # within the clock skew allowed, it counts


def test_a_reader_that_keeps_what_it_opened_opens_each_attestation_once(f):
    _, _, (a, b) = _round(f)
    raws = _attest(f, a, 1, 2)
    opened: dict = {}
    first = ShardAttestations.verify(raws, network_id=f.NETWORK, round_number=1, shard=0, opened=opened)
    assert set(opened) == set(raws) and first.attesters(a.id)[0] == {
        f.identity(1).public_key,
        f.identity(2).public_key,
    }
    # what is held is not opened again: a held entry (here swapped for another attestation) is used
    opened[raws[0]] = ShardAttestations.verify(
        _attest(f, b, 3), network_id=f.NETWORK, round_number=1, shard=1
    ).by_result[b.id][0]
    again = ShardAttestations.verify(raws, network_id=f.NETWORK, round_number=1, shard=0, opened=opened)
    assert again.attesters(a.id)[0] == {f.identity(2).public_key}  # the swapped one names shard 1
    assert (
        ShardAttestations.verify(
            [b"junk"], network_id=f.NETWORK, round_number=1, shard=0, opened=opened
        ).by_result
        == {}
    )
    assert b"junk" not in opened  # failures are not remembered
