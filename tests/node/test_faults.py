"""node.faults: a node checks every fault claim from the bytes before it excludes a contribution.

The claims are read from a fake DHT board; the contributions' chunks sit in a real store (a fetch
that finds a chunk missing raises FetchError, as the node's would after its attempts).
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from node_messages import signed_contribution, unit_genesis, with_nan

from node.errors import FetchError
from node.fault_status import read_faults
from node.records import fault_key, make_record, parse_record
from node.round_context import RoundContext
from node.round_state import RoundState
from node.rounds import Contribution
from node.state import NodeState
from node.store import ContentStore
from protocol.envelope import sign_message
from protocol.faults import ContributionFault
from protocol.identity import Identity
from protocol.messages import SCHEMA_VERSION

CHUNK = 4096
NOW = 1_800_000_000
BASE = {"a.weight": torch.zeros(8, 16), "b.weight": torch.zeros(16)}


def _who(n: int) -> Identity:
    return Identity.from_seed(bytes([n]) * 32)


GENESIS = unit_genesis(chunk_size=CHUNK, now=NOW)


class Board:
    """A DHT board holding each signer's fault record of round 0."""

    def __init__(self) -> None:
        self.records: dict[bytes, bytes] = {}

    async def aread(self, key: str, *, latest: bool = True) -> dict[bytes, bytes]:
        return dict(self.records) if key == fault_key(GENESIS.network_id, 0) else {}


@pytest.fixture
def network(tmp_path):
    """Four contributions (3: NaN in b.weight; 2: x20 on b.weight), their chunks in `held` and a
    node (key 5) whose store holds none of them yet."""
    made = [
        signed_contribution(_who(n), GENESIS, BASE, chunk_size=CHUNK, now=NOW, seed=n) for n in (1, 2, 3, 4)
    ]
    held: dict[str, bytes] = {}
    contributions = []
    for n, (card, manifest, chunks) in zip((1, 2, 3, 4), made, strict=True):
        held.update(chunks)
        if n == 3:
            manifest, extra = with_nan(_who(3), manifest, held.__getitem__, "b.weight")
            held.update(extra)
        if n == 2:
            manifest, extra = _scaled(_who(2), manifest, chunks, "b.weight", 20.0)
            held.update(extra)
        held[manifest.id] = manifest.raw
        contributions.append(Contribution(card, manifest))
    store = ContentStore(tmp_path / "store")
    state = NodeState(tmp_path)
    published: list[tuple[str, bytes]] = []
    fetched: list[str] = []

    async def fetch(digests, holders, *, attempts=3):
        for digest in digests:
            if digest not in held:
                raise FetchError(f"no peer holds {digest}", (digest,))
            fetched.append(digest)
            store.put(held[digest], digest)

    async def publish(key, value):
        published.append((key, value))

    ctx = RoundContext(
        genesis=GENESIS,
        identity=_who(5),
        store=store,
        rounds=RoundState(state),
        fetch=fetch,
        publish=publish,
        read_shard=None,
        peer_id="peer",
    )
    by_n = {n: c for n, c in zip((1, 2, 3, 4), contributions, strict=True)}
    yield ctx, by_n, held, published, fetched
    store.close()
    state.close()


def _scaled(who, manifest, chunks, tensor, factor):
    """`manifest` re-signed with `tensor`'s bf16 delta multiplied by `factor`."""
    import dataclasses

    from protocol.chunks import decode_entry, encode_tensors
    from protocol.envelope import sign_message

    m = manifest.message
    entry = next(t for t in m.tensors if t.name == tensor)
    value = decode_entry(entry, chunks.__getitem__, m.chunk_size) * factor
    (changed,), extra = encode_tensors({tensor: value}, entry.codec, m.chunk_size)
    tensors = tuple(changed if t.name == tensor else t for t in m.tensors)
    return sign_message(dataclasses.replace(m, tensors=tensors), who), extra


def _claim(board: Board, signer: int, *faults: tuple[Contribution, str, str], r: int = 0) -> None:
    """`signer`'s fault record, its claims signed a second apart in the order given."""
    raws = []
    for index, (contribution, tensor, kind) in enumerate(faults):
        message = ContributionFault(
            v=SCHEMA_VERSION,
            network_id=GENESIS.network_id,
            signer=_who(signer).public_key,
            created_at=int(time.time()) - 60 + index,
            round=r,
            contribution=contribution.id,
            tensor=tensor,
            kind=kind,
        )
        raws.append(sign_message(message, _who(signer)).raw)
    board.records[bytes([signer])] = make_record("fault", faults=raws)


def _refresh(ctx, board, contributions):
    return asyncio.run(ctx.faults.refresh(ctx, board, 0, contributions))


def test_a_true_nan_claim_excludes_the_contribution_after_fetching_one_tensor(network):
    ctx, by_n, _, _, fetched = network
    board = Board()
    _claim(board, 1, (by_n[3], "b.weight", "undecodable"))
    excluded = _refresh(ctx, board, list(by_n.values()))
    assert set(excluded) == {by_n[3].id}
    assert excluded[by_n[3].id].tensor == "b.weight" and excluded[by_n[3].id].kind == "undecodable"
    # it fetched b.weight of the accused only: one tensor's chunks
    b_entry = next(t for t in by_n[3].manifest.message.tensors if t.name == "b.weight")
    assert sorted(fetched) == sorted(b_entry.chunks)


def test_a_true_outlier_claim_compares_the_tensor_of_every_contribution(network):
    ctx, by_n, _, published, fetched = network
    board = Board()
    _claim(board, 1, (by_n[2], "b.weight", "outlier"))
    excluded = _refresh(ctx, board, list(by_n.values()))
    # b.weight of all four was read: 3's NaN makes it undecodable there (a finding of this node,
    # signed and published), and 2 is x20 against the median of the other decodable ones
    assert set(excluded) == {by_n[2].id, by_n[3].id}
    assert excluded[by_n[2].id].kind == "outlier" and excluded[by_n[3].id].kind == "undecodable"
    b_chunks = {
        d for c in by_n.values() for t in c.manifest.message.tensors if t.name == "b.weight" for d in t.chunks
    }
    assert set(fetched) == b_chunks  # no a.weight chunk
    own = [parse_record("fault", value) for _, value in published]
    assert own and len(own[-1]["faults"]) == 1  # its own finding (3 undecodable) is published


def test_a_false_claim_is_ignored_and_its_signer_is_not_heard_again_in_the_round(network):
    ctx, by_n, _, _, fetched = network
    board = Board()
    # key 6 accuses the honest 1 of NaN, then (truthfully) 3: the first does not hold, the second
    # is not checked; key 7's true claim against 3 counts
    _claim(board, 6, (by_n[1], "a.weight", "undecodable"), (by_n[3], "b.weight", "undecodable"))
    excluded = _refresh(ctx, board, list(by_n.values()))
    assert excluded == {}
    a_entry = next(t for t in by_n[1].manifest.message.tensors if t.name == "a.weight")
    assert sorted(fetched) == sorted(a_entry.chunks)  # the false claim cost one tensor
    _claim(board, 7, (by_n[3], "b.weight", "undecodable"))
    assert set(_refresh(ctx, board, list(by_n.values()))) == {by_n[3].id}


def test_a_false_outlier_claim_does_not_exclude_an_honest_contribution(network):
    ctx, by_n, _, _, _ = network
    board = Board()
    _claim(board, 6, (by_n[4], "a.weight", "outlier"))
    assert _refresh(ctx, board, list(by_n.values())) == {}
    assert len(ctx.faults.round(0).refuted) == 1


def test_a_claim_waits_for_chunks_no_peer_serves_yet(network):
    ctx, by_n, held, _, _ = network
    board = Board()
    _claim(board, 1, (by_n[3], "b.weight", "undecodable"))
    b_entry = next(t for t in by_n[3].manifest.message.tensors if t.name == "b.weight")
    withheld = {d: held.pop(d) for d in b_entry.chunks}
    assert _refresh(ctx, board, list(by_n.values())) == {}
    assert not ctx.faults.round(0).refuted  # not refuted: undecided
    held.update(withheld)
    assert set(_refresh(ctx, board, list(by_n.values()))) == {by_n[3].id}


def test_claims_of_other_rounds_malformed_records_or_non_candidates_count_for_nothing(network):
    ctx, by_n, _, _, fetched = network
    board = Board()
    board.records[b"x"] = b"not a record"
    _claim(board, 6, (by_n[3], "b.weight", "undecodable"), r=1)  # a claim of round 1 under round 0's key
    assert _refresh(ctx, board, list(by_n.values())) == {}
    _claim(board, 1, (by_n[3], "b.weight", "undecodable"))
    # the accused is not among this node's candidates: nothing to exclude, nothing fetched
    assert _refresh(ctx, board, [by_n[1], by_n[2], by_n[4]]) == {}
    assert fetched == []


def test_status_lists_each_claimed_fault_with_the_keys_that_signed_it(network):
    _, by_n, _, _, _ = network
    board = Board()
    _claim(board, 1, (by_n[3], "b.weight", "undecodable"), (by_n[2], "b.weight", "outlier"))
    _claim(board, 6, (by_n[3], "b.weight", "undecodable"))
    board.records[b"x"] = b"not a record"
    rows = asyncio.run(read_faults(board, GENESIS.network_id, 0))
    assert [(r["contribution"], r["kind"], len(r["claimed_by"])) for r in rows] == sorted(
        [(by_n[3].id, "undecodable", 2), (by_n[2].id, "outlier", 1)]
    )
    assert all(r["tensor"] == "b.weight" for r in rows)
    assert sorted(rows[0]["claimed_by"] + rows[1]["claimed_by"]) == sorted(
        [_who(1).peer_id, _who(1).peer_id, _who(6).peer_id]
    )
