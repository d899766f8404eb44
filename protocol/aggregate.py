"""Deterministic aggregation: every peer turns (recipe, base, deltas) into the same bytes.

`aggregate` builds the merge engine's config from the recipe — the base model named ``base``,
the contributions as models in the recipe's sorted order (their ids as names), the recipe's
global parameters, dtype and content-derived seed — reconstructs each expert as
`protocol.chunks.reconstruct(base, delta)` (base + delta in float64, rounded to float32), and
calls `merging.engine.merge_state_dicts`, whose results do not depend on thread count or input
order. `encode_result` turns the merged tensors into MergeResult entries, chunks and the
merged fingerprint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

from merging.config import MergeConfig
from merging.engine import merge_state_dicts, resolve_parameters
from merging.errors import MergeError
from protocol.chunks import check_matches, encode_entry, reconstruct
from protocol.codecs import DTYPE_NAMES, CodecSpec
from protocol.errors import ProtocolError, RecipeError, TensorMismatchError
from protocol.messages import DEFAULT_CHUNK_SIZE, MergeRecipe, TensorEntry, state_fingerprint
from protocol.search_rules import recipe_parameters

BASE_NAME = "base"
RAW = CodecSpec(name="raw", zstd=False, k=0, block_size=0)


def recipe_config(recipe: MergeRecipe) -> MergeConfig:
    """The engine config a recipe stands for; RecipeError if the engine rejects it."""
    try:
        top, per_model = recipe_parameters(recipe.parameters, recipe.contributions)
        models = [
            {"model": c, **({"parameters": per_model[c]} if c in per_model else {})}
            for c in recipe.contributions
        ]
        return MergeConfig.from_dict(
            {
                "merge_method": recipe.method,
                "base_model": BASE_NAME,
                "models": models,
                "parameters": top,
                "dtype": recipe.dtype,
                "seed": recipe.seed,
            }
        )
    except (MergeError, ProtocolError) as exc:
        raise RecipeError(f"expected a recipe the merge engine accepts, got: {exc}") from exc


def aggregate(
    recipe: MergeRecipe,
    base: Mapping[str, torch.Tensor],
    deltas: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    model_tensors: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge base + each contribution's decoded delta as the recipe says; identical bytes on every peer.

    `deltas` maps each of the recipe's contribution ids to its decoded deltas (float32; float64
    for ``fp64``), one per base tensor with the base tensor's shape. To merge one shard, pass
    only the shard's tensors in `base` and `deltas` and the whole model's tensor names as
    `model_tensors`: layer-wise parameters are then resolved against the whole model (its layer
    count), so the shard's bytes equal the same tensors of the full merge.
    """
    return dict(iter_aggregate(recipe, base, deltas, model_tensors=model_tensors))


def iter_aggregate(
    recipe: MergeRecipe,
    base: Mapping[str, torch.Tensor],
    deltas: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    model_tensors: Iterable[str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """`aggregate` one tensor at a time, in name order: (name, merged tensor).

    Each base tensor and delta is read once, when its tensor is merged (`base` and the deltas may
    be lazy mappings), so only one tensor's inputs are in memory at a time.
    """
    config = recipe_config(recipe)
    names = sorted(base)
    everything = sorted(set(model_tensors)) if model_tensors is not None else names
    if not set(names) <= set(everything):
        odd = sorted(set(names) - set(everything))[0]
        raise TensorMismatchError(f"expected the shard's tensors among the model's tensors, got {odd!r}")
    if set(deltas) != set(recipe.contributions):
        odd = sorted(set(deltas) ^ set(recipe.contributions))[0]
        raise TensorMismatchError(
            f"expected deltas for exactly the recipe's contributions, got a mismatch at {odd}"
        )
    for contribution in recipe.contributions:
        if set(deltas[contribution]) != set(names):
            odd = sorted(set(deltas[contribution]) ^ set(names))[0]
            raise TensorMismatchError(
                f"expected contribution {contribution} to cover every base tensor, got {odd!r}"
            )
    try:
        parameters = resolve_parameters(config, everything)
    except MergeError as exc:
        raise RecipeError(f"expected the recipe's inputs to merge, got: {exc}") from exc
    for name in names:
        tensor = _as_input(base[name])
        models: dict[str, dict[str, torch.Tensor]] = {BASE_NAME: {name: tensor}}
        for contribution in recipe.contributions:  # sorted by the recipe
            if not tensor.is_floating_point():
                models[contribution] = {name: tensor}
                continue
            delta = deltas[contribution][name]
            check_matches(name, tuple(tensor.shape), "float32", delta.float())
            models[contribution] = {name: reconstruct(tensor, delta)}
            del delta
        try:
            merged = merge_state_dicts(config, models, parameters=parameters)
        except MergeError as exc:
            raise RecipeError(f"expected the recipe's inputs to merge, got: {exc}") from exc
        del models
        yield name, merged[name]


def _as_input(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


def encode_result(
    merged: Mapping[str, torch.Tensor], chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[tuple[TensorEntry, ...], dict[str, bytes], str]:
    """Entries (raw codec), chunks and merged fingerprint of a merged state dict, for a MergeResult."""
    chunks: dict[str, bytes] = {}
    entries, fingerprint = encode_merged(
        ((name, merged[name]) for name in sorted(merged)), chunks.__setitem__, chunk_size
    )
    return entries, chunks, fingerprint


def encode_merged(
    merged: Iterable[tuple[str, torch.Tensor]],
    sink: Callable[[str, bytes], None],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[tuple[TensorEntry, ...], str]:
    """`encode_result` of (name, tensor) pairs as they come (e.g. from `iter_aggregate`): each
    tensor's raw chunks go to `sink(digest, data)` at once; returns the entries sorted by name and
    the merged fingerprint (`fingerprint_state_dict` of the tensors: a raw entry's digest is the
    sha256 of the tensor's bytes)."""
    entries = []
    for name, tensor in merged:
        if tensor.dtype not in DTYPE_NAMES:
            raise TensorMismatchError(f"expected {name} in a dtype the protocol carries, got {tensor.dtype}")
        entry, chunks = encode_entry(name, tensor, RAW, chunk_size)
        for digest, data in chunks.items():
            sink(digest, data)
        entries.append(entry)
    entries.sort(key=lambda e: e.name)
    fingerprint = state_fingerprint((e.name, e.shape, e.dtype, e.digest) for e in entries)
    return tuple(entries), fingerprint
