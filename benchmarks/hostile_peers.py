"""Round time with and without one stalled peer (issue 14, attack 3), on 127.0.0.1.

Three `umm node start` processes of the micro test model (tests/node/node_models.py) contribute one
expert each (the genesis asks for 3, settle 1 s); in the ``stalled`` runs a hostile key also
announces a valid contribution from a peer that accepts chunk streams and never answers
(tests/node/hostile_peer.py). The clock runs from the first contribution stored to every node
holding the attested result. Runs alternate (``none``, ``stalled``, ``none``, ...).

    python benchmarks/hostile_peers.py --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "node"))

from hostile_peer import HostilePeer, stalled_contribution
from node_models import make_base, make_expert

from node.local import LocalNetwork
from protocol.identity import Identity

NODES = ("n1", "n2", "n3")


async def one_round(root: Path, stalled: bool) -> float:
    """Seconds from the first contribution to every node holding round 0's result."""
    make_base(root / "base")
    for index, name in enumerate(NODES):
        make_expert(root / "base", root / f"expert-{name}", seed=600 + index)
    with LocalNetwork(root) as net:
        genesis = net.create(
            NODES[0], root / "base", network_name="bench", min_contributions=3, settle_seconds=1.0
        )
        await asyncio.to_thread(net.start_all, NODES)
        peer = None
        if stalled:
            key = Identity.from_seed(bytes([99]) * 32)
            peer = await HostilePeer.start(net.bootstrap, [key], root / "hostile", stall=True)
            await stalled_contribution(peer, genesis, root / "base", 0)
        try:
            started = time.perf_counter()
            for name in NODES:
                await asyncio.to_thread(net.contribute, name, root / f"expert-{name}", codec="bf16")
            await asyncio.to_thread(net.wait_converged, NODES, timeout=600.0)
            return time.perf_counter() - started
        finally:
            if peer is not None:
                await peer.close()


async def main(repeats: int) -> None:
    times: dict[str, list[float]] = {"none": [], "stalled": []}
    for _ in range(repeats):
        for mode in times:
            with tempfile.TemporaryDirectory(prefix="umm-hostile-") as folder:
                seconds = await one_round(Path(folder), mode == "stalled")
            times[mode].append(seconds)
            print(f"{mode:8s} round 0 in {seconds:.1f} s", flush=True)
    for mode, values in times.items():
        print(f"{mode:8s} median {statistics.median(values):.1f} s over {len(values)} runs: {values}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    asyncio.run(main(parser.parse_args().repeats))
