"""Verification rules: pure functions, each in a raising form and a result-object form.

- `verify_message` (raises) / `check_message` (returns `Verification`): one signed envelope;
- `verify_quorum` (raises) / `check_quorum` (returns `QuorumCheck`): attestations of a result;
- `verify_round_quorum` (raises) / `check_round_quorum` (returns `RoundCheck`): a sharded round's
  shard results, each with a quorum of attestations, fitting the shard plan (`round_check` combines
  quorum checks already made);
- chunk checks live in protocol.chunks (`verify_chunk` / `check_chunk`).

The quorum rule itself is protocol.quorum; deciding which round result holds, from what a reader
found on the network, is protocol.decision (what the node, `umm pull` and `umm status` apply).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from protocol.envelope import DEFAULT_MAX_CLOCK_SKEW, Signed, open_envelope
from protocol.errors import ProtocolError, QuorumError, SchemaError, UnknownSignerError
from protocol.messages import Attestation, MergeResult, SignedMessage
from protocol.quorum import full_quorum
from protocol.shards import assembled_fingerprint, plan_shards
from protocol.spotcheck import check_attestation_claim

verify_message = open_envelope  # the raising form: verify one envelope, see `open_envelope`


@dataclass(frozen=True)
class Verification:
    """Outcome of `check_message`: ``ok``, and otherwise the error's ``reason`` and sentence."""

    ok: bool
    signed: Signed | None = None
    reason: str | None = None
    detail: str | None = None


def check_message(
    data: bytes,
    expected: type[SignedMessage] | None = None,
    *,
    network_id: str,
    now: int | None = None,
    max_clock_skew: int = DEFAULT_MAX_CLOCK_SKEW,
) -> Verification:
    """The non-raising form of `verify_message`."""
    try:
        signed = verify_message(data, expected, network_id=network_id, now=now, max_clock_skew=max_clock_skew)
    except ProtocolError as exc:
        return Verification(ok=False, reason=exc.reason, detail=str(exc))
    return Verification(ok=True, signed=signed)


@dataclass(frozen=True)
class QuorumCheck:
    """Outcome of `check_quorum`: the distinct valid signers (and those of them that attest in full),
    the rejected attestations and why."""

    ok: bool
    quorum: int
    signers: frozenset[bytes]
    rejected: tuple[tuple[int, str], ...]
    full_signers: frozenset[bytes] = frozenset()
    full_quorum: int = 0

    @property
    def missing(self) -> int:
        """How many more distinct valid attestations (full ones, where those fall short) are needed."""
        return max(0, self.quorum - len(self.signers), self.full_quorum - len(self.full_signers))

    @property
    def problem(self) -> str:
        """Why the quorum is not met (empty when it is)."""
        if len(self.full_signers) < self.full_quorum:
            return (
                f"expected full attestations from at least {self.full_quorum} distinct signers, "
                f"got {len(self.full_signers)}"
            )
        if len(self.signers) < self.quorum:
            got = len(self.signers)
            return f"expected attestations from at least {self.quorum} distinct signers, got {got}"
        return ""


def check_quorum(
    result: Signed,
    attestations: Iterable[bytes | Signed],
    *,
    quorum: int,
    network_id: str,
    allowed_signers: frozenset[bytes] | None = None,
    now: int | None = None,
    full: int | None = None,
) -> QuorumCheck:
    """Count distinct signers of valid attestations for `result` (a verified MergeResult).

    `attestations` are envelope bytes, or attestations already verified for this network (`Signed`,
    as protocol.decision holds them: their signature is not checked again). An attestation counts
    when it verifies, names this result's id, recipe id, round, shard and merged fingerprint, claims
    exactly what its kind checks (`check_attestation_claim`: all tensors for ``full``, the sample
    its proof selects for ``sampled``) and (with an allowlist) comes from an allowed signer. Each
    signer counts once. The quorum is met with at least `quorum` distinct signers of which at least
    `full` (default `full_quorum(quorum)`) attest in full.
    """
    if quorum < 1:
        raise RuntimeError("check_quorum: quorum must be at least 1")
    full_needed = full_quorum(quorum) if full is None else full
    message = result.message
    if not isinstance(message, MergeResult):
        raise RuntimeError("check_quorum: result must be a verified MergeResult")
    signers: set[bytes] = set()
    full_signers: set[bytes] = set()
    rejected: list[tuple[int, str]] = []
    for index, data in enumerate(attestations):
        try:
            att = _attestation(data, network_id, now)
            _check_attestation_matches(att, result)
            if allowed_signers is not None and att.signer not in allowed_signers:
                raise UnknownSignerError(f"expected an allowed signer, got {att.peer_id}")
            check_attestation_claim(att, message)
        except ProtocolError as exc:
            rejected.append((index, f"{exc.reason}: {exc}"))
            continue
        signers.add(att.signer)
        if att.kind == "full":
            full_signers.add(att.signer)
    ok = len(signers) >= quorum and len(full_signers) >= full_needed
    return QuorumCheck(ok, quorum, frozenset(signers), tuple(rejected), frozenset(full_signers), full_needed)


def verify_quorum(
    result: Signed,
    attestations: Iterable[bytes],
    *,
    quorum: int,
    network_id: str,
    allowed_signers: frozenset[bytes] | None = None,
    now: int | None = None,
) -> QuorumCheck:
    """The raising form of `check_quorum`: QuorumError when too few distinct valid signers attest
    (or too few of them in full)."""
    outcome = check_quorum(
        result, attestations, quorum=quorum, network_id=network_id, allowed_signers=allowed_signers, now=now
    )
    if not outcome.ok:
        raise QuorumError(outcome.problem)
    return outcome


def _attestation(data: bytes | Signed, network_id: str, now: int | None) -> Attestation:
    if not isinstance(data, Signed):
        return verify_message(data, Attestation, network_id=network_id, now=now).message
    att = data.message
    if not isinstance(att, Attestation) or att.network_id != network_id:
        raise SchemaError(f"expected a verified attestation of network {network_id}, got another message")
    return att


def _check_attestation_matches(att: Attestation, result: Signed) -> None:
    message: MergeResult = result.message
    if att.result_id != result.id:
        raise SchemaError(f"expected an attestation of result {result.id}, got one of {att.result_id}")
    if (att.recipe_id, att.round, att.merged_fingerprint, att.shard, att.shards) != (
        message.recipe.id,
        message.round,
        message.merged_fingerprint,
        message.shard,
        message.shards,
    ):
        raise SchemaError(
            "expected the attestation's recipe, round, fingerprint and shard to equal the result's"
        )


@dataclass(frozen=True)
class RoundCheck:
    """Outcome of `check_round_quorum`: one QuorumCheck per shard and the assembled fingerprint."""

    ok: bool
    shards: tuple[QuorumCheck, ...]
    fingerprint: str | None
    problem: str | None = None

    @property
    def signers(self) -> int:
        """The fewest distinct valid attesting keys of any shard (what the whole result can claim)."""
        return min((len(q.signers) for q in self.shards), default=0)


def check_round_quorum(
    results: Sequence[Signed],
    attestations: Sequence[Iterable[bytes]],
    *,
    base_sizes: Sequence[tuple[str, int]],
    quorum: int,
    network_id: str,
    allowed_signers: frozenset[bytes] | None = None,
    now: int | None = None,
) -> RoundCheck:
    """Check a sharded round result: `results[j]` is shard j, `attestations[j]` its attestations.

    The shards must be exactly 0..shards-1 of one round and one candidate set, shard j must hold
    exactly the tensors `plan_shards(base_sizes, shards)[j]`, and every shard needs attestations
    from at least `quorum` distinct valid signers (`check_quorum`). The assembled fingerprint is
    `assembled_fingerprint` of the shards (None when the shards do not fit together).
    """
    if len(results) != len(attestations):
        raise RuntimeError("check_round_quorum: one list of attestations per shard result is needed")
    problem = _shard_layout_problem([r.message for r in results], base_sizes)
    if problem is not None:
        return RoundCheck(False, (), None, problem)
    checks = [
        check_quorum(
            result,
            atts,
            quorum=quorum,
            network_id=network_id,
            allowed_signers=allowed_signers,
            now=now,
        )
        for result, atts in zip(results, attestations, strict=True)
    ]
    return round_check(results, checks, base_sizes=base_sizes, quorum=quorum)


def round_check(
    results: Sequence[Signed],
    checks: Sequence[QuorumCheck],
    *,
    base_sizes: Sequence[tuple[str, int]],
    quorum: int,
) -> RoundCheck:
    """`check_round_quorum` from quorum checks already made (`checks[j]`: `check_quorum` of shard j)."""
    if len(results) != len(checks):
        raise RuntimeError("round_check: one quorum check per shard result is needed")
    messages = [r.message for r in results]
    problem = _shard_layout_problem(messages, base_sizes)
    if problem is not None:
        return RoundCheck(False, (), None, problem)
    checks = tuple(checks)
    short = [j for j, check in enumerate(checks) if not check.ok]
    problem = ""
    if short:
        first = checks[short[0]]
        if len(first.signers) < quorum:
            problem = f"expected a quorum of {quorum} on every shard, got fewer on shard {short[0]}"
        else:
            full = first.full_quorum
            problem = f"expected {full} full attestations on every shard, got fewer on shard {short[0]}"
    return RoundCheck(not short, checks, assembled_fingerprint(messages), problem or None)


def _shard_layout_problem(messages: list, base_sizes: Sequence[tuple[str, int]]) -> str | None:
    if not messages or not all(isinstance(m, MergeResult) for m in messages):
        return "expected at least one verified MergeResult"
    first = messages[0]
    if len(messages) != first.shards:
        return f"expected {first.shards} shard results, got {len(messages)}"
    for index, m in enumerate(messages):
        if (m.shard, m.shards, m.round, m.candidates) != (index, first.shards, first.round, first.candidates):
            return f"expected shard {index} of {first.shards} for round {first.round} and one candidate set"
    names = [name for name, _ in base_sizes]
    if first.shards > len(names):
        return f"expected at most {len(names)} shards (one tensor each), got {first.shards}"
    plan = plan_shards(base_sizes, first.shards)
    for m, expected in zip(messages, plan, strict=True):
        if tuple(t.name for t in m.tensors) != expected:
            return f"expected shard {m.shard} to hold the planned tensors, got others"
    return None


def verify_round_quorum(
    results: Sequence[Signed],
    attestations: Sequence[Iterable[bytes]],
    *,
    base_sizes: Sequence[tuple[str, int]],
    quorum: int,
    network_id: str,
    allowed_signers: frozenset[bytes] | None = None,
    now: int | None = None,
) -> RoundCheck:
    """The raising form of `check_round_quorum`: SchemaError for a bad layout, QuorumError for a
    shard short of its quorum."""
    outcome = check_round_quorum(
        results,
        attestations,
        base_sizes=base_sizes,
        quorum=quorum,
        network_id=network_id,
        allowed_signers=allowed_signers,
        now=now,
    )
    if outcome.ok:
        return outcome
    if outcome.fingerprint is None:
        raise SchemaError(f"{outcome.problem}")
    raise QuorumError(f"{outcome.problem}")
