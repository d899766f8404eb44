"""Heterogeneous fusion decided by a network of node processes on 127.0.0.1 (a micro zoo).

Four `umm node start` processes of a network whose genesis holds a probe set of `lists` prompts:
n1 contributes the zoo's arithmetic expert (a delta); n2 hosts a GPT-2 lists expert (another
architecture and tokenizer) and publishes its distribution summary; n3 is a fuser (``--fuse``):
it distills the summary into a copy of the base and contributes it, its card naming the summary;
n4 contributes a copy that claims the same provenance but is the zoo's logic expert, which does
not lower the cross-entropy to the summary. Every node checks both fused contributions, admits
n3's and refuses n4's; the pulled model equals the engine's merge of n1's and n3's deltas and
scores better on `lists` than the same merge without the fused copy.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from merging.engine import merge
from merging.search.scores import proxy_scores, teacher_forced_batches
from merging.testbed.harness import plain_prompt
from merging.testbed.models import load_pretrained
from merging.testbed.tasks import generate
from merging.testbed.training import TrainSpec
from merging.testbed.zoo import RECIPES, HeteroSpec, build_zoo
from node.genesis import read_base_manifest
from node.local import LocalNetwork
from node.store import ContentStore
from protocol.chunks import decode_tensors
from protocol.envelope import open_envelope
from protocol.fingerprint import weights_fingerprint
from protocol.messages import DeltaManifest, ExpertCard, MergeResult

pytestmark = [pytest.mark.network, pytest.mark.slow]

NODES = ("n1", "n2", "n3", "n4")
EXPERT, SOURCE, FUSER, BOGUS = NODES
PROBES = 128
FUSE_ARGS = ["--fuse", "--fuse-steps", "60", "--fuse-lr", "1e-2", "--fuse-batch-size", "16"]


def _zoo():
    """The micro zoo with a GPT-2 lists expert trained long enough to know the task's format."""
    micro = RECIPES["micro"]
    (gpt2,) = micro.heterogeneous
    train = TrainSpec(steps=150, lr=1e-2, batch_size=16, mixture=(("lists", 1.0),), warmup=10)
    hetero = HeteroSpec(gpt2.name, gpt2.domain, gpt2.model, train)
    return build_zoo(recipe=dataclasses.replace(micro, size="micro-fusion", heterogeneous=(hetero,)))


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion-network")
    zoo = _zoo()
    probe = [plain_prompt(ex.prompt) for ex in generate("lists", "train", n=PROBES)]
    with LocalNetwork(root) as net:
        net.create(
            EXPERT,
            zoo.base,
            network_name="fusion",
            min_contributions=2,
            probe_set=probe,
            settle_seconds=1.0,
        )
        net.start_all(NODES, timeout=600.0, args={FUSER: FUSE_ARGS})
        net.expert = net.contribute(EXPERT, zoo.experts["arithmetic"]).manifest_id
        summary = net.contribute(
            SOURCE, zoo.heterogeneous["gpt2-lists"], max_new_tokens=64, domains=("lists",)
        )
        assert summary.kind == "summary"
        net.summary = summary.manifest_id
        net.bogus = net.contribute(
            BOGUS, zoo.experts["logic"], name="claims-to-be-fused", fused_from=(summary.manifest_id,)
        ).manifest_id
        net.converged = net.wait_converged(NODES, timeout=900.0)
        net.zoo = zoo
        yield net


def _card(net: LocalNetwork, name: str) -> ExpertCard:
    own = net.state(name, "contribution/0")
    return open_envelope(own["card"], ExpertCard, network_id=net.network_id).message


def _results(net: LocalNetwork, name: str) -> list[MergeResult]:
    with ContentStore(net.root / name / "store") as store:
        return [
            open_envelope(store.get(i), MergeResult, network_id=net.network_id).message
            for i in net.converged[name]["results"]
        ]


def _offline_merge(net: LocalNetwork, contributions, out, recipe):
    """The engine's merge of `contributions` (base + each decoded delta, read from its contributor)."""
    owners = {net.state(n, "contribution/0")["manifest"]: n for n in (EXPERT, FUSER, BOGUS)}
    genesis = net.genesis
    with ContentStore(net.root / EXPERT / "store") as store:
        base = decode_tensors(
            read_base_manifest(store.get(genesis.base_manifest)), store.get, genesis.chunk_size
        )
    models = []
    for contribution in contributions:
        with ContentStore(net.root / owners[contribution] / "store") as store:
            manifest = open_envelope(
                store.get(contribution), DeltaManifest, network_id=net.network_id
            ).message
            deltas = decode_tensors(manifest.tensors, store.get, manifest.chunk_size)
        folder = out.parent / f"{out.name}-{contribution[:12]}"
        shutil.copytree(net.zoo.base, folder)
        save_file({k: (base[k].float() + deltas[k]).contiguous() for k in base}, folder / "model.safetensors")
        models.append({"model": str(folder)})
    config = {
        "merge_method": recipe.method,
        "base_model": str(net.zoo.base),
        "models": models,
        "parameters": recipe.parameters,
        "dtype": recipe.dtype,
        "seed": recipe.seed,
    }
    merged = merge(config, out, progress=False)
    for side in net.zoo.base.iterdir():  # the tokenizer, to score the merged model
        if side.suffix != ".safetensors" and not (merged / side.name).exists():
            shutil.copy(side, merged / side.name)
    return merged


def _lists_loglik(folder) -> float:
    torch.set_num_threads(1)
    model, tokenizer = load_pretrained(folder)
    batches = teacher_forced_batches(tokenizer, ["lists"], "test", 64, 64)
    return proxy_scores(model, batches)["loglik"]["lists"]


def test_the_fuser_contributes_a_copy_whose_card_names_the_summary(fused):
    card = _card(fused, FUSER)
    assert card.fused_from == (fused.summary,)
    assert card.domains == ("lists",)


def test_every_node_admits_the_honest_fused_copy_and_refuses_the_other(fused):
    fuser = fused.state(FUSER, "contribution/0")["manifest"]
    fingerprints = {latest["fingerprint"] for latest in fused.converged.values()}
    assert len(fingerprints) == 1
    for name in NODES:
        recipes = {r.recipe.id: r.recipe for r in _results(fused, name)}
        assert len(recipes) == 1
        (recipe,) = recipes.values()
        assert sorted(recipe.contributions) == sorted([fused.expert, fuser]), name
        log = (fused.root / f"{name}.log").read_text()
        assert f"fused contribution {fuser[:16]} accepted" in log, name
        assert f"fused contribution {fused.bogus[:16]} refused: held-out cross-entropy" in log, name
    assert fused.state(BOGUS, "contribution/1") is None  # its own check refused it: not offered again


def test_the_pulled_model_is_the_merge_with_the_fused_copy_and_gains_on_lists(fused, tmp_path):
    done = fused.pull(tmp_path / "pulled")
    assert done.returncode == 0, done.stderr[-3000:]
    (recipe,) = {r.recipe.id: r.recipe for r in _results(fused, EXPERT)}.values()
    offline = _offline_merge(fused, recipe.contributions, tmp_path / "offline", recipe)
    assert weights_fingerprint(tmp_path / "pulled") == weights_fingerprint(offline)
    without = _offline_merge(
        fused, [fused.expert], tmp_path / "without", fused.genesis.recipe(0, [fused.expert])
    )
    pulled, alone, base = (_lists_loglik(f) for f in (offline, without, fused.zoo.base))
    assert pulled > alone + 0.1 and pulled > base + 0.1, (pulled, alone, base)


def test_status_shows_the_fused_contributions_with_provenance_and_verdicts(fused):
    command = [sys.executable, "-m", "node.cli", "status", "--network", fused.network_id, "--json"]
    done = subprocess.run(
        [*command, "--initial-peers", fused.bootstrap], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shown = json.loads(done.stdout)["rounds"]["0"]
    rows = {row["contribution"]: row for row in shown["fusion"]}
    fuser = fused.state(FUSER, "contribution/0")["manifest"]
    assert set(rows) == {fuser, fused.bogus}
    assert rows[fuser]["fused_from"] == [fused.summary] == rows[fused.bogus]["fused_from"]
    assert (rows[fuser]["accepted_by"], rows[fuser]["refused_by"]) == (len(NODES), 0)
    assert rows[fuser]["fused"] < 0.95 * rows[fuser]["pivot"]
    assert (rows[fused.bogus]["accepted_by"], rows[fused.bogus]["refused_by"]) == (0, len(NODES))
    summaries = {row["summary"] for row in shown["summaries"]}
    assert summaries == {fused.summary}
