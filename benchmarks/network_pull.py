"""Pull time vs moving the same bytes, for a larger model (used by bench_network.py --pull MIB).

A random float32 Llama of about MIB MiB is the base of a network of `nodes` node processes; two
of them contribute an expert (base + seeded noise, bf16 deltas) and every node merges (ties).
Then, in this process and in the same run:

    pull            `node.pull.pull(verify=False)` (benchmarks/pull_verify.py measures the
                    verification) from call to a written, loadable folder (DHT client start,
                    lookups, attestation checks, the streaming fetch that writes each chunk in
                    place, fsync, rename, shutdown), split by its progress reports into: up to the
                    first chunk request, transfer (to the last chunk written), finish
    client start    `ClientBoard.start` alone (p2pd + DHT join)
    fetch           `fetch_chunks` of exactly the pulled chunks (the result's chunks, re-derived
                    from the pulled weights, plus the side files) from the same peers, verified
                    (hashed, not stored), after a warm-up fetch: the floor, "the time of moving
                    its bytes"; also as the first fetch of a freshly started client
    fetch + write   the pull's transfer alone: the first fetch of a freshly started client into a
                    `PartialModel` (each chunk verified and written in place), then its fsync and
                    rename; the pull minus its start-up and lookups
    fetch + store   the same into a fresh on-disk `ContentStore`
    tcp floor       the same number of bytes over one plain TCP connection (raw, no hashing)
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
HIDDEN = 1024
LAYER_MIB = 49  # one Llama layer of hidden 1024 and intermediate 2816 in float32


def pulled_layout(folder: Path) -> tuple[tuple, dict[str, str], str]:
    """The result entries a pull of `folder` wrote, its side files' digests and the fingerprint."""
    from safetensors.torch import load_file

    from protocol.aggregate import encode_result

    entries, _, fingerprint = encode_result(load_file(folder / "model.safetensors"))
    sides = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.name != "model.safetensors"
    }
    return entries, sides, fingerprint


def pulled_digests(folder: Path) -> tuple[list[str], str]:
    """The chunk digests a pull of `folder` fetched, and the merged fingerprint they encode."""
    entries, sides, fingerprint = pulled_layout(folder)
    return [d for e in entries for d in e.chunks] + list(sides.values()), fingerprint


def raw_tcp_seconds(nbytes: int) -> float:
    """Seconds to move `nbytes` over one plain TCP connection between two processes (best of 3)."""
    from bench_network import start_process, stop_process, tcp_floor, tcp_server

    proc, conn = start_process(tcp_server, 7, nbytes, MiB)
    port, _ = conn.recv()
    try:
        rate = max(asyncio.run(tcp_floor(port, nbytes)) for _ in range(3))
    finally:
        stop_process(proc, conn)
    return nbytes / MiB / rate


def measure_pull(mib: int, nodes: int, repeat: int, shape: tuple[int, int, int]) -> None:
    """Print pull and fetch times for a ~`mib` MiB model served by `nodes` node processes."""
    from bench_network import VerifyingSink
    from hivemind.p2p import PeerID
    from network_converge import make_models

    from node.dht import ClientBoard, start_dht
    from node.local import LocalNetwork
    from node.partial import PartialModel
    from node.pull import pull
    from node.store import ContentStore
    from node.transport import fetch_chunks
    from protocol.messages import DEFAULT_CHUNK_SIZE

    layers = max(1, round(mib / LAYER_MIB))
    options = dict(zip(("streams_per_peer", "batch", "depth"), shape, strict=True))
    with tempfile.TemporaryDirectory(prefix="umm-bench-pull-", dir=os.environ.get("UMM_BENCH_TMP")) as tmp:
        root = Path(tmp)
        base, experts = make_models(root, 2, HIDDEN, layers)
        model_mib = (base / "model.safetensors").stat().st_size / MiB
        names = [f"n{i}" for i in range(nodes)]
        with LocalNetwork(root / "net", poll=0.5) as net:
            net.create(names[0], base, network_name="pullbench", method="ties", min_contributions=2)
            peer_ids = []
            net.start(names[0])
            peer_ids.append(net.wait_ready(names[0])[0])
            for name in names[1:]:
                net.start(name)
            peer_ids += [net.wait_ready(name)[0] for name in names[1:]]
            peers = [PeerID.from_base58(m.rsplit("/p2p/", 1)[1]) for m in peer_ids]
            started = time.perf_counter()
            for name, expert in zip(names[1:3], experts, strict=False):
                net.contribute(name, expert, codec="bf16")
            net.wait_converged(names, timeout=1800)
            converged = time.perf_counter() - started
            print(f"model {model_mib:.0f} MiB float32, {nodes} nodes converged in {converged:.0f} s")

            # An untimed pull first: it names the chunks, and warms every cache both paths read from.
            warm = root / "warm"
            outcome = asyncio.run(pull(net.network_id, warm, initial_peers=[net.bootstrap], verify=False))
            entries, sides, fingerprint = pulled_layout(warm)
            digests = [d for e in entries for d in e.chunks] + list(sides.values())
            if fingerprint != outcome.merged_fingerprint:
                raise RuntimeError("the pulled weights do not re-encode to the attested fingerprint")
            shutil.rmtree(warm)

            async def fetch_twice():
                dht, _ = start_dht(initial_peers=[net.bootstrap], client_mode=True)
                p2p = await dht.replicate_p2p()
                try:
                    await fetch_chunks(p2p, digests, peers, VerifyingSink(), **options)  # warm up
                    cpu, tick = cpu_seconds(), time.perf_counter()
                    report = await fetch_chunks(p2p, digests, peers, VerifyingSink(), **options)
                    verified = (time.perf_counter() - tick, cpu_seconds() - cpu)
                    with tempfile.TemporaryDirectory(dir=root) as folder, ContentStore(folder) as store:
                        cpu, tick = cpu_seconds(), time.perf_counter()
                        await fetch_chunks(p2p, digests, peers, store, **options)
                        stored = (time.perf_counter() - tick, cpu_seconds() - cpu)
                    return report.bytes_received, verified, stored
                finally:
                    await p2p.shutdown()
                    dht.shutdown()

            async def fresh_fetch():
                """`fetch_chunks`, verified, as the first transfer of a newly started client (like a pull)."""
                tick = time.perf_counter()
                client = await ClientBoard.start([net.bootstrap])
                started = time.perf_counter() - tick
                try:
                    cpu, tick = cpu_seconds(), time.perf_counter()
                    await fetch_chunks(client.p2p, digests, peers, VerifyingSink(), **options)
                    return started, (time.perf_counter() - tick, cpu_seconds() - cpu)
                finally:
                    await client.shutdown()

            async def fresh_write(attempt: int):
                """A new client's first fetch into a `PartialModel`, then fsync and rename."""
                client = await ClientBoard.start([net.bootstrap])
                out = root / f"written{attempt}"
                try:
                    cpu, tick = cpu_seconds(), time.perf_counter()
                    with PartialModel(root / f"work{attempt}", entries, DEFAULT_CHUNK_SIZE, sides) as partial:
                        await fetch_chunks(client.p2p, partial.wanted, peers, partial, **options)
                        await asyncio.to_thread(partial.finish, out)
                    return time.perf_counter() - tick, cpu_seconds() - cpu
                finally:
                    await client.shutdown()
                    shutil.rmtree(out, ignore_errors=True)

            load_before = os.getloadavg()[0]
            rows: dict[str, list[tuple[float, float]]] = {}  # name: (seconds, CPU seconds) per attempt
            ratios = []
            for attempt in range(repeat):
                out = root / f"pulled{attempt}"
                marks: list[float] = []
                cpu, tick = cpu_seconds(), time.perf_counter()
                outcome = asyncio.run(
                    pull(
                        net.network_id,
                        out,
                        initial_peers=[net.bootstrap],
                        progress=lambda *_, marks=marks: marks.append(time.perf_counter()),
                        verify=False,
                    )
                )
                finished = time.perf_counter()
                rows.setdefault("pull (call to written folder)", []).append(
                    (finished - tick, cpu_seconds() - cpu)
                )
                rows.setdefault("pull: up to the first chunk request", []).append((marks[0] - tick, 0.0))
                for name, spent in outcome.seconds.items():
                    rows.setdefault(f"pull: {name}", []).append((spent, 0.0))
                if pulled_digests(out)[1] != outcome.merged_fingerprint:
                    raise RuntimeError("the pulled weights do not re-encode to the attested fingerprint")
                pulled_mib = outcome.bytes_fetched / MiB
                shutil.rmtree(out)
                start, fresh = asyncio.run(fresh_fetch())
                rows.setdefault("ClientBoard.start (p2pd, DHT join)", []).append((start, 0.0))
                moved, verified, stored = asyncio.run(fetch_twice())
                rows.setdefault("fetch_chunks, verified", []).append(verified)
                rows.setdefault("fetch_chunks, verified, fresh client", []).append(fresh)
                rows.setdefault("fetch + write in place, fresh client", []).append(
                    asyncio.run(fresh_write(attempt))
                )
                rows.setdefault("fetch_chunks, into a store", []).append(stored)
                rows.setdefault("tcp floor (raw bytes)", []).append((raw_tcp_seconds(moved), 0.0))
                ratios.append(((finished - tick) / verified[0], (finished - tick) / fresh[0]))
    load = os.getloadavg()[0]
    print(
        f"pulled {pulled_mib:.0f} MiB from {nodes} peers ({model_mib:.0f} MiB model), median of {repeat}, "
        f"load average {load_before:.1f} before and {load:.1f} after"
    )
    fetch = statistics.median(s for s, _ in rows["fetch_chunks, verified"])
    floor = statistics.median(s for s, _ in rows["tcp floor (raw bytes)"])
    print(f"{'step':36} {'s':>7} {'MiB/s':>7} {'x fetch':>8} {'x floor':>8} {'CPU s':>6}")
    for name, values in rows.items():
        seconds = statistics.median(s for s, _ in values)
        cpu = statistics.median(c for _, c in values)
        rate = pulled_mib / seconds
        cpu_text = f"{cpu:6.2f}" if cpu else f"{'':6}"
        print(
            f"{name:36} {seconds:7.2f} {rate:7.0f} {seconds / fetch:7.2f}x {seconds / floor:7.2f}x {cpu_text}"
        )
    print("pull / fetch_chunks verified, per attempt: " + ", ".join(f"{r:.2f}x" for r, _ in ratios))
    print("pull / the same on a fresh client, per attempt: " + ", ".join(f"{r:.2f}x" for _, r in ratios))


def cpu_seconds() -> float:
    """CPU seconds of this process, its live descendants (nodes, p2pd) and its reaped children."""
    from bench_network import tree_cpu_seconds

    times = os.times()
    return tree_cpu_seconds() + times.children_user + times.children_system
