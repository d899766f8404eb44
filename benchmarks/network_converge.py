"""Time to converge and bytes per node for N node processes on 127.0.0.1 (used by bench_network.py).

For each N: a random Llama base (``--hidden``, ``--layers``) and N experts (base + seeded noise),
N `umm node start` processes, one contribution each (bf16 deltas; the genesis asks for N
contributions and either the default quorum, a majority of the contributors (``quorum=0``), or a
fixed quorum such as 2; either way each shard is merged in full by 3 workers and spot-checked by
the others, whose sampled attestations complete a majority quorum); the clock runs from
the last contribution stored to every node holding the attested result. Then a separate `pull()`
fetches the result; its time is compared with moving the same bytes over one plain TCP connection.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MiB = 1 << 20


def make_models(root: Path, count: int, hidden: int, layers: int) -> tuple[Path, list[Path]]:
    """A base HF folder and `count` expert folders (base + N(0, 0.01) noise), float32."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    base = root / "base"
    LlamaForCausalLM(config).save_pretrained(base)
    vocab = {f"b{i}": i for i in range(256)}
    Tokenizer(models.WordLevel(vocab, unk_token="b0")).save(str(base / "tokenizer.json"))
    weights = load_file(base / "model.safetensors")
    experts = []
    for index in range(count):
        folder = root / f"expert{index}"
        folder.mkdir()
        gen = torch.Generator().manual_seed(1000 + index)
        noisy = {k: (v + torch.randn(v.shape, generator=gen) * 0.01).contiguous() for k, v in weights.items()}
        save_file(noisy, folder / "model.safetensors", metadata={"format": "pt"})
        for side in ("config.json", "tokenizer.json"):
            (folder / side).write_bytes((base / side).read_bytes())
        experts.append(folder)
    return base, experts


QUORUM = 0  # the genesis default: a majority of the contributors


def keep_logs(net_root: Path) -> Path:
    """Copy every node's log and state database out of `net_root` (about to be removed); the copy's folder."""
    kept = Path(tempfile.mkdtemp(prefix="umm-bench-converge-stalled-"))
    for log in net_root.glob("*.log"):
        shutil.copy2(log, kept / log.name)
    for state in net_root.glob("*/state.sqlite*"):  # the database and its write-ahead log
        shutil.copy2(state, kept / f"{state.parent.name}.{state.name}")
    return kept


def measure(
    peers: int,
    hidden: int,
    layers: int,
    tcp_rate: float,
    quorum: int = QUORUM,
    timeout: float = 600.0,
) -> dict[str, float]:
    """One row: converge seconds, MiB sent/received per node, pull seconds vs its bytes at `tcp_rate`.

    `quorum` 0 is the genesis default (a majority of the contributors, at least 2). If the nodes do
    not all converge within `timeout` seconds, their logs and states are kept (`keep_logs`) and the
    NodeError names the folder."""
    load_before = os.getloadavg()[0]
    from node.errors import NodeError
    from node.local import LocalNetwork
    from node.pull import pull

    with tempfile.TemporaryDirectory(prefix="umm-bench-converge-") as tmp:
        root = Path(tmp)
        base, experts = make_models(root, peers, hidden, layers)
        model_mib = (base / "model.safetensors").stat().st_size / MiB
        names = [f"n{i}" for i in range(peers)]
        with LocalNetwork(root / "net", poll=0.5) as net:
            net.create(
                names[0], base, network_name="bench", method="ties", min_contributions=peers, quorum=quorum
            )
            net.start_all(names)
            for name, expert in zip(names, experts, strict=True):
                net.contribute(name, expert, codec="bf16")
            started = time.perf_counter()
            try:
                net.wait_converged(names, timeout=timeout)
            except NodeError as exc:
                raise NodeError(f"{exc}; node logs kept in {keep_logs(root / 'net')}") from exc
            converge = time.perf_counter() - started
            time.sleep(2 * net.poll)  # let every node write its final byte counters
            stats = [net.state(n, "stats") for n in names]
            pull_started = time.perf_counter()
            outcome = asyncio.run(pull(net.network_id, root / "pulled", initial_peers=[net.bootstrap]))
            pull_seconds = time.perf_counter() - pull_started
    sent = [s["bytes_sent"] / MiB for s in stats]
    received = [s["bytes_received"] / MiB for s in stats]
    pulled = outcome.bytes_fetched / MiB
    return {
        "peers": peers,
        "quorum": quorum if quorum > 0 else max(2, peers // 2 + 1),
        "load": (load_before, os.getloadavg()[0]),
        "model_mib": model_mib,
        "converge_s": converge,
        "sent_median": statistics.median(sent),
        "sent_max": max(sent),
        "received_median": statistics.median(received),
        "received_max": max(received),
        "pull_mib": pulled,
        "pull_s": pull_seconds,
        "pull_vs_bytes": pull_seconds / (pulled / tcp_rate) if pulled else float("nan"),
    }


def report(rows: list[dict[str, float]], tcp_rate: float) -> None:
    print(
        "converge: bf16 deltas, ties, 3 full workers per shard, spot checks by the others, poll 0.5 s; "
        f"tcp floor for the pull ratio {tcp_rate:.0f} MiB/s"
    )
    print(
        f"{'peers':>5} {'quorum':>6} {'model MiB':>9} {'converge s':>10} {'sent MiB/node (med/max)':>24} "
        f"{'recv MiB/node (med/max)':>24} {'pull MiB':>8} {'pull s':>7} {'pull / bytes@floor':>18} "
        f"{'load before/after':>17}"
    )
    for r in rows:
        print(
            f"{r['peers']:>5} {r['quorum']:>6} {r['model_mib']:>9.1f} {r['converge_s']:>10.1f} "
            f"{r['sent_median']:>11.1f} / {r['sent_max']:<10.1f} {r['received_median']:>11.1f} / "
            f"{r['received_max']:<10.1f} {r['pull_mib']:>8.1f} {r['pull_s']:>7.1f} "
            f"{r['pull_vs_bytes']:>17.1f}x {r['load'][0]:>8.1f} / {r['load'][1]:<6.1f}"
        )
