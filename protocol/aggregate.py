"""Deterministic aggregation: every peer turns (recipe, base, deltas) into the same bytes.

`aggregate` builds the merge engine's config from the recipe — the base model named ``base``,
the contributions as models in the recipe's sorted order (their ids as names), the recipe's
global parameters, dtype and content-derived seed — reconstructs each expert as base + delta in
float32, and calls `merging.engine.merge_state_dicts`, whose results do not depend on thread count
or input order. `encode_result` turns the merged tensors into MergeResult entries, chunks and the
merged fingerprint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from merging.config import MergeConfig
from merging.engine import merge_state_dicts, resolve_parameters
from merging.errors import MergeError
from protocol.chunks import check_matches, encode_tensors
from protocol.codecs import DTYPE_NAMES, CodecSpec
from protocol.errors import ProtocolError, RecipeError, TensorMismatchError
from protocol.fingerprint import fingerprint_state_dict
from protocol.messages import DEFAULT_CHUNK_SIZE, MergeRecipe, TensorEntry
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

    `deltas` maps each of the recipe's contribution ids to its decoded float32 deltas, one per base
    tensor with the base tensor's shape. To merge one shard, pass only the shard's tensors in
    `base` and `deltas` and the whole model's tensor names as `model_tensors`: layer-wise
    parameters are then resolved against the whole model (its layer count), so the shard's bytes
    equal the same tensors of the full merge.
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
    base_f32 = {name: _as_input(base[name]) for name in names}
    models: dict[str, dict[str, torch.Tensor]] = {BASE_NAME: base_f32}
    for contribution in recipe.contributions:  # sorted by the recipe
        delta = deltas[contribution]
        if set(delta) != set(base):
            odd = sorted(set(delta) ^ set(base))[0]
            raise TensorMismatchError(
                f"expected contribution {contribution} to cover every base tensor, got {odd!r}"
            )
        expert = {}
        for name in names:
            tensor = base_f32[name]
            if not tensor.is_floating_point():
                expert[name] = tensor
                continue
            check_matches(name, tuple(tensor.shape), "float32", delta[name].float())
            expert[name] = tensor + delta[name].float()
        models[contribution] = expert
    try:
        parameters = resolve_parameters(config, everything)
        return merge_state_dicts(config, models, parameters=parameters)
    except MergeError as exc:
        raise RecipeError(f"expected the recipe's inputs to merge, got: {exc}") from exc


def _as_input(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


def encode_result(
    merged: Mapping[str, torch.Tensor], chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[tuple[TensorEntry, ...], dict[str, bytes], str]:
    """Entries (raw codec), chunks and merged fingerprint of a merged state dict, for a MergeResult."""
    for name, tensor in merged.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise TensorMismatchError(f"expected {name} in a dtype the protocol carries, got {tensor.dtype}")
    entries, chunks = encode_tensors(merged, RAW, chunk_size)
    return entries, chunks, fingerprint_state_dict(merged)
