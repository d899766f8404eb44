"""Node processes: each in its own session and process group, stopped by PGID, children included.

hivemind's DHT forks a child which starts `p2pd`; `NodeDHT` makes that child die with its parent.
These helpers start a node as a session leader (so its whole tree shares one process group) and
stop it: SIGTERM to the node first, so it shuts its DHT child and `p2pd` down in order (each
removes its unix sockets); SIGTERM to the whole group after a grace period, SIGKILL after another.

A process that is killed cannot remove the unix sockets it listens on (hivemind's
``/tmp/hivemind-p2pclient-*.sock`` and ``hivemind-p2pd-*.sock``, multiprocessing's
``/tmp/pymp-*/listener-*``); `bound_unix_sockets` finds them
while the processes run and `remove_stale_sockets` deletes them once their owners are gone.
`remove_unbound_sockets`, run when a node or a pull starts, deletes hivemind's sockets that no
process holds bound any more (those of nodes killed by hand).
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

HIVEMIND_SOCKET_PREFIX = "hivemind-"  # hivemind's P2P names its sockets /tmp/hivemind-*.sock
MP_FOLDER_PREFIX = "pymp-"  # multiprocessing's temp folder (a listener socket inside)


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


def bound_unix_sockets(pids: Sequence[int]) -> set[str]:
    """Paths of the unix sockets that processes `pids` hold open with a name (Linux /proc)."""
    inodes: set[str] = set()
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(FileNotFoundError, OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    paths: set[str] = set()
    with contextlib.suppress(FileNotFoundError):
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[6] in inodes and fields[7].startswith("/"):
                paths.add(fields[7])
    return paths


def _bound_socket_paths() -> set[str]:
    """Paths of every unix socket some process holds bound now (Linux /proc/net/unix)."""
    paths: set[str] = set()
    with contextlib.suppress(FileNotFoundError):
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[7].startswith("/"):
                paths.add(fields[7])
    return paths


def remove_unbound_sockets(folder: str | Path = "/tmp") -> list[str]:
    """Delete hivemind's socket files in `folder` that no process holds bound (their owner died).

    The folder is listed before the kernel's table of bound sockets is read, so a socket bound
    in between is never taken for a stale one. Returns the paths removed.
    """
    candidates = [p for p in Path(folder).glob(f"{HIVEMIND_SOCKET_PREFIX}*.sock") if _is_socket(p)]
    if not candidates:
        return []
    bound = _bound_socket_paths()
    removed = []
    for path in candidates:
        if str(path) not in bound:
            with contextlib.suppress(FileNotFoundError, PermissionError):
                path.unlink()
                removed.append(str(path))
    return removed


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except FileNotFoundError:
        return False


def remove_stale_sockets(paths: Iterable[str], owners: Sequence[int]) -> list[str]:
    """Delete the hivemind and multiprocessing sockets among `paths` once all of `owners` are gone.

    Returns the paths removed (none while an owner lives).
    """
    if any(is_alive(pid) for pid in owners):
        return []
    removed = []
    for path in paths:
        target = Path(path)
        with contextlib.suppress(FileNotFoundError):
            if _is_ours(target) and stat.S_ISSOCK(target.lstat().st_mode):
                target.unlink()
                removed.append(path)
                if target.parent.name.startswith(MP_FOLDER_PREFIX):
                    with contextlib.suppress(OSError):
                        target.parent.rmdir()  # only if empty
    return removed


def _is_ours(path: Path) -> bool:
    """hivemind's P2P sockets, or a multiprocessing listener in its own ``pymp-*`` temp folder."""
    if path.name.startswith(HIVEMIND_SOCKET_PREFIX):
        return True
    return path.parent.name.startswith(MP_FOLDER_PREFIX) and path.name.startswith("listener-")


def stop_process_group(pid: int, *, grace: float = 10.0, sockets: Iterable[str] = ()) -> None:
    """Stop the node led by `pid`, its process group and every descendant (see the module docstring).

    Unix sockets the tree holds now, and `sockets` (found earlier), are removed once it is gone.
    """
    tree = process_tree(pid)
    stale = bound_unix_sockets(tree) | set(sockets)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    left = wait_gone(tree, grace)
    if left:
        _signal_all(pid, left, signal.SIGTERM)
        left = wait_gone(left, grace)
    if left:
        _signal_all(pid, left, signal.SIGKILL)
        wait_gone(left, 5.0)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    remove_stale_sockets(stale, tree)


def _signal_all(group: int, pids: Sequence[int], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
