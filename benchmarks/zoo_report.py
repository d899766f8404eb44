"""Build a test-bed zoo, time it, and print every model's accuracy plus simple weight merges.

The merges are plain tensor arithmetic on the homogeneous experts (no engine involved), to check
that the zoo is mergeable: ``average`` = base + mean of task vectors, ``task arithmetic (l)`` =
base + l * sum of task vectors. Gain retention per domain is (merge - base) / (expert - base).

    python benchmarks/zoo_report.py --size small [--limit 200] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from safetensors.torch import load_file

from merging.testbed.harness import evaluate, gain_retention
from merging.testbed.models import load_pretrained
from merging.testbed.tasks import DOMAINS, TASKS
from merging.testbed.zoo import build_zoo


def _row(name: str, acc: dict[str, float]) -> str:
    mean = sum(acc.values()) / len(acc)
    return f"| {name} | " + " | ".join(f"{acc[t]:.2f}" for t in TASKS) + f" | {mean:.2f} |"


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
    base = load_file(zoo.base / "model.safetensors")
    deltas = []
    for path in zoo.experts.values():
        expert = load_file(path / "model.safetensors")
        deltas.append({k: expert[k] - base[k] for k in base})
    merges = {"average": 1.0 / len(deltas), "task arithmetic (0.5)": 0.5, "task arithmetic (1.0)": 1.0}
    for label, scale in merges.items():
        merged = {k: base[k] + scale * sum(d[k] for d in deltas) for k in base}
        base_model.load_state_dict(merged, strict=False)
        scores[label] = evaluate(
            base_model, tok, split="test", limit=args.limit, prompt_style="plain"
        ).accuracy

    print("\n| model | " + " | ".join(TASKS) + " | mean |")
    print("|---" * (len(TASKS) + 2) + "|")
    for name, acc in scores.items():
        print(_row(name, acc))
    expert_scores = {d: scores[d][d] for d in DOMAINS if d in zoo.experts}
    print("\n| merge | " + " | ".join(expert_scores) + " |")
    print("|---" * (len(expert_scores) + 1) + "|")
    for label in merges:
        kept = gain_retention(scores[label], scores["base"], expert_scores)
        print(
            f"| {label} | "
            + " | ".join("n/a" if kept[d] is None else f"{kept[d]:.2f}" for d in expert_scores)
            + " |"
        )


if __name__ == "__main__":
    main()
