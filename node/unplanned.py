"""Verifying a round this node did not plan, before it adopts the result a quorum attests there.

A node adopts a round's result only once it has checked every shard itself (node.decided): it
merged the shard or its spot check passed. A node that did not plan round `r` (it was down, joined
later, or had no contribution of that round in view) learns the round from the attested result:

1. it fetches every candidate the result names by its id (a delta manifest) and verifies it:
   signature, network, round, base and allowlist (`node.rounds.manifest_problem`), one per signer;
2. it plans the round from those manifests (`node.rounds.plan_round`); the plan must name exactly
   the result's candidates and shard count;
3. it checks the round's fault records (node.faults) and spot-checks every shard (node.spotcheck),
   which records its round view when a check passes.

Candidates that cannot be fetched or verified (contributions that never existed) leave the round
unverified, and a result whose sampled tensors differ is refused: in neither case is it adopted.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from node.errors import NodeError
from node.lookups import RecordReader
from node.round_context import RoundContext
from node.rounds import Contribution, named_candidates, plan_round
from node.spotcheck import spot_check_shards
from protocol.decision import AttestedRound
from protocol.errors import ProtocolError
from protocol.messages import TensorEntry


async def named_contributions(ctx: RoundContext, r: int, candidates: Sequence[str]) -> list[Contribution]:
    """The contributions `candidates` (manifest ids) of round `r`, fetched and verified
    (`node.rounds.named_candidates`); ProtocolError naming the first that cannot be had or verified."""
    try:
        await ctx.fetch(list(candidates), [], attempts=1)
    except NodeError as exc:
        raise ProtocolError(f"expected the candidates' delta manifests, got: {exc}") from exc
    return named_candidates(ctx.genesis, r, candidates, ctx.store.get, int(time.time()))


async def verify_unplanned(
    ctx: RoundContext,
    r: int,
    found: AttestedRound,
    base_entries: Sequence[TensorEntry],
    board: RecordReader,
) -> None:
    """Steps 1-3 of the module docstring for the round `found` decides; ProtocolError if its
    candidates cannot be verified or planned as the result states. The round's fault records
    (`board`) are checked before the spot checks (node.faults), so a result that admits an
    excluded contribution is refused there."""
    contributions = await named_contributions(ctx, r, found.candidates)
    await ctx.faults.refresh(ctx, board, r, contributions)
    plan = plan_round(ctx.genesis, contributions, base_entries)
    if plan.candidates != tuple(found.candidates) or len(plan.shards) != len(found.shards):
        raise ProtocolError(
            f"expected a plan of {len(found.shards)} shards for the result's candidates, "
            f"got {len(plan.shards)} for {len(plan.candidates)} verified candidates"
        )
    await spot_check_shards(ctx, r, plan, contributions, range(len(plan.shards)), base_entries)
