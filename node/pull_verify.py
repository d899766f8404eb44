"""A pull that trusts no one: recompute a random sample of the attested result before writing it.

`verify_sample` draws, with the puller's own randomness (``os.urandom``, never the network's), a
sample of every shard's tensors at the rate a spot checker uses (`protocol.spotcheck.result_sample`:
each tensor with probability ``min(1, SPOT_CHECK_DELTAS / contributions)``), fetches those tensors
of the base and of every contribution the shard's recipe admits, and recomputes them with the
engine (`protocol.spotcheck.recheck_chunks`, the spot checkers' rule). A shard whose sample differs
from the attested entries is refused with `UnverifiedResultError`; so is a result whose inputs
cannot be fetched or do not decode, since then nothing was checked.

Shards are checked one after another, so memory holds one shard's sampled inputs at a time. A
forged tensor escapes one verifying pull with probability ``1 - f`` (``f = 1`` with up to
``SPOT_CHECK_DELTAS`` contributions), and nobody can tell in advance which tensors a pull samples.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable

from node.errors import FetchError, NodeError
from node.fetcher import Fetcher
from node.pull import MemoryChunks
from node.rounds import named_candidates
from protocol.decision import AttestedRound
from protocol.errors import ProtocolError
from protocol.genesis import Genesis, read_base_manifest
from protocol.messages import DeltaManifest, MergeResult
from protocol.spotcheck import recheck_chunks, recheck_digests, result_sample

__all__ = ["UnverifiedResultError", "VerifiedSample", "verify_sample"]

PROOF_BYTES = 32  # the puller's draw: as many random bytes as a sample proof needs to be unguessable


class UnverifiedResultError(NodeError):
    """A pulled result whose sample could not be recomputed to the attested bytes."""


@dataclasses.dataclass(frozen=True)
class VerifiedSample:
    """What a verifying pull recomputed: tensors per shard, input bytes received, seconds spent."""

    tensors: tuple[int, ...]
    bytes_fetched: int
    seconds: float


async def verify_sample(
    genesis: Genesis,
    attested: AttestedRound,
    records: MemoryChunks,
    fetcher_for: Callable[[MemoryChunks], Fetcher],
    *,
    proof: bytes | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VerifiedSample:
    """Recompute a random sample of every shard of `attested` (module docstring).

    `records` holds the genesis's base manifest and the round's candidate manifests (as the pull's
    search left them); `fetcher_for(sink)` makes a Fetcher into `sink`. `proof` fixes the draw (tests);
    by default it is ``os.urandom``. `progress(done, total)` counts shards checked.
    """
    start = time.perf_counter()
    proof = os.urandom(PROOF_BYTES) if proof is None else proof
    base_entries = read_base_manifest(records.get(genesis.base_manifest))
    received = [0]
    counts = []
    if progress is not None:
        progress(0, len(attested.shards))
    for shard in attested.shards:
        m = shard.result.message
        manifests = await _admitted(genesis, m, records, fetcher_for, received)
        names = result_sample(proof, m)
        inputs = MemoryChunks()
        await _fetch(fetcher_for(inputs), recheck_digests(m, names, base_entries, manifests), m, received)
        try:
            differing = await asyncio.to_thread(
                recheck_chunks, m, names, base_entries, genesis.chunk_size, manifests, inputs.get
            )
        except ProtocolError as exc:
            raise UnverifiedResultError(
                f"expected round {m.round} shard {m.shard}'s sampled inputs to merge, got: {exc}"
            ) from exc
        if differing:
            shown = ", ".join(differing[:3]) + (", ..." if len(differing) > 3 else "")
            raise UnverifiedResultError(
                f"expected round {m.round} shard {m.shard} to recompute to its attested tensors, "
                f"got {len(differing)} of {len(names)} sampled tensors differing ({shown})"
            )
        counts.append(len(names))
        if progress is not None:
            progress(len(counts), len(attested.shards))
    return VerifiedSample(tuple(counts), received[0], time.perf_counter() - start)


async def _admitted(
    genesis: Genesis,
    m: MergeResult,
    records: MemoryChunks,
    fetcher_for: Callable[[MemoryChunks], Fetcher],
    received: list[int],
) -> dict[str, DeltaManifest]:
    """The delta manifests of the contributions `m`'s recipe admits, fetched and verified, by id."""
    await _fetch(fetcher_for(records), list(m.recipe.contributions), m, received)
    try:
        admitted = named_candidates(genesis, m.round, m.recipe.contributions, records.get, int(time.time()))
    except ProtocolError as exc:
        raise UnverifiedResultError(
            f"expected round {m.round} shard {m.shard}'s admitted contributions, got: {exc}"
        ) from exc
    return {c.id: c.manifest.message for c in admitted}


async def _fetch(fetcher: Fetcher, digests: list[str], m: MergeResult, received: list[int]) -> None:
    """Fetch `digests` for the check of `m`'s shard: UnverifiedResultError if peers cannot give them."""
    try:
        await fetcher.fetch(digests)
    except FetchError as exc:
        raise UnverifiedResultError(
            f"expected the inputs to recompute round {m.round} shard {m.shard} from peers, got: {exc} "
            "(--no-verify pulls on the quorum's word alone)"
        ) from exc
    finally:
        received[0] += fetcher.bytes_received
