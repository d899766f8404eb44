"""Searched merges decided by a network of node processes on 127.0.0.1 (micro zoo).

Three `umm node start` processes of a network whose genesis enables search: n1 and n2 search
(``--search``) and propose; n3 does not search but carries a proposal signed with its key that
claims a fitness its recipe does not reach (written into its data folder as its own, so n3
publishes it). Every node verifies every proposal: the honest ones reproduce, n3's is refused;
all nodes adopt the best verified proposal, and the pulled model equals the engine's merge of the
adopted recipe.
"""

from __future__ import annotations

import time

import pytest
from node_models import make_base, make_expert
from safetensors.torch import save_file

from merging.engine import merge
from node.datafolder import load_or_create_identity
from node.genesis import read_base_manifest
from node.local import LocalNetwork
from node.state import NodeState
from node.store import ContentStore
from protocol.chunks import decode_tensors
from protocol.envelope import open_envelope, sign_message
from protocol.fingerprint import weights_fingerprint
from protocol.genesis import DEFAULT_PARAMETERS
from protocol.messages import SCHEMA_VERSION, DeltaManifest, MergeResult
from protocol.proposal import SearchProposal
from protocol.search_rules import make_search_settings, recipe_parameters, recipe_proposal

pytestmark = [pytest.mark.network, pytest.mark.slow]

NODES = ("n1", "n2", "n3")
SEARCHERS = ("n1", "n2")
INFLATED = "n3"
CLAIM = 5.0  # a share of the experts' gains no merge of these experts reaches on the dev set


def _inflated_proposal(net: LocalNetwork, candidates: list[str]) -> SearchProposal:
    identity = load_or_create_identity(net.root / INFLATED)
    settings = net.genesis.search_settings
    return sign_message(
        SearchProposal(
            v=SCHEMA_VERSION,
            network_id=net.network_id,
            signer=identity.public_key,
            created_at=int(time.time()),
            round=0,
            candidates=tuple(sorted(candidates)),
            method=net.genesis.method,
            parameters={
                "models": {c: {"weight": 0.9} for c in candidates},
                "global": dict(DEFAULT_PARAMETERS),
            },
            dev_fingerprint=settings.dev_fingerprint,
            fitness=CLAIM,
            search_seed=0,
        ),
        identity,
    )


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    root = tmp_path_factory.mktemp("search-network")
    make_base(root / "base")
    for index, name in enumerate(NODES):
        make_expert(root / "base", root / f"expert-{name}", seed=300 + index)
    search = make_search_settings(
        ["arithmetic", "logic"], limit=4, budget=6, granularity="layer", wait_seconds=75.0
    )
    with LocalNetwork(root) as net:
        net.create(
            "n1",
            root / "base",
            network_name="searched",
            min_contributions=3,
            settle_seconds=1.0,
            search=search,
        )
        net.start_all(NODES, timeout=600.0, searchers=SEARCHERS)
        manifests = [net.contribute(name, root / f"expert-{name}").manifest_id for name in NODES]
        inflated = _inflated_proposal(net, manifests)
        with ContentStore(root / INFLATED / "store") as store, NodeState(root / INFLATED) as state:
            store.put(inflated.raw, inflated.id)
            state.set("search/0/own", inflated.id)
        net.converged = net.wait_converged(NODES, timeout=900.0)
        net.inflated = inflated.message.id
        net.manifests = manifests
        yield net


def _checks(net: LocalNetwork, name: str) -> dict[str, dict]:
    with NodeState(net.root / name) as state:
        return {key.rsplit("/", 1)[1]: state.get(key) for key in state.keys("search/0/check/")}


def _results(net: LocalNetwork, name: str) -> list[MergeResult]:
    latest = net.converged[name]
    with ContentStore(net.root / name / "store") as store:
        return [
            open_envelope(store.get(i), MergeResult, network_id=net.network_id).message
            for i in latest["results"]
        ]


def test_every_node_verifies_the_honest_proposals_and_refuses_the_inflated_one(searched):
    proposals = {}
    for name in SEARCHERS:  # each searcher's own proposal, by its content id (what verdicts name)
        with NodeState(searched.root / name) as state, ContentStore(searched.root / name / "store") as store:
            envelope = store.get(state.get("search/0/own"))
            proposals[name] = open_envelope(
                envelope, SearchProposal, network_id=searched.network_id
            ).message.id
    assert all(proposals.values()) and len(set(proposals.values())) == 2
    for name in NODES:
        checks = _checks(searched, name)
        assert set(proposals.values()) | {searched.inflated} <= set(checks), name
        for pid in proposals.values():
            assert checks[pid]["reason"] == "", (name, checks[pid])
            assert checks[pid]["recomputed"] >= checks[pid]["claimed"] - 1e-4
        refused = checks[searched.inflated]
        assert refused["reason"].startswith(f"claimed fitness {CLAIM:.6f}"), refused
        assert refused["recomputed"] < CLAIM - 1e-4


def test_all_nodes_adopt_the_best_verified_proposal(searched):
    fingerprints = {latest["fingerprint"] for latest in searched.converged.values()}
    assert len(fingerprints) == 1
    checks = _checks(searched, "n3")
    verified = {pid: c["recomputed"] for pid, c in checks.items() if not c["reason"]}
    best = min(verified, key=lambda pid: (-verified[pid], pid))  # highest fitness, smaller id on ties
    for name in NODES:
        assert {recipe_proposal(r.recipe) for r in _results(searched, name)} == {best}, name


def test_the_pulled_model_equals_the_engine_merge_of_the_adopted_recipe(searched, tmp_path):
    done = searched.pull(tmp_path / "merged")
    assert done.returncode == 0, done.stderr[-3000:]
    recipe = _results(searched, "n1")[0].recipe
    assert f"recipe: ties, searched: proposal {recipe_proposal(recipe)[:16]}" in done.stdout
    genesis = searched.genesis
    with ContentStore(searched.root / "n1" / "store") as store:
        base = decode_tensors(
            read_base_manifest(store.get(genesis.base_manifest)), store.get, genesis.chunk_size
        )
    top, per_model = recipe_parameters(recipe.parameters, recipe.contributions)
    models = []
    for contribution in recipe.contributions:  # n1 searched: it fetched every admitted delta
        owner = NODES[searched.manifests.index(contribution)]
        with ContentStore(searched.root / owner / "store") as store:
            manifest = open_envelope(
                store.get(contribution), DeltaManifest, network_id=genesis.network_id
            ).message
            deltas = decode_tensors(manifest.tensors, store.get, manifest.chunk_size)
        folder = tmp_path / contribution[:12]
        folder.mkdir()
        save_file({k: (base[k].float() + deltas[k]).contiguous() for k in base}, folder / "model.safetensors")
        (folder / "config.json").write_bytes((searched.root / "base" / "config.json").read_bytes())
        models.append({"model": str(folder), "parameters": per_model[contribution]})
    config = {
        "merge_method": recipe.method,
        "base_model": str(searched.root / "base"),
        "models": models,
        "parameters": top,
        "dtype": recipe.dtype,
        "seed": recipe.seed,
    }
    offline = merge(config, tmp_path / "offline", progress=False)
    assert weights_fingerprint(offline) == searched.converged["n1"]["fingerprint"]
    assert weights_fingerprint(tmp_path / "merged") == searched.converged["n1"]["fingerprint"]


def test_status_shows_each_proposal_with_its_claimed_and_verified_fitness(searched):
    import json
    import subprocess
    import sys

    command = [sys.executable, "-m", "node.cli", "status", "--network", searched.network_id, "--json"]
    done = subprocess.run(
        [*command, "--initial-peers", searched.bootstrap], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["proposal"]: row for row in json.loads(done.stdout)["rounds"]["0"]["proposals"]}
    checks = _checks(searched, "n1")
    assert set(rows) == set(checks)  # every proposal record, named by the id its verifiers give it
    for pid, row in rows.items():
        assert row["claimed"] == checks[pid]["claimed"]
        if checks[pid]["reason"]:
            assert (row["verified_by"], row["refused_by"], row["verified_fitness"]) == (0, 3, None)
        else:
            assert (row["verified_by"], row["refused_by"]) == (3, 0)
            assert row["verified_fitness"] == checks[pid]["recomputed"]
