"""The compiled task-arithmetic path: its random stream, statistics paths and thread independence."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from merge_helpers import NAME, merge_one
from test_operators import reference_elect, reference_trim

import merging.blocks
from merging import fused
from merging.engine import merge_state_dicts
from merging.errors import NonFiniteError

MASK64 = (1 << 64) - 1


def splitmix64_reference(key: int, index: int) -> int:
    """Output `index` of SplitMix64 (Steele, Lea, Flood 2014; Vigna's splitmix64.c) seeded with `key`."""
    z = (key + (index + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def test_splitmix64_reference_gives_the_published_first_output():
    assert splitmix64_reference(0, 0) == 0xE220A8397B1DCDAF  # splitmix64.c seeded with 0


@pytest.mark.parametrize("first", [0, 7, (1 << 33) + 5])
def test_stream_draws_match_a_plain_python_splitmix64(first):
    digest = hashlib.sha256(f"umm-merge\0{42}\0{NAME}\0{3}".encode()).digest()
    key = int.from_bytes(digest[:8], "little")
    assert fused.stream_key(42, NAME, 3) == key
    expected = [(splitmix64_reference(key, first + i) >> 40) / (1 << 24) for i in range(5)]
    assert fused.uniforms(key, first, 5).tolist() == expected


def test_draws_are_uniform_and_streams_independent():
    a = fused.uniforms(fused.stream_key(0, NAME, 0), 0, 1 << 20).astype(np.float64)
    b = fused.uniforms(fused.stream_key(0, NAME, 1), 0, 1 << 20).astype(np.float64)
    assert a.min() >= 0.0 and a.max() < 1.0
    assert abs(a.mean() - 0.5) < 0.002
    assert abs(a.var() - 1 / 12) < 0.001
    assert abs((a < 0.3).mean() - 0.3) < 0.002
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.005
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 0.005


def test_dare_keeps_the_density_in_expectation_and_is_position_addressable():
    base = torch.zeros(300, 333)
    expert = torch.full((300, 333), 0.5)
    params = {"a": {"weight": 1.0, "density": 0.3}}
    out = merge_one("dare_linear", base, {"a": expert}, params, seed=5)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.005
    draws = fused.uniforms(fused.stream_key(5, NAME, 0), 0, base.numel())
    assert torch.equal(kept.flatten(), torch.from_numpy(draws < np.float32(0.3)))


def _magnitude_case(case):
    """bfloat16 inputs whose |delta| take four values (long runs of ties), or continuous float32 ones."""
    generator = torch.Generator().manual_seed(9)
    if case == "runs":
        base = (torch.randn(70, 97, generator=generator) * 4).round()
        steps = torch.randint(-3, 4, (3, 70, 97), generator=generator) * 0.25
        models = {m: base + steps[i] for i, m in enumerate("abc")}  # exact in bfloat16
        return base.to(torch.bfloat16), {m: x.to(torch.bfloat16) for m, x in models.items()}
    base = torch.randn(70, 97, generator=generator)
    return base, {m: base + torch.randn(70, 97, generator=generator) * 0.3 for m in "abc"}


def _magnitude_reference(method, base, models, params, rescale):
    base, models = base.float(), {m: x.float() for m, x in models.items()}
    n = base.numel()
    weighted, weights = [], []
    for m, x in models.items():
        keep = int(params[m]["density"] * n)
        lo, hi = n - keep, n
        if method == "breadcrumbs_ties":
            top = int(params[m]["gamma"] * n)
            lo, hi = n - keep - top, n - top
        trimmed = reference_trim(x - base, lo, hi)
        if rescale:
            trimmed = trimmed / params[m]["density"]
        weighted.append(trimmed * params[m]["weight"])
        weights.append(params[m]["weight"])
    if method == "ties":
        return base + reference_elect(weighted, weights)
    total = weighted[0] + weighted[1] + weighted[2]
    positive = total >= 0
    out = torch.zeros_like(total)
    for w in weighted:
        out = out + torch.where(torch.where(positive, w > 0, w < 0), w, 0.0)
    return base + out


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
@pytest.mark.parametrize("path", ["pivots", "radix"])
@pytest.mark.parametrize("case", ["runs", "continuous"])
@pytest.mark.parametrize("rescale", [False, True])
def test_magnitude_windows_match_the_reference_for_any_threads_and_blocks(
    method, path, case, rescale, monkeypatch
):
    base, models = _magnitude_case(case)
    params = {
        "a": {"weight": 0.7, "density": 0.4, "gamma": 0.05},
        "b": {"weight": 1.3, "density": 0.6, "gamma": 0.1},
        "c": {"weight": 1.0, "density": 0.5, "gamma": 0.02},
    }
    if method == "ties":
        for values in params.values():
            values.pop("gamma")
    used = []
    if path == "radix":
        monkeypatch.setattr(fused, "_from_pivots", lambda stack, wanted: None)
    else:
        original = fused.magnitude_statistics
        monkeypatch.setattr(fused, "magnitude_statistics", lambda *a: used.append(1) or original(*a))
    results = []
    for threads, block in ((1, None), (2, None), (3, 97 * 9), (2, 97 * 31)):
        monkeypatch.setattr(fused, "THREADS", threads)
        monkeypatch.setattr(fused, "MIN_RANGE", 64)  # several ranges per thread even in small blocks
        if block is not None:
            monkeypatch.setattr(merging.blocks, "BLOCK_ELEMENTS", block)
        parameters = {"normalize": method == "ties", "rescale": rescale}
        results.append(merge_one(method, base, models, params, parameters=parameters))
    if case == "runs":
        assert not used  # the sampled pivots hold every statistic: one pass, ties counted per range
    bits = torch.int16 if base.dtype == torch.bfloat16 else torch.int32
    for result in results[1:]:
        assert torch.equal(result.view(bits), results[0].view(bits))
    expected = _magnitude_reference(method, base, models, params, rescale).to(base.dtype)
    assert torch.equal(results[0], expected)  # values; the sign of a zero may differ from the reference


def test_bfloat16_conversion_rounds_like_torch():
    halfway = [0x3F808000, 0x3F818000, 0xBF808000, 0x3F80FFFF, 0x00008000, 0x7F7FFFFF]
    generator = torch.Generator().manual_seed(1)
    random_bits = torch.randint(0, 0x7F000000, (5000,), generator=generator, dtype=torch.int64)
    bits = torch.tensor(halfway + random_bits.tolist(), dtype=torch.int64).to(torch.int32)
    values = bits.view(torch.float32)  # all finite
    config = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 1.0}}],
        "dtype": "bfloat16",
    }
    merged = merge_state_dicts(config, {"base": {NAME: values}, "a": {NAME: values}})[NAME]  # base + 0
    assert torch.equal(merged.view(torch.int16), values.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_bfloat16_output_equals_the_float32_output_converted(method):
    base, models = _magnitude_case("continuous")
    params = {m: {"weight": 0.4, "density": 0.6} for m in models}
    if method == "task_arithmetic":
        params = {m: {"weight": 0.4} for m in models}
    tensors = {"base": {NAME: base}, **{m: {NAME: x} for m, x in models.items()}}
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        config = {
            "merge_method": method,
            "base_model": "base",
            "models": [{"model": m, "parameters": params[m]} for m in models],
            "dtype": dtype,
        }
        outputs[dtype] = merge_state_dicts(config, tensors)[NAME]
    assert outputs["bfloat16"].dtype == torch.bfloat16
    assert torch.equal(
        outputs["bfloat16"].view(torch.int16), outputs["float32"].to(torch.bfloat16).view(torch.int16)
    )


def test_non_finite_results_are_reported_for_bfloat16_output():
    base, models = _magnitude_case("runs")
    params = {m: {"weight": 1.0, "density": 0.5} for m in models}
    broken = dict(models, b=models["b"].clone())
    broken["b"][3, 4] = float("nan")
    with pytest.raises(NonFiniteError, match="'b'"):
        merge_one("ties", base, broken, params)  # bfloat16 inputs: bfloat16 output, converted in the kernel
    zero = torch.zeros_like(base)
    huge = {m: torch.full_like(base, 3e38) for m in models}  # finite inputs, an infinite sum
    with pytest.raises(NonFiniteError, match="merged tensor"):
        merge_one("task_arithmetic", zero, huge, {m: {"weight": 1.0} for m in models})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_the_plain_weighted_sum_bit_for_bit(dtype, normalize, monkeypatch):
    generator = torch.Generator().manual_seed(3)
    models = {m: torch.randn(70, 97, generator=generator).to(dtype) for m in "abc"}
    models["a"][0, :4] = torch.tensor([-0.0, 0.0, -0.0, 1.0])  # negative zeros must stay negative
    models["b"][0, :4] = torch.tensor([-0.0, -0.0, 0.0, -1.0])
    models["c"][0, :4] = torch.tensor([-0.0, -0.0, -0.0, 0.0])
    weights = {"a": 0.3, "b": 1.7, "c": 0.45}
    expected = models["a"].float() * weights["a"]
    for m in "bc":
        expected = expected + models[m].float() * weights[m]
    if normalize:
        expected = expected / (0.3 + 1.7 + 0.45)
    expected = expected.to(dtype)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for threads, block in ((1, None), (2, None), (3, 97 * 9)):
        monkeypatch.setattr(fused, "THREADS", threads)
        monkeypatch.setattr(fused, "MIN_RANGE", 64)  # several ranges per thread even in small blocks
        if block is not None:
            monkeypatch.setattr(merging.blocks, "BLOCK_ELEMENTS", block)
        params = {m: {"weight": w} for m, w in weights.items()}
        merged = merge_one("linear", None, models, params, parameters={"normalize": normalize})
        assert merged.dtype == dtype
        assert torch.equal(merged.view(bits), expected.view(bits))


def test_a_first_kernel_call_does_not_load_scipy_linalg():
    """numba's BLAS probe would import scipy.linalg (~0.4 CPU-s per merge); the kernels need no BLAS."""
    script = (
        "import sys, numpy as np, merging.kernels as k\n"
        "k.splitmix64(np.uint64(1), np.uint64(2))\n"
        "print('scipy.linalg' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
