"""Build a test-bed zoo, time it, and print every model's accuracy plus simple weight merges.

The merges of the homogeneous experts run through `merging.engine.merge_state_dicts`, to check
that the zoo is mergeable: ``average`` = base + mean of task vectors, ``ties (d)`` = TIES with
density d and weight 1 per expert (the network's default method), ``task arithmetic (l)`` =
base + l * sum of task vectors, ``dare_ties (0.5)`` = DARE drop (density 0.5, rescaled) then
TIES sign election. Gain retention per domain is (merge - base) / (expert - base).

``--size real`` reads the real zoo (`merging.testbed.real_zoo`, built if missing): models are
prompted with their chat template (Gemma-3, which has none, with the plain prompt) and merged in
float32 from their bfloat16 weights. ``--experts`` restricts the merges to some domains (a
pairwise merge, as the recipe probes use).

``--own-domain`` scores each expert on its own domain with ``--limit`` prompts, on every other task
with ``--other-limit`` (0: not at all), the base on the four domains with ``--limit``, and the
merges on every task with ``--merge-limit``: the acceptance run of the real zoo.

    python benchmarks/zoo_report.py --size small [--limit 200] [--cache-dir DIR]
    python benchmarks/zoo_report.py --size real --own-domain --limit 300 --other-limit 50 \
        --merge-limit 50 --threads 2 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from merging.engine import merge_state_dicts
from merging.testbed.harness import evaluate, gain_retention
from merging.testbed.models import load_pretrained
from merging.testbed.sizes import build_any_zoo
from merging.testbed.tasks import DOMAINS, TASKS
from merging.testbed.zoo import model_meta


def _row(name: str, acc: dict[str, float]) -> str:
    mean = sum(acc.values()) / len(acc)
    cells = (f"{acc[t]:.2f}" if t in acc else "-" for t in TASKS)
    return f"| {name} | " + " | ".join(cells) + f" | {mean:.2f} |"


def uniform_config(
    method: str, experts: list[str], *, weight: float = 1.0, density: float | None = None
) -> dict:
    """A merge of ``experts`` onto ``base`` with one weight (and density) for every expert."""
    params = {"weight": weight} if density is None else {"weight": weight, "density": density}
    return {
        "merge_method": method,
        "base_model": "base",
        "models": [{"model": name, "parameters": dict(params)} for name in experts],
    }


def _float32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.float() for name, t in state.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--experts", default=None, help="comma-separated domains to merge (default: all)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--own-domain",
        action="store_true",
        help="score each expert on its own domain (--limit) and elsewhere (--other-limit), the base on "
        "the four domains (--limit), the merges on every task (--merge-limit)",
    )
    parser.add_argument("--other-limit", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write every score to this file")
    parser.add_argument(
        "--merges-only", action="store_true", help="score the base and the merges, not the zoo's models"
    )
    parser.add_argument("--merge-limit", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    style = "auto" if args.size == "real" else "plain"
    start = time.perf_counter()
    zoo = build_any_zoo(args.size, args.cache_dir, log=print)
    print(f"zoo ready in {time.perf_counter() - start:.1f} s (build seconds per model: {zoo.build_seconds})")
    print(f"load average: {os.getloadavg()}")

    experts = args.experts.split(",") if args.experts else list(zoo.experts)

    def score(model, tok, label: str, tasks: list[str] | None, limit: int | None) -> dict[str, float]:
        result = evaluate(model, tok, tasks, "test", limit, batch_size=args.batch_size, prompt_style=style)
        print(
            f"evaluated {label} on {limit or 'all'} prompts per task: "
            f"{result.prompts_per_second:.2f} prompts/s, {result.seconds:.0f} s",
            flush=True,
        )
        return dict(result.accuracy)

    scores: dict[str, dict[str, float]] = {}
    for name, path in zoo.models().items():
        if (name in zoo.experts and name not in experts) or (args.merges_only and name != "base"):
            continue
        model, tok = load_pretrained(path, dtype=args.dtype)
        if not args.own_domain:
            scores[name] = score(model, tok, name, None, args.limit)
        elif name == "base":
            scores[name] = score(model, tok, name, list(DOMAINS), args.limit)
        else:
            own = model_meta(path).get("domain", name)
            scores[name] = score(model, tok, name, [own], args.limit)
            others = [t for t in TASKS if t != own]
            if args.other_limit and name in zoo.experts:
                scores[name].update(score(model, tok, f"{name} elsewhere", others, args.other_limit))

    base_model, tok = load_pretrained(zoo.base, dtype=args.dtype)
    tensors = {"base": _float32(load_file(zoo.base / "model.safetensors"))}
    for domain in experts:
        tensors[domain] = _float32(load_file(zoo.experts[domain] / "model.safetensors"))
    merges = {
        "average": uniform_config("task_arithmetic", experts, weight=1.0 / len(experts)),
        "ties (0.5)": uniform_config("ties", experts, density=0.5),
        "ties (0.7)": uniform_config("ties", experts, density=0.7),
        "task arithmetic (0.5)": uniform_config("task_arithmetic", experts, weight=0.5),
        "task arithmetic (1.0)": uniform_config("task_arithmetic", experts, weight=1.0),
        "dare_ties (0.5)": uniform_config("dare_ties", experts, density=0.5),
    }
    for label, config in merges.items():
        merged = merge_state_dicts(config, tensors)
        base_model.load_state_dict({**tensors["base"], **merged}, strict=False)
        limit = args.merge_limit if args.own_domain else args.limit
        scores[label] = score(base_model, tok, label, None, limit)

    print("\n| model | " + " | ".join(TASKS) + " | mean |")
    print("|---" * (len(TASKS) + 2) + "|")
    for name, acc in scores.items():
        print(_row(name, acc))
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=2, sort_keys=True) + "\n")
    if args.merges_only:
        return
    expert_scores = {d: scores[d][d] for d in DOMAINS if d in experts}
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
