"""Evaluation throughput against the compute floor measured in the same run.

Tiny zoo (``--size``): prompts per second (target >= 200), against the harness decoding one
prompt at a time on a subset. Any HF folder (``--model-dir``, e.g. a real zoo expert): decoding
throughput (prompt + generated tokens per second of ``evaluate``) against a teacher-forced forward
pass over the same prompts followed by their reference responses, in batches of the same size
(target >= 50 %), with and without the full-vocabulary head on every position; and prompts per
second (target >= 1.5 on a fine-tuned expert).

    python benchmarks/bench_eval.py [--size small] [--model arithmetic] [--limit 300] [--threads 2]
    python benchmarks/bench_eval.py --model-dir DIR [--tasks arithmetic] [--limit 60] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from merging.testbed.harness import chat_prompt, evaluate, plain_prompt
from merging.testbed.models import load_pretrained
from merging.testbed.tasks import generate, resolve_tasks
from merging.testbed.zoo import build_zoo

TARGET_PROMPTS_PER_SECOND = 200.0
TARGET_REAL_PROMPTS_PER_SECOND = 1.5
TARGET_DECODE_RATIO = 0.5


@torch.inference_mode()
def forward_tokens_per_second(
    model, tok, tasks: list[str], limit: int | None, batch_size: int, full_head: bool
) -> float:
    """Tokens per second of one teacher-forced forward over each prompt and its reference
    response, right-padded batches of ``batch_size`` (padding not counted)."""
    chat = bool(getattr(tok, "chat_template", None))
    texts = []
    for task in tasks:
        for ex in generate(task, "test")[:limit]:
            prompt = chat_prompt(tok, task, ex.prompt) if chat else plain_prompt(ex.prompt)
            texts.append(prompt + ex.response)
    texts.sort(key=len)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tokens, start = 0, time.perf_counter()
    for lo in range(0, len(texts), batch_size):
        rows = [tok(t, add_special_tokens=not chat)["input_ids"] for t in texts[lo : lo + batch_size]]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(rows):
            ids[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1
        model(input_ids=ids, attention_mask=mask, logits_to_keep=0 if full_head else 1)
        tokens += int(mask.sum())
    return tokens / (time.perf_counter() - start)


def real_main(args: argparse.Namespace) -> None:
    model, tok = load_pretrained(args.model_dir, dtype=args.dtype)
    tasks = resolve_tasks(args.tasks)
    evaluate(model, tok, tasks[:1], limit=2, batch_size=2)  # warm-up
    result = evaluate(model, tok, tasks, limit=args.limit, batch_size=args.batch_size)
    full = forward_tokens_per_second(model, tok, tasks, args.limit, args.batch_size, full_head=True)
    last = forward_tokens_per_second(model, tok, tasks, args.limit, args.batch_size, full_head=False)
    n = sum(result.counts.values())
    print(f"model {args.model_dir} ({args.dtype}), {args.threads} threads, load {os.getloadavg()}")
    print(f"evaluate : {n} prompts in {result.seconds:.1f} s = {result.prompts_per_second:.2f} prompts/s")
    print(
        f"decoding : {result.prompt_tokens} prompt + {result.generated_tokens} generated tokens"
        f" = {result.tokens_per_second:.0f} tokens/s"
    )
    print(f"forward  : {full:.0f} tokens/s (every position's logits), {last:.0f} tokens/s (last only)")
    ratio = result.tokens_per_second / full
    print(
        f"decoding / forward: {ratio:.2f} (target {TARGET_DECODE_RATIO:.2f}); vs last-only forward:"
        f" {result.tokens_per_second / last:.2f}"
    )
    speed = result.prompts_per_second / TARGET_REAL_PROMPTS_PER_SECOND
    print(f"prompts/s vs target {TARGET_REAL_PROMPTS_PER_SECOND}: {speed:.2f}x")
    print(f"accuracy {result.accuracy} mean {result.mean:.3f}")


def tiny_main(args: argparse.Namespace) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", default="small")
    parser.add_argument(
        "--model", default="arithmetic", help="base, a domain, or a heterogeneous expert name"
    )
    parser.add_argument("--model-dir", default=None, help="any HF folder (real models): token throughput")
    parser.add_argument("--tasks", default=None, help="with --model-dir: comma-separated tasks")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
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
    if args.model_dir:
        real_main(args)
    else:
        tiny_main(args)


if __name__ == "__main__":
    main()
