"""Row weights: task arithmetic with a weight per output row, checked against hand-computed values,
in memory and through model folders, and refused where they do not fit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from merging.config import load_config
from merging.engine import merge, merge_state_dicts
from merging.errors import ConfigError
from merging.row_weights import load_row_weights, row_weight_key, save_row_weights
from tests.search.tiny_models import build_tiny_models

NAME = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    models = build_tiny_models(tmp_path_factory.mktemp("row-weights"))
    return {"base": models["base"], "a": models["alpha"], "b": models["beta"]}


BASE = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
A = BASE + torch.tensor([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]])
B = BASE + torch.tensor([[-1.0, 3.0], [1.0, 1.0], [0.0, 2.0]])


def config(**parameters) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"weight": 0.5}},
            {"model": "b", "parameters": {"weight": 0.25}},
        ],
        **({"parameters": parameters} if parameters else {}),
    }


def merged(rows: dict, **parameters) -> torch.Tensor:
    tensors = {"base": {NAME: BASE}, "a": {NAME: A}, "b": {NAME: B}}
    return merge_state_dicts(config(**parameters), tensors, row_weights=rows)[NAME]


def test_row_weights_replace_one_models_scalar_weight_row_by_row():
    out = merged({"a": {NAME: torch.tensor([1.0, 0.0, 0.5])}}, **{"lambda": 2.0})
    # row r: base + 2 * (a_r * [1, 1]*k + 0.25 * (b - base)); a's deltas [1, 1], [2, 2], [4, 4]
    expected = torch.tensor(
        [
            [1.0 + 2 * (1.0 - 0.25), 2.0 + 2 * (1.0 + 0.75)],
            [3.0 + 2 * (0.0 + 0.25), 4.0 + 2 * (0.0 + 0.25)],
            [5.0 + 2 * (2.0 + 0.0), 6.0 + 2 * (2.0 + 0.5)],
        ]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_normalize_divides_each_row_by_its_own_weight_sum():
    rows = {"a": {NAME: torch.tensor([1.0, 0.0, 3.0])}, "b": {NAME: torch.tensor([1.0, 2.0, 1.0])}}
    out = merged(rows, normalize=True)
    expected = torch.tensor([[1.0 + 0.0, 2.0 + 2.0], [3.0 + 1.0, 4.0 + 1.0], [5.0 + 3.0, 6.0 + 3.5]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_scalar_weights_as_rows_give_the_scalar_merge_within_rounding():
    rows = {"a": {NAME: torch.full((3,), 0.5)}, "b": {NAME: torch.full((3,), 0.25)}}
    scalar = merge_state_dicts(config(), {"base": {NAME: BASE}, "a": {NAME: A}, "b": {NAME: B}})[NAME]
    torch.testing.assert_close(merged(rows), scalar, rtol=0, atol=1e-6)


def test_a_vector_of_the_wrong_length_or_tensor_is_refused():
    with pytest.raises(ConfigError, match="hold 2 values, the tensor has 3 rows"):
        merged({"a": {NAME: torch.ones(2)}})
    with pytest.raises(ConfigError, match="which the merge has not"):
        merged({"a": {"model.layers.9.mlp.up_proj.weight": torch.ones(3)}})


def test_only_task_arithmetic_reads_row_weights():
    data = {**config(), "merge_method": "ties", "row_weights": "rows.safetensors"}
    with pytest.raises(ConfigError, match="row_weights need merge_method task_arithmetic"):
        load_config(data)
    with pytest.raises(ConfigError, match="expected row_weights to be a file path"):
        load_config({**config(), "row_weights": 3})


def test_the_file_round_trips_and_refuses_unknown_models(tmp_path):
    rows = {"b": {NAME: torch.tensor([0.5, 0.25, 2.0])}}
    path = save_row_weights(tmp_path / "rows.safetensors", ["a", "b"], rows)
    assert set(load_file(path)) == {row_weight_key(1, NAME)} == {f"models.1.{NAME}"}
    back = load_row_weights(path, ["a", "b"])
    assert torch.equal(back["b"][NAME], rows["b"][NAME]) and "a" not in back
    with pytest.raises(ConfigError, match="does not name one of the config's 1 models"):
        load_row_weights(path, ["a"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_row_weights(tmp_path / "missing.safetensors", ["a", "b"])


def test_merge_to_folder_reads_the_file_and_equals_the_in_memory_merge(tiny_folders, tmp_path):
    names = ["a", "b"]
    layer = "model.layers.1.self_attn.o_proj.weight"
    rows = {"a": {layer: torch.linspace(0.0, 1.0, 16)}, "b": {layer: torch.linspace(1.5, -0.5, 16)}}
    data = {
        "merge_method": "task_arithmetic",
        "base_model": str(tiny_folders["base"]),
        "models": [{"model": str(tiny_folders[n]), "parameters": {"weight": 0.5}} for n in names],
        "dtype": "float32",
        "row_weights": str(save_row_weights(tmp_path / "rows.safetensors", names, rows)),
    }
    out = merge(data, tmp_path / "merged", progress=False)
    states = {k: load_file(v / "model.safetensors") for k, v in tiny_folders.items()}
    by_path = {str(tiny_folders[k]): v for k, v in states.items()}
    in_memory = merge_state_dicts(data, by_path)
    written = load_file(out / "model.safetensors")
    assert all(torch.equal(written[n], t) for n, t in in_memory.items())
    base, a, b = (states[k][layer] for k in ("base", "a", "b"))
    expected = base + rows["a"][layer][:, None] * (a - base) + rows["b"][layer][:, None] * (b - base)
    torch.testing.assert_close(written[layer], expected, rtol=1e-6, atol=1e-6)
    provenance = json.loads((out / "umm_merge.json").read_text())
    assert provenance["config"]["row_weights"] == data["row_weights"]
    assert list(provenance["inputs"][data["row_weights"]]) == ["rows.safetensors"]
