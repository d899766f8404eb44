"""The node at real-model size: peak memory per process, round time and store size (issue 16).

Runs a 3-node network on 127.0.0.1 on SmolLM2-size folders (a base and three experts, e.g. the
test-bed's real zoo under ~/.cache/umm/zoo/real-*/), one `umm contribute` per node started
together (or ``--stagger`` seconds apart, to check that staggered contributions land in one round),
waits until every node holds the attested result, times `umm status` (network view, and one node's
store), then `umm pull`s it. It samples every
0.5 s the resident memory (VmRSS) of each node's main process, its DHT child and its `p2pd`, and
reports their peaks during the round and their memory after it; `umm contribute` and `umm pull`
report their own peak (ru_maxrss). Memory numbers are meaningful on a loaded machine; the times
are not (state the load).

Usage: python benchmarks/real_size_node.py --zoo ~/.cache/umm/zoo/real-ea4d774aba7a2762
           [--experts arithmetic,lists,logic] [--codec int8+zstd] [--stagger 0] [--timeout 2400]
           [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MiB = 1 << 20
RUN_WITH_PEAK = (
    "import resource, sys\n"
    "from node.cli import cli\n"
    "try:\n"
    "    cli(sys.argv[1:])\n"
    "finally:\n"
    "    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
    "    print(f'peak-rss-bytes: {peak}', file=sys.stderr)\n"
)


def rss(pid: int) -> int:
    """Resident bytes of a process (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def role(pid: int, main_pid: int) -> str:
    if pid == main_pid:
        return "main"
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "other"
    return "p2pd" if b"p2pd" in command else "dht child"


class Sampler(threading.Thread):
    """Peak and current RSS per (node, role) of every node's process tree, every `period` seconds."""

    def __init__(self, procs: dict[str, subprocess.Popen], period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.procs, self.period = procs, period
        self.peak: dict[tuple[str, str], int] = {}
        self.now: dict[tuple[str, str], int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        from node.process import process_tree

        while not self.done.is_set():
            for name, proc in list(self.procs.items()):
                current: dict[tuple[str, str], int] = {}
                for pid in process_tree(proc.pid):
                    key = (name, role(pid, proc.pid))
                    current[key] = current.get(key, 0) + rss(pid)
                for key, value in current.items():
                    self.peak[key] = max(self.peak.get(key, 0), value)
                self.now.update(current)
            time.sleep(self.period)


def run_with_peak(args: list[str], log: Path) -> tuple[float, int, str]:
    """Run a `umm` command in its own process: (seconds, peak RSS bytes, stdout)."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", RUN_WITH_PEAK, *args], capture_output=True, text=True)
    seconds = time.monotonic() - started
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"umm {' '.join(args[:1])} failed: {done.stderr[-2000:]}")
    peak = [int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("peak-rss-bytes:")]
    return seconds, peak[-1], done.stdout


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def decided_rounds(data_dir: Path) -> list[int]:
    """The rounds `umm status --data-dir` reports as decided and kept (its JSON view)."""
    done = subprocess.run(
        [sys.executable, "-m", "node.cli", "status", "--data-dir", str(data_dir), "--json"],
        capture_output=True,
        text=True,
    )
    try:
        return json.loads(done.stdout).get("store", {}).get("decided_rounds", [])
    except ValueError:
        return []


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", type=Path, required=True)
    parser.add_argument("--experts", default="arithmetic,lists,logic")
    parser.add_argument("--codec", default="int8+zstd")
    parser.add_argument("--stagger", type=float, default=0.0, help="seconds between contributions")
    parser.add_argument("--timeout", type=float, default=2400.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from node.local import LocalNetwork

    experts = [args.zoo / "experts" / name for name in args.experts.split(",")]
    names = [f"n{i + 1}" for i in range(len(experts))]
    root = Path(tempfile.mkdtemp(prefix="umm-real-size-"))
    report: dict = {"codec": args.codec, "experts": [e.name for e in experts], "load_before": os.getloadavg()}
    net = LocalNetwork(root, poll=1.0)
    sampler = Sampler(net.procs)
    try:
        net.create(names[0], args.zoo / "base", "realsize", min_contributions=len(experts))
        net.start_all(names, timeout=600)
        sampler.start()
        time.sleep(5)
        report["idle_rss"] = {f"{n}/{r}": v for (n, r), v in sorted(sampler.now.items())}
        threads, results = [], {}

        def contribute(name: str, expert: Path) -> None:
            cmd = ["contribute", str(expert), "--data-dir", str(root / name), "--codec", args.codec]
            results[name] = run_with_peak(cmd, root / f"contribute-{name}.log")

        started = time.monotonic()
        for index, (name, expert) in enumerate(zip(names, experts, strict=True)):
            if index:
                time.sleep(args.stagger)
            threads.append(threading.Thread(target=contribute, args=(name, expert)))
            threads[-1].start()
        for thread in threads:
            thread.join()
        if len(results) != len(names):
            raise RuntimeError("a contribution failed; see the contribute-*.log files in " + str(root))
        stored = time.monotonic()
        report["contribute"] = {
            n: {"seconds": s, "peak_rss": p, "out": o.strip()} for n, (s, p, o) in results.items()
        }
        net.wait_converged(names, timeout=args.timeout)
        decided = time.monotonic()
        report["round_seconds_after_last_contribution"] = decided - stored
        report["contribute_wall_seconds"] = stored - started
        report["round_peak_rss"] = {f"{n}/{r}": v for (n, r), v in sorted(sampler.peak.items())}
        time.sleep(15)
        report["after_round_rss"] = {f"{n}/{r}": v for (n, r), v in sorted(sampler.now.items())}
        report["store_bytes"] = {n: folder_bytes(root / n / "store") for n in names}
        report["rounds_decided"] = decided_rounds(root / names[0])
        network = ["--network", net.network_id, "--initial-peers", net.bootstrap]
        for label, extra in (
            ("network", network),
            ("network_and_store", [*network, "--data-dir", str(root / names[0])]),
        ):
            seconds, peak, out = run_with_peak(["status", *extra], root / f"status-{label}.log")
            report[f"status_{label}"] = {"seconds": seconds, "peak_rss": peak, "out": out[-3000:]}
        seconds, peak, _ = run_with_peak(
            [
                "pull",
                "--network",
                net.network_id,
                "--out",
                str(root / "pulled"),
                "--initial-peers",
                net.bootstrap,
            ],
            root / "pull.log",
        )
        report["pull"] = {"seconds": seconds, "peak_rss": peak}
        report["load_after"] = os.getloadavg()
    finally:
        sampler.done.set()
        net.close()
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    for key in ("round_peak_rss", "after_round_rss"):
        print(key, {k: f"{v / MiB:.0f} MiB" for k, v in report[key].items()})
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
