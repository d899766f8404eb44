"""A third-party reader: a plain `hivemind.DHT` with the documented validator reads umm's records.

The snippet is the one docs/protocol.md ("Reading umm's records with hivemind") shows: a
client-mode `hivemind.DHT` whose only validator is hivemind's `RSASignatureValidator` (umm's
subkeys carry their owner's RSA key, and each value ends with the owner's signature, which the
validator checks and strips), then `msgpack` for the record itself.
"""

from __future__ import annotations

import os

import hivemind
import msgpack
import pytest
from hivemind.dht.crypto import RSASignatureValidator

from node.dht import owner_values, visible_maddrs
from node.process import process_tree, wait_gone
from node.records import make_record, peers_key

pytestmark = [pytest.mark.network]


def read_umm_records(initial_peers: list[str], key: str) -> dict[bytes, dict]:
    """The snippet of docs/protocol.md: {owner subkey: record fields} under `key`."""
    dht = hivemind.DHT(
        initial_peers=initial_peers,
        client_mode=True,
        start=True,
        record_validators=[RSASignatureValidator()],
    )
    try:
        found = dht.get(key, latest=True)
        records = {}
        for owner, item in (found.value if found is not None else {}).items():
            records[owner] = msgpack.unpackb(item.value, raw=False)
        return records
    finally:
        dht.shutdown()


def test_a_plain_hivemind_reader_reads_a_umm_record(dht_peers):
    network_id = "interop.0123456789abcdef"
    writer = dht_peers[1].board
    record = make_record("peers", p2p="QmInteropPeer", signer=b"\x01" * 32, latest=7)
    assert writer.publish(peers_key(network_id), record, ttl=120.0)
    assert owner_values(dht_peers[0].dht.get(peers_key(network_id), latest=True)) == {writer.owner: record}

    before = set(process_tree(os.getpid()))
    records = read_umm_records(visible_maddrs(dht_peers[0].dht), peers_key(network_id))
    assert records == {writer.owner: {"p2p": "QmInteropPeer", "signer": b"\x01" * 32, "latest": 7}}
    assert wait_gone(list(set(process_tree(os.getpid())) - before), 10.0) == []  # the reader's DHT
