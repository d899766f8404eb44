"""The merge engine: plan the output tensors, run the operator over each, in memory or to files.

`merge_state_dicts` (in memory, for search loops) and `merge` (Hugging Face folders, out of core)
share `merge_tensor`, so they produce the same bytes for the same inputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from merging.blocks import Reader, Releaser, TensorStack, matrix_shape
from merging.config import MergeConfig, load_config
from merging.errors import ConfigError
from merging.layout import TensorInfo, TensorPlan, plan_tensors
from merging.methods import METHODS
from merging.operators import FUSED_METHODS, OPERATORS, TASK_ARITHMETIC_FAMILY
from merging.parameters import ResolvedParameters, resolve_parameters
from merging.row_weights import RowWeights, check_row_weights, load_row_weights

__all__ = ["merge", "merge_state_dicts", "resolve_parameters"]

# Methods whose output is non-finite wherever an input is (masks multiply, NaN * 0 is NaN), so
# their inputs are checked only when the output is not finite. slerp, model_stock and sce read
# whole-tensor statistics or mask with `where`, so their inputs are checked as they are read.
PROPAGATES_NON_FINITE = frozenset({"linear", "passthrough", *TASK_ARITHMETIC_FAMILY})
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def output_dtype(config: MergeConfig, plan: TensorPlan) -> torch.dtype:
    """The config's `out_dtype`/`dtype`, else the reference input's dtype; non-float tensors keep theirs."""
    stored = getattr(torch, plan.dtype)
    if not stored.is_floating_point or config.output_dtype is None:
        return stored
    return DTYPES[config.output_dtype]


def make_stack(
    config: MergeConfig,
    plan: TensorPlan,
    readers: list[Reader],
    executor: ThreadPoolExecutor | None = None,
    releasers: Sequence[Releaser] = (),
    memo: dict | None = None,
    grams: Sequence[torch.Tensor | None] = (),
    row_weights: Sequence[torch.Tensor | None] = (),
) -> TensorStack:
    """The inputs of one output tensor, ready to be read in row blocks (`grams`: per input, its
    layer's input Gram, for data-aware methods; `row_weights`: per input, its weight of each row)."""
    base = config.base_model if config.base_model in plan.inputs else None
    rowwise = any(w is not None for w in row_weights)  # merged in torch (the kernels take scalars)
    return TensorStack(
        plan.name,
        plan.shape,
        plan.inputs,
        readers,
        base=base,
        executor=executor,
        check_inputs=config.merge_method not in PROPAGATES_NON_FINITE,
        raw=config.merge_method in FUSED_METHODS and not rowwise,
        output_dtype=output_dtype(config, plan),
        releasers=releasers,
        memo=memo,
        grams=grams,
        row_weights=row_weights,
    )


def plan_row_weights(
    config: MergeConfig, plans: Sequence[TensorPlan], given: RowWeights | None = None
) -> dict[str, list[torch.Tensor | None]]:
    """Per tensor with row weights, each input's row weights (or None): `given`, else the file the
    config names; checked against the tensors' row counts."""
    if given is None:
        if config.row_weights is None:
            return {}
        given = load_row_weights(config.row_weights, [m.model for m in config.models])
    check_row_weights(given, {p.name: matrix_shape(p.shape) for p in plans})
    return {
        plan.name: [given.get(model, {}).get(plan.name) for model in plan.inputs]
        for plan in plans
        if any(plan.name in given.get(model, {}) for model in plan.inputs)
    }


def merge_stack(
    config: MergeConfig, plan: TensorPlan, stack: TensorStack, parameters: ResolvedParameters
) -> Iterator[torch.Tensor]:
    """The merged rows of one output tensor, block by block, in the output dtype (`[rows, width]`)."""
    out_dtype = output_dtype(config, plan)
    if stack.numel == 0:
        yield torch.empty(stack.rows, stack.width, dtype=out_dtype)
        return
    if not getattr(torch, plan.dtype).is_floating_point:  # integer buffers: copied from the first input
        for start, end in stack.ranges:
            yield stack.readers[0](start, end).reshape(end - start, stack.width)
        return
    operator = OPERATORS[config.merge_method]
    for rows in operator(stack, parameters[plan.name], config.seed):
        if rows.dtype != torch.float32 and rows.dtype == out_dtype:
            yield rows  # converted by the operator, which checked the float32 values first
            continue
        if not _all_finite(rows):
            raise stack.non_finite_output()  # names the input the NaN or infinity came from, if any
        yield rows.to(out_dtype)
    stack.release()


def _all_finite(rows: torch.Tensor) -> bool:
    """Whether every value is finite: a finite sum proves it (a NaN or infinity makes any sum non-finite)."""
    return bool(torch.isfinite(rows.sum())) or bool(torch.isfinite(rows).all())


def _memory_reader(tensor: torch.Tensor) -> Reader:
    if tensor.dim() <= 1:
        return lambda start, end: tensor.reshape(1, -1)
    return lambda start, end: tensor[start:end]


def merge_state_dicts(
    config: MergeConfig | Mapping[str, Any],
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    parameters: ResolvedParameters | None = None,
    memo: dict[str, dict] | None = None,
    grams: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    row_weights: RowWeights | None = None,
) -> dict[str, torch.Tensor]:
    """Merge in memory. `tensors` maps each model name of the config to its state dict.

    `memo` (tensor name -> operator results) lets repeated merges of the same inputs with other
    parameters (a search) skip work that depends only on the inputs; the bytes are the same.
    `grams` (model name -> weight name -> input Gram) feeds data-aware methods (`regmean`); they
    need it for every model but the base. `row_weights` (`merging.row_weights`) stand in for the
    file the config names, if any.
    """
    config = load_config(config)
    catalog = {
        model: {name: TensorInfo(tuple(t.shape), dtype_name(t.dtype)) for name, t in state.items()}
        for model, state in tensors.items()
    }
    plans = plan_tensors(config, catalog)
    if METHODS[config.merge_method].needs_grams:
        lacking = [m for m in config.input_models() if m != config.base_model and m not in (grams or {})]
        if lacking:
            raise ConfigError(
                f"method {config.merge_method!r} needs input Grams of every model, got none of {lacking[0]!r}"
            )
    if parameters is None:
        parameters = resolve_parameters(config, [p.name for p in plans])
    missing = [p.name for p in plans if p.name not in parameters]
    if missing:
        raise ConfigError(f"the given parameters have no entry for tensor {missing[0]!r}")
    rows_of = plan_row_weights(config, plans, row_weights)
    merged = {}
    for plan in plans:
        readers = [_memory_reader(tensors[m][s]) for m, s in zip(plan.inputs, plan.sources, strict=True)]
        held = None if memo is None else memo.setdefault(plan.name, {})
        sources = zip(plan.inputs, plan.sources, strict=True)
        layer_grams = [(grams or {}).get(m, {}).get(s) for m, s in sources]
        stack = make_stack(
            config, plan, readers, memo=held, grams=layer_grams, row_weights=rows_of.get(plan.name, ())
        )
        rows = list(merge_stack(config, plan, stack, parameters))
        merged[plan.name] = (
            torch.cat(rows).reshape(plan.shape) if len(rows) > 1 else rows[0].reshape(plan.shape)
        )
    return merged


def merge(
    config: MergeConfig | Mapping[str, Any] | str | Path,
    out_dir: str | Path,
    *,
    progress: bool = True,
    max_shard_bytes: int | None = None,
) -> Path:
    """Merge Hugging Face model folders into `out_dir` (written atomically); returns `out_dir`.

    Output shards hold at most `max_shard_bytes` (default 5 GB) each.
    """
    from merging.checkpoint import merge_to_folder
    from merging.folders import DEFAULT_SHARD_BYTES

    return merge_to_folder(
        load_config(config),
        Path(out_dir),
        progress=progress,
        max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES,
    )
