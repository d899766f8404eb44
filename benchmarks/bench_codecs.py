"""Delta codecs: size vs bf16, reconstruction error, speed; and merged-model accuracy on the zoo.

Synthetic mode (default): deltas shaped like a small transformer's (8 blocks of attention and MLP
matrices plus norms), each a rank-8 component plus heavy-tailed Student-t noise (df = 3), the
pattern fine-tuning deltas show. For every codec it prints the encoded size against dense bf16
(the floor every codec is measured against, in the same run), the relative L2 error
||d' - d|| / ||d||, and encode/decode throughput in MB of bf16-equivalent data per second.

Zoo mode (``--zoo micro|small``): the test-bed zoo's domain experts are encoded as deltas against
the base with each codec, decoded, and merged with `protocol.aggregate.aggregate` (task_arithmetic,
weight 1/n, so every expert's delta counts); the merged model's mean exact-match accuracy over the
test splits is compared with the same merge of the exact (float32) deltas.

Usage: python benchmarks/bench_codecs.py [--codecs bf16,int8+zstd,...] [--zoo micro] [--limit 64]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol.chunks import decode_tensors, encode_deltas, encode_tensors
from protocol.codecs import parse_codec

DEFAULT_CODECS = (
    "bf16",
    "bf16+zstd",
    "fp16+zstd",
    "int8",
    "int8+zstd",
    "int8:256+zstd",
    "int4+zstd",
    "int4:256+zstd",
    "topk:0.25+zstd",
    "topk:0.1",
    "topk:0.1+zstd",
    "topk:0.05+zstd",
)
CHUNK = 1 << 20


def synthetic_deltas(hidden: int = 512, blocks: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Low-rank + heavy-tailed deltas with the tensor shapes of a small Llama-style model."""
    gen = torch.Generator().manual_seed(seed)
    student_t = torch.distributions.StudentT(3.0)
    torch.manual_seed(seed)
    shapes = {}
    for b in range(blocks):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"model.layers.{b}.self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[f"model.layers.{b}.mlp.up_proj.weight"] = (hidden * 2, hidden)
        shapes[f"model.layers.{b}.mlp.down_proj.weight"] = (hidden, hidden * 2)
        shapes[f"model.layers.{b}.input_layernorm.weight"] = (hidden,)
    deltas = {}
    for name, shape in shapes.items():
        scale = 1e-3 * float(torch.rand(1, generator=gen) + 0.5)
        noise = student_t.sample(shape) * scale * 0.3
        if len(shape) == 2:
            low_rank = torch.randn(shape[0], 8, generator=gen) @ torch.randn(8, shape[1], generator=gen)
            deltas[name] = low_rank * scale / math.sqrt(8) + noise
        else:
            deltas[name] = noise
    return deltas


def measure(deltas: dict[str, torch.Tensor], codec: str) -> dict[str, float]:
    numel = sum(t.numel() for t in deltas.values())
    start = time.perf_counter()
    entries, chunks = encode_tensors(deltas, parse_codec(codec), CHUNK)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    decoded = decode_tensors(entries, chunks, CHUNK)
    decode_s = time.perf_counter() - start
    err2 = sum(float(((decoded[n] - t) ** 2).sum()) for n, t in deltas.items())
    ref2 = sum(float((t**2).sum()) for t in deltas.values())
    nbytes = sum(e.nbytes for e in entries)
    bf16_mb = numel * 2 / 1e6
    return {
        "bytes": nbytes,
        "ratio": numel * 2 / nbytes,
        "rel_l2": math.sqrt(err2 / ref2),
        "enc_mbps": bf16_mb / encode_s,
        "dec_mbps": bf16_mb / decode_s,
    }


def run_synthetic(codecs: list[str]) -> None:
    deltas = synthetic_deltas()
    numel = sum(t.numel() for t in deltas.values())
    print(
        f"synthetic deltas: {len(deltas)} tensors, {numel / 1e6:.1f} M values, bf16 {numel * 2 / 1e6:.1f} MB"
    )
    print(f"{'codec':16s} {'MB':>7s} {'x vs bf16':>9s} {'rel L2 err':>10s} {'enc MB/s':>9s} {'dec MB/s':>9s}")
    for codec in codecs:
        m = measure(deltas, codec)
        print(
            f"{codec:16s} {m['bytes'] / 1e6:7.2f} {m['ratio']:9.2f} {m['rel_l2']:10.4f} "
            f"{m['enc_mbps']:9.0f} {m['dec_mbps']:9.0f}"
        )


def run_zoo(size: str, codecs: list[str], limit: int | None) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merging.testbed.harness import evaluate
    from merging.testbed.zoo import build_zoo
    from protocol.aggregate import aggregate
    from protocol.fingerprint import fingerprint_model
    from protocol.messages import MergeRecipe

    zoo = build_zoo(size)
    tokenizer = AutoTokenizer.from_pretrained(zoo.base)
    base_model = AutoModelForCausalLM.from_pretrained(zoo.base, torch_dtype=torch.float32)
    base = {k: v for k, v in load_file(str(next(zoo.base.glob("*.safetensors")))).items()}
    experts = {d: load_file(str(next(p.glob("*.safetensors")))) for d, p in sorted(zoo.experts.items())}
    fp = fingerprint_model(zoo.base)

    def merged_accuracy(deltas: dict[str, dict[str, torch.Tensor]]) -> float:
        recipe = MergeRecipe.build(
            network_id="bench",
            round=1,
            method="task_arithmetic",
            parameters={"weight": 1.0 / len(deltas)},
            base_fingerprint=fp.base,
            architecture_fingerprint=fp.architecture,
            contributions=list(deltas),
            dtype="float32",
        )
        merged = aggregate(recipe, base, deltas)
        _missing, unexpected = base_model.load_state_dict(merged, strict=False)
        if unexpected:
            raise SystemExit(f"unexpected tensors in the merge: {unexpected[:3]}")
        return evaluate(base_model, tokenizer, split="test", limit=limit).mean

    ids = {domain: f"{i + 1:02x}" * 32 for i, domain in enumerate(experts)}
    exact = {ids[d]: {n: e[n].float() - base[n].float() for n in base} for d, e in experts.items()}
    reference = merged_accuracy(exact)
    print(f"zoo {size}: {len(experts)} experts ({', '.join(experts)}), test limit {limit}")
    print(f"merge of exact deltas: mean accuracy {100 * reference:.1f}")
    print(f"{'codec':16s} {'x vs bf16':>9s} {'rel L2 err':>10s} {'accuracy':>9s} {'loss (pts)':>10s}")
    for codec in codecs:
        decoded, ratios, errs = {}, [], []
        for domain, expert in experts.items():
            entries, chunks = encode_deltas(base, expert, parse_codec(codec), CHUNK)
            decoded[ids[domain]] = decode_tensors(entries, chunks, CHUNK)
            numel = sum(t.numel() for t in base.values())
            ratios.append(numel * 2 / sum(e.nbytes for e in entries))
            true = exact[ids[domain]]
            err2 = sum(float(((decoded[ids[domain]][n] - true[n]) ** 2).sum()) for n in true)
            errs.append(math.sqrt(err2 / sum(float((t**2).sum()) for t in true.values())))
        accuracy = merged_accuracy(decoded)
        print(
            f"{codec:16s} {sum(ratios) / len(ratios):9.2f} {sum(errs) / len(errs):10.4f} "
            f"{100 * accuracy:9.1f} {100 * (reference - accuracy):10.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codecs", default=",".join(DEFAULT_CODECS), help="comma-separated codec names")
    parser.add_argument("--zoo", choices=("micro", "small"), help="also measure merged accuracy on the zoo")
    parser.add_argument("--limit", type=int, default=None, help="test examples per task in zoo mode")
    args = parser.parse_args()
    torch.set_num_threads(2)
    codecs = args.codecs.split(",")
    run_synthetic(codecs)
    if args.zoo:
        print()
        run_zoo(args.zoo, codecs, args.limit)


if __name__ == "__main__":
    main()
