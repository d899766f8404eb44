"""The long-lived node: DHT + chunk server + store, and the coordinator-free round loop.

Every `poll` seconds a node, on its own:

1. republishes its presence, the genesis, its own contribution for the current round and its
   result record (owner-only DHT subkeys, a few KiB each);
2. reads the round's contribution records, verifies each card and manifest (protocol/), fetches
   missing manifests and chunks from any peer (verified by hash) and selects contributions by the
   deterministic rules of `node.rounds`; once the selected set is unchanged for one poll it admits
   them (robust admission), builds the recipe from the genesis, merges with `protocol.aggregate`,
   stores the result's chunks and publishes a signed MergeResult;
3. attests the canonical result of its recipe and fingerprint — of all published results with the
   same recipe id and merged fingerprint, the one with the smallest id — so attestations pile up on
   one result id;
4. when a result of the current round carries attestations from >= quorum distinct keys, it
   becomes the node's latest and the node moves to the next round.

A restart resumes from the state in ``--data-dir`` (store + state.sqlite): same keys, same round.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

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
from node.rounds import Contribution, admit, select_contributions
from node.state import NodeState
from node.store import ContentStore
from node.transport import ChunkServer, fetch_chunks
from protocol.aggregate import aggregate, encode_result
from protocol.chunks import decode_tensors
from protocol.envelope import Signed, sign_message
from protocol.errors import ProtocolError
from protocol.identity import Identity
from protocol.messages import SCHEMA_VERSION, Attestation, DeltaManifest, ExpertCard, MergeResult
from protocol.verify import check_quorum, verify_message

logger = logging.getLogger(__name__)

RECORD_TTL = 600.0
FETCH_PATIENCE = 10


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


def read_genesis_from(board: RecordBoard, network_id: str) -> tuple[Genesis, bytes] | None:
    """The genesis of `network_id` from the DHT, verified against the id; None if nobody has it."""
    expected = network_genesis_id(network_id)
    for value in board.read(genesis_key(network_id)).values():
        try:
            genesis = open_genesis(value, expected_id=expected)
        except GenesisError:
            continue
        if genesis.network_id == network_id:
            return genesis, value
    return None


def peer_ids(board: RecordBoard, network_id: str, *, exclude: str | None = None) -> list[PeerID]:
    """The libp2p peer ids that announced themselves on the network."""
    found = []
    for value in board.read(peers_key(network_id)).values():
        record = parse_record("peers", value)
        if record is None or record["p2p"] == exclude:
            continue
        with contextlib.suppress(Exception):
            found.append(PeerID.from_base58(record["p2p"]))
    return sorted(set(found), key=str)


def claimed_latest_rounds(board: RecordBoard, network_id: str) -> list[int]:
    """Rounds peers claim as their latest, highest first (claims are hints; quorum is checked)."""
    rounds = set()
    for value in board.read(peers_key(network_id)).values():
        record = parse_record("peers", value)
        if record is not None and record["latest"] >= 0:
            rounds.add(record["latest"])
    return sorted(rounds, reverse=True)


@dataclasses.dataclass
class AttestedResult:
    """A MergeResult with attestations from at least the quorum of distinct keys."""

    result: Signed
    attestations: list[bytes]
    signers: int


async def find_attested_result(
    board: RecordBoard,
    genesis: Genesis,
    round_number: int,
    fetch: Callable[[Sequence[str], Iterable[str]], object],
    store: ContentStore,
) -> AttestedResult | None:
    """The result of `round_number` with the most valid distinct attestations, if it meets the quorum."""
    records = [
        parse_record("result", v)
        for v in (await board.aread(result_key(genesis.network_id, round_number))).values()
    ]
    records = [r for r in records if r is not None]
    by_result: dict[str, list[bytes]] = {}
    holders: dict[str, set[str]] = {}
    for record in records:
        holders.setdefault(record["result"], set()).add(record["p2p"])
        try:
            att = verify_message(record["attestation"], Attestation, network_id=genesis.network_id).message
        except ProtocolError:
            continue
        by_result.setdefault(att.result_id, []).append(record["attestation"])
        holders.setdefault(att.result_id, set())
    best: AttestedResult | None = None
    now = int(time.time())
    for result_id, attestations in sorted(by_result.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        if best is not None and len(attestations) <= best.signers:
            break
        try:
            await fetch([result_id], holders.get(result_id, set()))
            result = verify_message(store.get(result_id), MergeResult, network_id=genesis.network_id, now=now)
        except (NodeError, ProtocolError):
            continue
        if result.message.round != round_number:
            continue
        outcome = check_quorum(
            result,
            attestations,
            quorum=genesis.quorum_for(len(result.message.recipe.contributions)),
            network_id=genesis.network_id,
            allowed_signers=genesis.allowed_signers,
            now=now,
        )
        if outcome.ok and (best is None or len(outcome.signers) > best.signers):
            best = AttestedResult(result, attestations, len(outcome.signers))
    return best


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
    ) -> None:
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
        self._last_published: dict[str, tuple[bytes, float]] = {}
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
            await self._publish(
                result_key(self.network_id, latest["round"]),
                make_record(
                    "result",
                    result=latest["own_result"],
                    attestation=latest["own_attestation"],
                    p2p=str(self.p2p.peer_id),
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
        available = []
        for c in contributions:
            digests = [d for t in c.manifest.message.tensors for d in t.chunks]
            try:
                await self.fetch(digests, [], attempts=1)
            except FetchError:
                self._missing_polls[c.id] = self._missing_polls.get(c.id, 0) + 1
                if self._missing_polls[c.id] < FETCH_PATIENCE:
                    return  # wait for the chunks rather than decide on a partial view
                continue
            available.append(c)
        own = self.state.get(f"result/{r}")
        admission, deltas = await asyncio.to_thread(
            admit, self.genesis, available, self._base_entries(), self._decode
        )
        if not admission.admitted:
            return
        recipe = self.genesis.recipe(r, list(admission.admitted))
        if own is None or own["recipe"] != recipe.id:
            own = await asyncio.to_thread(self._merge, r, recipe, deltas)
            self.state.set(f"result/{r}", own)
        await self._attest_canonical(r, own)

    def _decode(self, contribution: Contribution) -> dict[str, torch.Tensor]:
        manifest: DeltaManifest = contribution.manifest.message
        try:
            return decode_tensors(manifest.tensors, self.store.get, manifest.chunk_size)
        except StoreError as exc:
            raise ProtocolError(f"expected every chunk of {contribution.id}, got: {exc}") from exc

    def _merge(self, r: int, recipe, deltas) -> dict:
        base = decode_tensors(self._base_entries(), self.store.get, self.genesis.chunk_size)
        merged = aggregate(recipe, base, deltas)
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
            ),
            self.identity,
        )
        self.store.put(result.raw, result.id)
        logger.info(
            "round %d: merged %d contributions, fingerprint %s", r, len(recipe.contributions), fingerprint
        )
        return {
            "recipe": recipe.id,
            "result": result.id,
            "fingerprint": fingerprint,
            "attests": "",
            "attestation": b"",
        }

    async def _attest_canonical(self, r: int, own: dict) -> None:
        """Attest the smallest result id with our recipe and fingerprint; publish our result record."""
        now = int(time.time())
        canonical = own["result"]
        for value in (await self.board.aread(result_key(self.network_id, r))).values():
            record = parse_record("result", value)
            if record is None or record["result"] >= canonical:
                continue
            try:
                await self.fetch([record["result"]], [record["p2p"]], attempts=1)
                other = verify_message(
                    self.store.get(record["result"]), MergeResult, network_id=self.network_id, now=now
                )
            except (NodeError, ProtocolError):
                continue
            if (other.message.recipe.id, other.message.merged_fingerprint, other.message.round) == (
                own["recipe"],
                own["fingerprint"],
                r,
            ):
                canonical = other.id
        if own["attests"] != canonical:
            attestation = sign_message(
                Attestation(
                    v=SCHEMA_VERSION,
                    network_id=self.network_id,
                    signer=self.identity.public_key,
                    created_at=now,
                    round=r,
                    recipe_id=own["recipe"],
                    result_id=canonical,
                    merged_fingerprint=own["fingerprint"],
                ),
                self.identity,
            )
            own = {**own, "attests": canonical, "attestation": attestation.raw}
            self.state.set(f"result/{r}", own)
        await self._publish(
            result_key(self.network_id, r),
            make_record(
                "result", result=own["result"], attestation=own["attestation"], p2p=str(self.p2p.peer_id)
            ),
        )

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
            return
        own = self.state.get(f"result/{r}")
        message = found.result.message
        if own is not None and (message.recipe.id, message.merged_fingerprint) != (
            own["recipe"],
            own["fingerprint"],
        ):
            # a quorum for a result this node did not compute (e.g. Sybil attestations in open mode):
            # it keeps attesting its own result and does not move on
            logger.warning(
                "round %d: a quorum attests %s, which differs from our merge", r, message.merged_fingerprint
            )
            return
        if own is None or not own["attestation"]:
            # a node that did not merge this round still serves and re-announces the result
            own = {"result": found.result.id, "attestation": found.attestations[0]}
        await self.fetch([d for t in found.result.message.tensors for d in t.chunks], [])
        self.state.set(
            "latest",
            {
                "round": r,
                "result": found.result.id,
                "fingerprint": found.result.message.merged_fingerprint,
                "attestations": found.attestations,
                "own_result": own["result"],
                "own_attestation": own["attestation"],
            },
        )
        self.state.set("round", r + 1)
        self._carry_over(r, found.result.message.recipe.contributions)
        logger.info(
            "round %d: result %s attested by %d keys",
            r,
            found.result.message.merged_fingerprint,
            found.signers,
        )
