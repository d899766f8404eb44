"""The deterministic round rules: which contributions count, robust admission, and the recipe."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from node_messages import signed_contribution, unit_genesis

from node.genesis import Genesis
from node.rounds import (
    Contribution,
    admit,
    contribution_problem,
    plan_round,
    select_contributions,
)
from protocol.chunks import decode_tensors, encode_tensors
from protocol.codecs import parse_codec
from protocol.envelope import sign_message
from protocol.errors import NonFiniteValuesError
from protocol.identity import Identity

CHUNK = 4096
NOW = 1_800_000_000


def _genesis(**changes) -> Genesis:
    return unit_genesis(chunk_size=CHUNK, now=NOW, **changes)


GENESIS = _genesis()
BASE = {"a.weight": torch.zeros(8, 16), "b.weight": torch.zeros(16)}
BASE_ENTRIES = encode_tensors(BASE, parse_codec("bf16"), CHUNK)[0]


def _who(n: int) -> Identity:
    return Identity.from_seed(bytes([n]) * 32)


def _contribution(
    who: Identity, *, scale: float = 0.01, seed: int = 0, genesis: Genesis = GENESIS, **changes
):
    return signed_contribution(
        who, genesis, BASE, chunk_size=CHUNK, now=NOW, scale=scale, seed=seed, manifest_changes=changes
    )


def test_valid_pairs_are_selected_in_id_order():
    pairs = [_contribution(_who(n), seed=n)[:2] for n in (1, 2, 3)]
    chosen = select_contributions(GENESIS, 0, pairs)
    assert [c.id for c in chosen] == sorted(m.id for _, m in pairs)


def test_forged_manifest_for_another_signers_card_is_ignored():
    victim_card, _, _ = _contribution(_who(1))
    attacker = _who(66)
    _, forged, _ = _contribution(
        attacker, card_id=victim_card.id
    )  # signed by the attacker, names the victim's card
    assert (
        contribution_problem(GENESIS, 0, victim_card, forged)
        == "expected the manifest signed by the card's signer"
    )
    assert select_contributions(GENESIS, 0, [(victim_card, forged)]) == []


def test_manifest_naming_another_card_is_ignored():
    card, _, _ = _contribution(_who(1))
    other_card = sign_message(dataclasses.replace(card.message, name="other"), _who(1))
    _, manifest, _ = _contribution(_who(1), card_id=other_card.id)
    assert contribution_problem(GENESIS, 0, card, manifest).startswith("expected card_id")


def test_replayed_manifest_from_another_round_is_ignored():
    card, manifest, _ = _contribution(_who(1), round=3)
    assert contribution_problem(GENESIS, 4, card, manifest) == "expected round 4, got 3"
    assert select_contributions(GENESIS, 4, [(card, manifest)]) == []


def test_manifest_for_another_base_or_chunk_size_is_ignored():
    card, manifest, _ = _contribution(_who(1), base_fingerprint="cd" * 32)
    assert (
        contribution_problem(GENESIS, 0, card, manifest)
        == "expected the genesis base and architecture fingerprints"
    )
    card, manifest, _ = _contribution(_who(1), chunk_size=8192)
    assert contribution_problem(GENESIS, 0, card, manifest) == f"expected chunk size {CHUNK}, got 8192"


def test_allowlist_excludes_non_members():
    members = _genesis(members=(_who(1).public_key,))
    ok = _contribution(_who(1), genesis=members)[:2]
    outsider = _contribution(_who(2), genesis=members)[:2]
    assert contribution_problem(members, 0, *outsider) == "expected a member of the network's allowlist"
    assert [c.signer for c in select_contributions(members, 0, [ok, outsider])] == [_who(1).public_key]


def test_one_contribution_per_signer_newest_wins():
    card, older, _ = _contribution(_who(1), created_at=NOW - 60)
    _, newer, _ = _contribution(_who(1), created_at=NOW - 30, seed=9)
    chosen = select_contributions(GENESIS, 0, [(card, newer), (card, older)])
    assert [c.id for c in chosen] == [newer.id]
    _, twin, _ = _contribution(_who(1), created_at=NOW - 30, seed=10)  # same time: the smaller id wins
    chosen = select_contributions(GENESIS, 0, [(card, newer), (card, twin)])
    assert [c.id for c in chosen] == [min(newer.id, twin.id)]


def _decoder(chunks_by_id):
    def decode(contribution: Contribution, names: tuple[str, ...]):
        manifest = contribution.manifest.message
        entries = tuple(t for t in manifest.tensors if t.name in names)
        return decode_tensors(entries, chunks_by_id[contribution.id].__getitem__, manifest.chunk_size)

    return decode


def test_admission_excludes_an_outlier_norm():
    made = [_contribution(_who(n), seed=n) for n in (1, 2, 3)] + [_contribution(_who(4), seed=4, scale=1.0)]
    contributions = select_contributions(GENESIS, 0, [m[:2] for m in made])
    chunks = {m[1].id: m[2] for m in made}
    admission, deltas = admit(GENESIS, contributions, BASE_ENTRIES, _decoder(chunks))
    poisoned = made[3][1].id
    assert admission.admitted == tuple(sorted(m[1].id for m in made[:3]))
    # x100 on every tensor: the first tensor in name order is the one the fault names
    assert admission.rejected[poisoned].startswith("expected a.weight's delta norm <= 3 x median")
    assert admission.faults[poisoned][0] == "a.weight" and admission.faults[poisoned][1].kind == "outlier"
    assert set(deltas) == set(admission.admitted)


def test_admission_excludes_one_small_tensor_far_above_the_others_same_tensor():
    """x4 on the small tensor b alone: b's delta norm is 4 x that of the others' b, so the
    per-tensor rule excludes it (a.weight, the large tensor, is like the others')."""
    made = [_contribution(_who(n), seed=n) for n in (1, 2, 3)]
    contributions = select_contributions(GENESIS, 0, [m[:2] for m in made])
    decode = _decoder({m[1].id: m[2] for m in made})
    poisoned = made[2][1].id

    def decode_scaled(contribution, names):
        deltas = dict(decode(contribution, names))
        if contribution.id == poisoned and "b.weight" in deltas:
            deltas["b.weight"] = deltas["b.weight"] * 4
        return deltas

    admission, _ = admit(GENESIS, contributions, BASE_ENTRIES, decode_scaled)
    assert admission.admitted == tuple(sorted(m[1].id for m in made[:2]))
    assert admission.rejected[poisoned].startswith("expected b.weight's delta norm <= 3 x median")
    assert admission.faults[poisoned][0] == "b.weight"


def test_with_two_contributions_no_norm_is_an_outlier():
    made = [_contribution(_who(1), seed=1), _contribution(_who(2), seed=2, scale=1.0)]
    contributions = select_contributions(GENESIS, 0, [m[:2] for m in made])
    admission, _ = admit(GENESIS, contributions, BASE_ENTRIES, _decoder({m[1].id: m[2] for m in made}))
    assert admission.admitted == tuple(sorted(m[1].id for m in made))


def test_undecodable_and_misshapen_contributions_are_rejected():
    good = [_contribution(_who(n), seed=n) for n in (1, 2)]
    nan = _contribution(_who(3), seed=3)
    contributions = select_contributions(GENESIS, 0, [m[:2] for m in [*good, nan]])
    chunks = {m[1].id: m[2] for m in [*good, nan]}
    decode = _decoder(chunks)

    def decode_with_nan(contribution, names):
        if contribution.id == nan[1].id and "b.weight" in names:
            raise NonFiniteValuesError("expected finite values, got NaN")
        return decode(contribution, names)

    admission, _ = admit(GENESIS, contributions, BASE_ENTRIES, decode_with_nan)
    assert admission.rejected == {
        nan[1].id: "b.weight: NonFiniteValuesError: expected finite values, got NaN"
    }
    assert admission.faults[nan[1].id][0] == "b.weight"
    assert admission.faults[nan[1].id][1].kind == "undecodable"
    other_base = encode_tensors({"a.weight": torch.zeros(8, 16)}, parse_codec("bf16"), CHUNK)[0]
    admission, _ = admit(GENESIS, contributions[:1], other_base, decode)
    assert admission.admitted == ()
    assert list(admission.rejected.values()) == ["expected exactly the base's tensor names and shapes"]
    assert admission.faults == {}  # a manifest check: every node sees it, nothing to publish


def test_an_undecodable_contribution_is_left_out_of_the_norm_comparison():
    """Four contributions, one undecodable in b.weight and x100 in a.weight: the rule compares the
    three decodable ones, so a spike that would have moved the median is not counted, and the
    excluded set names the one fault it found first (undecodable wins over outlier)."""
    made = [_contribution(_who(n), seed=n) for n in (1, 2, 3, 4)]
    contributions = select_contributions(GENESIS, 0, [m[:2] for m in made])
    decode = _decoder({m[1].id: m[2] for m in made})
    bad, spiky = made[3][1].id, made[2][1].id

    def decode_bad(contribution, names):
        if contribution.id == bad and "b.weight" in names:
            raise NonFiniteValuesError("expected finite values, got Inf")
        deltas = dict(decode(contribution, names))
        if contribution.id == bad and "a.weight" in deltas:
            deltas["a.weight"] = deltas["a.weight"] * 100
        if contribution.id == spiky and "a.weight" in deltas:
            deltas["a.weight"] = deltas["a.weight"] * 5
        return deltas

    admission, _ = admit(GENESIS, contributions, BASE_ENTRIES, decode_bad)
    assert admission.faults[bad][1].kind == "undecodable"
    assert admission.faults[spiky][1].kind == "outlier"  # 5 x among the three decodable ones
    assert admission.admitted == tuple(sorted(m[1].id for m in made[:2]))
    # a fault confirmed elsewhere: the contribution is not read, and the rule compares the rest
    excluded, _ = admit(GENESIS, contributions, BASE_ENTRIES, decode_bad, ["a.weight"], excluded=[bad])
    assert excluded.rejected[bad] == "excluded by a confirmed fault of the round"
    assert set(excluded.faults) == {spiky}


def test_recipe_is_identical_for_the_same_contributions_in_any_order():
    ids = ["22" * 32, "11" * 32, "33" * 32]
    first = GENESIS.recipe(0, ids)
    second = GENESIS.recipe(0, list(reversed(ids)))
    assert first.to_bytes() == second.to_bytes()
    assert first.contributions == tuple(sorted(ids))
    assert GENESIS.recipe(1, ids).id != first.id


@pytest.mark.parametrize(
    ("quorum", "contributors", "needed"), [(0, 1, 2), (0, 3, 2), (0, 4, 3), (0, 5, 3), (3, 9, 3)]
)
def test_quorum_is_a_majority_of_contributors_at_least_two(quorum, contributors, needed):
    assert _genesis(quorum=quorum).quorum_for(contributors) == needed


# --------------------------------------------------------------------------- sharded rounds

WIDE_BASE = {f"t{i}.weight": torch.zeros(4 + 4 * i, 16) for i in range(6)}
WIDE_ENTRIES = encode_tensors(WIDE_BASE, parse_codec("raw"), CHUNK)[0]


def test_plan_round_splits_every_tensor_once_with_distinct_workers():
    made = [_contribution(_who(n), seed=n) for n in (1, 2, 3, 4, 5)]
    contributions = select_contributions(_genesis(quorum=2), 0, [m[:2] for m in made])
    plan = plan_round(_genesis(quorum=2), contributions, WIDE_ENTRIES)
    again = plan_round(_genesis(quorum=2), list(reversed(contributions)), WIDE_ENTRIES)
    assert plan == again  # deterministic, independent of the order seen
    assert plan.workers == tuple(sorted(_who(n).public_key for n in (1, 2, 3, 4, 5)))
    assert plan.candidates == tuple(sorted(c.id for c in contributions))
    assert plan.quorum == 2 and plan.replicas == 3 and len(plan.shards) == 5
    names = [n for shard in plan.shards for n in shard]
    assert sorted(names) == sorted(WIDE_BASE) and len(names) == len(set(names))
    for j in range(5):
        assert len(set(plan.workers_of(j))) == 3
    # worker at position p computes shards p-2, p-1, p (mod 5)
    assert plan.shards_of(plan.workers[0]) == (0, 3, 4)
    assert all(len(plan.shards_of(w)) == 3 for w in plan.workers)
    assert plan.shards_of(_who(9).public_key) == ()
    # byte balance: the heaviest shard holds at most the mean plus the largest tensor
    size = {e.name: e.nbytes for e in WIDE_ENTRIES}
    loads = [sum(size[n] for n in shard) for shard in plan.shards]
    assert max(loads) <= sum(size.values()) / 5 + max(size.values())


def test_plan_round_with_fewer_workers_than_the_quorum_needs():
    made = [_contribution(_who(n), seed=n) for n in (1, 2)]
    genesis = _genesis(quorum=3)
    plan = plan_round(genesis, select_contributions(genesis, 0, [m[:2] for m in made]), WIDE_ENTRIES)
    assert (plan.quorum, plan.replicas, len(plan.shards)) == (3, 2, 2)


def test_shard_admission_looks_at_the_shards_tensors_only():
    good = [_contribution(_who(n), seed=n) for n in (1, 2, 3)]
    spiky = _contribution(_who(4), seed=4)
    contributions = select_contributions(GENESIS, 0, [m[:2] for m in [*good, spiky]])
    chunks = {m[1].id: m[2] for m in [*good, spiky]}
    decode = _decoder(chunks)

    def decode_spiky(contribution, names):
        deltas = dict(decode(contribution, names))
        if contribution.id == spiky[1].id and "b.weight" in deltas:
            deltas["b.weight"] = deltas["b.weight"] * 1000  # an outlier in b.weight only
        return deltas

    on_a, deltas_a = admit(GENESIS, contributions, BASE_ENTRIES, decode_spiky, ["a.weight"])
    on_b, _ = admit(GENESIS, contributions, BASE_ENTRIES, decode_spiky, ["b.weight"])
    assert spiky[1].id in on_a.admitted and set(deltas_a[spiky[1].id]) == {"a.weight"}
    assert spiky[1].id not in on_b.admitted
    assert on_b.rejected[spiky[1].id].startswith("expected b.weight's delta norm <= 3 x median")
    assert on_b.faults[spiky[1].id][0] == "b.weight"  # what the worker publishes: node.faults
    # the name/shape check stays global: a manifest missing any base tensor fails every shard
    other_base = encode_tensors({**BASE, "c.weight": torch.zeros(2)}, parse_codec("bf16"), CHUNK)[0]
    on_a, _ = admit(GENESIS, contributions, other_base, decode, ["a.weight"])
    assert on_a.admitted == ()


def test_every_worker_of_a_shard_admits_identically():
    made = [_contribution(_who(n), seed=n) for n in (1, 2, 3)] + [_contribution(_who(4), seed=4, scale=1.0)]
    chunks = {m[1].id: m[2] for m in made}
    outcomes = set()
    for order in (made, list(reversed(made)), made[1:] + made[:1]):
        contributions = select_contributions(GENESIS, 0, [m[:2] for m in order])
        admission, _ = admit(GENESIS, contributions, BASE_ENTRIES, _decoder(chunks), ["b.weight"])
        outcomes.add((admission.admitted, tuple(sorted(admission.rejected))))
    assert outcomes == {(tuple(sorted(m[1].id for m in made[:3])), (made[3][1].id,))}
