"""A network of node processes on 127.0.0.1 under one folder (for `umm demo`, benchmarks and tests).

Each node is a `umm node start` process in its own session and process group, with its data in
``<root>/<name>`` and its output in ``<root>/<name>.log``; `close` stops every group (p2pd included)
and removes the unix sockets the nodes listened on, even for a node that was SIGKILLed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from node.contribute import PreparedContribution, contribute
from node.datafolder import load_or_create_identity
from node.errors import NodeError
from node.genesis import Genesis, create_genesis
from node.process import bound_unix_sockets, process_tree, spawn_in_new_session, stop_process_group
from node.settings import FALLBACK_SECONDS
from node.state import NodeState
from node.store import ContentStore


class LocalNetwork:
    """Node processes sharing one network (see the module docstring).

    `poll` and `fallback_seconds` are every node's ``--poll`` and ``--fallback-seconds``;
    `start` can override them for one node.
    """

    def __init__(
        self, root: str | Path, *, poll: float = 0.5, fallback_seconds: float = FALLBACK_SECONDS
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.poll = poll
        self.fallback_seconds = fallback_seconds
        self.procs: dict[str, subprocess.Popen] = {}
        self.started: dict[str, int] = {}
        self.sockets: dict[str, set[str]] = {}  # unix sockets each node's processes listen on
        self.maddrs: dict[str, list[str]] = {}  # each node's multiaddrs, as its latest start printed
        self.genesis: Genesis | None = None
        self.bootstrap = ""  # a multiaddr of the first node started (updated when it restarts)
        self.bootstrap_node = ""

    @property
    def network_id(self) -> str:
        if self.genesis is None:
            raise RuntimeError("LocalNetwork.create must run first")
        return self.genesis.network_id

    def create(
        self, node: str, base_dir: str | Path, network_name: str = "local", **settings: Any
    ) -> Genesis:
        """Write the genesis into node `node`'s data folder (start that node first: it is the bootstrap)."""
        data = self.root / node
        identity = load_or_create_identity(data)
        with ContentStore(data / "store") as store, NodeState(data) as state:
            self.genesis, record = create_genesis(network_name, base_dir, identity, store, **settings)
            state.set("genesis", record)
        return self.genesis

    def _running_peer(self, name: str) -> str | None:
        """A multiaddr of a running node other than `name`, the bootstrap node's first."""
        order = sorted(self.maddrs, key=lambda n: n != self.bootstrap_node)
        for other in order:
            if other != name and self.maddrs[other] and self.procs[other].poll() is None:
                return self.maddrs[other][0]
        return None

    def start(
        self,
        name: str,
        *,
        poll: float | None = None,
        fallback_seconds: float | None = None,
        search: bool = False,
        store_quota: int | None = None,
        args: Sequence[str] = (),
    ) -> subprocess.Popen:
        """Start (or restart) node `name`; it joins through a running node, the bootstrap if it runs.

        `poll` and `fallback_seconds` override the network's settings for this start of this node;
        `search` starts it as a searcher (``--search``); `store_quota` bounds its store
        (``--store-quota``, bytes); `args` are more `umm node start` options (e.g. ``--fuse``).
        """
        command = [sys.executable, "-m", "node.cli", "node", "start", "--data-dir", str(self.root / name)]
        command += ["--poll", str(self.poll if poll is None else poll)]
        fallback = self.fallback_seconds if fallback_seconds is None else fallback_seconds
        command += ["--fallback-seconds", str(fallback)]
        if search:
            command.append("--search")
        if store_quota is not None:
            command += ["--store-quota", str(store_quota)]
        command += list(args)
        if self.bootstrap:
            command += ["--network", self.network_id]
            peer = self._running_peer(name)
            if peer is not None:  # a restarted bootstrap with no other node running starts alone
                command += ["--initial-peers", peer]
        proc = spawn_in_new_session(command, log_path=self.root / f"{name}.log")
        self.procs[name] = proc
        self.started[name] = self.started.get(name, 0) + 1
        return proc

    def wait_ready(self, name: str, timeout: float = 120.0) -> list[str]:
        """Wait for node `name` to print ``ready``; its multiaddrs (the first node's become the bootstrap)."""
        log = self.root / f"{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = log.read_text().splitlines()
            if lines.count("ready") >= self.started[name]:
                tree = process_tree(self.procs[name].pid)
                self.sockets.setdefault(name, set()).update(bound_unix_sockets(tree))
                ready_at = [i for i, line in enumerate(lines) if line == "ready"]
                latest = lines[ready_at[-2] + 1 if len(ready_at) > 1 else 0 : ready_at[-1]]  # this start's
                maddrs = [line.split(": ", 1)[1] for line in latest if line.startswith("multiaddr: ")]
                self.maddrs[name] = maddrs
                if not self.bootstrap_node:
                    self.bootstrap_node = name
                if name == self.bootstrap_node:
                    self.bootstrap = maddrs[0]
                return maddrs
            if self.procs[name].poll() is not None:
                code = self.procs[name].returncode
                raise NodeError(f"expected node {name} to start, got exit code {code}: {self.tail(name)}")
            time.sleep(0.1)
        raise NodeError(f"expected node {name} ready within {timeout:g} s, got: {self.tail(name)}")

    def start_all(
        self,
        names: Iterable[str],
        timeout: float = 180.0,
        searchers: Iterable[str] = (),
        args: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """Start the first node, wait for it, then start the rest together and wait for them;
        the nodes in `searchers` search (``--search``); `args` adds options per node."""
        names, searchers, args = list(names), set(searchers), args or {}
        self.start(names[0], search=names[0] in searchers, args=args.get(names[0], ()))
        self.wait_ready(names[0], timeout)
        for name in names[1:]:
            self.start(name, search=name in searchers, args=args.get(name, ()))
        for name in names[1:]:
            self.wait_ready(name, timeout)

    def tail(self, name: str, size: int = 2000) -> str:
        return (self.root / f"{name}.log").read_text()[-size:]

    def contribute(self, node: str, expert_dir: str | Path, **options: Any) -> PreparedContribution:
        """Sign and store an expert in node `node`'s folder; the node announces it."""
        return contribute(self.root / node, expert_dir, **options)

    def state(self, name: str, key: str) -> Any:
        with NodeState(self.root / name) as state:
            return state.get(key)

    def wait_converged(
        self, names: Iterable[str], timeout: float = 180.0, round_number: int = 0
    ) -> dict[str, dict]:
        """Wait until every node in `names` holds an attested result for `round_number`; their latest."""
        names = list(names)
        deadline = time.monotonic() + timeout
        found: dict[str, Any] = {}
        while time.monotonic() < deadline:
            found = {n: self.state(n, "latest") for n in names}
            if all(v is not None and v["round"] >= round_number for v in found.values()):
                return found
            time.sleep(0.2)
        raise NodeError(f"expected an attested result on every node within {timeout:g} s, got {found}")

    def pull(self, out: str | Path, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run `umm pull` for this network in a separate process."""
        command = [sys.executable, "-m", "node.cli", "pull", "--network", self.network_id, "--out", str(out)]
        command += ["--initial-peers", self.bootstrap, "--timeout", str(timeout)]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout + 60)

    def stop(self, name: str, grace: float = 10.0) -> None:
        """Stop node `name` (its whole process group) and remove the unix sockets it left."""
        stop_process_group(self.procs[name].pid, grace=grace, sockets=self.sockets.pop(name, ()))

    def close(self) -> None:
        """Stop every node's process group (also those already killed: their sockets are removed)."""
        for name in list(self.procs):
            self.stop(name)

    def __enter__(self) -> LocalNetwork:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
