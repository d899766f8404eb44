"""Three umm nodes in network namespaces on tbf-shaped links decide one round (benchmarks/netsim).

Skipped where network namespaces cannot be created (not Linux, not root, no `ip`/`tc`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from benchmarks.netsim.cluster import SimNetwork
from benchmarks.netsim.links import LinkSim, cleanup_run, namespaces_unavailable, run_namespaces

pytestmark = [pytest.mark.network, pytest.mark.slow]

RATE_MBIT = 20.0
PAYLOAD = 3_000_000  # bytes pushed through one shaped link: 1.2 s at 20 Mbit/s
SERVER = (
    "import socket, sys, time\n"
    "s = socket.create_server((sys.argv[1], 5000))\n"
    "print('listening', flush=True)\n"
    "c, _ = s.accept(); n = 0; first = None\n"
    "while chunk := c.recv(1 << 16):\n"
    "    first = first or time.perf_counter(); n += len(chunk); last = time.perf_counter()\n"
    "print(n, last - first, flush=True)\n"
)
CLIENT = (
    "import socket, sys\n"
    "c = socket.create_connection((sys.argv[1], 5000), timeout=30)\n"
    "c.sendall(bytes(int(sys.argv[2]))); c.close()\n"
)


@pytest.fixture
def workdir():
    reason = namespaces_unavailable()
    if reason is not None:
        pytest.skip(f"the link simulator needs network namespaces: {reason}")
    folder = Path(tempfile.mkdtemp(prefix="umm-netsim-test-", dir="/var/tmp"))  # nodes get their own /tmp
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _wait_line(path: Path, text: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if text in path.read_text() or proc.poll() is not None:
            return
        time.sleep(0.05)


def test_three_nodes_on_shaped_links_decide_one_round(workdir, micro_zoo):
    names = ["n0", "n1", "n2"]
    experts = [micro_zoo.experts[d] for d in sorted(micro_zoo.experts)][:3]
    with LinkSim(workdir / "run") as links:
        for name in names:
            links.add_host(name, RATE_MBIT)
        namespaces = [links.bridge, *(h.namespace for h in links.hosts.values())]

        # The link is shaped: a raw TCP stream from n1 to n0 cannot beat 20 Mbit/s (less one burst).
        log = workdir / "server.log"
        server = links.spawn("n0", [sys.executable, "-c", SERVER, links.hosts["n0"].address], log_path=log)
        _wait_line(log, "listening", server)
        sent = links.run(
            "n1", [sys.executable, "-c", CLIENT, links.hosts["n0"].address, str(PAYLOAD)], timeout=60
        )
        assert sent.returncode == 0, sent.stdout
        server.wait(timeout=30)
        received, seconds = log.read_text().split()[-2:]
        assert int(received) == PAYLOAD
        burst = 64 * 1024
        assert float(seconds) >= (PAYLOAD - 2 * burst) * 8 / (RATE_MBIT * 1e6)

        net = SimNetwork(links, poll=0.5)
        network_id = net.create("n0", micro_zoo.base, min_contributions=3, quorum=0, settle=1.0)
        net.start_all(names, timeout=180)
        assert all(net.maddrs[n].startswith(f"/ip4/{links.hosts[n].address}/tcp/") for n in names)
        since = net.contribute(list(zip(names, experts, strict=True)), timeout=180)
        net.wait_converged(names, timeout=180, since=since)
        fingerprints = net.fingerprints(names)
        assert len(set(fingerprints.values())) == 1 and None not in fingerprints.values()
        assert network_id.startswith("netsim.")
        pids = [proc.pid for proc in net.procs.values()]
    assert not set(namespaces) & set(run_namespaces())
    assert not links.state_file.exists()
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids)


def test_cleanup_removes_what_a_killed_run_left(workdir):
    links = LinkSim(workdir / "run")  # never torn down: as if its driver was SIGKILLed
    links.add_host("n0", RATE_MBIT)
    sleeper = links.spawn("n0", ["sleep", "300"], log_path=workdir / "sleep.log")
    namespaces = [links.bridge, links.hosts["n0"].namespace]
    assert set(namespaces) <= set(run_namespaces())

    removed = cleanup_run(links.state_file)

    assert sorted(removed) == sorted(namespaces)
    assert not Path(f"/proc/{sleeper.pid}").exists()
    assert not set(namespaces) & set(run_namespaces())
    assert not links.state_file.exists()
    assert not links.hosts["n0"].tmp.exists()
