"""A round's search inputs on disk and the evaluator that scores candidates and proposals on them.

Searchers and verifiers score merges with `merging.search` (one `MergeEvaluator` per round: base
and experts loaded once, every candidate merged in memory). The evaluator reads model folders, so
the node writes, once per round under ``<data dir>/search/<round>/``, the base (its tensors and
side files from the store) and one folder per admitted contribution named by its id, holding
base + decoded delta in float32: the same bytes on every node, since they come from the same
chunks. The merge config lists the experts in sorted-id order with the genesis's method and
parameters, so a searcher's claim and a verifier's recomputation run the same code on the same
inputs.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from merging.search.fitness import MergeEvaluator, Objective
from node.model_folders import COMPLETE, base_state, write_model_folder
from node.round_context import RoundContext
from protocol.search_rules import SearchSettings

BASE_FOLDER = "base"


def write_inputs(
    ctx: RoundContext, folder: Path, deltas: Mapping[str, Mapping[str, torch.Tensor]]
) -> dict[str, Any]:
    """Write the base and each contribution (id -> decoded deltas) under `folder`; the merge config."""
    genesis = ctx.genesis
    admitted = sorted(deltas)
    if not (folder / COMPLETE).exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        base = base_state(ctx)
        for name, state in [(BASE_FOLDER, base)] + [
            (cid, {k: (base[k].float() + deltas[cid][k]).contiguous() for k in base}) for cid in admitted
        ]:
            write_model_folder(ctx, folder / name, state)
        (folder / COMPLETE).touch()
    return {
        "merge_method": genesis.method,
        "base_model": str(folder / BASE_FOLDER),
        "models": [{"model": str(folder / cid)} for cid in admitted],
        "parameters": dict(genesis.parameters),
        "dtype": "float32",
    }


def make_evaluator(config: dict[str, Any], settings: SearchSettings) -> MergeEvaluator:
    """The round's evaluator: the genesis's dev set, metric and aggregate (protocol.search_rules)."""
    from merging.config import load_config

    objective = Objective(metric=settings.metric, aggregate=settings.aggregate)
    return MergeEvaluator(load_config(config), settings.tasks, objective, limit=settings.limit)


def proposal_config(
    config: dict[str, Any], parameters: Mapping[str, Any], candidates: Sequence[str]
) -> dict[str, Any]:
    """The merge config of a proposal's parameters (``{"models": {id: ...}, "global": ...}``)."""
    models = parameters["models"]
    out = {**config, "parameters": dict(parameters["global"])}
    out["models"] = []
    for entry in config["models"]:
        cid = Path(entry["model"]).name
        if cid not in candidates:
            continue
        settings = models.get(cid)
        out["models"].append({"model": entry["model"], **({"parameters": settings} if settings else {})})
    return out


def proposal_parameters(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """A searched recipe's config (merging.search.recipe) as proposal parameters, models by id."""
    models = {Path(m["model"]).name: dict(m.get("parameters", {})) for m in recipe.get("models", [])}
    return {"models": models, "global": dict(recipe.get("parameters", {}))}
