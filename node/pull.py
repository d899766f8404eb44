"""`umm pull`: find the network's latest attested result and write it as a loadable HF folder.

A pull starts a client DHT node in its own event loop (`ClientBoard`: no child Python process),
reads the genesis and the peer records at once, and finds the highest round whose result carries a
quorum of valid attestations on every shard (`find_attested_rounds`: signatures, hashes and the
shard plan checked; its small records are fetched into memory) and whose candidates are delta
manifests of that round, fetched and verified (a round of invented contributions is skipped).
Then one `fetch_chunks` over every chunk of the model and the base's side files (config,
tokenizer) streams them from all peers into a `PartialModel`, which verifies each chunk and
writes it at its final place in ``model.safetensors`` as it arrives; the folder is fsynced and
renamed to ``--out``. An interrupted pull leaves its work folder (``.<out>.umm-pull`` beside
``--out``) and the next one resumes there.

Each chunk is hashed once, against its address, and no tensor is hashed again: the attestations
sign the result's id, the id fixes the result's chunk lists (a node attests only a result whose
chunk lists equal those of its own merge), and the chunk hashes fix the bytes (see node.partial).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from hivemind.p2p import PeerID

from node.dht import ClientBoard
from node.discover import find_attested_rounds
from node.errors import ChunkNotFoundError, FetchError, NodeError
from node.fetcher import Fetcher, FetchPolicy
from node.lookups import latest_rounds_from_records, peers_from_records, read_peers
from node.partial import PartialModel, replace_folder
from node.records import genesis_key, peers_key
from node.rounds import named_candidates
from node.settings import PULL_TIMEOUT
from node.store import verified_digest
from protocol.decision import AttestedRound
from protocol.errors import ProtocolError
from protocol.genesis import Genesis, genesis_from_records
from protocol.search_rules import describe_recipes

__all__ = ["NoResultError", "PullOutcome", "pull", "replace_folder"]

RECORD_FETCH = FetchPolicy(attempts=1)  # a result or manifest another holder may have: no retry
MODEL_FETCH = FetchPolicy(attempts=3)  # the model's chunks: peers named anew before each retry


class NoResultError(NodeError):
    """No result with a quorum of attestations was found."""


@dataclasses.dataclass(frozen=True)
class PullOutcome:
    """What a pull wrote."""

    out: Path
    round: int
    merged_fingerprint: str
    attested_by: int
    bytes_fetched: int
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # per phase, in order
    recipe: str = ""  # which recipe the model was merged with (protocol.search_rules.describe_recipes)
    verified: tuple[int, ...] = ()  # tensors recomputed per shard (empty: not verified)
    verify_bytes: int = 0  # of `bytes_fetched`, the sampled inputs the verification fetched


class MemoryChunks:
    """A small in-memory chunk sink for the records a pull checks (manifests, results)."""

    def __init__(self) -> None:
        self._chunks: dict[str, bytes] = {}

    def missing(self, digests: Iterable[str]) -> list[str]:
        return [d for d in dict.fromkeys(digests) if d not in self._chunks]

    def put(self, data: bytes | bytearray | memoryview, digest: str | None = None) -> str:
        actual = verified_digest(data, digest)
        self._chunks[actual] = bytes(data)
        return actual

    def get(self, digest: str) -> bytes:
        try:
            return self._chunks[digest]
        except KeyError:
            raise ChunkNotFoundError(f"expected chunk {digest} in memory, got no such chunk") from None


@dataclasses.dataclass
class _Found:
    genesis: Genesis
    attested: AttestedRound
    peers: list[PeerID]
    records: MemoryChunks  # the base manifest, the results and the candidates' manifests


async def _find_latest(client: ClientBoard, network_id: str, timeout: float, fetched: list[int]) -> _Found:
    """The genesis, the highest attested round and the announced peers; NoResultError after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    genesis: Genesis | None = None
    records = MemoryChunks()
    failure = ""
    while True:
        genesis_values, peer_values = await asyncio.gather(
            client.aread(genesis_key(network_id)) if genesis is None else asyncio.sleep(0, {}),
            client.aread(peers_key(network_id)),
        )
        if genesis is None:
            found = genesis_from_records(genesis_values.values(), network_id)
            genesis = found[0] if found is not None else None
        peers = peers_from_records(peer_values.values())
        if genesis is not None and peers:
            fetcher = Fetcher(client.p2p, records, _known(peers), policy=RECORD_FETCH)
            try:
                for round_number in latest_rounds_from_records(peer_values.values()):
                    try:
                        complete = await find_attested_rounds(
                            client, genesis, round_number, fetcher.fetch, records
                        )
                    except FetchError as exc:  # e.g. the base's tensor list from peers that went away
                        failure = f" (last fetch error: {exc})"
                        continue
                    for attested in complete:
                        try:
                            await _check_candidates(genesis, attested, fetcher, records)
                        except (FetchError, ProtocolError) as exc:
                            failure = f" (round {round_number} names candidates that do not verify: {exc})"
                            continue
                        return _Found(genesis, attested, peers, records)
            finally:
                fetched[0] += fetcher.bytes_received
        if loop.time() >= deadline:
            raise NoResultError(
                f"expected a result of {network_id} attested by a quorum within {timeout:g} s, "
                f"got none{failure}"
            )
        await asyncio.sleep(min(1.0, max(0.0, deadline - loop.time())))


async def _check_candidates(
    genesis: Genesis, attested: AttestedRound, fetcher: Fetcher, records: MemoryChunks
) -> None:
    """ProtocolError (or FetchError) unless every candidate the round's result names is a delta
    manifest of that round, fetched and verified (`node.rounds.named_candidates`): a quorum of keys
    alone cannot invent a round of contributions that never existed."""
    await fetcher.fetch(list(attested.candidates))
    named_candidates(genesis, attested.round, attested.candidates, records.get, int(time.time()))


def _known(peers: list[PeerID]):
    async def find_peers(_attempt: int) -> list[PeerID]:
        return peers

    return find_peers


async def _stream(
    client: ClientBoard, network_id: str, partial: PartialModel, peers: list[PeerID], fetched: list[int]
) -> None:
    """Fetch every chunk `partial` lacks in one go; on failure ask for the peers again and go on."""

    async def find_peers(attempt: int) -> list[PeerID]:
        return (await read_peers(client, network_id) or peers) if attempt else peers

    fetcher = Fetcher(client.p2p, partial, find_peers, policy=MODEL_FETCH)
    try:
        await fetcher.fetch(partial.wanted)
    finally:
        fetched[0] += fetcher.bytes_received


async def pull(
    network_id: str,
    out: str | Path,
    *,
    initial_peers: Sequence[str],
    cache_dir: str | Path | None = None,
    timeout: float = PULL_TIMEOUT,
    progress: Callable[[str, int, int], None] | None = None,
    verify: bool = True,
) -> PullOutcome:
    """Pull the latest attested result of `network_id` into `out` (see the module docstring).

    `cache_dir` is the work folder kept between attempts (default ``.<out name>.umm-pull`` beside
    `out`). `progress("chunks", done, total)` is called once before the transfer and then from the
    fetch's writer threads after each chunk is written. With `verify` (the default) a random sample
    of the result is recomputed first (node.pull_verify; `progress("verify", shards done, shards)`):
    `UnverifiedResultError`, and nothing written, if it differs.
    """
    from node.pull_verify import verify_sample

    out = Path(out).absolute()
    work = Path(cache_dir) if cache_dir is not None else out.with_name(f".{out.name}.umm-pull")
    fetched = [0]
    seconds: dict[str, float] = {}
    clock = [time.perf_counter()]

    def phase(name: str) -> None:
        now = time.perf_counter()
        seconds[name] = now - clock[0]
        clock[0] = now

    client = await ClientBoard.start(list(initial_peers))
    phase("client start")
    try:
        found = await _find_latest(client, network_id, timeout, fetched)
        attested = found.attested
        phase("find attested result")
        checked = None
        if verify:
            report = None if progress is None else (lambda done, total: progress("verify", done, total))
            checked = await verify_sample(
                found.genesis,
                attested,
                found.records,
                lambda sink: Fetcher(client.p2p, sink, _known(found.peers), policy=MODEL_FETCH),
                progress=report,
            )
            fetched[0] += checked.bytes_fetched
            phase("verify a random sample")
        report = None if progress is None else (lambda done, total: progress("chunks", done, total))
        with PartialModel(
            work, attested.tensors, attested.chunk_size, found.genesis.base_files, progress=report
        ) as partial:
            phase("lay out (and check resumed chunks)")
            if progress is not None:
                progress("chunks", partial.resumed, len(partial.wanted))
            await _stream(client, network_id, partial, found.peers, fetched)
            phase("transfer, written in place")
            await asyncio.to_thread(partial.finish, out)
            phase("fsync and rename")
    finally:
        await client.shutdown()
    phase("client shutdown")
    recipe = describe_recipes([s.result.message.recipe for s in attested.shards])
    return PullOutcome(
        out,
        attested.round,
        attested.fingerprint,
        attested.signers,
        fetched[0],
        seconds,
        recipe,
        checked.tensors if checked else (),
        checked.bytes_fetched if checked else 0,
    )
