"""Tensor sharding: the plan, the worker assignment, shard merges equal to the full merge, round quorum."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from protocol.aggregate import aggregate, encode_result
from protocol.chunks import encode_tensors
from protocol.codecs import CodecSpec
from protocol.errors import QuorumError, SchemaError
from protocol.messages import MergeRecipe, MergeResult
from protocol.shards import (
    assembled_fingerprint,
    plan_shards,
    replica_count,
    shard_count,
    shard_workers,
    shards_of_worker,
)
from protocol.verify import check_round_quorum, verify_round_quorum

RAW = CodecSpec(name="raw", zstd=False, k=0, block_size=0)
SIZES = [("a", 100), ("b", 90), ("c", 60), ("d", 50), ("e", 40), ("f", 30), ("g", 10), ("h", 5)]


def test_plan_is_the_hand_computed_greedy_split():
    # largest first to the lightest shard (ties: lower index):
    # a->0 (100), b->1 (90), c->2 (60), d->2 (110), e->1 (130), f->0 (130), g->0 (140)... see below
    plan = plan_shards(SIZES, 3)
    # a:0=100  b:1=90  c:2=60  d:2=110  e:1=130  f:0=130  g:2=120  h:2=125
    assert plan == (("a", "f"), ("b", "e"), ("c", "d", "g", "h"))


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_plan_covers_every_tensor_once_and_is_balanced(count):
    plan = plan_shards(SIZES, count)
    names = [n for shard in plan for n in shard]
    assert sorted(names) == sorted(n for n, _ in SIZES) and len(names) == len(set(names))
    assert all(shard and list(shard) == sorted(shard) for shard in plan)
    sizes = dict(SIZES)
    loads = [sum(sizes[n] for n in shard) for shard in plan]
    mean = sum(sizes.values()) / count
    assert max(loads) <= mean + max(sizes.values())
    assert plan_shards(list(reversed(SIZES)), count) == plan  # input order does not matter


def test_plan_refuses_impossible_counts():
    with pytest.raises(RuntimeError):
        plan_shards(SIZES, 9)
    with pytest.raises(RuntimeError):
        plan_shards(SIZES, 0)
    assert shard_count(workers=12, tensors=8) == 8 and shard_count(workers=3, tensors=8) == 3


@pytest.mark.parametrize(
    ("workers", "quorum", "replicas"), [(1, 2, 1), (2, 2, 2), (3, 2, 3), (8, 2, 3), (8, 5, 6)]
)
def test_replicas_are_quorum_plus_one_within_the_workers(workers, quorum, replicas):
    assert replica_count(workers, quorum) == replicas


@pytest.mark.parametrize(("workers", "replicas"), [(3, 3), (5, 3), (8, 3), (8, 2)])
def test_every_shard_has_distinct_workers_and_every_worker_the_same_load(workers, replicas):
    shards = workers
    for shard in range(shards):
        assigned = shard_workers(shard, workers, replicas)
        assert len(set(assigned)) == replicas
        assert assigned[0] == shard
    loads = [shards_of_worker(p, shards, workers, replicas) for p in range(workers)]
    assert all(len(mine) == replicas for mine in loads)
    for p, mine in enumerate(loads):
        assert all(p in shard_workers(j, workers, replicas) for j in mine)


def _model(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "model.embed_tokens.weight": (32, 8),
        "model.layers.0.mlp.up_proj.weight": (16, 8),
        "model.layers.0.input_layernorm.weight": (8,),
        "model.layers.1.mlp.up_proj.weight": (16, 8),
        "model.layers.1.input_layernorm.weight": (8,),
        "model.layers.2.mlp.up_proj.weight": (16, 8),
        "model.norm.weight": (8,),
        "lm_head.weight": (32, 8),
    }
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


@pytest.mark.parametrize(
    ("method", "parameters"),
    [
        ("ties", {"density": 0.5, "weight": 1.0}),
        ("dare_ties", {"density": [0.3, 0.9], "weight": [0.5, 1.0]}),  # layer-wise gradients, seeded drops
    ],
)
def test_shard_merges_assemble_into_the_full_merge(method, parameters):
    base = _model(0)
    deltas = {cid: {k: torch.randn(v.shape) * 0.1 for k, v in base.items()} for cid in ("aa" * 32, "bb" * 32)}
    recipe = MergeRecipe.build(
        network_id="net",
        round=0,
        method=method,
        parameters=parameters,
        base_fingerprint="ba" * 32,
        architecture_fingerprint="ac" * 32,
        contributions=list(deltas),
        dtype="float32",
    )
    full = aggregate(recipe, base, deltas)
    plan = plan_shards([(n, t.numel() * 4) for n, t in base.items()], 3)
    pieces = {}
    for names in plan:
        shard = aggregate(
            recipe,
            {n: base[n] for n in names},
            {cid: {n: d[n] for n in names} for cid, d in deltas.items()},
            model_tensors=list(base),
        )
        pieces.update(shard)
    assert sorted(pieces) == sorted(full)
    for name in full:
        assert torch.equal(pieces[name], full[name]), name
    # without the whole model's names, layer-wise parameters would see fewer layers: a shard
    # holding layers 0 and 1 of 3 would put layer 1 at the end of the gradient, not in its middle
    if method == "dare_ties":
        names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]
        alone = aggregate(
            recipe, {n: base[n] for n in names}, {cid: {n: d[n] for n in names} for cid, d in deltas.items()}
        )
        assert torch.equal(alone[names[0]], full[names[0]])
        assert not torch.equal(alone[names[1]], full[names[1]])


# --------------------------------------------------------------------------- round quorum


def _shard_results(f, who, plan, tensors, round_number=1, candidates=("11" * 32, "22" * 32)):
    results = []
    for j, names in enumerate(plan):
        entries, _ = encode_tensors({n: tensors[n] for n in names}, RAW, f.CHUNK)
        message, _ = f.result(
            who,
            round_number=round_number,
            tensors=entries,
            merged_fingerprint=assembled_fingerprint([_Entries(entries)]),
            shard=j,
            shards=len(plan),
            candidates=tuple(sorted(candidates)),
        )
        results.append(f.sign(message, who))
    return results


@dataclasses.dataclass
class _Entries:
    tensors: tuple


def _tensors():
    gen = torch.Generator().manual_seed(3)
    return {f"t{i}": torch.randn(4 + i, 3, generator=gen) for i in range(5)}


def _round(f, signers=(1, 2), count=3):
    tensors = _tensors()
    sizes = [(n, t.numel() * 4) for n, t in tensors.items()]
    plan = plan_shards(sizes, count)
    owner = f.identity(1)
    results = _shard_results(f, owner, plan, tensors)
    atts = [[f.sign(f.attestation(f.identity(i), r), f.identity(i)).raw for i in signers] for r in results]
    return tensors, sizes, plan, results, atts


def test_round_quorum_accepts_complete_attested_shards_and_assembles_the_fingerprint(f):
    tensors, sizes, _plan, results, atts = _round(f)
    outcome = verify_round_quorum(results, atts, base_sizes=sizes, quorum=2, network_id=f.NETWORK)
    _entries, _, whole = encode_result(tensors, f.CHUNK)
    assert outcome.ok and outcome.fingerprint == whole and outcome.signers == 2
    assert [len(q.signers) for q in outcome.shards] == [2, 2, 2]


def test_round_quorum_needs_the_quorum_on_every_shard(f):
    _, sizes, _plan, results, atts = _round(f)
    atts[1] = atts[1][:1]
    outcome = check_round_quorum(results, atts, base_sizes=sizes, quorum=2, network_id=f.NETWORK)
    assert not outcome.ok and outcome.problem == "expected a quorum of 2 on every shard, got fewer on shard 1"
    with pytest.raises(QuorumError, match="fewer on shard 1"):
        verify_round_quorum(results, atts, base_sizes=sizes, quorum=2, network_id=f.NETWORK)


def test_round_quorum_refuses_missing_reordered_or_foreign_shards(f):
    tensors, sizes, plan, results, atts = _round(f)
    with pytest.raises(SchemaError, match="expected 3 shard results, got 2"):
        verify_round_quorum(results[:2], atts[:2], base_sizes=sizes, quorum=2, network_id=f.NETWORK)
    swapped = [results[1], results[0], results[2]]
    with pytest.raises(SchemaError, match="expected shard 0 of 3"):
        verify_round_quorum(swapped, atts, base_sizes=sizes, quorum=2, network_id=f.NETWORK)
    # a shard of another round replayed into this one
    other_round = _shard_results(f, f.identity(1), plan, tensors, round_number=2)
    mixed = [results[0], other_round[1], results[2]]
    with pytest.raises(SchemaError, match="for round 1 and one candidate set"):
        verify_round_quorum(mixed, atts, base_sizes=sizes, quorum=2, network_id=f.NETWORK)
    # a shard computed from another candidate set
    other_set = _shard_results(f, f.identity(1), plan, tensors, candidates=("11" * 32, "22" * 32, "44" * 32))
    mixed = [results[0], other_set[1], results[2]]
    with pytest.raises(SchemaError, match="one candidate set"):
        verify_round_quorum(mixed, atts, base_sizes=sizes, quorum=2, network_id=f.NETWORK)


def test_round_quorum_refuses_shards_that_do_not_follow_the_plan(f):
    tensors, sizes, plan, _results, _atts = _round(f)
    moved = [list(s) for s in plan]
    biggest = max(range(len(moved)), key=lambda j: len(moved[j]))
    other = (biggest + 1) % len(moved)
    moved[other].append(moved[biggest].pop())  # one tensor moved to another shard
    first_wrong = min(biggest, other)
    results = _shard_results(f, f.identity(1), [tuple(sorted(s)) for s in moved], tensors)
    atts = [[f.sign(f.attestation(f.identity(i), r), f.identity(i)).raw for i in (1, 2)] for r in results]
    outcome = check_round_quorum(results, atts, base_sizes=sizes, quorum=2, network_id=f.NETWORK)
    assert not outcome.ok and outcome.fingerprint is None
    assert outcome.problem == f"expected shard {first_wrong} to hold the planned tensors, got others"


def test_attestations_of_another_shard_or_shard_count_do_not_count(f):
    _, sizes, _plan, results, atts = _round(f)
    # an attestation naming shard 0's result but claiming another shard index (forged fields)
    wrong_index = f.sign(f.attestation(f.identity(3), results[0], shard=1), f.identity(3)).raw
    wrong_count = f.sign(f.attestation(f.identity(4), results[0], shards=4), f.identity(4)).raw
    replayed = atts[1][0]  # a valid attestation of shard 1 offered for shard 0
    outcome = check_round_quorum(
        results,
        [[atts[0][0], wrong_index, wrong_count, replayed], atts[1], atts[2]],
        base_sizes=sizes,
        quorum=2,
        network_id=f.NETWORK,
    )
    assert not outcome.ok
    assert len(outcome.shards[0].signers) == 1
    assert [i for i, _ in outcome.shards[0].rejected] == [1, 2, 3]


def test_shard_fields_are_validated(f):
    alice = f.identity(1)
    result, _ = f.result(alice)
    with pytest.raises(SchemaError, match="shard below shards"):
        dataclasses.replace(result, shard=2, shards=2)
    with pytest.raises(SchemaError, match=r"among MergeResult\.candidates"):
        dataclasses.replace(result, candidates=("11" * 32, "33" * 32))
    with pytest.raises(SchemaError, match="sorted without duplicates"):
        dataclasses.replace(result, candidates=("22" * 32, "11" * 32))
    signed = f.sign(result, alice)
    with pytest.raises(SchemaError, match=r"Attestation\.shard below shards"):
        f.attestation(alice, signed, shard=3, shards=3)
    assert MergeResult.from_dict(result.to_dict()) == result


def test_plan_depends_only_on_sizes_and_count():
    for count in (2, 4):
        plans = {plan_shards(list(p), count) for p in itertools.permutations(SIZES[:5])}
        assert len(plans) == 1
