"""Results do not depend on the block size, torch's thread count, or repetition."""

import pytest
import torch
from merge_helpers import merge_one

import merging.blocks
from merging.methods import METHODS

METHOD_NAMES = sorted(m for m in METHODS if m not in ("passthrough", "slerp"))


def _inputs(shape=(41, 13), dtype=torch.bfloat16):
    generator = torch.Generator().manual_seed(11)
    base = torch.randn(shape, generator=generator)
    models = {m: base + (torch.randn(shape, generator=generator) * 0.05).round(decimals=2) for m in "abc"}
    return base.to(dtype), {m: x.to(dtype) for m, x in models.items()}


def _params(method):
    spec = METHODS[method]
    values = {"weight": 0.8, "density": 0.35, "gamma": 0.05, "epsilon": 0.1}
    return {m: {k: values[k] for k in spec.model_params if k in values} for m in "abc"}


def _globals(method):
    return {"select_topk": 0.4} if method == "sce" else None


def _grams(method, width):
    """Input Grams of rank-deficient random inputs per model, for data-aware methods; else None."""
    if not METHODS[method].needs_grams:
        return None
    generator = torch.Generator().manual_seed(12)
    inputs = {m: torch.randn(width // 2, width, generator=generator) for m in "abc"}
    return {m: x.T @ x for m, x in inputs.items()}


@pytest.mark.parametrize("method", [*METHOD_NAMES, "slerp"])
def test_row_blocks_give_the_same_bytes_as_one_block(method, monkeypatch):
    base, models = _inputs()
    if method == "slerp":
        models = {"a": models["a"]}
        run = lambda: merge_one("slerp", base, models, parameters={"t": 0.3})  # noqa: E731
    else:
        grams = _grams(method, base.shape[1])
        run = lambda: merge_one(method, base, models, _params(method), _globals(method), grams=grams)  # noqa: E731
    whole = run()
    monkeypatch.setattr(merging.blocks, "BLOCK_ELEMENTS", 40)  # 3 rows per block, 14 blocks
    blocked = run()
    assert whole.dtype == torch.bfloat16
    assert torch.equal(whole.view(torch.int16), blocked.view(torch.int16))


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "sce", "model_stock", "linear", "regmean"])
def test_thread_count_does_not_change_the_bytes(method):
    base, models = _inputs(shape=(128, 1024), dtype=torch.float32)  # above torch's parallel grain
    grams = _grams(method, 1024)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(merge_one(method, base, models, _params(method), _globals(method), grams=grams))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0].view(torch.int32), results[1].view(torch.int32))


def test_slerp_statistics_do_not_depend_on_threads():
    base, models = _inputs(shape=(256, 512), dtype=torch.float32)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(merge_one("slerp", base, {"a": models["a"]}, parameters={"t": 0.6}))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])
