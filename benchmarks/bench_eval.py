"""Evaluation throughput on a tiny zoo model: prompts per second, target >= 200.

The floor, measured in the same run, is the same harness decoding one prompt at a time
(``batch_size=1``) on a subset; the ratio shows what batching with left padding buys.

    python benchmarks/bench_eval.py [--size small] [--model arithmetic] [--limit 300] [--threads 2]
"""

from __future__ import annotations

import argparse
import os

import torch

from merging.testbed.harness import evaluate
from merging.testbed.models import load_pretrained
from merging.testbed.zoo import build_zoo

TARGET_PROMPTS_PER_SECOND = 200.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", default="small")
    parser.add_argument(
        "--model", default="arithmetic", help="base, a domain, or a heterogeneous expert name"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="prompts per task (default: whole test split)"
    )
    parser.add_argument(
        "--floor-limit", type=int, default=10, help="prompts per task for the unbatched floor"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zoo = build_zoo(args.size)
    model, tok = load_pretrained(zoo.models()[args.model])
    evaluate(model, tok, limit=8, prompt_style="plain")  # warm-up
    batched = evaluate(model, tok, limit=args.limit, batch_size=args.batch_size, prompt_style="plain")
    floor = evaluate(model, tok, limit=args.floor_limit, batch_size=1, prompt_style="plain")
    n = sum(batched.counts.values())
    print(f"model {args.size}/{args.model}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"batched   : {n} prompts in {batched.seconds:.2f} s = {batched.prompts_per_second:.0f} prompts/s")
    print(f"unbatched : {floor.prompts_per_second:.1f} prompts/s (floor)")
    print(f"ratio vs floor: {batched.prompts_per_second / floor.prompts_per_second:.1f}x")
    ratio = batched.prompts_per_second / TARGET_PROMPTS_PER_SECOND
    print(f"target {TARGET_PROMPTS_PER_SECOND:.0f} prompts/s: {ratio:.2f}x")
    print(f"mean accuracy {batched.mean:.3f}")


if __name__ == "__main__":
    main()
