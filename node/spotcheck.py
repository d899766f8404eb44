"""A node's spot checks: sampled attestations of the shards it does not merge (rules in protocol.spotcheck).

For every shard of a settled round that the node does not merge in full, each poll:

1. it orders the shard's published results by distinct full attesters (most first), then by
   distinct attesters of any kind (most first; ties: the smaller id) and takes the first it has
   not refused that states this round, this shard and shard count, the node's own candidates, the
   shard's planned tensors and the genesis recipe of its admitted contributions, none of them
   excluded by a confirmed fault (node.faults);
2. it draws its sample (`protocol.spotcheck.sign_sample` / `result_sample`: about
   ``SPOT_CHECK_DELTAS / contributions`` of the tensors, unpredictable to the publisher), fetches
   those tensors of the result and of every admitted contribution (the base is local), and
   recomputes them with the engine (`recheck`);
3. if every sampled tensor equals the result's entry it signs a ``sampled`` Attestation and
   publishes it as its result record of the shard; otherwise it adds the result to ``refused/<r>``
   (a quorum for that result is then refused by `node.decided`) and tries the next.

A verdict is kept per result id (``spot/<r>/<j>``, `node.round_state.SpotVerdict`), so a poll
re-publishes instead of re-checking. Everything reaches the network through the `RoundContext`'s
fetch, publish and read functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence

from node.errors import FetchError, NodeError, StoreError
from node.round_context import RoundContext
from node.round_state import RoundView, SpotVerdict
from node.rounds import Contribution, RoundPlan
from node.shard_worker import merge_content
from protocol.envelope import Signed, sign_message
from protocol.errors import ProtocolError
from protocol.identity import Identity
from protocol.messages import SCHEMA_VERSION, Attestation, MergeResult, TensorEntry
from protocol.spotcheck import recheck_chunks, recheck_digests, result_sample, sampled_entries, sign_sample

logger = logging.getLogger(__name__)


def attest_decided(ctx: RoundContext, r: int, result: Signed) -> tuple[str, bytes] | None:
    """This node's sampled attestation of `result`, the decided result of its shard, if its spot
    check passed a result of the same merge (same content: the same sample and the same verdict);
    None if it passed none. The attestation then counts towards the quorum that the nodes still
    deciding the round read, instead of naming another id of the same merge."""
    j = result.message.shard
    spot = ctx.rounds.spot(r, j)
    if spot is None:
        return None
    if spot.result != result.id:
        try:
            checked = ctx.stored_result(spot.result)
        except (NodeError, ProtocolError):
            return None
        if merge_content(checked.message) != merge_content(result.message):
            return None
        spot = SpotVerdict(result.id, sampled_attestation(ctx.identity, result).raw)
        ctx.rounds.set_spot(r, j, spot)
    return spot.result, spot.attestation


async def spot_check_shards(
    ctx: RoundContext,
    r: int,
    plan: RoundPlan,
    contributions: Sequence[Contribution],
    shards: Sequence[int],
    base_entries: Sequence[TensorEntry],
) -> None:
    """Spot-check each of `shards` of round `r` (the module docstring)."""
    for j in shards:
        await spot_check_shard(ctx, r, plan, contributions, j, base_entries)


async def spot_check_shard(
    ctx: RoundContext,
    r: int,
    plan: RoundPlan,
    contributions: Sequence[Contribution],
    j: int,
    base_entries: Sequence[TensorEntry],
) -> None:
    """Attest (sampled) the best result of shard `j` whose sample recomputes; refuse those that do not."""
    records = await ctx.read_shard(r, j)
    refused = ctx.rounds.refused(r)
    for result_id in records.attestations.ranked():
        if result_id in refused:
            continue
        result = await _suitable_result(ctx, r, plan, j, result_id, records.holders.get(result_id, ()))
        if result is None:
            continue
        spot = ctx.rounds.spot(r, j)
        if spot is None or spot.result != result_id:
            verdict = await _check_sample(ctx, result, contributions, base_entries)
            if verdict is None:
                return  # chunks still missing: try again next poll
            if not verdict:
                ctx.rounds.refuse(r, result_id)
                refused = refused | {result_id}
                continue
            spot = SpotVerdict(result_id, sampled_attestation(ctx.identity, result).raw)
            ctx.rounds.set_spot(r, j, spot)
            logger.info(
                "round %d shard %d: attests %s sampled (records: %s)",
                r,
                j,
                result_id[:8],
                records.attestations.tally(),
            )
            ctx.rounds.set_view(r, RoundView(plan.candidates, len(plan.shards)))
        await ctx.announce_result(r, j, result_id, spot.attestation)
        return


async def _suitable_result(
    ctx: RoundContext, r: int, plan: RoundPlan, j: int, result_id: str, holders: Iterable[str]
) -> Signed | None:
    """The result `result_id`, verified, if it is a merge of this node's round view (else None)."""
    try:
        await ctx.fetch([result_id], sorted(holders), attempts=1)
        result = ctx.stored_result(result_id, now=int(time.time()))
    except (NodeError, ProtocolError):
        return None
    m: MergeResult = result.message
    if (m.round, m.shard, m.shards, m.candidates) != (r, j, len(plan.shards), plan.candidates):
        return None
    if tuple(t.name for t in m.tensors) != plan.shards[j]:
        return None
    if not ctx.recipe_acceptable(r, m.recipe):
        return None  # not the network's method, parameters or dtype (or a verified proposal's)
    if set(m.recipe.contributions) & set(ctx.faults.excluded(r)):
        return None  # it admits a contribution that a confirmed fault excludes (node.faults)
    return result


async def _check_sample(
    ctx: RoundContext,
    result: Signed,
    contributions: Sequence[Contribution],
    base_entries: Sequence[TensorEntry],
) -> bool | None:
    """Recompute this node's sample of `result`: True if it matches, False if not, None to wait."""
    m: MergeResult = result.message
    names = result_sample(sign_sample(ctx.identity, m), m)
    by_id = {c.id: c for c in contributions}
    # the recipe's ids are among our candidates
    manifests = {cid: by_id[cid].manifest.message for cid in m.recipe.contributions}
    inputs = recheck_digests(m, names, base_entries, manifests)
    wanted = [d for t in sampled_entries(m.tensors, names) for d in t.chunks] + inputs
    with contextlib.suppress(FetchError):
        await ctx.fetch(wanted, [], attempts=1)
    if ctx.store.missing(wanted):
        return None
    try:
        chunks = {d: ctx.store.get(d) for d in inputs}
    except StoreError as exc:  # our own store dropped a chunk on read: fetch it next poll, blame no one
        logger.warning("round %d shard %d: store fault, fetching the chunk again: %s", m.round, m.shard, exc)
        return None
    try:
        differing = await asyncio.to_thread(
            recheck_chunks, m, names, base_entries, ctx.genesis.chunk_size, manifests, chunks
        )
    except ProtocolError as exc:  # sampled bytes that do not decode, or inputs that do not merge
        differing = (f"none ({exc})",)
    if differing:
        logger.warning(
            "round %d shard %d: spot check refuses %s: sampled tensors %s differ",
            m.round,
            m.shard,
            result.id,
            list(differing),
        )
        return False
    logger.info(
        "round %d shard %d: spot check of %d tensors matches %s", m.round, m.shard, len(names), result.id
    )
    return True


def sampled_attestation(identity: Identity, result: Signed) -> Signed:
    """`identity`'s sampled attestation of `result`: its sample proof and the sample it selects."""
    m: MergeResult = result.message
    proof = sign_sample(identity, m)
    names = set(result_sample(proof, m))
    return sign_message(
        Attestation(
            v=SCHEMA_VERSION,
            network_id=m.network_id,
            signer=identity.public_key,
            created_at=int(time.time()),
            round=m.round,
            recipe_id=m.recipe.id,
            result_id=result.id,
            merged_fingerprint=m.merged_fingerprint,
            shard=m.shard,
            shards=m.shards,
            kind="sampled",
            checked_tensors=len(names),
            checked_bytes=sum(t.nbytes for t in m.tensors if t.name in names),
            sample_proof=proof,
        ),
        identity,
    )
