"""Searched-merge proposals: a searcher's signed claim that a recipe reaches a dev-set fitness, and
the rules a peer applies before adopting one.

After a round's contributions are decided, a searcher runs the merge search locally and signs a
`SearchProposal`: the recipe (method and mergekit-style parameters, the experts named by their
contribution ids), the candidate set it applies to, the fingerprint of the public dev set and the
fitness it claims there. A peer accepts it only after recomputing that fitness itself
(`verify_proposal`), in this order:

1. the proposal is for the round's decided candidate set and the genesis's dev set;
2. its recipe parameters name only those candidates;
3. the recomputed fitness is finite and at least the claim minus `FITNESS_TOLERANCE`.

The tolerance covers what may differ between honest machines: the fitness is a teacher-forced
score computed in float32 (summed in float64), whose last bits may move with the CPU's vector
width. Between 1 and 2 torch threads on one machine the bits were identical (docs/search.md);
across CPUs it is not measured yet, and 1e-4 of a fitness whose scale is a share of an expert's
gain (about 0..1) admits no meaningful inflation. The round's recipe is the best verified proposal
(`ProposalBook.best`): highest recomputed fitness, ties broken by the smaller proposal id. A
signer with one refused proposal has all of its proposals of the round ignored. This module
holds no I/O; recomputing the fitness is the caller's (a node's) job.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from protocol.encoding import pack, sha256_hex
from protocol.errors import ProtocolError, SchemaError
from protocol.messages import MiB, RoundMessage
from protocol.schema import field, hex64, integer, number, plain_value, sequence, text

FITNESS_TOLERANCE = 1e-4
MAX_CANDIDATES = 4096


class ProposalRefusedError(ProtocolError):
    """A proposal whose set, dev set or fitness does not hold up when recomputed."""

    reason = "proposal-refused"


@dataclass(frozen=True)
class SearchProposal(RoundMessage):
    """A searched recipe for one round's candidate set, with the dev fitness its signer claims.

    ``parameters`` is ``{"models": {contribution id: {parameter: setting}}, "global": {...}}``,
    settings as in a mergekit-style config (scalars, gradients or `{filter, value}` lists).
    """

    TYPE: ClassVar[str] = "search_proposal"
    MAX_SIZE: ClassVar[int] = 1 * MiB

    candidates: tuple[str, ...] = field(sequence(hex64, MAX_CANDIDATES, min_items=1, strictly_sorted=True))
    method: str = field(text(64, r"[a-z0-9_]+"))
    parameters: dict = field(plain_value())  # noqa: RUF009 (a dataclasses.field)
    dev_fingerprint: str = field(hex64)
    fitness: float = field(number(-1e9, 1e9))
    search_seed: int = field(integer(0, 2**63 - 1))

    def _validate(self) -> None:
        params = self.parameters
        if not isinstance(params, dict) or set(params) != {"models", "global"}:
            raise SchemaError("expected SearchProposal.parameters to be a map of 'models' and 'global'")
        if not isinstance(params["models"], dict) or not isinstance(params["global"], dict):
            raise SchemaError("expected SearchProposal.parameters 'models' and 'global' to be maps")
        strangers = sorted(set(params["models"]) - set(self.candidates))
        if strangers:
            raise SchemaError(
                f"expected parameters for the proposal's candidates only, got {str(strangers[0])[:80]!r}"
            )

    @property
    def id(self) -> str:
        """sha256 of the canonical bytes of the proposal's fields."""
        return sha256_hex(pack(self.to_dict()))


@dataclass(frozen=True)
class ProposalCheck:
    """The outcome of verifying one proposal; `reason` says why it was refused (empty if not)."""

    proposal_id: str
    claimed: float
    recomputed: float | None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason


def verify_proposal(
    proposal: SearchProposal,
    recompute: Callable[[SearchProposal], float],
    *,
    candidates: tuple[str, ...],
    dev_fingerprint: str,
    tolerance: float = FITNESS_TOLERANCE,
) -> ProposalCheck:
    """Check a proposal in the order of the module docstring; `recompute` is called last, only if
    the cheap checks pass."""

    def refused(reason: str, recomputed: float | None = None) -> ProposalCheck:
        return ProposalCheck(proposal.id, proposal.fitness, recomputed, reason)

    if proposal.candidates != tuple(sorted(candidates)):
        return refused("the proposal is for another candidate set than the round decided")
    if proposal.dev_fingerprint != dev_fingerprint:
        return refused(f"expected dev set {dev_fingerprint[:16]}, got {proposal.dev_fingerprint[:16]}")
    value = float(recompute(proposal))
    if not math.isfinite(value):
        return refused(f"the recomputed fitness is not finite ({value})", value)
    if value < proposal.fitness - tolerance:
        return refused(f"claimed fitness {proposal.fitness:.6f}, recomputed {value:.6f}", value)
    return ProposalCheck(proposal.id, proposal.fitness, value)


def require_verified(check: ProposalCheck) -> ProposalCheck:
    """`check`, or `ProposalRefusedError` with its reason."""
    if not check.ok:
        raise ProposalRefusedError(f"proposal {check.proposal_id[:16]} refused: {check.reason}")
    return check


class ProposalBook:
    """One round's proposals and their checks.

    Rules: `update_checked` records a verified proposal or a refusal; a refusal bans its signer for
    the round, which drops the signer's verified proposals too and ignores later ones. `best` is
    the verified proposal with the highest recomputed fitness, the smaller id among equals, or None.
    """

    def __init__(self, round_number: int) -> None:
        self.round = round_number
        self.verified: dict[str, tuple[SearchProposal, ProposalCheck]] = {}
        self.banned: set[bytes] = set()

    def accepts(self, proposal: SearchProposal) -> bool:
        """Whether a proposal is worth verifying: this round's, from a signer not banned, not seen."""
        return (
            proposal.round == self.round
            and proposal.signer not in self.banned
            and proposal.id not in self.verified
        )

    def update_checked(self, proposal: SearchProposal, check: ProposalCheck) -> None:
        if check.proposal_id != proposal.id:
            raise RuntimeError("the check belongs to another proposal")
        if not self.accepts(proposal):
            return
        if check.ok:
            self.verified[proposal.id] = (proposal, check)
            return
        self.banned.add(proposal.signer)
        self.verified = {pid: pc for pid, pc in self.verified.items() if pc[0].signer != proposal.signer}

    def best(self) -> SearchProposal | None:
        if not self.verified:
            return None

        def rank(item: tuple[str, tuple[SearchProposal, ProposalCheck]]) -> tuple[float, Any]:
            pid, (_, check) = item
            return (-(check.recomputed or 0.0), pid)

        return min(self.verified.items(), key=rank)[1][0]
