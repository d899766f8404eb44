"""Shared fixtures for node tests: a few long-lived DHT peers in this process and one event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import gc

import pytest

from node.dht import NodeDHT, RecordBoard, start_dht, visible_maddrs
from node.process import process_tree, wait_gone


@dataclasses.dataclass
class Peer:
    dht: NodeDHT
    board: RecordBoard


@pytest.fixture(scope="session")
def loop():
    """One event loop for all network tests (hivemind's P2P replicas are bound to the loop)."""
    event_loop = asyncio.new_event_loop()
    yield event_loop
    pending = asyncio.all_tasks(event_loop)
    for task in pending:
        task.cancel()
    if pending:  # gather() of nothing makes a future on the current loop, not on this one
        event_loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    event_loop.run_until_complete(event_loop.shutdown_asyncgens())
    gc.collect()  # finalizers of streams and tasks run now, not in the middle of a later import
    event_loop.close()


@pytest.fixture(scope="session")
def dht_peers():
    """Three DHT peers on 127.0.0.1, started once; every child (p2pd included) is gone afterwards."""
    first, first_validator = start_dht()
    peers = [Peer(first, RecordBoard(first, first_validator))]
    for _ in range(2):
        dht, validator = start_dht(initial_peers=visible_maddrs(first))
        peers.append(Peer(dht, RecordBoard(dht, validator)))
    children = [pid for peer in peers for pid in process_tree(peer.dht.pid)]
    yield peers
    for peer in peers:
        peer.dht.shutdown()
    assert wait_gone(children, 10.0) == []
