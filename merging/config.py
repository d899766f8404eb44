"""Merge configurations: mergekit-style YAML, validated before any tensor data is read.

Accepted top-level keys: `merge_method`, `models`, `base_model`, `parameters`, `dtype`, `out_dtype`,
`tokenizer_source`, `slices` (passthrough only), `seed` (umm's addition: seeds random dropping),
`row_weights` (umm's addition: a file of per-row weights, `merging.row_weights`) and `name`.
Anything else is rejected naming the key and listing the valid ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from merging.errors import ConfigError
from merging.methods import METHODS, REQUIRED, ROW_WEIGHT_METHODS, MethodSpec

TOP_LEVEL_KEYS = (
    "merge_method",
    "models",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "slices",
    "seed",
    "row_weights",
    "name",
)
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources",)
SOURCE_KEYS = ("model", "layer_range", "parameters")
DTYPES = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "half": "float16",
    "float": "float32",
}


@dataclass(frozen=True)
class ModelEntry:
    """One input model and its per-model parameters."""

    model: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSource:
    """A range of layers `[start, end)` taken from one model (passthrough slices)."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge configuration. Build it with `from_dict` or `load_config`."""

    merge_method: str
    models: tuple[ModelEntry, ...] = ()
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    slices: tuple[tuple[SliceSource, ...], ...] = ()
    seed: int = 0
    name: str | None = None
    row_weights: str | None = None  # path of a `merging.row_weights` file

    @property
    def method(self) -> MethodSpec:
        return METHODS[self.merge_method]

    @property
    def output_dtype(self) -> str | None:
        """The dtype written: `out_dtype`, else `dtype`, else None (the reference model's own)."""
        return self.out_dtype or self.dtype

    def input_models(self) -> list[str]:
        """Every model read, in order: `models` (or slice sources), then `base_model` if not listed."""
        names: list[str] = []
        for entry in self.models:
            if entry.model not in names:
                names.append(entry.model)
        for sources in self.slices:
            for source in sources:
                if source.model not in names:
                    names.append(source.model)
        if self.base_model is not None and self.base_model not in names:
            names.append(self.base_model)
        return names

    def reference_model(self) -> str:
        """The model whose tensor names, config and tokenizer define the output."""
        if self.base_model is not None:
            return self.base_model
        if self.slices:
            return self.slices[0][0].model
        return self.models[0].model

    def model_parameters(self, model: str) -> dict[str, Any]:
        for entry in self.models:
            if entry.model == model:
                return entry.parameters
        return {}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MergeConfig:
        """Validate a mergekit-style mapping; raise `ConfigError` naming the first problem."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping at the top of the merge config, got {type(data).__name__}")
        _reject_unknown(data, TOP_LEVEL_KEYS, "the merge config")
        method_name = data.get("merge_method")
        if method_name not in METHODS:
            raise ConfigError(
                f"unknown merge_method {method_name!r}; valid methods: {', '.join(sorted(METHODS))}"
            )
        spec = METHODS[method_name]
        models = tuple(_model_entry(item, i) for i, item in enumerate(_list(data.get("models"), "models")))
        slices = tuple(_slice(item, i) for i, item in enumerate(_list(data.get("slices"), "slices")))
        base_model = data.get("base_model")
        if base_model is not None and not isinstance(base_model, str):
            raise ConfigError(f"expected base_model to be a model path string, got {base_model!r}")
        parameters = _parameters(data.get("parameters"), "parameters")
        config = cls(
            merge_method=method_name,
            models=models,
            base_model=base_model,
            parameters=parameters,
            dtype=_dtype(data.get("dtype"), "dtype"),
            out_dtype=_dtype(data.get("out_dtype"), "out_dtype"),
            tokenizer_source=_tokenizer_source(data.get("tokenizer_source")),
            slices=slices,
            seed=_seed(data.get("seed", 0)),
            name=data.get("name"),
            row_weights=_row_weights(data.get("row_weights"), method_name),
        )
        _check_inputs(config, spec)
        _check_parameter_names(config, spec)
        return config

    def to_dict(self) -> dict[str, Any]:
        """The mergekit-style mapping this config was built from (defaults left out)."""
        out: dict[str, Any] = {"merge_method": self.merge_method}
        if self.models:
            out["models"] = [
                {"model": m.model, **({"parameters": m.parameters} if m.parameters else {})}
                for m in self.models
            ]
        if self.slices:
            out["slices"] = [
                {
                    "sources": [
                        {
                            "model": s.model,
                            "layer_range": list(s.layer_range),
                            **({"parameters": s.parameters} if s.parameters else {}),
                        }
                        for s in sources
                    ]
                }
                for sources in self.slices
            ]
        for key in ("base_model", "dtype", "out_dtype", "tokenizer_source", "name", "row_weights"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.parameters:
            out["parameters"] = self.parameters
        out["seed"] = self.seed
        return out


def load_config(source: str | Path | Mapping[str, Any] | MergeConfig) -> MergeConfig:
    """Read a YAML file (path) or validate a mapping; a `MergeConfig` is returned unchanged."""
    if isinstance(source, MergeConfig):
        return source
    if isinstance(source, Mapping):
        return MergeConfig.from_dict(source)
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read merge config {str(path)!r}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"merge config {str(path)!r} is not valid YAML: {_one_line(exc)}") from None
    return MergeConfig.from_dict(data)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _reject_unknown(data: Mapping[str, Any], valid: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in valid:
            raise ConfigError(f"unknown key {key!r} in {where}; valid keys: {', '.join(valid)}")


def _list(value: Any, key: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"expected {key} to be a list, got {type(value).__name__}")
    return value


def _model_entry(item: Any, index: int) -> ModelEntry:
    if isinstance(item, str):
        return ModelEntry(model=item)
    if not isinstance(item, Mapping):
        raise ConfigError(f"expected models[{index}] to be a mapping with a 'model' key, got {item!r}")
    _reject_unknown(item, MODEL_KEYS, f"models[{index}]")
    model = item.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"expected models[{index}].model to be a model path string, got {model!r}")
    return ModelEntry(
        model=model, parameters=_parameters(item.get("parameters"), f"models[{index}].parameters")
    )


def _slice(item: Any, index: int) -> tuple[SliceSource, ...]:
    if not isinstance(item, Mapping):
        raise ConfigError(f"expected slices[{index}] to be a mapping with 'sources', got {item!r}")
    _reject_unknown(item, SLICE_KEYS, f"slices[{index}]")
    sources = _list(item.get("sources"), f"slices[{index}].sources")
    if len(sources) != 1:
        raise ConfigError(f"expected slices[{index}].sources to list exactly one source, got {len(sources)}")
    out = []
    for j, source in enumerate(sources):
        where = f"slices[{index}].sources[{j}]"
        if not isinstance(source, Mapping):
            raise ConfigError(f"expected {where} to be a mapping, got {source!r}")
        _reject_unknown(source, SOURCE_KEYS, where)
        model = source.get("model")
        if not isinstance(model, str) or not model:
            raise ConfigError(f"expected {where}.model to be a model path string, got {model!r}")
        layer_range = source.get("layer_range")
        if (
            not isinstance(layer_range, list)
            or len(layer_range) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in layer_range)
            or not 0 <= layer_range[0] < layer_range[1]
        ):
            raise ConfigError(
                f"expected {where}.layer_range to be [start, end) with 0 <= start < end, got {layer_range!r}"
            )
        out.append(
            SliceSource(
                model=model,
                layer_range=(layer_range[0], layer_range[1]),
                parameters=_parameters(source.get("parameters"), f"{where}.parameters"),
            )
        )
    return tuple(out)


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected {where} to be a mapping of parameter names to values, got {value!r}")
    out = {}
    for key, setting in value.items():
        _check_setting(setting, f"{where}.{key}")
        out[str(key)] = setting
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_setting(setting: Any, where: str, nested: bool = False) -> None:
    """A setting is a scalar, a list of numbers (gradient), or a list of {filter, value} entries."""
    if isinstance(setting, bool | str):
        return
    if _is_number(setting):
        if not math.isfinite(setting):
            raise ConfigError(f"expected a finite number for {where}, got {setting!r}")
        return
    if isinstance(setting, Mapping):
        if nested:
            raise ConfigError(
                f"expected a scalar or a list of numbers as the value in {where}, got a mapping"
            )
        _check_conditional(setting, where)
        return
    if isinstance(setting, list) and setting:
        if all(_is_number(v) for v in setting):
            for v in setting:
                _check_setting(v, where)
            return
        if all(isinstance(v, bool | str) for v in setting):
            return
        if all(isinstance(v, Mapping) for v in setting) and not nested:
            for v in setting:
                _check_conditional(v, where)
            return
    raise ConfigError(
        f"expected {where} to be a number, a list of numbers or a list of {{filter, value}} entries, "
        f"got {setting!r}"
    )


def _check_conditional(entry: Mapping[str, Any], where: str) -> None:
    _reject_unknown(entry, ("filter", "value"), where)
    if "value" not in entry:
        raise ConfigError(f"expected a 'value' in every filter entry of {where}, got {dict(entry)!r}")
    flt = entry.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise ConfigError(f"expected the filter in {where} to be a string, got {flt!r}")
    _check_setting(entry["value"], where, nested=True)


def _dtype(value: Any, key: str) -> str | None:
    if value is None:
        return None
    name = DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value
    if name not in DTYPES:
        raise ConfigError(f"unknown {key} {value!r}; valid dtypes: {', '.join(DTYPES)}")
    return name


def _tokenizer_source(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value == "union":
        raise ConfigError(f"expected tokenizer_source to be 'base' or an input model, got {value!r}")
    return value


def _row_weights(value: Any, method: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"expected row_weights to be a file path, got {value!r}")
    if method not in ROW_WEIGHT_METHODS:
        raise ConfigError(f"row_weights need merge_method {' or '.join(ROW_WEIGHT_METHODS)}, got {method!r}")
    return value


def _seed(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"expected seed to be a non-negative integer, got {value!r}")
    return value


def _check_inputs(config: MergeConfig, spec: MethodSpec) -> None:
    if config.slices:
        if spec.name != "passthrough":
            raise ConfigError(f"slices are supported for merge_method 'passthrough' only, got {spec.name!r}")
        if config.models:
            raise ConfigError("expected either 'models' or 'slices' in the merge config, got both")
    elif not config.models:
        raise ConfigError("expected a non-empty 'models' list in the merge config")
    if spec.needs_base and config.base_model is None:
        raise ConfigError(f"merge_method {spec.name!r} needs a base_model")
    names = [m.model for m in config.models]
    if len(set(names)) != len(names):
        raise ConfigError(f"expected each model to be listed once in models, got {names!r}")
    if not config.slices:
        others = [n for n in names if n != config.base_model]
        if len(others) < spec.min_models:
            raise ConfigError(
                f"merge_method {spec.name!r} needs at least {spec.min_models} model(s) besides the base, "
                f"got {len(others)}"
            )
        if spec.max_models is not None and len(others) > spec.max_models:
            raise ConfigError(
                f"merge_method {spec.name!r} takes at most {spec.max_models} model(s) besides the base, "
                f"got {len(others)}"
            )
    tokenizer_source = config.tokenizer_source
    if tokenizer_source not in (None, "base") and tokenizer_source not in config.input_models():
        raise ConfigError(
            f"expected tokenizer_source to be 'base' or one of the input models, got {tokenizer_source!r}"
        )


def _check_parameter_names(config: MergeConfig, spec: MethodSpec) -> None:
    valid_global = tuple(spec.global_params) + tuple(spec.model_params)
    for key in config.parameters:
        if key not in valid_global:
            raise ConfigError(
                f"unknown parameter {key!r} for merge_method {spec.name!r}; valid parameters: "
                f"{', '.join(valid_global) or 'none'}"
            )
    per_model = [(f"models[{i}].parameters", m.parameters) for i, m in enumerate(config.models)]
    per_model += [
        (f"slices[{i}].sources[0].parameters", s[0].parameters) for i, s in enumerate(config.slices)
    ]
    for where, params in per_model:
        for key in params:
            if key not in spec.model_params:
                raise ConfigError(
                    f"unknown parameter {key!r} in {where} for merge_method {spec.name!r}; valid per-model "
                    f"parameters: {', '.join(spec.model_params) or 'none'}"
                )
    required = [k for k, v in spec.global_params.items() if v is REQUIRED]
    for key in required:
        if key not in config.parameters:
            raise ConfigError(f"merge_method {spec.name!r} needs the parameter {key!r}")
    for key, default in spec.model_params.items():
        if default is not REQUIRED or key in config.parameters:
            continue
        for entry in config.models:
            if entry.model != config.base_model and key not in entry.parameters:
                raise ConfigError(
                    f"merge_method {spec.name!r} needs the parameter {key!r} for model {entry.model!r}"
                )
