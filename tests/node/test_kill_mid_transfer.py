"""A peer SIGKILLed while chunks stream from it: the fetch completes from another peer, all verified.

Two `umm node start` processes on 127.0.0.1 (each its own process group): n1 creates a network
whose base (~47 MiB of float32 chunks) n2 fetches when it joins, so both serve every base chunk.
This process fetches all of them from both; once chunks are arriving, n1's whole process group
(node, DHT child, p2pd) is SIGKILLed. Every process started, p2pd included, is gone at the end,
and so are the unix sockets the nodes listened on.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest
from hivemind.p2p import PeerID
from node_models import make_base

from node.dht import start_dht
from node.genesis import read_base_manifest
from node.local import LocalNetwork
from node.process import process_tree, wait_gone
from node.store import ContentStore, sha256_hex
from node.transport import fetch_chunks

pytestmark = [pytest.mark.network, pytest.mark.slow]


class KillingSink(ContentStore):
    """A store that SIGKILLs a process group once `after` chunks have arrived."""

    def __init__(self, root, victim_group: int, after: int) -> None:
        super().__init__(root)
        self.victim_group = victim_group
        self.after = after
        self.killed = threading.Event()
        self._count = 0
        self._count_lock = threading.Lock()

    def put(self, data, digest=None):
        stored = super().put(data, digest)
        with self._count_lock:
            self._count += 1
            if self._count == self.after:
                os.killpg(self.victim_group, signal.SIGKILL)
                self.killed.set()
        return stored


def _peer_id(maddr: str) -> PeerID:
    return PeerID.from_base58(maddr.rsplit("/p2p/", 1)[1])


def test_fetch_survives_a_peer_killed_mid_transfer(tmp_path):
    make_base(tmp_path / "base", hidden=768)
    started: list[int] = []
    with LocalNetwork(tmp_path / "net") as net:
        genesis = net.create("n1", tmp_path / "base", network_name="kill", min_contributions=2)
        with ContentStore(tmp_path / "net" / "n1" / "store") as store:
            entries = read_base_manifest(store.get(genesis.base_manifest))
        digests = list(dict.fromkeys(d for entry in entries for d in entry.chunks))
        assert len(digests) >= 40  # enough chunks that the kill lands mid-transfer
        net.start_all(["n1", "n2"])
        victim, survivor = (net.procs[n] for n in ("n1", "n2"))
        started += process_tree(victim.pid) + process_tree(survivor.pid)
        assert len(started) >= 6  # node, DHT child and p2pd for each
        peers = [_peer_id(net.wait_ready(n)[0]) for n in ("n1", "n2")]
        sockets = set().union(*net.sockets.values())
        assert len(sockets) >= 4 and all(os.path.exists(s) for s in sockets)  # p2pd's and clients'

        dht, _ = start_dht(initial_peers=[net.bootstrap], client_mode=True)
        started += process_tree(dht.pid)
        sink = KillingSink(tmp_path / "sink", victim.pid, after=6)

        async def fetch():
            p2p = await dht.replicate_p2p()
            try:
                return await fetch_chunks(p2p, digests, peers, sink, streams_per_peer=2, batch=2, timeout=10)
            finally:
                await p2p.shutdown()

        try:
            report = asyncio.run(fetch())
        finally:
            dht.shutdown()
        assert sink.killed.is_set()
        assert wait_gone(process_tree(victim.pid), 5.0) == []
        assert report.fetched == len(digests)
        assert str(peers[0]) in report.dropped_peers  # n1 died with chunks requested from it
        assert report.bytes_by_peer[str(peers[1])] > 0
        for digest in digests:  # every chunk is there and hashes to its address
            assert sha256_hex(sink.get(digest)) == digest
        assert sink.missing(digests) == []
        sink.close()
        assert survivor.poll() is None  # the other node kept running
    assert wait_gone(started, 15.0) == []
    assert [s for s in sockets if os.path.exists(s)] == []  # also those of the SIGKILLed node
