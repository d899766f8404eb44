"""Layer gradients, name filters and their precedence."""

import pytest

from merging.config import MergeConfig
from merging.errors import ConfigError
from merging.parameters import evaluate_setting, layer_index, layer_position, resolve_parameters

NAMES = (
    [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(5)]
    + [f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)]
    + ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
)


def test_layer_index_and_position():
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("model.norm.weight") is None
    assert layer_position("model.layers.2.mlp.up_proj.weight", 5) == 0.5
    assert layer_position("model.embed_tokens.weight", 5) == 0.0
    assert layer_position("lm_head.weight", 5) == 1.0


def test_gradient_interpolates_across_layers():
    gradient = [0.0, 1.0, 0.5]
    assert evaluate_setting(gradient, "x", 0.0) == 0.0
    assert evaluate_setting(gradient, "x", 0.25) == 0.5  # halfway between 0 and 1
    assert evaluate_setting(gradient, "x", 0.5) == 1.0
    assert evaluate_setting(gradient, "x", 0.75) == 0.75
    assert evaluate_setting(gradient, "x", 1.0) == 0.5


def test_first_matching_filter_wins_and_unfiltered_is_the_default():
    setting = [{"filter": "self_attn", "value": 0.1}, {"filter": "attn", "value": 0.2}, {"value": 0.3}]
    assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj.weight", 0) == 0.1
    assert evaluate_setting(setting, "transformer.h.0.attn.c_attn.weight", 0) == 0.2
    assert evaluate_setting(setting, "model.layers.0.mlp.up_proj.weight", 0) == 0.3
    assert evaluate_setting([{"filter": "mlp", "value": 1.0}], "model.norm.weight", 0) is None


def _config(**overrides):
    data = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {
                "model": "a",
                "parameters": {"weight": [0.0, 1.0], "density": [{"filter": "mlp", "value": 0.2}]},
            },
            {"model": "b", "parameters": {"weight": 1.0}},
        ],
        "parameters": {
            "density": 0.7,
            "normalize": [{"filter": "self_attn", "value": False}, {"value": True}],
        },
    }
    data.update(overrides)
    return MergeConfig.from_dict(data)


def test_model_parameters_take_precedence_over_global_ones():
    resolved = resolve_parameters(_config(), NAMES)
    mlp2 = resolved["model.layers.2.mlp.up_proj.weight"]
    attn4 = resolved["model.layers.4.self_attn.q_proj.weight"]
    assert mlp2.models["a"] == {"weight": 0.5, "density": 0.2}
    assert attn4.models["a"] == {"weight": 1.0, "density": 0.7}  # no filter match -> global density
    assert mlp2.models["b"] == {"weight": 1.0, "density": 0.7}
    assert attn4.globals["normalize"] is False and mlp2.globals["normalize"] is True
    assert mlp2.globals["lambda"] == 1.0  # method default
    assert resolved["model.embed_tokens.weight"].models["a"]["weight"] == 0.0
    assert resolved["lm_head.weight"].models["a"]["weight"] == 1.0
    assert "base" not in mlp2.models


def test_bad_values_are_rejected_naming_tensor_and_model():
    config = _config(parameters={"density": [{"filter": "mlp", "value": 1.5}, {"value": 0.5}]})
    with pytest.raises(
        ConfigError, match=r"'density' for tensor 'model.layers.0.mlp.up_proj.weight' of model 'b'"
    ):
        resolve_parameters(config, NAMES)
    della = MergeConfig.from_dict(
        {
            "merge_method": "della",
            "base_model": "base",
            "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.9, "epsilon": 0.2}}],
        }
    )
    with pytest.raises(ConfigError, match="density - epsilon > 0 and density \\+ epsilon < 1"):
        resolve_parameters(della, NAMES)


def test_a_missing_required_weight_for_some_tensors_is_reported():
    config = MergeConfig.from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": [{"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": 1.0}]}}],
        }
    )
    with pytest.raises(
        ConfigError, match=r"missing the required parameter 'weight' for tensor 'model.layers.0.self_attn"
    ):
        resolve_parameters(config, NAMES)
