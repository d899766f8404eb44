"""Finding a round's attested result on the network: what the node, `umm pull` and `umm status` share.

`find_attested_rounds` (every complete result, best first) and `find_attested_result` (the best)
do the reading and fetching; the decision is protocol.decision's (`attested_rounds`, pure): read
shard 0's records while fetching the base's tensor list, learn the shard counts in play, read
every other shard's records at once, fetch in one call the results named by enough attesters
(`wanted_results`) and hand everything to `attested_rounds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import Protocol

from node.errors import NodeError
from node.lookups import RecordReader, read_further_shards, read_shard_records
from protocol.decision import AttestedResult, AttestedRound, attested_rounds, wanted_results
from protocol.envelope import Signed
from protocol.genesis import Genesis, read_base_manifest

__all__ = [
    "AttestedResult",
    "AttestedRound",
    "ChunkReader",
    "Fetch",
    "find_attested_result",
    "find_attested_rounds",
]

Fetch = Callable[[Sequence[str], Iterable[str]], Awaitable[object]]  # (digests, holders): into a store


class ChunkReader(Protocol):
    """Where fetched chunks can be read back, verified (a `ContentStore` is one)."""

    def get(self, digest: str) -> bytes: ...


async def find_attested_result(
    board: RecordReader,
    genesis: Genesis,
    round_number: int,
    fetch: Fetch,
    store: ChunkReader,
    *,
    opened: MutableMapping[bytes, Signed] | None = None,
) -> AttestedRound | None:
    """The round's result whose every shard carries a quorum of valid distinct attestations (None if
    no complete round is found); `fetch(digests, holders)` puts into `store`; `opened` remembers
    the attestations opened (node.lookups)."""
    found = await find_attested_rounds(board, genesis, round_number, fetch, store, opened=opened)
    return found[0] if found else None


async def find_attested_rounds(
    board: RecordReader,
    genesis: Genesis,
    round_number: int,
    fetch: Fetch,
    store: ChunkReader,
    *,
    opened: MutableMapping[bytes, Signed] | None = None,
) -> list[AttestedRound]:
    """Every complete result of the round, best first (`protocol.decision.attested_rounds`)."""
    network_id = genesis.network_id
    first, _ = await asyncio.gather(
        read_shard_records(board, network_id, round_number, 0, opened=opened),
        fetch([genesis.base_manifest], ()),
    )
    base = read_base_manifest(store.get(genesis.base_manifest))
    records = await read_further_shards(
        board, network_id, round_number, first, tensors=len(base), opened=opened
    )
    wanted = wanted_results((r.attestations for r in records), genesis.quorum)
    if wanted:  # one fetch for every shard's results; a result that cannot be had is skipped below
        holders = sorted({h for r in records for result_id in wanted for h in r.holders.get(result_id, ())})
        with contextlib.suppress(NodeError):
            await fetch(sorted(wanted), holders)
    results = {}
    for result_id in wanted:
        with contextlib.suppress(NodeError):
            results[result_id] = store.get(result_id)
    return attested_rounds(
        round_number,
        [r.attestations for r in records],
        results,
        base_sizes=[(e.name, e.nbytes) for e in base],
        network_id=network_id,
        quorum_setting=genesis.quorum,
        allowed_signers=genesis.allowed_signers,
        now=int(time.time()),
    )
