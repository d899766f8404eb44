"""Heterogeneous fusion on the small zoo: the GPT-2 lists expert's summary distilled into the base.

1. a probe set of `--probes` prompts of the `lists` train split (no references);
2. the GPT-2 expert's response summary on it (`umm summarize`'s code path), its size;
3. pivot copies distilled from it (`umm fuse`'s code path) for each `--lambdas` value; lambda 1.0
   is the text-only control (the expert's responses alone, no distributions);
   with `--replay N,...`, one copy per N also distilled on N prompts of every other task with the
   pivot's own responses and distributions as targets (replay; 0: none);
4. fuse-then-merge: the homogeneous experts merged with and without each fused copy (`--merges`:
   average = linear over base + task vectors, TIES at a density, varm); `--fused-density D` keeps
   only the largest D of the fused copy's task vector in the TIES merges (a sparse fused vector);
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
from merging.fusion import SHARED_PARAMETERS
from merging.fusion.distill import DistillSpec
from merging.fusion.pipeline import fuse_into_pivot, save_model_folder, summarize_model
from merging.fusion.summary import ProbeSet, load_summary
from merging.testbed.harness import evaluate, plain_prompt
from merging.testbed.models import load_pretrained
from merging.testbed.tasks import TASKS, generate
from merging.testbed.zoo import build_zoo


def _merge_config(
    method: str, models: list[str], density: float | None = None, fused_density: float | None = None
) -> dict:
    if method == "average":  # the mean of the models: base + the mean of their task vectors
        return {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models],
        }
    if method == "varm":
        return {"merge_method": method, "base_model": "base", "models": [{"model": m} for m in models]}

    def params(model: str) -> dict:
        own = fused_density if model.startswith("fused") and fused_density is not None else density
        return {"weight": 1.0} if own is None else {"weight": 1.0, "density": own}

    return {
        "merge_method": method,
        "base_model": "base",
        "models": [{"model": m, "parameters": params(m)} for m in models],
    }


def _parse_merges(text: str) -> list[tuple[str, float | None]]:
    """'average,ties:0.7,varm' -> [("average", None), ("ties", 0.7), ("varm", None)]."""
    merges = []
    for item in text.split(","):
        method, _, density = item.strip().partition(":")
        merges.append((method, float(density) if density else None))
    return merges


def _replay_probe(per_task: int, skip: str) -> ProbeSet | None:
    """`per_task` train prompts of every task but `skip` (the source's), or None for 0."""
    if per_task == 0:
        return None
    tasks = [t for t in TASKS if t != skip]
    return ProbeSet(tuple(plain_prompt(ex.prompt) for t in tasks for ex in generate(t, "train", n=per_task)))


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
    parser.add_argument("--merge-lambda", type=float, default=0.9, help="The fused copies merged.")
    parser.add_argument("--replay", default="0,100", help="Replay prompts per other task, one copy each.")
    parser.add_argument("--merges", default="average,ties:0.7,varm", help="method[:density],...")
    parser.add_argument("--fused-density", type=float, help="The fused task vector's TIES density.")
    parser.add_argument("--limit", type=int, default=None, help="Test prompts per task (default all 300).")
    parser.add_argument(
        "--freeze",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Freeze embeddings and norms like the experts (default).",
    )
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
    frozen = SHARED_PARAMETERS if args.freeze else ()
    fused_dirs, merged_copies = {}, {}
    for lam in [float(x) for x in args.lambdas.split(",")]:
        for per_task in [int(x) for x in args.replay.split(",")]:
            out = work / (f"fused-{lam}" + (f"-replay{per_task}" if per_task else ""))
            key = f"fused lambda {lam}" + (f" replay {per_task}" if per_task else "")
            if not (out / "fusion.json").exists():
                tick = time.perf_counter()
                spec = DistillSpec(
                    steps=args.steps, lr=args.lr, batch_size=args.batch_size, lam=lam, frozen=frozen
                )
                replay = _replay_probe(per_task, skip="lists")
                report = fuse_into_pivot(
                    zoo.base, [summary_path], out, probe=probe, spec=spec, replay=replay, progress=False
                )
                results.setdefault("fuse_seconds", {})[key] = round(time.perf_counter() - tick, 1)
                results.setdefault("quality", {})[key] = next(iter(report.quality.values()))
            fusion = json.loads((out / "fusion.json").read_text())
            results.setdefault("held_out", {})[key] = fusion["held_out"]
            fused_dirs[key] = out
            if lam == args.merge_lambda:
                merged_copies[key.removeprefix("fused ")] = out
            print(f"{key}: {results['held_out'][key]}", flush=True)
    merged = {}
    if len(zoo.experts) < args.min_experts:
        print(f"only {len(zoo.experts)} experts built: merges skipped", flush=True)
    experts = {d: _state(p) for d, p in zoo.experts.items()}
    base = _state(zoo.base)
    sparse = "" if args.fused_density is None else f" (fused density {args.fused_density})"
    for method, density in _parse_merges(args.merges) if len(experts) >= args.min_experts else ():
        for copy in [None, *merged_copies]:
            label = method if density is None else f"{method} {density}"
            name = f"{label} + fused {copy}{sparse}" if copy else f"{label} (experts)"
            out = work / "merges" / "".join(c if c.isalnum() or c == "." else "_" for c in name)
            if not (out / "model.safetensors").exists():
                states = {"base": base, **experts}
                names = list(experts)
                if copy:
                    states["fused"] = _state(merged_copies[copy])
                    names.append("fused")
                config = _merge_config(method, names, density, args.fused_density)
                result = merge_state_dicts(config, states)
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
        **fused_dirs,
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
