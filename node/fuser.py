"""A fuser node (``umm node start --fuse``): it distills a round's distribution summaries into a
copy of the base and contributes that copy as its own delta.

Each poll, for its current round `r`, unless it already has a contribution for `r`:

1. it reads the round's verified summaries (node.fusion_summaries); once their set has not
   changed for the genesis ``settle_seconds``, it announces a contribution on its way (a
   ``pending`` record, node.settle: the round waits for it up to ``PENDING_SECONDS``);
2. in the background it fetches and decodes them, writes the base as a model folder, and
   distills them into a copy of it (`merging.fusion.pipeline.fuse_summaries`: MinCE fusion, the
   held-out prompts left out, the node's `FuserSettings`, with its replay prompts if it has some:
   the base's own responses on other domains, so the copy keeps them);
3. if the copy lowers the held-out cross-entropy to the fused distributions by at least
   `LOCAL_MARGIN` (twice the peers' `DEFAULT_MARGIN`, so that the delta codec's rounding cannot
   tip a copy a peer recomputes below the peers' bar), it contributes the copy
   (`node.contribute.contribute`) with a card that names the summaries (`fused_from`); peers
   check it (node.fusion_check) and merge it like any expert. Otherwise it contributes nothing
   for the round and says why.

A fuser's contribution for the round is the fused copy: a participant with its own expert runs
it on another node (one contribution per key and round).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merging.errors import UmmError
from node.fusion_summaries import SummaryRef, load_summaries, round_summaries
from node.lookups import RecordReader
from node.model_folders import exclusive_model_job
from node.round_context import RoundContext
from node.settle import SettleClock

logger = logging.getLogger("node.service")  # the round log keeps its name: log readers match it

FUSION_FOLDER = "fusion"  # under the data folder


@dataclass(frozen=True)
class FuserSettings:
    """How this node distills (its own choice: peers check the result, not the settings)."""

    steps: int = 600
    lr: float = 2e-3
    batch_size: int = 32
    lam: float = 0.9
    seed: int = 0
    threads: int = 1
    codec: str = "bf16"
    replay: Any = None  # a merging.fusion.summary.ProbeSet of other domains' prompts, or None


def local_margin() -> float:
    """The held-out cross-entropy drop a fuser requires of its own copy before contributing it."""
    from merging.fusion.refusal import DEFAULT_MARGIN

    return 2 * DEFAULT_MARGIN


class Fuser:
    """Steps 1-3 of the module docstring for one node's rounds."""

    def __init__(
        self, ctx: RoundContext, board: RecordReader, data_dir: Path, settings: FuserSettings
    ) -> None:
        self.ctx = ctx
        self.board = board
        self.data_dir = data_dir
        self.folder = data_dir / FUSION_FOLDER
        self.settings = settings
        self.clock = SettleClock(ctx.genesis.settle_seconds)
        self._task: asyncio.Task | None = None
        self._done: set[int] = set()  # rounds fused (or given up on) by this run

    async def step(self, r: int) -> None:
        """One poll of round `r`."""
        if self._task is not None:
            if self._task.done():
                self._task = None
            return
        if r in self._done or self.ctx.rounds.contribution(r) is not None:
            return
        if not self.ctx.genesis.probe_set_fingerprint:
            return
        summaries = await round_summaries(self.ctx, self.board, r)
        if not summaries or self.clock.settled(r, tuple(sorted(summaries)), set()) is None:
            return
        self._done.add(r)
        self.ctx.rounds.set_pending(r, int(time.time()))
        self._task = asyncio.create_task(self._fuse(r, summaries))

    async def _fuse(self, r: int, refs: dict[str, SummaryRef]) -> None:
        started = time.monotonic()
        try:
            ids = sorted(refs)
            sources = await load_summaries(self.ctx, ids, {ref.holder for ref in refs.values()})
            logger.info("round %d: fusing %d distribution summaries into a copy of the base", r, len(ids))
            out = await asyncio.to_thread(exclusive_model_job, self._distill, r, sources)
            if out is None:
                return
            prepared = await asyncio.to_thread(self._contribute, r, out, refs)
            logger.info(
                "round %d: contributed the fused copy %s (%d bytes, from %d summaries) in %.0f s",
                r,
                prepared.manifest_id[:16],
                prepared.total_bytes,
                len(ids),
                time.monotonic() - started,
            )
        except (UmmError, OSError) as exc:
            logger.warning("round %d: fusion failed, no fused contribution: %s", r, exc)
        except Exception:  # a background task's failure must reach the log, whatever it is
            logger.exception("round %d: fusion failed, no fused contribution", r)
        finally:
            if self.ctx.rounds.contribution(r) is None:
                self.ctx.rounds.set_pending(r, None)

    def _distill(self, r: int, sources) -> Path | None:
        """The fused copy's folder, or None if it does not pass the local margin."""
        from merging.fusion import SHARED_PARAMETERS
        from merging.fusion.distill import DistillSpec
        from merging.fusion.pipeline import fuse_summaries
        from node.model_folders import ensure_base_folder

        s = self.settings
        base = ensure_base_folder(self.ctx, self.folder / "base")
        spec = DistillSpec(
            steps=s.steps,
            lr=s.lr,
            batch_size=s.batch_size,
            lam=s.lam,
            seed=s.seed,
            threads=s.threads,
            frozen=SHARED_PARAMETERS,  # embeddings and norms as the base has them, like the experts
        )
        out = self.folder / f"round-{r}"
        report = fuse_summaries(
            base,
            sources,
            out,
            digests={sid: sid for sid, _ in sources},
            spec=spec,
            margin=local_margin(),
            replay=s.replay,
            progress=False,
        )
        check = report.check
        if check is None or not check.accepted:
            got = "no held-out prompt" if check is None else f"{check.pivot:.4f} -> {check.fused:.4f}"
            logger.warning(
                "round %d: the fused copy does not lower the held-out cross-entropy by %.0f %% (%s): "
                "not contributed",
                r,
                100 * local_margin(),
                got,
            )
            return None
        logger.info(
            "round %d: fused copy ready, held-out cross-entropy %.4f -> %.4f", r, check.pivot, check.fused
        )
        return out

    def _contribute(self, r: int, out: Path, refs: dict[str, SummaryRef]):
        from node.contribute import contribute

        domains = sorted({d for ref in refs.values() for d in ref.card.message.domains})
        names = "+".join(sorted(ref.card.message.name for ref in refs.values()))
        return contribute(
            self.data_dir,
            out,
            codec=self.settings.codec,
            name=f"fused:{names}"[:128],
            domains=tuple(domains),
            license="derived",
            round_number=r,
            fused_from=tuple(sorted(refs)),
        )
