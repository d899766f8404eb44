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

    python benchmarks/zoo_report.py --size small [--limit 200] [--cache-dir DIR]
    python benchmarks/zoo_report.py --size real --limit 50 --threads 2 [--dtype bfloat16]
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
from merging.testbed.zoo import build_zoo, model_meta


def _row(name: str, acc: dict[str, float]) -> str:
    mean = sum(acc.values()) / len(acc)
    cells = (f"{acc[t]:.2f}" if t in acc else "-" for t in TASKS)
    return f"| {name} | " + " | ".join(cells) + f" | {mean:.2f} |"


def _config(method: str, experts: list[str], *, weight: float = 1.0, density: float | None = None) -> dict:
    """A merge of ``experts`` onto ``base`` with one weight (and density) for every expert."""
    params = {"weight": weight} if density is None else {"weight": weight, "density": density}
    return {
        "merge_method": method,
        "base_model": "base",
        "models": [{"model": name, "parameters": dict(params)} for name in experts],
    }


def _build(size: str, cache_dir: str | None):
    if size == "real":
        from merging.testbed.real_zoo import build_real_zoo

        return build_real_zoo(cache_dir, log=print)
    return build_zoo(size, cache_dir, log=print)


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
        help="score each expert on its own domain only, the base and merges on the four domains",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    style = "auto" if args.size == "real" else "plain"
    start = time.perf_counter()
    zoo = _build(args.size, args.cache_dir)
    print(f"zoo ready in {time.perf_counter() - start:.1f} s (build seconds per model: {zoo.build_seconds})")
    print(f"load average: {os.getloadavg()}")

    experts = args.experts.split(",") if args.experts else list(zoo.experts)

    def score(model, tok, label: str, tasks: list[str] | None = None) -> dict[str, float]:
        result = evaluate(
            model, tok, tasks, "test", args.limit, batch_size=args.batch_size, prompt_style=style
        )
        print(
            f"evaluated {label}: {result.prompts_per_second:.2f} prompts/s, {result.seconds:.0f} s",
            flush=True,
        )
        return result.accuracy

    scores: dict[str, dict[str, float]] = {}
    for name, path in zoo.models().items():
        if name in zoo.experts and name not in experts:
            continue
        model, tok = load_pretrained(path, dtype=args.dtype)
        own = [model_meta(path).get("domain", name)] if args.own_domain and name != "base" else None
        scores[name] = score(model, tok, name, own or (list(DOMAINS) if args.own_domain else None))

    base_model, tok = load_pretrained(zoo.base, dtype=args.dtype)
    tensors = {"base": _float32(load_file(zoo.base / "model.safetensors"))}
    for domain in experts:
        tensors[domain] = _float32(load_file(zoo.experts[domain] / "model.safetensors"))
    merges = {
        "average": _config("task_arithmetic", experts, weight=1.0 / len(experts)),
        "ties (0.5)": _config("ties", experts, density=0.5),
        "ties (0.7)": _config("ties", experts, density=0.7),
        "task arithmetic (0.5)": _config("task_arithmetic", experts, weight=0.5),
        "task arithmetic (1.0)": _config("task_arithmetic", experts, weight=1.0),
        "dare_ties (0.5)": _config("dare_ties", experts, density=0.5),
    }
    for label, config in merges.items():
        merged = merge_state_dicts(config, tensors)
        base_model.load_state_dict({**tensors["base"], **merged}, strict=False)
        scores[label] = score(base_model, tok, label, list(DOMAINS) if args.own_domain else None)

    print("\n| model | " + " | ".join(TASKS) + " | mean |")
    print("|---" * (len(TASKS) + 2) + "|")
    for name, acc in scores.items():
        print(_row(name, acc))
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
