"""An idle node's memory, process by process (issue 15): the node, its DHT child, `p2pd`.

Starts a 2-node network on 127.0.0.1 (`umm node start` processes through `node.local`) whose base
is a test-bed zoo's base model, lets both poll with no contribution for ``--idle`` seconds, then
reads each process's resident memory from /proc: VmRSS (now), VmHWM (its peak so far) and Pss
(pages shared with other processes, such as the DHT child's pages inherited from the node at
fork, counted once in total). The second node joined through the first and fetched the base.

Usage: python benchmarks/idle_memory.py [--zoo micro] [--idle 10]
Run it with PYTHONPATH set to the tree to measure (the nodes are started from that tree).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
NODES = ("n0", "n1")


def memory(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM and Pss of `pid` in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            fields["Pss"] = int(line.split()[1]) / 1024
    return fields


def role(pid: int, node_pid: int) -> str:
    if pid == node_pid:
        return "node"
    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    return "p2pd" if command.endswith(b"p2pd") else "DHT child"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="micro", help="test-bed zoo size whose base the network uses")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle polling before measuring")
    args = parser.parse_args()

    from merging.testbed.sizes import build_any_zoo
    from node.local import LocalNetwork
    from node.process import process_tree

    base = build_any_zoo(args.zoo).base
    size = (base / "model.safetensors").stat().st_size / MiB
    print(f"zoo {args.zoo}: base {base} ({size:.2f} MiB); load {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="umm-idle-") as tmp, LocalNetwork(tmp) as net:
        net.create(NODES[0], base, network_name="idle", settle_seconds=1.0)
        net.start_all(NODES)
        time.sleep(args.idle)
        assert all(net.state(name, "latest") is None for name in NODES), "a round ran: not idle"
        rows = []
        for name in NODES:
            node_pid = net.procs[name].pid
            for pid in process_tree(node_pid):
                rows.append((name, role(pid, node_pid), memory(pid)))
    print(f"{'node':5} {'process':10} {'VmRSS':>8} {'VmHWM':>8} {'Pss':>8}  (MiB)")
    for name, what, m in rows:
        print(f"{name:5} {what:10} {m['VmRSS']:>8.1f} {m['VmHWM']:>8.1f} {m['Pss']:>8.1f}")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
