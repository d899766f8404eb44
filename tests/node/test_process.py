"""Stopping node processes leaves no unix socket behind, even after a SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from node.process import (
    bound_unix_sockets,
    remove_stale_sockets,
    remove_unbound_sockets,
    stop_process_group,
    wait_gone,
)

LISTENER = """
import socket, sys, time
for path in sys.argv[1:]:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()
    globals().setdefault("keep", []).append(server)
print("listening", flush=True)
time.sleep(60)
"""


def _listener(*paths: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", LISTENER, *map(str, paths)], stdout=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout.readline() == b"listening\n"
    return proc


def test_sockets_of_a_killed_process_are_found_and_removed(tmp_path):
    ours, other = tmp_path / "hivemind-p2pclient-test.sock", tmp_path / "not-hivemind.sock"
    (tmp_path / "pymp-test").mkdir()
    mp_listener = tmp_path / "pymp-test" / "listener-test"
    proc = _listener(ours, other, mp_listener)
    try:
        found = bound_unix_sockets([proc.pid])
        assert found == {str(ours), str(other), str(mp_listener)}
        assert remove_stale_sockets(found, [proc.pid]) == []  # the owner lives: nothing removed
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert ours.exists() and other.exists()  # a killed process cannot remove its sockets
        removed = remove_stale_sockets(found, [proc.pid])
        assert sorted(removed) == sorted([str(ours), str(mp_listener)])  # hivemind's and pymp's only
        assert not ours.exists() and other.exists()
        assert not (tmp_path / "pymp-test").exists()  # the emptied multiprocessing folder too
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stop_process_group_removes_the_sockets_its_tree_held(tmp_path):
    path = tmp_path / "hivemind-p2pd-test.sock"
    proc = _listener(path)
    started = time.monotonic()
    stop_process_group(proc.pid, grace=5.0)
    assert wait_gone([proc.pid], 1.0) == []
    assert time.monotonic() - started < 5.0  # SIGTERM to the leader was enough
    assert not path.exists()


def test_unbound_hivemind_sockets_are_removed_and_bound_ones_kept(tmp_path):
    live = tmp_path / "hivemind-p2pd-live.sock"
    proc = _listener(live)
    try:
        dead = tmp_path / "hivemind-p2pclient-dead.sock"
        closed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        closed.bind(str(dead))  # bound, then closed without unlinking: what a killed process leaves
        closed.close()
        plain = tmp_path / "hivemind-notes.sock"
        plain.write_text("a regular file")
        other = tmp_path / "other-dead.sock"
        foreign = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        foreign.bind(str(other))
        foreign.close()
        assert remove_unbound_sockets(tmp_path) == [str(dead)]
        assert live.exists() and plain.exists() and other.exists() and not dead.exists()
    finally:
        stop_process_group(proc.pid, grace=5.0, sockets=[str(live)])
