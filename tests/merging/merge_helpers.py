"""Small builders shared by the merging tests."""

from __future__ import annotations

import torch

from merging.engine import merge_state_dicts

NAME = "model.layers.0.mlp.up_proj.weight"


def merge_one(
    method: str,
    base: torch.Tensor | None,
    models: dict[str, torch.Tensor],
    model_params=None,
    parameters=None,
    name: str = NAME,
    seed: int = 0,
    grams: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Merge a single tensor with `method`; `models` maps model names to their tensor (and `grams`
    to its input Gram, for data-aware methods)."""
    model_params = model_params or {}
    tensors = {m: {name: t} for m, t in models.items()}
    config = {
        "merge_method": method,
        "models": [{"model": m, "parameters": model_params.get(m, {})} for m in models],
        "seed": seed,
    }
    if base is not None:
        tensors["base"] = {name: base}
        config["base_model"] = "base"
    if parameters:
        config["parameters"] = parameters
    per_model = None if grams is None else {m: {name: g} for m, g in grams.items()}
    return merge_state_dicts(config, tensors, grams=per_model)[name]
