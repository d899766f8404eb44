"""The real zoo's build logic on tiny models: recipe-keyed cache, resume per model, determinism.

The packaged GGUF path itself needs the optional extra (tests/testbed/test_real.py); every
behaviour here runs the same code on the micro zoo's models as sources.
"""

import hashlib
import importlib.util
import shutil
from dataclasses import replace

import pytest
from transformers import AutoModelForCausalLM

import merging.testbed.real_zoo as real_zoo
from merging.testbed.real_zoo import (
    REAL_RECIPE,
    RealExpert,
    build_real_zoo,
    require_real_extra,
)
from merging.testbed.training import TrainSpec
from merging.testbed.zoo import ZooError


def _sha(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def _tiny_real_recipe(micro_zoo):
    spec = TrainSpec(steps=2, lr=1e-3, batch_size=4, mixture=(("lists", 0.1),), warmup=1, frozen=("norm",))
    hetero = RealExpert("gpt2-logic", str(micro_zoo.heterogeneous["gpt2-lists"]), "logic", replace(spec))
    return replace(
        REAL_RECIPE,
        base=str(micro_zoo.base),
        expert_train=spec,
        domains=("logic", "tracing"),
        heterogeneous=(hetero,),
        expert_steps=(),
    )


def test_a_recipe_change_changes_the_cache_key():
    digest = REAL_RECIPE.digest()
    assert replace(REAL_RECIPE, expert_train=replace(REAL_RECIPE.expert_train, lr=2e-4)).digest() != digest
    assert replace(REAL_RECIPE, threads=2).digest() != digest
    hetero = replace(REAL_RECIPE.heterogeneous[0], domain="logic")
    assert replace(REAL_RECIPE, heterogeneous=(hetero,)).digest() != digest
    assert replace(REAL_RECIPE).digest() == digest


def test_expert_mixture_is_its_domain_then_the_replay_of_the_others():
    spec = REAL_RECIPE.expert_spec("tracing")
    assert spec.mixture[0] == ("tracing", 1.0)
    assert {task for task, _ in spec.mixture[1:]} == {"arithmetic", "lists", "logic"}


def test_missing_extra_is_named(monkeypatch):
    monkeypatch.setattr(real_zoo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ZooError, match=r"'real' extra .*gguf"):
        require_real_extra()


def test_an_unknown_source_is_refused(tmp_path):
    recipe = replace(REAL_RECIPE, base=str(tmp_path / "nothing"), heterogeneous=())
    with pytest.raises(ZooError, match="expected a packaged model"):
        build_real_zoo(tmp_path, recipe=recipe)


def test_build_resumes_at_the_first_missing_model_and_is_deterministic(micro_zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(real_zoo, "BUILD_WORKERS", 1)
    recipe = _tiny_real_recipe(micro_zoo)
    steps = []
    zoo = build_real_zoo(tmp_path, recipe=recipe, reporter=lambda name, n: lambda s, loss: steps.append(name))
    assert sorted(set(steps)) == ["gpt2-logic", "logic", "tracing"] and len(steps) == 6
    assert zoo.root.name == f"real-{recipe.digest()[:16]}"
    model = AutoModelForCausalLM.from_pretrained(zoo.experts["tracing"])
    assert str(model.dtype) == "torch.bfloat16"
    trained = {name: _sha(path) for name, path in zoo.models().items()}
    assert trained["tracing"] != trained["base"] != trained["logic"]

    # An interrupted build: the manifest and one expert missing, the rest kept as they are.
    (zoo.root / "zoo.json").unlink()
    kept = (zoo.experts["logic"] / "model.safetensors").stat().st_mtime_ns
    shutil.rmtree(zoo.experts["tracing"])
    steps.clear()
    again = build_real_zoo(
        tmp_path, recipe=recipe, reporter=lambda name, n: lambda s, loss: steps.append(name)
    )
    assert steps == ["tracing", "tracing"]
    assert (again.experts["logic"] / "model.safetensors").stat().st_mtime_ns == kept
    assert {name: _sha(path) for name, path in again.models().items()} == trained

    steps.clear()
    build_real_zoo(tmp_path, recipe=recipe, reporter=lambda name, n: lambda s, loss: steps.append(name))
    assert steps == []  # the manifest is back: nothing trains


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="the real extra is not installed")
def test_real_recipe_reads_the_packaged_models():
    assert REAL_RECIPE.base == "smollm2" and REAL_RECIPE.heterogeneous[0].source == "gemma3"
    assert REAL_RECIPE.to_dict()["sources"]["smollm2"] != "not installed"


def test_makespan_schedules_the_longest_job_first_on_the_first_free_worker():
    # Longest first on 2 workers: 5 | 4, then 3 -> the second (7), 3 -> the first (8), 3 -> the second (10).
    assert real_zoo.makespan([3, 5, 3, 4, 3], 2) == 10
    assert real_zoo.makespan([2, 2, 2], 1) == 6
    assert real_zoo.makespan([], 2) == 0


def test_a_domain_step_count_overrides_the_recipe_steps_and_scales_its_estimate():
    recipe = replace(REAL_RECIPE, expert_steps=(("lists", 7),))
    assert recipe.expert_spec("lists").steps == 7
    assert recipe.expert_spec("arithmetic").steps == recipe.expert_train.steps
    plain = real_zoo.estimate_seconds(replace(REAL_RECIPE, expert_steps=()))
    scaled = plain["lists"] * 7 / recipe.expert_train.steps
    assert real_zoo.estimate_seconds(recipe)["lists"] == pytest.approx(scaled)
    assert recipe.digest() != replace(REAL_RECIPE, expert_steps=()).digest()


def test_the_build_starts_the_longest_estimated_model_first(micro_zoo, tmp_path, monkeypatch):
    recipe = _tiny_real_recipe(micro_zoo)
    monkeypatch.setattr(real_zoo, "BUILD_WORKERS", 1)
    monkeypatch.setattr(real_zoo, "SECONDS_PER_STEP", {recipe.base: 1.0, recipe.heterogeneous[0].source: 0.5})
    order = []
    build_real_zoo(tmp_path, recipe=recipe, reporter=lambda name, n: lambda s, loss: order.append(name))
    # Batch 4 is half a step of 8: tracing 2 x 20.5/10.6 / 2, logic 2 x 11.1/10.6 / 2, the other 2 x 0.5 / 2.
    assert list(dict.fromkeys(order)) == ["tracing", "logic", "gpt2-logic"]
