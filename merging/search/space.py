"""The search space: which tensors form a layer group, and the merge parameters searched per group.

A candidate is a vector `x` in [0, 1]^d, one coordinate per (group, parameter, expert): each
coordinate maps linearly onto its parameter's range (`weight` in [0, 1], `density` in [0.1, 1],
`lambda` in [0.5, 2] by default). Groups are found from the tensor names, at one of these
granularities:

* `layer`: every transformer layer is a group;
* `attn_mlp` (the default): each layer's attention and MLP are two groups;
* `module`: each projection of each layer (`q_proj`, `up_proj`, ...) is a group;
* `blocks:K`: the layers split into K contiguous blocks of (nearly) equal size;
* `row`: every output row of every tensor, a weight per expert (the gradient search only: too
  many coordinates for CMA-ES; written as a `merging.row_weights` file beside the recipe, which
  mergekit cannot read, and not offered to networks, whose proposals carry a recipe alone).

Tensors outside the layers (embeddings, final norm, output head) are one group each. Tensors
that no expert changed (a zero task vector, e.g. frozen embeddings) are left out: no value of
theirs changes the merge, so searching them would only slow the search down.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from merging.config import MergeConfig
from merging.errors import ConfigError
from merging.methods import METHODS, ROW_WEIGHT_METHODS
from merging.parameters import LAYER_PATTERN, ResolvedParameters

if TYPE_CHECKING:
    import torch

GRANULARITIES = ("layer", "attn_mlp", "module", "blocks:K", "row")
LOCAL_GRANULARITIES = ("row",)  # a recipe plus a row-weights file: `umm evolve` only, not networks
DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    "weight": (0.0, 1.0),
    "density": (0.1, 1.0),
    "lambda": (0.5, 2.0),
}
GLOBAL_KEYS = frozenset({"lambda"})  # searched per group, shared by all experts
OPTIMIZERS = ("cma", "gradient")  # merging.search.driver, merging.search.gradient
GRADIENT_METHODS = ("task_arithmetic",)
GRADIENT_METRICS = ("loglik", "seqprob")
GRADIENT_KEYS = frozenset({"weight", "lambda"})


class SearchSpaceError(ConfigError):
    """A search space that cannot be built: an unknown granularity, parameter or method."""


@dataclass(frozen=True)
class Dimension:
    """One searched coordinate: parameter `key` of `model` (None for a global one) on a group."""

    group: str
    key: str
    model: str | None
    low: float
    high: float
    row: int | None = None  # `row` granularity: the output row of the group's one tensor

    def value(self, unit: float) -> float:
        """The parameter value at coordinate `unit` in [0, 1] (clipped into the range)."""
        return self.low + min(1.0, max(0.0, unit)) * (self.high - self.low)

    def unit(self, value: float) -> float:
        """The coordinate of a parameter value (clipped into [0, 1])."""
        if self.high == self.low:
            return 0.0
        return min(1.0, max(0.0, (value - self.low) / (self.high - self.low)))


def check_gradient_search(method: str, metric: str, keys: Sequence[str] | None) -> None:
    """Raise unless the fitness is differentiable in the searched values (`merging.search.gradient`)."""
    if method not in GRADIENT_METHODS:
        raise SearchSpaceError(
            f"the gradient search needs a merge linear in its weights ({', '.join(GRADIENT_METHODS)}), "
            f"got merge_method {method!r}; use the cma optimizer"
        )
    if metric not in GRADIENT_METRICS:
        raise SearchSpaceError(
            f"the gradient search needs a differentiable metric ({', '.join(GRADIENT_METRICS)}), "
            f"got {metric!r}"
        )
    extra = sorted(set(keys or ()) - GRADIENT_KEYS)
    if extra:
        raise SearchSpaceError(f"the gradient search fits weight and lambda only, not {', '.join(extra)}")


def parse_granularity(text: str) -> tuple[str, int]:
    """`attn_mlp` -> ("attn_mlp", 0); `blocks:4` -> ("blocks", 4); anything else raises."""
    kind, _, count = text.partition(":")
    if kind == "blocks" and count.isdigit() and int(count) > 0:
        return "blocks", int(count)
    if kind in ("layer", "attn_mlp", "module", "row") and not count:
        return kind, 0
    raise SearchSpaceError(f"expected a granularity among {', '.join(GRANULARITIES)}, got {text!r}")


def group_filter(tensor: str, granularity: str, num_layers: int, blocks: int) -> tuple[str, str]:
    """(group name, name filter) of one tensor: the filter is a substring of the tensor's name
    that names its part of the group (`layers.3.mlp.`), so a mergekit-style filter list of the
    group's filters reproduces the group. Filters stop at a layer's component (never the bare
    `layers.3.`), so a tensor of the layer left out of the search (an unchanged norm) keeps the
    config's own value in a written recipe."""
    match = LAYER_PATTERN.search(tensor)
    if match is None or granularity == "row":
        return tensor, tensor
    index = int(match.group(1))
    start = match.start(0) + (1 if tensor[match.start(0)] == "." else 0)
    layer_prefix = tensor[start : match.end(1)] + "."  # e.g. "layers.3."
    parts = tensor[match.end(1) + 1 :].split(".")
    component = parts[0]
    if granularity == "layer":
        return f"layer {index}", f"{layer_prefix}{component}."
    if granularity == "blocks":
        block = index * blocks // max(1, num_layers)
        return f"block {block}", f"{layer_prefix}{component}."
    if granularity == "module" and len(parts) > 2:
        component = f"{parts[0]}.{parts[1]}"
    label = "attn" if "attn" in parts[0] else "mlp" if "mlp" in parts[0] else component
    if granularity == "module":
        label = component
    return f"layer {index} {label}", f"{layer_prefix}{component}."


class SearchSpace:
    """Groups of searched tensors and the coordinates of a candidate (see the module docstring)."""

    def __init__(
        self,
        config: MergeConfig,
        template: ResolvedParameters,
        tensors: Sequence[str],
        *,
        granularity: str = "attn_mlp",
        keys: Sequence[str] | None = None,
        ranges: Mapping[str, tuple[float, float]] | None = None,
        rows: Mapping[str, int] | None = None,
    ) -> None:
        """`rows`: each tensor's row count, which the `row` granularity needs."""
        spec = config.method
        if "weight" not in spec.model_params:
            weighted = ", ".join(name for name, m in METHODS.items() if "weight" in m.model_params)
            raise SearchSpaceError(
                f"merge_method {config.merge_method!r} has no per-model weight to search; "
                f"use one of {weighted}"
            )
        if keys is None:
            keys = ["weight"] + (["density"] if "density" in spec.model_params else [])
        for key in keys:
            if key not in spec.model_params and key not in spec.global_params:
                raise SearchSpaceError(f"merge_method {config.merge_method!r} has no parameter {key!r}")
            if key not in {**DEFAULT_RANGES, **(ranges or {})}:
                raise SearchSpaceError(f"no search range for parameter {key!r}; give one")
        kind, blocks = parse_granularity(granularity)
        if kind == "row" and (tuple(keys) != ("weight",) or config.merge_method not in ROW_WEIGHT_METHODS):
            raise SearchSpaceError(
                f"the row granularity searches the weight of {' or '.join(ROW_WEIGHT_METHODS)} only"
            )
        self.config = config
        self.granularity = granularity
        self.keys = tuple(keys)
        self.ranges = {**DEFAULT_RANGES, **(ranges or {})}
        self.experts = tuple(template[tensors[0]].models) if tensors else ()
        layers = [int(m.group(1)) for m in (LAYER_PATTERN.search(t) for t in tensors) if m]
        num_layers = max(layers) + 1 if layers else 0
        self.groups: dict[str, list[str]] = {}
        self.filters: dict[str, list[str]] = {}
        for tensor in tensors:
            group, flt = group_filter(tensor, kind, num_layers, blocks)
            self.groups.setdefault(group, []).append(tensor)
            if flt not in self.filters.setdefault(group, []):
                self.filters[group].append(flt)
        self.dimensions: list[Dimension] = []
        for group in self.groups:
            for key in self.keys:
                low, high = self.ranges[key]
                owners: Sequence[str | None] = [None] if key in GLOBAL_KEYS else self.experts
                for model in owners:
                    if kind != "row":
                        self.dimensions.append(Dimension(group, key, model, low, high))
                        continue
                    count = (rows or {}).get(group)
                    if count is None:
                        raise SearchSpaceError(f"the row granularity needs the row count of {group!r}")
                    self.dimensions.extend(Dimension(group, key, model, low, high, r) for r in range(count))
        self.rowwise = kind == "row"
        self.rows = dict(rows or {})
        self.template = template

    @property
    def size(self) -> int:
        return len(self.dimensions)

    def start(self) -> list[float]:
        """The config's own values (those of each group's first tensor), as coordinates."""
        out = []
        for dim in self.dimensions:
            params = self.template[self.groups[dim.group][0]]
            value = params.globals[dim.key] if dim.model is None else params.models[dim.model][dim.key]
            out.append(dim.unit(float(value)))
        return out

    def values(self, x: Sequence[float]) -> list[float]:
        """The parameter value of every coordinate of `x`."""
        self._check(x)
        return [dim.value(u) for dim, u in zip(self.dimensions, x, strict=True)]

    def apply(self, x: Sequence[float]) -> ResolvedParameters:
        """A copy of the config's resolved parameters with candidate `x`'s group values set (the
        config's own for a `row` space, whose values are `row_weights(x)`)."""
        resolved = copy.deepcopy(self.template)
        if self.rowwise:
            self._check(x)
            return resolved
        for dim, value in zip(self.dimensions, self.values(x), strict=True):
            for tensor in self.groups[dim.group]:
                params = resolved[tensor]
                target = params.globals if dim.model is None else params.models[dim.model]
                target[dim.key] = value
        return resolved

    def row_weights(self, x: Sequence[float]) -> dict[str, dict[str, torch.Tensor]] | None:
        """Candidate `x` as `merging.row_weights` (expert -> tensor -> float32 [rows]); None unless
        the granularity is `row`."""
        import torch

        if not self.rowwise:
            return None
        out: dict[str, dict[str, torch.Tensor]] = {}
        for dim, value in zip(self.dimensions, self.values(x), strict=True):
            rows = out.setdefault(dim.model, {})
            if dim.group not in rows:
                rows[dim.group] = torch.zeros(self.rows[dim.group], dtype=torch.float32)
            rows[dim.group][dim.row] = value
        return out

    def describe(self, x: Sequence[float]) -> dict[str, dict[str, float]]:
        """`{group: {"weight[expert]": value, ...}}` for reports (a `row` space: each expert's
        mean, lowest and highest row weight)."""
        out: dict[str, dict[str, float]] = {}
        if self.rowwise:
            for model, tensors in (self.row_weights(x) or {}).items():
                for tensor, rows in tensors.items():
                    entry = out.setdefault(tensor, {})
                    for label, value in (("mean", rows.mean()), ("min", rows.min()), ("max", rows.max())):
                        entry[f"weight[{model}] {label}"] = float(value)
            return out
        for dim, value in zip(self.dimensions, self.values(x), strict=True):
            label = dim.key if dim.model is None else f"{dim.key}[{dim.model}]"
            out.setdefault(dim.group, {})[label] = value
        return out

    def _check(self, x: Sequence[float]) -> None:
        if len(x) != self.size or not all(math.isfinite(u) for u in x):
            raise SearchSpaceError(f"expected {self.size} finite coordinates, got {len(x)}")
