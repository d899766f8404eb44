"""Heterogeneous fusion on the small zoo: the GPT-2 lists expert's summary distilled into the base.

1. a probe set of `--probes` prompts of the `lists` train split (no references);
2. the GPT-2 expert's response summary on it (`umm summarize`'s code path), its size;
3. pivot copies distilled from it (`umm fuse`'s code path) for each `--lambdas` value; lambda 1.0
   is the text-only control (the expert's responses alone, no distributions);
4. fuse-then-merge: the homogeneous experts merged with and without the fused copy
   (average = linear over base + task vectors, TIES density 0.7, varm);
5. exact match on the test split of every task (`--limit` prompts each) for every model.

    python benchmarks/bench_fusion.py --workdir /tmp/fusion-bench [--probes 1000] [--steps 600]

Prints markdown tables and writes every number to WORKDIR/results.json. Stages whose output
exists in WORKDIR are reused (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from merging.engine import merge_state_dicts
from merging.fusion.distill import DistillSpec
from merging.fusion.pipeline import fuse_into_pivot, save_model_folder, summarize_model
from merging.fusion.summary import ProbeSet, load_summary
from merging.testbed.harness import evaluate, plain_prompt
from merging.testbed.models import load_pretrained
from merging.testbed.tasks import TASKS, generate
from merging.testbed.zoo import build_zoo

SHARED = ("embed_tokens", "norm")  # left as the base trained them, as the zoo's experts do


def _merge_config(method: str, models: list[str], density: float | None = None) -> dict:
    if method == "average":  # the mean of the models: base + the mean of their task vectors
        return {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models],
        }
    params = {"weight": 1.0} if density is None else {"weight": 1.0, "density": density}
    return {
        "merge_method": method,
        "base_model": "base",
        "models": [{"model": m, "parameters": dict(params) if method != "varm" else {}} for m in models],
    }


def _state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _evaluate(path: Path, tasks: list[str], limit: int | None) -> dict[str, float]:
    model, tok = load_pretrained(path)
    return evaluate(model, tok, tasks, split="test", limit=limit, batch_size=512).accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lambdas", default="0.9,0.5,1.0")
    parser.add_argument("--merge-lambda", type=float, default=0.9, help="The fused copy merged.")
    parser.add_argument("--limit", type=int, default=None, help="Test prompts per task (default all 300).")
    parser.add_argument("--freeze", action="store_true", help="Freeze embeddings and norms like the experts.")
    parser.add_argument("--tasks", default=",".join(TASKS), help="Comma-separated tasks to evaluate.")
    parser.add_argument("--only-new", action="store_true", help="Evaluate the fused copies and merges only.")
    parser.add_argument("--min-experts", type=int, default=4, help="Merge with fewer experts than 4.")
    parser.add_argument("--zoo-root", type=Path, help="A small zoo's folder (default: build_zoo('small')).")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if args.zoo_root is not None:  # a zoo still being built: use what is there
        root = args.zoo_root
        experts_dir = root / "experts"
        domains = sorted(p.name for p in experts_dir.iterdir()) if experts_dir.is_dir() else []
        zoo = SimpleNamespace(
            base=root / "base",
            heterogeneous={"gpt2-lists": root / "heterogeneous" / "gpt2-lists"},
            experts={d: experts_dir / d for d in domains if (experts_dir / d / "config.json").exists()},
        )
    else:
        zoo = build_zoo("small")
    source = zoo.heterogeneous["gpt2-lists"]
    prompts = [plain_prompt(ex.prompt) for ex in generate("lists", "train", n=args.probes, seed=0)]
    probe = ProbeSet(tuple(prompts))
    (work / "probe.json").write_text(json.dumps(prompts))
    summary_path = work / "gpt2-lists.summary"
    if not summary_path.exists():
        tick = time.perf_counter()
        summarize_model(source, probe, summary_path, max_new_tokens=128)
        results["summary_seconds"] = round(time.perf_counter() - tick, 1)
    summary = load_summary(summary_path, probe)
    size = summary_path.stat().st_size
    results["summary"] = {
        "prompts": len(prompts),
        "positions": int(summary.offsets[-1]),
        "bytes": size,
        "bytes_per_prompt": round(size / len(prompts), 1),
        "bytes_per_position": round(size / int(summary.offsets[-1]), 2),
    }
    print(f"summary: {results['summary']} ({results.get('summary_seconds')} s)", flush=True)
    frozen = SHARED if args.freeze else ()
    fused_dirs = {}
    for lam in [float(x) for x in args.lambdas.split(",")]:
        out = work / f"fused-{lam}"
        key = f"fused lambda {lam}"
        if not (out / "fusion.json").exists():
            tick = time.perf_counter()
            spec = DistillSpec(
                steps=args.steps, lr=args.lr, batch_size=args.batch_size, lam=lam, frozen=frozen
            )
            report = fuse_into_pivot(zoo.base, [summary_path], out, probe=probe, spec=spec, progress=False)
            results.setdefault("fuse_seconds", {})[key] = round(time.perf_counter() - tick, 1)
            results.setdefault("quality", {})[key] = next(iter(report.quality.values()))
        results.setdefault("held_out", {})[key] = json.loads((out / "fusion.json").read_text())["held_out"]
        fused_dirs[lam] = out
        print(f"{key}: {results['held_out'][key]}", flush=True)
    merged = {}
    if len(zoo.experts) < args.min_experts:
        print(f"only {len(zoo.experts)} experts built: merges skipped", flush=True)
    experts = {d: _state(p) for d, p in zoo.experts.items()}
    fused_state = _state(fused_dirs[args.merge_lambda])
    base = _state(zoo.base)
    for method, density in (
        (("average", None), ("ties", 0.7), ("varm", None)) if len(experts) >= args.min_experts else ()
    ):
        for with_fused in (False, True):
            label = method if density is None else f"{method} {density}"
            name = f"{label} + fused" if with_fused else f"{label} (experts)"
            out = (
                work
                / "merges"
                / name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "plus")
            )
            if not (out / "model.safetensors").exists():
                states = {"base": base, **experts}
                names = list(experts)
                if with_fused:
                    states["fused"] = fused_state
                    names.append("fused")
                result = merge_state_dicts(_merge_config(method, names, density), states)
                model, tok = load_pretrained(zoo.base)
                missing, unexpected = model.load_state_dict(result, strict=False)
                assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
                save_model_folder(model, tok, out)
            merged[name] = out
    accuracy = results.setdefault("accuracy", {})
    known = {
        "base (pivot)": zoo.base,
        "gpt2-lists (source)": source,
        **({"lists expert": zoo.experts["lists"]} if "lists" in zoo.experts else {}),
    }
    rows = {
        **({} if args.only_new else known),
        **{f"fused lambda {lam}": path for lam, path in fused_dirs.items()},
        **merged,
    }
    for name, path in rows.items():
        if name not in accuracy:
            tick = time.perf_counter()
            accuracy[name] = _evaluate(path, args.tasks.split(","), args.limit)
            print(f"{name}: {accuracy[name]} ({time.perf_counter() - tick:.0f} s)", flush=True)
        results_path.write_text(json.dumps(results, indent=2, sort_keys=True))
    results["load_average"] = os.getloadavg()
    results_path.write_text(json.dumps(results, indent=2, sort_keys=True))
    tasks = args.tasks.split(",")
    print("| model | " + " | ".join(tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    for name, acc in accuracy.items():
        print(f"| {name} | " + " | ".join(f"{acc[t]:.2f}" if t in acc else "-" for t in tasks) + " |")


if __name__ == "__main__":
    main()
