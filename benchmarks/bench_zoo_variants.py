"""How mergeable a variant of the small zoo's expert recipe is: train its four experts, score merges.

The four domain experts are trained from a base folder (default: the committed small zoo's) with
the committed expert recipe changed by ``--lr``, ``--steps`` and ``--anchor`` (decoupled decay
toward the base, `TrainSpec.anchor`); ``--hidden`` trains them on a base of that width (build the
base first with ``--build-base``, the committed base recipe at that width). Then the base, the
experts and four uniform merges (average, TIES 0.7, task arithmetic 0.5 and 1.0) are scored on
``--split`` (default dev: a recipe is chosen without the test split), with gain retention.

    python benchmarks/bench_zoo_variants.py runs/lr5e-4 --lr 5e-4
    python benchmarks/bench_zoo_variants.py runs/h128 --hidden 128 --build-base
    python benchmarks/bench_zoo_variants.py runs/v6 --experts-from ~/.cache/umm/zoo/small-*/
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from zoo_report import uniform_config

from merging.engine import merge_state_dicts
from merging.testbed import zoo as zoo_module
from merging.testbed.harness import evaluate, gain_retention
from merging.testbed.models import load_pretrained
from merging.testbed.tasks import DOMAINS, TASKS
from merging.testbed.zoo import RECIPES, ModelSpec, ZooRecipe, build_zoo


def _recipe(args: argparse.Namespace) -> ZooRecipe:
    recipe = RECIPES["small"]
    if args.hidden:
        spec = ModelSpec(
            "llama", hidden=args.hidden, layers=2, heads=args.hidden // 32, intermediate=3 * args.hidden
        )
        recipe = replace(recipe, base_model=spec, heterogeneous=())
    expert = replace(recipe.expert_train, lr=args.lr, steps=args.steps, anchor=args.anchor)
    return replace(recipe, expert_train=expert)


def _base_folder(args: argparse.Namespace, recipe: ZooRecipe) -> Path:
    if args.build_base:
        return build_zoo(
            recipe=replace(recipe, domains=(), heterogeneous=()), cache_dir=args.out / "zoo", log=print
        ).base
    return Path(args.base) if args.base else build_zoo("small", log=print).base


def _train_experts(out: Path, base: Path, recipe: ZooRecipe) -> None:
    state = load_pretrained(base)[0].state_dict()
    start = time.perf_counter()
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {
            domain: pool.submit(
                zoo_module._train_in_worker,
                out / "experts" / domain,
                recipe,
                recipe.base_model,
                replace(recipe.expert_train, mixture=((domain, 1.0), *recipe.expert_train.mixture)),
                recipe.seed + 1 + i,
                {"role": "expert", "domain": domain},
                state,
            )
            for i, domain in enumerate(DOMAINS)
        }
        for domain, job in jobs.items():
            print(f"trained {domain} in {job.result()[1]:.0f} s", flush=True)
    print(f"experts trained in {time.perf_counter() - start:.0f} s", flush=True)


def _merges() -> dict[str, dict]:
    experts = list(DOMAINS)
    return {
        "average": uniform_config("task_arithmetic", experts, weight=1 / len(experts)),
        "ties (0.7)": uniform_config("ties", experts, density=0.7),
        "task arithmetic (0.5)": uniform_config("task_arithmetic", experts, weight=0.5),
        "task arithmetic (1.0)": uniform_config("task_arithmetic", experts, weight=1.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("out", type=Path, help="folder for the experts and scores.json")
    parser.add_argument("--lr", type=float, default=RECIPES["small"].expert_train.lr)
    parser.add_argument("--steps", type=int, default=RECIPES["small"].expert_train.steps)
    parser.add_argument("--anchor", type=float, default=0.0)
    parser.add_argument("--hidden", type=int, default=0, help="base width (0: the committed 64)")
    parser.add_argument("--base", default=None, help="base folder (default: the committed small zoo's)")
    parser.add_argument("--build-base", action="store_true", help="train the base of --hidden first")
    parser.add_argument("--experts-from", default=None, help="score this zoo folder's experts instead")
    parser.add_argument("--split", default="dev", choices=["dev", "test"])
    parser.add_argument("--limit", type=int, default=100)
    args = parser.parse_args()

    recipe = _recipe(args)
    if args.experts_from:
        base, experts = Path(args.experts_from) / "base", Path(args.experts_from) / "experts"
    else:
        base, experts = _base_folder(args, recipe), args.out / "experts"
        _train_experts(args.out, base, recipe)
    torch.set_num_threads(2)
    model, tok = load_pretrained(base)

    def score(label: str) -> dict[str, float]:
        result = evaluate(model, tok, None, args.split, args.limit, batch_size=512, prompt_style="plain")
        print(f"scored {label}: {result.seconds:.0f} s", flush=True)
        return dict(result.accuracy)

    tensors = {"base": load_file(base / "model.safetensors")}
    scores = {"base": score("base")}
    for domain in DOMAINS:
        tensors[domain] = load_file(experts / domain / "model.safetensors")
        model.load_state_dict(tensors[domain], strict=False)  # the tied head is not stored
        scores[domain] = score(domain)
    for label, config in _merges().items():
        model.load_state_dict({**tensors["base"], **merge_state_dicts(config, tensors)}, strict=False)
        scores[label] = score(label)

    print(
        f"\n| model | {' | '.join(TASKS)} | domain mean | retention mean |\n|---"
        + "|---" * (len(TASKS) + 2)
        + "|"
    )
    own = {d: scores[d][d] for d in DOMAINS}
    for label, acc in scores.items():
        kept = [v for v in gain_retention(acc, scores["base"], own).values() if v is not None]
        retention = f"{sum(kept) / len(kept):.2f}" if label != "base" and kept else "-"
        cells = " | ".join(f"{acc[t]:.2f}" for t in TASKS)
        print(f"| {label} | {cells} | {sum(acc[d] for d in DOMAINS) / len(DOMAINS):.2f} | {retention} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scores.json").write_text(json.dumps(scores, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
