"""Seconds per training step of the real zoo's recipe on this machine (issue 18).

Runs the real build (`build_real_zoo`: 2 workers x the recipe's threads, the recipe's batch shapes,
replay and data) with every model's steps cut to ``--steps``, into a throwaway cache, printing each
step's time; a whole build's time is about (recipe steps / --steps) x each model's seconds.

    python benchmarks/real_zoo_steps.py [--steps 20] [--cache-dir /tmp/umm-steps]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable

from merging.testbed.real_zoo import REAL_RECIPE, RealRecipe, build_real_zoo


def cut_recipe(steps: int) -> RealRecipe:
    """`REAL_RECIPE` with every model's training cut to `steps` steps (its cache key changes)."""
    heterogeneous = tuple(
        dataclasses.replace(h, train=dataclasses.replace(h.train, steps=steps))
        for h in REAL_RECIPE.heterogeneous
    )
    return dataclasses.replace(
        REAL_RECIPE,
        expert_train=dataclasses.replace(REAL_RECIPE.expert_train, steps=steps),
        heterogeneous=heterogeneous,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cache-dir", default="/tmp/umm-steps")
    args = parser.parse_args()
    started = time.time()

    def reporter(name: str, steps: int) -> Callable[[int, float], None]:
        def hook(step: int, loss: float) -> None:
            print(f"{time.time() - started:8.1f} s  {name} step {step}/{steps} loss {loss:.4f}", flush=True)

        return hook

    zoo = build_real_zoo(args.cache_dir, recipe=cut_recipe(args.steps), log=print, reporter=reporter)
    print(f"whole build {time.time() - started:.0f} s; seconds per model: {json.dumps(zoo.build_seconds)}")
    for name, seconds in zoo.build_seconds.items():
        if name != "base":
            print(f"{name}: {seconds / args.steps:.1f} s per step (with its load and save)")


if __name__ == "__main__":
    main()
