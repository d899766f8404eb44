"""Shaped links on one machine: a network namespace per node, veth pairs to a bridge, `tc` tbf both ways.

Every node gets its own namespace ``umms<run>n<i>`` with one interface ``eth0`` (address
``10.213.<i // 250>.<i % 250 + 1>/16``), joined by a veth pair to the bridge ``br0`` of the run's
bridge namespace ``umms<run>br``. Both ends are shaped by a token bucket (`tc` tbf) at the node's
rate: the node's end limits what it sends, the bridge's end what it receives, so a node of
100 Mbit/s moves at most 100 Mbit/s each way. This kernel has no `netem`, so no latency is added:
the links' round trip is the veth's (tens of microseconds) plus the tbf queue (at most
``QUEUE_MS``). Addresses exist only inside the run's namespaces; nothing is routed out of them.

Every process runs under ``ip netns exec`` with a private ``/tmp`` (a bind mount of its own
folder): hivemind puts its unix sockets in ``/tmp`` and a starting node deletes the ones that no
process of *its* network namespace holds bound, which would be every other namespace's. Folders
under ``/tmp`` that the process needs (its interpreter, venv, the project) are bound back into it.

What a run creates (namespaces, processes with their start times, folders) is written to a state
file before it exists, so `teardown` (on exit, on an error or on SIGINT/SIGTERM) and
`cleanup_leftovers` (after a run that was killed outright) remove it all.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from merging.atomic import write_atomic
from merging.errors import UmmError

PREFIX = "umms"  # every namespace a run creates starts with this
STATE_DIR = Path("/run/umm-netsim")  # one state file per live run, for `cleanup_leftovers`
QUEUE_MS = 50  # the most a packet waits in a tbf queue before it is dropped
SUBNET = "10.213"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def kept_under_tmp() -> list[Path]:
    """Folders under /tmp that a node's process needs (the interpreter, its venv, the project):
    each is bound back into the private /tmp, which would otherwise hide it."""
    tmp = Path("/tmp")
    wanted = {Path(sys.prefix).resolve(), Path(sys.executable).resolve().parent, PROJECT_ROOT}
    under = sorted(p for p in wanted if tmp in p.parents)
    return [p for p in under if not any(q in p.parents for q in under)]


class NetsimError(UmmError):
    """The simulator cannot run here or a step of it failed (one sentence saying which)."""


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be created here, or None if they can."""
    if os.name != "posix" or not Path("/proc/self/ns/net").exists():
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    for tool in ("ip", "tc", "mount"):
        if shutil.which(tool) is None:
            return f"the `{tool}` command is not installed"
    probe = f"{PREFIX}probe{secrets.token_hex(2)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NetsimError(f"expected `{' '.join(command)}` to succeed, got: {done.stderr.strip()}")
    return done.stdout


def _start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), None if it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Host:
    """One simulated machine: its namespace, address, link rate and private /tmp."""

    name: str
    namespace: str
    address: str
    rate_mbit: float
    tmp: Path


def tbf(rate_mbit: float) -> list[str]:
    """tc arguments of a token bucket at `rate_mbit` (burst: 5 ms of the rate, at least 64 KiB)."""
    burst = max(64 * 1024, int(rate_mbit * 1e6 / 8 * 0.005))
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", f"{QUEUE_MS}ms"]


class LinkSim:
    """The namespaces, links and processes of one run (see the module docstring); a context manager."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        if self.root == Path("/tmp") or Path("/tmp") in self.root.parents:
            raise NetsimError(f"expected a run folder outside /tmp (each node gets its own /tmp), got {root}")
        self.root.mkdir(parents=True, exist_ok=True)
        self.run_id = secrets.token_hex(2)
        self.bridge = f"{PREFIX}{self.run_id}br"
        self.hosts: dict[str, Host] = {}
        self.processes: dict[int, int | None] = {}  # pid: kernel start time
        self.state_file = STATE_DIR / f"{self.run_id}.json"
        self._old_handlers: dict[int, object] = {}
        self._save()
        _run("ip", "netns", "add", self.bridge)
        self._save()
        _run("ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.bridge, "link", "set", "br0", "up")

    def _save(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state = {
            "root": str(self.root),
            "namespaces": [self.bridge, *(h.namespace for h in self.hosts.values())],
            "processes": self.processes,
            "tmp": [str(h.tmp) for h in self.hosts.values()],
        }
        write_atomic(self.state_file, json.dumps(state, sort_keys=True).encode())

    def add_host(self, name: str, rate_mbit: float) -> Host:
        """A namespace for `name` with a link of `rate_mbit` each way to the bridge."""
        index = len(self.hosts)
        if index >= 250 * 250:
            raise NetsimError(f"expected at most {250 * 250} hosts in one run, got one more")
        if rate_mbit <= 0:
            raise NetsimError(f"expected a positive link rate for {name}, got {rate_mbit} Mbit/s")
        namespace = f"{PREFIX}{self.run_id}n{index}"
        address = f"{SUBNET}.{index // 250}.{index % 250 + 1}"
        tmp = self.root / "tmp" / name
        tmp.mkdir(parents=True, exist_ok=True)
        host = Host(name, namespace, address, rate_mbit, tmp)
        self.hosts[name] = host
        self._save()  # recorded before it exists
        _run("ip", "netns", "add", namespace)
        inner, outer = f"u{self.run_id}n{index}a", f"u{self.run_id}n{index}b"
        _run("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
        _run("ip", "link", "set", inner, "netns", namespace)
        _run("ip", "link", "set", outer, "netns", self.bridge)
        _run("ip", "-n", namespace, "link", "set", inner, "name", "eth0")
        _run("ip", "-n", namespace, "addr", "add", f"{address}/16", "dev", "eth0")
        _run("ip", "-n", namespace, "link", "set", "lo", "up")
        _run("ip", "-n", namespace, "link", "set", "eth0", "up")
        _run("ip", "-n", self.bridge, "link", "set", outer, "master", "br0")
        _run("ip", "-n", self.bridge, "link", "set", outer, "up")
        _run("tc", "-n", namespace, "qdisc", "add", "dev", "eth0", "root", *tbf(rate_mbit))
        _run("tc", "-n", self.bridge, "qdisc", "add", "dev", outer, "root", *tbf(rate_mbit))
        return host

    def set_rate(self, name: str, rate_mbit: float) -> None:
        """Change the link rate of host `name`, both ways."""
        host = self.hosts[name]
        index = list(self.hosts).index(name)
        _run("tc", "-n", host.namespace, "qdisc", "replace", "dev", "eth0", "root", *tbf(rate_mbit))
        outer = f"u{self.run_id}n{index}b"
        _run("tc", "-n", self.bridge, "qdisc", "replace", "dev", outer, "root", *tbf(rate_mbit))
        self.hosts[name] = Host(name, host.namespace, host.address, rate_mbit, host.tmp)

    def command(self, name: str, argv: Sequence[str]) -> list[str]:
        """`argv` run in host `name`'s namespace with its private /tmp."""
        host = self.hosts[name]
        binds = ""
        for kept in kept_under_tmp():
            inside = f'"$0/{kept.relative_to("/tmp")}"'
            binds += f'mkdir -p {inside} && mount --bind "{kept}" {inside} && '
        wrapper = f'{binds}mount --rbind "$0" /tmp && exec "$@"'
        return ["ip", "netns", "exec", host.namespace, "sh", "-c", wrapper, str(host.tmp), *argv]

    def spawn(
        self, name: str, argv: Sequence[str], *, log_path: Path, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen:
        """Start `argv` in host `name` as a session leader, output appended to `log_path`; recorded."""
        log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            proc = subprocess.Popen(
                self.command(name, argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        finally:
            log.close()
        self.processes[proc.pid] = _start_time(proc.pid)
        self._save()
        return proc

    def run(
        self, name: str, argv: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """Run `argv` in host `name` to completion (killed with its group after `timeout` seconds)."""
        log_path = self.root / f"{name}.run.log"
        proc = self.spawn(name, argv, log_path=log_path, env=env)
        start = log_path.stat().st_size if log_path.exists() else 0
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            what = " ".join(argv[:4])
            raise NetsimError(f"expected `{what}` in {name} to end within {timeout:g} s") from None
        with open(log_path, "rb") as log:
            log.seek(start)
            output = log.read().decode(errors="replace")
        return subprocess.CompletedProcess(argv, proc.returncode, output, "")

    def teardown(self) -> None:
        """Kill every recorded process and anything left in the run's namespaces, delete them."""
        _remove(
            [self.bridge, *(h.namespace for h in self.hosts.values())],
            self.processes,
            [h.tmp for h in self.hosts.values()],
        )
        self.state_file.unlink(missing_ok=True)

    def _on_signal(self, signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def __enter__(self) -> LinkSim:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        # A second Ctrl-C during teardown must not leave namespaces behind.
        for sig in self._old_handlers:
            signal.signal(sig, signal.SIG_IGN)
        try:
            self.teardown()
        finally:
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)


def _kill_recorded(processes: Mapping[int, int | None], grace: float = 5.0) -> None:
    """SIGTERM to each recorded process group still led by the same process, SIGKILL after `grace`."""
    ours = [pid for pid, started in processes.items() if started is not None and _start_time(pid) == started]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_start_time(p) is not None for p in ours):
            time.sleep(0.05)
            for pid in ours:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)


def _remove(namespaces: Sequence[str], processes: Mapping[int, int | None], folders: Sequence[Path]) -> None:
    _kill_recorded(processes)
    for namespace in namespaces:  # anything still inside (e.g. a p2pd whose parent died)
        listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
        for pid in listed.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    for namespace in namespaces:
        for _ in range(50):  # a namespace with a dying process may refuse for a moment
            gone = subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
            if gone.returncode == 0 or namespace not in run_namespaces():
                break
            time.sleep(0.1)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def run_namespaces() -> list[str]:
    """The namespaces whose names start with PREFIX (ours, from any run)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in listed.stdout.splitlines() if line.startswith(PREFIX)]


def cleanup_run(state_file: Path) -> list[str]:
    """Remove what the run of `state_file` recorded (processes, namespaces, folders); its namespaces."""
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        state_file.unlink(missing_ok=True)
        return []
    processes = {int(pid): started for pid, started in state.get("processes", {}).items()}
    namespaces = state.get("namespaces", [])
    _remove(namespaces, processes, [Path(p) for p in state.get("tmp", [])])
    state_file.unlink(missing_ok=True)
    return namespaces


def cleanup_leftovers() -> list[str]:
    """Remove what killed runs left: every recorded run (`cleanup_run`), then any namespace named
    PREFIX... still there. Run it only while no simulation runs. Returns the namespaces removed.
    """
    removed: list[str] = []
    for path in sorted(STATE_DIR.glob("*.json")) if STATE_DIR.exists() else []:
        removed += cleanup_run(path)
    stray = run_namespaces()
    _remove(stray, {}, [])
    return removed + stray
