"""The merge operators: one function per method over one output tensor's stack of inputs.

Each operator reads a `TensorStack` (base and models, float32 row blocks), makes any statistics
pass it needs over the whole tensor first, then yields the merged float32 rows block by block.
Sums over models run in the config's order with plain adds (no fused multiply-add), statistics in
float64 (see `merging.blocks`), so results are the same for any thread count or block size.
`linear` and the task-arithmetic family except DELLA run as compiled kernels (`merging.fused`; DARE's drops
come from a counter-based stream there); DELLA draws from one `torch.Generator` per (seed, tensor,
model position).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from merging.blocks import ExactSum, Scratch, TensorStack, fixed_order_sum, row_sums
from merging.errors import MergeError
from merging.fused import FUSED_SPARSIFY, fused_linear, fused_task_arithmetic, stream_key
from merging.methods import METHODS
from merging.parameters import TensorParameters
from merging.regmean import regmean_delta
from merging.select import WindowMasker, order_statistics, window_from_ranks, window_ranks
from merging.singular import TaskSingularBasis, task_singular_basis

Operator = Callable[[TensorStack, TensorParameters, int], Iterator[torch.Tensor]]
SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8


def generator_for(seed: int, tensor: str, position: int) -> torch.Generator:
    """DELLA's random stream of one model's task vector in one tensor, seeded by `stream_key`."""
    return torch.Generator().manual_seed(stream_key(seed, tensor, position) & ((1 << 63) - 1))


def linear(stack: TensorStack, params: TensorParameters, seed: int) -> Iterator[torch.Tensor]:
    """Weighted average of the models (model soups, https://arxiv.org/abs/2203.05482)."""
    members = [i for i in range(len(stack.inputs)) if stack.inputs[i] in params.models]
    weights = [params.models[stack.inputs[i]]["weight"] for i in members]
    total = math.fsum(weights)
    if params.globals["normalize"] and total == 0:
        raise MergeError(f"the weights of tensor {params.tensor!r} sum to zero, so they cannot be normalized")
    if stack.raw:
        yield from fused_linear(stack, members, weights, params.globals["normalize"], total)
        return
    for _, _, block in stack.blocks():
        merged = fixed_order_sum([block[i] * w for i, w in zip(members, weights, strict=True)])
        yield merged / total if params.globals["normalize"] else merged


def passthrough(stack: TensorStack, params: TensorParameters, seed: int) -> Iterator[torch.Tensor]:
    """The single input, multiplied by its `scale`."""
    scale = params.models[stack.inputs[0]]["scale"]
    for _, _, block in stack.blocks():
        yield block[0] * scale


def _della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probabilities: density - epsilon for a row's smallest |delta| up to density + epsilon."""
    rows, width = delta.shape
    order = torch.argsort(delta.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(width).expand(rows, width))
    spread = ranks.to(torch.float32) / (width - 1) if width > 1 else torch.zeros(rows, width)
    return (density - epsilon) + spread * (2 * epsilon)


def _della_sparsify(
    delta: torch.Tensor, values: dict, rescale: bool, generator: torch.Generator
) -> torch.Tensor:
    """DELLA's drop of entries of `delta` in place: keep probability by magnitude rank within each row."""
    density = values.get("density", 1.0)
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return delta.mul_(0.0)  # not zeros_like: a NaN must stay visible
    probabilities = _della_probabilities(delta, density, values["epsilon"])
    delta.mul_(torch.rand(delta.shape, generator=generator) < probabilities)
    return delta.div_(probabilities) if rescale else delta


def _elect(
    weighted: list[torch.Tensor], weights: list[float], scratch: Scratch
) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES sign election: keep each entry whose sign matches the sign of the sum (zero sum counts as +).

    Consumes `weighted` (scratch tensors; the first becomes the elected sum); returns the elected
    sum and the sum of elected weights. Every mask is float32 1.0/0.0 and every product by one
    is exact, so this gives the bytes of summing `delta * agree` and `agree * weight` in order.
    """
    rows, width = weighted[0].shape
    majority = scratch.get("majority", rows, width)
    if len(weighted) > 1:
        torch.add(weighted[0], weighted[1], out=majority)
        for term in weighted[2:]:
            majority.add_(term)
    else:
        majority.copy_(weighted[0])
    torch.ge(majority, 0, out=majority).mul_(2.0).sub_(1.0)  # +1 where the sum is >= 0, else -1
    agree = scratch.get("agree", rows, width)
    divisor = scratch.get("divisor", rows, width)
    mixed = weighted[0]
    for j, (delta, weight) in enumerate(zip(weighted, weights, strict=True)):
        torch.mul(delta, majority, out=agree)
        torch.gt(agree, 0, out=agree)
        # delta * agree and agree * weight are exact (agree is 1 or 0), so these fused forms round once,
        # as adding the separately computed products does
        if j == 0:
            mixed.mul_(agree)
            torch.mul(agree, weight, out=divisor)
        else:
            mixed.addcmul_(delta, agree)
            divisor.add_(agree, alpha=weight)
    # divisor == 0 -> 1: adding the 1.0/0.0 mask changes nothing else (x + 0 == x for x != 0)
    return mixed, divisor.add_(torch.eq(divisor, 0, out=agree))


def accumulate(terms: list[torch.Tensor], copy: bool = True) -> torch.Tensor:
    """Elementwise sum in the given order; with `copy=False` the first term is summed into in place."""
    total = terms[0].clone() if copy else terms[0]
    for term in terms[1:]:
        total.add_(term)
    return total


def generalized_task_arithmetic(
    stack: TensorStack, params: TensorParameters, seed: int, sparsify: str | None, consensus: bool
) -> Iterator[torch.Tensor]:
    """Task vectors -> sparsify -> optional sign election -> weighted sum, added to the base.

    Task arithmetic https://arxiv.org/abs/2212.04089, TIES https://arxiv.org/abs/2306.01708,
    DARE https://arxiv.org/abs/2311.03099, breadcrumbs https://arxiv.org/abs/2312.06795,
    DELLA https://arxiv.org/abs/2406.11617.
    """
    if stack.row_weights:
        yield from row_weighted_task_arithmetic(stack, params)
        return
    if sparsify in FUSED_SPARSIFY:
        yield from fused_task_arithmetic(stack, params, seed, sparsify, consensus)
        return
    others, base = stack.others, stack.base_index
    values = [params.models[stack.inputs[i]] for i in others]
    weights = [v["weight"] for v in values]
    glob = params.globals
    rescale = glob.get("rescale", False)
    with Scratch.lease() as scratch:
        generators = [generator_for(seed, stack.tensor, j) for j in range(len(others))]
        plain_divisor = math.fsum(weights)
        plain_divisor = 1.0 if abs(plain_divisor) < 1e-8 else plain_divisor
        for start, end, block in stack.blocks():
            rows = end - start
            weighted = []
            for j, i in enumerate(others):
                delta = torch.sub(block[i], block[base], out=scratch.get(("delta", j), rows, stack.width))
                delta = _della_sparsify(delta, values[j], rescale, generators[j])
                weighted.append(delta.mul_(weights[j]))
            if consensus:
                mixed, divisor = _elect(weighted, weights, scratch)
            else:
                mixed, divisor = accumulate(weighted, copy=False), plain_divisor
            if glob["normalize"]:
                mixed = mixed.div_(divisor)
            if glob["lambda"] != 1.0:  # x * 1.0 == x, so skipping it changes no bit
                mixed = mixed.mul_(glob["lambda"])
            yield torch.add(mixed, block[base])  # a fresh tensor: the scratch is reused next block


def row_weighted_task_arithmetic(stack: TensorStack, params: TensorParameters) -> Iterator[torch.Tensor]:
    """Task arithmetic where some models weigh each row of their task vector on its own
    (`merging.row_weights`): base + lambda * sum_j w_j * (model_j - base), with `w_j` a column of
    row weights or the model's scalar `weight`, divided by sum_j w_j (per row) if `normalize`."""
    others, base = stack.others, stack.base_index
    glob = params.globals
    for start, end, block in stack.blocks():
        weights = [_row_weight(stack, params, i, start, end) for i in others]
        deltas = [torch.sub(block[i], block[base]).mul_(w) for i, w in zip(others, weights, strict=True)]
        mixed = accumulate(deltas, copy=False)  # fresh tensors: the first one takes the sum
        if glob["normalize"]:
            total = accumulate(weights)  # a copy: the first column may be a view of the row weights
            mixed = mixed.div_(torch.where(total.abs() < 1e-8, torch.ones_like(total), total))
        if glob["lambda"] != 1.0:
            mixed = mixed.mul_(glob["lambda"])
        yield torch.add(mixed, block[base])


def _row_weight(stack: TensorStack, params: TensorParameters, i: int, start: int, end: int) -> torch.Tensor:
    """Input `i`'s weights of rows `[start, end)` as a float32 column (its scalar weight repeated if it
    has no row weights)."""
    rows = stack.row_weights[i]
    if rows is None:
        return torch.full((end - start, 1), params.models[stack.inputs[i]]["weight"], dtype=torch.float32)
    return rows[start:end, None]


def slerp(stack: TensorStack, params: TensorParameters, seed: int) -> Iterator[torch.Tensor]:
    """Spherical interpolation from the base (t=0) to the other model (t=1); lerp when near-colinear."""
    t = params.globals["t"]
    base, other = stack.base_index, stack.others[0]
    sums = [ExactSum(), ExactSum(), ExactSum()]
    for _, _, block in stack.blocks():
        v0, v1 = block[base].to(torch.float64), block[other].to(torch.float64)
        sums[0].add(v0 * v0)
        sums[1].add(v1 * v1)
        sums[2].add(v0 * v1)
    norm0, norm1 = math.sqrt(sums[0].value()), math.sqrt(sums[1].value())
    dot = sums[2].value() / ((norm0 if norm0 > SLERP_EPS else 1.0) * (norm1 if norm1 > SLERP_EPS else 1.0))
    if abs(dot) > SLERP_DOT_THRESHOLD:
        scale0, scale1 = 1.0 - t, t
    else:
        theta = math.acos(dot)
        scale0 = math.sin(theta - theta * t) / math.sin(theta)
        scale1 = math.sin(theta * t) / math.sin(theta)
    for _, _, block in stack.blocks():
        yield block[base] * scale0 + block[other] * scale1


def _stock_ratio(cosine: torch.Tensor | float, count: int):
    return (count * cosine) / (1 + (count - 1) * cosine)


def model_stock(stack: TensorStack, params: TensorParameters, seed: int) -> Iterator[torch.Tensor]:
    """Interpolate the base toward the models' mean by a ratio from their task vectors' mean pairwise cosine.

    https://arxiv.org/abs/2403.19522; with `filter_wise` the cosine is taken per row.
    """
    others, base = stack.others, stack.base_index
    count = len(others)
    pairs = [(a, b) for a in range(count) for b in range(a + 1, count)]
    ratio = None
    if not params.globals["filter_wise"]:
        norms = [ExactSum() for _ in others]
        dots = [ExactSum() for _ in pairs]
        for _, _, block in stack.blocks():
            offsets = [(block[i] - block[base]).to(torch.float64) for i in others]
            for j, offset in enumerate(offsets):
                norms[j].add(offset * offset)
            for p, (a, b) in enumerate(pairs):
                dots[p].add(offsets[a] * offsets[b])
        lengths = [math.sqrt(s.value()) for s in norms]
        cosines = [
            min(1.0, max(-1.0, dots[p].value() / max(lengths[a] * lengths[b], 1e-6)))
            for p, (a, b) in enumerate(pairs)
        ]
        ratio = _stock_ratio(math.fsum(cosines) / len(cosines), count)
    for _, _, block in stack.blocks():
        mean = fixed_order_sum([block[i] for i in others]) / count
        if ratio is None:
            offsets = [(block[i] - block[base]).to(torch.float64) for i in others]
            lengths = [torch.from_numpy(row_sums(o * o)).sqrt() for o in offsets]
            cosines = [
                (
                    torch.from_numpy(row_sums(offsets[a] * offsets[b]))
                    / (lengths[a] * lengths[b]).clamp(min=1e-6)
                ).clamp(-1, 1)
                for a, b in pairs
            ]
            row_ratio = _stock_ratio(fixed_order_sum(cosines) / len(cosines), count)
            row_ratio = row_ratio.to(torch.float32).unsqueeze(1)
            yield mean * row_ratio + block[base] * (1 - row_ratio)
        else:
            yield mean * ratio + block[base] * (1 - ratio)


def sce(stack: TensorStack, params: TensorParameters, seed: int) -> Iterator[torch.Tensor]:
    """Select top-variance positions, weight models by mean squared delta, erase minority signs.

    FuseChat, https://arxiv.org/abs/2408.07990.
    """
    others, base = stack.others, stack.base_index
    topk = params.globals["select_topk"]
    count = len(others)

    def deltas_of(block):
        return [block[i] - block[base] for i in others]

    def variance(deltas):
        mean = fixed_order_sum(deltas) / count
        return fixed_order_sum([(d - mean) * (d - mean) for d in deltas]) / count

    masker = None
    if topk < 1.0:
        n = stack.numel

        def blocks():
            for _, _, block in stack.blocks():
                yield [variance(deltas_of(block)).flatten()]

        bounds: list[tuple[int, int]] = []

        def ranks(_, total, zeros):
            keep = int(topk * (total - zeros))  # of the positions whose variance is not zero
            bounds.append((total - keep, total))
            return window_ranks(total, total - keep, total)

        stats = order_statistics(blocks, ranks, len(stack.ranges) == 1, count_zeros=True)
        masker = WindowMasker(window_from_ranks(n, *bounds[0], stats[0]))

    def selected(block, masker):
        deltas = deltas_of(block)
        if masker is None:
            return deltas
        keep = masker(variance(deltas).flatten()).view(block[base].shape)
        return [torch.where(keep, d, 0.0) for d in deltas]

    squares = [ExactSum() for _ in others]
    stat_masker = WindowMasker(masker.window) if masker is not None else None
    for _, _, block in stack.blocks():
        for j, d in enumerate(selected(block, stat_masker)):
            squares[j].add(d.to(torch.float64) * d.to(torch.float64))
    energy = [s.value() / stack.numel for s in squares]
    total = math.fsum(energy)
    weights = [1.0 / count] * count if total == 0 else [e / total for e in energy]
    for _, _, block in stack.blocks():
        deltas = selected(block, masker)
        positive = fixed_order_sum(deltas) >= 0
        mixed, divisor = [], []
        for d, w in zip(deltas, weights, strict=True):
            agree = torch.where(positive, d > 0, d < 0)
            mixed.append(torch.where(agree, d * w, 0.0))
            divisor.append(torch.where(agree, w, 0.0))
        divisor_sum = fixed_order_sum(divisor)
        yield block[base] + fixed_order_sum(mixed) / torch.where(divisor_sum == 0, 1.0, divisor_sum)


def varm(stack: TensorStack, params: TensorParameters, seed: int) -> Iterator[torch.Tensor]:
    """Weight each model's task vector by its share of the tensor's mean squared change.

    FuseChat's VaRM, https://arxiv.org/abs/2402.16107: w_i = mean((m_i - base)^2) / sum_j of the
    same, per tensor; the output is base + sum_i w_i (m_i - base). Equal weights if nothing changed.
    """
    others, base = stack.others, stack.base_index
    squares = [ExactSum() for _ in others]
    for _, _, block in stack.blocks():
        for j, i in enumerate(others):
            delta = (block[i] - block[base]).to(torch.float64)
            squares[j].add(delta * delta)
    energy = [s.value() / stack.numel for s in squares]
    total = math.fsum(energy)
    weights = [1.0 / len(others)] * len(others) if total == 0 else [e / total for e in energy]
    for _, _, block in stack.blocks():
        deltas = [(block[i] - block[base]) * w for i, w in zip(others, weights, strict=True)]
        yield block[base] + fixed_order_sum(deltas)


def whole_task_vectors(stack: TensorStack) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The whole base tensor and each other model's task vector, `[rows, width]` float64."""
    base = stack.base_index
    bases: list[torch.Tensor] = []
    parts: list[list[torch.Tensor]] = [[] for _ in stack.others]
    for _, _, block in stack.blocks():
        bases.append(block[base].to(torch.float64))
        for j, i in enumerate(stack.others):
            parts[j].append((block[i] - block[base]).to(torch.float64))
    return torch.cat(bases), [torch.cat(p) for p in parts]


def tsv(stack: TensorStack, params: TensorParameters, seed: int) -> Iterator[torch.Tensor]:
    """Task singular vectors (`merging.singular`) of the task vectors, weighted, times `lambda`.

    https://arxiv.org/abs/2412.00081. A tensor with one row or one column (norms, biases) takes
    the mean of its weighted task vectors, as the paper's code does. The whole tensor is read
    first; with a `stack.memo` (a search's, for fixed inputs) its basis is computed once.
    """
    others = stack.others
    weights = [params.models[stack.inputs[i]]["weight"] for i in others]
    held = stack.memo.get("tsv") if stack.memo is not None else None
    if held is None:
        base_values, deltas = whole_task_vectors(stack)
        matrix = min(stack.rows, stack.width) > 1
        held = (base_values, task_singular_basis(deltas) if matrix else deltas)
        if stack.memo is not None:
            stack.memo["tsv"] = held
    base_values, basis = held
    if isinstance(basis, TaskSingularBasis):
        merged = basis.combine(weights)
    else:
        merged = accumulate([d * w for d, w in zip(basis, weights, strict=True)]) / len(basis)
    result = (base_values + merged * params.globals["lambda"]).to(torch.float32)
    for start, end in stack.ranges:
        yield result[start:end]


def regmean(stack: TensorStack, params: TensorParameters, seed: int) -> Iterator[torch.Tensor]:
    """RegMean (`merging.regmean`) of the task vectors, times `lambda`: a linear layer's weight from
    the models' input Grams (`stack.grams`), each Gram scaled by its model's `weight`.

    https://arxiv.org/abs/2212.09849. A tensor no model has a Gram for (embeddings, norms, biases)
    takes the weighted mean of its task vectors, as the paper does. With a `stack.memo` (a search's),
    the merged task vector of the last weights is kept, so a search that moves only `lambda` reads
    and solves each tensor once.
    """
    others = stack.others
    weights = tuple(params.models[stack.inputs[i]]["weight"] for i in others)
    held = stack.memo.get("regmean") if stack.memo is not None else None
    if held is None or held[0] != weights:
        base_values, deltas = whole_task_vectors(stack)
        grams = [stack.grams[i] if stack.grams else None for i in others]
        if any(g is not None for g in grams):
            lacking = [stack.inputs[i] for i, g in zip(others, grams, strict=True) if g is None]
            if lacking:
                raise MergeError(f"model {lacking[0]!r} has no input Gram for {stack.tensor!r}, others do")
            if any(tuple(g.shape) != (stack.width, stack.width) for g in grams):
                shapes = sorted({tuple(g.shape) for g in grams})
                wanted = (stack.width, stack.width)
                raise MergeError(f"expected input Grams of shape {wanted} for {stack.tensor!r}, got {shapes}")
            merged = regmean_delta(deltas, grams, weights, params.globals["alpha"])
        elif sum(weights):
            merged = accumulate([d * w for d, w in zip(deltas, weights, strict=True)]) / sum(weights)
        else:
            merged = torch.zeros_like(deltas[0])
        held = (weights, base_values, merged)
        if stack.memo is not None:
            stack.memo["regmean"] = held
    _, base_values, merged = held
    result = (base_values + merged * params.globals["lambda"]).to(torch.float32)
    for start, end in stack.ranges:
        yield result[start:end]


def _task_arithmetic_operator(name: str) -> Operator:
    spec = METHODS[name]

    def operator(stack: TensorStack, params: TensorParameters, seed: int) -> Iterator[torch.Tensor]:
        return generalized_task_arithmetic(stack, params, seed, spec.sparsify, spec.consensus)

    operator.__name__ = name
    return operator


TASK_ARITHMETIC_FAMILY = (
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
)
# methods computed by `merging.fused` from the stored inputs (their stacks read blocks raw)
FUSED_METHODS = frozenset(
    ["linear", *(name for name in TASK_ARITHMETIC_FAMILY if METHODS[name].sparsify in FUSED_SPARSIFY)]
)

OPERATORS: dict[str, Operator] = {
    "linear": linear,
    "passthrough": passthrough,
    "slerp": slerp,
    "model_stock": model_stock,
    "sce": sce,
    "varm": varm,
    "tsv": tsv,
    "regmean": regmean,
    **{name: _task_arithmetic_operator(name) for name in TASK_ARITHMETIC_FAMILY},
}
