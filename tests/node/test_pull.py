"""What a pull writes is the attested result's chunk list: another list, however close, is not used."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import torch
from node_models import make_base
from safetensors.torch import load_file

from node.discover import find_attested_result
from node.genesis import create_genesis
from node.partial import MODEL_FILE, PartialModel
from node.pull import MemoryChunks
from node.records import make_record, result_key
from node.store import ContentStore
from protocol.aggregate import encode_result
from protocol.envelope import sign_message
from protocol.identity import Identity
from protocol.messages import SCHEMA_VERSION, Attestation, MergeResult

HONEST = [Identity.from_seed(bytes([40 + i]) * 32) for i in range(2)]
FORGER = Identity.from_seed(b"\x50" * 32)
CANDIDATES = ("11" * 32, "22" * 32)


@dataclasses.dataclass
class Network:
    genesis: object
    served: dict[str, bytes]  # what the peers hand out, by the digest asked for
    merged: dict[str, torch.Tensor]
    attested: object  # the MergeResult the honest nodes computed
    swapped: object  # the same but for two tensors' chunk lists, signed by the forger


@pytest.fixture(scope="module")
def network(tmp_path_factory) -> Network:
    root = tmp_path_factory.mktemp("pull")
    make_base(root / "base")
    with ContentStore(root / "store") as store:
        genesis, _ = create_genesis("pull-net", root / "base", HONEST[0], store, quorum=2)
        served = {d: store.get(d) for d in [genesis.base_manifest, *genesis.base_files.values()]}
    base = load_file(root / "base" / "model.safetensors")
    merged = {name: tensor + 0.5 for name, tensor in base.items()}
    entries, chunks, fingerprint = encode_result(merged, genesis.chunk_size)
    served.update(chunks)
    # Two tensors of one shape: their chunk lists swapped keep every digest and the fingerprint.
    first, second = (
        i for i, e in enumerate(entries) if e.name.endswith(("0.mlp.up_proj.weight", "1.mlp.up_proj.weight"))
    )
    assert entries[first].shape == entries[second].shape
    swapped_entries = list(entries)
    swapped_entries[first] = dataclasses.replace(entries[first], chunks=entries[second].chunks)
    swapped_entries[second] = dataclasses.replace(entries[second], chunks=entries[first].chunks)
    recipe = genesis.recipe(0, list(CANDIDATES))

    def result(identity: Identity, tensors) -> object:
        return sign_message(
            MergeResult(
                v=SCHEMA_VERSION,
                network_id=genesis.network_id,
                signer=identity.public_key,
                created_at=int(time.time()),
                round=0,
                recipe=recipe,
                chunk_size=genesis.chunk_size,
                tensors=tuple(tensors),
                merged_fingerprint=fingerprint,
                shard=0,
                shards=1,
                candidates=CANDIDATES,
            ),
            identity,
        )

    attested = result(HONEST[0], entries)
    swapped = result(FORGER, swapped_entries)
    served.update({attested.id: attested.raw, swapped.id: swapped.raw})
    return Network(genesis, served, merged, attested, swapped)


def attestation(identity: Identity, network: Network, result) -> bytes:
    return sign_message(
        Attestation(
            v=SCHEMA_VERSION,
            network_id=network.genesis.network_id,
            signer=identity.public_key,
            created_at=int(time.time()),
            round=0,
            recipe_id=result.message.recipe.id,
            result_id=result.id,
            merged_fingerprint=result.message.merged_fingerprint,
            shard=0,
            shards=1,
            kind="full",
            checked_tensors=len(result.message.tensors),
            checked_bytes=sum(t.nbytes for t in result.message.tensors),
            sample_proof=b"",
        ),
        identity,
    ).raw


class Board:
    """The DHT as `find_attested_result` reads it: result records under shard 0's key only."""

    def __init__(self, network_id: str, records: list[bytes]) -> None:
        self.key = result_key(network_id, 0, 0)
        self.records = {bytes([i]): record for i, record in enumerate(records)}

    async def aread(self, key: str, *, latest: bool = True) -> dict[bytes, bytes]:
        return self.records if key == self.key else {}


def find(network: Network, records: list[bytes], served: dict[str, bytes]):
    memory = MemoryChunks()

    async def fetch(digests, _holders) -> None:
        for digest in digests:
            memory.put(served[digest], digest)  # a peer's bytes: refused unless they hash to `digest`

    board = Board(network.genesis.network_id, records)
    return asyncio.run(find_attested_result(board, network.genesis, 0, fetch, memory))


def record(result, attestation_bytes: bytes) -> bytes:
    return make_record("result", result=result.id, attestation=attestation_bytes, p2p="peer")


def test_only_the_result_the_quorum_names_is_pulled(network, tmp_path):
    attested, swapped = network.attested, network.swapped
    assert swapped.message.tensors != attested.message.tensors
    assert swapped.message.merged_fingerprint == attested.message.merged_fingerprint
    records = [
        record(swapped, attestation(FORGER, network, swapped)),
        *(record(attested, attestation(who, network, attested)) for who in HONEST),
    ]
    found = find(network, records, network.served)
    assert found is not None and [s.result.id for s in found.shards] == [attested.id]
    assert found.tensors == tuple(sorted(attested.message.tensors, key=lambda e: e.name))

    # The forger's attestation of the honest result counts; its one for its own list does not.
    lone = [record(attested, attestation(HONEST[0], network, attested)), records[0]]
    assert find(network, lone, network.served) is None
    joined = [*lone, record(attested, attestation(FORGER, network, attested))]
    assert [s.result.id for s in find(network, joined, network.served).shards] == [attested.id]

    # A peer that hands out the swapped result when asked for the attested one: nothing is found.
    lying = {**network.served, attested.id: swapped.raw}
    assert find(network, records, lying) is None

    # The attested list writes the merged tensors; the swapped one would have put two in each other's place.
    sides = network.genesis.base_files
    with PartialModel(tmp_path / "work", found.tensors, found.chunk_size, sides) as partial:
        for digest in partial.wanted:
            partial.put(network.served[digest], digest)
        partial.finish(tmp_path / "out")
    loaded = load_file(tmp_path / "out" / MODEL_FILE)
    assert sorted(loaded) == sorted(network.merged)
    for name, tensor in network.merged.items():
        assert torch.equal(loaded[name], tensor), name
    with PartialModel(tmp_path / "work2", swapped.message.tensors, found.chunk_size, sides) as partial:
        for digest in partial.wanted:
            partial.put(network.served[digest], digest)
        partial.finish(tmp_path / "out2")
    other = load_file(tmp_path / "out2" / MODEL_FILE)
    assert [n for n in sorted(other) if not torch.equal(other[n], network.merged[n])] == sorted(
        [e.name for e in swapped.message.tensors if e not in attested.message.tensors]
    )
