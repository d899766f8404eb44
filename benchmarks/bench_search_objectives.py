"""How well each cheap fitness ranks merge candidates, against greedy-decoding accuracy, and its cost.

Draws N candidates around a config's uniform values (seeded), scores each on the dev split with
the teacher-forced proxies (`loglik`, `seqprob`, `tf_exact`, one forward pass per batch) and with
greedy-decoding accuracy, and prints Spearman's rank correlation of every dev fitness (gain
shares combined by mean, softmin and min) with the test split's accuracy gain share (mean and
minimum over the four domains), plus seconds per candidate of each.

    python benchmarks/bench_search_objectives.py --size small --method ties --candidates 30
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from merging.search.fitness import MergeEvaluator, Objective, normalized_gains
from merging.search.scores import accuracy_scores, proxy_scores
from merging.search.space import SearchSpace
from merging.testbed.tasks import DOMAINS
from merging.testbed.zoo import build_zoo


def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--method", default="ties", choices=["ties", "task_arithmetic", "dare_ties"])
    parser.add_argument("--candidates", type=int, default=30)
    parser.add_argument(
        "--spread", type=float, default=0.3, help="std of the draw around the start, per unit"
    )
    parser.add_argument("--limit", type=int, default=100, help="dev prompts per task (proxies)")
    parser.add_argument("--acc-limit", type=int, default=100, help="dev prompts per task (accuracy)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zoo = build_zoo(args.size)
    params = {"weight": 1.0} if args.method == "task_arithmetic" else {"weight": 1.0, "density": 0.7}
    if args.method == "task_arithmetic":
        params["weight"] = 0.5
    config = {
        "merge_method": args.method,
        "base_model": str(zoo.base),
        "models": [{"model": str(p), "parameters": dict(params)} for p in zoo.experts.values()],
    }
    from merging.config import load_config

    evaluator = MergeEvaluator(load_config(config), DOMAINS, Objective("loglik"), limit=args.limit)
    space = SearchSpace(evaluator.config, evaluator.template, evaluator.searched)
    rng = random.Random(0)
    start = space.start()
    # references for every metric: base and best expert
    refs: dict[str, tuple[dict, dict]] = {}
    per_model: dict[str, dict[str, dict[str, float]]] = {}
    for name, state in evaluator.state_dicts.items():
        evaluator.load_state(state)
        scores = proxy_scores(evaluator.model, evaluator.batches)
        scores["accuracy"] = accuracy_scores(
            evaluator.model, evaluator.tokenizer, DOMAINS, "dev", args.acc_limit
        )
        scores["test"] = accuracy_scores(
            evaluator.model, evaluator.tokenizer, DOMAINS, "test", args.acc_limit
        )
        per_model[name] = scores
    base = per_model[evaluator.config.base_model]
    experts = [n for n in per_model if n != evaluator.config.base_model]
    for metric in base:
        best = {t: max(per_model[e][metric][t] for e in experts) for t in DOMAINS}
        refs[metric] = (base[metric], best)
    rows = []
    proxy_seconds, acc_seconds = 0.0, 0.0
    for number in range(args.candidates):
        x = start if number == 0 else [min(1.0, max(0.0, s + rng.gauss(0, args.spread))) for s in start]
        evaluator.load_merge(space.apply(x))
        t0 = time.perf_counter()
        scores = proxy_scores(evaluator.model, evaluator.batches)
        t1 = time.perf_counter()
        scores["accuracy"] = accuracy_scores(
            evaluator.model, evaluator.tokenizer, DOMAINS, "dev", args.acc_limit
        )
        t2 = time.perf_counter()
        scores["test"] = accuracy_scores(
            evaluator.model, evaluator.tokenizer, DOMAINS, "test", args.acc_limit
        )
        proxy_seconds += t1 - t0
        acc_seconds += t2 - t1
        gains = {m: normalized_gains(scores[m], *refs[m]) for m in scores}
        rows.append(gains)
        print(
            f"candidate {number}: test accuracy gain shares "
            + " ".join(f"{t}={gains['test'][t]:.2f}" for t in DOMAINS),
            flush=True,
        )
    truth = [sum(r["test"].values()) / len(DOMAINS) for r in rows]
    truth_min = [min(r["test"].values()) for r in rows]
    print(f"\n{args.candidates} candidates, method {args.method}, spread {args.spread}")
    print(f"proxy forward: {proxy_seconds / args.candidates:.3f} s/candidate ({args.limit} prompts/task)")
    print(f"greedy accuracy: {acc_seconds / args.candidates:.3f} s/candidate ({args.acc_limit} prompts/task)")
    print("| dev fitness | Spearman vs mean test accuracy share | vs min test accuracy share |")
    print("|---|---|---|")
    for metric in ("loglik", "seqprob", "tf_exact", "accuracy"):
        for aggregate in ("mean", "softmin", "min"):
            values = [Objective(metric, aggregate).combine(r[metric]) for r in rows]
            mean_rho, min_rho = spearman(values, truth), spearman(values, truth_min)
            print(f"| {metric} {aggregate} | {mean_rho:.3f} | {min_rho:.3f} |")


if __name__ == "__main__":
    main()
