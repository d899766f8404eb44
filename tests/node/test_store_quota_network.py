"""Attack 4 of issue 14 against a node with a store quota: valid contributions past the quota.

Two honest `umm node start` processes: ``free`` without a quota and ``bounded`` with
``--store-quota`` set to the base's stored bytes plus `MARGIN`. Three hostile keys announce valid
contributions of round 0 (seeded bf16 deltas of the whole base, served by the hostile peer): bytes
no verification refuses, together about ten times the margin. ``free``'s store grows past the
quota (the attack is real); ``bounded``'s stays at or under it, its log names the quota, and it
keeps running and serving its chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
from hivemind.p2p import PeerID
from hostile_peer import HostilePeer, valid_contributions, wait_logged
from node_models import make_base

from node.errors import NodeError
from node.local import LocalNetwork
from node.store import ContentStore
from node.transport import fetch_chunks
from protocol.identity import Identity

pytestmark = [pytest.mark.network, pytest.mark.slow]

MARGIN = 192 * 1024  # quota above the base; each contribution's deltas are about 620 KB
HIDDEN = 128


def blob_bytes(store: Path) -> int:
    """The bytes of every blob file under a store folder, read from the file system (not its index)."""
    total = 0
    for blob in (store / "blobs").rglob("*"):
        with contextlib.suppress(FileNotFoundError):  # a blob the node deletes while we walk
            if blob.is_file():
                total += blob.stat().st_size
    return total


def wait_for_growth(store: Path, above: int, timeout: float) -> int:
    """Wait until the blobs under `store` exceed `above` bytes; their size then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (size := blob_bytes(store)) > above:
            return size
        time.sleep(0.5)
    raise NodeError(f"expected the store at {store} to pass {above} bytes within {timeout:g} s")


def test_a_store_quota_bounds_what_announced_contributions_add(tmp_path, loop):
    make_base(tmp_path / "base", hidden=HIDDEN)
    with LocalNetwork(tmp_path) as net:
        genesis = net.create("free", tmp_path / "base", network_name="quota", settle_seconds=1.0)
        with ContentStore(tmp_path / "free" / "store") as store:
            base_bytes = store.total_bytes()
            base_manifest = store.get(genesis.base_manifest)
        quota = base_bytes + MARGIN
        net.start("free")
        net.wait_ready("free")
        net.start("bounded", store_quota=quota)
        bounded_id = net.wait_ready("bounded")[0].rsplit("/p2p/", 1)[1]
        keys = [Identity.from_seed(bytes([121 + i]) * 32) for i in range(3)]
        peer = loop.run_until_complete(HostilePeer.start(net.bootstrap, keys, tmp_path / "hostile"))
        try:
            loop.run_until_complete(valid_contributions(peer, genesis, tmp_path / "base", 0))
            free_grew_to = loop.run_until_complete(
                asyncio.to_thread(wait_for_growth, tmp_path / "free" / "store", quota, 240.0)
            )
            refusal = f"quota of {quota} bytes"
            loop.run_until_complete(asyncio.to_thread(wait_logged, net.root, ["bounded"], refusal, 240.0))
            time.sleep(5 * net.poll)  # a few more polls after the refusal
            running = net.procs["bounded"].poll() is None
            with ContentStore(tmp_path / "probe") as probe:  # the bounded node still serves its chunks
                report = loop.run_until_complete(
                    fetch_chunks(peer.p2p, [genesis.base_manifest], [PeerID.from_base58(bounded_id)], probe)
                )
                served = probe.get(genesis.base_manifest)
        finally:
            loop.run_until_complete(peer.close())
        net.stop("bounded")
    assert free_grew_to > quota  # without a quota the same announcements pass it
    assert running
    assert report.bytes_received == len(base_manifest) and served == base_manifest
    with ContentStore(tmp_path / "bounded" / "store") as store:
        assert base_bytes <= store.total_bytes() <= quota
    assert blob_bytes(tmp_path / "bounded" / "store") <= quota
