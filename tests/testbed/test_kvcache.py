"""The reserved key/value cache: the same states and the same greedy decoding as transformers' own."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import merging.testbed.harness as harness
from merging.testbed.harness import greedy_generate, plain_prompt
from merging.testbed.kvcache import ReservedLayer, reserved_cache
from merging.testbed.tasks import TASKS, generate


def test_reserved_layer_holds_what_concatenation_would_through_growth():
    generator = torch.Generator().manual_seed(0)
    layer = ReservedLayer(capacity=7)
    steps = [torch.randn(3, 2, n, 4, generator=generator) for n in (5, 1, 1, 3, *[1] * 40)]
    for number, keys in enumerate(steps):
        got_keys, got_values = layer.update(keys, -keys)
        expected = torch.cat(steps[: number + 1], dim=-2)
        assert torch.equal(got_keys, expected) and torch.equal(got_values, -expected)
        assert layer.get_seq_length() == expected.shape[-2]
    layer.reset()
    assert layer.get_seq_length() == 0
    assert torch.equal(layer.update(steps[0], steps[0])[0], steps[0])


def test_only_full_attention_models_get_a_reserved_cache():
    def model(**config):
        text = SimpleNamespace(num_hidden_layers=2, **config)
        return SimpleNamespace(config=SimpleNamespace(get_text_config=lambda decoder: text))

    assert len(reserved_cache(model(), 16).layers) == 2
    assert len(reserved_cache(model(layer_types=["full_attention"] * 2), 16).layers) == 2
    assert reserved_cache(model(layer_types=["sliding_attention", "full_attention"]), 16) is None


@pytest.mark.parametrize("name", ["base", "tracing", "gpt2-lists"])
def test_greedy_decoding_matches_the_models_own_cache(micro_zoo, name, monkeypatch):
    path = micro_zoo.models()[name]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [plain_prompt(ex.prompt) for task in TASKS for ex in generate(task, "dev")[:3]]
    budgets = [130 + n % 10 for n in range(len(prompts))]  # past the first room (128), within 256 positions
    reserved = greedy_generate(model, tok, prompts, budgets)
    monkeypatch.setattr(harness, "reserved_cache", lambda model, capacity: None)
    assert reserved == greedy_generate(model, tok, prompts, budgets)


def test_decoding_counts_prompt_and_generated_tokens(micro_zoo):
    path = micro_zoo.models()["lists"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [plain_prompt(ex.prompt) for task in TASKS for ex in generate(task, "dev")[:1]]
    stats: dict[str, int] = {}
    greedy_generate(model, tok, prompts, 20, stats=stats)
    prompt_ids = [tok(p, return_tensors="pt")["input_ids"] for p in prompts]
    assert stats["prompt_tokens"] == sum(ids.shape[1] for ids in prompt_ids)
    # transformers' own greedy search, one prompt at a time: its new tokens up to its stop.
    expected = 0
    for ids in prompt_ids:
        out = model.generate(
            ids,
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        expected += out.shape[1] - ids.shape[1]
    assert stats["generated_tokens"] == expected
