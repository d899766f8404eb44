"""The real heterogeneous pair: the Gemma-3-270M lists expert fused into a SmolLM2-135M pivot.

1. a probe set of `--probes` prompts of the `lists` train split;
2. the Gemma-3 expert's summary on it (`umm summarize`'s code path: greedy responses, top-k);
3. for each `--lambdas` value, a copy of the real zoo's SmolLM2 base distilled from it
   (`umm fuse`'s code path; lambda 1.0 is the text-only control), with the alignment quality
   (share of top-k mass mapped exactly, by edit distance, dropped) and the held-out check;
4. exact match on the test split: `lists` (`--limit`) for base, source, fused copies and the
   homogeneous SmolLM2 lists expert, and the other domains (`--other-limit`) for forgetting; and
   `lists` once more with each prompt rendered as the probe prompts were (no answer-format hint:
   the harness's chat prompt adds one, which the fused copies never read);
5. with `--merge-density D`, fuse-then-merge: TIES at density D of the four SmolLM2 experts, with
   and without the lambda-0.9 copy, on every domain (`--merge-limit` prompts each).

    python benchmarks/real_fusion.py --workdir /tmp/real-fusion [--probes 400] [--steps 100]

Every stage's output is kept in WORKDIR and reused, so a killed run resumes where it stopped.
Prints markdown tables; every number goes to WORKDIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging

from merging.fusion import SHARED_PARAMETERS
from merging.fusion.distill import DistillSpec
from merging.fusion.pipeline import fuse_into_pivot, summarize_model
from merging.fusion.summary import ProbeSet, load_summary, render_prompt
from merging.testbed.harness import evaluate, greedy_generate, plain_prompt, score
from merging.testbed.models import load_pretrained
from merging.testbed.real_zoo import build_real_zoo
from merging.testbed.tasks import generate

SOURCE = "gemma3-lists"
DOMAINS = ("arithmetic", "lists", "logic", "tracing")


def _probe_format_accuracy(path: Path, task: str, limit: int, threads: int, batch: int = 32) -> float:
    """Exact match with each test prompt rendered as the probe prompts were for this model
    (`render_prompt` of the plain prompt, its chat template when it has one, without the harness's
    answer-format hint): what a copy distilled on the probe set was trained to read."""
    torch.set_num_threads(threads)
    model, tok = load_pretrained(path)
    examples = generate(task, "test")[:limit]
    prompts = [render_prompt(tok, plain_prompt(ex.prompt), "auto") for ex in examples]
    plain = not getattr(tok, "chat_template", None)
    budget = 4 + max(len(tok(ex.response, add_special_tokens=False)["input_ids"]) for ex in examples)
    outputs = []
    for lo in range(0, len(prompts), batch):
        outputs += greedy_generate(model, tok, prompts[lo : lo + batch], budget, add_special_tokens=plain)
    return sum(score(o, ex.answer) for o, ex in zip(outputs, examples, strict=True)) / len(examples)


def _evaluate(path: Path, task: str, limit: int, threads: int) -> float:
    torch.set_num_threads(threads)
    model, tok = load_pretrained(path)
    return evaluate(model, tok, [task], split="test", limit=limit, batch_size=64).accuracy[task]


def _merge(zoo, experts: list[Path], density: float, out: Path) -> None:
    """TIES at `density`, every expert at weight 0.5 (uniform: TIES normalizes the weights)."""
    import shutil

    from merging.engine import merge

    config = {
        "merge_method": "ties",
        "base_model": str(zoo.base),
        "models": [{"model": str(e), "parameters": {"weight": 0.5, "density": density}} for e in experts],
        "dtype": "bfloat16",
    }
    merge(config, out, progress=False)
    for side in Path(zoo.base).iterdir():  # the tokenizer, to evaluate the merged model
        if side.suffix != ".safetensors" and not (out / side.name).exists():
            shutil.copy(side, out / side.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--probes", type=int, default=400)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=5e-5, help="The real experts' learning rate.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lambdas", default="0.9,1.0")
    parser.add_argument("--limit", type=int, default=300, help="lists test prompts.")
    parser.add_argument("--other-limit", type=int, default=50, help="Test prompts of the other domains.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--merge-density", type=float, help="Also merge the experts with the fused copy.")
    parser.add_argument("--merge-limit", type=int, default=50, help="Test prompts per domain for the merges.")
    args = parser.parse_args()
    transformers_logging.disable_progress_bar()  # a "Loading weights" bar per model load
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def save() -> None:
        results["load_average"] = os.getloadavg()
        results_path.write_text(json.dumps(results, indent=2, sort_keys=True))

    zoo = build_real_zoo()  # the cached real zoo (`umm zoo build --size real` builds it)
    source = zoo.heterogeneous[SOURCE]
    probe = ProbeSet(tuple(plain_prompt(ex.prompt) for ex in generate("lists", "train", n=args.probes)))
    summary_path = work / f"{SOURCE}.summary"
    if not summary_path.exists():
        tick = time.perf_counter()
        summarize_model(source, probe, summary_path, max_new_tokens=args.max_new_tokens, threads=args.threads)
        results["summary_seconds"] = round(time.perf_counter() - tick, 1)
    summary = load_summary(summary_path, probe)
    positions = int(summary.offsets[-1])
    size = summary_path.stat().st_size
    results["summary"] = {
        "prompts": len(probe.prompts),
        "positions": positions,
        "bytes": size,
        "bytes_per_prompt": round(size / len(probe.prompts), 1),
        "bytes_per_position": round(size / positions, 2),
    }
    print(f"summary: {results['summary']} ({results.get('summary_seconds')} s)", flush=True)
    save()
    models = {
        "base (pivot)": zoo.base,
        f"{SOURCE} (source)": source,
        "SmolLM2 lists expert": zoo.experts["lists"],
    }
    for lam in [float(x) for x in args.lambdas.split(",")]:
        out = work / f"fused-{lam}"
        key = f"fused lambda {lam}" + (" (text-only control)" if lam == 1.0 else "")
        if not (out / "fusion.json").exists():
            tick = time.perf_counter()
            spec = DistillSpec(
                steps=args.steps,
                lr=args.lr,
                batch_size=args.batch_size,
                lam=lam,
                warmup=max(1, args.steps // 10),
                threads=args.threads,
                frozen=SHARED_PARAMETERS,
            )
            fuse_into_pivot(zoo.base, [summary_path], out, probe=probe, spec=spec, progress=False)
            results.setdefault("fuse_seconds", {})[key] = round(time.perf_counter() - tick, 1)
        fusion = json.loads((out / "fusion.json").read_text())
        results.setdefault("alignment", {})[key] = next(iter(fusion["alignment"].values()))
        results.setdefault("held_out", {})[key] = fusion["held_out"]
        print(f"{key}: alignment {results['alignment'][key]}, held-out {fusion['held_out']}", flush=True)
        models[key] = out
        save()
    accuracy = results.setdefault("accuracy", {})
    for name, path in models.items():
        row = accuracy.setdefault(name, {})
        for task in ("lists", *[d for d in DOMAINS if d != "lists"]):
            if task in row:
                continue
            tick = time.perf_counter()
            limit = args.limit if task == "lists" else args.other_limit
            row[task] = _evaluate(path, task, limit, args.threads)
            print(f"{name} {task}: {row[task]:.3f} ({time.perf_counter() - tick:.0f} s)", flush=True)
            save()
    merge_paths = {}
    if args.merge_density is not None:
        merged = results.setdefault("merges", {})
        for with_fused in (False, True):
            name = f"TIES {args.merge_density} (4 experts" + (" + fused copy)" if with_fused else ")")
            out = work / ("merge-fused" if with_fused else "merge-experts")
            if not (out / "model.safetensors").exists():
                fused_copy = [models["fused lambda 0.9"]] if with_fused else []
                _merge(zoo, [*zoo.experts.values(), *fused_copy], args.merge_density, out)
            merge_paths[name] = out
            row = merged.setdefault(name, {})
            for task in DOMAINS:
                if task not in row:
                    row[task] = _evaluate(out, task, args.merge_limit, args.threads)
                    print(f"{name} {task}: {row[task]:.3f}", flush=True)
                    save()
    probe_format = results.setdefault("lists_probe_format", {})
    for name, path in {**models, **merge_paths}.items():
        if name not in probe_format:
            limit = args.limit if name in models else args.merge_limit
            probe_format[name] = _probe_format_accuracy(path, "lists", limit, args.threads)
            print(f"{name} lists, probe format: {probe_format[name]:.3f}", flush=True)
            save()
    print("| model | " + " | ".join(DOMAINS) + " | lists, probe format |")
    print("|---|" + "---|" * (len(DOMAINS) + 1))
    for name, row in {**accuracy, **results.get("merges", {})}.items():
        print(
            f"| {name} | " + " | ".join(f"{row[t]:.2f}" for t in DOMAINS) + f" | {probe_format[name]:.2f} |"
        )


if __name__ == "__main__":
    main()
