"""Search space: groups by name, coordinates to values, the config's values as the start."""

from __future__ import annotations

import pytest

from merging.config import load_config
from merging.parameters import resolve_parameters
from merging.search.space import SearchSpace, SearchSpaceError, group_filter

NAMES = [
    "model.embed_tokens.weight",
    *(
        f"model.layers.{i}.{part}.weight"
        for i in range(4)
        for part in (
            "self_attn.q_proj",
            "self_attn.o_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "input_layernorm",
        )
    ),
    "model.norm.weight",
]
CONFIG = {
    "merge_method": "ties",
    "base_model": "base",
    "models": [
        {"model": "a", "parameters": {"weight": 0.6, "density": 0.5}},
        {"model": "b", "parameters": {"weight": 0.4, "density": [0.2, 0.8]}},
    ],
}


def space(granularity="attn_mlp", keys=None, names=NAMES):
    config = load_config(CONFIG)
    return SearchSpace(config, resolve_parameters(config, NAMES), names, granularity=granularity, keys=keys)


@pytest.mark.parametrize(
    ("name", "granularity", "expected"),
    [
        ("model.layers.3.mlp.up_proj.weight", "layer", ("layer 3", "layers.3.mlp.")),
        ("model.layers.3.input_layernorm.weight", "layer", ("layer 3", "layers.3.input_layernorm.")),
        ("model.layers.3.mlp.up_proj.weight", "attn_mlp", ("layer 3 mlp", "layers.3.mlp.")),
        ("model.layers.3.self_attn.q_proj.weight", "attn_mlp", ("layer 3 attn", "layers.3.self_attn.")),
        (
            "model.layers.3.self_attn.q_proj.weight",
            "module",
            ("layer 3 self_attn.q_proj", "layers.3.self_attn.q_proj."),
        ),
        (
            "model.layers.1.input_layernorm.weight",
            "attn_mlp",
            ("layer 1 input_layernorm", "layers.1.input_layernorm."),
        ),
        ("transformer.h.11.attn.c_attn.weight", "attn_mlp", ("layer 11 attn", "h.11.attn.")),
        ("model.norm.weight", "attn_mlp", ("model.norm.weight", "model.norm.weight")),
    ],
)
def test_group_and_filter_of_a_tensor(name, granularity, expected):
    assert group_filter(name, granularity, 12, 0) == expected


def test_blocks_split_the_layers_contiguously():
    blocks = space("blocks:2").groups
    assert list(blocks) == ["model.embed_tokens.weight", "block 0", "block 1", "model.norm.weight"]
    assert {n.split(".")[2] for n in blocks["block 0"]} == {"0", "1"}
    assert {n.split(".")[2] for n in blocks["block 1"]} == {"2", "3"}


def test_dimensions_start_and_apply():
    s = space(names=[n for n in NAMES if ".layers.0." in n or ".layers.3." in n])
    # layer 0 and 3: attn, mlp, input_layernorm groups; weight and density of 2 experts each
    assert len(s.groups) == 6 and s.size == 6 * 2 * 2
    start = dict(zip([(d.group, d.key, d.model) for d in s.dimensions], s.values(s.start()), strict=True))
    assert start[("layer 0 mlp", "weight", "a")] == pytest.approx(0.6)
    assert start[("layer 0 mlp", "density", "a")] == pytest.approx(0.5)
    assert start[("layer 0 mlp", "density", "b")] == pytest.approx(0.2)  # the gradient's value at layer 0
    assert start[("layer 3 mlp", "density", "b")] == pytest.approx(0.8)
    x = [0.0] * s.size
    x[
        next(
            i
            for i, d in enumerate(s.dimensions)
            if (d.group, d.key, d.model) == ("layer 3 mlp", "weight", "b")
        )
    ] = 1.0
    applied = s.apply(x)
    assert applied["model.layers.3.mlp.up_proj.weight"].models["b"]["weight"] == 1.0
    assert applied["model.layers.3.mlp.down_proj.weight"].models["b"]["density"] == pytest.approx(0.1)
    assert applied["model.layers.3.mlp.up_proj.weight"].models["a"]["weight"] == 0.0
    assert applied["model.layers.1.mlp.up_proj.weight"].models["b"]["weight"] == pytest.approx(
        0.4
    )  # not searched
    assert s.template["model.layers.3.mlp.up_proj.weight"].models["b"]["weight"] == pytest.approx(
        0.4
    )  # untouched


def test_lambda_is_one_coordinate_per_group():
    s = space("layer", keys=["weight", "lambda"])
    assert [(d.key, d.model) for d in s.dimensions if d.group == "layer 2"] == [
        ("weight", "a"),
        ("weight", "b"),
        ("lambda", None),
    ]


def test_bad_spaces_are_refused_with_one_sentence():
    with pytest.raises(SearchSpaceError, match="expected a granularity among"):
        space("rows")
    with pytest.raises(SearchSpaceError, match="has no parameter 'epsilon'"):
        space(keys=["epsilon"])
    config = load_config(
        {"merge_method": "slerp", "base_model": "base", "models": [{"model": "a"}], "parameters": {"t": 0.5}}
    )
    with pytest.raises(SearchSpaceError, match="no per-model weight to search"):
        SearchSpace(config, resolve_parameters(config, NAMES), NAMES)
    with pytest.raises(SearchSpaceError, match="expected 24 finite coordinates"):
        space("layer").values([0.5])
