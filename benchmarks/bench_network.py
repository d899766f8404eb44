"""Chunk throughput over hivemind's P2P vs plain TCP floors, measured in the same run.

Every server is its own process (as every node is), holding the same seeded chunks in memory;
the client (this process) fetches all of them and verifies every sha256. Reported:

    tcp floor        one asyncio TCP connection, 1 MiB writes, no framing, no hashing: what one
                     Python process can push to another through the kernel (the raw floor)
    tcp chunks       `node.transport.fetch_chunks` from one `ChunkServer` over plain TCP sockets
                     instead of libp2p streams: the same frames, requests, hashing and client code
                     (the framed floor: the chunk protocol's own cost, without libp2p)
    p2p x N          `fetch_chunks` from N peers at once over hivemind's P2P (each chunk verified,
                     then dropped)
    p2p x N + store  the same into a `ContentStore` on disk (verified, fsynced)

Besides MiB/s and ratios, each row gives the CPU seconds all processes of the benchmark (client,
servers, every p2pd) spent per GiB moved: on a shared machine this moves far less than the rates.

Usage: python benchmarks/bench_network.py [--mib 128] [--chunk-kib 1024] [--peers 1,3] [--repeat 3]
                                          [--streams 2] [--batch 4] [--depth 2]
       python benchmarks/bench_network.py --converge 3,5,8 [--hidden 256] [--layers 4] [--quorum 0,2]
                                          [--converge-timeout 600]
       (time to converge and bytes per node; see benchmarks/network_converge.py; on a timeout the
       nodes' logs and states are kept and their folder named)
       python benchmarks/bench_network.py --pull 256 [--pull-nodes 3] [--repeat 3]
       (pull time vs moving its bytes; see benchmarks/network_pull.py)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing as mp
import os
import random
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
os.environ.setdefault("GOLOG_LOG_LEVEL", "error")

MiB = 1 << 20
GiB = 1 << 30


def make_chunks(seed: int, total: int, chunk: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    chunks = [rng.randbytes(min(chunk, total - start)) for start in range(0, total, chunk)]
    return {hashlib.sha256(c).hexdigest(): c for c in chunks}


class VerifyingSink:
    """Hashes every chunk against its digest and keeps only its size (a fetch minus the disk)."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}

    def missing(self, digests):
        return [d for d in digests if d not in self.sizes]

    def put(self, data, digest: str | None = None) -> str:
        actual = hashlib.sha256(data).hexdigest()
        if digest is not None and actual != digest:
            from node.errors import ChunkHashMismatchError

            raise ChunkHashMismatchError(f"expected {digest}, got {actual}")
        self.sizes[actual] = len(data)
        return actual


class DictSource:
    def __init__(self, chunks: dict[str, bytes]) -> None:
        self.chunks = chunks

    def get(self, digest: str) -> bytes:
        from node.errors import ChunkNotFoundError

        try:
            return self.chunks[digest]
        except KeyError:
            raise ChunkNotFoundError(f"no chunk {digest}") from None


class TcpDialer:
    """Stands in for hivemind's P2P in `fetch_chunks`: a "peer" is a TCP port on 127.0.0.1."""

    async def call_binary_stream_handler(self, port: int, _name: str):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return None, reader, writer


# ---------------------------------------------------------------- server processes
def p2p_server(initial_peers, seed, total, chunk, conn) -> None:
    from node.dht import start_dht, visible_maddrs
    from node.transport import ChunkServer

    chunks = make_chunks(seed, total, chunk)
    dht, _ = start_dht(initial_peers=initial_peers)

    async def serve():
        p2p = await dht.replicate_p2p()
        server = ChunkServer(DictSource(chunks), max_concurrent=16)
        await server.start(p2p)
        conn.send((visible_maddrs(dht), str(p2p.peer_id)))
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # wait for "stop"
        await server.stop(p2p)
        await p2p.shutdown()

    asyncio.run(serve())
    dht.shutdown()


def tcp_server(seed, total, chunk, conn) -> None:
    """Two listeners: raw bytes on the first port, the chunk protocol (`ChunkServer`) on the second."""
    from node.transport import ChunkServer

    chunks = make_chunks(seed, total, chunk)
    payload = b"".join(chunks.values())

    async def raw(reader, writer):
        await reader.readexactly(1)
        view = memoryview(payload)
        for start in range(0, len(view), MiB):
            writer.write(view[start : start + MiB])
            await writer.drain()
        writer.close()

    async def serve():
        server = ChunkServer(DictSource(chunks), max_concurrent=16)
        raw_listener = await asyncio.start_server(raw, "127.0.0.1", 0)
        chunk_listener = await asyncio.start_server(
            lambda r, w: server.rpc_chunks(None, r, w), "127.0.0.1", 0
        )
        conn.send((raw_listener.sockets[0].getsockname()[1], chunk_listener.sockets[0].getsockname()[1]))
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        raw_listener.close()
        chunk_listener.close()

    asyncio.run(serve())


def start_process(target, *args):
    parent, child = mp.Pipe()
    proc = mp.get_context("fork").Process(target=target, args=(*args, child))
    proc.start()
    return proc, parent


def stop_process(proc, conn) -> None:
    conn.send("stop")
    proc.join(20)
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGTERM)
        proc.join(5)


# ---------------------------------------------------------------- measurements
async def tcp_floor(port: int, total: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.perf_counter()
    writer.write(b"g")
    received = 0
    while received < total:
        block = await reader.read(4 * MiB)
        if not block:
            break
        received += len(block)
    elapsed = time.perf_counter() - started
    writer.close()
    if received != total:
        raise RuntimeError(f"tcp floor received {received} of {total} bytes")
    return total / elapsed / MiB


def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and all its descendants alive (servers, p2pd)."""
    from node.process import process_tree

    ticks = 0
    for pid in process_tree(os.getpid()):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime of all its threads
    return ticks / os.sysconf("SC_CLK_TCK")


async def with_cpu(measurement) -> tuple[float, float]:
    """(the measurement's result, CPU seconds all processes of the benchmark used meanwhile)."""
    started = tree_cpu_seconds()
    result = await measurement
    return result, tree_cpu_seconds() - started


async def timed_fetch(p2p, peer_ids, digests, sink, streams: int, batch: int, depth: int) -> float:
    """MiB/s of one `fetch_chunks` of every digest into `sink`."""
    from node.transport import fetch_chunks

    started = time.perf_counter()
    report = await fetch_chunks(
        p2p, digests, peer_ids, sink, streams_per_peer=streams, batch=batch, depth=depth
    )
    elapsed = time.perf_counter() - started
    if report.fetched != len(digests):
        raise RuntimeError(f"fetched {report.fetched} of {len(digests)} chunks")
    return report.bytes_received / elapsed / MiB


def run_converge(args, port: int, total: int, tcp_proc, tcp_conn) -> None:
    from network_converge import measure, report

    try:
        floor = max(asyncio.run(tcp_floor(port, total)) for _ in range(args.repeat))
    finally:
        stop_process(tcp_proc, tcp_conn)
    rows = [
        measure(int(n), args.hidden, args.layers, floor, quorum=int(q), timeout=args.converge_timeout)
        for q in args.quorum.split(",")
        for n in args.converge.split(",")
    ]
    report(rows, floor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128, help="bytes to move per measurement, MiB")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="chunk size, KiB")
    parser.add_argument("--peers", default="1,3", help="comma-separated server counts")
    parser.add_argument(
        "--converge", default="", help="instead: time to converge for these node counts, e.g. 3,5,8"
    )
    parser.add_argument("--hidden", type=int, default=256, help="converge: hidden size of the random Llama")
    parser.add_argument("--layers", type=int, default=4, help="converge: layers of the random Llama")
    parser.add_argument(
        "--quorum",
        default="0,2",
        help="converge: genesis quorums to measure, 0 = the default majority of the contributors",
    )
    parser.add_argument(
        "--converge-timeout",
        type=float,
        default=600.0,
        help="converge: seconds to wait for every node's result (on timeout the node logs are kept)",
    )
    parser.add_argument("--streams", type=int, default=2, help="streams per peer")
    parser.add_argument("--batch", type=int, default=4, help="chunks per request")
    parser.add_argument("--depth", type=int, default=2, help="requests in flight per stream")
    parser.add_argument("--pull", type=int, default=0, help="instead: pull a model of about this many MiB")
    parser.add_argument("--pull-nodes", type=int, default=3, help="pull: node processes serving it")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repetitions; medians are reported")
    args = parser.parse_args()
    total, chunk, seed = args.mib * MiB, args.chunk_kib * 1024, 7
    peer_counts = [int(x) for x in args.peers.split(",")]

    if args.pull:
        from network_pull import measure_pull

        measure_pull(args.pull, args.pull_nodes, args.repeat, (args.streams, args.batch, args.depth))
        return
    tcp_proc, tcp_conn = start_process(tcp_server, seed, total, chunk)
    port, chunk_port = tcp_conn.recv()
    if args.converge:
        run_converge(args, port, total, tcp_proc, tcp_conn)
        return
    servers = []
    first_proc, first_conn = start_process(p2p_server, [], seed, total, chunk)
    first_maddrs, first_id = first_conn.recv()
    servers.append((first_proc, first_conn, first_id))
    for _ in range(max(peer_counts) - 1):
        proc, conn = start_process(p2p_server, first_maddrs, seed, total, chunk)
        servers.append((proc, conn, conn.recv()[1]))
    digests = list(make_chunks(seed, total, chunk))

    from hivemind.p2p import PeerID

    from node.dht import start_dht
    from node.store import ContentStore

    dht, _ = start_dht(initial_peers=first_maddrs)
    samples: dict[str, list[tuple[float, ...]]] = {}  # row -> [(MiB/s, vs raw, vs chunks, CPU s/GiB)]
    shape = (args.streams, args.batch, args.depth)

    async def run_all():
        p2p = await dht.replicate_p2p()
        for count in peer_counts:  # warm up: connections to every peer, flow-control windows
            ids = [PeerID.from_base58(s[2]) for s in servers[:count]]
            await timed_fetch(p2p, ids, digests[:16], VerifyingSink(), *shape)
        for _ in range(args.repeat):  # interleaved, so load changes hit floors and p2p alike
            rows = {"tcp floor (raw bytes)": await with_cpu(tcp_floor(port, total))}
            rows["tcp chunks (fetch_chunks, 1 server)"] = await with_cpu(
                timed_fetch(TcpDialer(), [chunk_port], digests, VerifyingSink(), *shape)
            )
            for count in peer_counts:
                ids = [PeerID.from_base58(s[2]) for s in servers[:count]]
                rows[f"p2p x {count} peer(s), verified"] = await with_cpu(
                    timed_fetch(p2p, ids, digests, VerifyingSink(), *shape)
                )
                folder = tempfile.mkdtemp(prefix="umm-bench-store-")
                try:
                    with ContentStore(folder) as store:
                        rows[f"p2p x {count} peer(s), into store"] = await with_cpu(
                            timed_fetch(p2p, ids, digests, store, *shape)
                        )
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
            floor, framed = rows["tcp floor (raw bytes)"][0], rows["tcp chunks (fetch_chunks, 1 server)"][0]
            for name, (rate, cpu) in rows.items():
                samples.setdefault(name, []).append((rate, rate / floor, rate / framed, cpu / (total / GiB)))
        await p2p.shutdown()

    load = os.getloadavg()[0]
    try:
        asyncio.run(run_all())
    finally:
        dht.shutdown()
        for proc, conn, _ in servers:
            stop_process(proc, conn)
        stop_process(tcp_proc, tcp_conn)
    print(
        f"{args.mib} MiB in {args.chunk_kib} KiB chunks, {args.streams} streams/peer x {args.depth} requests "
        f"x {args.batch} chunks, median of {args.repeat} interleaved repeats, 127.0.0.1, "
        f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(f"{'path':38} {'MiB/s':>8} {'vs raw':>7} {'vs chunks':>10} {'CPU s/GiB':>10}")
    for name, values in samples.items():
        rate, raw, framed, cpu = (statistics.median(v[i] for v in values) for i in range(4))
        print(f"{name:38} {rate:8.1f} {raw:7.0%} {framed:10.0%} {cpu:10.2f}")


if __name__ == "__main__":
    main()
