"""Layer-wise parameters: scalars, layer gradients and name filters resolved per output tensor.

A setting is a scalar, a list of numbers interpolated across the layer index (mergekit's
"gradient"), or a list of `{filter: <substring>, value: ...}` entries where the first entry whose
filter is a substring of the tensor name (or has no filter, or `*`) wins. Precedence, as in mergekit:
a model's (or slice source's) own `parameters`, then the top-level `parameters`, then the method's
default. The position `t` along the layers is `index / (num_layers - 1)` for a layer tensor, 0 for
embeddings before the first layer and 1 for everything else (final norm, output head).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from merging.config import MergeConfig
from merging.errors import ConfigError
from merging.methods import REQUIRED

LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")
EMBEDDING_MARKERS = ("embed", "wte", "wpe")
BOOL_PARAMS = frozenset({"normalize", "rescale", "int8_mask", "filter_wise"})


@dataclass
class TensorParameters:
    """The parameters one output tensor is merged with; a search may edit these in place."""

    tensor: str
    globals: dict[str, Any] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # input model -> its parameters


@dataclass
class ResolvedParameters:
    """Per output tensor name, the parameters after gradient interpolation and filter precedence."""

    tensors: dict[str, TensorParameters]

    def __getitem__(self, tensor: str) -> TensorParameters:
        return self.tensors[tensor]

    def __contains__(self, tensor: object) -> bool:
        return tensor in self.tensors


def layer_index(tensor: str) -> int | None:
    """The transformer layer a tensor belongs to (`model.layers.7.mlp...` -> 7), or None."""
    match = LAYER_PATTERN.search(tensor)
    return int(match.group(1)) if match else None


def replace_layer_index(tensor: str, index: int) -> str:
    """The same tensor name in another layer."""
    match = LAYER_PATTERN.search(tensor)
    if match is None:
        return tensor
    return tensor[: match.start(1)] + str(index) + tensor[match.end(1) :]


def evaluate_setting(setting: Any, tensor: str, t: float) -> Any:
    """The value of one setting for a tensor at layer position `t` in [0, 1]; None if no filter matches."""
    if isinstance(setting, bool | str | int | float):
        return setting
    if isinstance(setting, dict):
        setting = [setting]
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in setting):
        scaled = t * (len(setting) - 1)
        lower = int(scaled)
        upper = min(len(setting) - 1, lower + 1)
        frac = scaled - lower
        return (1 - frac) * setting[lower] + frac * setting[upper]
    if all(isinstance(v, bool | str) for v in setting):
        return setting[int(t * (len(setting) - 1))]
    for entry in setting:
        flt = entry.get("filter")
        if flt is None or flt == "*" or flt in tensor:
            return evaluate_setting(entry["value"], tensor, t)
    return None


def layer_position(tensor: str, num_layers: int, layer: int | None = None) -> float:
    """`t` for a tensor: its layer's fraction of the way through the stack (see module docstring)."""
    index = layer_index(tensor) if layer is None else layer
    if index is None:
        return 0.0 if any(marker in tensor for marker in EMBEDDING_MARKERS) else 1.0
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def resolve_parameters(config: MergeConfig, tensor_names: Sequence[str]) -> ResolvedParameters:
    """Resolve every parameter of `config` for each output tensor name; bad values raise `ConfigError`."""
    spec = config.method
    layers = [i for i in (layer_index(n) for n in tensor_names) if i is not None]
    num_layers = max(layers) + 1 if layers else 0
    slice_starts = _slice_starts(config)
    resolved: dict[str, TensorParameters] = {}
    for tensor in tensor_names:
        models_params: list[tuple[str, dict[str, Any]]]
        if config.slices:
            index = layer_index(tensor)
            slice_no, offset = _slice_of(slice_starts, index, len(config.slices), tensor)
            source = config.slices[slice_no][0]
            length = source.layer_range[1] - source.layer_range[0]
            if index is None:
                t = layer_position(tensor, num_layers)
            else:
                t = offset / (length - 1) if length > 1 else 1.0
            models_params = [(source.model, source.parameters)]
        else:
            t = layer_position(tensor, num_layers)
            models_params = [
                (m.model, m.parameters)
                for m in config.models
                if not spec.needs_base or m.model != config.base_model
            ]
        params = TensorParameters(tensor=tensor)
        for key, default in spec.global_params.items():
            value = _lookup(key, [config.parameters], tensor, t)
            params.globals[key] = _checked(key, default if value is None else value, tensor, None)
        for model, own in models_params:
            values = {}
            for key, default in spec.model_params.items():
                value = _lookup(key, [own, config.parameters], tensor, t)
                values[key] = _checked(key, default if value is None else value, tensor, model)
            params.models[model] = values
        _check_combination(spec.name, params)
        resolved[tensor] = params
    return ResolvedParameters(resolved)


def _slice_starts(config: MergeConfig) -> list[int]:
    starts, total = [], 0
    for sources in config.slices:
        starts.append(total)
        total += sources[0].layer_range[1] - sources[0].layer_range[0]
    starts.append(total)
    return starts


def _slice_of(starts: list[int], index: int | None, count: int, tensor: str) -> tuple[int, int]:
    """(slice number, offset inside it) of an output layer; pre-layer tensors -> first, others -> last."""
    if index is None:
        return (0 if layer_position(tensor, 0) == 0.0 else count - 1, 0)
    for number in range(count):
        if starts[number] <= index < starts[number + 1]:
            return number, index - starts[number]
    raise ConfigError(f"output layer {index} is outside the {starts[-1]} layers the slices define")


def _lookup(key: str, sources: list[dict[str, Any]], tensor: str, t: float) -> Any:
    for source in sources:
        if key in source:
            value = evaluate_setting(source[key], tensor, t)
            if value is not None:
                return value
    return None


def _checked(key: str, value: Any, tensor: str, model: str | None) -> Any:
    where = f"{key!r} for tensor {tensor!r}" + (f" of model {model!r}" if model else "")
    if value is REQUIRED:
        raise ConfigError(f"missing the required parameter {where}")
    if key in BOOL_PARAMS:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false for {where}, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"expected a finite number for {where}, got {value!r}")
    value = float(value)
    if key in ("density", "gamma", "select_topk") and not 0.0 <= value <= 1.0:
        raise ConfigError(f"expected {where} to lie in [0, 1], got {value}")
    if key == "epsilon" and value < 0:
        raise ConfigError(f"expected {where} to be >= 0, got {value}")
    return value


def _check_combination(method: str, params: TensorParameters) -> None:
    if method not in ("della", "della_linear"):
        return
    for model, values in params.models.items():
        density, epsilon = values["density"], values["epsilon"]
        if 0.0 < density < 1.0 and not (density - epsilon > 0.0 and density + epsilon < 1.0):
            raise ConfigError(
                f"expected density - epsilon > 0 and density + epsilon < 1 for tensor {params.tensor!r} of "
                f"model {model!r}, got density {density} and epsilon {epsilon}"
            )
