"""Node processes: each in its own session and process group, stopped by PGID, children included.

hivemind's DHT forks a child which starts `p2pd`; `NodeDHT` makes that child die with its parent.
These helpers start a node as a session leader (so its whole tree shares one process group) and
stop the group: SIGTERM first (clean shutdown), SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def child_pids(pid: int) -> list[int]:
    """The direct children of process `pid` (Linux /proc), empty if it is gone."""
    children: list[int] = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                children.extend(int(c) for c in (task / "children").read_text().split())
    return children


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants that are alive now."""
    tree, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        if is_alive(current):
            tree.append(current)
            frontier.extend(child_pids(current))
    return tree


def is_alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def spawn_in_new_session(
    command: Sequence[str], *, log_path: str | Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen:
    """Start `command` as the leader of a new session and process group, output appended to `log_path`."""
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
    try:
        return subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    finally:
        log.close()


def wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait until none of `pids` is alive or `timeout` passes; returns those still alive."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if is_alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def stop_process_group(pid: int, *, grace: float = 10.0) -> None:
    """SIGTERM the process group led by `pid` and every descendant; SIGKILL what is left after `grace`."""
    tree = process_tree(pid)
    _signal_all(pid, tree, signal.SIGTERM)
    left = wait_gone(tree, grace)
    if left:
        _signal_all(pid, left, signal.SIGKILL)
        wait_gone(left, 5.0)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _signal_all(group: int, pids: Sequence[int], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
