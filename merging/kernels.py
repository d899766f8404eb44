"""Compiled per-element kernels of the task-arithmetic family (numba, no fast-math).

One call handles a contiguous flat range of one row block: every input is decoded (bfloat16 bit
patterns or float32), each model's task vector is computed, sparsified, weighted, then elected and
summed, in tiles of `TILE` values that stay in the L1 cache. The float32 operations and their
order are exactly those of the plain torch formulation in `merging.operators` (no reassociation,
no fused multiply-add: `fastmath=False`), so the bytes do not depend on the CPU, the tile, the
range split or the number of threads. The kernels release the GIL; `merging.fused` runs ranges
of a block on several threads.

Random dropping uses a counter-based generator: the keep draw of flat element `g` of a model's
task vector is output `g` of SplitMix64 seeded with that model's 64-bit key (see
`merging.fused.stream_key`), its top 24 bits as a float32 in [0, 1).

Inputs arrive as one tuple `(addresses, size, kind)`: the start address of each input's `size`
values, all of the dtype of the empty array `kind` (uint16 bfloat16 patterns or float32); the
caller keeps the arrays alive for the call (`merging.fused.KernelInputs`). A tuple of fixed types,
unlike a numba typed list, needs no per-process compilation, and the kernels' disk cache covers any
number of inputs.
"""

from __future__ import annotations

import sys

import numba
import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core.codegen import get_host_cpu_features
from numba.extending import intrinsic, overload


def _prefer_full_vector_width() -> None:
    """Let LLVM use the CPU's whole vector width: on AVX-512 CPUs it keeps to 256 bits by default.

    Set before the first compilation of the process (else it has no effect); the kernels are
    element-wise in a fixed order, so the width changes their speed, never their bytes. The disk
    cache keys compiled code by these features.
    """
    if numba.config.CPU_FEATURES is None and numba.config.CPU_NAME is None:
        features = get_host_cpu_features()
        if "+avx512f" in features.split(","):
            numba.config.CPU_FEATURES = features + ",-prefer-256-bit"


def _load_array_registry_without_blas_probe() -> None:
    """Import numba's array-function registry with its BLAS probe answered "none".

    numba loads that registry on a process's first kernel call, and the probe imports scipy.linalg
    (about 0.4 CPU-s of a merge). The kernels call no BLAS; without the probe numba's
    `np.cov`-style inner products use a plain loop, and `np.dot` and `np.linalg` still import
    scipy when they compile. Skipped when scipy.linalg is already loaded (the probe is then free).
    """
    probe = "scipy.linalg.cython_blas"
    if "scipy.linalg" in sys.modules or "numba.np.arraymath" in sys.modules:
        return
    sys.modules[probe] = None  # `import` raises ImportError without loading scipy.linalg
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        del sys.modules[probe]


_prefer_full_vector_width()
_load_array_registry_without_blas_probe()

TILE = 512
HIGH_BINS = 1 << 15  # bits 16..30 of a non-negative float32
LOW_BINS = 1 << 16

# per-model sparsification modes
KEEP = 0  # the task vector as is
ZERO = 1  # every entry times 0.0
WINDOW = 2  # entries whose |delta| rank lies in a window (magnitude / outliers); then rescale
RANDOM = 3  # entries whose draw is below the density; then rescale

# where a tile lies against the rank at which a window bound's equal values change from dropped
# to kept (low bound) or from kept to dropped (high bound)
UNBOUNDED = 0
BEFORE = 1  # the tile's equal values all precede it
AFTER = 2  # they all follow it
ACROSS = 3  # it may fall inside the tile

GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
U30 = np.uint64(30)
U27 = np.uint64(27)
U31 = np.uint64(31)
U40 = np.uint64(40)
ONE = np.uint64(1)
INV_2_24 = np.float32(1.0 / (1 << 24))
U16 = np.uint32(16)
LOW_MASK = np.uint32(0xFFFF)
ONE32 = np.uint32(1)
BIAS = np.uint32(0x7FFF)


@intrinsic
def as_float32(typingctx, bits):
    """The float32 whose bit pattern is the uint32 `bits`."""
    signature = types.float32(types.uint32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return signature, codegen


@intrinsic
def as_uint32(typingctx, value):
    """The bit pattern of the float32 `value`."""
    signature = types.uint32(types.float32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return signature, codegen


@intrinsic
def pointer_to(typingctx, address, kind):
    """The integer `address` as a pointer to elements of the array `kind`'s dtype."""
    signature = types.CPointer(kind.dtype)(address, kind)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


@njit(cache=True, inline="always")
def row(matrix, j):
    """Row `j` of a C-contiguous 2-D array as a view that holds no reference (the caller keeps
    `matrix` alive): a counted view costs two atomic operations each time a tile takes it."""
    return carray(pointer_to(matrix.ctypes.data + j * matrix.strides[0], matrix), matrix.shape[1])


@njit(cache=True, inline="always")
def source(inputs, i):
    """Input `i` of the `(addresses, size, kind)` tuple as a 1-D C-contiguous array."""
    addresses, size, kind = inputs
    return carray(pointer_to(addresses[i], kind), size)


def value_at(tile, t):
    """Element `t` of an input slice as float32 (bfloat16 bit patterns are widened exactly)."""


@overload(value_at, inline="always")
def _value_at(tile, t):
    if tile.dtype == types.uint16:
        return lambda tile, t: as_float32(np.uint32(tile[t]) << U16)
    return lambda tile, t: tile[t]


@njit(cache=True, inline="always")
def decode(source, start, count, values):
    """Write `count` values of `source` from `start` as float32 into `values`."""
    tile = source[start : start + count]  # a slice: plain indices vectorize (start + t would gather)
    for t in range(count):
        values[t] = value_at(tile, t)


@njit(cache=True, inline="always")
def splitmix64(key, index):
    """Output `index` (0-based) of SplitMix64 seeded with `key` (all arithmetic mod 2**64)."""
    z = key + (np.uint64(index) + ONE) * GOLDEN_GAMMA
    z = (z ^ (z >> U30)) * MIX1
    z = (z ^ (z >> U27)) * MIX2
    return z ^ (z >> U31)


@njit(cache=True, inline="always")
def _magnitudes(source, start, count, base_values, out):
    """|x - base| of one tile of one input into `out`."""
    tile = source[start : start + count]
    for t in range(count):
        out[t] = abs(value_at(tile, t) - base_values[t])


@njit(cache=True, nogil=True)
def magnitude_histogram(inputs, base, models, start, end, hist):
    """Add the high 15 bits of each |delta| bit pattern of `models` over `[start, end)` to `hist[j]`."""
    base_values = np.empty(TILE, dtype=np.float32)
    magnitude = np.empty(TILE, dtype=np.float32)
    magnitude_bits = magnitude.view(np.uint32)
    for tile in range(start, end, TILE):
        count = min(TILE, end - tile)
        decode(source(inputs, base), tile, count, base_values)
        for j in range(len(models)):
            row = hist[j]
            _magnitudes(source(inputs, models[j]), tile, count, base_values, magnitude)
            for t in range(count):
                row[magnitude_bits[t] >> U16] += 1


@njit(cache=True, nogil=True)
def magnitude_refine(inputs, base, models, bins, start, end, hist):
    """For each model j and wanted high bin `bins[j, r]` (-1: none), count the low 16 bits inside it."""
    base_values = np.empty(TILE, dtype=np.float32)
    magnitude = np.empty(TILE, dtype=np.float32)
    magnitude_bits = magnitude.view(np.uint32)
    for tile in range(start, end, TILE):
        count = min(TILE, end - tile)
        decode(source(inputs, base), tile, count, base_values)
        for j in range(len(models)):
            first, second = bins[j, 0], bins[j, 1]
            if first < 0 and second < 0:
                continue
            _magnitudes(source(inputs, models[j]), tile, count, base_values, magnitude)
            for t in range(count):
                high = np.int64(magnitude_bits[t] >> U16)
                if high == first:
                    hist[j, 0, magnitude_bits[t] & LOW_MASK] += 1
                elif high == second:
                    hist[j, 1, magnitude_bits[t] & LOW_MASK] += 1


@njit(cache=True, nogil=True)
def sample_magnitudes(inputs, base, models, positions, out):
    """out[j, i] = |delta| of model j at flat position `positions[i]`."""
    base_values = source(inputs, base)
    for j in range(len(models)):
        values = source(inputs, models[j])
        row = out[j]
        for i in range(len(positions)):
            row[i] = abs(value_at(values, positions[i]) - value_at(base_values, positions[i]))


@njit(cache=True, nogil=True)
def pivot_counts(inputs, base, models, pivots, counts, start, end, below, upto):
    """below/upto[j, p] += how many |delta| of model j over `[start, end)` are < / <= `pivots[j, p]`.

    Only the first `counts[j]` pivots of model j are used.
    """
    base_values = np.empty(TILE, dtype=np.float32)
    magnitude = np.empty(TILE, dtype=np.float32)
    for tile in range(start, end, TILE):
        count = min(TILE, end - tile)
        decode(source(inputs, base), tile, count, base_values)
        for j in range(len(models)):
            if counts[j] == 0:
                continue
            _magnitudes(source(inputs, models[j]), tile, count, base_values, magnitude)
            for p in range(counts[j]):
                pivot = pivots[j, p]
                less = np.int32(0)  # a tile's counts fit 32 bits; kept int32 (numba widens a += to int64)
                at_most = np.int32(0)
                for t in range(count):
                    less = np.int32(less + np.int32(magnitude[t] < pivot))
                    at_most = np.int32(at_most + np.int32(magnitude[t] <= pivot))
                below[j, p] += less
                upto[j, p] += at_most


@njit(cache=True, nogil=True)
def count_equal(inputs, base, models, active, values, start, end, counts):
    """counts[j, s] += how many |delta| of model j over `[start, end)` equal `values[j, s]` (if `active`)."""
    base_values = np.empty(TILE, dtype=np.float32)
    for tile in range(start, end, TILE):
        count = min(TILE, end - tile)
        decode(source(inputs, base), tile, count, base_values)
        for j in range(len(models)):
            x = source(inputs, models[j])[tile : tile + count]
            for side in range(2):
                if active[j, side]:
                    counts[j, side] += _equal_magnitudes(x, count, base_values, values[j, side])


@njit(cache=True, inline="always")
def _draw(key, index):
    """Draw `index` of the stream `key`: the top 24 bits of SplitMix64 output `index`, in [0, 1)."""
    return np.float32(splitmix64(key, index) >> U40) * INV_2_24


@njit(cache=True, inline="always")
def _sparsified(delta, kept, density, rescale, weight):
    """(delta * kept [/ density]) * weight, each step rounded to float32 as torch does."""
    value = delta * kept
    if rescale:
        value = value / density
    return value * weight


@njit(cache=True, inline="always")
def _dropped(x, t, base_values, weight):
    """A dropped entry: (delta * 0.0) * weight. Dividing that (a signed zero or NaN) by a positive
    density changes no bit, so this is also the rescaled value."""
    return ((value_at(x, t) - base_values[t]) * np.float32(0.0)) * weight


@njit(cache=True, inline="always")
def _drop_all_equal(x, count, base_values, value, weight, out):
    for t in range(count):
        equal = abs(value_at(x, t) - base_values[t]) == value
        out[t] = _dropped(x, t, base_values, weight) if equal else out[t]


@njit(cache=True, inline="always")
def _equal_magnitudes(x, count, base_values, value):
    """How many |x - base| of one tile equal `value`."""
    equal = np.int32(0)
    for t in range(count):
        equal = np.int32(equal + np.int32(abs(value_at(x, t) - base_values[t]) == value))
    return np.int64(equal)


@njit(cache=True, inline="always")
def _window_pass(x, count, base_values, bounds, bounded_above, density, rescale, weight, counted, out):
    """Entries with bounds[0] <= |delta| (and <= bounds[1] when `bounded_above`; else that is
    +inf) kept. When `counted` is given, returns how many |delta| equal `counted[0]` and
    `counted[1]` (else zeros)."""
    one, zero = np.float32(1.0), np.float32(0.0)
    low, high = bounds
    equal_low = np.int32(0)
    equal_high = np.int32(0)
    for t in range(count):
        delta = value_at(x, t) - base_values[t]
        size = abs(delta)
        inside = ((size >= low) & (size <= high)) if bounded_above else size >= low
        kept = one if inside else zero
        out[t] = _sparsified(delta, kept, density, rescale, weight)
        if counted is not None:
            equal_low = np.int32(equal_low + np.int32(size == counted[0]))
            equal_high = np.int32(equal_high + np.int32(size == counted[1]))
    return np.int64(equal_low), np.int64(equal_high)


@njit(cache=True, inline="always")
def _flagged_window_pass(
    x, count, base_values, bounds, bounded_above, density, rescale, weight, counted, out
):
    """`_window_pass` with constant flags in each copy of the loop: a branch inside would not vectorize."""
    if rescale and bounded_above:
        return _window_pass(x, count, base_values, bounds, True, density, True, weight, counted, out)
    if rescale:
        return _window_pass(x, count, base_values, bounds, False, density, True, weight, counted, out)
    if bounded_above:
        return _window_pass(x, count, base_values, bounds, True, density, False, weight, counted, out)
    return _window_pass(x, count, base_values, bounds, False, density, False, weight, counted, out)


@njit(cache=True, inline="always")
def _random_pass(x, count, base_values, key, first, density, rescale, weight, out):
    one, zero = np.float32(1.0), np.float32(0.0)
    for t in range(count):
        kept = one if _draw(key, first + t) < density else zero
        out[t] = _sparsified(value_at(x, t) - base_values[t], kept, density, rescale, weight)


@njit(cache=True, inline="always")
def _window(x, count, base_values, density, rescale, weight, bounds, has_bounds, seen, quota, out):
    """Keep the entries whose |delta| rank lies in a window (ties broken in flat order).

    `seen[0|1]` counts the values equal to the low/high bound before this tile (updated); equal
    values of rank below `quota[0]` (low) or at or above `quota[1]` (high) among them are dropped.
    Where that drops all or none of a tile's equal values, the pass's bound is made strict or
    kept inclusive; only a tile holding the rank where it changes is handled value by value.
    A NaN fails both bounds and is dropped: NaN * 0.0 is NaN, as NaN * 1.0 is.
    """
    inf = np.float32(np.inf)
    low = bounds[0] if has_bounds[0] else -inf
    high = bounds[1] if has_bounds[1] else inf
    pass_low, pass_high = low, high
    low_state = _tie_state(has_bounds[0], seen[0], quota[0], count)
    high_state = _tie_state(has_bounds[1], seen[1], quota[1], count)
    if low_state == BEFORE:  # every value equal to low is dropped: low < |delta|
        pass_low = np.nextafter(low, inf)
    if high_state == AFTER:  # every value equal to high is dropped: |delta| < high
        pass_high = np.nextafter(high, -inf)
    bounds_used = (pass_low, pass_high)
    counted = (low, high)
    counting = low_state == BEFORE or high_state == BEFORE
    if counting:
        equal = _flagged_window_pass(
            x, count, base_values, bounds_used, has_bounds[1], density, rescale, weight, counted, out
        )
        if low_state == BEFORE:
            seen[0] += equal[0]
        if high_state == BEFORE:
            seen[1] += equal[1]
    else:
        _flagged_window_pass(
            x, count, base_values, bounds_used, has_bounds[1], density, rescale, weight, None, out
        )
    if low_state == ACROSS:
        equal = _equal_magnitudes(x, count, base_values, low)
        if seen[0] + equal <= quota[0]:  # every equal value in this tile is dropped
            _drop_all_equal(x, count, base_values, low, weight, out)
            seen[0] += equal
        else:
            for t in range(count):
                if abs(value_at(x, t) - base_values[t]) == low:
                    if seen[0] < quota[0]:
                        out[t] = _dropped(x, t, base_values, weight)
                    seen[0] += 1
    if high_state == ACROSS:
        equal = _equal_magnitudes(x, count, base_values, high)
        if seen[1] + equal <= quota[1]:  # none in this tile is dropped
            seen[1] += equal
        else:
            for t in range(count):
                if abs(value_at(x, t) - base_values[t]) == high:
                    if seen[1] >= quota[1]:
                        out[t] = _dropped(x, t, base_values, weight)
                    seen[1] += 1


@njit(cache=True, inline="always")
def _tie_state(bounded, seen, quota, count):
    """Where a tile of `count` values lies against the rank `quota` of the equal values."""
    if not bounded:
        return UNBOUNDED
    if seen >= quota:
        return AFTER
    if seen + count <= quota:
        return BEFORE
    return ACROSS


@njit(cache=True, inline="always")
def _task_vector(x, count, base_values, mode, density, rescale, weight, key, first, window, out):
    """One model's weighted, sparsified task vector over one tile into `out` (see `merge_range`)."""
    zero = np.float32(0.0)
    if mode == KEEP:
        for t in range(count):
            out[t] = (value_at(x, t) - base_values[t]) * weight
    elif mode == ZERO:
        for t in range(count):
            out[t] = ((value_at(x, t) - base_values[t]) * zero) * weight
    elif mode == RANDOM and rescale:  # constant flags: see `_window`
        _random_pass(x, count, base_values, key, first, density, True, weight, out)
    elif mode == RANDOM:
        _random_pass(x, count, base_values, key, first, density, False, weight, out)
    else:
        bounds, has_bounds, seen, quota = window
        _window(x, count, base_values, density, rescale, weight, bounds, has_bounds, seen, quota, out)


@njit(cache=True, inline="always")
def _add_rows(total, rows, count):
    """total[t] = (total[t] + rows[1][t]) + rows[2][t] ... in row order, four rows per pass."""
    j = 1
    while j + 4 <= rows.shape[0]:
        a, b, c, d = row(rows, j), row(rows, j + 1), row(rows, j + 2), row(rows, j + 3)
        for t in range(count):
            total[t] = (((total[t] + a[t]) + b[t]) + c[t]) + d[t]
        j += 4
    while j < rows.shape[0]:
        a = row(rows, j)
        for t in range(count):
            total[t] = total[t] + a[t]
        j += 1


@njit(cache=True, inline="always")
def _agree(term, sign):
    """1.0 where the entry's sign is the elected one (a zero agrees with neither), else 0.0."""
    return np.float32(1.0) if term * sign > np.float32(0.0) else np.float32(0.0)


@njit(cache=True, inline="always")
def _elect(rows, weights, sign, count, mixed, divisor):
    """TIES's disjoint sum: mixed = sum of the rows' agreeing entries, divisor = sum of their
    weights, in row order; `mixed` holds row 0 on entry. Four rows per pass."""
    weight = weights[0]
    for t in range(count):
        agree = _agree(mixed[t], sign[t])
        divisor[t] = agree * weight
        mixed[t] = mixed[t] * agree
    j = 1
    while j + 4 <= rows.shape[0]:
        a, b, c, d = row(rows, j), row(rows, j + 1), row(rows, j + 2), row(rows, j + 3)
        wa, wb, wc, wd = weights[j], weights[j + 1], weights[j + 2], weights[j + 3]
        for t in range(count):
            s = sign[t]
            ga, gb, gc, gd = _agree(a[t], s), _agree(b[t], s), _agree(c[t], s), _agree(d[t], s)
            mixed[t] = (((mixed[t] + a[t] * ga) + b[t] * gb) + c[t] * gc) + d[t] * gd
            divisor[t] = (((divisor[t] + ga * wa) + gb * wb) + gc * wc) + gd * wd
        j += 4
    while j < rows.shape[0]:
        a, wa = row(rows, j), weights[j]
        for t in range(count):
            ga = _agree(a[t], sign[t])
            mixed[t] = mixed[t] + a[t] * ga
            divisor[t] = divisor[t] + ga * wa
        j += 1


@njit(cache=True, nogil=True)
def merge_range(
    inputs,
    base,
    models,
    modes,
    bounds,
    has_bounds,
    seen,
    quota,
    densities,
    rescale,
    weights,
    keys,
    offset,
    start,
    end,
    consensus,
    normalize,
    plain_divisor,
    scale,
    apply_scale,
    out,
    out16,
):
    """Merged float32 values of the block positions `[start, end)` into `out[start:end]`.

    Per model j (input `models[j]`): delta = x - base; by `modes[j]` keep, zero, window-mask
    (`bounds[j]`, `has_bounds[j]`, tie state `seen[j]` (updated) / `quota[j]`) or random-mask
    (draw of flat index `offset + position` of stream `keys[j]` below `densities[j]`); masked
    deltas are divided by the density when `rescale`; times `weights[j]`. Then the TIES sign
    election (`consensus`) or a plain sum, divided by the elected weight sum or `plain_divisor`
    when `normalize`, times `scale` when `apply_scale`, plus base. Each step rounds to float32
    as the torch formulation does, in the same order. The result goes to `out16` as bfloat16 if
    that is not empty (returning how many float32 results were NaN or infinite), else to `out`.
    """
    non_finite = np.int64(0)
    k = len(models)
    base_values = np.empty(TILE, dtype=np.float32)
    weighted = np.empty((k, TILE), dtype=np.float32)
    mixed = np.empty(TILE, dtype=np.float32)
    divisor = np.empty(TILE, dtype=np.float32)
    sign = np.empty(TILE, dtype=np.float32)
    one, zero = np.float32(1.0), np.float32(0.0)
    for tile in range(start, end, TILE):
        count = min(TILE, end - tile)
        decode(source(inputs, base), tile, count, base_values)
        for j in range(k):
            x = source(inputs, models[j])[tile : tile + count]
            window = (row(bounds, j), row(has_bounds, j), row(seen, j), row(quota, j))
            _task_vector(
                x,
                count,
                base_values,
                modes[j],
                densities[j],
                rescale,
                weights[j],
                keys[j],
                offset + tile,
                window,
                row(weighted, j),
            )
        first = row(weighted, 0)
        for t in range(count):
            mixed[t] = first[t]
        if consensus:
            for t in range(count):
                sign[t] = first[t]
            _add_rows(sign, weighted, count)
            for t in range(count):
                sign[t] = one if sign[t] >= zero else -one
            _elect(weighted, weights, sign, count, mixed, divisor)
            if normalize:
                for t in range(count):
                    d = divisor[t]
                    mixed[t] = mixed[t] / (d + (one if d == zero else zero))
        else:
            _add_rows(mixed, weighted, count)
            if normalize:
                for t in range(count):
                    mixed[t] = mixed[t] / plain_divisor
        if apply_scale:
            for t in range(count):
                mixed[t] = mixed[t] * scale
        if len(out16):
            non_finite += _store_bfloat16(mixed, base_values, count, out16[tile : tile + count])
        else:
            target = out[tile : tile + count]
            for t in range(count):
                target[t] = mixed[t] + base_values[t]
    return non_finite


@njit(cache=True, nogil=True)
def weighted_sum_range(inputs, members, weights, normalize, total, start, end, out, out16):
    """Linear merge of the block positions `[start, end)`: sum of `source(inputs, members[j]) * weights[j]`.

    Products and sums round to float32 in model order, then divide by `total` when `normalize`,
    as the plain torch formulation does. The result goes to `out16` as bfloat16 if that is not
    empty (returning how many float32 results were NaN or infinite), else to `out`.
    """
    non_finite = np.int64(0)
    mixed = np.empty(TILE, dtype=np.float32)
    identity = np.full(TILE, -0.0, dtype=np.float32)  # x + -0.0 == x for every x, -0.0 included
    for tile in range(start, end, TILE):
        count = min(TILE, end - tile)
        first, weight = source(inputs, members[0])[tile : tile + count], weights[0]
        for t in range(count):
            mixed[t] = value_at(first, t) * weight
        for j in range(1, len(members)):
            x, weight = source(inputs, members[j])[tile : tile + count], weights[j]
            for t in range(count):
                mixed[t] = mixed[t] + value_at(x, t) * weight
        if normalize:
            for t in range(count):
                mixed[t] = mixed[t] / total
        if len(out16):
            non_finite += _store_bfloat16(mixed, identity, count, out16[tile : tile + count])
        else:
            target = out[tile : tile + count]
            for t in range(count):
                target[t] = mixed[t]
    return non_finite


@njit(cache=True, inline="always")
def _bfloat16_bits(value):
    """Round to nearest even, as torch converts float32 to bfloat16 (NaN aside)."""
    word = as_uint32(value)
    return np.uint16((word + (((word >> U16) & ONE32) + BIAS)) >> U16)


@njit(cache=True, inline="always")
def _store_bfloat16(mixed, base_values, count, target):
    """target = bfloat16(mixed + base); returns how many of the float32 sums are NaN or infinite."""
    non_finite = np.int32(0)
    for t in range(count):
        value = mixed[t] + base_values[t]
        bad = (value - value) != np.float32(0.0)  # inf - inf and NaN - NaN are NaN
        non_finite = np.int32(non_finite + np.int32(bad))
        target[t] = _bfloat16_bits(value)
    return np.int64(non_finite)


@njit(cache=True, nogil=True)
def uniforms(key, first, count):
    """Draws `first .. first + count - 1` of one stream as float32 in [0, 1) (for tests and docs)."""
    out = np.empty(count, dtype=np.float32)
    for t in range(count):
        out[t] = _draw(key, first + t)
    return out
