"""Fused contributions in a round: held back until checked, then counted or refused (node.fusion_check)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import torch
from node_messages import signed_contribution, unit_genesis

from node.errors import FetchError
from node.fusion_check import FETCH_TRIES, FusionChecks, FusionVerdict
from node.records import fusion_key, parse_record
from node.rounds import Contribution
from protocol.identity import Identity

SUMMARY = "5a" * 32
NOW = int(time.time())
GENESIS = unit_genesis(chunk_size=4096, now=NOW, probe_set_fingerprint="9e" * 32)
BASE = {"w": torch.zeros(4, 4)}


def _contribution(seed: int, fused_from: tuple[str, ...] = ()) -> Contribution:
    who = Identity.from_seed(bytes([seed]) * 32)
    card, manifest, _ = signed_contribution(
        who, GENESIS, BASE, chunk_size=4096, now=NOW, seed=seed, fused_from=fused_from
    )
    return Contribution(card, manifest)


class Checks(FusionChecks):
    """The checks with `_measure` answering from a script: a verdict, or an exception to raise."""

    def __init__(self, answers: list, own_seed: int = 99) -> None:
        self.published: dict[str, bytes] = {}
        self.own_refusals: dict[str, str] = {}

        async def publish(key: str, value: bytes) -> None:
            self.published[key] = value

        ctx = SimpleNamespace(
            network_id=GENESIS.network_id,
            publish=publish,
            identity=Identity.from_seed(bytes([own_seed]) * 32),
            rounds=SimpleNamespace(set_fused_refusal=self.own_refusals.__setitem__),
        )
        super().__init__(ctx, None)
        self.answers = answers
        self.measured = 0

    async def _measure(self, c: Contribution) -> FusionVerdict:
        self.measured += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


async def _filter_until_settled(checks: Checks, contributions: list[Contribution], polls: int = 20):
    for _ in range(polls):
        kept, checking = await checks.filter(0, contributions)
        await asyncio.sleep(0)  # the background checks run between polls
        if not checking:
            return kept, checking
    return kept, checking


def test_a_fused_contribution_counts_only_once_checked_and_its_signer_waits_meanwhile():
    plain, fused = _contribution(1), _contribution(2, (SUMMARY,))
    checks = Checks([FusionVerdict(2.0, 1.0, "")])

    async def run():
        first = await checks.filter(0, [plain, fused])
        settled = await _filter_until_settled(checks, [plain, fused])
        return first, settled

    (kept, checking), (settled, still) = asyncio.run(run())
    assert [c.id for c in kept] == [plain.id] and checking == {fused.signer}
    assert {c.id for c in settled} == {plain.id, fused.id} and still == set()
    record = parse_record("fusion", checks.published[fusion_key(GENESIS.network_id, 0, fused.id)])
    assert record == {"contribution": fused.id, "pivot": 2.0, "fused": 1.0, "reason": ""}
    assert checks.measured == 1  # one check per contribution, however many polls


def test_a_refused_fused_contribution_is_left_out_and_not_waited_for():
    fused = _contribution(3, (SUMMARY,))
    checks = Checks([FusionVerdict(2.0, 1.99, "held-out cross-entropy 1.9900 is not at most 0.95 x ...")])
    kept, checking = asyncio.run(_filter_until_settled(checks, [fused]))
    assert kept == [] and checking == set()
    assert checks.own_refusals == {}  # another node's contribution
    record = parse_record("fusion", checks.published[fusion_key(GENESIS.network_id, 0, fused.id)])
    assert record["reason"].startswith("held-out cross-entropy 1.9900")


def test_summaries_that_stay_unreachable_refuse_the_contribution_after_the_last_try():
    fused = _contribution(4, (SUMMARY,))
    checks = Checks([FetchError("no holder answered", (SUMMARY,))] * FETCH_TRIES)
    kept, checking = asyncio.run(_filter_until_settled(checks, [fused], polls=4 * FETCH_TRIES))
    assert kept == [] and checking == set() and checks.measured == FETCH_TRIES
    assert checks.verdicts[fused.id].reason.startswith("its summaries or delta could not be fetched")


def test_a_node_remembers_that_its_own_fused_contribution_was_refused():
    own = _contribution(5, (SUMMARY,))
    checks = Checks(
        [FusionVerdict(2.0, 2.5, "held-out cross-entropy 2.5000 is not at most 0.95 x ...")], own_seed=5
    )
    asyncio.run(_filter_until_settled(checks, [own]))
    assert checks.own_refusals == {own.id: "held-out cross-entropy 2.5000 is not at most 0.95 x ..."}
