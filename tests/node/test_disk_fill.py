"""Attack 4 of issue 14 on real node processes: announced blobs do not fill honest disks.

Two honest `umm node start` processes sit in round 0. Two hostile keys announce contributions
whose "manifests" are large blobs: one above the node's chunk limit (`node_chunk_limit`: refused
from its frame header, before its bytes are accepted), one below it but above a manifest's size
(fetched, refused by verification, deleted, never fetched again). Neither stays in an honest store.
"""

from __future__ import annotations

import asyncio

import pytest
from hostile_peer import HostilePeer, oversized_manifests, wait_logged
from node_models import make_base

from node.fetcher import node_chunk_limit
from node.local import LocalNetwork
from node.store import ContentStore
from protocol.identity import Identity
from protocol.messages import DeltaManifest

pytestmark = [pytest.mark.network, pytest.mark.slow]

NODES = ("h1", "h2")
REJECTED = "ignoring a contribution record"


def test_oversized_manifests_leave_no_bytes_behind(tmp_path, loop):
    make_base(tmp_path / "base")
    with LocalNetwork(tmp_path) as net:
        genesis = net.create(NODES[0], tmp_path / "base", network_name="fill", settle_seconds=1.0)
        net.start_all(NODES)
        before = {}
        for name in NODES:
            with ContentStore(tmp_path / name / "store") as store:
                before[name] = store.total_bytes()
        keys = [Identity.from_seed(bytes([111 + i]) * 32) for i in range(2)]
        sizes = [node_chunk_limit(genesis.chunk_size) + 1024, DeltaManifest.MAX_SIZE + 64 * 1024]
        peer = loop.run_until_complete(HostilePeer.start(net.bootstrap, keys, tmp_path / "hostile"))
        try:
            blobs = loop.run_until_complete(oversized_manifests(peer, genesis, sizes, 0))
            loop.run_until_complete(asyncio.to_thread(wait_logged, net.root, NODES, REJECTED, timeout=120.0))
            received = loop.run_until_complete(
                asyncio.to_thread(lambda: [net.state(n, "stats") for n in NODES])
            )
        finally:
            loop.run_until_complete(peer.close())
        for name in NODES:
            with ContentStore(tmp_path / name / "store") as store:
                assert store.missing(blobs) == blobs
                assert store.total_bytes() == before[name]
        assert all(s is None or s["bytes_received"] < sizes[0] for s in received)
