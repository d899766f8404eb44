"""Merge-engine benchmark: wall time and peak RSS against an I/O floor measured in the same run.

Builds synthetic bf16 checkpoints of a Qwen2-0.5B-like shape (hidden 896, 24 layers, intermediate
4864, vocab 151936, tied embeddings: a random base plus experts = base + small perturbations) in a
temp folder, then runs, each in its own process:

- the floor: read every input tensor once with safetensors, add them in float32, write one bf16
  output of the same size with safetensors `save_file`; run with 1 and with 2 torch threads,
  the faster counts;
- `umm`'s merge for each method.

Wall time is the merge call inside the child process (imports excluded); CPU s is the child's
user + system time over its work, all threads (steadier than wall time on a shared machine);
peak RSS is the child's own high-water mark (`VmHWM` in /proc/self/status; `ru_maxrss` would
also count the pages of the parent it was forked from). The checkpoints are built in a child
too. Merges record the sha256 of every input: with `--digest-cache warm` (default) the digests
are remembered beforehand, as on a node merging the same experts again; `cold` makes every
merge hash every input. Usage:

    python benchmarks/bench_merge.py --experts 8 --methods ties,dare_ties,task_arithmetic,linear
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QWEN2_05B = {"hidden": 896, "layers": 24, "intermediate": 4864, "vocab": 151936, "kv_heads": 2, "heads": 14}


def tensor_shapes(shape: dict[str, int]) -> dict[str, tuple[int, ...]]:
    hidden, inter = shape["hidden"], shape["intermediate"]
    kv = hidden // shape["heads"] * shape["kv_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape["vocab"], hidden)}
    for i in range(shape["layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.q_proj.bias": (hidden,),
                p + "self_attn.k_proj.weight": (kv, hidden),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, hidden),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
            }
        )
    shapes["model.norm.weight"] = (hidden,)
    return shapes


def build_checkpoints(root: Path, experts: int, shape: dict[str, int]) -> list[Path]:
    """A random bf16 base and `experts` perturbed copies, each a single-file HF folder."""
    import torch
    from safetensors.torch import save_file

    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": shape["hidden"],
        "intermediate_size": shape["intermediate"],
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"],
        "vocab_size": shape["vocab"],
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }
    shapes = tensor_shapes(shape)
    generator = torch.Generator().manual_seed(0)
    base = {
        name: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16) for name, s in shapes.items()
    }
    folders = []
    for number in range(experts + 1):
        folder = root / ("base" if number == 0 else f"expert{number}")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config))
        if number == 0:
            state = base
        else:
            state = {
                name: (t.float() + torch.randn(t.shape, generator=generator) * 0.002).to(torch.bfloat16)
                for name, t in base.items()
            }
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        del state
        folders.append(folder)
    return folders


def floor(inputs: list[str], out: str) -> float:
    """Read every input tensor once, add in float32, write one bf16 output; returns seconds (wall)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    start = time.perf_counter()
    handles = [safe_open(path, framework="pt") for path in inputs]
    result = {}
    for name in handles[0].keys():  # noqa: SIM118 - a safe_open handle is not iterable
        total = handles[0].get_tensor(name).float()
        for handle in handles[1:]:
            total += handle.get_tensor(name).float()
        result[name] = total.to(torch.bfloat16)
    save_file(result, out, metadata={"format": "pt"})
    return time.perf_counter() - start


def merge_child(method: str, folders: list[str], out: str) -> float:
    """One umm merge; returns seconds (wall)."""
    from merging.engine import merge

    base, experts = folders[0], folders[1:]
    per_model = {"weight": 1.0 / len(experts)}
    if method in ("ties", "dare_ties", "dare_linear", "della", "breadcrumbs", "breadcrumbs_ties"):
        per_model["density"] = 0.5
    config = {
        "merge_method": method,
        "base_model": base,
        "models": [{"model": e, "parameters": dict(per_model)} for e in experts],
        "dtype": "bfloat16",
    }
    if method == "linear":
        config["models"].insert(0, {"model": base, "parameters": dict(per_model)})
    start = time.perf_counter()
    merge(config, out, progress=False)
    return time.perf_counter() - start


def peak_rss_gb() -> float:
    """This process's resident-memory high-water mark."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    raise RuntimeError("no VmHWM in /proc/self/status")


def cpu_seconds() -> float:
    """User + system CPU time of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_child(args: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """(wall seconds reported by the child, its peak RSS in GB, its CPU seconds meanwhile)."""
    result = subprocess.run(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, check=False, env=env
    )
    if result.returncode != 0:
        raise SystemExit(f"child {args} failed")
    seconds, rss, cpu = result.stdout.strip().splitlines()[-1].split()
    return float(seconds), float(rss), float(cpu)


def fastest_floor(inputs: list[str], out: Path) -> tuple[float, float, float, int]:
    """The floor run with 1 and with 2 torch threads; the faster one is the floor (s, GB, CPU s, threads).

    On shared cores a two-thread elementwise add can take twice as long as one thread (its
    threads wait on each other), so the lower bound is the faster of the two.
    """
    runs = []
    for threads in (1, 2):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        seconds, rss, cpu = run_child(["--child", "floor", *inputs, str(out)], env)
        runs.append((seconds, rss, cpu, threads))
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--methods", default="ties,dare_ties,task_arithmetic,linear")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep checkpoints here (default: a temp dir)"
    )
    parser.add_argument("--layers", type=int, default=QWEN2_05B["layers"])
    parser.add_argument("--vocab", type=int, default=QWEN2_05B["vocab"])
    parser.add_argument(
        "--digest-cache",
        choices=("warm", "cold"),
        default="warm",
        help="warm: input digests remembered from an earlier merge (as on a node); cold: every merge "
        "hashes every input file",
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = {**QWEN2_05B, "layers": args.layers, "vocab": args.vocab}
    if args.child:
        kind, *rest = args.child
        cpu_before = cpu_seconds()
        if kind == "build":
            build_checkpoints(Path(rest[0]), args.experts, shape)
            seconds = 0.0
        elif kind == "floor":
            seconds = floor(rest[:-1], rest[-1])
        else:
            seconds = merge_child(kind, rest[:-1], rest[-1])
        print(f"{seconds:.3f} {peak_rss_gb():.3f} {cpu_seconds() - cpu_before:.3f}")
        return
    root = args.workdir or Path(tempfile.mkdtemp(prefix="umm-bench-"))
    try:
        folders = [root / "base", *[root / f"expert{i + 1}" for i in range(args.experts)]]
        if not all((f / "model.safetensors").is_file() for f in folders):
            run_child(
                [
                    "--experts",
                    str(args.experts),
                    "--layers",
                    str(args.layers),
                    "--vocab",
                    str(args.vocab),
                    "--child",
                    "build",
                    str(root),
                ]
            )
        inputs = [str(f / "model.safetensors") for f in folders]
        for path in inputs:  # warm the page cache so every run reads the same way
            with open(path, "rb") as handle:
                while handle.read(1 << 24):
                    pass
        size = sum(os.path.getsize(p) for p in inputs) / 1e9
        cache = root / "digest-cache"
        shutil.rmtree(cache, ignore_errors=True)
        env = dict(os.environ, UMM_CACHE_DIR=str(cache))
        if args.digest_cache == "warm":
            from merging.filehash import file_digests

            os.environ["UMM_CACHE_DIR"] = str(cache)
            file_digests([Path(p) for p in inputs])
        floor_s, floor_rss, floor_cpu, floor_threads = fastest_floor(inputs, root / "floor.safetensors")
        floor_name = f"floor (read + add + write, {floor_threads} thread(s))"
        rows = [(floor_name, floor_s, 1.0, floor_rss, floor_cpu)]
        for method in args.methods.split(","):
            out = root / f"out-{method}"
            if args.digest_cache == "cold":
                shutil.rmtree(cache, ignore_errors=True)
            seconds, rss, cpu = run_child(["--child", method, *[str(f) for f in folders], str(out)], env)
            rows.append((method, seconds, seconds / floor_s, rss, cpu))
            shutil.rmtree(out, ignore_errors=True)
        print(
            f"\nshape: {shape['layers']} layers, vocab {shape['vocab']}; base + {args.experts} experts, "
            f"bf16, {size:.2f} GB of inputs; {os.cpu_count()} cores; digest cache {args.digest_cache}; "
            f"load average at the end {os.getloadavg()[0]:.1f}"
        )
        print("| run | wall s | x floor | peak RSS GB | CPU s |\n|---|---|---|---|---|")
        for name, seconds, ratio, rss, cpu in rows:
            print(f"| {name} | {seconds:.1f} | {ratio:.2f} | {rss:.2f} | {cpu:.1f} |")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
