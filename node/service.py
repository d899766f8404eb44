"""The long-lived node: its data folder, DHT, chunk server and store, and the poll loop.

`NodeService.run` starts the DHT (a forked child, node.dht) and the chunk server on its libp2p
daemon, joins the network (the genesis from the initial peers, unless given), fetches the base
(`ensure_base`), then every `poll` seconds, on its own:

1. republishes its records (`publish_records`): presence, the genesis, its contribution (or
   distribution summary) for the current round — or, while `umm contribute` prepares one, a
   ``pending`` record (node.settle) — and, for its latest decided round, one result
   record per shard (owner-only DHT subkeys, a few KiB each; node.records);
2. on a fuser (``--fuse``), distills the round's distribution summaries and contributes the
   fused copy (node.fuser); then runs one step of the round state machine (node.round_machine):
   collect, plan, merge its shards (node.shard_worker), spot-check the others (node.spotcheck),
   find the attested result (node.discover) and record it (node.decided);
3. scrubs a slice of its store and fetches again the blobs found corrupt (node.scrub).

A restart resumes from the state in ``--data-dir`` (store + state.sqlite, node.round_state): the
same keys, the same round.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hivemind.p2p import P2P

from node.datafolder import load_or_create_identity
from node.dht import RecordBoard, load_or_create_rsa_key, start_dht, visible_maddrs
from node.errors import NodeError
from node.faults import publish_faults
from node.fetcher import Fetcher, node_chunk_limit
from node.lookups import OpenedAttestations, ShardRecords, read_genesis, read_peers, read_shard_records
from node.records import (
    contrib_key,
    genesis_key,
    make_record,
    peers_key,
    pending_key,
    result_key,
    summary_key,
)
from node.round_context import RoundContext
from node.round_machine import RoundMachine
from node.round_state import RoundState
from node.scrub import StoreScrub
from node.settings import (
    FALLBACK_SECONDS,
    KEEP_ROUNDS,
    PENDING_SECONDS,
    POLL_SECONDS,
    checked_fallback_seconds,
)
from node.state import NodeState
from node.store import ContentStore
from node.transport import ChunkServer
from protocol.errors import ProtocolError
from protocol.genesis import Genesis, GenesisError, open_genesis, read_base_manifest

if TYPE_CHECKING:  # node.fuser loads the fusion code: a node that does not fuse never imports it
    from node.fuser import Fuser, FuserSettings

logger = logging.getLogger(__name__)

RECORD_TTL = 600.0
JOIN_ATTEMPTS = 30  # seconds a joining node waits for the genesis from its initial peers


class NodeService:
    """One node of one network (see the module docstring)."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        network_id: str | None = None,
        genesis_record: bytes | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        initial_peers: Sequence[str] = (),
        poll: float = POLL_SECONDS,
        on_ready: Callable[[NodeService], None] | None = None,
        aggregate_rounds: bool = True,
        fallback_seconds: float = FALLBACK_SECONDS,
        keep_rounds: int = KEEP_ROUNDS,
        searcher: bool = False,
        store_quota: int | None = None,
        fuser: FuserSettings | None = None,
    ) -> None:
        self.searcher = searcher  # searches each round's recipe (a network whose genesis enables it)
        self.fuser_settings = fuser  # distills the rounds' summaries (a network with a probe set)
        self.fuser: Fuser | None = None
        self.fallback_seconds = checked_fallback_seconds(fallback_seconds)
        self.keep_rounds = keep_rounds
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = ContentStore(self.data_dir / "store", quota=store_quota)
        self.state = NodeState(self.data_dir)
        self.rounds = RoundState(self.state)
        self.identity = load_or_create_identity(self.data_dir)
        self.host, self.port, self.initial_peers = host, port, list(initial_peers)
        self.poll = poll
        self.on_ready = on_ready
        self.aggregate_rounds = aggregate_rounds
        self.genesis: Genesis | None = None
        self._genesis_record = genesis_record or self.rounds.genesis_record()
        self._network_id = network_id
        if self._genesis_record is not None:
            self.genesis = open_genesis(self._genesis_record)
            if network_id is not None and self.genesis.network_id != network_id:
                raise GenesisError(f"expected genesis of {network_id}, got one of {self.genesis.network_id}")
            self._network_id = self.genesis.network_id
        if self._network_id is None:
            raise GenesisError("expected a network id or a genesis record, got neither")
        self.dht = None
        self.board: RecordBoard | None = None
        self.p2p: P2P | None = None
        self.server = ChunkServer(self.store)
        self.fetcher: Fetcher | None = None
        self.machine: RoundMachine | None = None
        self.scrub: StoreScrub | None = None
        self.maddrs: list[str] = []
        self._last_published: dict[str, tuple[bytes, float]] = {}
        self.opened = OpenedAttestations()  # every attestation read is verified once

    @property
    def network_id(self) -> str:
        return self._network_id

    @property
    def round(self) -> int:
        return self.rounds.round

    @property
    def bytes_received(self) -> int:
        return 0 if self.fetcher is None else self.fetcher.bytes_received

    async def run(self, stop: asyncio.Event) -> None:
        """Serve and take part in rounds until `stop` is set; always shuts the DHT and p2pd down."""
        try:
            await self._start()
            if self.on_ready is not None:
                self.on_ready(self)
            while not stop.is_set():
                try:
                    await self.step()
                except (NodeError, ProtocolError) as exc:
                    logger.warning("round step failed: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll)
        finally:
            await self._stop()

    async def _start(self) -> None:
        rsa = load_or_create_rsa_key(self.data_dir / "dht_key.der")
        self.dht, validator = await asyncio.to_thread(
            start_dht,
            initial_peers=self.initial_peers,
            host=self.host,
            port=self.port,
            rsa_key=rsa,
            identity_path=self.data_dir / "p2p_identity.key",
        )
        self.board = RecordBoard(self.dht, validator)
        self.p2p = await self.dht.replicate_p2p()
        await self.server.start(self.p2p)
        self.maddrs = visible_maddrs(self.dht)
        own = str(self.p2p.peer_id)
        self.fetcher = Fetcher(
            self.p2p,
            self.store,
            lambda _attempt: read_peers(self.board, self.network_id, exclude=own),
            exclude=own,
        )
        if self.genesis is None:
            await self._join()
        limit = node_chunk_limit(self.genesis.chunk_size)  # a larger chunk is refused before its bytes
        self.fetcher.policy = dataclasses.replace(self.fetcher.policy, max_chunk_bytes=limit)
        await self.ensure_base()
        ctx = self.round_context()
        search = None
        if self.genesis.search is not None:
            from node.search_round import SEARCH_FOLDER, SearchRound  # loads transformers

            search = SearchRound(ctx, self.board, self.data_dir / SEARCH_FOLDER, searcher=self.searcher)
        elif self.searcher:
            logger.warning(
                "the genesis of %s does not enable search: --search has no effect", self.network_id
            )
        fusion = None
        if self.genesis.probe_set_fingerprint:  # fused contributions are checked (node.fusion_check)
            from node.fuser import FUSION_FOLDER
            from node.fusion_check import FusionChecks

            fusion = FusionChecks(ctx, self.data_dir / FUSION_FOLDER / "base")
            if self.fuser_settings is not None:
                from node.fuser import Fuser

                self.fuser = Fuser(ctx, self.board, self.data_dir, self.fuser_settings)
        elif self.fuser_settings is not None:
            logger.warning("the genesis of %s has no probe set: --fuse has no effect", self.network_id)
        self.machine = RoundMachine(
            ctx,
            self.board,
            fallback_seconds=self.fallback_seconds,
            keep_rounds=self.keep_rounds,
            search=search,
            fusion=fusion,
        )
        self.scrub = StoreScrub(self.store, self.fetch)

    def round_context(self) -> RoundContext:
        """What the round's steps need, bound to this node's DHT, daemon and store."""
        return RoundContext(
            genesis=self.genesis,
            identity=self.identity,
            store=self.store,
            rounds=self.rounds,
            fetch=self.fetch,
            publish=self.publish,
            read_shard=self.shard_records,
            peer_id=str(self.p2p.peer_id),
            opened=self.opened,
        )

    async def _stop(self) -> None:
        if self.p2p is not None:
            with contextlib.suppress(Exception):
                await self.server.stop(self.p2p)
            with contextlib.suppress(Exception):
                await self.p2p.shutdown()
        if self.dht is not None:
            await asyncio.to_thread(self.dht.shutdown)
        self.store.close()
        self.state.close()

    async def _join(self) -> None:
        for _ in range(JOIN_ATTEMPTS):
            found = await read_genesis(self.board, self.network_id)
            if found is not None:
                self.genesis, self._genesis_record = found
                self.rounds.set_genesis_record(self._genesis_record)
                return
            await asyncio.sleep(1.0)
        raise GenesisError(f"expected the genesis of {self.network_id} from the initial peers, got none")

    async def ensure_base(self) -> None:
        """Fetch the base's tensor list, tensors and side files (content-addressed by the genesis)."""
        g = self.genesis
        wanted = [
            g.base_manifest,
            *g.base_files.values(),
            *([g.probe_set_fingerprint] if g.probe_set_fingerprint else []),
        ]
        if self.store.missing(wanted):
            await self.fetch(wanted, ())
        entries = read_base_manifest(self.store.get(g.base_manifest))
        await self.fetch([c for e in entries for c in e.chunks], ())
        self.rounds.set_genesis_record(self._genesis_record)

    async def fetch(self, digests: Sequence[str], holders: Iterable[str], *, attempts: int = 3) -> None:
        """Fetch missing chunks from `holders` and every announced peer; FetchError if impossible."""
        await self.fetcher.fetch(digests, holders, attempts=attempts)

    async def publish(self, key: str, value: bytes) -> None:
        """Publish a record under this node's subkey (skipped while the same value is fresh)."""
        held = self._last_published.get(key)
        if held is not None and held[0] == value and time.monotonic() - held[1] < RECORD_TTL / 4:
            return
        if await self.board.apublish(key, value, ttl=RECORD_TTL):
            self._last_published[key] = (value, time.monotonic())

    async def shard_records(self, r: int, j: int) -> ShardRecords:
        """The verified result records of shard `j` of round `r` on the DHT."""
        return await read_shard_records(self.board, self.network_id, r, j, opened=self.opened)

    async def step(self) -> None:
        """One poll of the loop in the module docstring."""
        r = self.round
        await self.publish_records(r)
        if self.fuser is not None:
            await self.fuser.step(r)
        await self.machine.step(r, aggregate=self.aggregate_rounds)
        await self.scrub.step()
        self.rounds.set_stats(self.server.bytes_sent, self.bytes_received)

    async def publish_records(self, r: int) -> None:
        """Step 1 of the module docstring."""
        nid, p2p = self.network_id, str(self.p2p.peer_id)
        latest = self.rounds.latest()
        await self.publish(genesis_key(nid), self._genesis_record)
        presence = make_record(
            "peers", p2p=p2p, signer=self.identity.public_key, latest=latest.round if latest else -1
        )
        await self.publish(peers_key(nid), presence)
        own = self.rounds.contribution(r)
        if own is not None:
            record = make_record("contrib", card=own.card, manifest=own.manifest, p2p=p2p)
            await self.publish(contrib_key(nid, r), record)
        started = self.rounds.pending(r)
        if own is None and started is not None and time.time() - started < PENDING_SECONDS:
            record = make_record("pending", signer=self.identity.public_key, started=started, p2p=p2p)
            await self.publish(pending_key(nid, r), record)
        summary = self.rounds.summary(r)
        if summary is not None:
            record = make_record("summary", card=summary.card, summary=summary.summary, p2p=p2p)
            await self.publish(summary_key(nid, r), record)
        for faulted in {r} | ({latest.round} if latest is not None else set()):
            await publish_faults(self.machine.ctx, faulted)  # the faults this node found (node.faults)
        if latest is not None:
            for a in latest.announce:
                record = make_record("result", result=a.result, attestation=a.attestation, p2p=p2p)
                await self.publish(result_key(nid, latest.round, a.shard), record)
