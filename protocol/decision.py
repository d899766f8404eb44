"""Deciding a round's attested result: one verifier for sharded rounds, pure (no I/O).

What the node, `umm pull` and `umm status` apply to what they read on the network:

1. `ShardAttestations.verify` opens every attestation read for one shard once (signature, network,
   schema, time), keeps those of the right round and shard, and groups them by the result they
   name. Every later count, rank and quorum check works on these verified attestations, so each
   is verified once per read.
2. `wanted_results`: the result ids with at least `protocol.quorum.least_quorum` distinct attesters
   (the results worth fetching).
3. `decide_round`: for each shard count the attestations state, per shard and candidate set, the
   result with a quorum (`protocol.verify.check_quorum` under `protocol.quorum.quorum_for`) and the most
   signers (ties: the smallest id); a candidate set with such a result on every shard that fits
   the base's shard plan (`protocol.verify.round_check`) is a complete round. Of several, the one
   with the most signers wins (ties: the smallest fingerprint); `attested_rounds` lists them all in
   that order, for a reader that skips those it cannot verify (a node's own view, a pull's
   candidate check), so that a tie forged by other keys never hides the round it can verify.

`ShardAttestations.rank` is the order in which nodes follow results of one merge (most distinct
full attesters, then most attesters, then the smallest id): workers attest the first result of
their merge in it and spot checkers check in it, so attestations pile up on one id.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from typing import Any

from protocol.envelope import Signed
from protocol.errors import ProtocolError
from protocol.messages import Attestation, MergeResult, TensorEntry
from protocol.quorum import full_quorum, least_quorum, quorum_for
from protocol.verify import QuorumCheck, check_quorum, round_check, verify_message


@dataclasses.dataclass(frozen=True)
class ShardAttestations:
    """The verified attestations of one shard of one round, grouped by the result id they name."""

    shard: int
    by_result: Mapping[str, tuple[Signed, ...]]
    counts: frozenset[int]  # the shard counts the attestations state

    @classmethod
    def verify(
        cls,
        raws: Iterable[bytes],
        *,
        network_id: str,
        round_number: int,
        shard: int,
        now: int | None = None,
        opened: MutableMapping[bytes, Signed] | None = None,
    ) -> ShardAttestations:
        """Open each of `raws` once; keep the valid attestations of `round_number` and `shard`.

        `opened` remembers attestations already opened (by their bytes, for `network_id`): a reader
        that passes the same mapping on every read opens each attestation once, however often it
        reads it (a valid signature stays valid and a time once in the past stays there).
        """
        by_result: dict[str, list[Signed]] = {}
        counts: set[int] = set()
        seen: set[bytes] = set()
        for data in raws:
            if data in seen:
                continue
            seen.add(data)
            signed = opened.get(data) if opened is not None else None
            if signed is None:
                try:
                    signed = verify_message(data, Attestation, network_id=network_id, now=now)
                except ProtocolError:
                    continue
                if opened is not None:
                    opened[data] = signed
            att: Attestation = signed.message
            if (att.round, att.shard) != (round_number, shard):
                continue
            by_result.setdefault(att.result_id, []).append(signed)
            counts.add(att.shards)
        return cls(shard, {k: tuple(v) for k, v in by_result.items()}, frozenset(counts))

    def raw(self, result_id: str) -> list[bytes]:
        """The envelope bytes of the attestations naming `result_id`."""
        return [signed.raw for signed in self.by_result.get(result_id, ())]

    def attesters(self, result_id: str) -> tuple[frozenset[bytes], frozenset[bytes]]:
        """The distinct signers attesting `result_id`, and those of them that attest in full."""
        held = self.by_result.get(result_id, ())
        signers = frozenset(s.message.signer for s in held)
        full = frozenset(s.message.signer for s in held if s.message.kind == "full")
        return signers, full

    def rank(self, result_id: str) -> tuple[int, int, str]:
        """Smaller first: most distinct full attesters, then most attesters, then the smaller id."""
        signers, full = self.attesters(result_id)
        return -len(full), -len(signers), result_id

    def ranked(self) -> list[str]:
        """Result ids with at least one full attestation, in `rank` order (what spot checkers check)."""
        ranks = {result_id: self.rank(result_id) for result_id in self.by_result}
        return sorted((r for r, rank in ranks.items() if rank[0] < 0), key=ranks.__getitem__)

    def reaches(self, quorum: int) -> bool:
        """Whether some result holds `quorum` distinct attesters, `full_quorum(quorum)` of them full.

        Counts attesters only (the result itself is not checked): what a node needs to know whether
        a shard still lacks a quorum and a fallback merge may help.
        """
        for result_id in self.by_result:
            signers, full = self.attesters(result_id)
            if len(signers) >= quorum and len(full) >= full_quorum(quorum):
                return True
        return False

    def tally(self) -> str:
        """``<id prefix> <full>f+<sampled>s`` per attested result, for logs."""
        parts = []
        for result_id in sorted(self.by_result):
            signers, full = self.attesters(result_id)
            parts.append(f"{result_id[:8]} {len(full)}f+{len(signers) - len(full)}s")
        return ", ".join(parts) or "none"


def shard_counts(first: ShardAttestations, tensors: int) -> list[int]:
    """The shard counts shard 0's attestations state that a base of `tensors` tensors allows, sorted."""
    return sorted(c for c in first.counts if 1 <= c <= tensors)


def wanted_results(shards: Iterable[ShardAttestations], quorum_setting: int) -> set[str]:
    """Result ids attested by at least `least_quorum(quorum_setting)` distinct keys (worth fetching)."""
    least = least_quorum(quorum_setting)
    return {
        result_id
        for shard in shards
        for result_id in shard.by_result
        if len(shard.attesters(result_id)[0]) >= least
    }


@dataclasses.dataclass
class AttestedResult:
    """One shard's MergeResult with attestations from at least the quorum of distinct keys."""

    result: Signed
    attestations: list[bytes]
    signers: int


@dataclasses.dataclass
class AttestedRound:
    """A round's result: one attested MergeResult per shard, checked by `protocol.verify.round_check`."""

    shards: list[AttestedResult]
    fingerprint: str

    @property
    def round(self) -> int:
        return self.shards[0].result.message.round

    @property
    def signers(self) -> int:
        """The fewest distinct attesting keys of any shard."""
        return min(s.signers for s in self.shards)

    @property
    def candidates(self) -> tuple[str, ...]:
        return self.shards[0].result.message.candidates

    @property
    def tensors(self) -> tuple[TensorEntry, ...]:
        """Every shard's tensor entries, sorted by name (the whole merged model)."""
        return tuple(sorted((t for s in self.shards for t in s.result.message.tensors), key=lambda t: t.name))

    @property
    def chunk_size(self) -> int:
        return self.shards[0].result.message.chunk_size

    @property
    def contributions(self) -> tuple[str, ...]:
        """The contribution ids any shard's recipe admitted, sorted."""
        return tuple(sorted({c for s in self.shards for c in s.result.message.recipe.contributions}))


def decide_round(
    round_number: int,
    shards: Sequence[ShardAttestations],
    results: Mapping[str, bytes],
    **settings: Any,
) -> AttestedRound | None:
    """The first of `attested_rounds` (the most signers; ties: the smallest fingerprint), or None."""
    complete = attested_rounds(round_number, shards, results, **settings)
    return complete[0] if complete else None


def attested_rounds(
    round_number: int,
    shards: Sequence[ShardAttestations],
    results: Mapping[str, bytes],
    *,
    base_sizes: Sequence[tuple[str, int]],
    network_id: str,
    quorum_setting: int,
    allowed_signers: frozenset[bytes] | None = None,
    now: int | None = None,
) -> list[AttestedRound]:
    """The round's complete results, every shard with a quorum (step 3 of the module docstring),
    best first: the most signers, ties: the smallest fingerprint (one per candidate set and count).

    `shards[j]` holds shard j's attestations (as many shards as the largest count to consider);
    `results` maps result ids to the envelope bytes fetched (ids absent are skipped);
    `base_sizes` are the base's (tensor name, bytes); `quorum_setting` is the genesis quorum
    (`protocol.quorum.quorum_for`), `allowed_signers` its allowlist (None: open).
    """
    opened: dict[str, Signed | None] = {}

    def result_of(result_id: str) -> Signed | None:
        if result_id not in opened:
            opened[result_id] = None
            if result_id in results:
                with contextlib.suppress(ProtocolError):
                    opened[result_id] = verify_message(
                        results[result_id], MergeResult, network_id=network_id, now=now
                    )
        held = opened[result_id]
        return held if held is not None and held.id == result_id else None

    complete: list[AttestedRound] = []
    for count in shard_counts(shards[0], len(base_sizes)) if shards else []:
        if count > len(shards):
            continue
        per_shard: list[dict[tuple[str, ...], tuple[AttestedResult, QuorumCheck]]] = []
        for j, attestations in enumerate(shards[:count]):
            best: dict[tuple[str, ...], tuple[AttestedResult, QuorumCheck]] = {}
            for result_id in sorted(attestations.by_result):
                result = result_of(result_id)
                if result is None:
                    continue
                m: MergeResult = result.message
                if (m.round, m.shard, m.shards) != (round_number, j, count):
                    continue
                check = check_quorum(
                    result,
                    attestations.by_result[result_id],
                    quorum=quorum_for(quorum_setting, len(m.candidates)),
                    network_id=network_id,
                    allowed_signers=allowed_signers,
                    now=now,
                )
                held = best.get(m.candidates)
                if check.ok and (held is None or len(check.signers) > held[0].signers):
                    attested = AttestedResult(result, attestations.raw(result_id), len(check.signers))
                    best[m.candidates] = (attested, check)
            per_shard.append(best)
        for candidates in sorted(per_shard[0]):
            if not all(candidates in shard for shard in per_shard):
                continue
            chosen = [shard[candidates] for shard in per_shard]
            outcome = round_check(
                [attested.result for attested, _ in chosen],
                [check for _, check in chosen],
                base_sizes=base_sizes,
                quorum=quorum_for(quorum_setting, len(candidates)),
            )
            if outcome.ok:
                complete.append(AttestedRound([attested for attested, _ in chosen], outcome.fingerprint))
    return sorted(complete, key=lambda found: (-found.signers, found.fingerprint))
