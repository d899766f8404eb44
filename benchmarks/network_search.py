"""One round of a 3-node network on 127.0.0.1 (micro zoo), with searched merges and without.

The micro zoo is the node tests' (a 2-layer Llama, hidden 32, and three experts: base + seeded
noise). Both runs: `umm node start` processes n1-n3, one contribution each, clock from the last
contribution stored to every node holding the attested result. With search, n1 and n2 search
(``--search``), every node verifies every proposal, and nodes adopt the best after the genesis's
wait. The node logs give the parts: inputs written and evaluator loaded, the search itself, and
each verification (one fitness evaluation).

    python benchmarks/network_search.py [--budget 6] [--wait 60] [--limit 4]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "node"))

from node_models import make_base, make_expert

from node.local import LocalNetwork
from protocol.search_rules import make_search_settings

NODES = ("n1", "n2", "n3")


def one_round(root: Path, search) -> dict:
    make_base(root / "base")
    for index, name in enumerate(NODES):
        make_expert(root / "base", root / f"expert-{name}", seed=300 + index)
    with LocalNetwork(root) as net:
        extra = {"search": search} if search is not None else {}
        net.create(
            "n1", root / "base", network_name="bench", min_contributions=3, settle_seconds=1.0, **extra
        )
        net.start_all(NODES, searchers=("n1", "n2") if search is not None else ())
        for name in NODES:
            net.contribute(name, root / f"expert-{name}")
        started = time.monotonic()
        net.wait_converged(NODES, timeout=1200.0)
        seconds = time.monotonic() - started
    logs = "".join((root / f"{n}.log").read_text() for n in NODES)

    def times(pattern: str) -> list[float]:
        return [float(x) for x in re.findall(pattern, logs)]

    return {
        "round_s": seconds,
        "inputs_s": times(r"search inputs of \d+ admitted contributions ready in ([\d.]+) s"),
        "search_s": times(r"searched \d+ candidates in ([\d.]+) s"),
        "verify_s": times(r"(?:verified|refused) in ([\d.]+) s"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=6)
    parser.add_argument("--wait", type=float, default=60.0)
    parser.add_argument("--limit", type=int, default=4)
    args = parser.parse_args()
    search = make_search_settings(
        ["arithmetic", "logic"],
        limit=args.limit,
        budget=args.budget,
        granularity="layer",
        wait_seconds=args.wait,
    )
    with tempfile.TemporaryDirectory(prefix="umm-bench-search-") as tmp:
        plain = one_round(Path(tmp) / "plain", None)
        searched = one_round(Path(tmp) / "search", search)
    print(f"without search: round {plain['round_s']:.1f} s")
    print(f"with search (wait {args.wait:g} s, budget {args.budget}): round {searched['round_s']:.1f} s")
    for part in ("inputs_s", "search_s", "verify_s"):
        values = searched[part]
        if values:
            print(
                f"  {part[:-2]}: median {statistics.median(values):.2f} s, "
                f"max {max(values):.2f} s over {len(values)}"
            )


if __name__ == "__main__":
    main()
