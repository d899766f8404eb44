"""Gradient search: the differentiable merge is the engine's, its slope is the evaluator's, and the
journaled search is deterministic, resumable and stops by its rule."""

from __future__ import annotations

import json
import random

import pytest
import torch

from merging.search.evolve import EvolveSettings, Search
from merging.search.fitness import Objective
from merging.search.gradient import STATE_NAME, GradientFitness, GradientSettings, LinearMerge, run_gradient
from merging.search.journal import JOURNAL_NAME, Journal, JournalError
from merging.search.space import SearchSpaceError
from tests.search.tiny_models import write_config


def prepare(
    tiny_models,
    tmp_path,
    *,
    aggregate="mean",
    keys=("weight",),
    normalize=False,
    name="cfg",
    granularity="attn_mlp",
):
    extra = {"parameters": {"normalize": True}} if normalize else {}
    config = write_config(tmp_path / f"{name}.yaml", tiny_models, method="task_arithmetic", **extra)
    settings = EvolveSettings(
        tasks=("arithmetic", "lists"),
        limit=3,
        objective=Objective("loglik", aggregate),
        granularity=granularity,
        keys=keys,
        optimizer="gradient",
        gradient=GradientSettings(lr=0.05, patience=0),
    )
    return Search.prepare(config, settings)


def random_candidate(size: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.random() for _ in range(size)]


@pytest.mark.parametrize(("keys", "normalize"), [(("weight",), False), (("weight", "lambda"), True)])
def test_the_differentiable_merge_is_the_engines(tiny_models, tmp_path, keys, normalize):
    search = prepare(tiny_models, tmp_path, keys=keys, normalize=normalize)
    merge = LinearMerge(search.space, search.evaluator)
    for seed in range(3):
        x = random_candidate(search.space.size, seed)
        engine = search.evaluator.merge(search.space.apply(x))
        ours = merge.tensors(torch.tensor(x, dtype=torch.float64))
        assert set(ours) == set(engine)
        for name, tensor in engine.items():
            torch.testing.assert_close(ours[name], tensor, rtol=1e-6, atol=1e-6)


def test_the_slope_is_the_evaluators_by_central_differences(tiny_models, tmp_path):
    search = prepare(tiny_models, tmp_path, aggregate="softmin")
    fitness = GradientFitness(search.space, search.evaluator)
    x = random_candidate(search.space.size, 7)
    point = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    value, _, _ = fitness(point)
    value.backward()
    assert float(value.detach()) == pytest.approx(search.evaluator(search.space.apply(x)).value, abs=1e-6)
    step = 1e-3
    for i in range(search.space.size):
        up, down = list(x), list(x)
        up[i] += step
        down[i] -= step
        slope = (
            search.evaluator(search.space.apply(up)).value - search.evaluator(search.space.apply(down)).value
        ) / (2 * step)
        assert float(point.grad[i]) == pytest.approx(slope, rel=2e-2, abs=2e-3), i


def trace(result):
    return [(e.number, e.x, e.fitness) for e in result.evaluations]


def test_the_search_is_deterministic_and_climbs(tiny_models, tmp_path):
    search = prepare(tiny_models, tmp_path)
    first = search.run(tmp_path / "a", 6)
    second = search.run(tmp_path / "b", 6)
    assert trace(first) == trace(second)
    assert first.evaluations[0].x == search.space.start()
    assert first.best.fitness > first.evaluations[0].fitness
    records = [json.loads(line) for line in (tmp_path / "a" / JOURNAL_NAME).read_text().splitlines()]
    assert records[0]["settings"]["optimizer"] == "gradient"
    assert all("next" not in r for r in records)  # Adam's moments live in the state file only
    state = json.loads((tmp_path / "a" / STATE_NAME).read_text())
    assert state["number"] == 5 and state["record"] == records[-1]
    assert state["next"]["x"] != records[-1]["x"]  # the state after the last step's move


def test_a_kill_between_the_state_file_and_the_journal_loses_no_step(tiny_models, tmp_path):
    search = prepare(tiny_models, tmp_path)
    whole = search.run(tmp_path / "whole", 6)
    search.run(tmp_path / "run", 3)
    path = tmp_path / "run" / JOURNAL_NAME
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(lines[:-2]) + b"\n")  # step 2 reached the state file, not the journal
    assert json.loads(lines[-3])["number"] == 1
    resumed = search.run(tmp_path / "run", 6, resume=True)
    assert trace(resumed) == trace(whole)


def test_a_state_file_behind_the_journal_is_refused_and_another_searchs_is_ignored(tiny_models, tmp_path):
    search = prepare(tiny_models, tmp_path)
    search.run(tmp_path / "run", 2)
    state_path = tmp_path / "run" / STATE_NAME
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "number": 0}))
    with pytest.raises(JournalError, match="does not hold the optimizer's state after step 1"):
        search.run(tmp_path / "run", 4, resume=True)
    stale = {**state, "journal": "another search"}  # left by a search whose journal was deleted
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / STATE_NAME).write_text(json.dumps({**stale, "number": 0}))
    fresh = search.run(tmp_path / "fresh", 2)
    assert trace(fresh) == trace(search.run(tmp_path / "again", 2))


def test_resume_after_a_kill_gives_the_uninterrupted_result(tiny_models, tmp_path):
    search = prepare(tiny_models, tmp_path)
    whole = search.run(tmp_path / "whole", 7)

    class Killed(Exception):
        """The search process dying mid-step."""

    fitness = GradientFitness(search.space, search.evaluator)
    calls = 0

    def dies_after_three(x):
        nonlocal calls
        calls += 1
        if calls > 3:
            raise Killed
        return fitness(x)

    journal = Journal.open(tmp_path / "run", {"settings": "same"}, resume=False)
    with pytest.raises(Killed):
        run_gradient(search.space.start(), dies_after_three, journal, 7, search.settings.gradient)
    journal.close()
    journal = Journal.open(tmp_path / "run", {"settings": "same"}, resume=True)
    resumed = run_gradient(search.space.start(), fitness, journal, 7, search.settings.gradient)
    journal.close()
    assert trace(resumed) == trace(whole)


def bowl(x: torch.Tensor):
    """Fitness peaking at x = 0.3 in every coordinate (computed here, not by the code under test)."""
    value = -((x - 0.3) ** 2).sum()
    return value, {"bowl": value}, {"bowl": value}


def test_projected_adam_reaches_the_peak_and_stops_by_its_rule(tmp_path):
    journal = Journal.open(tmp_path / "run", {"problem": "bowl"}, resume=False)
    settings = GradientSettings(lr=0.02, patience=10, tolerance=1e-6)
    result = run_gradient([0.9, 0.0, 1.0], bowl, journal, 2000, settings)
    journal.close()
    assert result.stop.startswith("no rise")
    assert len(result.evaluations) < 2000
    assert result.best.x == pytest.approx([0.3] * 3, abs=3 * settings.lr)  # Adam's steps are about lr long
    assert all(0.0 <= v <= 1.0 for e in result.evaluations for v in e.x)


def test_a_journal_of_another_optimizer_is_refused(tmp_path):
    journal = Journal.open(tmp_path / "run", {"problem": "bowl"}, resume=False)
    journal.append({"type": "eval", "number": 0, "generation": 0, "member": 0, "x": [0.5], "fitness": 0.0})
    with pytest.raises(JournalError, match="not written by a gradient search"):
        run_gradient([0.5], bowl, journal, 3, GradientSettings())
    journal.close()


@pytest.mark.parametrize(
    ("method", "metric", "message"),
    [("ties", "loglik", "linear in its weights"), ("task_arithmetic", "accuracy", "differentiable metric")],
)
def test_a_fitness_without_a_slope_is_refused_before_any_model_loads(tmp_path, method, metric, message):
    config = tmp_path / "c.yaml"
    density = ", density: 0.5" if method == "ties" else ""
    config.write_text(
        f"merge_method: {method}\nbase_model: /nowhere/base\nmodels:\n"
        f"  - model: /nowhere/a\n    parameters: {{weight: 0.5{density}}}\n"
    )
    settings = EvolveSettings(objective=Objective(metric), optimizer="gradient")
    with pytest.raises(SearchSpaceError, match=message):
        Search.prepare(config, settings)


def test_a_bfloat16_model_is_merged_into_its_own_dtype(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    halves = {}
    for name, folder in tiny_models.items():
        model = AutoModelForCausalLM.from_pretrained(folder).to(torch.bfloat16)
        model.save_pretrained(tmp_path / name)
        AutoTokenizer.from_pretrained(folder).save_pretrained(tmp_path / name)
        halves[name] = tmp_path / name
    search = prepare(halves, tmp_path)
    assert next(search.evaluator.model.parameters()).dtype == torch.bfloat16
    fitness = GradientFitness(search.space, search.evaluator)
    x = random_candidate(search.space.size, 2)
    assert {t.dtype for t in fitness.merge.tensors(torch.tensor(x, dtype=torch.float64)).values()} == {
        torch.bfloat16
    }
    point = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    value, _, _ = fitness(point)
    value.backward()
    assert float(value.detach()) == pytest.approx(search.evaluator(search.space.apply(x)).value, abs=1e-3)
    assert torch.isfinite(point.grad).all() and point.grad.abs().sum() > 0


@pytest.mark.parametrize("normalize", [False, True])
def test_the_differentiable_row_merge_is_the_engines(tiny_models, tmp_path, normalize):
    search = prepare(tiny_models, tmp_path, granularity="row", normalize=normalize)
    # 2 experts x (2 layers x (3 x 16 attention rows + 16 o_proj rows + 2 x 32 + 16 MLP rows))
    assert search.space.size == 2 * 2 * (4 * 16 + 2 * 32 + 16)
    merge = LinearMerge(search.space, search.evaluator)
    for seed in range(2):
        x = random_candidate(search.space.size, seed)
        rows = search.space.row_weights(x)
        engine = search.evaluator.merge(search.space.apply(x), rows)
        ours = merge.tensors(torch.tensor(x, dtype=torch.float64))
        assert set(ours) == set(engine)
        for name, tensor in engine.items():
            torch.testing.assert_close(ours[name], tensor, rtol=1e-6, atol=1e-6)
        name = "model.layers.0.self_attn.q_proj.weight"
        experts = search.space.experts
        base = search.evaluator.state_dicts[search.config.base_model][name]
        deltas = [search.evaluator.state_dicts[m][name] - base for m in experts]
        weights = [rows[m][name][:, None] for m in experts]
        mixed = weights[0] * deltas[0] + weights[1] * deltas[1]
        expected = base + (mixed / (weights[0] + weights[1]) if normalize else mixed)
        torch.testing.assert_close(engine[name], expected, rtol=1e-5, atol=1e-6)


def test_a_row_space_searches_task_arithmetic_weights_only(tiny_models, tmp_path):
    with pytest.raises(
        SearchSpaceError, match="the row granularity searches the weight of task_arithmetic only"
    ):
        prepare(tiny_models, tmp_path, granularity="row", keys=("weight", "lambda"))
