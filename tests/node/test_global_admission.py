"""A fault in one shard excludes a contribution from every shard, on every node (node.faults).

Four `umm node start` processes on 127.0.0.1 contribute one expert each (lossless ``raw`` codec),
so the round has four workers, four shards, each merged in full by three of them, and a majority
quorum of 3. One contribution is bad in one small tensor only (``model.norm.weight``, which lies
in one shard): a NaN in its delta, or its delta x20 (the other contributions' deltas of that
tensor are ~20x smaller, above the genesis outlier factor 3). Before, the workers of that shard
left it out there and admitted it everywhere else. Now every node ends with the same decided
round, whose every shard's recipe admits the three good contributions only, and whose merged
model equals, bit for bit, the offline merge (merging.engine) of the three good experts.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from node_messages import with_nan
from node_models import make_base, make_expert
from safetensors.torch import load_file, save_file

from merging.engine import merge_state_dicts
from node.datafolder import load_or_create_identity
from node.local import LocalNetwork
from node.round_state import OwnContribution, RoundState
from node.state import NodeState
from node.store import ContentStore
from protocol.chunks import decode_tensors
from protocol.envelope import open_envelope
from protocol.fingerprint import fingerprint_state_dict
from protocol.messages import MergeResult

pytestmark = [pytest.mark.network, pytest.mark.slow]

NODES = ("g1", "g2", "g3", "g4")
BAD = "g1"  # the creator: its bad contribution is stored before any node starts
TARGET = "model.norm.weight"


def _scale_target(folder, base_dir, factor: float) -> None:
    """Multiply the expert's delta of TARGET by `factor` (a valid, finite contribution)."""
    base = load_file(base_dir / "model.safetensors")
    expert = load_file(folder / "model.safetensors")
    expert[TARGET] = (base[TARGET] + (expert[TARGET] - base[TARGET]) * factor).contiguous()
    save_file(expert, folder / "model.safetensors", metadata={"format": "pt"})


def _make_nan(root, network_id: str) -> None:
    """Replace the bad node's stored contribution by one whose TARGET delta holds a NaN."""
    data = root / BAD
    with NodeState(data) as state, ContentStore(data / "store") as store:
        rounds = RoundState(state)
        own = rounds.contribution(0)
        manifest = open_envelope(store.get(own.manifest), network_id=network_id)
        bad, chunks = with_nan(load_or_create_identity(data), manifest, store.get, TARGET)
        for digest, chunk in chunks.items():
            store.put(chunk, digest)
        store.put(bad.raw, bad.id)
        rounds.set_contribution(0, OwnContribution(own.card, bad.id))


@pytest.mark.parametrize("fault", ["nan", "x20"])
def test_a_fault_in_one_shard_excludes_the_contribution_from_every_shard(tmp_path, fault):
    base_dir = tmp_path / "base"
    make_base(base_dir)
    for index, name in enumerate(NODES):
        make_expert(base_dir, tmp_path / f"expert-{name}", seed=500 + index)
    if fault == "x20":
        _scale_target(tmp_path / f"expert-{BAD}", base_dir, 20.0)
    with LocalNetwork(tmp_path) as net:
        genesis = net.create(
            BAD, base_dir, network_name="faults", settle_seconds=1.0, min_contributions=len(NODES)
        )
        net.contribute(BAD, tmp_path / f"expert-{BAD}", codec="raw")
        if fault == "nan":
            _make_nan(tmp_path, genesis.network_id)
        net.start_all(NODES)
        for name in NODES[1:]:
            net.contribute(name, tmp_path / f"expert-{name}", codec="raw")
        latest = net.wait_converged(NODES, timeout=420.0)
        command = [sys.executable, "-m", "node.cli", "status", "--network", net.network_id, "--json"]
        status = subprocess.run(
            [*command, "--initial-peers", net.bootstrap],
            capture_output=True,
            text=True,
            timeout=600,  # a light client DHT node; minutes on a loaded machine
        )
        manifests = {name: net.state(name, "contribution/0")["manifest"] for name in NODES}
        logs = {name: (tmp_path / f"{name}.log").read_text() for name in NODES}
        carried = {name: net.state(name, "contribution/1") for name in NODES}

    bad_id = manifests[BAD]
    good = sorted(manifests[name] for name in NODES if name != BAD)
    assert {latest[n]["round"] for n in NODES} == {0}
    assert len({latest[n]["fingerprint"] for n in NODES}) == 1
    assert len({tuple(latest[n]["results"]) for n in NODES}) == 1
    for name in NODES:  # every node excluded it itself, from every shard
        assert f"contribution {bad_id[:8]} excluded from every shard" in logs[name], logs[name][-3000:]
    assert carried[BAD] is None  # a contribution a fault excluded is not offered again
    assert status.returncode == 0, status.stderr
    claims = json.loads(status.stdout)["rounds"]["0"]["faults"]
    kind = "undecodable" if fault == "nan" else "outlier"
    assert [(c["contribution"], c["tensor"], c["kind"]) for c in claims] == [(bad_id, TARGET, kind)]
    # at least the first finder; the shard's other workers claim it too unless its check came first
    claimers = claims[0]["claimed_by"]
    assert 1 <= len(claimers) <= 3 and len(set(claimers)) == len(claimers)  # the shard's full workers

    with ContentStore(tmp_path / NODES[1] / "store") as store:
        results = [
            open_envelope(store.get(i), MergeResult, network_id=genesis.network_id).message
            for i in latest[NODES[1]]["results"]
        ]
        merged = {}
        for result in results:
            merged.update(decode_tensors(result.tensors, store.get, result.chunk_size))
    assert [r.shard for r in results] == list(range(len(NODES)))
    assert all(bad_id in r.candidates for r in results)  # a candidate of the round ...
    assert all(list(r.recipe.contributions) == good for r in results)  # ... admitted in no shard

    # offline, from the expert folders: the honest merge without the bad contribution
    base = load_file(base_dir / "model.safetensors")
    experts = {
        manifests[name]: load_file(tmp_path / f"expert-{name}" / "model.safetensors")
        for name in NODES
        if name != BAD
    }
    recipe = results[0].recipe
    config = {
        "merge_method": recipe.method,
        "base_model": "base",
        "models": [{"model": cid} for cid in good],
        "parameters": recipe.parameters,
        "dtype": recipe.dtype,
        "seed": recipe.seed,
    }
    offline = merge_state_dicts(config, {"base": base, **experts})
    assert sorted(merged) == sorted(offline)
    assert all(torch.equal(merged[k], offline[k]) for k in offline)
    assert fingerprint_state_dict(offline) == latest[NODES[0]]["fingerprint"]
