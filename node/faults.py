"""Global admission: a contribution that fails admission in one shard is excluded from every shard.

Admission's rule (`protocol.faults.tensor_faults`) looks at one tensor at a time, and a worker
sees only its shards' tensors. So a worker that finds a contribution undecodable (malformed bytes,
NaN/Inf) or an outlier in one of its tensors publishes a signed `ContributionFault` (contribution,
tensor, kind) under ``umm/<network id>/fault/<round>`` (node.records) and merges nothing that
poll; every node reads those records each poll and checks each claim itself before it counts
(`FaultBook.refresh`):

- ``undecodable``: it fetches the accused contribution's chunks of that one tensor and decodes
  them; the claim holds if they do not decode (a fact of those bytes alone);
- ``outlier``: it fetches that tensor of every *comparable* contribution — the round's candidates
  less those with a confirmed undecodable fault and those whose chunks this node gave up
  fetching — and applies the rule to them; the claim holds if the rule finds the accused an
  outlier there.

A confirmed fault removes the contribution from every shard's recipe on this node: its workers
merge without it, its spot checks refuse results that admit it, and it records no round that
admits it (node.round_machine). The plan (workers, shards, candidates) does not change. A claim
that does not hold is ignored and logged, and the signer's further claims in the round are not
checked while the comparable set stays the same, so a false claim costs a node at most one
tensor of each contribution per signer (and per change of that set).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from node.errors import FetchError, NodeError
from node.lookups import RecordReader
from node.records import MAX_FAULTS_PER_RECORD, fault_key, make_record, parse_record
from protocol.envelope import Signed, sign_message
from protocol.errors import ProtocolError
from protocol.faults import ContributionFault, TensorFault, tensor_faults
from protocol.messages import SCHEMA_VERSION
from protocol.verify import verify_message

if TYPE_CHECKING:
    from node.round_context import RoundContext
    from node.rounds import Contribution

logger = logging.getLogger("node.service")  # the round log keeps its name: log readers match it


@dataclasses.dataclass(frozen=True)
class ConfirmedFault:
    """A fault this node checked itself: the contribution, the tensor, the kind and why."""

    contribution: str
    tensor: str
    kind: str
    detail: str


@dataclasses.dataclass
class RoundFaults:
    """One round's fault claims and what this node established about them."""

    claims: dict[str, Signed] = dataclasses.field(default_factory=dict)  # envelope id -> claim
    undecodable: dict[str, ConfirmedFault] = dataclasses.field(default_factory=dict)  # by contribution
    decodable: set[tuple[str, str]] = dataclasses.field(default_factory=set)  # (contribution, tensor)
    findings: dict[tuple[str, tuple[str, ...]], dict[str, TensorFault]] = dataclasses.field(
        default_factory=dict
    )  # (tensor, comparable set) -> the rule's faults there
    refuted: set[str] = dataclasses.field(default_factory=set)  # claim ids that did not hold
    false_signers: set[tuple[bytes, tuple[str, ...]]] = dataclasses.field(default_factory=set)
    excluded: dict[str, ConfirmedFault] = dataclasses.field(default_factory=dict)
    reported: set[str] = dataclasses.field(default_factory=set)  # contributions this node claimed


class FaultBook:
    """Every round's fault claims on this node (the module docstring); in memory, rebuilt from the
    DHT records and this node's own faults (``faults/<r>`` in its round state) after a restart."""

    def __init__(self) -> None:
        self._rounds: dict[int, RoundFaults] = {}

    def round(self, r: int) -> RoundFaults:
        return self._rounds.setdefault(r, RoundFaults())

    def excluded(self, r: int) -> Mapping[str, ConfirmedFault]:
        """The contributions of round `r` that a confirmed fault excludes (as of the last refresh)."""
        held = self._rounds.get(r)
        return dict(held.excluded) if held is not None else {}

    def unreported(self, r: int, found: Iterable[str]) -> set[str]:
        """Of the contributions `found` failing this node's own admission, those it has neither
        claimed nor seen excluded (a claim of its own that did not hold here is not made again)."""
        book = self.round(r)
        return set(found) - set(book.excluded) - book.reported

    def forget_before(self, r: int) -> None:
        for old in [k for k in self._rounds if k < r]:
            del self._rounds[old]

    async def report(
        self,
        ctx: RoundContext,
        r: int,
        found: Mapping[str, tuple[str, TensorFault]],
        contributions: Sequence[Contribution],
        given_up: Iterable[str] = (),
    ) -> None:
        """Sign, keep and publish the faults this node's own admission `found` (contribution ->
        (tensor, fault)), those not excluded yet, and count them at once."""
        book = self.round(r)
        for cid, (tensor, fault) in sorted(found.items()):
            if cid in book.excluded or cid in book.reported:
                continue
            book.reported.add(cid)
            claim = sign_fault(ctx, r, cid, tensor, fault.kind)
            ctx.rounds.add_fault(r, claim.raw)
            book.claims[claim.id] = claim
            logger.warning("round %d: contribution %s fails admission: %s", r, cid[:8], fault.detail)
        await publish_faults(ctx, r)
        await self.refresh_claims(ctx, r, contributions, given_up)

    async def refresh(
        self,
        ctx: RoundContext,
        board: RecordReader,
        r: int,
        contributions: Sequence[Contribution],
        given_up: Iterable[str] = (),
    ) -> Mapping[str, ConfirmedFault]:
        """Read round `r`'s fault records, check the new claims and return the exclusions."""
        book = self.round(r)
        now = int(time.time())
        raws = list(ctx.rounds.faults(r))
        for value in (await board.aread(fault_key(ctx.network_id, r))).values():
            record = parse_record("fault", value)
            if record is not None:
                raws += record["faults"]
        for raw in raws:
            try:
                claim = verify_message(raw, ContributionFault, network_id=ctx.network_id, now=now)
            except ProtocolError:
                continue
            if claim.message.round == r:
                book.claims.setdefault(claim.id, claim)
        return await self.refresh_claims(ctx, r, contributions, given_up)

    async def refresh_claims(
        self, ctx: RoundContext, r: int, contributions: Sequence[Contribution], given_up: Iterable[str] = ()
    ) -> Mapping[str, ConfirmedFault]:
        """Check the round's claims against `contributions` (the candidates) and recompute the
        exclusions; a claim whose inputs are not all here yet is checked again next time."""
        book = self.round(r)
        by_id = {c.id: c for c in contributions}
        given_up = set(given_up)
        while True:  # again while the pass confirms undecodable ones: the outlier rule compares the rest
            confirmed = len(book.undecodable)
            for claim in sorted(book.claims.values(), key=_check_order):
                await self._check_claim(ctx, r, book, claim, by_id, given_up)
            if len(book.undecodable) == confirmed:
                break
        comparable = self._comparable(book, by_id, given_up)
        excluded = {cid: f for cid, f in book.undecodable.items() if cid in by_id}
        for claim in book.claims.values():
            m = claim.message
            if m.kind != "outlier" or m.contribution not in comparable or m.contribution in excluded:
                continue
            fault = book.findings.get((m.tensor, comparable), {}).get(m.contribution)
            if fault is not None and fault.kind == "outlier":
                excluded[m.contribution] = ConfirmedFault(m.contribution, m.tensor, "outlier", fault.detail)
        for cid in sorted(set(excluded) - set(book.excluded)):
            f = excluded[cid]
            logger.info("round %d: contribution %s excluded from every shard: %s", r, cid[:8], f.detail)
        book.excluded = excluded
        return dict(excluded)

    async def _check_claim(
        self,
        ctx: RoundContext,
        r: int,
        book: RoundFaults,
        claim: Signed,
        by_id: Mapping[str, Contribution],
        given_up: set[str],
    ) -> None:
        """Check one claim (unless it was refuted, names no candidate, or its signer's claims are
        not heard); a claim that does not hold is refuted and its signer not heard again."""
        m: ContributionFault = claim.message
        if m.contribution not in by_id or claim.id in book.refuted:
            return
        comparable = self._comparable(book, by_id, given_up)
        if (m.signer, comparable) in book.false_signers:
            return
        if await self._check(ctx, r, book, m, by_id, comparable) is False:
            book.refuted.add(claim.id)
            book.false_signers.add((m.signer, comparable))
            logger.warning(
                "round %d: ignoring %s's fault claim against %s (%s in %s): it does not hold here",
                r,
                m.peer_id[:16],
                m.contribution[:8],
                m.kind,
                m.tensor,
            )

    @staticmethod
    def _comparable(
        book: RoundFaults, by_id: Mapping[str, Contribution], given_up: set[str]
    ) -> tuple[str, ...]:
        return tuple(sorted(set(by_id) - set(book.undecodable) - given_up))

    async def _check(
        self,
        ctx: RoundContext,
        r: int,
        book: RoundFaults,
        m: ContributionFault,
        by_id: Mapping[str, Contribution],
        comparable: tuple[str, ...],
    ) -> bool | None:
        """Whether claim `m` holds (None: its inputs are not all here yet)."""
        if m.tensor not in {t.name for t in by_id[m.contribution].manifest.message.tensors}:
            return False
        if m.kind == "undecodable":
            if m.contribution in book.undecodable:
                return True
            if (m.contribution, m.tensor) in book.decodable:
                return False
            findings = await self._findings(ctx, m.tensor, (m.contribution,), by_id)
            if findings is None:
                return None
            if m.contribution not in findings:
                book.decodable.add((m.contribution, m.tensor))
                return False
            fault = findings[m.contribution]
            book.undecodable[m.contribution] = ConfirmedFault(
                m.contribution, m.tensor, fault.kind, fault.detail
            )
            return True
        if m.contribution not in comparable:
            return None  # excluded as undecodable anyway, or its chunks were given up on
        findings = book.findings.get((m.tensor, comparable))
        if findings is None:
            findings = await self._findings(ctx, m.tensor, comparable, by_id)
            if findings is None:
                return None
            found = {cid: f for cid, f in findings.items() if f.kind == "undecodable"}
            if found:  # comparable contributions that do not decode: this node's own finding
                claimed = {
                    c.message.contribution for c in book.claims.values() if c.message.kind == "undecodable"
                }
                for cid, fault in found.items():
                    book.undecodable[cid] = ConfirmedFault(cid, m.tensor, fault.kind, fault.detail)
                    if cid in claimed:
                        continue
                    claim = sign_fault(ctx, r, cid, m.tensor, fault.kind)
                    ctx.rounds.add_fault(r, claim.raw)
                    book.claims[claim.id] = claim
                await publish_faults(ctx, r)
                return None  # compared again without them
            book.findings[(m.tensor, comparable)] = findings
        fault = findings.get(m.contribution)
        return fault is not None and fault.kind == "outlier"

    async def _findings(
        self, ctx: RoundContext, tensor: str, members: tuple[str, ...], by_id: Mapping[str, Contribution]
    ) -> dict[str, TensorFault] | None:
        """The rule's faults of `tensor` among `members`, from their chunks (fetched here; None if
        some are still missing or our store lost one)."""
        entries = [
            next(t for t in by_id[cid].manifest.message.tensors if t.name == tensor) for cid in members
        ]
        digests = sorted({d for entry in entries for d in entry.chunks})
        with contextlib.suppress(FetchError):
            await ctx.fetch(ctx.store.missing(digests), [], attempts=1)
        if ctx.store.missing(digests):
            return None
        try:
            return tensor_faults(
                ctx.genesis.outlier_factor,
                tensor,
                members,
                lambda cid: ctx.decode(by_id[cid], (tensor,))[tensor],
            )
        except NodeError as exc:  # our own store lost a chunk: it is fetched again next time
            logger.warning("fault check of %s: store fault: %s", tensor, exc)
            return None


def _check_order(claim: Signed) -> tuple:
    """Undecodable claims first (they decide which contributions the outlier rule compares),
    then the oldest."""
    m: ContributionFault = claim.message
    return (m.kind != "undecodable", m.created_at, claim.id)


def sign_fault(ctx: RoundContext, r: int, contribution: str, tensor: str, kind: str) -> Signed:
    """This node's signed `ContributionFault`."""
    return sign_message(
        ContributionFault(
            v=SCHEMA_VERSION,
            network_id=ctx.network_id,
            signer=ctx.identity.public_key,
            created_at=int(time.time()),
            round=r,
            contribution=contribution,
            tensor=tensor,
            kind=kind,
        ),
        ctx.identity,
    )


async def publish_faults(ctx: RoundContext, r: int) -> None:
    """Publish this node's fault record of round `r` (its first `MAX_FAULTS_PER_RECORD` faults, one
    per contribution), if it found any."""
    chosen: dict[str, bytes] = {}
    for raw in ctx.rounds.faults(r):
        with contextlib.suppress(ProtocolError):
            claim = verify_message(raw, ContributionFault, network_id=ctx.network_id)
            chosen.setdefault(claim.message.contribution, raw)
    if chosen:
        faults = list(chosen.values())[:MAX_FAULTS_PER_RECORD]
        await ctx.publish(fault_key(ctx.network_id, r), make_record("fault", faults=faults))
