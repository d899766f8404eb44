"""What an idle node imports, and what the heavy packages cost in memory.

One `umm node start` runs under ``python -X importtime`` in a namespace; the modules it imported
before printing ``ready`` are grouped by top-level package (module count, time spent in the
package's own modules, the module that first imported it), and the idle node's process tree
(node, DHT child, p2pd) is measured process by process. Then one fresh interpreter imports
``STEPS`` in turn and prints its memory after each: what each step adds over the ones above it.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.netsim.cluster import SimNetwork, node_env
from benchmarks.netsim.links import LinkSim

HEAVY_MS = 50.0
# One interpreter imports these in order; the memory each step adds is that package's marginal cost
# over everything above it (a package's own dependencies already loaded are not counted again).
STEPS = ("torch", "numba", "hivemind", "node.service", "node.cli")
_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")


def idle_imports(log_text: str) -> dict[str, tuple[int, float, str]]:
    """{top-level package: (modules, ms spent in its own modules, the module that first imported it)}
    for what was imported before ``ready`` (`-X importtime` lists a module after its imports, one
    level of indentation deeper than its importer)."""
    rows = []  # (depth, module, self us)
    for line in log_text.split("\nready\n", 1)[0].splitlines():
        match = _LINE.match(line)
        if match is not None:
            rows.append((len(match.group(3)) // 2, match.group(4), int(match.group(1))))
    modules: dict[str, int] = defaultdict(int)
    own: dict[str, float] = defaultdict(float)
    via: dict[str, str] = {}
    for index, (depth, name, self_us) in enumerate(rows):
        top = name.split(".")[0]
        modules[top] += 1
        own[top] += self_us / 1000
        if top not in via:
            parent = next((n for d, n, _ in rows[index + 1 :] if d < depth), "")
            if parent.split(".")[0] != top:
                via[top] = parent
    return {top: (modules[top], own[top], via.get(top, "")) for top in modules}


_STEPWISE = (
    "import sys, psutil\n"
    "for name in sys.argv[1:]:\n"
    "    __import__(name)\n"
    "    m = psutil.Process().memory_full_info()\n"
    "    print(name, m.rss >> 20, m.pss >> 20, flush=True)\n"
)


def stepwise_memory(steps: tuple[str, ...] = STEPS) -> list[tuple[str, int, int]]:
    """(module, rss MiB, pss MiB) after importing each of `steps` in turn in one fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", _STEPWISE, *steps], capture_output=True, text=True, env=node_env(), timeout=300
    )
    rows = [line.split() for line in done.stdout.splitlines() if len(line.split()) == 3]
    return [(name, int(rss), int(pss)) for name, rss, pss in rows]


def process_memory(pid: int) -> list[tuple[str, float, float]]:
    """(command, rss MiB, pss MiB) of `pid` and each of its descendants."""
    import psutil

    root = psutil.Process(pid)
    rows = []
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            info = proc.memory_full_info()
            command = " ".join(proc.cmdline()[:3])[:40]
            rows.append((command, info.rss / 2**20, info.pss / 2**20))
    return rows


def report_imports() -> None:
    from benchmarks.network_converge import make_models

    with tempfile.TemporaryDirectory(prefix="umm-netsim-imports-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        base, _ = make_models(root, 1, 64, 1)
        with LinkSim(root / "run") as links:
            links.add_host("n0", 100.0)
            net = SimNetwork(links)
            net.create("n0", base, min_contributions=2, quorum=0, settle=1.0)
            net.start("n0", python_flags=["-X", "importtime"])
            net.wait_ready(["n0"], timeout=300)
            time.sleep(5)  # idle: a few polls
            memory = net.memory("n0")
            processes = process_memory(net.procs["n0"].pid)
            log = net.log("n0").read_text(errors="replace")
    packages = idle_imports(log)
    print(f"idle node (process tree): rss {memory.rss:.0f} MiB, pss {memory.pss:.0f} MiB")
    for name, rss, pss in processes:
        print(f"  {name:40} rss {rss:>5.0f} MiB, pss {pss:>5.0f} MiB")
    print(f"imported before `ready`: {sum(c for c, _, _ in packages.values())} modules")
    print(f"{'package':16} {'modules':>7} {'own ms':>7}  first imported by")
    for top, (count, ms, importer) in sorted(packages.items(), key=lambda item: -item[1][1]):
        if ms >= HEAVY_MS:
            print(f"{top:16} {count:>7} {ms:>7.0f}  {importer or '-'}")
    light = sorted(top for top, (_, ms, _) in packages.items() if ms < HEAVY_MS)
    print(f"under {HEAVY_MS:g} ms each ({len(light)} packages): {', '.join(light)}")
    print("one interpreter importing in turn (what each step adds over the steps above it):")
    steps = stepwise_memory(("sys", *STEPS))
    previous = steps[0][1:]
    print(f"  bare interpreter rss {previous[0]:>5} MiB, pss {previous[1]:>5} MiB")
    for name, rss, pss in steps[1:]:
        print(
            f"  + {name:14} rss {rss:>5} MiB (+{rss - previous[0]:>4}), "
            f"pss {pss:>5} MiB (+{pss - previous[1]:>4})"
        )
        previous = (rss, pss)
