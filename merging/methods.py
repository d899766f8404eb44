"""The merge methods as data: which inputs each needs and which parameters it accepts.

Names and defaults follow mergekit's docs/merge_methods.md so that a mergekit YAML file works as is.
Global parameters apply to the whole output tensor; per-model parameters may differ per input model
(both may be layer gradients or name filters, see `merging.parameters`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

REQUIRED = object()  # marks a parameter without a default
ROW_WEIGHT_METHODS = ("task_arithmetic",)  # methods that read per-row weights (`merging.row_weights`)


@dataclass(frozen=True)
class MethodSpec:
    """How one merge method is configured."""

    name: str
    needs_base: bool
    min_models: int  # inputs other than the base model
    max_models: int | None = None
    global_params: dict[str, Any] = field(default_factory=dict)
    model_params: dict[str, Any] = field(default_factory=dict)
    sparsify: str | None = None  # task-arithmetic family only: magnitude | random | outliers | della
    consensus: bool = False  # task-arithmetic family only: TIES sign election
    needs_grams: bool = False  # data-aware: reads each model's input Grams (`merging.grams`)


def _task_arithmetic_family(
    name: str,
    sparsify: str | None,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    extra: dict[str, Any] | None = None,
) -> MethodSpec:
    model_params: dict[str, Any] = {"weight": REQUIRED}
    if sparsify is not None:
        model_params["density"] = 1.0
    model_params.update(extra or {})
    global_params: dict[str, Any] = {"normalize": normalize, "lambda": 1.0, "int8_mask": False}
    if sparsify in ("random", "della", "magnitude", "outliers"):
        global_params["rescale"] = rescale
    return MethodSpec(
        name=name,
        needs_base=True,
        min_models=1,
        global_params=global_params,
        model_params=model_params,
        sparsify=sparsify,
        consensus=consensus,
    )


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "linear",
            needs_base=False,
            min_models=1,
            global_params={"normalize": True},
            model_params={"weight": REQUIRED},
        ),
        _task_arithmetic_family("task_arithmetic", None, False, normalize=False, rescale=False),
        _task_arithmetic_family("ties", "magnitude", True, normalize=True, rescale=False),
        _task_arithmetic_family("dare_linear", "random", False, normalize=False, rescale=True),
        _task_arithmetic_family("dare_ties", "random", True, normalize=False, rescale=True),
        _task_arithmetic_family(
            "breadcrumbs", "outliers", False, normalize=False, rescale=False, extra={"gamma": 0.01}
        ),
        _task_arithmetic_family(
            "breadcrumbs_ties", "outliers", True, normalize=False, rescale=False, extra={"gamma": 0.01}
        ),
        _task_arithmetic_family(
            "della", "della", True, normalize=True, rescale=True, extra={"epsilon": 0.15}
        ),
        _task_arithmetic_family(
            "della_linear", "della", False, normalize=False, rescale=True, extra={"epsilon": 0.15}
        ),
        MethodSpec("slerp", needs_base=True, min_models=1, max_models=1, global_params={"t": REQUIRED}),
        MethodSpec("model_stock", needs_base=True, min_models=2, global_params={"filter_wise": False}),
        MethodSpec(
            "sce", needs_base=True, min_models=1, global_params={"select_topk": 1.0, "int8_mask": False}
        ),
        MethodSpec("varm", needs_base=True, min_models=1),
        MethodSpec(
            "tsv", needs_base=True, min_models=1, global_params={"lambda": 1.0}, model_params={"weight": 1.0}
        ),
        MethodSpec(
            "regmean",
            needs_base=True,
            min_models=1,
            global_params={"alpha": 0.9, "lambda": 1.0},
            model_params={"weight": 1.0},
            needs_grams=True,
        ),
        MethodSpec("passthrough", needs_base=False, min_models=1, max_models=1, model_params={"scale": 1.0}),
    )
}
