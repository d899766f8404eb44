"""What a round's steps work with: the network, the node's key, store and state, and its I/O functions.

The service builds one `RoundContext` once its DHT and daemon run; the round machine, the shard
worker and the spot checks receive it instead of the service, so each step can run (and be tested)
with any fetch, publish and read functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import torch

from node.faults import FaultBook
from node.lookups import OpenedAttestations, ShardRecords
from node.records import make_record, result_key
from node.round_state import RoundState
from node.rounds import Contribution
from node.store import ContentStore
from protocol.chunks import decode_tensors
from protocol.envelope import Signed
from protocol.genesis import Genesis, read_base_manifest
from protocol.identity import Identity
from protocol.messages import DeltaManifest, MergeRecipe, MergeResult, TensorEntry
from protocol.verify import verify_message

FetchChunks = Callable[..., Awaitable[None]]  # (digests, holders, *, attempts=...): into the store
Publish = Callable[[str, bytes], Awaitable[None]]  # (DHT key, record value)
ReadShard = Callable[[int, int], Awaitable[ShardRecords]]  # (round, shard): its verified records


class RecipeRules(Protocol):
    """Which recipe a round's shards merge with (node.search_round's `SearchRound` is one)."""

    def recipe(self, r: int, admitted: Sequence[str]) -> MergeRecipe: ...

    def acceptable(self, r: int, recipe: MergeRecipe) -> bool: ...


@dataclasses.dataclass
class RoundContext:
    """One node's genesis, identity, store and state, with the functions that reach the network.

    `fetch(digests, holders, attempts=n)` puts the chunks into `store` (FetchError if it cannot);
    `publish(key, value)` announces a DHT record; `read_shard(r, j)` reads shard j's records;
    `peer_id` is the node's libp2p peer id, named in its result records; `opened` the attestations
    it opened (so each is verified once however often it is read); `faults` the round's checked
    fault claims (node.faults: the contributions excluded from every shard).
    """

    genesis: Genesis
    identity: Identity
    store: ContentStore
    rounds: RoundState
    fetch: FetchChunks
    publish: Publish
    read_shard: ReadShard
    peer_id: str
    opened: OpenedAttestations = dataclasses.field(default_factory=OpenedAttestations)
    recipes: RecipeRules | None = None  # None: every round merges with the genesis recipe
    faults: FaultBook = dataclasses.field(default_factory=FaultBook)

    @property
    def network_id(self) -> str:
        return self.genesis.network_id

    def round_recipe(self, r: int, admitted: Sequence[str]) -> MergeRecipe:
        """The recipe of a shard of round `r` that admits `admitted`."""
        if self.recipes is None:
            return self.genesis.recipe(r, list(admitted))
        return self.recipes.recipe(r, admitted)

    def recipe_acceptable(self, r: int, recipe: MergeRecipe) -> bool:
        """Whether another node's result of round `r` merged with a recipe this node accepts."""
        if self.recipes is None:
            return recipe.id == self.genesis.recipe(r, list(recipe.contributions)).id
        return self.recipes.acceptable(r, recipe)

    def base_entries(self) -> tuple[TensorEntry, ...]:
        """The base's tensor list (its chunk is fetched when the node starts)."""
        return read_base_manifest(self.store.get(self.genesis.base_manifest))

    def decode(self, contribution: Contribution, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The contribution's deltas of tensors `names` from the store: ProtocolError for bad bytes,
        StoreError for a chunk the store lost or found corrupt on read (a local fault, never the
        contribution's: the store dropped the blob, and the caller fetches it again from peers)."""
        manifest: DeltaManifest = contribution.manifest.message
        wanted = set(names)
        entries = tuple(t for t in manifest.tensors if t.name in wanted)
        return decode_tensors(entries, self.store.get, manifest.chunk_size)

    def stored_result(self, result_id: str, *, now: int | None = None) -> Signed:
        """A MergeResult from the store, verified (StoreError or ProtocolError if it cannot be)."""
        return verify_message(self.store.get(result_id), MergeResult, network_id=self.network_id, now=now)

    async def announce_result(self, r: int, j: int, result_id: str, attestation: bytes) -> None:
        """Publish this node's result record of shard `j`: a result id it holds and an attestation."""
        record = make_record("result", result=result_id, attestation=attestation, p2p=self.peer_id)
        await self.publish(result_key(self.network_id, r, j), record)
