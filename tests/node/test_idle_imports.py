"""An idle node holds only what it runs (issue 15): the heavy imports a node needs only to merge,
train, search, fuse or print tables stay out of a started node until that work comes.

Two real `umm node start` processes (a bootstrap and a node that joins it and fetches the base)
run with Python's import-time report on (``PYTHONPROFILEIMPORTTIME=1``): each process, the forked
DHT child included, writes one ``import time:`` line to its log for every module the first time it
imports it. After both printed ``ready`` and polled for a while with no contribution (no round
started), their logs must name the modules a node always runs and none of the avoidable ones.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from node_models import make_base

from node.local import LocalNetwork

pytestmark = [pytest.mark.network, pytest.mark.slow]

NODES = ("idle1", "idle2")
IDLE_POLLS = 10  # with --poll 0.5: five seconds of idle polling after both are ready
# what every node runs: their presence shows the report works (else an empty log would pass)
NEEDED = ("torch", "hivemind.p2p", "hivemind.dht", "node.service", "node.store", "protocol.verify")
# what an idle node must not hold, and the work that needs it
AVOIDABLE = {
    "transformers": "loading models (contribute, search, fuse, eval)",
    "accelerate": "loading models",
    "merging.testbed.training": "training the zoo",
    "merging.testbed.harness": "evaluating models",
    "merging.search.driver": "the CMA-ES search",
    "cma": "the CMA-ES search",
    "merging.fusion.pipeline": "fusing heterogeneous experts",
    "merging.kernels": "the first merge",
    "numba": "the first merge",
    "llvmlite": "the first merge",
    "scipy": "hivemind's averager (never used by a node)",
    "pydantic": "hivemind's optimizer (never used by a node)",
    "hivemind.averaging": "hivemind's averager",
    "hivemind.optim": "hivemind's optimizer",
    "hivemind.moe": "hivemind's expert server",
    "rich.console": "commands that print tables or progress",
    "rich.table": "commands that print tables",
}
_IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$")


def imported_modules(log: Path) -> set[str]:
    """Every module named by an ``import time:`` line of `log`."""
    found = set()
    for line in log.read_text(errors="replace").splitlines():
        match = _IMPORT_LINE.match(line)
        if match is not None:
            found.add(match.group(1))
    return found


def test_an_idle_node_has_not_imported_what_only_work_needs(tmp_path, monkeypatch):
    make_base(tmp_path / "base")
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # inherited by the node processes only
    with LocalNetwork(tmp_path) as net:
        net.create(NODES[0], tmp_path / "base", network_name="idle", settle_seconds=1.0)
        net.start_all(NODES)
        time.sleep(IDLE_POLLS * net.poll)
        assert [net.state(name, "latest") for name in NODES] == [None, None]  # no round decided
        alive = [net.procs[name].poll() is None for name in NODES]
        logs = {name: imported_modules(net.root / f"{name}.log") for name in NODES}
    assert alive == [True, True]
    for name, modules in logs.items():
        assert set(NEEDED) <= modules, f"{name}: the import report lacks {set(NEEDED) - modules}"
        held = sorted(m for m in AVOIDABLE if m in modules)
        assert held == [], f"{name} imported at idle: " + "; ".join(f"{m} ({AVOIDABLE[m]})" for m in held)
