"""One pull, as `umm pull` does it, printing a JSON report (run by cluster.py inside a namespace).

Usage: python pull_once.py NETWORK_ID OUT PEER_MULTIADDR...
The report: bytes fetched, the round, the pull's phases (seconds) and its total wall time.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> None:
    from node.pull import pull

    network_id, out, peers = argv[0], Path(argv[1]), argv[2:]
    started = time.perf_counter()
    outcome = asyncio.run(pull(network_id, out, initial_peers=peers, timeout=120.0))
    report = {
        "bytes": outcome.bytes_fetched,
        "round": outcome.round,
        "fingerprint": outcome.merged_fingerprint,
        "seconds": outcome.seconds,
        "total": time.perf_counter() - started,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
