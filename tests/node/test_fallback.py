"""The fallback end to end: two of a shard's three full workers die and the survivors still decide.

Five `umm node start` processes on 127.0.0.1 contribute one expert each, so the round has five
workers (sorted by public key), five shards, a majority quorum of 3 and at least
`full_quorum(3)` = 2 full attestations per shard; shard ``s`` is merged in full by the workers at
positions ``s, s+1, s+2`` (`protocol.shards.shard_workers`). The victims are the workers at
positions ``s`` and ``s+2``: every other shard keeps two planned full workers, shard ``s`` keeps one.

The victims' contributions are stored in their folders before they start, with a poll of an hour:
their first step announces the contribution and they never step again, so they serve their chunks
but never merge, publish a result or attest (nothing they could publish makes the test pass).
Once the survivors hold every chunk of the victims' deltas between them, the victims are
SIGKILLed by process group (p2pd included). Shard ``s`` can then gather a second full attestation
only from a survivor that is not one of its planned workers, i.e. from the fallback
(``--fallback-seconds``).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from node_models import make_base, make_expert
from safetensors.torch import load_file

from merging.engine import merge_state_dicts
from node.datafolder import load_or_create_identity
from node.errors import NodeError
from node.genesis import store_base
from node.local import LocalNetwork
from node.process import process_tree, wait_gone
from node.state import NodeState
from node.store import ContentStore
from protocol.chunks import decode_tensors
from protocol.envelope import open_envelope
from protocol.fingerprint import fingerprint_state_dict
from protocol.messages import Attestation, DeltaManifest, MergeResult
from protocol.quorum import full_quorum
from protocol.shards import replica_count, shard_workers

pytestmark = [pytest.mark.network, pytest.mark.slow]

NODES = ("n1", "n2", "n3", "n4", "n5")
BOOTSTRAP = "n1"
QUORUM = len(NODES) // 2 + 1  # the genesis default: a majority of the contributors
FALLBACK_SECONDS = 4.0
NEVER = 3600.0  # the victims' poll: after their first step they never step again


def _owned_chunks(root, name: str, network_id: str) -> set[str]:
    """Every chunk digest of node `name`'s round-0 delta manifest, read from its own store."""
    with NodeState(root / name) as state:
        manifest_id = state.get("contribution/0")["manifest"]
    with ContentStore(root / name / "store") as store:
        manifest = open_envelope(store.get(manifest_id), DeltaManifest, network_id=network_id).message
    return {digest for tensor in manifest.tensors for digest in tensor.chunks}


def _wait_held_by(root, names, digests: set[str], timeout: float) -> None:
    """Wait until the stores of `names` hold every one of `digests` between them."""
    deadline = time.monotonic() + timeout
    missing = set(digests)
    while time.monotonic() < deadline:
        for name in names:
            with ContentStore(root / name / "store") as store:
                missing = set(store.missing(sorted(missing)))
        if not missing:
            return
        time.sleep(0.2)
    raise NodeError(f"expected {sorted(names)} to hold the victims' chunks, {len(missing)} missing")


@pytest.fixture(scope="module")
def fallback_round(tmp_path_factory):
    root = tmp_path_factory.mktemp("fallback")
    make_base(root / "base")
    for index, name in enumerate(NODES):
        make_expert(root / "base", root / f"expert-{name}", seed=200 + index)
    keys = {name: load_or_create_identity(root / name).public_key for name in NODES}
    workers = sorted(keys.values())  # the plan's worker order
    position = {name: workers.index(key) for name, key in keys.items()}
    by_position = {p: name for name, p in position.items()}
    count = len(NODES)
    # the dying workers of shard s: positions s and s+2 (never the bootstrap, which others join through)
    shard = next(s for s in range(count) if position[BOOTSTRAP] not in (s, (s + 2) % count))
    victims = (by_position[shard], by_position[(shard + 2) % count])
    survivors = tuple(n for n in NODES if n not in victims)
    replicas = replica_count(count, full_quorum(QUORUM))
    planned = {by_position[p] for p in shard_workers(shard, count, replicas)}
    trees: dict[str, list[int]] = {}
    commands: dict[str, list[str]] = {}  # the process names of each victim's tree
    with LocalNetwork(root, fallback_seconds=FALLBACK_SECONDS) as net:
        net.create(
            BOOTSTRAP,
            root / "base",
            network_name="fallback",
            method="ties",
            min_contributions=count,
            settle_seconds=1.0,
        )
        record = net.state(BOOTSTRAP, "genesis")
        for name in victims:  # the genesis and the base in their folders: they contribute before starting
            with ContentStore(root / name / "store") as store, NodeState(root / name) as state:
                assert (
                    store_base(root / "base", store, net.genesis.chunk_size)[0] == net.genesis.base_manifest
                )
                state.set("genesis", record)
            net.contribute(name, root / f"expert-{name}", codec="bf16")
        net.start(BOOTSTRAP)
        net.wait_ready(BOOTSTRAP)
        for name in NODES[1:]:  # the victims announce their contribution in their first step, then idle
            net.start(name, poll=NEVER if name in victims else None)
        for name in NODES[1:]:
            net.wait_ready(name)
        for name in survivors:
            net.contribute(name, root / f"expert-{name}", codec="bf16")
        victim_chunks = set().union(*(_owned_chunks(root, v, net.network_id) for v in victims))
        _wait_held_by(root, survivors, victim_chunks, timeout=90.0)
        for name in victims:
            proc = net.procs[name]
            trees[name] = process_tree(proc.pid)
            commands[name] = sorted(Path(f"/proc/{pid}/comm").read_text().strip() for pid in trees[name])
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        gone = {name: wait_gone(trees[name], 15.0) for name in victims}
        latest = net.wait_converged(survivors, timeout=90.0)
        running = [pid for name in survivors for pid in process_tree(net.procs[name].pid)]
        yield {
            "net": net,
            "shard": shard,
            "victims": victims,
            "survivors": survivors,
            "planned": planned,
            "keys": keys,
            "trees": trees,
            "commands": commands,
            "gone": gone,
            "latest": latest,
        }
    assert wait_gone(running, 15.0) == []  # the survivors and their p2pd, stopped by `close`


def _results(root, latest: dict, network_id: str) -> list[MergeResult]:
    with ContentStore(root / "store") as store:
        return [
            open_envelope(store.get(i), MergeResult, network_id=network_id).message for i in latest["results"]
        ]


def test_the_killed_workers_left_no_process(fallback_round):
    for name in fallback_round["victims"]:  # the node, its DHT child and their p2pd
        assert len(fallback_round["trees"][name]) == 3 and "p2pd" in fallback_round["commands"][name]
    assert fallback_round["gone"] == {name: [] for name in fallback_round["victims"]}


def test_the_survivors_converge_on_the_offline_merge_of_the_admitted_contributions(fallback_round):
    net, survivors, latest = fallback_round["net"], fallback_round["survivors"], fallback_round["latest"]
    assert {latest[n]["round"] for n in survivors} == {0}
    assert len({latest[n]["fingerprint"] for n in survivors}) == 1
    results = _results(net.root / survivors[0], latest[survivors[0]], net.network_id)
    assert [(r.shard, r.shards) for r in results] == [(j, len(NODES)) for j in range(len(NODES))]
    recipe = results[0].recipe
    assert all(r.recipe == recipe for r in results)
    manifests = {name: net.state(name, "contribution/0")["manifest"] for name in NODES}
    assert sorted(recipe.contributions) == sorted(manifests.values())  # every expert admitted
    # Offline: each admitted expert is the base plus its delta as decoded from its contributor's
    # store; the engine merges them in memory with the recipe's settings.
    base = load_file(net.root / "base" / "model.safetensors")
    models = {}
    for name, manifest_id in manifests.items():
        with ContentStore(net.root / name / "store") as store:
            manifest = open_envelope(store.get(manifest_id), DeltaManifest, network_id=net.network_id).message
            deltas = decode_tensors(manifest.tensors, store.get, manifest.chunk_size)
        models[manifest_id] = {k: base[k].float() + deltas[k] for k in base}
    config = {
        "merge_method": recipe.method,
        "base_model": "base",
        "models": [{"model": c} for c in recipe.contributions],
        "parameters": recipe.parameters,
        "dtype": recipe.dtype,
        "seed": recipe.seed,
    }
    offline = merge_state_dicts(config, {"base": base, **models})
    assert fingerprint_state_dict(offline) == latest[survivors[0]]["fingerprint"]
    with ContentStore(net.root / survivors[0] / "store") as store:
        for result in results:
            merged = decode_tensors(result.tensors, store.get, result.chunk_size)
            assert all(torch.equal(merged[k], offline[k]) for k in merged)


def test_the_lacking_shard_was_attested_in_full_by_nodes_not_planned_for_it(fallback_round):
    net, shard = fallback_round["net"], fallback_round["shard"]
    keys, planned = fallback_round["keys"], fallback_round["planned"]
    victims, survivors = fallback_round["victims"], fallback_round["survivors"]
    name_of = {key: name for name, key in keys.items()}
    assert set(victims) < planned and len(planned - set(victims)) == 1
    for name in victims:  # the victims never merged a shard, so they published no result or attestation
        with NodeState(net.root / name) as state:
            assert list(state.keys("shard/0/")) == []
    for name in survivors:
        full: set[str] = set()
        signers: set[str] = set()
        for attestations in net.state(name, "latest")["attestations"]:
            for data in attestations:
                att = open_envelope(data, Attestation, network_id=net.network_id).message
                signers.add(name_of[att.signer])
                if att.shard == shard and att.kind == "full":
                    full.add(name_of[att.signer])
        assert not signers & set(victims)
        assert len(full) >= full_quorum(QUORUM)
        assert full - planned, (full, planned)  # a node outside the shard's plan merged it in full
    fallback = [n for n in sorted(set(survivors) - planned) if net.state(n, f"shard/0/{shard}") is not None]
    assert fallback, "expected a survivor outside the shard's plan to hold its own merge of the shard"
