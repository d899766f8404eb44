"""Each operator against a plainly written reference or a hand-computed case."""

import math

import numpy as np
import pytest
import torch
from merge_helpers import NAME, merge_one

from merging.fused import stream_key, uniforms
from merging.operators import generator_for


def test_linear_is_the_normalized_weighted_average():
    a, b = torch.tensor([1.0, 2.0, -4.0]), torch.tensor([3.0, 0.0, 4.0])
    out = merge_one("linear", None, {"a": a, "b": b}, {"a": {"weight": 1.0}, "b": {"weight": 3.0}})
    assert torch.equal(out, torch.tensor([2.5, 0.5, 2.0]))
    raw = merge_one(
        "linear", None, {"a": a, "b": b}, {"a": {"weight": 1.0}, "b": {"weight": 3.0}}, {"normalize": False}
    )
    assert torch.equal(raw, torch.tensor([10.0, 2.0, 8.0]))


def test_one_hot_weights_return_that_model():
    torch.manual_seed(1)
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    out = merge_one("linear", None, {"a": a, "b": b}, {"a": {"weight": 0.0}, "b": {"weight": 1.0}})
    assert torch.equal(out, b)


def test_task_arithmetic_adds_scaled_weighted_task_vectors():
    base = torch.tensor([1.0, 1.0, 1.0])
    a, b = torch.tensor([2.0, 1.0, 0.0]), torch.tensor([1.0, 3.0, 1.0])
    out = merge_one(
        "task_arithmetic",
        base,
        {"a": a, "b": b},
        {"a": {"weight": 1.0}, "b": {"weight": 0.5}},
        {"lambda": 2.0},
    )
    # deltas [1,0,-1] and [0,2,0]; weighted sum [1,1,-1]; times lambda 2
    assert torch.equal(out, torch.tensor([3.0, 3.0, -1.0]))


def test_ties_on_three_short_vectors_matches_the_hand_computed_result():
    base = torch.tensor([0.5, 0.5, 0.5, 0.5])
    deltas = {
        "a": torch.tensor([1.0, -2.0, 0.5, 3.0]),
        "b": torch.tensor([-1.5, -1.0, 2.0, 0.1]),
        "c": torch.tensor([2.0, 1.0, -0.2, -0.5]),
    }
    params = {m: {"weight": 1.0, "density": 0.5} for m in deltas}
    out = merge_one("ties", base, {m: base + d for m, d in deltas.items()}, params)
    # trimmed: a -> [0,-2,0,3], b -> [-1.5,0,2,0], c -> [2,1,0,0]; elected signs + - + +;
    # disjoint means: [2, -2, 2, 3]
    assert torch.equal(out, base + torch.tensor([2.0, -2.0, 2.0, 3.0]))


def reference_trim(delta: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Keep ascending |delta| ranks [lo, hi), ties ranked by position."""
    flat = delta.flatten().tolist()
    order = sorted(range(len(flat)), key=lambda i: (abs(flat[i]), i))
    kept = [0.0] * len(flat)
    for rank, i in enumerate(order):
        if lo <= rank < hi:
            kept[i] = flat[i]
    return torch.tensor(kept).view_as(delta)


def reference_elect(weighted: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = torch.zeros_like(weighted[0]).flatten()
    columns = [w.flatten().tolist() for w in weighted]
    for i in range(out.numel()):
        values = [col[i] for col in columns]
        total = 0.0
        for v in values:
            total = float(torch.tensor(total) + torch.tensor(v))
        positive = total >= 0
        agreeing = [(v, w) for v, w in zip(values, weights, strict=True) if (v > 0 if positive else v < 0)]
        num = 0.0
        den = 0.0
        for v, w in agreeing:
            num = float(torch.tensor(num) + torch.tensor(v))
            den = float(torch.tensor(den) + torch.tensor(w))
        out[i] = num / (den if den != 0 else 1.0)
    return out.view_as(weighted[0])


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_magnitude_methods_match_the_reference(method):
    torch.manual_seed(2)
    base = torch.randn(6, 5)
    models = {m: base + torch.randn(6, 5).round(decimals=1) for m in ("a", "b", "c")}  # rounded: many ties
    params = {
        "a": {"weight": 0.7, "density": 0.4},
        "b": {"weight": 1.3, "density": 0.6},
        "c": {"weight": 1.0, "density": 0.5},
    }
    if method != "ties":
        for m in params:
            params[m]["gamma"] = 0.1
    out = merge_one(method, base, models, params)
    n = base.numel()
    weighted, weights = [], []
    for m, x in models.items():
        density = params[m]["density"]
        keep = int(density * n)
        if method == "ties":
            lo, hi = n - keep, n
        else:
            top = int(0.1 * n)
            bottom = n - keep - top
            if bottom < 0:
                top, bottom = top + bottom, 0
            lo, hi = bottom, n - top
        weighted.append(reference_trim(x - base, lo, hi) * params[m]["weight"])
        weights.append(params[m]["weight"])
    if method == "breadcrumbs":
        expected = base + (weighted[0] + weighted[1] + weighted[2])
    else:
        mixed = reference_elect(weighted, weights)
        expected = base + (mixed if method == "ties" else _unnormalized_elect(weighted))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def _unnormalized_elect(weighted):
    total = weighted[0] + weighted[1] + weighted[2]
    positive = total >= 0
    out = torch.zeros_like(total)
    for w in weighted:
        out = out + torch.where(torch.where(positive, w > 0, w < 0), w, 0.0)
    return out


def test_dare_rescaling_preserves_the_task_vector_in_expectation():
    base = torch.zeros(400, 500)
    expert = torch.full((400, 500), 0.2)
    out = merge_one("dare_linear", base, {"a": expert}, {"a": {"weight": 1.0, "density": 0.25}})
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.01
    assert torch.allclose(out[kept], torch.tensor(0.8))  # rescaled by 1 / density
    assert abs(out.mean().item() - 0.2) < 0.005


def test_dare_matches_its_seeded_reference_and_depends_on_the_seed():
    torch.manual_seed(3)
    base = torch.randn(8, 9)
    models = {"a": base + torch.randn(8, 9), "b": base + torch.randn(8, 9)}
    params = {"a": {"weight": 0.6, "density": 0.5}, "b": {"weight": 0.4, "density": 0.3}}
    out = merge_one("dare_linear", base, models, params, seed=7)
    expected = base.clone()
    total = torch.zeros_like(base)
    for position, (m, x) in enumerate(models.items()):
        density = params[m]["density"]
        draws = uniforms(stream_key(7, NAME, position), 0, base.numel())
        keep = torch.from_numpy(draws < np.float32(density)).view(base.shape)
        total = total + torch.where(keep, x - base, 0.0) / density * params[m]["weight"]
    expected = base + total
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    again = merge_one("dare_linear", base, models, params, seed=7)
    assert torch.equal(out, again)
    other = merge_one("dare_linear", base, models, params, seed=8)
    assert not torch.equal(out, other)


def test_della_keep_probability_follows_the_magnitude_rank():
    base = torch.zeros(2000, 10)
    row = torch.arange(1, 11, dtype=torch.float32)  # magnitudes ranked 0..9 in every row
    expert = row.expand(2000, 10).clone()
    params = {"a": {"weight": 1.0, "density": 0.5, "epsilon": 0.3}}
    out = merge_one("della_linear", base, {"a": expert}, params)
    kept = (out != 0).float().mean(dim=0)
    expected = torch.tensor([0.2 + 0.6 * r / 9 for r in range(10)])
    assert torch.allclose(kept, expected, atol=0.04)
    # rescaled by 1 / p: each kept value is value / p of its rank
    for r in (0, 9):
        column = out[:, r]
        assert torch.allclose(column[column != 0], row[r] / expected[r], rtol=1e-5)


def test_della_matches_its_seeded_reference():
    torch.manual_seed(4)
    base = torch.randn(5, 6)
    models = {"a": base + torch.randn(5, 6), "b": base + torch.randn(5, 6)}
    params = {m: {"weight": 1.0, "density": 0.5, "epsilon": 0.2} for m in models}
    out = merge_one("della", base, models, params, parameters={"lambda": 0.9})
    weighted = []
    for position, x in enumerate(models.values()):
        delta = x - base
        probs = torch.zeros_like(delta)
        for i in range(delta.shape[0]):
            order = sorted(range(6), key=lambda j: (abs(delta[i, j].item()), j))
            for rank, j in enumerate(order):
                probs[i, j] = 0.3 + (rank / 5) * 0.4
        keep = torch.rand(delta.shape, generator=generator_for(0, NAME, position)) < probs
        weighted.append(torch.where(keep, delta, 0.0) / probs)
    expected = base + reference_elect(weighted, [1.0, 1.0]) * 0.9
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_slerp_endpoints_and_midpoint_on_orthogonal_vectors():
    base, other = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0, 0.0])
    models = {"base": base, "b": other}

    def at(t):
        return merge_one("slerp", base, {"b": other}, parameters={"t": t})

    assert torch.equal(at(0.0), base)
    assert torch.equal(at(1.0), other)
    half = math.sin(math.pi / 4)
    torch.testing.assert_close(at(0.5), torch.tensor([half, 2 * half, 0.0, 0.0]), rtol=0, atol=1e-7)
    assert models


def test_slerp_falls_back_to_lerp_for_colinear_inputs():
    base = torch.tensor([1.0, 2.0, 3.0])
    out = merge_one("slerp", base, {"b": base * 3}, parameters={"t": 0.25})
    torch.testing.assert_close(out, base * 0.75 + base * 3 * 0.25, rtol=0, atol=1e-6)


def test_model_stock_matches_the_formula():
    torch.manual_seed(5)
    base = torch.randn(4, 8)
    models = {"a": base + torch.randn(4, 8), "b": base + torch.randn(4, 8)}
    out = merge_one("model_stock", base, models)
    d1, d2 = (models["a"] - base).double().flatten(), (models["b"] - base).double().flatten()
    cos = float(d1 @ d2 / (d1.norm() * d2.norm()))
    t = 2 * cos / (1 + cos)
    expected = (models["a"] + models["b"]) / 2 * t + base * (1 - t)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_model_stock_filter_wise_uses_each_row():
    torch.manual_seed(6)
    base = torch.randn(3, 8)
    models = {"a": base + torch.randn(3, 8), "b": base + torch.randn(3, 8)}
    out = merge_one("model_stock", base, models, parameters={"filter_wise": True})
    for row in range(3):
        d1 = (models["a"] - base)[row].double()
        d2 = (models["b"] - base)[row].double()
        cos = float(d1 @ d2 / (d1.norm() * d2.norm()))
        t = 2 * cos / (1 + cos)
        expected = (models["a"][row] + models["b"][row]) / 2 * t + base[row] * (1 - t)
        torch.testing.assert_close(out[row], expected, rtol=0, atol=1e-6)


def test_sce_matches_the_reference():
    torch.manual_seed(7)
    base = torch.randn(4, 5)
    models = {m: base + torch.randn(4, 5) * s for m, s in (("a", 1.0), ("b", 0.5), ("c", 2.0))}
    out = merge_one("sce", base, models, parameters={"select_topk": 0.5})
    deltas = torch.stack([x - base for x in models.values()])  # [3, 4, 5]
    variance = deltas.var(dim=0, unbiased=False).flatten()
    keep_count = int(0.5 * int((variance != 0).sum()))
    order = sorted(range(variance.numel()), key=lambda i: (variance[i].item(), i))
    mask = torch.zeros(variance.numel(), dtype=torch.bool)
    mask[order[variance.numel() - keep_count :]] = True
    deltas = deltas * mask.view(4, 5)
    energy = [float((d.double() ** 2).sum()) / d.numel() for d in deltas]
    weights = [e / sum(energy) for e in energy]
    positive = deltas.sum(dim=0) >= 0  # the election ignores the weights
    agree = torch.where(positive, deltas > 0, deltas < 0)
    w = torch.tensor(weights).view(3, 1, 1)
    divisor = (agree * w).sum(dim=0)
    expected = base + (deltas * w * agree).sum(dim=0) / torch.where(divisor == 0, 1.0, divisor)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_passthrough_scales_the_single_model():
    x = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    assert torch.equal(merge_one("passthrough", None, {"a": x}, {"a": {"scale": 0.5}}), x * 0.5)


@pytest.mark.parametrize(
    "method",
    [
        "task_arithmetic",
        "ties",
        "dare_ties",
        "dare_linear",
        "breadcrumbs_ties",
        "della",
        "sce",
        "model_stock",
    ],
)
def test_identical_inputs_return_the_base(method):
    torch.manual_seed(8)
    base = torch.randn(6, 4)
    models = {"a": base.clone(), "b": base.clone()}
    params = {}
    if method not in ("sce", "model_stock"):
        params = {m: {"weight": 0.5} for m in models}
        if method != "task_arithmetic":
            for m in params:
                params[m]["density"] = 0.5
    assert torch.equal(merge_one(method, base, models, params), base)
