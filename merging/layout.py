"""Which output tensors a merge produces and which input tensors each is made from.

Shared by the in-memory and the file merge so that both see the same tensors in the same order.
The output follows the reference model (the base model, else the first model): its tensor names,
in the order pre-layer tensors, layers ascending, post-layer tensors. Every other input must have
each tensor with the same shape; an output head missing from an input with tied embeddings is read
from that input's embedding matrix. Passthrough `slices` renumber the chosen layers consecutively.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from merging.config import MergeConfig
from merging.errors import MissingTensorError, ShapeMismatchError
from merging.parameters import layer_index, layer_position, replace_layer_index

OUTPUT_HEADS = ("lm_head.weight",)
EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its name, shape and stored input dtype, and its source per input model."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    inputs: tuple[str, ...]
    sources: tuple[str, ...]  # the tensor name read from each input


Catalog = Mapping[str, Mapping[str, TensorInfo]]  # model -> tensor name -> info


def operator_inputs(config: MergeConfig) -> list[str]:
    """The models an operator reads for a whole-model merge, in config order, base last if unlisted."""
    if config.method.needs_base:
        return config.input_models()
    return [m.model for m in config.models]


def tensor_order(names: Sequence[str]) -> list[str]:
    """Pre-layer tensors, then layers ascending, then post-layer tensors; names sorted within each."""

    def key(name: str):
        index = layer_index(name)
        if index is None:
            return (0 if layer_position(name, 0) == 0.0 else 2, 0, name)
        return (1, index, name)

    return sorted(names, key=key)


def _source_name(catalog: Catalog, model: str, name: str) -> str | None:
    tensors = catalog[model]
    if name in tensors:
        return name
    if name.endswith(OUTPUT_HEADS):
        prefix = name[: -len("lm_head.weight")]
        for embedding in EMBEDDINGS:
            for candidate in (
                prefix + "model." + embedding,
                prefix + embedding,
                "model." + embedding,
                embedding,
            ):
                if candidate in tensors:
                    return candidate
    return None


def _plan_one(catalog: Catalog, name: str, info: TensorInfo, inputs: Sequence[tuple[str, str]]) -> TensorPlan:
    sources = []
    for model, wanted in inputs:
        source = _source_name(catalog, model, wanted)
        if source is None:
            raise MissingTensorError(f"model {model!r} has no tensor {wanted!r}, which the merge needs")
        shape = catalog[model][source].shape
        if shape != info.shape:
            raise ShapeMismatchError(
                f"tensor {wanted!r} of model {model!r} has shape {list(shape)}, expected {list(info.shape)}"
            )
        sources.append(source)
    return TensorPlan(name, info.shape, info.dtype, tuple(m for m, _ in inputs), tuple(sources))


def plan_tensors(config: MergeConfig, catalog: Catalog) -> list[TensorPlan]:
    """Every output tensor of the merge, validated against the inputs' names and shapes."""
    for model in config.input_models():
        if model not in catalog:
            raise MissingTensorError(f"no tensors were given for model {model!r}")
    if config.slices:
        return _plan_slices(config, catalog)
    reference = catalog[config.reference_model()]
    inputs = operator_inputs(config)
    return [
        _plan_one(catalog, name, reference[name], [(m, name) for m in inputs])
        for name in tensor_order(reference)
    ]


def _plan_slices(config: MergeConfig, catalog: Catalog) -> list[TensorPlan]:
    plans = []
    first, last = config.slices[0][0].model, config.slices[-1][0].model
    for name in tensor_order(catalog[first]):
        if layer_index(name) is None and layer_position(name, 0) == 0.0:
            plans.append(_plan_one(catalog, name, catalog[first][name], [(first, name)]))
    out_layer = 0
    for sources in config.slices:
        source = sources[0]
        tensors = catalog[source.model]
        layer_names: dict[int, list[str]] = {}
        for name in tensors:
            index = layer_index(name)
            if index is not None:
                layer_names.setdefault(index, []).append(name)
        for layer in range(*source.layer_range):
            if layer not in layer_names:
                raise MissingTensorError(
                    f"model {source.model!r} has no layer {layer}, which slice layer_range "
                    f"{list(source.layer_range)} needs"
                )
            for name in sorted(layer_names[layer]):
                out_name = replace_layer_index(name, out_layer)
                plans.append(_plan_one(catalog, out_name, tensors[name], [(source.model, name)]))
            out_layer += 1
    for name in tensor_order(catalog[last]):
        if layer_index(name) is None and layer_position(name, 0) != 0.0:
            plans.append(_plan_one(catalog, name, catalog[last][name], [(last, name)]))
    return plans


def output_layer_count(config: MergeConfig) -> int | None:
    """The number of layers a passthrough slice merge writes (None for whole-model merges)."""
    if not config.slices:
        return None
    return sum(s[0].layer_range[1] - s[0].layer_range[0] for s in config.slices)
