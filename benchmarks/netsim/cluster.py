"""umm nodes on shaped links: each node a `umm node start` process in its own namespace (links.py).

Everything goes through the `umm` CLI (`network create`, `node start`, `contribute`, `status`)
run with ``ip netns exec``; pulls call `node.pull.pull` (what `umm pull` runs) through
``pull_once.py`` in a namespace, to report its phases. Nodes' state is read from their data
folders (`NodeState`), as `LocalNetwork` does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.netsim.links import LinkSim, NetsimError

UMM = [sys.executable, "-m", "node.cli"]
PULL_ONCE = Path(__file__).with_name("pull_once.py")
NODE_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMBA_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HIVEMIND_LOGLEVEL": "WARNING",
    "GOLOG_LOG_LEVEL": "error",
    "HIVEMIND_MEMORY_SHARING_STRATEGY": "file_descriptor",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def node_env() -> dict[str, str]:
    return {**os.environ, **NODE_ENV}


@dataclass
class Memory:
    """A process tree's memory now, in MiB: resident, proportional (shared pages split), peak resident."""

    rss: float
    pss: float
    peak_rss: float


def tree_memory(pid: int) -> Memory:
    """Memory of `pid` and its descendants (the node, its DHT child, p2pd); peaks summed per process."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return Memory(0.0, 0.0, 0.0)
    rss = pss = peak = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
            rss, pss = rss + info.rss, pss + info.pss
            status = Path(f"/proc/{proc.pid}/status").read_text()
            hwm = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
            peak += int(hwm.split()[1]) << 10
        except (psutil.NoSuchProcess, FileNotFoundError, StopIteration):
            continue
    return Memory(rss / 2**20, pss / 2**20, peak / 2**20)


class SimNetwork:
    """A umm network of nodes in `links`' namespaces; data folders and logs under ``links.root``."""

    def __init__(self, links: LinkSim, *, poll: float = 0.5, fallback_seconds: float = 120.0) -> None:
        self.links = links
        self.poll = poll
        self.fallback_seconds = fallback_seconds
        self.procs: dict[str, subprocess.Popen] = {}
        self.maddrs: dict[str, str] = {}
        self.network_id = ""

    def data(self, name: str) -> Path:
        return self.links.root / name

    def log(self, name: str) -> Path:
        return self.links.root / f"{name}.log"

    def create(self, name: str, base: Path, *, min_contributions: int, quorum: int, settle: float) -> str:
        """`umm network create` in node `name`'s folder; the network id."""
        argv = [*UMM, "network", "create", "netsim", "--base", str(base), "--data-dir", str(self.data(name))]
        argv += ["--min-contributions", str(min_contributions), "--quorum", str(quorum)]
        argv += ["--settle-seconds", str(settle), "--method", "ties"]
        done = self.links.run(name, argv, timeout=300, env=node_env())
        ids = [line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("network: ")]
        if done.returncode != 0 or not ids:
            got = done.stdout[-500:]
            raise NetsimError(f"expected `umm network create` to print a network id, got: {got}")
        self.network_id = ids[0]
        return self.network_id

    def start(self, name: str, *, via: str | None = None, python_flags: Sequence[str] = ()) -> None:
        """`umm node start` for `name` on its namespace's address; joins through node `via` if given.

        `python_flags` go to the interpreter (e.g. ``-X importtime``)."""
        host = self.links.hosts[name]
        argv = [sys.executable, *python_flags, *UMM[1:], "node", "start", "--data-dir", str(self.data(name))]
        argv += ["--host", host.address]
        argv += ["--poll", str(self.poll), "--fallback-seconds", str(self.fallback_seconds)]
        if via is not None:
            argv += ["--network", self.network_id, "--initial-peers", self.maddrs[via]]
        self.procs[name] = self.links.spawn(name, argv, log_path=self.log(name), env=node_env())

    def wait_ready(self, names: Iterable[str], timeout: float) -> None:
        """Wait until each node printed ``ready`` (its first multiaddr is kept); NetsimError if not."""
        deadline = time.monotonic() + timeout
        waiting = list(names)
        while waiting:
            for name in list(waiting):
                lines = self.log(name).read_text(errors="replace").splitlines()
                if "ready" in lines:
                    maddrs = [x.split(": ", 1)[1] for x in lines if x.startswith("multiaddr: ")]
                    self.maddrs[name] = maddrs[0]
                    waiting.remove(name)
                elif self.procs[name].poll() is not None:
                    code = self.procs[name].returncode
                    raise NetsimError(f"expected node {name} to start, got exit code {code}")
            if waiting and time.monotonic() > deadline:
                raise NetsimError(f"expected nodes {waiting} ready within {timeout:g} s, got no `ready` line")
            time.sleep(0.2)

    def start_all(self, names: Sequence[str], timeout: float = 300.0) -> None:
        """The first node, then the others joining through it."""
        self.start(names[0])
        self.wait_ready(names[:1], timeout)
        for name in names[1:]:
            self.start(name, via=names[0])
        self.wait_ready(names[1:], timeout)

    def contribute(self, pairs: Sequence[tuple[str, Path]], timeout: float = 600.0) -> float:
        """`umm contribute EXPERT --codec bf16` for every (node, expert) pair at once.

        Returns the time (`time.time()`, within 50 ms) at which the last of them printed that its
        deltas are stored, which is when the nodes can see them all (the processes exit later).
        """
        running = []
        for name, expert in pairs:
            argv = [*UMM, "contribute", str(expert), "--data-dir", str(self.data(name)), "--codec", "bf16"]
            log = self.links.root / f"{name}.contribute.log"
            running.append((name, log, self.links.spawn(name, argv, log_path=log, env=node_env())))
        stored: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while len(stored) < len(running) and time.monotonic() < deadline:
            for name, log, proc in running:
                if name not in stored and (": manifest " in log.read_text() or proc.poll() is not None):
                    stored[name] = time.time()
            time.sleep(0.05)
        for name, log, proc in running:
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise NetsimError(f"expected `umm contribute` in {name} to end in {timeout:g} s") from None
            if code != 0:
                got = log.read_text()[-400:]
                raise NetsimError(f"expected `umm contribute` in {name} to succeed, got: {got}")
        return max(stored.values())

    def state(self, name: str, key: str) -> Any:
        from node.state import NodeState

        with NodeState(self.data(name)) as state:
            return state.get(key)

    def received(self, name: str) -> int:
        stats = self.state(name, "stats") or {}
        return int(stats.get("bytes_received", 0))

    def sent(self, name: str) -> int:
        stats = self.state(name, "stats") or {}
        return int(stats.get("bytes_sent", 0))

    def wait_converged(
        self, names: Sequence[str], timeout: float, *, since: float, round_number: int = 0
    ) -> dict[str, float]:
        """Seconds from `since` (a `time.time()`) until each node recorded an attested result of
        `round_number` (polled every 0.2 s)."""
        done: dict[str, float] = {}
        while len(done) < len(names):
            for name in names:
                if name not in done:
                    latest = self.state(name, "latest")
                    if latest is not None and latest["round"] >= round_number:
                        done[name] = time.time() - since
            if len(done) < len(names) and time.time() - since > timeout:
                missing = sorted(set(names) - set(done))
                raise NetsimError(f"expected {missing} to record round {round_number} within {timeout:g} s")
            time.sleep(0.2)
        return done

    def fingerprints(self, names: Iterable[str]) -> dict[str, str | None]:
        """Each node's latest attested fingerprint (None if it has none)."""
        return {n: (self.state(n, "latest") or {}).get("fingerprint") for n in names}

    def memory(self, name: str) -> Memory:
        return tree_memory(self.procs[name].pid)

    def kill(self, name: str) -> None:
        """SIGKILL node `name`'s whole process group (its DHT child and p2pd die with it)."""
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(timeout=30)

    def pull(self, name: str, out: Path, peers: Sequence[str], timeout: float = 600.0) -> dict:
        """`node.pull.pull` run in host `name` (pull_once.py); its JSON report."""
        argv = [sys.executable, str(PULL_ONCE), self.network_id, str(out), *peers]
        done = self.links.run(name, argv, timeout=timeout, env=node_env())
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            raise NetsimError(f"expected a pull report from {name}, got: {done.stdout[-600:]}")
        return json.loads(lines[-1])

    def status(self, name: str, peer: str) -> dict:
        """`umm status --json` run in host `name`."""
        argv = [*UMM, "status", "--network", self.network_id, "--initial-peers", peer, "--json"]
        done = self.links.run(name, argv, timeout=120, env=node_env())
        text = done.stdout
        if done.returncode != 0 or "{" not in text:
            raise NetsimError(f"expected `umm status --json` output, got: {text[-400:]}")
        return json.loads(text[text.index("{") : text.rindex("}") + 1])
