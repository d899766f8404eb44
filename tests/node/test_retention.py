"""Retention: a node keeps its latest decided rounds and what they need, and deletes the rest safely."""

from __future__ import annotations

import shutil
import time
from types import SimpleNamespace

import pytest
from node_messages import signed_contribution
from node_models import make_base

from node.genesis import create_genesis
from node.retention import note_decided, sweep
from node.round_state import OwnContribution, RoundState, RoundView, ShardMerge
from node.state import NodeState
from node.store import ContentStore
from protocol.aggregate import aggregate, encode_result
from protocol.chunks import decode_tensors
from protocol.envelope import sign_message
from protocol.genesis import read_base_manifest
from protocol.identity import Identity
from protocol.messages import SCHEMA_VERSION, MergeResult

CHUNK = 4096
ROUNDS = 4
ME, OTHER = Identity.from_seed(b"\x31" * 32), Identity.from_seed(b"\x32" * 32)


def _result(genesis, r, contributions, deltas, base, store) -> MergeResult:
    recipe = genesis.recipe(r, list(contributions))
    entries, chunks, fingerprint = encode_result(aggregate(recipe, base, deltas), CHUNK)
    for digest, data in chunks.items():
        store.put(data, digest)
    signed = sign_message(
        MergeResult(
            v=SCHEMA_VERSION,
            network_id=genesis.network_id,
            signer=ME.public_key,
            created_at=int(time.time()),
            round=r,
            recipe=recipe,
            chunk_size=CHUNK,
            tensors=entries,
            merged_fingerprint=fingerprint,
            shard=0,
            shards=1,
            candidates=tuple(sorted(contributions)),
        ),
        ME,
    )
    store.put(signed.raw, signed.id)
    return signed


def _node(tmp_path):
    """A node folder with four decided rounds; what each round put in the store."""
    make_base(tmp_path / "base", seed=41, hidden=16)
    data = tmp_path / "node"
    touched: dict[int, set[str]] = {}
    with ContentStore(data / "store") as store, NodeState(data) as state:
        genesis, record = create_genesis("keep", tmp_path / "base", ME, store, chunk_size=CHUNK)
        state.set("genesis", record)
        rounds = RoundState(state)
        base = decode_tensors(read_base_manifest(store.get(genesis.base_manifest)), store.get, CHUNK)
        now = int(time.time())
        for r in range(ROUNDS):
            ids, deltas, held = [], {}, set()
            # the other contributor sends round 0's expert again in round 3: shared chunks
            for who, seed in ((ME, 100 + r), (OTHER, 200 + (0 if r == 3 else r))):
                card, manifest, chunks = signed_contribution(
                    who, genesis, base, chunk_size=CHUNK, now=now, seed=seed, manifest_changes={"round": r}
                )
                for digest, piece in chunks.items():
                    store.put(piece, digest)
                store.put(manifest.raw, manifest.id)
                held |= set(chunks) | {manifest.id}
                ids.append(manifest.id)
                deltas[manifest.id] = decode_tensors(manifest.message.tensors, store.get, CHUNK)
                if who is ME:
                    rounds.set_contribution(r, OwnContribution(card.raw, manifest.id))
            result = _result(genesis, r, ids, deltas, base, store)
            held |= {result.id, *(d for t in result.message.tensors for d in t.chunks)}
            rounds.set_view(r, RoundView(tuple(sorted(ids)), 1))
            rounds.set_shard(
                r, 0, ShardMerge(result.message.recipe.id, result.id, "ff" * 32, tuple(sorted(ids)), 1)
            )
            found = SimpleNamespace(shards=[SimpleNamespace(result=result)], candidates=tuple(sorted(ids)))
            note_decided(rounds, r, found)
            touched[r] = held
        base_chunks = {genesis.base_manifest, *genesis.base_files.values()}
        base_chunks |= {d for e in read_base_manifest(store.get(genesis.base_manifest)) for d in e.chunks}
    return data, genesis, touched, base_chunks


@pytest.fixture
def node(tmp_path):
    return _node(tmp_path)


def test_sweep_keeps_the_latest_rounds_and_deletes_what_only_older_ones_need(node):
    data, genesis, touched, base_chunks = node
    kept = touched[2] | touched[3] | base_chunks
    expected_gone = (touched[0] | touched[1]) - kept
    assert touched[0] & touched[3]  # round 3 reuses round 0's chunks, which must stay
    with ContentStore(data / "store") as store, NodeState(data) as state:
        before = set(store)
        deleted = sweep(RoundState(state), store, genesis, keep=2)
        after = set(store)
        assert deleted == len(expected_gone)
        assert after == before - expected_gone
        assert kept <= after
        for digest in after:
            store.get(digest)  # every remaining chunk still verifies
        assert state.keys("decided/") == ["decided/2", "decided/3"]
        assert not [
            k
            for k in state.keys(prefix="")
            if k.split("/")[0] in {"shard", "view", "contribution"} and k.split("/")[1] in "01"
        ]
        assert RoundState(state).contribution(3) is not None
        assert sweep(RoundState(state), store, genesis, keep=2) == 0  # nothing more to do


def test_keep_covering_every_round_deletes_nothing(node):
    data, genesis, _, _ = node
    with ContentStore(data / "store") as store, NodeState(data) as state:
        before = set(store)
        assert sweep(RoundState(state), store, genesis, keep=ROUNDS) == 0
        assert set(store) == before


@pytest.mark.parametrize("kill_after", [0, 1, 7, 40])
def test_a_sweep_killed_at_any_point_is_finished_by_the_next(tmp_path, kill_after):
    built, genesis, _, _ = _node(tmp_path / "built")
    clean_data, data = tmp_path / "clean", tmp_path / "killed"
    shutil.copytree(built, clean_data)
    shutil.copytree(built, data)
    with ContentStore(clean_data / "store") as store, NodeState(clean_data) as state:
        sweep(RoundState(state), store, genesis, keep=1)
        expected = set(store)
        expected_keys = state.keys(prefix="")

    class Killed(Exception):
        pass

    with ContentStore(data / "store") as store, NodeState(data) as state:
        calls = 0
        real_delete = store.delete

        def dying_delete(digest):
            nonlocal calls
            if calls == kill_after:
                raise Killed
            calls += 1
            real_delete(digest)

        store.delete = dying_delete
        with pytest.raises(Killed):
            sweep(RoundState(state), store, genesis, keep=1)
    with ContentStore(data / "store") as store, NodeState(data) as state:  # reopened: recovery runs
        sweep(RoundState(state), store, genesis, keep=1)
        assert set(store) == expected
        assert state.keys() == expected_keys
        for digest in store:
            store.get(digest)


def test_status_reports_the_store_size_and_the_rounds_kept(node):
    import json

    from click.testing import CliRunner

    from node.cli import cli

    data, genesis, _, _ = node

    def on_disk() -> int:
        return sum(p.stat().st_size for p in (data / "store" / "blobs").rglob("*") if p.is_file())

    shown = CliRunner().invoke(cli, ["status", "--data-dir", str(data), "--json"])
    assert shown.exit_code == 0, shown.output
    store = json.loads(shown.output)["store"]
    assert store["bytes"] == on_disk()
    assert store["decided_rounds"] == list(range(ROUNDS))
    with ContentStore(data / "store") as held, NodeState(data) as state:
        sweep(RoundState(state), held, genesis, keep=2)
    text = CliRunner().invoke(cli, ["status", "--data-dir", str(data)]).output
    assert "decided rounds kept: 2, 3" in text
    assert (
        json.loads(CliRunner().invoke(cli, ["status", "--data-dir", str(data), "--json"]).output)["store"][
            "bytes"
        ]
        == on_disk()
    )
    neither = CliRunner().invoke(cli, ["status"])
    assert neither.exit_code == 2 and neither.output.startswith("Error: expected --network")
