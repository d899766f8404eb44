"""A local network of node processes: convergence, late pull, a killed peer, a poisoned expert, restart.

Six `umm node start` processes on 127.0.0.1 (each in its own process group, p2pd included):
n1 creates the network with the default quorum (a majority of the contributors: 4 of 6); n1-n5
contribute honest experts; n6 contributes a poisoned delta (100x the others' norm) that robust
admission must exclude. Each shard is merged in full by 3 nodes, so its quorum needs at least one
sampled attestation (a spot check) of another node.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import sys
import time

import pytest
import torch
from node_models import make_base, make_expert
from safetensors.torch import load_file, save_file

from merging.engine import merge
from node.datafolder import load_or_create_identity
from node.genesis import read_base_manifest
from node.local import LocalNetwork
from node.process import (
    bound_unix_sockets,
    process_tree,
    remove_unbound_sockets,
    spawn_in_new_session,
    wait_gone,
)
from node.pull import NoResultError, pull
from node.state import NodeState
from node.store import ContentStore
from protocol.chunks import decode_tensors
from protocol.envelope import open_envelope
from protocol.fingerprint import weights_fingerprint
from protocol.messages import Attestation, DeltaManifest, MergeResult
from protocol.verify import check_round_quorum

pytestmark = [pytest.mark.network, pytest.mark.slow]

NODES = ("n1", "n2", "n3", "n4", "n5", "n6")
HONEST = ("n1", "n2", "n3", "n4", "n5")
POISONED = "n6"
PROBES = ("t1 t2 t3", "t4 t5 t6")


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    root = tmp_path_factory.mktemp("network")
    make_base(root / "base")
    for index, name in enumerate(HONEST):
        make_expert(root / "base", root / f"expert-{name}", seed=100 + index)
    make_expert(root / "base", root / f"expert-{POISONED}", seed=999, scale=2.0)  # the poisoned delta
    make_base(root / "wider", seed=5, hidden=48)
    with LocalNetwork(root) as net:
        net.create(
            "n1",
            root / "base",
            network_name="tiny",
            method="ties",
            min_contributions=len(NODES),  # the default quorum: a majority, 4 of the 6 contributors
            probe_set=list(PROBES),
            settle_seconds=1.0,
        )
        net.start_all(NODES)
        for name in NODES:
            net.contribute(name, root / f"expert-{name}", codec="bf16")
        # another architecture: a response summary
        net.contribute("n3", root / "wider", k=3, max_new_tokens=6, name="wider")
        net.converged = net.wait_converged(NODES)
        yield net


def _manifest(store: ContentStore, digest: str, network_id: str) -> DeltaManifest:
    return open_envelope(store.get(digest), DeltaManifest, network_id=network_id).message


def _shard_results(store: ContentStore, latest: dict, network_id: str) -> list[MergeResult]:
    return [
        open_envelope(store.get(i), MergeResult, network_id=network_id).message for i in latest["results"]
    ]


def test_nodes_converge_on_the_offline_merge_without_the_poisoned_expert(network, tmp_path):
    fingerprints = {latest["fingerprint"] for latest in network.converged.values()}
    assert len(fingerprints) == 1
    (fingerprint,) = fingerprints
    with ContentStore(network.root / "n1" / "store") as store, NodeState(network.root / "n1") as state:
        shards = _shard_results(store, network.converged["n1"], network.network_id)
        honest = {state_name: None for state_name in HONEST}
        for name in NODES:
            with NodeState(network.root / name) as node_state:
                honest[name] = node_state.get("contribution/0")["manifest"]
        # six workers: six shards, each computed in full by three nodes (two full attestations + one spare)
        assert [(s.shard, s.shards) for s in shards] == [(j, len(NODES)) for j in range(len(NODES))]
        assert len({s.recipe.id for s in shards}) == 1  # every shard admitted the same contributions
        result = shards[0]
        assert sorted(result.candidates) == sorted(honest.values())
        assert sorted(result.recipe.contributions) == sorted(honest[n] for n in HONEST)
        assert honest[POISONED] not in result.recipe.contributions
        computed = {}
        for name in NODES:
            with NodeState(network.root / name) as node_state:
                computed[name] = sorted(int(k.rsplit("/", 1)[1]) for k in node_state.keys("shard/0/"))
        assert all(len(shard_list) == 3 for shard_list in computed.values()), computed
        # Offline: rebuild each admitted expert as base + decoded delta, merge the folders with the engine.
        genesis = network.genesis
        base_entries = read_base_manifest(store.get(genesis.base_manifest))
        base = decode_tensors(base_entries, store.get, genesis.chunk_size)
        folders = []
        owner = {manifest_id: name for name, manifest_id in honest.items()}
        for contribution in result.recipe.contributions:  # the recipe's (sorted) order
            # a node holds only its shards' tensors of others' deltas: read each from its contributor
            with ContentStore(network.root / owner[contribution] / "store") as own_store:
                manifest = _manifest(own_store, contribution, network.network_id)
                deltas = decode_tensors(manifest.tensors, own_store.get, manifest.chunk_size)
            folder = tmp_path / contribution[:12]
            folder.mkdir()
            expert = {k: (base[k].float() + deltas[k]).contiguous() for k in base}
            save_file(expert, folder / "model.safetensors", metadata={"format": "pt"})
            (folder / "config.json").write_bytes((network.root / "base" / "config.json").read_bytes())
            folders.append(folder)
        del state
    config = {
        "merge_method": result.recipe.method,
        "base_model": str(network.root / "base"),
        "models": [{"model": str(f)} for f in folders],
        "parameters": result.recipe.parameters,
        "dtype": result.recipe.dtype,
        "seed": result.recipe.seed,
    }
    offline = merge(config, tmp_path / "offline", progress=False)
    assert weights_fingerprint(offline) == fingerprint


def _drawn_sample(proof: bytes, names, contributions: int) -> list[str]:
    """The spot-check rule written out: tensor drawn if its 64-bit hash < 2/contributions of 2**64."""
    drawn = []
    for name in names:
        h = int.from_bytes(hashlib.sha256(b"umm-spot-tensor-v1" + proof + name.encode()).digest()[:8], "big")
        if h * contributions < min(2, contributions) * 2**64:
            drawn.append(name)
    return drawn


def test_every_shard_quorum_holds_full_and_sampled_attestations(network):
    latest = network.converged["n1"]
    with ContentStore(network.root / "n1" / "store") as store:
        results = [
            open_envelope(store.get(i), MergeResult, network_id=network.network_id) for i in latest["results"]
        ]
        base_sizes = [
            (e.name, e.nbytes) for e in read_base_manifest(store.get(network.genesis.base_manifest))
        ]
    sampled_seen = 0
    for result, attestations in zip(results, latest["attestations"], strict=True):
        messages = {}
        for data in attestations:
            att = open_envelope(data, Attestation, network_id=network.network_id).message
            messages[att.signer] = att
        full = [a for a in messages.values() if a.kind == "full"]
        sampled = [a for a in messages.values() if a.kind == "sampled"]
        assert len(full) >= 2 and len(full) + len(sampled) >= 4, (len(full), len(sampled))
        tensors = {t.name: t.nbytes for t in result.message.tensors}
        for att in sampled:
            drawn = _drawn_sample(att.sample_proof, tensors, len(result.message.recipe.contributions))
            drawn = drawn or [
                min(
                    tensors,
                    key=lambda n: hashlib.sha256(
                        b"umm-spot-tensor-v1" + att.sample_proof + n.encode()
                    ).digest()[:8],
                )
            ]
            assert (att.checked_tensors, att.checked_bytes) == (len(drawn), sum(tensors[n] for n in drawn))
        sampled_seen += len(sampled)
    assert sampled_seen >= len(results)  # 3 full workers per shard cannot make a quorum of 4 alone
    check = check_round_quorum(
        results, latest["attestations"], base_sizes=base_sizes, quorum=4, network_id=network.network_id
    )
    assert check.ok and check.fingerprint == latest["fingerprint"]


def test_late_joiner_pulls_byte_identical_loadable_weights(network, tmp_path):
    done = network.pull(tmp_path / "merged")
    assert done.returncode == 0, done.stderr[-3000:]
    fingerprint = network.converged["n1"]["fingerprint"]
    assert f"round 0: {fingerprint}" in done.stdout
    assert weights_fingerprint(tmp_path / "merged") == fingerprint
    with ContentStore(network.root / "n2" / "store") as store:
        expected = {}
        for shard in _shard_results(store, network.converged["n2"], network.network_id):
            expected.update(decode_tensors(shard.tensors, store.get, shard.chunk_size))
    pulled = load_file(tmp_path / "merged" / "model.safetensors")
    assert sorted(pulled) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(pulled[name], tensor), name
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(model.state_dict()["model.norm.weight"], expected["model.norm.weight"])
    assert not any(p.name.startswith(".merged") for p in tmp_path.iterdir())  # no partial folders left


class Interrupted(Exception):
    """Raised from a pull's progress report, as a kill would stop it between two chunks."""


def test_interrupted_pull_resumes_to_byte_identical_weights(network, tmp_path):
    out = tmp_path / "merged"
    reports: list[int] = []

    def stop_after_three_chunks(what: str, done: int, total: int) -> None:
        if what != "chunks":  # the sample check before the transfer (node.pull_verify)
            return
        reports.append(done)
        if len(reports) == 4:  # the report before the transfer, then one per chunk written
            raise Interrupted

    with pytest.raises(Interrupted):
        asyncio.run(
            pull(network.network_id, out, initial_peers=[network.bootstrap], progress=stop_after_three_chunks)
        )
    work = tmp_path / ".merged.umm-pull"
    named = (work / "received").read_bytes()
    # chunks written before the fetch stopped: distinct digests, since two holders raced for the
    # same chunk may both write it and journal it twice (resuming counts it once)
    journaled = len({named[at : at + 32] for at in range(0, len(named), 32)})
    assert not out.exists() and journaled >= 3

    resumed: list[tuple[int, int]] = []
    outcome = asyncio.run(
        pull(
            network.network_id,
            out,
            initial_peers=[network.bootstrap],
            progress=lambda what, done, total: what == "chunks" and resumed.append((done, total)),
        )
    )
    total = resumed[0][1]
    assert resumed[0] == (journaled, total) and resumed[-1] == (total, total)  # only the rest fetched
    assert journaled < total
    assert outcome.merged_fingerprint == network.converged["n1"]["fingerprint"]
    assert weights_fingerprint(out) == outcome.merged_fingerprint
    # An independent reference: the same tensors, decoded from a node's store, in safetensors' layout.
    with ContentStore(network.root / "n1" / "store") as store:
        shards = _shard_results(store, network.converged["n1"], network.network_id)
        expected = {}
        for shard in shards:
            expected.update(decode_tensors(shard.tensors, store.get, shard.chunk_size))
    reference = tmp_path / "reference.safetensors"
    save_file(dict(sorted(expected.items())), reference, metadata={"format": "pt"})
    pulled = load_file(out / "model.safetensors")
    assert sorted(pulled) == sorted(expected)
    assert all(torch.equal(pulled[name], tensor) for name, tensor in expected.items())
    assert (
        hashlib.sha256((out / "config.json").read_bytes()).hexdigest()
        == network.genesis.base_files["config.json"]
    )
    assert not work.exists()


def test_a_pull_of_an_unknown_network_times_out_with_a_typed_error(network, tmp_path):
    absent = "absent.0123456789abcdef"
    expected = f"expected a result of {absent} attested by a quorum within 1.5 s, got none"
    with pytest.raises(NoResultError, match=f"^{expected}$"):
        asyncio.run(pull(absent, tmp_path / "never", initial_peers=[network.bootstrap], timeout=1.5))
    assert list(tmp_path.iterdir()) == []  # no output, no work folder


def test_a_killed_pull_leaves_no_process_or_socket(network, tmp_path):
    command = [sys.executable, "-m", "node.cli", "pull", "--network", "absent.0123456789abcdef"]
    command += ["--out", str(tmp_path / "never"), "--initial-peers", network.bootstrap, "--timeout", "120"]
    proc = spawn_in_new_session(command, log_path=tmp_path / "pull.log")
    tree: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(tree := process_tree(proc.pid)) < 2 and time.monotonic() < deadline:  # pull, p2pd
            time.sleep(0.1)
        time.sleep(0.5)
        sockets = bound_unix_sockets(tree)
        assert len(tree) == 2 and any("p2pd" in s for s in sockets), (tree, sockets)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert wait_gone(tree, 15.0) == []
    finally:
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(os.path.exists(s) for s in sockets) and time.monotonic() < deadline:
        time.sleep(0.05)
    # `p2pd` removes its socket as it exits when its control connection closes; when it leaves the
    # file (seen once in ~40 kills on a loaded machine), the next node or pull start removes it
    left = [s for s in sockets if os.path.exists(s)]
    assert sorted(s for s in remove_unbound_sockets() if s in left) == sorted(left)
    assert [s for s in sockets if os.path.exists(s)] == []


def test_pull_completes_after_a_peer_is_killed(network, tmp_path):
    victim = network.procs["n2"]
    tree = process_tree(victim.pid)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=10)
    assert wait_gone(tree, 15.0) == []
    done = network.pull(tmp_path / "merged")
    assert done.returncode == 0, done.stderr[-3000:]
    assert weights_fingerprint(tmp_path / "merged") == network.converged["n1"]["fingerprint"]


@pytest.mark.parametrize("name", ["n3", "n1"])  # n1 is the bootstrap: it rejoins through a running node
def test_restart_keeps_store_and_state(network, name):
    bootstrap_before = network.bootstrap
    data = network.root / name
    with ContentStore(data / "store") as store:
        chunks_before = sorted(store)
    identity_before = load_or_create_identity(data).peer_id
    proc = network.procs[name]
    tree = process_tree(proc.pid)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert wait_gone(tree, 10.0) == []
    assert "stopped" in (network.root / f"{name}.log").read_text()
    network.start(name)
    network.wait_ready(name)
    log = (network.root / f"{name}.log").read_text()
    assert log.count(f"peer id: {identity_before}") == 2
    assert network.state(name, "latest") == network.converged[name]
    with ContentStore(data / "store") as store:
        assert sorted(store) == chunks_before
    if name == "n1":  # its new address is the one later pulls and status calls bootstrap from
        assert network.bootstrap != bootstrap_before
        assert network.bootstrap == network.maddrs["n1"][0]


def test_the_other_architecture_published_a_response_summary_on_the_probe_set(network):
    from protocol.messages import DistributionSummary
    from protocol.summary import decode_summary

    with ContentStore(network.root / "n3" / "store") as store, NodeState(network.root / "n3") as state:
        summary_id = state.get("summary/0")["summary"]
        signed = open_envelope(store.get(summary_id), DistributionSummary, network_id=network.network_id)
        summary = decode_summary(signed.message, store.get, PROBES)
    assert signed.message.k == 3 and summary.k == 3
    assert summary.probe.prompts == PROBES and len(summary.responses) == len(PROBES)
    assert summary.model_name == "wider"
    lengths = (summary.offsets[1:] - summary.offsets[:-1]).tolist()
    assert all(1 <= n <= 7 for n in lengths)  # at most 6 response tokens and the end-of-sequence token


def test_status_lists_peers_cards_and_attestations(network):
    import json
    import subprocess
    import sys

    command = [sys.executable, "-m", "node.cli", "status", "--network", network.network_id, "--json"]
    done = subprocess.run(
        [*command, "--initial-peers", network.bootstrap], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    status = json.loads(done.stdout)
    assert len(status["peers"]) >= 3  # every running node announced itself
    assert {p["latest"] for p in status["peers"]} == {0}
    experts = {c["expert"] for c in status["rounds"]["0"]["contributions"]}
    assert experts == {f"expert-{n}" for n in NODES}
    assert [s["expert"] for s in status["rounds"]["0"]["summaries"]] == ["wider"]
    with ContentStore(network.root / "n1" / "store") as store:
        shards = _shard_results(store, network.converged["n1"], network.network_id)
    attestations = status["rounds"]["0"]["attestations"]
    for shard in shards:
        rows = [a for a in attestations if a["shard"] == f"{shard.shard}/{shard.shards}"]
        assert len({a["peer"] for a in rows}) >= 2  # the quorum
        assert {a["fingerprint"] for a in rows} == {shard.merged_fingerprint}
