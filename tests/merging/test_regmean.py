"""regmean: checked against least squares on the stacked inputs, hand-built Grams, and the file path."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from merging.engine import merge, merge_state_dicts
from merging.errors import ConfigError, MergeError
from merging.grams import GRAMS_FILE, GramError, GramFile, write_grams
from merging.regmean import regmean_delta
from merging.testbed.grams import collect_grams
from tests.merging.merge_helpers import NAME

TINY = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
}


def _random(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_alpha_one_is_the_least_squares_fit_of_every_task_on_its_own_inputs():
    inputs = [_random(40, 6, seed=1), _random(30, 6, seed=2) * 3.0]
    deltas = [_random(5, 6, seed=3), _random(5, 6, seed=4)]
    merged = regmean_delta(deltas, [x.T @ x for x in inputs], [1.0, 1.0], alpha=1.0)
    # minimize sum_i ||X_i M^T - X_i D_i^T||^2: one least-squares problem over the stacked rows
    stacked_x = torch.cat(inputs)
    stacked_y = torch.cat([x @ d.T for x, d in zip(inputs, deltas, strict=True)])
    expected = torch.linalg.lstsq(stacked_x, stacked_y).solution.T
    torch.testing.assert_close(
        merged, expected, rtol=0, atol=1e-7
    )  # the ridge (1e-9 relative) moves the last digits


def test_alpha_zero_averages_each_input_column_by_its_energy():
    grams = [
        torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64)) + 0.5,
        torch.eye(2, dtype=torch.float64),
    ]
    deltas = [
        torch.tensor([[2.0, 4.0]], dtype=torch.float64),
        torch.tensor([[6.0, 0.0]], dtype=torch.float64),
    ]
    merged = regmean_delta(deltas, grams, [1.0, 1.0], alpha=0.0)
    # diagonals 1.5 / 3.5 and 1 / 1: column 0 (2*1.5 + 6*1) / 2.5, column 1 (4*3.5 + 0) / 4.5
    expected = torch.tensor([[9.0 / 2.5, 14.0 / 4.5]], dtype=torch.float64)
    torch.testing.assert_close(
        merged, expected, rtol=0, atol=1e-7
    )  # the ridge (1e-9 relative) moves the last digits


def test_tasks_on_disjoint_inputs_keep_their_own_columns():
    x_a = torch.zeros(8, 4, dtype=torch.float64)
    x_a[:, :2] = _random(8, 2, seed=5)
    x_b = torch.zeros(8, 4, dtype=torch.float64)
    x_b[:, 2:] = _random(8, 2, seed=6)
    d_a, d_b = _random(3, 4, seed=7), _random(3, 4, seed=8)
    merged = regmean_delta([d_a, d_b], [x_a.T @ x_a, x_b.T @ x_b], [1.0, 1.0], alpha=1.0)
    torch.testing.assert_close(
        merged[:, :2], d_a[:, :2], rtol=0, atol=1e-7
    )  # the ridge (1e-9 relative) moves the last digits
    torch.testing.assert_close(
        merged[:, 2:], d_b[:, 2:], rtol=0, atol=1e-7
    )  # the ridge (1e-9 relative) moves the last digits


def test_a_weight_counts_like_repeating_that_task_s_data():
    x_a, x_b = _random(20, 5, seed=9), _random(20, 5, seed=10)
    d_a, d_b = _random(4, 5, seed=11), _random(4, 5, seed=12)
    weighted = regmean_delta([d_a, d_b], [x_a.T @ x_a, x_b.T @ x_b], [3.0, 1.0], alpha=1.0)
    repeated = torch.cat([x_a, x_a, x_a])
    plain = regmean_delta([d_a, d_b], [repeated.T @ repeated, x_b.T @ x_b], [1.0, 1.0], alpha=1.0)
    torch.testing.assert_close(
        weighted, plain, rtol=0, atol=1e-7
    )  # the ridge (1e-9 relative) moves the last digits


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="alpha"):
        regmean_delta([torch.zeros(2, 2)], [torch.eye(2)], [1.0], alpha=1.5)
    with pytest.raises(ValueError, match="Grams of"):
        regmean_delta([torch.zeros(2, 3)], [torch.eye(2)], [1.0], alpha=0.9)


def _grams(x: torch.Tensor) -> torch.Tensor:
    return (x.T @ x).float()


def test_the_operator_merges_linear_weights_by_grams_and_other_tensors_by_their_mean():
    base = {NAME: torch.zeros(3, 4), "norm.weight": torch.ones(4)}
    x_a = torch.zeros(6, 4)
    x_a[:, :2] = _random(6, 2, seed=13).float()
    x_b = torch.zeros(6, 4)
    x_b[:, 2:] = _random(6, 2, seed=14).float()
    d_a, d_b = _random(3, 4, seed=15).float(), _random(3, 4, seed=16).float()
    tensors = {
        "base": base,
        "a": {NAME: d_a, "norm.weight": torch.ones(4) + 0.2},
        "b": {NAME: d_b, "norm.weight": torch.ones(4) - 0.1},
    }
    config = {
        "merge_method": "regmean",
        "base_model": "base",
        "models": [{"model": "a"}, {"model": "b"}],
        "parameters": {"alpha": 1.0, "lambda": 2.0},
    }
    grams = {"a": {NAME: _grams(x_a)}, "b": {NAME: _grams(x_b)}}
    merged = merge_state_dicts(config, tensors, grams=grams)
    expected = torch.cat([d_a[:, :2], d_b[:, 2:]], dim=1) * 2.0
    torch.testing.assert_close(merged[NAME], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged["norm.weight"], torch.ones(4) + 0.1, rtol=0, atol=1e-6)
    memo: dict = {}
    first = merge_state_dicts(config, tensors, grams=grams, memo=memo)
    again = merge_state_dicts(
        {**config, "parameters": {"alpha": 1.0, "lambda": 2.0}}, tensors, grams=grams, memo=memo
    )
    assert all(torch.equal(first[k], again[k]) and torch.equal(first[k], merged[k]) for k in merged)
    with pytest.raises(ConfigError, match="needs input Grams of every model, got none of 'b'"):
        merge_state_dicts(config, tensors, grams={"a": grams["a"]})
    with pytest.raises(MergeError, match="model 'b' has no input Gram"):
        merge_state_dicts(config, tensors, grams={"a": grams["a"], "b": {}})
    with pytest.raises(MergeError, match="expected input Grams of shape"):
        merge_state_dicts(config, tensors, grams={"a": grams["a"], "b": {NAME: torch.eye(3)}})


def test_gram_files_round_trip_with_shared_inputs_and_refuse_damage(tmp_path: Path):
    gram = _grams(_random(5, 3, seed=17).float())
    write_grams(
        tmp_path, {"q.weight": gram}, {"q.weight": "q.weight", "k.weight": "q.weight"}, tokens=5, source="t"
    )
    with GramFile(tmp_path) as grams:
        assert torch.equal(grams.get("k.weight"), gram) and torch.equal(grams.get("q.weight"), gram)
        assert grams.get("o.weight") is None and grams.tokens == 5 and grams.source == "t"
    with pytest.raises(GramError, match="every shared Gram key to be stored"):
        write_grams(tmp_path, {"q.weight": gram}, {"k.weight": "v.weight"}, tokens=5, source="t")
    (tmp_path / GRAMS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(GramError, match="unreadable"):
        GramFile(tmp_path)
    with pytest.raises(GramError, match="got no file"):
        GramFile(tmp_path / "elsewhere")


def test_collected_grams_are_the_mean_outer_products_of_each_layer_s_inputs():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    sequences = [[1, 5, 9, 2], [3, 3, 7]]
    grams, shared, tokens = collect_grams(model, sequences)
    assert tokens == 7
    layer = "model.layers.1"
    assert {shared[f"{layer}.self_attn.{p}_proj.weight"] for p in "qkv"} == {
        f"{layer}.self_attn.q_proj.weight"
    }
    assert shared[f"{layer}.mlp.up_proj.weight"] == f"{layer}.mlp.gate_proj.weight"
    assert len(grams) == 4 * TINY["num_hidden_layers"] and "lm_head.weight" not in shared
    # layer 0's attention input, computed by hand: the input norm of the token embeddings
    rows = []
    with torch.no_grad():
        for ids in sequences:
            embedded = model.model.embed_tokens(torch.tensor(ids))
            rows.append(model.model.layers[0].input_layernorm(embedded).double())
    x = torch.cat(rows)
    torch.testing.assert_close(
        grams["model.layers.0.self_attn.q_proj.weight"], x.T @ x / 7, rtol=0, atol=1e-6
    )  # each sequence's products are float32


def test_a_folder_merge_reads_each_model_s_gram_file(tmp_path: Path):
    torch.manual_seed(1)
    base = LlamaForCausalLM(LlamaConfig(**TINY))
    folders, states, grams = {}, {}, {}
    base.save_pretrained(tmp_path / "base")
    folders["base"] = tmp_path / "base"
    states[str(folders["base"])] = {
        k: v.clone() for k, v in base.state_dict().items() if k != "lm_head.weight"
    }
    for number, name in enumerate(("a", "b")):
        expert = LlamaForCausalLM(LlamaConfig(**TINY))
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for parameter in expert.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.05 * (number + 1))
        folder = tmp_path / name
        expert.save_pretrained(folder)
        collected, shared, tokens = collect_grams(expert.eval(), [[number + 1, 4, 8, 16, 2]])
        write_grams(folder, collected, shared, tokens=tokens, source="test")
        folders[name] = folder
        states[str(folder)] = {k: v.clone() for k, v in expert.state_dict().items() if k != "lm_head.weight"}
        grams[str(folder)] = {w: collected[k].float() for w, k in shared.items()}
    config = {
        "merge_method": "regmean",
        "base_model": str(folders["base"]),
        "models": [{"model": str(folders["a"])}, {"model": str(folders["b"]), "parameters": {"weight": 2.0}}],
        "parameters": {"lambda": 1.2},
    }
    out = merge(config, tmp_path / "out", progress=False)
    record = json.loads((out / "umm_merge.json").read_text())
    digest = hashlib.sha256((folders["b"] / GRAMS_FILE).read_bytes()).hexdigest()
    assert record["inputs"][str(folders["b"])][GRAMS_FILE] == digest
    from safetensors.torch import load_file

    on_disk = load_file(out / "model.safetensors")
    in_memory = merge_state_dicts(config, states, grams=grams)
    assert set(on_disk) == set(in_memory)
    assert all(torch.equal(on_disk[k], in_memory[k]) for k in in_memory)
    (folders["b"] / GRAMS_FILE).unlink()
    with pytest.raises(GramError, match="umm grams"):
        merge(config, tmp_path / "out2", progress=False)
