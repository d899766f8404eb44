"""The task-arithmetic family (except DELLA) and `linear` in one compiled pass per block (`merging.kernels`).

`fused_task_arithmetic` computes exactly the bytes of the plain torch formulation (task vectors,
magnitude or outlier windows, random drops, TIES sign election, weighted sums) with one pass per
row block over the stored inputs (bfloat16 decoded in the kernel; other dtypes as float32), the
block's flat range split over `THREADS` threads; a bfloat16 output is rounded and checked for
NaN/inf in the same loop. Magnitude windows need exact order statistics of |delta| over the
whole tensor first: one pass counts the values below and up to a few candidates taken from a
sample (with bfloat16 inputs one of them is almost always the wanted value); if none brackets a
wanted rank, a radix select finds it (one pass histograms the high 15 bits of the float32 bit
patterns, which sort like non-negative floats, a second the low 16 bits inside the wanted bins).
The selected set is the stable order's (value, flat index), the same as `merging.select`.

Random drops draw from a counter-based stream per (seed, tensor, model position), so any range
of any block is drawn independently: see `stream_key` and `merging.kernels.splitmix64`.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import numpy as np
import torch

from merging.blocks import TensorStack
from merging.parameters import TensorParameters
from merging.select import OrderStatistic, RankWindow, window_from_ranks

THREADS = min(2, os.cpu_count() or 1)  # ranges per block run in parallel; the bytes do not depend on it
RANGES_PER_THREAD = 4  # ranges per block and thread in the main passes, handed out as threads free up
MIN_RANGE = 1 << 16  # values: a smaller block is one range, run on the calling thread
ALIGN = 64  # range boundaries at multiples of this many values (whole cache lines)
FUSED_SPARSIFY = (None, "magnitude", "outliers", "random")
SAMPLE = 1 << 14  # values of the first block sampled to guess magnitude statistics
SAMPLE_RUNS = 128  # in this many evenly spaced runs
PIVOTS = 8  # at most this many candidate values counted per model in the statistics pass
PIVOT_STEPS = (-2.5, 0.0, 2.5)  # standard errors from the sampled quantile

_pool: ThreadPoolExecutor | None = None


class _KernelsOnFirstUse:
    """`merging.kernels`, imported at the first attribute read: numba and LLVM (about 50 MiB
    resident) load when a process first merges, not when it imports the merge engine (a node
    imports it at start and may idle for hours)."""

    def __getattr__(self, name: str) -> object:
        module: ModuleType = importlib.import_module("merging.kernels")
        return getattr(module, name)


kernels = _KernelsOnFirstUse()


def stream_key(seed: int, tensor: str, position: int) -> int:
    """The 64-bit key of one model's random stream in one tensor: sha256(seed, name, position)."""
    digest = hashlib.sha256(f"umm-merge\0{seed}\0{tensor}\0{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def uniforms(key: int, first: int, count: int) -> np.ndarray:
    """Draws `first .. first + count - 1` of the stream `key` as float32 in [0, 1)."""
    return kernels.uniforms(np.uint64(key), first, count)


class KernelInputs:
    """A block's inputs as the kernels read them: flat numpy arrays, all bfloat16 bit patterns
    (uint16) or all float32, passed by address (`packed`); this object keeps them alive."""

    def __init__(self, raw: Sequence[torch.Tensor]) -> None:
        if all(t.dtype == torch.bfloat16 for t in raw):
            self.arrays = [t.reshape(-1).view(torch.int16).numpy().view(np.uint16) for t in raw]
        else:
            self.arrays = [np.ascontiguousarray(t.reshape(-1).to(torch.float32).numpy()) for t in raw]
        self.size = int(self.arrays[0].size)
        if any(a.size != self.size for a in self.arrays):
            sizes = [a.size for a in self.arrays]
            raise ValueError(f"expected inputs of {self.size} values each, got {sizes}")
        addresses = np.asarray([a.ctypes.data for a in self.arrays], dtype=np.int64)
        self.packed = (addresses, self.size, np.empty(0, dtype=self.arrays[0].dtype))


def split(count: int, parts: int) -> list[tuple[int, int]]:
    """`[0, count)` in up to `parts` contiguous ranges with boundaries at multiples of `ALIGN`."""
    step = -(-count // max(1, parts))
    step = -(-step // ALIGN) * ALIGN
    return [(start, min(count, start + step)) for start in range(0, count, max(step, 1))]


def block_ranges(size: int) -> list[tuple[int, int]]:
    """A block's `[0, size)` in the ranges its kernels run: several per thread, none under `MIN_RANGE`."""
    return split(size, min(THREADS * RANGES_PER_THREAD, -(-size // MIN_RANGE)))


def run_parallel(task: Callable[[int, int, int], None], ranges: list[tuple[int, int]]) -> None:
    """`task(number, start, end)` for each range, on this thread and `THREADS - 1` pool threads.

    Each thread takes the next range not yet taken, so a thread slowed by other work (the writer,
    the reader, another process) takes fewer ranges instead of holding up the block.
    """
    global _pool
    taken = itertools.count()  # next() of a count is atomic under the GIL

    def work() -> None:
        while (n := next(taken)) < len(ranges):
            task(n, *ranges[n])

    futures = []
    if len(ranges) > 1 and THREADS > 1:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, THREADS - 1), thread_name_prefix="umm-kernel")
        futures = [_pool.submit(work) for _ in range(min(THREADS, len(ranges)) - 1)]
    work()
    for future in futures:
        future.result()


def magnitude_statistics(
    stack: TensorStack, ranks: Sequence[Sequence[int]]
) -> list[dict[int, OrderStatistic]]:
    """Per model (stack.others order), the statistics of |delta| at the wanted ascending ranks."""
    models = np.asarray(stack.others, dtype=np.int64)
    count = len(models)
    high = np.zeros((count, kernels.HIGH_BINS), dtype=np.int64)
    for _, _, raw in stack.blocks():
        inputs = KernelInputs(raw)
        parts = split(inputs.size, THREADS)
        partial = np.zeros((len(parts), count, kernels.HIGH_BINS), dtype=np.int64)
        run_parallel(
            lambda n, s, e, inputs=inputs, partial=partial: kernels.magnitude_histogram(
                inputs.packed, stack.base_index, models, s, e, partial[n]
            ),
            parts,
        )
        high += partial.sum(axis=0)
    cumulative = np.cumsum(high, axis=1)
    bins = np.full((count, 2), -1, dtype=np.int64)
    located: list[dict[int, tuple[int, int]]] = []  # per model: rank -> (slot, values in lower bins)
    for j in range(count):
        places = {}
        for rank in sorted(set(ranks[j])):
            b = int(np.searchsorted(cumulative[j], rank, side="right"))
            slots = [s for s in range(2) if bins[j, s] == b] or [s for s in range(2) if bins[j, s] < 0]
            bins[j, slots[0]] = b
            places[rank] = (slots[0], int(cumulative[j, b - 1]) if b > 0 else 0)
        located.append(places)
    low = np.zeros((count, 2, kernels.LOW_BINS), dtype=np.int64)
    if (bins >= 0).any():
        for _, _, raw in stack.blocks():
            inputs = KernelInputs(raw)
            parts = split(inputs.size, THREADS)
            partial = np.zeros((len(parts), count, 2, kernels.LOW_BINS), dtype=np.int64)
            run_parallel(
                lambda n, s, e, inputs=inputs, partial=partial: kernels.magnitude_refine(
                    inputs.packed, stack.base_index, models, bins, s, e, partial[n]
                ),
                parts,
            )
            low += partial.sum(axis=0)
    result = []
    for j, places in enumerate(located):
        stats = {}
        for rank, (slot, before) in places.items():
            low_cumulative = np.cumsum(low[j, slot])
            key = int(np.searchsorted(low_cumulative, rank - before, side="right"))
            less = before + (int(low_cumulative[key - 1]) if key > 0 else 0)
            bits = (int(bins[j, slot]) << 16) | key
            value = float(np.array([bits], dtype=np.uint32).view(np.float32)[0])
            stats[rank] = OrderStatistic(rank, value, less)
        result.append(stats)
    return result


def _wanted_ranks(n: int, bounds: list[tuple[int, int]]) -> list[list[int]]:
    wanted = []
    for lo, hi in bounds:
        lo, hi = max(0, lo), min(n, hi)
        wanted.append(([lo] if 0 < lo < hi else []) + ([hi - 1] if lo < hi < n else []))
    return wanted


def _pivots(stack: TensorStack, inputs: KernelInputs, wanted: list[list[int]]) -> np.ndarray:
    """Per model, up to `PIVOTS` sorted candidate values of |delta| around the wanted ranks.

    They are values of a sample of the first block (`SAMPLE_RUNS` evenly spaced runs of
    contiguous values, cheap to read), at the wanted quantiles and a few standard errors either
    side: with many equal magnitudes (bfloat16 inputs) the wanted value is usually one of them.
    """
    size = inputs.size
    if size > SAMPLE:
        run = SAMPLE // SAMPLE_RUNS
        starts = np.arange(SAMPLE_RUNS, dtype=np.int64) * ((size - run) // (SAMPLE_RUNS - 1))
        positions = (starts[:, None] + np.arange(run, dtype=np.int64)).reshape(-1)
    else:
        positions = np.arange(size, dtype=np.int64)
    models = np.asarray(stack.others, dtype=np.int64)
    samples = np.empty((len(models), positions.size), dtype=np.float32)
    kernels.sample_magnitudes(inputs.packed, stack.base_index, models, positions, samples)
    count = positions.size
    samples.sort(axis=1)  # one vectorized sort of every row beats a multi-rank partition per row
    pivots = np.full((len(wanted), PIVOTS), np.nan, dtype=np.float32)
    for j, ranks in enumerate(wanted):
        places = set()
        for rank in ranks:
            fraction = rank / stack.numel
            spread = math.sqrt(count * fraction * (1.0 - fraction)) + 1.0
            for step in PIVOT_STEPS:
                places.add(min(count - 1, max(0, round(fraction * count + step * spread))))
        if not places:
            continue
        chosen = samples[j][sorted(places)]
        values = sorted({float(v) for v in chosen if not math.isnan(v)})  # NaN: left to the radix path
        pivots[j, : len(values[:PIVOTS])] = values[:PIVOTS]
    return pivots


def _pivot_pass(stack: TensorStack, wanted: list[list[int]]):
    """Counts below and up to each pivot per (block, range); None when the tensor has no block."""
    models = np.asarray(stack.others, dtype=np.int64)
    pivots = None
    below_parts, upto_parts = [], []
    for _, _, raw in stack.blocks():
        inputs = KernelInputs(raw)
        if pivots is None:
            pivots = _pivots(stack, inputs, wanted)
            counts = np.count_nonzero(~np.isnan(pivots), axis=1).astype(np.int64)
        parts = block_ranges(inputs.size)
        below = np.zeros((len(parts), *pivots.shape), dtype=np.int64)
        upto = np.zeros_like(below)
        run_parallel(
            lambda n, s, e, inputs=inputs, below=below, upto=upto, pivots=pivots, counts=counts: (
                kernels.pivot_counts(
                    inputs.packed, stack.base_index, models, pivots, counts, s, e, below[n], upto[n]
                )
            ),
            parts,
        )
        below_parts.extend(below)
        upto_parts.extend(upto)
    return pivots, np.asarray(below_parts), np.asarray(upto_parts)


def _from_pivots(stack: TensorStack, wanted: list[list[int]]):
    """(statistics per model, equal counts per range and model for each statistic) or None on a miss."""
    pivots, below, upto = _pivot_pass(stack, wanted)
    below_total, upto_total = below.sum(axis=0), upto.sum(axis=0)
    result, equal = [], []
    for j, ranks in enumerate(wanted):
        stats, counts = {}, {}
        for rank in ranks:
            hits = [p for p in range(PIVOTS) if below_total[j, p] <= rank < upto_total[j, p]]
            if not hits:
                return None
            p = hits[0]  # pivots are distinct, so at most one holds the rank
            stats[rank] = OrderStatistic(rank, float(pivots[j, p]), int(below_total[j, p]))
            counts[rank] = upto[:, j, p] - below[:, j, p]
        result.append(stats)
        equal.append(counts)
    return result, equal, below.shape[0]


def magnitude_windows(
    stack: TensorStack, densities: list[float], gammas: list[float] | None
) -> tuple[list[RankWindow], list[np.ndarray] | None]:
    """Per model, the surviving ascending |delta| ranks: top `density` (TIES) or the breadcrumbs window.

    Also, when known from the statistics pass, the tie state (`_Plan.seen`) at the start of each
    (block, range) in order; else None.
    """
    n = stack.numel
    bounds = []
    for j, density in enumerate(densities):
        keep = int(density * n)
        if gammas is None:
            bounds.append((n - keep, n))
            continue
        top = int(gammas[j] * n)
        bottom = n - keep - top
        if bottom < 0:
            top, bottom = top + bottom, 0
        bounds.append((bottom, n - top))
    wanted = _wanted_ranks(n, bounds)
    if not any(wanted):
        return [window_from_ranks(n, lo, hi, {}) for lo, hi in bounds], None
    found = _from_pivots(stack, wanted)
    if found is None:
        stats = magnitude_statistics(stack, wanted)
        return [window_from_ranks(n, lo, hi, stats[j]) for j, (lo, hi) in enumerate(bounds)], None
    stats, equal, parts = found
    windows = [window_from_ranks(n, lo, hi, stats[j]) for j, (lo, hi) in enumerate(bounds)]
    seen = np.zeros((parts + 1, len(bounds), 2), dtype=np.int64)
    for j, window in enumerate(windows):
        for side, stat in enumerate((window.low, window.high)):
            if stat is not None:
                seen[1:, j, side] = np.cumsum(equal[j][stat.rank])
    return windows, list(seen[:-1])


class _Plan:
    """The per-model arrays `kernels.merge_range` reads, and the window tie state across blocks."""

    def __init__(self, count: int) -> None:
        self.modes = np.full(count, kernels.KEEP, dtype=np.int64)
        self.bounds = np.zeros((count, 2), dtype=np.float32)
        self.has_bounds = np.zeros((count, 2), dtype=np.bool_)
        self.seen = np.zeros((count, 2), dtype=np.int64)
        self.quota = np.zeros((count, 2), dtype=np.int64)
        self.densities = np.ones(count, dtype=np.float32)

    def window(self, j: int, window: RankWindow) -> None:
        if window.lo >= window.hi:
            self.modes[j] = kernels.ZERO  # an empty mask, then rescale: the same bytes as times 0.0
            return
        self.modes[j] = kernels.WINDOW
        if window.low is not None:
            self.bounds[j, 0] = window.low.value
            self.has_bounds[j, 0] = True
            self.quota[j, 0] = window.lo - window.low.less  # equal values of lower rank are dropped
        if window.high is not None:
            self.bounds[j, 1] = window.high.value
            self.has_bounds[j, 1] = True
            self.quota[j, 1] = window.hi - window.high.less  # equal values of this rank on are dropped

    def counting(self) -> np.ndarray:
        """[model, side]: whether the tie state of a window bound still decides a drop."""
        return (self.modes[:, None] == kernels.WINDOW) & self.has_bounds & (self.seen < self.quota)


def fused_task_arithmetic(
    stack: TensorStack, params: TensorParameters, seed: int, sparsify: str | None, consensus: bool
) -> Iterator[torch.Tensor]:
    """`merging.operators.generalized_task_arithmetic` for `sparsify` in `FUSED_SPARSIFY`, fused."""
    others, base = stack.others, stack.base_index
    values = [params.models[stack.inputs[i]] for i in others]
    glob = params.globals
    count = len(others)
    plan = _Plan(count)
    windows: list[RankWindow] | None = None
    tie_states: list[np.ndarray] | None = None
    if sparsify in ("magnitude", "outliers") and any(v["density"] < 1.0 for v in values):
        gammas = [v["gamma"] for v in values] if sparsify == "outliers" else None
        windows, tie_states = magnitude_windows(stack, [v["density"] for v in values], gammas)
    for j, v in enumerate(values):
        density = v.get("density", 1.0)
        if sparsify is None or density >= 1.0:
            continue
        plan.densities[j] = density
        if density <= 0.0:
            plan.modes[j] = kernels.ZERO
        elif sparsify == "random":
            plan.modes[j] = kernels.RANDOM
        else:
            plan.window(j, windows[j])
    models = np.asarray(others, dtype=np.int64)
    weights = np.asarray([v["weight"] for v in values], dtype=np.float32)
    keys = np.asarray([stream_key(seed, stack.tensor, j) for j in range(count)], dtype=np.uint64)
    plain_divisor = math.fsum(v["weight"] for v in values)
    plain_divisor = 1.0 if abs(plain_divisor) < 1e-8 else plain_divisor
    rescale = bool(glob.get("rescale", False))
    to_bfloat16 = stack.output_dtype == torch.bfloat16  # converted here, checked for NaN and inf first
    part_number = 0
    for start, end, raw in stack.blocks():
        inputs = KernelInputs(raw)
        size = inputs.size
        parts = block_ranges(size)
        if tie_states is not None:
            starts = [tie_states[part_number + n].copy() for n in range(len(parts))]
        else:
            starts = _range_tie_states(plan, inputs, base, models, parts)
        part_number += len(parts)
        out = _BlockOutput(size, len(parts), to_bfloat16)
        offset = start * stack.width

        def task(
            n: int,
            s: int,
            e: int,
            inputs=inputs,
            starts=starts,
            offset=offset,
            out=out,
        ) -> None:
            out.non_finite[n] = kernels.merge_range(
                inputs.packed,
                base,
                models,
                plan.modes,
                plan.bounds,
                plan.has_bounds,
                starts[n],
                plan.quota,
                plan.densities,
                rescale,
                weights,
                keys,
                offset,
                s,
                e,
                consensus,
                bool(glob["normalize"]),
                np.float32(plain_divisor),
                np.float32(glob["lambda"]),
                glob["lambda"] != 1.0,  # x * 1.0 == x, so skipping it changes no bit
                out.values,
                out.bfloat16,  # bfloat16 output: converted and checked for NaN/inf in the same loop
            )

        run_parallel(task, parts)
        if parts:
            plan.seen = starts[-1]
        yield out.rows(stack, end - start)


def fused_linear(
    stack: TensorStack, members: list[int], weights: list[float], normalize: bool, total: float
) -> Iterator[torch.Tensor]:
    """`merging.operators.linear` over the stored inputs, one compiled pass per block."""
    member_array = np.asarray(members, dtype=np.int64)
    weight_array = np.asarray(weights, dtype=np.float32)
    to_bfloat16 = stack.output_dtype == torch.bfloat16
    for start, end, raw in stack.blocks():
        inputs = KernelInputs(raw)
        size = inputs.size
        parts = block_ranges(size)
        out = _BlockOutput(size, len(parts), to_bfloat16)

        def task(n: int, s: int, e: int, inputs=inputs, out=out) -> None:
            divisor = np.float32(total)
            out.non_finite[n] = kernels.weighted_sum_range(
                inputs.packed, member_array, weight_array, normalize, divisor, s, e, out.values, out.bfloat16
            )

        run_parallel(task, parts)
        yield out.rows(stack, end - start)


class _BlockOutput:
    """One block's kernel output: float32 `values`, or `bfloat16` bit patterns with the count of
    NaN/inf float32 results per range (the unused array is empty, which tells the kernel)."""

    def __init__(self, size: int, ranges: int, to_bfloat16: bool) -> None:
        self.values = np.empty(0 if to_bfloat16 else size, dtype=np.float32)
        self.bfloat16 = np.empty(size if to_bfloat16 else 0, dtype=np.uint16)
        self.non_finite = np.zeros(ranges, dtype=np.int64)

    def rows(self, stack: TensorStack, rows: int) -> torch.Tensor:
        """The block as `[rows, width]`; a bfloat16 block only once checked for NaN and inf."""
        if not len(self.bfloat16):
            return torch.from_numpy(self.values).view(rows, stack.width)
        if self.non_finite.any():
            raise stack.non_finite_output()
        return torch.from_numpy(self.bfloat16).view(torch.bfloat16).view(rows, stack.width)


def _range_tie_states(
    plan: _Plan, inputs: KernelInputs, base: int, models: np.ndarray, parts: list[tuple[int, int]]
) -> list[np.ndarray]:
    """The window tie state at the start of each range: the block's, plus equal values in earlier ranges."""
    active = plan.counting()
    if len(parts) <= 1 or not active.any():
        return [plan.seen.copy() for _ in parts]
    counts = np.zeros((len(parts) - 1, *plan.seen.shape), dtype=np.int64)
    run_parallel(
        lambda n, s, e: kernels.count_equal(
            inputs.packed, base, models, active, plan.bounds, s, e, counts[n]
        ),
        parts[:-1],
    )
    starts = [plan.seen.copy()]
    for n in range(len(parts) - 1):
        starts.append(starts[-1] + counts[n])
    return starts
