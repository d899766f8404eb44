"""The check every node makes of a fused contribution before it counts as a round's candidate.

A contribution whose card names distribution summaries (`ExpertCard.fused_from`) claims to be a
copy of the base distilled from them. Distillation is not bit-reproducible across machines, so a
peer does not redo it; it recomputes a forward pass instead (merging.fusion.refusal): it fetches
the named summaries and the contribution's whole delta, fuses the summaries' held-out probe
prompts (MinCE, the same targets the fuser held out), and measures the cross-entropy of the base
and of base + delta to them. The contribution is accepted when the fused model's is at most
(1 - `DEFAULT_MARGIN`) times the base's, and refused otherwise (or when its summaries do not
verify, or cannot be fetched after `FETCH_TRIES` polls).

Until this node has a verdict, the contribution is not a candidate and its signer counts as a
contribution on its way (node.settle), so the round's set does not settle without it; every
node reaches the same verdict (the forward pass differs across machines by float rounding,
about 1e-6 relative, and the fuser contributes only copies that clear twice the margin). Each
node publishes its verdict (node.records ``fusion``) for `umm status`.

A node that adopts a round it did not plan (node.unplanned) does not repeat the check: the
quorum that decided the round did.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from merging.errors import UmmError
from node.errors import NodeError
from node.fusion_summaries import load_summaries
from node.model_folders import ensure_base_folder, exclusive_model_job
from node.records import fusion_key, make_record
from node.round_context import RoundContext
from node.rounds import Contribution
from protocol.errors import ProtocolError

logger = logging.getLogger("node.service")  # the round log keeps its name: log readers match it

FETCH_TRIES = 5  # polls a node tries to fetch a fused contribution's summaries and delta


@dataclass(frozen=True)
class FusionVerdict:
    """A node's verdict on a fused contribution: the two cross-entropies, and why it was refused."""

    pivot: float
    fused: float
    reason: str  # "" when accepted

    @property
    def accepted(self) -> bool:
        return not self.reason


def fused_from(contribution: Contribution) -> tuple[str, ...]:
    """The summary ids a contribution's card says it was distilled from (empty: an ordinary expert)."""
    return () if contribution.card is None else tuple(contribution.card.message.fused_from)


class FusionChecks:
    """This node's verdicts on fused contributions, checked in the background (module docstring)."""

    def __init__(self, ctx: RoundContext, folder: Path) -> None:
        self.ctx = ctx
        self.folder = folder  # the base as a model folder, written once
        self.verdicts: dict[str, FusionVerdict] = {}
        self._running: dict[str, asyncio.Task] = {}
        self._tries: dict[str, int] = {}

    async def filter(
        self, r: int, contributions: Sequence[Contribution]
    ) -> tuple[list[Contribution], set[bytes]]:
        """(the contributions that count: ordinary ones and accepted fused ones, the signers of
        fused ones still being checked); starts the checks it has no verdict for."""
        kept, checking = [], set()
        for c in contributions:
            if not fused_from(c):
                kept.append(c)
                continue
            verdict = self.verdicts.get(c.id)
            if verdict is None:
                checking.add(c.signer)
                if c.id not in self._running:
                    self._running[c.id] = asyncio.create_task(self._check(r, c))
            elif verdict.accepted:
                kept.append(c)
            if verdict is not None:
                await self._publish(r, c.id, verdict)
        return kept, checking

    async def _publish(self, r: int, cid: str, verdict: FusionVerdict) -> None:
        record = make_record(
            "fusion", contribution=cid, pivot=verdict.pivot, fused=verdict.fused, reason=verdict.reason
        )
        await self.ctx.publish(fusion_key(self.ctx.network_id, r, cid), record)

    async def _check(self, r: int, c: Contribution) -> None:
        try:
            verdict = await self._measure(c)
        except NodeError as exc:  # a summary or a delta chunk not reachable yet: try again
            tries = self._tries[c.id] = self._tries.get(c.id, 0) + 1
            if tries < FETCH_TRIES:
                logger.info("round %d: fused contribution %s not checked yet: %s", r, c.id[:16], exc)
                return
            verdict = FusionVerdict(0.0, 0.0, f"its summaries or delta could not be fetched: {exc}")
        except (ProtocolError, UmmError) as exc:
            verdict = FusionVerdict(0.0, 0.0, f"its summaries do not verify: {exc}")
        finally:
            self._running.pop(c.id, None)
        self.verdicts[c.id] = verdict
        if not verdict.accepted and c.signer == self.ctx.identity.public_key:
            self.ctx.rounds.set_fused_refusal(c.id, verdict.reason)  # not offered again (node.decided)
        if verdict.accepted:
            logger.info(
                "round %d: fused contribution %s accepted: held-out cross-entropy %.4f -> %.4f",
                r,
                c.id[:16],
                verdict.pivot,
                verdict.fused,
            )
        else:
            logger.warning("round %d: fused contribution %s refused: %s", r, c.id[:16], verdict.reason)

    async def _measure(self, c: Contribution) -> FusionVerdict:
        sources = await load_summaries(self.ctx, fused_from(c))
        digests = [d for t in c.manifest.message.tensors for d in t.chunks]
        await self.ctx.fetch(digests, [])
        return await asyncio.to_thread(exclusive_model_job, self._cross_entropies, c, sources)

    def _cross_entropies(self, c: Contribution, sources) -> FusionVerdict:
        from merging.fusion.pipeline import held_out_targets
        from merging.fusion.refusal import DEFAULT_MARGIN, check_fused
        from merging.testbed.models import load_pretrained

        base_dir = ensure_base_folder(self.ctx, self.folder)
        pivot, tokenizer = load_pretrained(base_dir)
        fused, _ = load_pretrained(base_dir)
        deltas = self.ctx.decode(c, [e.name for e in c.manifest.message.tensors])
        state = fused.state_dict()
        for name, delta in deltas.items():
            state[name] = (state[name].float() + delta).to(state[name].dtype)
        fused.load_state_dict(state)
        held = held_out_targets(sources, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        check = check_fused(pivot, fused, held, pad, DEFAULT_MARGIN)
        if check.accepted:
            return FusionVerdict(check.pivot, check.fused, "")
        return FusionVerdict(
            check.pivot,
            check.fused,
            f"held-out cross-entropy {check.fused:.4f} is not at most {1 - check.margin:.2f} x the base's "
            f"{check.pivot:.4f}",
        )
