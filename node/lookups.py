"""Reading the network's DHT records (layout in node.records): genesis, peers and shard attestations.

Every reader takes a board with an async ``aread(key)`` (`RecordBoard` in a node, `ClientBoard` in
`umm pull` and `umm status`) and returns verified or well-formed values only: records that do not
parse are skipped, attestations are opened once (protocol.decision.ShardAttestations; a caller
that passes the same `opened` mapping to every read opens each attestation once over all reads).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Iterable, MutableMapping
from typing import Protocol

from hivemind.p2p import PeerID

from node.records import genesis_key, parse_record, peers_key, result_key
from protocol.decision import ShardAttestations
from protocol.envelope import Signed
from protocol.genesis import Genesis, genesis_from_records


class OpenedAttestations(dict):
    """Attestations a node opened, by their bytes (for `ShardAttestations.verify`'s `opened`).

    Holds at most `limit` of them; beyond, the older half is dropped (they are opened again if seen).
    """

    def __init__(self, limit: int = 50_000) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: bytes, value: Signed) -> None:
        if key not in self and len(self) >= self.limit:
            for old in list(self)[: self.limit // 2]:
                del self[old]
        super().__setitem__(key, value)


class RecordReader(Protocol):
    """What the readers need of a DHT client (`RecordBoard` and `ClientBoard` are ones)."""

    async def aread(self, key: str, *, latest: bool = True) -> dict[bytes, bytes]: ...


def peers_from_records(values: Iterable[bytes], *, exclude: str | None = None) -> list[PeerID]:
    """The libp2p peer ids in `values` (peer records), sorted, without `exclude`."""
    found = []
    for value in values:
        record = parse_record("peers", value)
        if record is None or record["p2p"] == exclude:
            continue
        with contextlib.suppress(Exception):
            found.append(PeerID.from_base58(record["p2p"]))
    return sorted(set(found), key=str)


def latest_rounds_from_records(values: Iterable[bytes]) -> list[int]:
    """Rounds the peer records in `values` claim as latest, highest first (hints; quorum is checked)."""
    rounds = set()
    for value in values:
        record = parse_record("peers", value)
        if record is not None and record["latest"] >= 0:
            rounds.add(record["latest"])
    return sorted(rounds, reverse=True)


async def read_genesis(board: RecordReader, network_id: str) -> tuple[Genesis, bytes] | None:
    """The genesis of `network_id` from the DHT, verified against the id; None if nobody has it."""
    return genesis_from_records((await board.aread(genesis_key(network_id))).values(), network_id)


async def read_peers(board: RecordReader, network_id: str, *, exclude: str | None = None) -> list[PeerID]:
    """The libp2p peer ids that announced themselves on the network."""
    return peers_from_records((await board.aread(peers_key(network_id))).values(), exclude=exclude)


@dataclasses.dataclass
class ShardRecords:
    """One shard key's verified attestations and, per result id, the peers that hold it."""

    attestations: ShardAttestations
    holders: dict[str, set[str]]


async def read_shard_records(
    board: RecordReader,
    network_id: str,
    round_number: int,
    shard: int,
    *,
    opened: MutableMapping[bytes, Signed] | None = None,
) -> ShardRecords:
    """The result records of `shard` in `round_number` (attestations opened once, bad ones dropped)."""
    holders: dict[str, set[str]] = {}
    raws = []
    for value in (await board.aread(result_key(network_id, round_number, shard))).values():
        record = parse_record("result", value)
        if record is None:
            continue
        holders.setdefault(record["result"], set()).add(record["p2p"])
        raws.append(record["attestation"])
    attestations = ShardAttestations.verify(
        raws,
        network_id=network_id,
        round_number=round_number,
        shard=shard,
        now=int(time.time()),
        opened=opened,
    )
    for result_id in attestations.by_result:
        holders.setdefault(result_id, set())
    return ShardRecords(attestations, holders)


async def read_further_shards(
    board: RecordReader,
    network_id: str,
    round_number: int,
    first: ShardRecords,
    *,
    tensors: int | None = None,
    opened: MutableMapping[bytes, Signed] | None = None,
) -> list[ShardRecords]:
    """`first` (shard 0's records) and those of every further shard its attestations name, at once
    (shard counts above `tensors`, the base's tensor count, are ignored)."""
    counts = [c for c in first.attestations.counts if tensors is None or c <= tensors]
    shards = max(counts, default=1)
    others = [read_shard_records(board, network_id, round_number, j, opened=opened) for j in range(1, shards)]
    return [first, *await asyncio.gather(*others)]


async def read_round_records(board: RecordReader, network_id: str, round_number: int) -> list[ShardRecords]:
    """Every shard's records of a round, over all shards named by shard 0's attestations."""
    first = await read_shard_records(board, network_id, round_number, 0)
    return await read_further_shards(board, network_id, round_number, first)
