"""The written recipe is the searched candidate: resolving it gives its parameters, and merging it
from files gives the tensors the search scored in memory."""

from __future__ import annotations

import random

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merging.engine import merge
from merging.search.evolve import EvolveSettings, Search
from merging.search.fitness import Objective
from merging.search.recipe import check_recipe, recipe_mapping, write_recipe
from tests.search.tiny_models import EXPERT_NAMES, write_config


@pytest.fixture(scope="module")
def prepared(tiny_models, tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("cfg") / "ties.yaml", tiny_models)
    settings = EvolveSettings(
        tasks=("arithmetic",), limit=4, objective=Objective("loglik"), granularity="module"
    )
    return Search.prepare(config, settings)


def random_candidate(size: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.random() for _ in range(size)]


def test_only_changed_tensors_are_searched(prepared):
    searched = prepared.evaluator.searched
    assert searched and all(".layers." in n and "norm" not in n for n in searched)
    assert len(prepared.space.groups) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers


def test_recipe_resolves_to_the_candidate_and_keeps_the_config_elsewhere(prepared):
    x = random_candidate(prepared.space.size, 1)
    data = recipe_mapping(prepared.space, x)
    check_recipe(data, prepared.space.apply(x), prepared.evaluator.tensors)  # raises on any difference
    weights = data["models"][0]["parameters"]["weight"]
    assert weights[-1] == {"value": 0.5}  # the config's own value for tensors outside the search
    assert {e["filter"] for e in weights[:-1]} == {f for fs in prepared.space.filters.values() for f in fs}
    other = prepared.space.apply(random_candidate(prepared.space.size, 2))
    with pytest.raises(RuntimeError, match="does not reproduce"):
        check_recipe(data, other, prepared.evaluator.tensors)


@pytest.mark.parametrize(("granularity", "keys"), [("layer", None), ("blocks:2", ("weight", "lambda"))])
def test_whole_layer_groups_leave_unsearched_norms_at_the_config_value(
    tiny_models, tmp_path, granularity, keys
):
    config = write_config(tmp_path / "ties.yaml", tiny_models)
    settings = EvolveSettings(
        tasks=("arithmetic",), limit=2, objective=Objective("loglik"), granularity=granularity, keys=keys
    )
    search = Search.prepare(config, settings)
    norms = [n for n in search.evaluator.tensors if ".layers." in n and "norm" in n]
    assert norms and not set(norms) & set(search.evaluator.searched)  # the experts left them unchanged
    x = random_candidate(search.space.size, 5)
    recipe = yaml.safe_load(
        write_recipe(tmp_path / "r.yaml", search.space, x, search.evaluator.tensors).read_text()
    )
    filters = [e["filter"] for e in recipe["models"][0]["parameters"]["weight"] if "filter" in e]
    assert filters and not any("norm" in f for f in filters)
    assert all(f.count(".") == 3 for f in filters)  # "layers.<i>.<component>." (never a bare layer)


def test_recipe_merged_from_files_equals_the_in_memory_candidate(prepared, tmp_path):
    x = random_candidate(prepared.space.size, 3)
    recipe = write_recipe(tmp_path / "recipe.yaml", prepared.space, x, prepared.evaluator.tensors)
    assert yaml.safe_load(recipe.read_text())["merge_method"] == "ties"
    out = merge(recipe, tmp_path / "model", progress=False)
    from_files = load_file(out / "model.safetensors")
    in_memory = prepared.evaluator.merge(prepared.space.apply(x))
    for name, tensor in in_memory.items():
        assert torch.equal(from_files[name], tensor), name
    base = load_file(prepared.config.base_model + "/model.safetensors")
    for name in set(from_files) - set(in_memory):
        assert torch.equal(from_files[name], base[name]), name  # no expert changed it


def test_loaded_candidate_is_the_model_that_gets_scored(prepared):
    x = random_candidate(prepared.space.size, 4)
    evaluator = prepared.evaluator
    first = evaluator(prepared.space.apply(x))
    evaluator.load_state(evaluator.state_dicts[prepared.config.models[0].model])  # an expert in between
    again = evaluator(prepared.space.apply(x))
    assert again.value == first.value and again.scores == first.scores
    assert set(evaluator.expert_scores) == {prepared.config.models[i].model for i in range(len(EXPERT_NAMES))}
