"""Zoo: standard HF folders, a recipe-keyed cache, deterministic training, repeatable evaluation."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import merging.testbed.zoo as zoo_module
from merging.testbed.harness import evaluate, greedy_generate, plain_prompt, score
from merging.testbed.tasks import TASKS, generate
from merging.testbed.tokenizers_build import char_tokenizer
from merging.testbed.training import TrainSpec, train
from merging.testbed.zoo import RECIPES, ModelSpec, ZooError, _make_model, build_zoo, model_meta


def _tiny_recipe(lr: float = 1e-2):
    micro = RECIPES["micro"]
    hetero = micro.heterogeneous[0]
    return replace(
        micro,
        base_train=replace(micro.base_train, steps=3, lr=lr),
        expert_train=replace(micro.expert_train, steps=2),
        domains=("logic", "lists"),
        heterogeneous=(replace(hetero, train=replace(hetero.train, steps=2)),),
    )


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_cache_is_keyed_by_the_recipe(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo_module, "BUILD_WORKERS", 1)  # every model trained here, where `train` is patched
    first = build_zoo(recipe=_tiny_recipe(), cache_dir=tmp_path)
    weights = first.experts["logic"] / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(zoo_module, "train", lambda *args, **kwargs: calls.append(args))
    again = build_zoo(recipe=_tiny_recipe(), cache_dir=tmp_path)
    assert calls == [] and again.root == first.root and weights.stat().st_mtime_ns == stamp
    changed = build_zoo(recipe=_tiny_recipe(lr=5e-3), cache_dir=tmp_path)
    assert changed.root != first.root
    assert len(calls) == 4  # base, two experts, one heterogeneous expert
    assert (changed.base / "model.safetensors").exists()


def test_training_is_deterministic_in_this_process_or_in_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo_module, "BUILD_WORKERS", 1)
    one = build_zoo(recipe=_tiny_recipe(), cache_dir=tmp_path / "one")
    monkeypatch.setattr(zoo_module, "BUILD_WORKERS", 2)
    two = build_zoo(recipe=_tiny_recipe(), cache_dir=tmp_path / "two")
    pairs = [(one.base, two.base), *((one.experts[d], two.experts[d]) for d in ("logic", "lists"))]
    for a, b in [*pairs, (one.heterogeneous["gpt2-lists"], two.heterogeneous["gpt2-lists"])]:
        left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        assert left.keys() == right.keys()
        assert all(torch.equal(left[k], right[k]) for k in left)


def test_unknown_size_is_a_typed_error(tmp_path):
    with pytest.raises(ZooError, match="expected zoo size"):
        build_zoo("huge", cache_dir=tmp_path)


def test_micro_zoo_is_standard_hf_folders(micro_zoo):
    base_model, base_tok = _load(micro_zoo.base)
    base_state = base_model.state_dict()
    assert set(micro_zoo.experts) == {"arithmetic", "lists", "logic", "tracing"}
    for domain, path in micro_zoo.experts.items():
        expert, tok = _load(path)
        assert model_meta(path) == {"role": "expert", "domain": domain, "recipe": micro_zoo.recipe.digest()}
        assert tok.get_vocab() == base_tok.get_vocab()
        state = expert.state_dict()
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in base_state.items()}
        assert any(not torch.equal(state[k], base_state[k]) for k in state)
    ((_name, path),) = micro_zoo.heterogeneous.items()
    hetero, hetero_tok = _load(path)
    assert hetero.config.model_type == "gpt2" != base_model.config.model_type
    assert hetero_tok.get_vocab() != base_tok.get_vocab()
    assert model_meta(path)["role"] == "heterogeneous"


def test_evaluation_repeats_exactly(micro_zoo):
    model, tok = _load(micro_zoo.experts["logic"])
    first = evaluate(model, tok, ["logic", "arithmetic"], limit=40)
    second = evaluate(model, tok, ["logic", "arithmetic"], limit=40, batch_size=16)
    assert first.accuracy == second.accuracy and first.outputs == second.outputs
    examples = generate("logic", "test")[:40]
    expected = (
        sum(score(text, ex.answer) for text, ex in zip(first.outputs["logic"], examples, strict=True)) / 40
    )
    assert first.accuracy["logic"] == expected
    assert first.mean == (first.accuracy["logic"] + first.accuracy["arithmetic"]) / 2


@pytest.mark.parametrize("name", ["base", "gpt2-lists"])
def test_left_padded_batches_decode_like_single_prompts(micro_zoo, name):
    model, tok = _load(micro_zoo.models()[name])
    prompts = [plain_prompt(ex.prompt) for task in TASKS for ex in generate(task, "dev")[:2]]
    batched = greedy_generate(model, tok, prompts, 24)
    single = [greedy_generate(model, tok, [p], 24)[0] for p in prompts]
    assert batched == single


def test_frozen_parameters_keep_their_values():
    tok = char_tokenizer()
    model = _make_model(ModelSpec("llama", hidden=16, layers=1, heads=2, intermediate=32), tok, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = TrainSpec(steps=2, lr=1e-2, batch_size=4, mixture=(("logic@easy", 1.0),), warmup=1)
    train(model, tok, replace(spec, frozen=("embed_tokens", "norm")), seed=0)
    after = model.state_dict()
    held = [k for k in after if "embed_tokens" in k or "norm" in k or k == "lm_head.weight"]
    assert held and all(torch.equal(after[k], before[k]) for k in held)
    assert all(not torch.equal(after[k], before[k]) for k in after if k not in held)
    assert all(p.requires_grad for p in model.parameters())


def test_anchor_pulls_each_step_back_toward_the_start():
    tok = char_tokenizer()
    spec = TrainSpec(steps=1, lr=1e-2, batch_size=4, mixture=(("logic@easy", 1.0),), warmup=1)
    shape = ModelSpec("llama", hidden=16, layers=1, heads=2, intermediate=32)
    start, free, anchored = (_make_model(shape, tok, seed=0) for _ in range(3))
    train(free, tok, spec, seed=0)
    # one step at the full rate: the anchored model goes 30 % of the way back from where it stepped
    train(anchored, tok, replace(spec, anchor=0.3 / spec.lr), seed=0)
    origin, stepped = start.state_dict(), free.state_dict()
    for name, value in anchored.state_dict().items():
        expected = stepped[name] - 0.3 * (stepped[name] - origin[name])
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-7)
    assert any(not torch.equal(stepped[k], origin[k]) for k in origin)


def test_a_recipe_without_anchor_keeps_its_digest():
    spec = TrainSpec(steps=1, lr=1e-2, batch_size=4, mixture=(("logic@easy", 1.0),))
    assert "anchor" not in spec.to_dict()
    assert replace(spec, anchor=2.0).to_dict()["anchor"] == 2.0
    assert RECIPES["micro"].digest().startswith("2644d72e77f27b97")  # its cached folder keeps its name
