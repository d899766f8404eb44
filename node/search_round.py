"""A round's recipe in a network with search: propose, verify, adopt (no coordinator).

Once a round's candidates have settled (node.round_machine), `SearchRound.ready` runs each poll:

1. every node fetches every candidate's deltas and admits them (`node.rounds.admit`, all tensors)
   and writes the round's inputs once (node.search_inputs);
2. a searcher (``umm node start --search``) that has not proposed yet runs the search
   (merging.search: CMA-ES, the genesis's budget, its own seed derived from its key and the round,
   in memory), signs a `SearchProposal` (recipe, candidate set, dev fingerprint, claimed fitness),
   stores it as a chunk and publishes a proposal record;
3. every node reads the round's proposal records, fetches each proposal it has not judged, and
   verifies it (`protocol.proposal.verify_proposal`: the same evaluator recomputes the fitness;
   a claim more than FITNESS_TOLERANCE above it is refused and bans the signer for the round);
   it keeps each verdict in its state and publishes it (for `umm status`);
4. once ``wait_seconds`` have passed since its inputs were ready (step 1: loading the experts
   can take long on a busy machine, and the wait is the time granted to the searches), or since
   the candidates settled if the inputs cannot be scored, the node adopts the best
   verified proposal (`ProposalBook.best`), or the genesis recipe when none is verified, and its
   shards merge with `recipe` (protocol.search_rules.round_recipe).

A proposal verified later than a node's adoption can still win: the choice is re-read each poll,
and a shard merged with a recipe that is no longer the best is merged again (node.shard_worker).
A node accepts a decided round whose recipe is the genesis recipe or that of a proposal it
verified (`acceptable`), so nodes that adopted at different moments still agree on the quorum.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from merging.errors import UmmError
from node.errors import NodeError
from node.lookups import RecordReader
from node.model_folders import exclusive_model_job
from node.records import make_record, parse_record, proposal_key, verdict_key
from node.round_context import RoundContext
from node.rounds import Contribution, RoundPlan, admit
from protocol.envelope import sign_message
from protocol.errors import ProtocolError
from protocol.messages import SCHEMA_VERSION, MergeRecipe, TensorEntry
from protocol.proposal import ProposalBook, ProposalCheck, SearchProposal, verify_proposal
from protocol.search_rules import recipe_proposal, round_recipe
from protocol.verify import verify_message

logger = logging.getLogger("node.service")  # the round log keeps its name: log readers match it

SEARCH_FOLDER = "search"  # under the data folder


def searcher_seed(public_key: bytes, round_number: int) -> int:
    """A searcher's own CMA-ES seed for a round: from its key, so two searchers search differently."""
    digest = hashlib.sha256(b"umm-search-seed-v1" + public_key + round_number.to_bytes(8, "big"))
    return int.from_bytes(digest.digest()[:4], "big")


class _Inputs:
    """One round's admitted deltas on disk and its evaluator (loaded once, used for every score)."""

    def __init__(self, ctx: RoundContext, folder: Path, candidates: tuple[str, ...], deltas) -> None:
        from node.search_inputs import make_evaluator, write_inputs

        self.candidates = candidates
        self.config = write_inputs(ctx, folder, deltas)
        self.evaluator = make_evaluator(self.config, ctx.genesis.search_settings)

    def recompute(self, proposal: SearchProposal) -> float:
        """The proposal's fitness on this node (ProtocolError if its parameters do not merge)."""
        from merging.config import load_config
        from merging.errors import UmmError
        from merging.parameters import resolve_parameters
        from node.search_inputs import proposal_config

        try:
            config = load_config(proposal_config(self.config, proposal.parameters, self.candidates))
            parameters = resolve_parameters(config, self.evaluator.tensors)
            return self.evaluator(parameters).value
        except UmmError as exc:
            raise ProtocolError(f"expected parameters the merge engine accepts, got: {exc}") from exc


class SearchRound:
    """Proposals, verdicts and the adopted recipe of this node's rounds (the module docstring)."""

    def __init__(
        self, ctx: RoundContext, board: RecordReader, folder: Path, *, searcher: bool = False
    ) -> None:
        self.ctx = ctx
        self.board = board
        self.folder = folder  # the rounds' inputs and search journals
        self.searcher = searcher
        self.settings = ctx.genesis.search_settings
        self.books: dict[int, ProposalBook] = {}
        self.adopted: dict[int, SearchProposal | None] = {}
        self._inputs: dict[int, _Inputs] = {}
        self._failed: set[int] = set()  # rounds whose inputs cannot be scored (genesis recipe)
        self._ready_at: dict[int, float] = {}  # when this node could first score the round's merges
        self._judged: dict[int, set[str]] = {}  # proposal envelope ids verified or refused, per round

    def book(self, r: int) -> ProposalBook:
        return self.books.setdefault(r, ProposalBook(r))

    async def ready(
        self,
        r: int,
        plan: RoundPlan,
        contributions: Sequence[Contribution],
        base_entries: Sequence[TensorEntry],
        settled_at: float,
    ) -> bool:
        """Steps 1-4 of the module docstring; whether the round's recipe is chosen (merge now)."""
        try:
            inputs = await self._round_inputs(r, plan, contributions, base_entries)
        except UmmError as exc:  # e.g. no admitted expert differs from the base: nothing to search
            if r not in self._failed:
                logger.warning("round %d: cannot score merges, so cannot search or verify: %s", r, exc)
            self._failed.add(r)
            inputs = None
        if inputs is None and r not in self._failed:
            return False  # wait for every candidate's chunks
        if inputs is not None and self.searcher and self.ctx.rounds.state.get(f"search/{r}/own") is None:
            try:
                await self._propose(r, inputs)
            except UmmError as exc:
                logger.warning("round %d: the search failed, no proposal: %s", r, exc)
                self.ctx.rounds.state.set(f"search/{r}/own", "")
        own = self.ctx.rounds.state.get(f"search/{r}/own")
        if own:
            record = make_record("proposal", proposal=own, p2p=self.ctx.peer_id)
            await self.ctx.publish(proposal_key(self.ctx.network_id, r), record)
        if inputs is not None:
            await self._verify_published(r, inputs)
        scoring_from = self._ready_at.get(r, settled_at)  # the wait counts once inputs are scored
        if time.monotonic() - scoring_from < self.settings.wait_seconds:
            return False
        best = self.book(r).best()
        if r not in self.adopted or self.adopted[r] is not best:
            what = f"proposal {best.id[:16]} (fitness {best.fitness:.6f})" if best else "the genesis recipe"
            logger.info("round %d: adopts %s", r, what)
        self.adopted[r] = best
        return True

    def recipe(self, r: int, admitted: Sequence[str]) -> MergeRecipe:
        """The recipe a shard of `admitted` contributions merges with in round `r`."""
        return round_recipe(self.ctx.genesis, r, admitted, self.adopted.get(r))

    def acceptable(self, r: int, recipe: MergeRecipe) -> bool:
        """Whether `recipe` is the genesis recipe or a verified proposal's for round `r`."""
        pid = recipe_proposal(recipe)
        if pid is None:
            proposal = None
        elif pid in self.book(r).verified:
            proposal = self.book(r).verified[pid][0]
        else:
            return False
        return recipe.id == round_recipe(self.ctx.genesis, r, recipe.contributions, proposal).id

    async def _round_inputs(
        self,
        r: int,
        plan: RoundPlan,
        contributions: Sequence[Contribution],
        base_entries: Sequence[TensorEntry],
    ) -> _Inputs | None:
        held = self._inputs.get(r)
        if held is not None and held.candidates == plan.candidates:
            return held
        digests = [d for c in contributions for t in c.manifest.message.tensors for d in t.chunks]
        with contextlib.suppress(NodeError):
            await self.ctx.fetch(digests, [], attempts=1)
        if self.ctx.store.missing(digests):
            return None  # every candidate's deltas are needed to search or verify: wait for them
        started = time.monotonic()
        admission, deltas = await asyncio.to_thread(
            admit, self.ctx.genesis, contributions, base_entries, self.ctx.decode
        )
        if not admission.admitted:
            return None
        folder = self.folder / str(r)
        candidates = plan.candidates
        inputs = await asyncio.to_thread(exclusive_model_job, _Inputs, self.ctx, folder, candidates, deltas)
        logger.info(
            "round %d: search inputs of %d admitted contributions ready in %.1f s (evaluator loaded)",
            r,
            len(admission.admitted),
            time.monotonic() - started,
        )
        self._inputs = {r: inputs}  # earlier rounds' evaluators are no longer needed
        self._ready_at[r] = time.monotonic()
        return inputs

    async def _propose(self, r: int, inputs: _Inputs) -> None:
        ctx = self.ctx
        seed = searcher_seed(ctx.identity.public_key, r)
        started = time.monotonic()
        parameters, fitness = await asyncio.to_thread(exclusive_model_job, self._search, r, inputs, seed)
        proposal = sign_message(
            SearchProposal(
                v=SCHEMA_VERSION,
                network_id=ctx.network_id,
                signer=ctx.identity.public_key,
                created_at=int(time.time()),
                round=r,
                candidates=inputs.candidates,
                method=ctx.genesis.method,
                parameters=parameters,
                dev_fingerprint=self.settings.dev_fingerprint,
                fitness=fitness,
                search_seed=seed,
            ),
            ctx.identity,
        )
        ctx.store.put(proposal.raw, proposal.id)
        ctx.rounds.state.set(f"search/{r}/own", proposal.id)  # the envelope id its record names
        logger.info(
            "round %d: searched %d candidates in %.1f s; proposes %s with fitness %.6f",
            r,
            self.settings.budget,
            time.monotonic() - started,
            proposal.message.id[:16],
            fitness,
        )

    def _search(self, r: int, inputs: _Inputs, seed: int) -> tuple[dict, float]:
        from merging.search.driver import CmaSettings, run_cma
        from merging.search.gradient import GradientFitness, GradientSettings, run_gradient
        from merging.search.journal import Journal
        from merging.search.recipe import recipe_mapping
        from merging.search.space import SearchSpace
        from node.search_inputs import proposal_parameters

        evaluator = inputs.evaluator
        space = SearchSpace(
            evaluator.config,
            evaluator.template,
            evaluator.searched,
            granularity=self.settings.granularity,
            keys=self.settings.keys,
        )
        out = self.folder / f"{r}-journal"
        cma = CmaSettings(seed=seed)
        optimizer = {"cma": cma.to_dict()} if self.settings.optimizer == "cma" else {}
        header = {"search": self.settings.to_dict(), **optimizer, "candidates": list(inputs.candidates)}
        journal = Journal.open(out, header, resume=(out / "journal.jsonl").exists())
        try:
            if self.settings.optimizer == "gradient":
                result = run_gradient(
                    space.start(),
                    GradientFitness(space, evaluator),
                    journal,
                    self.settings.budget,
                    GradientSettings(),
                )
            else:
                result = run_cma(
                    space.start(), lambda x: evaluator(space.apply(x)), journal, self.settings.budget, cma
                )
        finally:
            journal.close()
        best = result.best
        # the claim is the engine's merge scored, as every verifier recomputes it (the gradient
        # search scores its own differentiable merge, equal to the last bits only)
        fitness = (
            evaluator(space.apply(best.x)).value if self.settings.optimizer == "gradient" else best.fitness
        )
        return proposal_parameters(recipe_mapping(space, best.x)), fitness

    async def _verify_published(self, r: int, inputs: _Inputs) -> None:
        ctx, book = self.ctx, self.book(r)
        now = int(time.time())
        for value in (await self.board.aread(proposal_key(ctx.network_id, r))).values():
            record = parse_record("proposal", value)
            if record is None or record["proposal"] in self._judged.get(r, ()):
                continue
            try:
                await ctx.fetch([record["proposal"]], [record["p2p"]], attempts=1)
                signed = verify_message(
                    ctx.store.get(record["proposal"]), SearchProposal, network_id=ctx.network_id, now=now
                )
            except (NodeError, ProtocolError) as exc:
                logger.info("round %d: ignoring a proposal record: %s", r, exc)
                continue
            proposal: SearchProposal = signed.message
            members = ctx.genesis.members
            if (members is not None and proposal.signer not in members) or not book.accepts(proposal):
                continue
            started = time.monotonic()
            check = await asyncio.to_thread(exclusive_model_job, self._check, proposal, inputs)
            self._judged.setdefault(r, set()).add(record["proposal"])
            book.update_checked(proposal, check)
            self._keep_verdict(r, proposal, check, time.monotonic() - started)
            await ctx.publish(
                verdict_key(ctx.network_id, r, record["proposal"]),
                make_record(
                    "verdict",
                    proposal=proposal.id,
                    claimed=float(check.claimed),
                    fitness=float(check.recomputed or 0.0),
                    reason=check.reason,
                ),
            )

    def _check(self, proposal: SearchProposal, inputs: _Inputs) -> ProposalCheck:
        try:
            return verify_proposal(
                proposal,
                inputs.recompute,
                candidates=inputs.candidates,
                dev_fingerprint=self.settings.dev_fingerprint,
            )
        except ProtocolError as exc:
            return ProposalCheck(proposal.id, proposal.fitness, None, str(exc))

    def _keep_verdict(self, r: int, proposal: SearchProposal, check: ProposalCheck, seconds: float) -> None:
        outcome = "verified" if check.ok else "refused"
        logger.info(
            "round %d: proposal %s of %s %s in %.2f s: claimed %.6f, recomputed %s%s",
            r,
            proposal.id[:16],
            proposal.peer_id[:16],
            outcome,
            seconds,
            check.claimed,
            "-" if check.recomputed is None else f"{check.recomputed:.6f}",
            f" ({check.reason})" if check.reason else "",
        )
        self.ctx.rounds.state.set(
            f"search/{r}/check/{proposal.id}",
            {
                "signer": proposal.signer,
                "claimed": check.claimed,
                "recomputed": check.recomputed,
                "reason": check.reason,
            },
        )
