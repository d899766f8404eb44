"""tsv (task singular vectors): checked against hand-built low-rank task matrices and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from merging.errors import ConfigError
from merging.singular import task_singular_basis
from tests.merging.merge_helpers import merge_one


def outer(u, v) -> torch.Tensor:
    return torch.outer(torch.tensor(u, dtype=torch.float64), torch.tensor(v, dtype=torch.float64))


def test_tasks_in_orthogonal_subspaces_add_up_exactly():
    base = torch.arange(16, dtype=torch.float32).reshape(4, 4) / 10
    a = 3.0 * outer([1, 0, 0, 0], [0, 1, 0, 0])
    b = 2.0 * outer([0, 0, 1, 0], [0, 0, 0, 1])
    out = merge_one("tsv", base, {"a": base + a.float(), "b": base + b.float()})
    torch.testing.assert_close(out, base + (a + b).float(), rtol=0, atol=1e-6)


def test_each_task_keeps_its_top_rank_over_task_count_directions():
    # 4 x 4, two tasks: each keeps its top 2 singular directions; a's third (2.0) is cut
    a = torch.diag(torch.tensor([4.0, 3.0, 2.0, 0.0], dtype=torch.float64))
    b = 5.0 * outer([0, 0, 0, 1], [0, 0, 0, 1])
    merged = task_singular_basis([a, b]).combine([1.0, 1.0])
    expected = torch.diag(torch.tensor([4.0, 3.0, 0.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-12)


def test_overlapping_directions_are_symmetrically_orthogonalized():
    # Left vectors at 45 degrees; the nearest orthonormal pair is Loewdin's: U (U^T U)^(-1/2),
    # which for two unit vectors with cosine c mixes them by (a + b) / 2 and (a - b) / 2 with
    # a = 1 / sqrt(1 + c), b = 1 / sqrt(1 - c).
    s = 1 / math.sqrt(2)
    ua, ub = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([s, s], dtype=torch.float64)
    va, vb = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    a_coef, b_coef = 1 / math.sqrt(1 + s), 1 / math.sqrt(1 - s)
    pa = (a_coef + b_coef) / 2 * ua + (a_coef - b_coef) / 2 * ub
    pb = (a_coef - b_coef) / 2 * ua + (a_coef + b_coef) / 2 * ub
    expected = 2.0 * torch.outer(pa, va) + 1.5 * torch.outer(pb, vb)
    merged = task_singular_basis([2.0 * torch.outer(ua, va), 1.5 * torch.outer(ub, vb)]).combine([1.0, 1.0])
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-12)
    assert abs(float(pa @ pb)) < 1e-12  # the directions it used are orthogonal


def test_weights_scale_each_task_and_lambda_scales_the_sum():
    base = torch.zeros(4, 4)
    a = outer([1, 0, 0, 0], [1, 0, 0, 0]).float()
    b = outer([0, 1, 0, 0], [0, 0, 1, 0]).float()
    out = merge_one(
        "tsv",
        base,
        {"a": a, "b": b},
        model_params={"a": {"weight": 2.0}, "b": {"weight": -1.0}},
        parameters={"lambda": 0.5},
    )
    torch.testing.assert_close(out, 0.5 * (2.0 * a - b), rtol=0, atol=1e-6)


def test_one_full_rank_model_is_reproduced():
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=generator)
    model = base + torch.randn(6, 5, generator=generator)
    torch.testing.assert_close(merge_one("tsv", base, {"a": model}), model, rtol=0, atol=1e-5)


def test_vectors_take_the_mean_of_the_weighted_task_vectors():
    base = torch.tensor([1.0, 2.0, 3.0])
    a = torch.tensor([2.0, 2.0, 3.0])
    b = torch.tensor([1.0, 4.0, 3.0])
    out = merge_one("tsv", base, {"a": a, "b": b}, name="model.norm.weight")
    torch.testing.assert_close(out, torch.tensor([1.5, 3.0, 3.0]), rtol=0, atol=1e-7)


def test_an_unchanged_model_takes_no_share_of_the_rank():
    base = torch.zeros(2, 2)
    a = torch.diag(torch.tensor([3.0, 1.0]))
    out = merge_one("tsv", base, {"a": a, "b": base.clone()})
    torch.testing.assert_close(out, a, rtol=0, atol=1e-6)  # a keeps both directions, not one


def test_same_bytes_for_one_and_two_threads():
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(48, 32, generator=generator)
    models = {m: base + 0.1 * torch.randn(48, 32, generator=generator) for m in "abc"}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = merge_one("tsv", base, models)
        torch.set_num_threads(2)
        two = merge_one("tsv", base, models)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_tsv_needs_a_base_model():
    with pytest.raises(ConfigError):
        merge_one("tsv", None, {"a": torch.ones(2, 2)})


def test_a_memo_reuses_the_basis_and_gives_the_same_bytes():
    from merging.engine import merge_state_dicts

    generator = torch.Generator().manual_seed(11)
    name = "model.layers.0.self_attn.q_proj.weight"
    base = {name: torch.randn(24, 16, generator=generator)}
    models = {m: {name: base[name] + 0.2 * torch.randn(24, 16, generator=generator)} for m in "ab"}
    tensors = {"base": base, **models}

    def config(wa: float, wb: float, lam: float) -> dict:
        return {
            "merge_method": "tsv",
            "base_model": "base",
            "models": [
                {"model": "a", "parameters": {"weight": wa}},
                {"model": "b", "parameters": {"weight": wb}},
            ],
            "parameters": {"lambda": lam},
        }

    memo: dict = {}
    first = merge_state_dicts(config(1.0, 1.0, 1.0), tensors, memo=memo)[name]
    held = memo[name]["tsv"]
    second = merge_state_dicts(config(0.3, 1.7, 1.4), tensors, memo=memo)[name]
    assert memo[name]["tsv"] is held  # not recomputed
    assert torch.equal(first, merge_state_dicts(config(1.0, 1.0, 1.0), tensors)[name])
    assert torch.equal(second, merge_state_dicts(config(0.3, 1.7, 1.4), tensors)[name])
    assert not torch.equal(first, second)
