"""Comparing evaluated models: which model is each domain's expert, and every model's gain retention."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from merging.testbed.harness import EvalResult, gain_retention
from merging.testbed.tasks import DOMAINS


def pick_experts(
    results: Mapping[str, EvalResult], metas: Mapping[str, Mapping[str, Any]], base: str
) -> dict[str, str]:
    """Per domain, the model declared its expert (zoo metadata) or else the best scorer but the base."""
    experts: dict[str, str] = {}
    for domain in DOMAINS:
        declared = [
            name
            for name, meta in metas.items()
            if meta.get("role") == "expert" and meta.get("domain") == domain
        ]
        candidates = [name for name, res in results.items() if name != base and domain in res.accuracy]
        if declared and declared[0] in results:
            experts[domain] = declared[0]
        elif candidates:
            experts[domain] = max(candidates, key=lambda name: (results[name].accuracy[domain], name))
    return experts


def comparison(
    results: Mapping[str, EvalResult], metas: Mapping[str, Mapping[str, Any]], base: str | None
) -> dict[str, Any]:
    """JSON-ready summary: each model's scores and, given a base, its gain retention per domain."""
    out: dict[str, Any] = {"models": {name: res.to_dict() for name, res in results.items()}}
    if base is None:
        return out
    experts = pick_experts(results, metas, base)
    expert_scores = {d: results[name].accuracy[d] for d, name in experts.items()}
    out["base"] = base
    out["experts"] = experts
    out["retention"] = {
        name: gain_retention(res.accuracy, results[base].accuracy, expert_scores)
        for name, res in results.items()
        if name != base
    }
    return out
