"""What an idle node imports, and what each heavy package costs in memory.

One `umm node start` runs under ``python -X importtime`` (in a namespace when the simulator can
run here, otherwise on 127.0.0.1); the modules it imported before printing ``ready`` are grouped
by top-level package (count, cumulative import time). Then, for each package of more than
``HEAVY_MS`` of import time, a fresh interpreter imports that package alone: its resident and
proportional memory over a bare interpreter's. Finally the idle node's own memory (its process
tree: node, DHT child, p2pd).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.netsim.cluster import SimNetwork, node_env
from benchmarks.netsim.links import LinkSim, namespaces_unavailable

HEAVY_MS = 50.0
_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")
_MEASURE = (
    "import os, sys, psutil\n"
    "for name in sys.argv[1:]:\n"
    "    __import__(name)\n"
    "m = psutil.Process().memory_full_info()\n"
    "print(m.rss >> 20, m.pss >> 20)\n"
)


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


def package_memory(names: list[str]) -> tuple[int, int]:
    """(rss, pss) MiB of a fresh interpreter that imported `names`."""
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, *names], capture_output=True, text=True, env=node_env(), timeout=300
    )
    rss, pss = done.stdout.split()[-2:]
    return int(rss), int(pss)


def report_imports() -> None:
    from benchmarks.network_converge import make_models

    if namespaces_unavailable() is not None:
        raise SystemExit("Error: the imports report starts its node in a namespace; run it as root on Linux.")
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
            log = net.log("n0").read_text(errors="replace")
    packages = idle_imports(log)
    bare = package_memory([])
    print(f"idle node (process tree): rss {memory.rss:.0f} MiB, pss {memory.pss:.0f} MiB")
    print(f"bare interpreter: rss {bare[0]} MiB, pss {bare[1]} MiB")
    print(
        f"{'package':16} {'modules':>7} {'own ms':>7} {'alone: +rss MiB':>15} {'+pss MiB':>8}  "
        "first imported by"
    )
    for top, (count, ms, importer) in sorted(packages.items(), key=lambda item: -item[1][1]):
        if ms < HEAVY_MS:
            continue
        rss, pss = package_memory([top])
        print(f"{top:16} {count:>7} {ms:>7.0f} {rss - bare[0]:>15} {pss - bare[1]:>8}  {importer or '-'}")
    light = sorted(top for top, (_, ms, _) in packages.items() if ms < HEAVY_MS)
    print(f"under {HEAVY_MS:g} ms each ({len(light)} packages): {', '.join(light)}")
