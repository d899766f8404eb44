"""node.lookups: peer and shard records read from a board, and the bounded memory of opened attestations."""

from __future__ import annotations

import asyncio

from hivemind.p2p import PeerID

from node.lookups import (
    OpenedAttestations,
    latest_rounds_from_records,
    peers_from_records,
    read_shard_records,
)
from node.records import make_record
from protocol.identity import Identity

PEERS = ["QmX5nkZmABZk5i4rRgt61PrmTdnLRtZ1taxtgaKvYwnNi4", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"]


class Board:
    def __init__(self, records: dict[bytes, bytes]) -> None:
        self.records = records

    async def aread(self, _key, *, latest: bool = True):
        return self.records


def _peer(p2p: str, latest: int) -> bytes:
    return make_record("peers", p2p=p2p, signer=Identity.from_seed(b"\x01" * 32).public_key, latest=latest)


def test_peer_records_give_sorted_peers_and_claimed_rounds():
    values = [_peer(PEERS[1], 3), _peer(PEERS[0], -1), _peer(PEERS[1], 3), b"junk", _peer("not-a-peer", 5)]
    assert peers_from_records(values) == sorted({PeerID.from_base58(p) for p in PEERS}, key=str)
    assert peers_from_records(values, exclude=PEERS[1]) == [PeerID.from_base58(PEERS[0])]
    assert latest_rounds_from_records(values) == [5, 3]


def test_shard_records_keep_holders_of_results_whose_attestations_do_not_open():
    result_id = "ab" * 32
    board = Board({b"a": make_record("result", result=result_id, attestation=b"not signed", p2p=PEERS[0])})
    records = asyncio.run(read_shard_records(board, "net.0123456789abcdef", 0, 0))
    assert records.holders == {result_id: {PEERS[0]}} and records.attestations.by_result == {}


def test_opened_attestations_drop_the_older_half_beyond_their_limit():
    opened = OpenedAttestations(limit=4)
    for n in range(4):
        opened[bytes([n])] = n
    opened[bytes([1])] = 10  # replacing an entry drops nothing
    assert list(opened) == [bytes([n]) for n in range(4)]
    opened[b"new"] = 5
    assert list(opened) == [bytes([2]), bytes([3]), b"new"] and opened[bytes([2])] == 2
