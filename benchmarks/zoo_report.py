"""Build a test-bed zoo, time it, and print every model's accuracy plus simple weight merges.

The merges of the homogeneous experts run through `merging.engine.merge_state_dicts`, to check
that the zoo is mergeable: ``average`` = base + mean of task vectors, ``ties (d)`` = TIES with
density d and weight 1 per expert (the network's default method), ``task arithmetic (l)`` =
base + l * sum of task vectors. Gain retention per domain is (merge - base) / (expert - base).

    python benchmarks/zoo_report.py --size small [--limit 200] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from safetensors.torch import load_file

from merging.engine import merge_state_dicts
from merging.testbed.harness import evaluate, gain_retention
from merging.testbed.models import load_pretrained
from merging.testbed.tasks import DOMAINS, TASKS
from merging.testbed.zoo import build_zoo


def _row(name: str, acc: dict[str, float]) -> str:
    mean = sum(acc.values()) / len(acc)
    return f"| {name} | " + " | ".join(f"{acc[t]:.2f}" for t in TASKS) + f" | {mean:.2f} |"


def _config(method: str, experts: list[str], *, weight: float = 1.0, density: float | None = None) -> dict:
    """A merge of ``experts`` onto ``base`` with one weight (and density) for every expert."""
    params = {"weight": weight} if density is None else {"weight": weight, "density": density}
    return {
        "merge_method": method,
        "base_model": "base",
        "models": [{"model": name, "parameters": dict(params)} for name in experts],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    zoo = build_zoo(args.size, args.cache_dir, log=print)
    print(f"zoo ready in {time.perf_counter() - start:.1f} s (build seconds per model: {zoo.build_seconds})")
    print(f"load average: {os.getloadavg()}")

    scores: dict[str, dict[str, float]] = {}
    for name, path in zoo.models().items():
        model, tok = load_pretrained(path)
        result = evaluate(model, tok, split="test", limit=args.limit, prompt_style="plain")
        scores[name] = result.accuracy
        print(f"evaluated {name}: {result.prompts_per_second:.0f} prompts/s")

    base_model, tok = load_pretrained(zoo.base)
    tensors = {"base": load_file(zoo.base / "model.safetensors")}
    for domain, path in zoo.experts.items():
        tensors[domain] = load_file(path / "model.safetensors")
    merges = {
        "average": _config("task_arithmetic", list(zoo.experts), weight=1.0 / len(zoo.experts)),
        "ties (0.5)": _config("ties", list(zoo.experts), density=0.5),
        "ties (0.7)": _config("ties", list(zoo.experts), density=0.7),
        "task arithmetic (0.5)": _config("task_arithmetic", list(zoo.experts), weight=0.5),
        "task arithmetic (1.0)": _config("task_arithmetic", list(zoo.experts), weight=1.0),
    }
    for label, config in merges.items():
        base_model.load_state_dict({**tensors["base"], **merge_state_dicts(config, tensors)}, strict=False)
        scores[label] = evaluate(
            base_model, tok, split="test", limit=args.limit, prompt_style="plain"
        ).accuracy

    print("\n| model | " + " | ".join(TASKS) + " | mean |")
    print("|---" * (len(TASKS) + 2) + "|")
    for name, acc in scores.items():
        print(_row(name, acc))
    expert_scores = {d: scores[d][d] for d in DOMAINS if d in zoo.experts}
    print("\n| merge | " + " | ".join(expert_scores) + " | mean |")
    print("|---" * (len(expert_scores) + 2) + "|")
    for label in merges:
        kept = gain_retention(scores[label], scores["base"], expert_scores)
        known = [v for v in kept.values() if v is not None]
        mean = f"{sum(known) / len(known):.2f}" if known else "n/a"
        print(
            f"| {label} | "
            + " | ".join("n/a" if kept[d] is None else f"{kept[d]:.2f}" for d in expert_scores)
            + f" | {mean} |"
        )


if __name__ == "__main__":
    main()
