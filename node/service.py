"""The long-lived node: DHT + chunk server + store, and the coordinator-free round loop.

Every `poll` seconds a node, on its own:

1. republishes its presence, the genesis, its own contribution for the current round and one
   result record per shard it attests (owner-only DHT subkeys, a few KiB each);
2. reads the round's contribution records, verifies each card and manifest (protocol/), fetches
   missing manifests from any peer (verified by hash) and selects contributions by the
   deterministic rules of `node.rounds`; once the selected set (the candidates) is unchanged for
   ``settle_seconds`` it plans the round (`node.rounds.plan_round`: byte-balanced tensor shards,
   each merged by ``R`` of the candidates' signers), fetches only its shards' tensors of every
   candidate, admits per shard (robust admission), merges each shard with `protocol.aggregate`,
   stores the shard's chunks and publishes a signed MergeResult per shard;
3. attests, per shard, the canonical result of its recipe, fingerprint and candidates — of all
   published results that agree, the first by `node.spotcheck.result_rank` (most distinct full
   attesters, then most attesters, ties: the smallest id; the order spot checkers follow too)
   — so attestations pile up on one id and a quorum, once reached, is kept;
   every shard it does not merge it spot-checks (`node.spotcheck`): it recomputes a sample of the
   shard's tensors drawn with its own key and attests the result (``sampled``) if they match;
4. when every shard of the round carries a result with attestations from >= quorum distinct keys,
   at least `protocol.spotcheck.full_quorum` of them full (`find_attested_result`), it fetches
   the shards it did not merge, records the assembled result as its latest and moves on; from then
   on it announces, per shard, its own attestation of the decided result where it merged or
   spot-checked that merge (`_attest_decided`, `node.spotcheck.attest_decided`).

A restart resumes from the state in ``--data-dir`` (store + state.sqlite): same keys, same round.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from hivemind.p2p import P2P, PeerID

from node.dht import RecordBoard, load_or_create_rsa_key, start_dht, visible_maddrs
from node.errors import FetchError, NodeError, StoreError
from node.genesis import Genesis, GenesisError, open_genesis, read_base_manifest
from node.records import (
    contrib_key,
    genesis_key,
    make_record,
    parse_record,
    peers_key,
    result_key,
    summary_key,
)
from node.rounds import Contribution, RoundPlan, admit, plan_round, select_contributions
from node.spotcheck import attest_decided, attesters, merge_content, result_rank, spot_check_shards
from node.state import NodeState
from node.store import ContentStore
from node.transport import ChunkServer, fetch_chunks
from protocol.aggregate import aggregate, encode_result
from protocol.chunks import decode_tensors
from protocol.envelope import Signed, sign_message
from protocol.errors import ProtocolError
from protocol.identity import Identity
from protocol.messages import SCHEMA_VERSION, Attestation, DeltaManifest, ExpertCard, MergeResult, TensorEntry
from protocol.spotcheck import full_quorum
from protocol.verify import check_quorum, check_round_quorum, verify_message

logger = logging.getLogger(__name__)

RECORD_TTL = 600.0
FETCH_PATIENCE = 10
FALLBACK_SECONDS = 120.0
WAITING_LOG_SECONDS = 20.0


def checked_fallback_seconds(value: object) -> float:
    """`value` as a fallback delay: a positive, finite number of seconds (NodeError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value < math.inf:
        raise NodeError(f"expected the fallback delay to be a positive number of seconds, got {value!r}")
    return float(value)


def identity_path(data_dir: Path) -> Path:
    return data_dir / "identity.key"


def load_or_create_identity(data_dir: Path) -> Identity:
    """The node's Ed25519 identity in ``<data_dir>/identity.key`` (created on first use, mode 0600)."""
    path = identity_path(data_dir)
    if not path.exists():
        Identity.generate().save(path)
    return Identity.load(path)


def network_genesis_id(network_id: str) -> str:
    """The genesis id prefix inside ``NAME.<16 hex>``."""
    name, dot, suffix = network_id.rpartition(".")
    if not dot or not name or len(suffix) != 16 or not all(c in "0123456789abcdef" for c in suffix):
        raise GenesisError(f"expected a network id NAME.<16 hex digits>, got {network_id!r}")
    return suffix


def genesis_from_records(values: Iterable[bytes], network_id: str) -> tuple[Genesis, bytes] | None:
    """The first of `values` (genesis records) that is the genesis of `network_id`; None if none is."""
    expected = network_genesis_id(network_id)
    for value in values:
        try:
            genesis = open_genesis(value, expected_id=expected)
        except GenesisError:
            continue
        if genesis.network_id == network_id:
            return genesis, value
    return None


def read_genesis_from(board: RecordBoard, network_id: str) -> tuple[Genesis, bytes] | None:
    """The genesis of `network_id` from the DHT, verified against the id; None if nobody has it."""
    return genesis_from_records(board.read(genesis_key(network_id)).values(), network_id)


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


def peer_ids(board: RecordBoard, network_id: str, *, exclude: str | None = None) -> list[PeerID]:
    """The libp2p peer ids that announced themselves on the network."""
    return peers_from_records(board.read(peers_key(network_id)).values(), exclude=exclude)


def claimed_latest_rounds(board: RecordBoard, network_id: str) -> list[int]:
    """Rounds peers claim as their latest, highest first (claims are hints; quorum is checked)."""
    return latest_rounds_from_records(board.read(peers_key(network_id)).values())


@dataclasses.dataclass
class AttestedResult:
    """One shard's MergeResult with attestations from at least the quorum of distinct keys."""

    result: Signed
    attestations: list[bytes]
    signers: int


@dataclasses.dataclass
class AttestedRound:
    """A round's result: one attested MergeResult per shard, checked by `check_round_quorum`."""

    shards: list[AttestedResult]
    fingerprint: str

    @property
    def round(self) -> int:
        return self.shards[0].result.message.round

    @property
    def signers(self) -> int:
        """The fewest distinct attesting keys of any shard."""
        return min(s.signers for s in self.shards)

    @property
    def candidates(self) -> tuple[str, ...]:
        return self.shards[0].result.message.candidates

    @property
    def tensors(self) -> tuple[TensorEntry, ...]:
        """Every shard's tensor entries, sorted by name (the whole merged model)."""
        return tuple(sorted((t for s in self.shards for t in s.result.message.tensors), key=lambda t: t.name))

    @property
    def chunk_size(self) -> int:
        return self.shards[0].result.message.chunk_size


@dataclasses.dataclass
class ShardRecords:
    """Verified attestations of one shard key, grouped by the result they name, and who holds it."""

    attestations: dict[str, list[bytes]] = dataclasses.field(default_factory=dict)
    holders: dict[str, set[str]] = dataclasses.field(default_factory=dict)
    counts: set[int] = dataclasses.field(default_factory=set)

    def tally(self, network_id: str) -> str:
        """``<id prefix> <full>f+<sampled>s`` per attested result, for logs."""
        parts = []
        for result_id, raw in sorted(self.attestations.items()):
            signers, full = attesters(raw, result_id, network_id)
            parts.append(f"{result_id[:8]} {len(full)}f+{len(signers) - len(full)}s")
        return ", ".join(parts) or "none"


class RecordReader(Protocol):
    """What the round readers need of a DHT client (`RecordBoard` and `ClientBoard` are ones)."""

    async def aread(self, key: str, *, latest: bool = True) -> dict[bytes, bytes]: ...


async def read_shard_records(
    board: RecordReader, network_id: str, round_number: int, shard: int
) -> ShardRecords:
    """The result records of `shard` in `round_number` (unverifiable attestations are dropped)."""
    found = ShardRecords()
    for value in (await board.aread(result_key(network_id, round_number, shard))).values():
        record = parse_record("result", value)
        if record is None:
            continue
        found.holders.setdefault(record["result"], set()).add(record["p2p"])
        try:
            att = verify_message(record["attestation"], Attestation, network_id=network_id).message
        except ProtocolError:
            continue
        if att.shard != shard or att.round != round_number:
            continue
        found.attestations.setdefault(att.result_id, []).append(record["attestation"])
        found.holders.setdefault(att.result_id, set())
        found.counts.add(att.shards)
    return found


async def read_round_records(board: RecordReader, network_id: str, round_number: int) -> list[dict]:
    """Every well-formed result record of a round, over all shards named by shard 0's attestations."""
    first = await board.aread(result_key(network_id, round_number, 0))
    records = [r for r in (parse_record("result", v) for v in first.values()) if r is not None]
    counts = {1}
    for record in records:
        with contextlib.suppress(ProtocolError):
            counts.add(
                verify_message(record["attestation"], Attestation, network_id=network_id).message.shards
            )
    for shard in range(1, max(counts)):
        found = await board.aread(result_key(network_id, round_number, shard))
        records += [r for r in (parse_record("result", v) for v in found.values()) if r is not None]
    return records


class ChunkReader(Protocol):
    """Where fetched chunks can be read back, verified (a `ContentStore` is one)."""

    def get(self, digest: str) -> bytes: ...


async def find_attested_result(
    board: RecordReader,
    genesis: Genesis,
    round_number: int,
    fetch: Callable[[Sequence[str], Iterable[str]], Awaitable[object]],
    store: ChunkReader,
) -> AttestedRound | None:
    """The round's result whose every shard carries a quorum of valid distinct attestations.

    Reads shard 0's records (while fetching the base's tensor list) to learn the shard counts in
    play, then every other shard's records at once; fetches, in one call, the results named by
    enough attestations and verifies them; for each candidate set keeps, per shard, the result with
    the most signers (ties: smallest id) and checks the whole with `check_round_quorum` against the
    base's tensor plan. Of several complete rounds the one with the most signers (ties: smallest
    fingerprint) wins. `board` needs only `aread`; `fetch(digests, holders)` puts into `store`.
    """
    network_id = genesis.network_id
    first, _ = await asyncio.gather(
        read_shard_records(board, network_id, round_number, 0), fetch([genesis.base_manifest], ())
    )
    base = read_base_manifest(store.get(genesis.base_manifest))
    base_sizes = [(e.name, e.nbytes) for e in base]
    counts = sorted(c for c in first.counts if c <= len(base))
    shards = max(counts, default=1)
    others = [read_shard_records(board, network_id, round_number, j) for j in range(1, shards)]
    records = [first, *await asyncio.gather(*others)]
    least = genesis.quorum if genesis.quorum > 0 else 2
    wanted = {
        result_id: shard_records.holders.get(result_id, set())
        for shard_records in records
        for result_id, attestations in shard_records.attestations.items()
        if len(set(attestations)) >= least
    }
    if wanted:  # one fetch for every shard's results; a result that cannot be had is skipped below
        with contextlib.suppress(NodeError):
            await fetch(sorted(wanted), sorted(set().union(*wanted.values())))
    now = int(time.time())
    complete: list[AttestedRound] = []
    for count in counts:
        per_shard: list[dict[tuple[str, ...], AttestedResult]] = []
        for j, shard_records in enumerate(records[:count]):
            best: dict[tuple[str, ...], AttestedResult] = {}
            for result_id, attestations in sorted(shard_records.attestations.items()):
                if result_id not in wanted:
                    continue
                try:
                    result = verify_message(store.get(result_id), MergeResult, network_id=network_id, now=now)
                except (NodeError, ProtocolError):
                    continue
                m = result.message
                if (m.round, m.shard, m.shards) != (round_number, j, count):
                    continue
                outcome = check_quorum(
                    result,
                    attestations,
                    quorum=genesis.quorum_for(len(m.candidates)),
                    network_id=network_id,
                    allowed_signers=genesis.allowed_signers,
                    now=now,
                )
                held = best.get(m.candidates)
                if outcome.ok and (held is None or len(outcome.signers) > held.signers):
                    best[m.candidates] = AttestedResult(result, attestations, len(outcome.signers))
            per_shard.append(best)
        for candidates in sorted(per_shard[0]):
            if not all(candidates in shard for shard in per_shard):
                continue
            chosen = [shard[candidates] for shard in per_shard]
            check = check_round_quorum(
                [c.result for c in chosen],
                [c.attestations for c in chosen],
                base_sizes=base_sizes,
                quorum=genesis.quorum_for(len(candidates)),
                network_id=network_id,
                allowed_signers=genesis.allowed_signers,
                now=now,
            )
            if check.ok:
                complete.append(AttestedRound(chosen, check.fingerprint))
    if not complete:
        return None
    return min(complete, key=lambda found: (-found.signers, found.fingerprint))


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
        poll: float = 1.0,
        on_ready: Callable[[NodeService], None] | None = None,
        aggregate_rounds: bool = True,
        fallback_seconds: float = FALLBACK_SECONDS,
    ) -> None:
        self.fallback_seconds = checked_fallback_seconds(fallback_seconds)
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = ContentStore(self.data_dir / "store")
        self.state = NodeState(self.data_dir)
        self.identity = load_or_create_identity(self.data_dir)
        self.host, self.port, self.initial_peers = host, port, list(initial_peers)
        self.poll = poll
        self.on_ready = on_ready
        self.aggregate_rounds = aggregate_rounds
        self.genesis: Genesis | None = None
        self._genesis_record = genesis_record or self.state.get("genesis")
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
        self.maddrs: list[str] = []
        self._seen: dict[int, tuple[tuple[str, ...], float]] = {}
        self._missing_polls: dict[str, int] = {}
        self._fetched_again: set[str] = set()  # given-up contributions a quorum admitted: retried once
        self._last_published: dict[str, tuple[bytes, float]] = {}
        self._waiting_logged = 0.0
        self.bytes_received = 0

    # ------------------------------------------------------------------ lifecycle
    @property
    def network_id(self) -> str:
        return self._network_id

    @property
    def round(self) -> int:
        return int(self.state.get("round", 0))

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
        if self.genesis is None:
            await self._join()
        await self._ensure_base()

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
        for _ in range(30):
            found = await asyncio.to_thread(read_genesis_from, self.board, self.network_id)
            if found is not None:
                self.genesis, self._genesis_record = found
                self.state.set("genesis", self._genesis_record)
                return
            await asyncio.sleep(1.0)
        raise GenesisError(f"expected the genesis of {self.network_id} from the initial peers, got none")

    async def _ensure_base(self) -> None:
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
        self.state.set("genesis", self._genesis_record)

    # ------------------------------------------------------------------ helpers
    async def fetch(self, digests: Sequence[str], holders: Iterable[str], *, attempts: int = 3) -> None:
        """Fetch missing chunks from `holders` first, then every announced peer; FetchError if impossible."""
        if not self.store.missing(digests):
            return
        error: FetchError | None = None
        for _ in range(attempts):
            peers = await asyncio.to_thread(
                peer_ids, self.board, self.network_id, exclude=str(self.p2p.peer_id)
            )
            extra = []
            for holder in holders:
                with contextlib.suppress(Exception):
                    if holder != str(self.p2p.peer_id):
                        extra.append(PeerID.from_base58(holder))
            candidates = sorted(set(peers) | set(extra), key=str)
            try:
                report = await fetch_chunks(self.p2p, digests, candidates, self.store, timeout=20.0)
                self.bytes_received += report.bytes_received
                return
            except FetchError as exc:
                self.bytes_received += exc.bytes_received
                error = exc
                await asyncio.sleep(0.5)
        raise error

    async def _publish(self, key: str, value: bytes) -> None:
        held = self._last_published.get(key)
        if held is not None and held[0] == value and time.monotonic() - held[1] < RECORD_TTL / 4:
            return
        if await self.board.apublish(key, value, ttl=RECORD_TTL):
            self._last_published[key] = (value, time.monotonic())

    async def shard_records(self, r: int, j: int) -> ShardRecords:
        """The verified result records of shard `j` of round `r` on the DHT."""
        return await read_shard_records(self.board, self.network_id, r, j)

    def _base_entries(self):
        return read_base_manifest(self.store.get(self.genesis.base_manifest))

    # ------------------------------------------------------------------ one poll
    async def step(self) -> None:
        """One poll of the loop in the module docstring."""
        r = self.round
        latest = self.state.get("latest")
        await self._publish(genesis_key(self.network_id), self._genesis_record)
        await self._publish(
            peers_key(self.network_id),
            make_record(
                "peers",
                p2p=str(self.p2p.peer_id),
                signer=self.identity.public_key,
                latest=latest["round"] if latest else -1,
            ),
        )
        own = self.state.get(f"contribution/{r}")
        if own is not None:
            await self._publish(
                contrib_key(self.network_id, r),
                make_record("contrib", card=own["card"], manifest=own["manifest"], p2p=str(self.p2p.peer_id)),
            )
        summary = self.state.get(f"summary/{r}")
        if summary is not None:
            await self._publish(
                summary_key(self.network_id, r),
                make_record(
                    "summary", card=summary["card"], summary=summary["summary"], p2p=str(self.p2p.peer_id)
                ),
            )
        if latest is not None:
            for shard, result_id, attestation in latest["announce"]:
                await self._publish(
                    result_key(self.network_id, latest["round"], shard),
                    make_record(
                        "result", result=result_id, attestation=attestation, p2p=str(self.p2p.peer_id)
                    ),
                )
        if self.aggregate_rounds:
            await self._aggregate(r)
        await self._check_quorum(r)
        self.state.set("stats", {"bytes_sent": self.server.bytes_sent, "bytes_received": self.bytes_received})

    async def _contributions(self, r: int) -> list[Contribution]:
        now = int(time.time())
        pairs = []
        for value in (await self.board.aread(contrib_key(self.network_id, r))).values():
            record = parse_record("contrib", value)
            if record is None:
                continue
            try:
                card = verify_message(record["card"], ExpertCard, network_id=self.network_id, now=now)
                await self.fetch([record["manifest"]], [record["p2p"]], attempts=1)
                manifest = verify_message(
                    self.store.get(record["manifest"]), DeltaManifest, network_id=self.network_id, now=now
                )
            except (NodeError, ProtocolError) as exc:
                logger.info("ignoring a contribution record: %s", exc)
                continue
            pairs.append((card, manifest))
        return select_contributions(self.genesis, r, pairs)

    async def _aggregate(self, r: int) -> None:
        contributions = await self._contributions(r)
        if len(contributions) < self.genesis.min_contributions:
            return
        ids = tuple(c.id for c in contributions)
        seen = self._seen.get(r)
        if seen is None or seen[0] != ids:  # a new set: wait until it has been stable for settle_seconds
            self._seen[r] = (ids, time.monotonic())
            return
        if time.monotonic() - seen[1] < self.genesis.settle_seconds:
            return
        base_entries = self._base_entries()
        plan = plan_round(self.genesis, contributions, base_entries)
        waited = time.monotonic() - seen[1] - self.genesis.settle_seconds
        shards = await self._shards_to_compute(r, plan, waited)
        await self._merge_shards(r, plan, contributions, shards, base_entries)
        others = [j for j in range(len(plan.shards)) if j not in shards]
        await spot_check_shards(self, r, plan, contributions, others, base_entries)

    async def _merge_shards(
        self,
        r: int,
        plan: RoundPlan,
        contributions: list[Contribution],
        shards: Sequence[int],
        base_entries: Sequence[TensorEntry],
    ) -> None:
        """Merge (or re-attest) shards `shards` of the round in full."""
        todo = []
        for j in shards:
            # a shard merged for these candidates is final: admission is a function of their bytes
            own = self.state.get(f"shard/{r}/{j}")
            if (
                own is not None
                and tuple(own["candidates"]) == plan.candidates
                and own["shards"] == len(plan.shards)
            ):
                await self._attest_canonical(r, j, own)
            else:
                todo.append(j)
        if not todo:
            return
        nameset = {name for j in todo for name in plan.shards[j]}
        started = time.monotonic()
        available = await self._fetch_shard_inputs(contributions, nameset)
        if available is None:
            return  # wait for the chunks rather than decide on a partial view
        logger.info(
            "round %d: shards %s of %d: inputs of %d contributions in %.1f s",
            r,
            todo,
            len(plan.shards),
            len(available),
            time.monotonic() - started,
        )
        for j in todo:
            admission, deltas = await asyncio.to_thread(
                admit, self.genesis, available, base_entries, self._decode, plan.shards[j]
            )
            if not admission.admitted:
                continue
            recipe = self.genesis.recipe(r, list(admission.admitted))
            own = await asyncio.to_thread(self._merge_shard, r, plan, j, recipe, deltas, base_entries)
            self.state.set(f"shard/{r}/{j}", own)
            self.state.set(f"view/{r}", [list(plan.candidates), len(plan.shards)])
            await self._attest_canonical(r, j, own)

    async def _shards_to_compute(self, r: int, plan: RoundPlan, waited: float) -> tuple[int, ...]:
        """This node's shards; every shard when the workers alone cannot reach the quorum; after
        ``fallback_seconds`` without a decided round, also the shards that still lack a quorum."""
        if len(plan.workers) < plan.quorum:
            return tuple(range(len(plan.shards)))
        mine = set(plan.shards_of(self.identity.public_key))
        if waited >= self.fallback_seconds:
            mine |= await self._lacking_shards(r, plan)
        return tuple(sorted(j for j in mine if j < len(plan.shards)))

    async def _fetch_shard_inputs(
        self, contributions: list[Contribution], names: set[str]
    ) -> list[Contribution] | None:
        """Fetch the tensors `names` of every contribution; those whose chunks arrived (None: wait)."""
        wanted = {
            c.id: [d for t in c.manifest.message.tensors if t.name in names for d in t.chunks]
            for c in contributions
        }
        with contextlib.suppress(FetchError):
            await self.fetch([d for digests in wanted.values() for d in digests], [], attempts=1)
        available = []
        for c in contributions:
            if self.store.missing(wanted[c.id]):
                self._missing_polls[c.id] = self._missing_polls.get(c.id, 0) + 1
                if self._missing_polls[c.id] < FETCH_PATIENCE:
                    return None
                continue
            available.append(c)
        return available

    def _decode(self, contribution: Contribution, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        manifest: DeltaManifest = contribution.manifest.message
        entries = tuple(t for t in manifest.tensors if t.name in set(names))
        try:
            return decode_tensors(entries, self.store.get, manifest.chunk_size)
        except StoreError as exc:
            raise ProtocolError(f"expected every chunk of {contribution.id}, got: {exc}") from exc

    def _merge_shard(self, r: int, plan: RoundPlan, j: int, recipe, deltas, base_entries) -> dict:
        names = set(plan.shards[j])
        shard_base = tuple(e for e in base_entries if e.name in names)
        base = decode_tensors(shard_base, self.store.get, self.genesis.chunk_size)
        merged = aggregate(recipe, base, deltas, model_tensors=[e.name for e in base_entries])
        entries, chunks, fingerprint = encode_result(merged, self.genesis.chunk_size)
        for digest, data in chunks.items():
            self.store.put(data, digest)
        result = sign_message(
            MergeResult(
                v=SCHEMA_VERSION,
                network_id=self.network_id,
                signer=self.identity.public_key,
                created_at=int(time.time()),
                round=r,
                recipe=recipe,
                chunk_size=self.genesis.chunk_size,
                tensors=entries,
                merged_fingerprint=fingerprint,
                shard=j,
                shards=len(plan.shards),
                candidates=plan.candidates,
            ),
            self.identity,
        )
        self.store.put(result.raw, result.id)
        logger.info(
            "round %d: merged shard %d/%d (%d tensors) of %d contributions, fingerprint %s",
            r,
            j,
            len(plan.shards),
            len(entries),
            len(recipe.contributions),
            fingerprint,
        )
        return {
            "recipe": recipe.id,
            "result": result.id,
            "fingerprint": fingerprint,
            "candidates": list(plan.candidates),
            "shards": len(plan.shards),
            "attests": "",
            "attestation": b"",
        }

    async def _attest_canonical(self, r: int, j: int, own: dict) -> None:
        """Attest, of the results of shard j of our merge (`merge_content`: equal but for signer and
        time), the first in `result_rank` order (most full attesters, then most attesters, then the
        smallest id): the order spot checkers follow too.

        Following the most attested result, not simply the smallest id, keeps a quorum once it is
        reached: a node that records the round keeps the attestations it then holds
        (`_attest_decided`), so switching to a smaller id published later would split the
        attestations between two ids of the same merge and leave the nodes that have not yet
        recorded the round without a quorum on either.
        """
        now = int(time.time())
        mine = verify_message(self.store.get(own["result"]), MergeResult, network_id=self.network_id).message
        ours = merge_content(mine)
        records = await read_shard_records(self.board, self.network_id, r, j)
        canonical = own["result"]
        rank = {
            result_id: result_rank(records.attestations.get(result_id, ()), result_id, self.network_id)
            for result_id in {*records.holders, canonical}
        }
        for result_id in sorted(rank, key=rank.__getitem__):
            if rank[result_id] >= rank[canonical]:
                break
            try:
                await self.fetch([result_id], sorted(records.holders[result_id]), attempts=1)
                other = verify_message(
                    self.store.get(result_id), MergeResult, network_id=self.network_id, now=now
                ).message
            except (NodeError, ProtocolError):
                continue
            if merge_content(other) == ours:
                canonical = result_id
                break
        if own["attests"] != canonical:
            own = self._attest_full(r, j, own, canonical, mine)
            logger.info(
                "round %d shard %d: attests %s in full (records: %s)",
                r,
                j,
                canonical[:8],
                records.tally(self.network_id),
            )
        await self._publish(
            result_key(self.network_id, r, j),
            make_record(
                "result", result=own["result"], attestation=own["attestation"], p2p=str(self.p2p.peer_id)
            ),
        )

    def _attest_full(self, r: int, j: int, own: dict, result_id: str, mine: MergeResult) -> dict:
        """Sign a full attestation of `result_id` (a result of our merge `mine` of shard j) and keep it
        in our shard state; the updated state."""
        attestation = sign_message(
            Attestation(
                v=SCHEMA_VERSION,
                network_id=self.network_id,
                signer=self.identity.public_key,
                created_at=int(time.time()),
                round=r,
                recipe_id=own["recipe"],
                result_id=result_id,
                merged_fingerprint=own["fingerprint"],
                shard=j,
                shards=own["shards"],
                kind="full",
                checked_tensors=len(mine.tensors),
                checked_bytes=sum(t.nbytes for t in mine.tensors),
                sample_proof=b"",
            ),
            self.identity,
        )
        own = {**own, "attests": result_id, "attestation": attestation.raw}
        self.state.set(f"shard/{r}/{j}", own)
        return own

    def _attest_decided(self, r: int, own: dict, result: Signed) -> tuple[str, bytes]:
        """What this node keeps announcing for a shard it merged once it records the round on
        `result`: a full attestation of `result` itself when it is our merge (`merge_content`), so
        the attestation counts towards the quorum the nodes still deciding the round read (else, or
        if our result cannot be read back, the attestation it holds)."""
        if own["attests"] != result.id:
            with contextlib.suppress(NodeError, ProtocolError):
                mine = verify_message(self.store.get(own["result"]), MergeResult, network_id=self.network_id)
                if merge_content(mine.message) == merge_content(result.message):
                    own = self._attest_full(r, result.message.shard, own, result.id, mine.message)
        return own["attests"], own["attestation"]

    def _carry_over(self, r: int, included: tuple[str, ...]) -> None:
        """Re-sign our contribution for round r + 1 if round r was decided without it."""
        own = self.state.get(f"contribution/{r}")
        if own is None or own["manifest"] in included or self.state.get(f"contribution/{r + 1}") is not None:
            return
        try:
            old = verify_message(self.store.get(own["manifest"]), DeltaManifest, network_id=self.network_id)
        except (NodeError, ProtocolError):
            return
        fields = {**old.message.to_dict(), "round": r + 1, "created_at": int(time.time())}
        manifest = sign_message(DeltaManifest.from_dict(fields), self.identity)
        self.store.put(manifest.raw, manifest.id)
        self.state.set(f"contribution/{r + 1}", {"card": own["card"], "manifest": manifest.id})
        logger.info("round %d was decided without our contribution; offered again for round %d", r, r + 1)

    async def _check_quorum(self, r: int) -> None:
        found = await find_attested_result(self.board, self.genesis, r, self.fetch, self.store)
        if found is None:
            await self._log_waiting(r)
            return
        view = self.state.get(f"view/{r}")
        if view is not None and (tuple(view[0]), view[1]) != (found.candidates, len(found.shards)):
            # a quorum for candidates this node did not merge (e.g. Sybil attestations in open
            # mode): it keeps attesting its own shards and does not move on
            logger.warning("round %d: a quorum attests a merge of other candidates than ours", r)
            return
        announce = []
        for shard in found.shards:
            message = shard.result.message
            own = self.state.get(f"shard/{r}/{message.shard}")
            if (
                own is not None
                and own["attestation"]
                and (tuple(own["candidates"]), own["shards"]) == (message.candidates, message.shards)
            ):
                if (own["recipe"], own["fingerprint"]) != (message.recipe.id, message.merged_fingerprint):
                    if self._fetch_again(r, own, message):
                        return
                    # a quorum for a shard this node computed otherwise (e.g. Sybil attestations in
                    # open mode): it keeps attesting its own result and does not move on
                    logger.warning(
                        "round %d: a quorum attests %s for shard %d, which differs from our merge",
                        r,
                        message.merged_fingerprint,
                        message.shard,
                    )
                    return
                announce.append([message.shard, *self._attest_decided(r, own, shard.result)])
            elif shard.result.id in self.state.get(f"refused/{r}", []):
                # our spot check found a sampled tensor that differs from this result
                logger.warning(
                    "round %d: a quorum attests %s, which our spot check refused", r, shard.result.id
                )
                return
            elif (sampled := attest_decided(self, r, shard.result)) is not None:
                announce.append([message.shard, *sampled])
            else:
                # a shard this node did not compute: it still serves and re-announces the result
                announce.append([message.shard, shard.result.id, shard.attestations[0]])
        await self.fetch([d for t in found.tensors for d in t.chunks], [])
        self.state.set(
            "latest",
            {
                "round": r,
                "fingerprint": found.fingerprint,
                "results": [s.result.id for s in found.shards],
                "attestations": [s.attestations for s in found.shards],
                "announce": announce,
            },
        )
        self.state.set("round", r + 1)
        included = sorted({c for s in found.shards for c in s.result.message.recipe.contributions})
        self._carry_over(r, tuple(included))
        logger.info(
            "round %d: result %s (%d shards: %s) attested by >= %d keys per shard",
            r,
            found.fingerprint,
            len(found.shards),
            " ".join(s.result.id[:8] for s in found.shards),
            found.signers,
        )

    def _fetch_again(self, r: int, own: dict, decided: MergeResult) -> bool:
        """Whether this node forgets its merge of `decided`'s shard to fetch its inputs again.

        It does when the quorum's recipe admits contributions this node merged without because it
        gave up fetching them (after FETCH_PATIENCE polls), and only once per contribution: the next
        polls wait for their chunks, which the attesters now hold, and merge the shard again (a
        worker) or spot-check the decided result (a fallback merger). A quorum admitting any other
        contribution it lacks (e.g. Sybil attestations in open mode) is still refused.
        """
        retryable = {c for c, polls in self._missing_polls.items() if polls >= FETCH_PATIENCE}
        retryable -= self._fetched_again
        if not retryable:
            return False
        mine = verify_message(self.store.get(own["result"]), MergeResult, network_id=self.network_id)
        lacked = set(decided.recipe.contributions) - set(mine.message.recipe.contributions)
        if not lacked or not lacked <= retryable:
            return False
        self._fetched_again |= lacked
        for contribution in lacked:
            del self._missing_polls[contribution]
        self.state.set(f"shard/{r}/{decided.shard}", None)
        logger.info(
            "round %d: the quorum's merge of shard %d admits %d contributions this node gave up "
            "fetching; fetching them again",
            r,
            decided.shard,
            len(lacked),
        )
        return True

    async def _log_waiting(self, r: int) -> None:
        """Every WAITING_LOG_SECONDS without a decided round: what each shard's records attest."""
        view = self.state.get(f"view/{r}")
        if view is None or time.monotonic() - self._waiting_logged < WAITING_LOG_SECONDS:
            return
        self._waiting_logged = time.monotonic()
        tallies = []
        for j in range(view[1]):
            records = await read_shard_records(self.board, self.network_id, r, j)
            tallies.append(f"shard {j}: {records.tally(self.network_id)}")
        logger.info("round %d: no quorum yet; %s", r, "; ".join(tallies))

    async def _lacking_shards(self, r: int, plan: RoundPlan) -> set[int]:
        """Shards of `plan` whose results do not (yet) carry a quorum of valid attestations."""
        lacking = set()
        for j in range(len(plan.shards)):
            records = await read_shard_records(self.board, self.network_id, r, j)
            reached = False
            for attestations in records.attestations.values():
                messages = [
                    verify_message(a, Attestation, network_id=self.network_id).message for a in attestations
                ]
                signers = {m.signer for m in messages}
                full = {m.signer for m in messages if m.kind == "full"}
                reached |= len(signers) >= plan.quorum and len(full) >= full_quorum(plan.quorum)
            if not reached:
                lacking.add(j)
        return lacking
