"""A node's spot check of a shard it does not merge: a forged tensor in its sample is refused.

One node's round machine (no processes: its `RoundContext` gets stand-in fetch, publish and DHT
reads) holds the base, three contributions and the results of shard 0; the sample its key draws is
computed here by hand.
"""

from __future__ import annotations

import asyncio
import hashlib
from types import SimpleNamespace

import pytest
from node_messages import full_attestation, signed_contribution
from node_models import make_base

from node.genesis import create_genesis, read_base_manifest
from node.lookups import read_shard_records
from node.records import make_record, parse_record
from node.round_context import RoundContext
from node.round_machine import RoundMachine
from node.round_state import RoundState, RoundView, ShardMerge
from node.rounds import Contribution, admit, plan_round
from node.shard_worker import FETCH_PATIENCE
from node.spotcheck import sampled_attestation, spot_check_shard
from node.state import NodeState
from node.store import ContentStore
from protocol.aggregate import aggregate, encode_result
from protocol.chunks import decode_tensors
from protocol.decision import AttestedResult, AttestedRound, ShardAttestations
from protocol.encoding import pack
from protocol.envelope import open_envelope, sign_message
from protocol.identity import Identity
from protocol.messages import SCHEMA_VERSION, Attestation, MergeResult
from protocol.verify import check_quorum

NOW = 1_750_000_000  # every message's time is fixed, so every id and every draw is the same each run


def _who(n: int) -> Identity:
    return Identity.from_seed(bytes([n]) * 32)


@pytest.fixture
def node(tmp_path, monkeypatch):
    """A node with the base, three contributions and a plan of three shards (shard 0 is checked)."""
    make_base(tmp_path / "base")
    monkeypatch.setattr("node.genesis.time", SimpleNamespace(time=lambda: NOW))
    with ContentStore(tmp_path / "node" / "store") as store:
        genesis, _record = create_genesis("spot-net", tmp_path / "base", _who(1), store, chunk_size=4096)
    published = []
    board = Board({})

    async def no_fetch(*_args, **_kwargs):
        return None

    async def publish(_key, value):
        published.append(parse_record("result", value))

    async def read_shard(r, j):
        return await read_shard_records(board, genesis.network_id, r, j)

    ctx = RoundContext(
        genesis=genesis,
        identity=_who(1),
        store=ContentStore(tmp_path / "node" / "store"),
        rounds=RoundState(NodeState(tmp_path / "node")),
        fetch=no_fetch,
        publish=publish,
        read_shard=read_shard,
        peer_id="own-peer",
    )
    service = SimpleNamespace(
        genesis=genesis,
        identity=ctx.identity,
        store=ctx.store,
        state=ctx.rounds.state,
        network_id=genesis.network_id,
        rounds=ctx.rounds,
    )
    base_entries = read_base_manifest(service.store.get(genesis.base_manifest))
    base = decode_tensors(base_entries, service.store.get, genesis.chunk_size)
    contributions = []
    for n in (11, 12, 13):
        who = _who(n)
        card, manifest, chunks = signed_contribution(
            who, genesis, base, chunk_size=genesis.chunk_size, now=NOW, name=f"expert{n}", scale=0.02, seed=n
        )
        for digest, data in chunks.items():
            service.store.put(data, digest)
        contributions.append(Contribution(card, manifest))
    contributions.sort(key=lambda c: c.id)
    plan = plan_round(genesis, contributions, base_entries)
    yield SimpleNamespace(
        service=service,
        ctx=ctx,
        board=board,
        machine=RoundMachine(ctx, board),
        plan=plan,
        contributions=contributions,
        base=base,
        entries=base_entries,
        published=published,
    )
    ctx.store.close()
    ctx.rounds.state.close()


def _result(node, publisher: Identity, forge: str | None = None, amount: float = 0.01, contributions=None):
    """Shard 0 of the round merged from the node's inputs, or from `contributions` of them (tensor
    `forge` moved by `amount`)."""
    service, plan = node.service, node.plan
    names = plan.shards[0]
    inputs = node.contributions if contributions is None else contributions
    admission, deltas = admit(service.genesis, inputs, node.entries, node.ctx.decode, names)
    recipe = service.genesis.recipe(0, list(admission.admitted))
    merged = aggregate(
        recipe, {n: node.base[n] for n in names}, deltas, model_tensors=[e.name for e in node.entries]
    )
    if forge is not None:
        merged[forge] = merged[forge] + amount
    entries, chunks, fingerprint = encode_result(merged, service.genesis.chunk_size)
    for digest, data in chunks.items():
        service.store.put(data, digest)
    result = sign_message(
        MergeResult(
            v=SCHEMA_VERSION,
            network_id=service.network_id,
            signer=publisher.public_key,
            created_at=NOW - 5,
            round=0,
            recipe=recipe,
            chunk_size=service.genesis.chunk_size,
            tensors=entries,
            merged_fingerprint=fingerprint,
            shard=0,
            shards=len(plan.shards),
            candidates=plan.candidates,
        ),
        publisher,
    )
    service.store.put(result.raw, result.id)
    return result


def _full(result, who: Identity):
    return full_attestation(result, who, created_at=NOW - 2)


def _sample_by_hand(node, result) -> list[str]:
    """The node's draw for `result`: its signature of the content, then sha256 per tensor name."""
    m = result.message
    content = pack(["umm-spot-v1", m.network_id, 0, 0, m.shards, m.recipe.id, m.merged_fingerprint])
    proof = node.service.identity.sign(content)
    contributions = len(m.recipe.contributions)
    drawn, scores = [], {}
    for t in m.tensors:
        h = int.from_bytes(
            hashlib.sha256(b"umm-spot-tensor-v1" + proof + t.name.encode()).digest()[:8], "big"
        )
        scores[t.name] = h
        if h * contributions < min(2, contributions) * 2**64:
            drawn.append(t.name)
    return drawn or [min(scores, key=lambda n: (scores[n], n))]


def _forgery(node, forger: Identity, *, caught: bool):
    """A result with one forged tensor that the node's sample does (`caught`) or does not hold."""
    for step in range(1, 20):
        for name in node.plan.shards[0]:
            forged = _result(node, forger, forge=name, amount=0.01 * step)
            if (name in _sample_by_hand(node, forged)) == caught:
                return forged
    raise AssertionError("expected a forgery on either side of the sample within 20 tries per tensor")


class Board:
    def __init__(self, records: dict[bytes, bytes]) -> None:
        self.records = records

    async def aread(self, _key, *, latest: bool = True):
        return self.records


def _board(node, *attested):
    records = {}
    for index, (result, who) in enumerate(attested):
        records[bytes([index])] = make_record(
            "result", result=result.id, attestation=_full(result, who).raw, p2p=f"peer{index}"
        )
    node.board.records = records


def test_a_forged_tensor_in_the_sample_is_refused_and_an_honest_result_attested(node):
    forger = _who(12)
    # the forger tries tensors and amounts until it forges one this node's sample will hold
    forged = _forgery(node, forger, caught=True)
    _board(node, (forged, forger))
    asyncio.run(spot_check_shard(node.ctx, 0, node.plan, node.contributions, 0, node.entries))
    assert node.published == []
    assert node.service.state.get("refused/0") == [forged.id]
    # a quorum for the refused result (e.g. Sybil keys) does not become this node's latest
    found = AttestedRound([AttestedResult(forged, [_full(forged, forger).raw], 4)], "ab" * 32)
    assert not asyncio.run(node.machine.record(0, found))
    assert node.service.state.get("latest") is None and node.service.rounds.round == 0
    # an honest result of two full workers appears: the node attests it (sampled), not the forgery
    honest = _result(node, _who(11))
    _board(node, (forged, forger), (honest, _who(11)), (honest, _who(13)))
    asyncio.run(spot_check_shard(node.ctx, 0, node.plan, node.contributions, 0, node.entries))
    (record,) = node.published
    assert record["result"] == honest.id
    att = open_envelope(record["attestation"], Attestation, network_id=node.service.network_id).message
    expected = _sample_by_hand(node, honest)
    assert (att.kind, att.result_id, att.checked_tensors) == ("sampled", honest.id, len(expected))
    atts = [_full(honest, _who(11)).raw, _full(honest, _who(13)).raw, record["attestation"]]
    assert check_quorum(honest, atts, quorum=3, network_id=node.service.network_id).ok


def test_a_forged_tensor_outside_the_sample_passes_this_checker(node):
    forger = _who(12)
    forged = _forgery(node, forger, caught=False)
    _board(node, (forged, forger))
    asyncio.run(spot_check_shard(node.ctx, 0, node.plan, node.contributions, 0, node.entries))
    # one sampled checker misses it (probability 1 - f); the quorum rule still needs 2 full workers
    (record,) = node.published
    assert record["result"] == forged.id and node.service.state.get("refused/0") is None


def _same_merge_by(node, *publishers: int):
    """Shard 0 results of the same merge by `publishers`, sorted by id (smallest first)."""
    return sorted((_result(node, _who(n)) for n in publishers), key=lambda result: result.id)


def _own_shard(result) -> dict:
    m = result.message
    return {
        "recipe": m.recipe.id,
        "result": result.id,
        "fingerprint": m.merged_fingerprint,
        "candidates": list(m.candidates),
        "shards": m.shards,
        "attests": "",
        "attestation": b"",
    }


def _sampled(result, who: Identity):
    return sampled_attestation(who, result)


def spot_targets(attestations: dict[str, list[bytes]], network_id: str) -> list[str]:
    """The order a spot checker checks results in (`ShardAttestations.ranked`)."""
    raws = [raw for held in attestations.values() for raw in held]
    return ShardAttestations.verify(raws, network_id=network_id, round_number=0, shard=0).ranked()


def test_a_worker_attests_the_most_attested_result_of_its_merge_not_a_smaller_id(node):
    """Three workers merge shard 0 (this node is one); one worker's result holds its full
    attestation and sampled ones of three checkers, kept by nodes that recorded the round. The
    third worker's result, of the same merge but a smaller id, arrives later. Moving to it would
    leave the first result one full attestation short and the smaller one with two keys: no
    quorum of 4 on either, ever."""
    smaller, ours, quorate = _same_merge_by(node, 31, 32, 33)
    network_id = node.service.network_id
    held = [_full(quorate, _who(32)), *(_sampled(quorate, _who(n)) for n in (41, 42, 43))]
    records = {
        bytes([index]): make_record("result", result=quorate.id, attestation=att.raw, p2p=f"peer{index}")
        for index, att in enumerate(held)
    }
    records[b"w33"] = make_record(
        "result", result=smaller.id, attestation=_full(smaller, _who(33)).raw, p2p="peer33"
    )
    node.board.records = records
    assert not check_quorum(quorate, [a.raw for a in held], quorum=4, network_id=network_id).ok
    asyncio.run(node.machine.worker.attest_canonical(0, 0, ShardMerge.decode(_own_shard(ours))))
    (record,) = node.published
    att = open_envelope(record["attestation"], Attestation, network_id=network_id).message
    assert (record["result"], att.result_id, att.kind) == (ours.id, quorate.id, "full")
    atts = [*(a.raw for a in held), record["attestation"]]
    assert check_quorum(quorate, atts, quorum=4, network_id=network_id).ok
    # with as many attesters on each, the smallest id wins, so attestations gather on one id
    node.published.clear()
    _board(node, (quorate, _who(32)), (smaller, _who(33)))
    asyncio.run(node.machine.worker.attest_canonical(0, 0, ShardMerge.decode(_own_shard(ours))))
    (record,) = node.published
    assert (
        open_envelope(record["attestation"], Attestation, network_id=network_id).message.result_id
        == smaller.id
    )


def test_spot_targets_break_a_tie_of_full_attesters_by_all_attesters(node):
    smaller, larger = _same_merge_by(node, 30, 31)
    network_id = node.service.network_id
    sampled = [_sampled(larger, _who(n)).raw for n in (41, 42)]
    attestations = {
        smaller.id: [_full(smaller, _who(30)).raw],
        larger.id: [_full(larger, _who(31)).raw, *sampled],
    }
    assert spot_targets(attestations, network_id) == [larger.id, smaller.id]
    # more full attesters come first whatever the sampled ones
    attestations[smaller.id].append(_full(smaller, _who(32)).raw)
    assert spot_targets(attestations, network_id) == [smaller.id, larger.id]


def _decide(node, result, attestations: list[bytes]) -> dict:
    """The node's quorum check when the DHT holds `attestations` of `result` (shard 0): its latest.

    The node has checked this round (a round of shard 0 alone, not the plan's 3): its view is set."""
    found = AttestedRound([AttestedResult(result, attestations, len(attestations))], "cd" * 32)
    node.ctx.rounds.set_view(0, RoundView(result.message.candidates, 1))
    asyncio.run(node.machine.record(0, found))
    return node.service.state.get("latest")


def test_a_worker_that_records_the_round_attests_the_decided_result_of_its_merge(node):
    """This node and workers 32 and 33 merge shard 0; it still attests its own result when it reads
    a quorum of 4 on worker 32's (workers 32 and 33 in full, checkers 41 and 42 sampled). Its
    attestation, kept unchanged once it records the round, must name the decided result: naming its
    own id it adds nothing to that quorum, which then holds only as long as both other workers stay
    on it, and the nodes still deciding may be left without two full attestations on any id."""
    ours, decided = _same_merge_by(node, 1, 32)
    own = {**_own_shard(ours), "attests": ours.id, "attestation": _full(ours, node.service.identity).raw}
    node.service.state.set("shard/0/0", own)
    network_id = node.service.network_id
    held = [_full(decided, _who(n)).raw for n in (32, 33)] + [
        _sampled(decided, _who(n)).raw for n in (41, 42)
    ]
    latest = _decide(node, decided, held)
    assert latest is not None and latest["results"] == [decided.id]
    ((shard, result_id, raw),) = latest["announce"]
    att = open_envelope(raw, Attestation, network_id=network_id).message
    assert (shard, result_id) == (0, decided.id)
    assert (att.signer, att.kind, att.result_id) == (node.service.identity.public_key, "full", decided.id)
    # with workers 32 and 33 gone to another id, it and the checkers still hold a quorum of 4 with 2 full
    others = [_full(decided, _who(32)).raw, *held[2:]]
    assert not check_quorum(decided, others, quorum=4, network_id=network_id).ok
    assert check_quorum(decided, [*others, raw], quorum=4, network_id=network_id).ok
    assert node.service.state.get("shard/0/0")["attests"] == decided.id


def test_a_checker_that_records_the_round_attests_the_decided_result_of_the_merge_it_checked(node):
    """This node's spot check passed worker 31's result; it reads a quorum on worker 32's result of
    the same merge. Its sampled attestation, kept unchanged once it records the round, must name the
    decided result (the same content: the same sample, the same verdict), not copy another key's."""
    checked, decided = _same_merge_by(node, 31, 32)
    spot = {"result": checked.id, "attestation": _sampled(checked, node.service.identity).raw}
    node.service.state.set("spot/0/0", spot)
    network_id = node.service.network_id
    held = [_full(decided, _who(n)).raw for n in (32, 33)] + [
        _sampled(decided, _who(n)).raw for n in (41, 42)
    ]
    latest = _decide(node, decided, held)
    ((shard, result_id, raw),) = latest["announce"]
    att = open_envelope(raw, Attestation, network_id=network_id).message
    assert (shard, result_id) == (0, decided.id)
    assert (att.signer, att.kind, att.result_id) == (node.service.identity.public_key, "sampled", decided.id)
    assert check_quorum(decided, [*held[:3], raw], quorum=4, network_id=network_id).ok
    # a result of another merge is not adopted: the node has not checked it, and keeps its verdict
    other = _forgery(node, _who(32), caught=False)
    node.service.state.set("spot/0/0", spot)
    node.service.state.set("latest", None)
    assert _decide(node, other, [_full(other, _who(n)).raw for n in (32, 33)]) is None
    assert node.service.state.get("spot/0/0") == spot


def test_workers_and_checkers_rank_results_of_one_merge_alike(node):
    """Under a quorum of 2 (two full attestations), this node and worker 32 attest one result of
    their merge: a quorum, which some nodes may already have recorded. Another result of the same
    merge holds worker 33 and four sampled checkers. A worker ranking by attesters of any kind would
    leave the quorum for it (and the checkers, ranking by full attesters first, would leave it for
    the quorum); ranking as the checkers do, it stays, and so does the quorum."""
    ours, decided, crowded = _same_merge_by(node, 1, 32, 33)
    network_id = node.service.network_id
    full = [_full(decided, node.service.identity), _full(decided, _who(32))]
    sampled = [_sampled(crowded, _who(n)) for n in (41, 42, 43, 44)]
    held = [(decided, att) for att in full] + [(crowded, att) for att in (_full(crowded, _who(33)), *sampled)]
    node.board.records = {
        bytes([index]): make_record("result", result=result.id, attestation=att.raw, p2p=f"peer{index}")
        for index, (result, att) in enumerate(held)
    }
    own = {**_own_shard(ours), "attests": decided.id, "attestation": full[0].raw}
    asyncio.run(node.machine.worker.attest_canonical(0, 0, ShardMerge.decode(own)))
    (record,) = node.published
    assert (
        open_envelope(record["attestation"], Attestation, network_id=network_id).message.result_id
        == decided.id
    )
    assert check_quorum(decided, [a.raw for a in full], quorum=2, network_id=network_id).ok
    attestations = {result.id: [] for result, _ in held}
    for result, att in held:
        attestations[result.id].append(att.raw)
    assert spot_targets(attestations, network_id)[0] == decided.id


def test_a_node_that_gave_up_on_a_contribution_merges_again_when_a_quorum_admits_it(node):
    """This node merged shard 0 without contribution X, whose chunks it gave up waiting for. A quorum
    decides the shard with X. The node forgets its merge and X's missed polls (once), merges again
    from the chunks it now holds, and records the decided round; a quorum admitting a contribution it
    never lacked stays refused."""
    service = node.service
    lacked = node.contributions[1]
    without = _result(
        node, service.identity, contributions=[c for c in node.contributions if c is not lacked]
    )
    assert lacked.id not in without.message.recipe.contributions
    decided = _result(node, _who(32))
    held = [_full(decided, _who(n)).raw for n in (32, 33)] + [
        _sampled(decided, _who(n)).raw for n in (41, 42)
    ]
    mine = {**_own_shard(without), "attestation": _full(without, service.identity).raw}

    # it never lacked X (its admission left X out): the quorum is refused, its merge kept
    service.state.set("shard/0/0", mine)
    assert _decide(node, decided, held) is None
    assert service.state.get("shard/0/0") == mine

    # it gave up on X: its merge of the shard is forgotten and X is waited for again
    node.machine.patience.missing[lacked.id] = FETCH_PATIENCE
    assert _decide(node, decided, held) is None
    assert service.state.get("shard/0/0") is None and lacked.id not in node.machine.patience.missing

    # the next poll merges the shard from every contribution, and the quorum is recorded
    node.board.records = {}
    asyncio.run(node.machine.worker.merge_shards(0, node.plan, node.contributions, [0], node.entries))
    assert service.state.get("shard/0/0")["fingerprint"] == decided.message.merged_fingerprint
    latest = _decide(node, decided, held)
    assert latest is not None and latest["results"] == [decided.id]

    # once only: giving up on X again leaves a later quorum with X refused
    service.state.set("latest", None)
    service.state.set("shard/0/0", mine)
    node.machine.patience.missing[lacked.id] = FETCH_PATIENCE
    assert _decide(node, decided, held) is None
    assert service.state.get("shard/0/0") == mine
