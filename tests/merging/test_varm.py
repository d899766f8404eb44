"""varm: per-tensor weights from each model's mean squared change, checked against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from merging.errors import ConfigError
from tests.merging.merge_helpers import merge_one


def test_varm_weights_each_task_vector_by_its_share_of_the_squared_change():
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    a = base + torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # mean squared change 1
    b = base + torch.tensor([[2.0, 0.0], [0.0, -2.0]])  # mean squared change (4 + 4) / 4 = 2
    out = merge_one("varm", base, {"a": a, "b": b})
    # weights 1/3 and 2/3: base + [[1/3 + 4/3, 1/3], [1/3, 1/3 - 4/3]]
    expected = torch.tensor([[1.0 + 5.0 / 3.0, 2.0 + 1.0 / 3.0], [3.0 + 1.0 / 3.0, 4.0 - 1.0]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_varm_with_one_model_is_that_model():
    base = torch.tensor([[0.5, -1.0, 2.0]])
    model = torch.tensor([[1.5, -3.0, 2.25]])
    torch.testing.assert_close(merge_one("varm", base, {"a": model}), model, rtol=0, atol=1e-7)


def test_varm_weights_equally_when_nothing_changed():
    base = torch.tensor([[1.0, -1.0]])
    assert torch.equal(merge_one("varm", base, {"a": base.clone(), "b": base.clone()}), base)


def test_varm_weights_are_per_tensor():
    from merging.engine import merge_state_dicts

    names = ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight")
    base = {n: torch.zeros(1, 2) for n in names}
    a = {names[0]: torch.tensor([[3.0, 3.0]]), names[1]: torch.tensor([[1.0, 1.0]])}
    b = {names[0]: torch.tensor([[1.0, 1.0]]), names[1]: torch.tensor([[3.0, 3.0]])}
    config = {
        "merge_method": "varm",
        "base_model": "base",
        "models": [{"model": "a"}, {"model": "b"}],
    }
    out = merge_state_dicts(config, {"base": base, "a": a, "b": b})
    # up_proj: energies 9 and 1 -> 0.9 * 3 + 0.1 * 1 = 2.8; down_proj mirrored
    torch.testing.assert_close(out[names[0]], torch.tensor([[2.8, 2.8]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[names[1]], torch.tensor([[2.8, 2.8]]), rtol=0, atol=1e-6)


def test_varm_needs_a_base_model():
    with pytest.raises(ConfigError):
        merge_one("varm", None, {"a": torch.ones(1, 2)})
