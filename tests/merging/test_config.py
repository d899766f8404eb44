"""Config validation messages, and the shape and name checks made before any merge."""

import pytest
import torch

from merging.config import MergeConfig, load_config
from merging.engine import merge_state_dicts
from merging.errors import ConfigError, MissingTensorError, ShapeMismatchError


def _ties(**extra):
    data = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}}],
    }
    data.update(extra)
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            _ties(merge_methd="x"),
            "unknown key 'merge_methd' in the merge config; valid keys: merge_method, models",
        ),
        (
            _ties(merge_method="tie"),
            "unknown merge_method 'tie'; valid methods: breadcrumbs, breadcrumbs_ties, dare_linear, "
            "dare_ties, della, della_linear, linear, model_stock, passthrough, regmean, sce, slerp, "
            "task_arithmetic, ties",
        ),
        (
            _ties(parameters={"t": 0.5}),
            "unknown parameter 't' for merge_method 'ties'; valid parameters: normalize",
        ),
        (
            _ties(models=[{"model": "a", "parameters": {"weight": 1.0, "lambda": 2}}]),
            "unknown parameter 'lambda' in models[0].parameters for merge_method 'ties'; valid per-model "
            "parameters: weight, density",
        ),
        (
            _ties(models=[{"model": "a", "weights": 1}]),
            "unknown key 'weights' in models[0]; valid keys: model, parameters",
        ),
        (_ties(base_model=None), "merge_method 'ties' needs a base_model"),
        (_ties(models=[{"model": "a"}]), "merge_method 'ties' needs the parameter 'weight' for model 'a'"),
        (_ties(dtype="int8"), "unknown dtype 'int8'; valid dtypes: float32, float16, bfloat16"),
        (_ties(seed=-1), "expected seed to be a non-negative integer, got -1"),
        (
            _ties(tokenizer_source="union"),
            "expected tokenizer_source to be 'base' or an input model, got 'union'",
        ),
        (
            _ties(parameters={"density": [0.5, "x"]}),
            "expected parameters.density to be a number, a list of numbers or a list of {filter, value} "
            "entries",
        ),
        (
            _ties(parameters={"density": [{"filter": "mlp", "val": 0.5}]}),
            "unknown key 'val' in parameters.density; valid keys: filter, value",
        ),
        (
            {
                "merge_method": "slerp",
                "base_model": "a",
                "models": [{"model": "a"}, {"model": "b"}, {"model": "c"}],
                "parameters": {"t": 0.5},
            },
            "merge_method 'slerp' takes at most 1 model(s) besides the base, got 2",
        ),
        (
            {"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}]},
            "merge_method 'slerp' needs the parameter 't'",
        ),
        (
            {"merge_method": "ties", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]},
            "slices are supported for merge_method 'passthrough' only, got 'ties'",
        ),
        (
            {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [2, 2]}]}]},
            "expected slices[0].sources[0].layer_range to be [start, end) with 0 <= start < end, got [2, 2]",
        ),
    ],
)
def test_config_errors_name_the_problem(data, message):
    with pytest.raises(ConfigError) as info:
        MergeConfig.from_dict(data)
    assert str(info.value).startswith(message)


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(
        "merge_method: dare_ties\nbase_model: base\nmodels:\n  - model: a\n    parameters:\n"
        "      weight: 0.5\n"
        "      density: [0.2, 0.8]\nparameters:\n  lambda: 1.5\ndtype: bf16\nseed: 3\n"
    )
    config = load_config(path)
    assert config.dtype == "bfloat16" and config.seed == 3
    assert config.models[0].parameters["density"] == [0.2, 0.8]
    assert MergeConfig.from_dict(config.to_dict()) == config


def test_unreadable_and_invalid_yaml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read merge config"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)


def test_shape_mismatch_names_tensor_model_and_shapes():
    tensors = {"base": {"w": torch.zeros(2, 3)}, "a": {"w": torch.zeros(3, 2)}}
    with pytest.raises(
        ShapeMismatchError, match=r"tensor 'w' of model 'a' has shape \[3, 2\], expected \[2, 3\]"
    ):
        merge_state_dicts(_ties(), tensors)


def test_missing_tensor_and_missing_model_are_reported():
    with pytest.raises(MissingTensorError, match="model 'a' has no tensor 'v', which the merge needs"):
        merge_state_dicts(
            _ties(), {"base": {"w": torch.zeros(2), "v": torch.zeros(2)}, "a": {"w": torch.zeros(2)}}
        )
    with pytest.raises(MissingTensorError, match="no tensors were given for model 'a'"):
        merge_state_dicts(_ties(), {"base": {"w": torch.zeros(2)}})


def test_tied_output_head_is_read_from_the_embedding():
    embed = torch.randn(4, 3)
    base = {"model.embed_tokens.weight": embed, "lm_head.weight": embed + 1}
    tied = {"model.embed_tokens.weight": embed + 2}
    config = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 1.0}}],
    }
    out = merge_state_dicts(config, {"base": base, "a": tied})
    torch.testing.assert_close(out["lm_head.weight"], embed + 2)  # base head + (tied embedding - base head)


def test_empty_tensors_and_integer_buffers_pass_through():
    tensors = {
        m: {"w": torch.zeros(0, 3), "ids": torch.arange(4), "x": torch.ones(2) * (i + 1)}
        for i, m in enumerate(("base", "a"))
    }
    out = merge_state_dicts(_ties(), tensors)
    assert out["w"].shape == (0, 3)
    assert torch.equal(out["ids"], torch.arange(4))
    # density 0.5 keeps one of two equal |delta|: ties rank by position, so the later one survives
    assert torch.equal(out["x"], torch.tensor([1.0, 2.0]))


def test_non_finite_inputs_and_outputs_name_tensor_and_model():
    from merging.errors import NonFiniteError

    config = _ties()
    bad = {"base": {"w": torch.zeros(3)}, "a": {"w": torch.tensor([1.0, float("nan"), 0.0])}}
    with pytest.raises(NonFiniteError, match="tensor 'w' of model 'a' contains NaN or infinite values"):
        merge_state_dicts(config, bad)
    for method, params in (
        ("dare_ties", {"weight": 1.0, "density": 0.0}),  # everything dropped: the NaN still surfaces
        ("linear", {"weight": 0.0}),
        ("sce", {}),
        ("slerp", {}),
    ):
        data = {
            "merge_method": method,
            "base_model": "base",
            "models": [{"model": "a", "parameters": params}],
        }
        if method == "linear":
            data["models"].append({"model": "base", "parameters": {"weight": 1.0}})
        if method == "slerp":
            data["parameters"] = {"t": 0.0}
        inf = {"base": {"w": torch.zeros(3)}, "a": {"w": torch.tensor([1.0, float("-inf"), 0.0])}}
        with pytest.raises(NonFiniteError, match="tensor 'w' of model 'a' contains NaN or infinite values"):
            merge_state_dicts(data, inf)
    huge = {"base": {"w": torch.zeros(2)}, "a": {"w": torch.full((2,), 3e38)}}
    big = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 10.0}}],
    }
    with pytest.raises(NonFiniteError, match="merged tensor 'w' contains NaN or infinite values"):
        merge_state_dicts(big, huge)
