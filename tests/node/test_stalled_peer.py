"""Attack 3 of issue 14 on real node processes: a peer that never answers costs a round little.

Three honest `umm node start` processes contribute; a hostile key announces a valid contribution
from a peer that accepts chunk streams and never answers them (its manifest included). The honest
nodes fetch manifests in the background (a poll waits at most `MANIFEST_WAIT` for them), race
holders for chunks and bench a peer that stalled (`node.fetcher.PeerPenalties`), so they decide
round 0 of their three contributions without the stalled one. How long the round takes with and
without the stalled peer is measured by benchmarks/hostile_peers.py (tests assert no times).
"""

from __future__ import annotations

import asyncio

import pytest
from hostile_peer import HostilePeer, stalled_contribution
from node_models import make_base, make_expert

from node.local import LocalNetwork
from node.store import ContentStore
from protocol.envelope import open_envelope
from protocol.identity import Identity
from protocol.messages import MergeResult

pytestmark = [pytest.mark.network, pytest.mark.slow]

NODES = ("h1", "h2", "h3")


def test_a_stalled_contribution_is_left_out_and_the_round_decides(tmp_path, loop):
    make_base(tmp_path / "base")
    for index, name in enumerate(NODES):
        make_expert(tmp_path / "base", tmp_path / f"expert-{name}", seed=500 + index)
    with LocalNetwork(tmp_path) as net:
        genesis = net.create(
            NODES[0], tmp_path / "base", network_name="stalled", min_contributions=3, settle_seconds=1.0
        )
        net.start_all(NODES)
        key = Identity.from_seed(bytes([99]) * 32)
        peer = loop.run_until_complete(
            HostilePeer.start(net.bootstrap, [key], tmp_path / "hostile", stall=True)
        )
        try:
            stalled = loop.run_until_complete(stalled_contribution(peer, genesis, tmp_path / "base", 0))
            for name in NODES:
                net.contribute(name, tmp_path / f"expert-{name}", codec="bf16")
            latest = loop.run_until_complete(asyncio.to_thread(net.wait_converged, NODES, timeout=240.0))
        finally:
            loop.run_until_complete(peer.close())
        assert len({v["fingerprint"] for v in latest.values()}) == 1
        with ContentStore(tmp_path / "h1" / "store") as store:
            result = open_envelope(
                store.get(latest["h1"]["results"][0]), MergeResult, network_id=genesis.network_id
            )
        assert len(result.message.candidates) == 3 and stalled not in result.message.candidates
