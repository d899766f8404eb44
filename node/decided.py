"""Recording a decided round: the node checks a found quorum against its own view and moves on.

Given the round's attested result (`node.discover.find_attested_result`), `record_decided`:

1. refuses it when this node has checked no shard of the round, or a shard neither merged nor
   spot-checked by this node (a quorum alone never moves a node: node.unplanned verifies a round it
   did not plan), when this node merged or checked a round of other candidates or another shard
   count (e.g. Sybil attestations in open mode), when the decided merge of a shard this node merged
   differs from its own (unless the difference is contributions it gave up fetching: then it
   forgets its merge and fetches them again, once — `fetch_again`), or when its spot check refused
   the decided result;
2. otherwise fetches every chunk of the result, keeps it as the node's `LatestRound` with what it
   announces per shard from now on — a full attestation of the decided result where it merged
   the shard (`ShardWorker.attest_decided`), a sampled one where its spot check passed the same
   merge (`node.spotcheck.attest_decided`) — and moves to the
   next round, offering its contribution again if it arrived too late to be a candidate
   (`carry_over`; a candidate that admission rejected is not re-signed).
"""

from __future__ import annotations

import logging
import time

from node.errors import NodeError
from node.round_context import RoundContext
from node.round_state import Announcement, LatestRound, OwnContribution, RoundView, ShardMerge
from node.shard_worker import FetchPatience, ShardWorker
from node.spotcheck import attest_decided
from protocol.decision import AttestedRound
from protocol.envelope import sign_message
from protocol.errors import ProtocolError
from protocol.messages import DeltaManifest, MergeResult
from protocol.verify import verify_message

logger = logging.getLogger("node.service")  # the round log keeps its name: log readers match it


async def record_decided(
    ctx: RoundContext, worker: ShardWorker, patience: FetchPatience, r: int, found: AttestedRound
) -> bool:
    """Record `found` as round `r`'s result and move to round r + 1; whether it was recorded."""
    view = ctx.rounds.view(r)
    if view is None:
        # this node has checked no shard of the round (node.unplanned verifies it first): a quorum
        # alone never moves it, whoever holds the keys
        logger.debug("round %d: a quorum attests a round this node has not checked", r)
        return False
    if view != RoundView(found.candidates, len(found.shards)):
        # a quorum for candidates this node did not merge (e.g. Sybil attestations in open mode):
        # it keeps attesting its own shards and does not move on
        logger.warning("round %d: a quorum attests a merge of other candidates than ours", r)
        return False
    announce = []
    for shard in found.shards:
        message: MergeResult = shard.result.message
        own = ctx.rounds.shard(r, message.shard)
        if (
            own is not None
            and own.attestation
            and own.view() == RoundView(message.candidates, message.shards)
        ):
            if own.recipe != message.recipe.id and ctx.recipes and ctx.recipe_acceptable(r, message.recipe):
                # a network with search: the quorum merged with another recipe this node accepts (one
                # it verified, adopted by nodes that decided earlier); it serves the decided result
                announce.append(Announcement(message.shard, shard.result.id, shard.attestations[0]))
                continue
            if (own.recipe, own.fingerprint) != (message.recipe.id, message.merged_fingerprint):
                if fetch_again(ctx, patience, r, own, message):
                    return False
                # a quorum for a shard this node computed otherwise (e.g. Sybil attestations in
                # open mode): it keeps attesting its own result and does not move on
                logger.warning(
                    "round %d: a quorum attests %s for shard %d, which differs from our merge",
                    r,
                    message.merged_fingerprint,
                    message.shard,
                )
                return False
            announce.append(Announcement(message.shard, *worker.attest_decided(r, own, shard.result)))
        elif shard.result.id in ctx.rounds.refused(r):
            # our spot check found a sampled tensor that differs from this result
            logger.warning("round %d: a quorum attests %s, which our spot check refused", r, shard.result.id)
            return False
        elif (sampled := attest_decided(ctx, r, shard.result)) is not None:
            announce.append(Announcement(message.shard, *sampled))
        else:
            # a shard this node has neither merged nor spot-checked (yet): it waits for its check
            logger.debug("round %d: shard %d is attested but not yet checked by this node", r, message.shard)
            return False
    await ctx.fetch([d for t in found.tensors for d in t.chunks], [])
    ctx.rounds.set_latest(
        LatestRound(
            round=r,
            fingerprint=found.fingerprint,
            results=tuple(s.result.id for s in found.shards),
            attestations=tuple(tuple(s.attestations) for s in found.shards),
            announce=tuple(announce),
        )
    )
    ctx.rounds.set_round(r + 1)
    carry_over(ctx, r, found.candidates)
    logger.info(
        "round %d: result %s (%d shards: %s) attested by >= %d keys per shard",
        r,
        found.fingerprint,
        len(found.shards),
        " ".join(s.result.id[:8] for s in found.shards),
        found.signers,
    )
    return True


def fetch_again(
    ctx: RoundContext, patience: FetchPatience, r: int, own: ShardMerge, decided: MergeResult
) -> bool:
    """Whether this node forgets its merge of `decided`'s shard to fetch its inputs again.

    It does when the quorum's recipe admits contributions this node merged without because it
    gave up fetching them (`FetchPatience`), and only once per contribution: the next polls wait
    for their chunks, which the attesters now hold, and merge the shard again (a worker) or
    spot-check the decided result (a fallback merger). A quorum admitting any other contribution
    it lacks (e.g. Sybil attestations in open mode) is still refused.
    """
    retryable = patience.given_up()
    if not retryable:
        return False
    mine = ctx.stored_result(own.result).message
    lacked = set(decided.recipe.contributions) - set(mine.recipe.contributions)
    if not lacked or not lacked <= retryable:
        return False
    patience.retry(lacked)
    ctx.rounds.set_shard(r, decided.shard, None)
    logger.info(
        "round %d: the quorum's merge of shard %d admits %d contributions this node gave up "
        "fetching; fetching them again",
        r,
        decided.shard,
        len(lacked),
    )
    return True


def carry_over(ctx: RoundContext, r: int, candidates: tuple[str, ...]) -> None:
    """Re-sign our contribution for round r + 1 if round r was decided without it as a candidate
    (it arrived late); one that was a candidate and that admission rejected, or a fused copy this
    node's own check refused (node.fusion_check), is not offered again."""
    own = ctx.rounds.contribution(r)
    if own is None or own.manifest in candidates or ctx.rounds.contribution(r + 1) is not None:
        return
    if ctx.rounds.fused_refusal(own.manifest) is not None:
        return
    try:
        old = verify_message(ctx.store.get(own.manifest), DeltaManifest, network_id=ctx.network_id)
    except (NodeError, ProtocolError):
        return
    fields = {**old.message.to_dict(), "round": r + 1, "created_at": int(time.time())}
    manifest = sign_message(DeltaManifest.from_dict(fields), ctx.identity)
    ctx.store.put(manifest.raw, manifest.id)
    ctx.rounds.set_contribution(r + 1, OwnContribution(own.card, manifest.id))
    logger.info("round %d was decided without our contribution; offered again for round %d", r, r + 1)
