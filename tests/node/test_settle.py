"""The settle rule: contributions announced as on their way land in the round, within a bound."""

from __future__ import annotations

import pytest
from node_models import make_base, make_expert

from node.genesis import create_genesis
from node.records import make_record
from node.settle import SettleClock, pending_signers
from node.state import NodeState
from node.store import ContentStore
from protocol.identity import Identity

SETTLE = 2.0
PENDING = 600.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _first_settled(
    starts: dict[str, float], durations: dict[str, float], *, announce: bool, min_count: int = 2
):
    """Poll once a second the way a node does; (time, candidates) when the round first settles.

    Contributor c starts preparing at starts[c] (announced as pending when `announce`) and its
    contribution is in from starts[c] + durations[c]."""
    clock = FakeClock()
    settle = SettleClock(SETTLE, pending_seconds=PENDING, clock=clock)
    for second in range(0, 3000):
        clock.now = float(second)
        done = tuple(sorted(c for c in starts if starts[c] + durations[c] <= second))
        pending = {c.encode() for c in starts if starts[c] <= second < starts[c] + durations[c]}
        if len(done) < min_count:
            continue
        if settle.settled(0, done, pending if announce else set()) is not None:
            return second, done
    raise AssertionError("never settled")


# three SmolLM2-size contributions (43-67 s each on two cores) started within three minutes
STARTS = {"a": 0.0, "b": 90.0, "c": 150.0}
DURATIONS = {"a": 43.0, "b": 67.0, "c": 55.0}


def test_staggered_contributions_announced_early_land_in_one_round():
    second, done = _first_settled(STARTS, DURATIONS, announce=True)
    assert done == ("a", "b", "c")
    assert second == 150 + 55 + SETTLE  # quiet for settle_seconds after the last one arrived


def test_without_the_announcement_the_round_settles_before_the_last_one():
    second, done = _first_settled(STARTS, DURATIONS, announce=False)
    assert done == ("a", "b")
    assert second == 90 + 67 + SETTLE


def test_a_contribution_pending_forever_delays_the_round_by_at_most_the_bound():
    starts = {"a": 0.0, "b": 10.0, "stuck": 20.0}
    durations = {"a": 43.0, "b": 43.0, "stuck": 10_000.0}
    second, done = _first_settled(starts, durations, announce=True)
    quorate = 10 + 43  # the set first reached two contributions
    assert done == ("a", "b")
    # the last poll within the bound still restarts the quiet time; settle_seconds later it settles
    assert second == quorate + PENDING - 1 + SETTLE


def test_pending_records_count_only_fresh_allowed_signers_without_a_contribution():
    keys = [Identity.from_seed(bytes([n]) * 32).public_key for n in range(1, 7)]
    now = 10_000.0

    def record(signer: bytes, started: float) -> bytes:
        return make_record("pending", signer=signer, started=int(started), p2p="peer")

    values = [
        record(keys[0], now - 30),  # on its way
        record(keys[1], now - 30),  # already contributed
        record(keys[2], now - PENDING - 1),  # stale
        record(keys[3], now + 3600),  # in the future
        record(keys[4], now - 5),  # not a member
        b"\x81\xa1x\x01",  # not a pending record
    ]
    members = frozenset(keys[:4])
    assert pending_signers(values, {keys[1]}, now=now, members=members) == {keys[0]}
    assert pending_signers(values, {keys[1]}, now=now) == {keys[0], keys[4]}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("settle")
    make_base(root / "base", seed=51, hidden=16)
    make_expert(root / "base", root / "expert", seed=52)
    return root


def test_contribute_is_announced_while_it_prepares_and_cleared_after(models, tmp_path, monkeypatch):
    import node.contribute as contribute_module

    data = tmp_path / "n1"
    with ContentStore(data / "store") as store, NodeState(data) as state:
        _, record = create_genesis("settle", models / "base", Identity.from_seed(b"\x09" * 32), store)
        state.set("genesis", record)
    seen = []
    real = contribute_module.encode_deltas

    def watching(*args, **kwargs):
        with NodeState(data) as other:  # what the running node reads from the shared state
            seen.append(other.get("pending/0"))
        return real(*args, **kwargs)

    monkeypatch.setattr(contribute_module, "encode_deltas", watching)
    contribute_module.contribute(data, models / "expert")
    assert isinstance(seen[0], int) and seen[0] > 0
    with NodeState(data) as state:
        assert state.get("pending/0") is None
        assert state.get("contribution/0") is not None

    def failing(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(contribute_module, "encode_deltas", failing)
    with pytest.raises(RuntimeError):
        contribute_module.contribute(data, models / "expert", round_number=1)
    with NodeState(data) as state:
        assert state.get("pending/1") is None
