"""Fitness: teacher-forced scores against a one-example-at-a-time computation, objectives by hand."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from merging.errors import ConfigError
from merging.search.fitness import Objective, normalized_gains
from merging.search.scores import proxy_scores, teacher_forced_batches
from merging.testbed.harness import plain_prompt
from merging.testbed.tasks import generate


def test_proxy_scores_match_an_unbatched_computation(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["alpha"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_models["alpha"])
    tasks, limit = ["arithmetic", "lists"], 5
    got = proxy_scores(model, teacher_forced_batches(tok, tasks, "dev", limit, batch_size=3))
    for task in tasks:
        token_lps, seq_probs, exact = [], [], []
        for ex in generate(task, "dev")[:limit]:
            prompt = tok(plain_prompt(ex.prompt), add_special_tokens=False)["input_ids"]
            response = tok(ex.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + response])).logits[0].double()
            lps = [
                torch.log_softmax(logits[len(prompt) - 1 + i], -1)[t].item() for i, t in enumerate(response)
            ]
            top = [int(logits[len(prompt) - 1 + i].argmax()) == t for i, t in enumerate(response)]
            token_lps += lps
            seq_probs.append(math.exp(sum(lps)))
            exact.append(all(top))
        assert got["loglik"][task] == pytest.approx(sum(token_lps) / len(token_lps), rel=1e-4)
        assert got["seqprob"][task] == pytest.approx(sum(seq_probs) / limit, rel=1e-3, abs=1e-12)
        assert got["tf_exact"][task] == sum(exact) / limit


def test_gains_are_shares_of_the_best_input_models_gain():
    gains = normalized_gains(
        {"a": 0.5, "b": 0.2, "c": 0.3}, {"a": 0.0, "b": 0.4, "c": 0.3}, {"a": 1.0, "b": 0.8, "c": 0.3}
    )
    assert gains == pytest.approx({"a": 0.5, "b": -0.5, "c": 0.0})


def test_aggregates_by_hand():
    gains = {"a": 1.0, "b": 0.2}
    assert Objective(aggregate="mean").combine(gains) == pytest.approx(0.6)
    assert Objective(aggregate="min").combine(gains) == pytest.approx(0.2)
    expected = -0.1 * math.log((math.exp(-10.0) + math.exp(-2.0)) / 2)
    assert Objective(aggregate="softmin", temperature=0.1).combine(gains) == pytest.approx(expected)
    assert 0.2 < expected < 0.6


def test_bad_objectives_are_refused():
    with pytest.raises(ConfigError, match="fitness metric among"):
        Objective(metric="bleu")
    with pytest.raises(ConfigError, match="aggregate among"):
        Objective(aggregate="max")
    with pytest.raises(ConfigError, match="positive softmin temperature"):
        Objective(temperature=0)
