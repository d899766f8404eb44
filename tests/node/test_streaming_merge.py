"""A worker's shard merge streams from the store and gives the same bytes as the in-memory merge."""

from __future__ import annotations

import time

from node_messages import signed_contribution
from node_models import make_base

from node.datafolder import load_or_create_identity
from node.genesis import create_genesis
from node.round_context import RoundContext
from node.round_state import RoundState
from node.rounds import Contribution, admit, plan_round
from node.shard_worker import FetchPatience, ShardWorker
from node.state import NodeState
from node.store import ContentStore
from protocol.aggregate import aggregate, encode_result
from protocol.chunks import decode_tensors
from protocol.genesis import read_base_manifest
from protocol.identity import Identity

CHUNK = 4096


def test_streamed_shard_merge_equals_the_in_memory_merge(tmp_path):
    make_base(tmp_path / "base", seed=61, hidden=16)
    data = tmp_path / "node"
    with ContentStore(data / "store") as store, NodeState(data) as state:
        genesis, _ = create_genesis(
            "stream", tmp_path / "base", Identity.from_seed(b"\x61" * 32), store, chunk_size=CHUNK
        )
        base_entries = read_base_manifest(store.get(genesis.base_manifest))
        base = decode_tensors(base_entries, store.get, CHUNK)
        contributions, deltas = [], {}
        for n in range(3):
            who = Identity.from_seed(bytes([70 + n]) * 32)
            card, manifest, chunks = signed_contribution(
                who, genesis, base, chunk_size=CHUNK, now=int(time.time()), seed=n
            )
            for digest, piece in chunks.items():
                store.put(piece, digest)
            store.put(manifest.raw, manifest.id)
            contributions.append(Contribution(card, manifest))
            deltas[manifest.id] = decode_tensors(manifest.message.tensors, store.get, CHUNK)

        async def nothing(*_args, **_kwargs):
            return None

        ctx = RoundContext(
            genesis=genesis,
            identity=load_or_create_identity(data),
            store=store,
            rounds=RoundState(state),
            fetch=nothing,
            publish=nothing,
            read_shard=nothing,
            peer_id="own",
        )
        worker = ShardWorker(ctx, FetchPatience())
        plan = plan_round(genesis, contributions, base_entries)
        names = [e.name for e in base_entries]
        for j, shard in enumerate(plan.shards):
            admission, lazy = admit(genesis, contributions, base_entries, worker._lazy_decode, shard)
            assert admission.admitted == tuple(sorted(deltas))
            recipe = genesis.recipe(0, list(admission.admitted))
            own = worker._merge_shard(0, plan, j, recipe, lazy, base_entries)
            result = ctx.stored_result(own.result).message
            eager = aggregate(
                recipe,
                {k: base[k] for k in shard},
                {c: {k: d[k] for k in shard} for c, d in deltas.items()},
                model_tensors=names,
            )
            entries, chunks, fingerprint = encode_result(eager, CHUNK)
            assert (result.merged_fingerprint, result.tensors) == (fingerprint, entries)
            assert all(store.get(d) == chunks[d] for d in chunks)
