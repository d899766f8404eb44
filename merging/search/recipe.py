"""A searched candidate as a mergekit-style recipe: per-group values as `{filter, value}` lists.

Each searched parameter becomes a filter list whose entries name the groups' tensors (`layers.3.mlp.`);
the config's own setting follows as the last entry, so tensors outside the search keep it. The
recipe is checked on the way out: resolving it gives exactly the candidate's parameters for every
tensor, so `umm merge RECIPE.yaml` rebuilds the searched model byte for byte. A `row` space's
candidate is a file of row weights (`merging.row_weights`) beside the recipe, which names it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from merging.atomic import write_text_atomic
from merging.config import load_config
from merging.parameters import ResolvedParameters, resolve_parameters
from merging.search.space import SearchSpace

ROWS_SUFFIX = ".rows.safetensors"


def _with_fallback(entries: list[dict[str, Any]], original: Any) -> list[dict[str, Any]]:
    if original is None:
        return entries  # no own setting: unmatched tensors fall through to the top-level value
    if isinstance(original, dict):
        original = [original]
    if isinstance(original, list) and original and isinstance(original[0], dict):
        return entries + copy.deepcopy(original)
    return [*entries, {"value": copy.deepcopy(original)}]


def recipe_mapping(space: SearchSpace, x: Sequence[float], name: str | None = None) -> dict[str, Any]:
    """The config of `space` with candidate `x`'s values written in (model paths made absolute; a
    `row` space's values go to a row-weights file, see `write_recipe`)."""
    data = space.config.to_dict()
    if name is not None:
        data["name"] = name
    if space.rowwise:
        return data
    entries: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
    for dim, value in zip(space.dimensions, space.values(x), strict=True):
        target = entries.setdefault((dim.key, dim.model), [])
        target.extend({"filter": flt, "value": value} for flt in space.filters[dim.group])
    for entry in data.get("models", []):
        params = entry.setdefault("parameters", {})
        for key in space.keys:
            if (key, entry["model"]) in entries:
                params[key] = _with_fallback(entries[(key, entry["model"])], params.get(key))
    top = data.setdefault("parameters", {})
    for key in space.keys:
        if (key, None) in entries:
            top[key] = _with_fallback(entries[(key, None)], top.get(key))
    if not top:
        del data["parameters"]
    return data


def check_recipe(data: dict[str, Any], expected: ResolvedParameters, tensors: Sequence[str]) -> None:
    """Raise `RuntimeError` if resolving `data` does not give `expected` for every tensor (a bug)."""
    resolved = resolve_parameters(load_config(data), list(tensors))
    for tensor in tensors:
        if resolved[tensor] != expected[tensor]:
            raise RuntimeError(f"the written recipe does not reproduce the parameters of {tensor!r}")


def write_recipe(
    path: str | Path,
    space: SearchSpace,
    x: Sequence[float],
    tensors: Sequence[str],
    name: str | None = None,
) -> Path:
    """Write candidate `x` as a YAML recipe (atomically), after checking that it reproduces `x`; a
    `row` space's row weights go first to `<recipe>.rows.safetensors`, which the recipe names."""
    data = recipe_mapping(space, x, name)
    rows = space.row_weights(x)
    if rows is not None:
        import torch

        from merging.row_weights import load_row_weights, save_row_weights

        models = [entry["model"] for entry in data["models"]]
        target = Path(path).with_suffix(ROWS_SUFFIX).resolve()
        data["row_weights"] = str(save_row_weights(target, models, rows))
        saved = load_row_weights(target, models)
        if any(not torch.equal(saved[m][t], v) for m, ts in rows.items() for t, v in ts.items()):
            raise RuntimeError("the written row weights do not reproduce the candidate")
    check_recipe(data, space.apply(x), tensors)
    return write_text_atomic(path, yaml.safe_dump(data, sort_keys=False, width=120))
