"""A hostile peer for network tests: DHT peers and a chunk server in the test process, on 127.0.0.1.

`HostilePeer.start(bootstrap, keys)` joins the network with one DHT peer per key (each peer's RSA
subkey carries one record per DHT key, so two attesting keys need two peers) and serves the chunks
of its own store from the first peer's daemon (or, with ``stall``, answers no chunk request).
`fabricated_round` signs attack 1 of issue 14: a round of contributions that never existed, whose
result is the base with one norm weight zeroed, with a full attestation per key and shard;
`stalled_contribution` attack 3: a contribution announced by a peer that never serves it;
`oversized_manifests` attack 4: contributions whose manifests are large blobs;
`valid_contributions` attack 4 with bytes no check refuses (against a store quota); `attested_merge`
a round of real contributions (one per key) and their merge, optionally with one tensor altered,
attested in full by every key (what only `umm pull --verify` can catch).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from node_messages import full_attestation, signed_contribution
from safetensors.torch import load_file

from node.dht import NodeDHT, RecordBoard, start_dht
from node.errors import NodeError
from node.process import process_tree, wait_gone
from node.records import contrib_key, make_record, peers_key, result_key
from node.store import ContentStore
from node.transport import HANDLER_NAME, ChunkServer
from protocol.aggregate import aggregate, encode_result
from protocol.chunks import decode_tensors
from protocol.envelope import Signed, sign_message
from protocol.fingerprint import fingerprint_state_dict
from protocol.genesis import Genesis
from protocol.identity import Identity
from protocol.messages import SCHEMA_VERSION, MergeResult, TensorEntry
from protocol.shards import plan_for, shard_count

RECORD_TTL = 600.0


def wait_logged(root: Path, names: Sequence[str], text: str, timeout: float) -> None:
    """Wait until the log of every node in `names` (under `root`) contains `text`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(text in (root / f"{n}.log").read_text() for n in names):
            return
        time.sleep(0.2)
    raise NodeError(f"expected {text!r} in the logs of {list(names)} within {timeout:g} s")


@dataclasses.dataclass
class HostilePeer:
    """DHT peers (one per key) and a chunk server over `store`; `close` leaves no process behind."""

    keys: list[Identity]
    dhts: list[NodeDHT]
    boards: list[RecordBoard]
    store: ContentStore
    server: ChunkServer
    p2p: object
    peer_id: str

    @classmethod
    async def start(
        cls, bootstrap: str, keys: list[Identity], folder: Path, *, stall: bool = False
    ) -> HostilePeer:
        """Join through `bootstrap`; with `stall`, accept chunk streams and never answer them."""
        dhts, boards = [], []
        for _ in keys:
            dht, validator = await asyncio.to_thread(start_dht, initial_peers=[bootstrap])
            dhts.append(dht)
            boards.append(RecordBoard(dht, validator))
        store = ContentStore(folder / "store")
        p2p = await dhts[0].replicate_p2p()
        server = ChunkServer(store)
        if stall:
            await p2p.add_binary_stream_handler(HANDLER_NAME, _never_answer)
        else:
            await server.start(p2p)
        return cls(keys, dhts, boards, store, server, p2p, str(p2p.peer_id))

    async def publish(self, index: int, key: str, value: bytes) -> None:
        """Publish `value` under `key` from the DHT peer of key `index`."""
        assert await self.boards[index].apublish(key, value, ttl=RECORD_TTL)

    async def close(self) -> None:
        children = [pid for dht in self.dhts for pid in process_tree(dht.pid)]
        await self.p2p.remove_binary_stream_handler(HANDLER_NAME)
        await self.p2p.shutdown()
        for dht in self.dhts:
            await asyncio.to_thread(dht.shutdown)
        self.store.close()
        assert wait_gone(children, 10.0) == []


async def _never_answer(_info, reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
    """A chunk server that reads every request and answers none (attack 3 of issue 14)."""
    while await reader.read(65536):
        pass


async def stalled_contribution(peer: HostilePeer, genesis: Genesis, base_dir: Path, r: int) -> str:
    """Announce a valid contribution of round `r` by the peer's first key, whose manifest and chunks
    the (stalling) peer never serves; returns its manifest id."""
    base = load_file(base_dir / "model.safetensors")
    card, manifest, chunks = signed_contribution(
        peer.keys[0], genesis, base, chunk_size=genesis.chunk_size, now=int(time.time()), seed=9
    )
    peer.store.put(manifest.raw, manifest.id)
    for digest, data in chunks.items():
        peer.store.put(data, digest)
    record = make_record("contrib", card=card.raw, manifest=manifest.id, p2p=peer.peer_id)
    await peer.publish(0, contrib_key(genesis.network_id, r), record)
    presence = make_record("peers", p2p=peer.peer_id, signer=peer.keys[0].public_key, latest=-1)
    await peer.publish(0, peers_key(genesis.network_id), presence)
    return manifest.id


async def oversized_manifests(peer: HostilePeer, genesis: Genesis, sizes: Sequence[int], r: int) -> list[str]:
    """Announce, from key i, a contribution of round `r` whose "manifest" is a blob of `sizes[i]`
    seeded bytes (attack 4 of issue 14: filling disks); returns the blobs' digests."""
    digests = []
    for index, (who, size) in enumerate(zip(peer.keys, sizes, strict=True)):
        blob = torch.randint(
            0, 256, (size,), generator=torch.Generator().manual_seed(index), dtype=torch.uint8
        )
        digest = peer.store.put(blob.numpy().tobytes())
        card, _manifest, _chunks = signed_contribution(
            who, genesis, {"x": torch.zeros(2)}, chunk_size=genesis.chunk_size, now=int(time.time())
        )
        record = make_record("contrib", card=card.raw, manifest=digest, p2p=peer.peer_id)
        await peer.publish(index, contrib_key(genesis.network_id, r), record)
        presence = make_record("peers", p2p=peer.peer_id, signer=who.public_key, latest=-1)
        await peer.publish(index, peers_key(genesis.network_id), presence)
        digests.append(digest)
    return digests


async def fabricated_round(
    peer: HostilePeer, genesis: Genesis, base_dir: Path, base_entries: Sequence[TensorEntry], r: int
) -> str:
    """Publish round `r` of invented candidates (one per key): the base with its first norm weight
    zeroed, attested in full by every key on every shard, and presence records claiming round `r`
    as latest (so pulls look at it). Returns the fabricated model's fingerprint (all shards)."""
    base = load_file(base_dir / "model.safetensors")
    norm = sorted(n for n in base if n.endswith("norm.weight"))[0]
    model = {**base, norm: torch.zeros_like(base[norm])}
    candidates = tuple(sorted(hashlib.sha256(k.public_key + b"never").hexdigest() for k in peer.keys))
    await _publish_attested_model(peer, genesis, base_entries, r, model, candidates)
    return fingerprint_state_dict(model)


async def attested_merge(
    peer: HostilePeer,
    genesis: Genesis,
    base_dir: Path,
    base_entries: Sequence[TensorEntry],
    r: int,
    *,
    alter: str | None = None,
) -> tuple[str, list[str]]:
    """Announce round `r`: one real contribution per key (seeded deltas, served by the peer) and
    their merge by the genesis recipe, whose tensor `alter` (if given) has 0.25 added, attested in
    full by every key on every shard; presence records claim round `r` as latest. Returns the
    published model's fingerprint (all shards) and the contribution ids."""
    base = load_file(base_dir / "model.safetensors")
    deltas, contributions = {}, []
    for index in range(len(peer.keys)):
        manifest, chunks = await _announce_contribution(peer, index, genesis, base, r, seed=100 * r + index)
        deltas[manifest.id] = decode_tensors(manifest.message.tensors, chunks, genesis.chunk_size)
        contributions.append(manifest.id)
    candidates = tuple(sorted(contributions))
    model = aggregate(genesis.recipe(r, list(candidates)), base, deltas, model_tensors=list(base))
    if alter is not None:
        model[alter] = model[alter] + 0.25
    await _publish_attested_model(peer, genesis, base_entries, r, model, candidates)
    return fingerprint_state_dict(model), list(candidates)


async def _publish_attested_model(
    peer: HostilePeer,
    genesis: Genesis,
    base_entries: Sequence[TensorEntry],
    r: int,
    model: dict[str, torch.Tensor],
    candidates: tuple[str, ...],
) -> None:
    """Sign `model`, shard by shard, as round `r`'s result of `candidates` (the genesis recipe) with
    the first key, serve it, attest each shard in full with every key, and claim round `r` as
    every key's latest (so pulls look at it)."""
    recipe = genesis.recipe(r, list(candidates))
    shards = plan_for(base_entries, shard_count(len(peer.keys), len(base_entries)))
    for j, names in enumerate(shards):
        entries, chunks, fingerprint = encode_result({n: model[n] for n in names}, genesis.chunk_size)
        for digest, data in chunks.items():
            peer.store.put(data, digest)
        result = sign_message(
            MergeResult(
                v=SCHEMA_VERSION,
                network_id=genesis.network_id,
                signer=peer.keys[0].public_key,
                created_at=int(time.time()),
                round=r,
                recipe=recipe,
                chunk_size=genesis.chunk_size,
                tensors=entries,
                merged_fingerprint=fingerprint,
                shard=j,
                shards=len(shards),
                candidates=candidates,
            ),
            peer.keys[0],
        )
        peer.store.put(result.raw, result.id)
        for index, who in enumerate(peer.keys):
            attestation = full_attestation(result, who, created_at=int(time.time())).raw
            record = make_record("result", result=result.id, attestation=attestation, p2p=peer.peer_id)
            await peer.publish(index, result_key(genesis.network_id, r, j), record)
    for index, who in enumerate(peer.keys):
        presence = make_record("peers", p2p=peer.peer_id, signer=who.public_key, latest=r)
        await peer.publish(index, peers_key(genesis.network_id), presence)


async def valid_contributions(peer: HostilePeer, genesis: Genesis, base_dir: Path, r: int) -> list[str]:
    """Announce, from every key, a valid contribution of round `r` (seeded bf16 deltas of the whole
    base, served by the peer): bytes no verification refuses, so an honest node fetches and keeps
    them (attack 4 of issue 14 against a store quota); returns their manifest ids."""
    base = load_file(base_dir / "model.safetensors")
    contributions = []
    for index, who in enumerate(peer.keys):
        manifest, _chunks = await _announce_contribution(peer, index, genesis, base, r, seed=500 + index)
        presence = make_record("peers", p2p=peer.peer_id, signer=who.public_key, latest=-1)
        await peer.publish(index, peers_key(genesis.network_id), presence)
        contributions.append(manifest.id)
    return contributions


async def _announce_contribution(
    peer: HostilePeer, index: int, genesis: Genesis, base: dict[str, torch.Tensor], r: int, *, seed: int
) -> tuple[Signed, dict[str, bytes]]:
    """Sign key `index`'s contribution of round `r` (deltas of `seed`), serve it and announce it;
    its manifest and chunks."""
    card, manifest, chunks = signed_contribution(
        peer.keys[index],
        genesis,
        base,
        chunk_size=genesis.chunk_size,
        now=int(time.time()),
        seed=seed,
        manifest_changes={"round": r},
    )
    for digest, data in chunks.items():
        peer.store.put(data, digest)
    peer.store.put(manifest.raw, manifest.id)
    record = make_record("contrib", card=card.raw, manifest=manifest.id, p2p=peer.peer_id)
    await peer.publish(index, contrib_key(genesis.network_id, r), record)
    return manifest, chunks
