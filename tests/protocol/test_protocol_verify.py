import pytest

from protocol.encoding import pack, unpack
from protocol.envelope import open_envelope, signing_input
from protocol.errors import (
    FutureTimeError,
    NetworkMismatchError,
    QuorumError,
    RollbackError,
    SchemaError,
    SignatureError,
    StaleRoundError,
    UnknownSignerError,
)
from protocol.verify import TrustedState, check_quorum, verify_quorum


@pytest.fixture
def ids(f):
    return [f.identity(n) for n in (1, 2, 3, 4)]


@pytest.fixture
def state(f):
    return TrustedState(network_id=f.NETWORK, current_round=1)


def attested(f, ids, round_number=1, seed=0, signers=(1, 2, 3)):
    """A signed result by ids[0] and attestations by the given ids."""
    result, _ = f.result(ids[0], round_number=round_number, seed=seed)
    signed = f.sign(result, ids[0])
    atts = [f.sign(f.attestation(ids[i], signed), ids[i]).raw for i in signers]
    return signed, atts


def test_card_replay_is_idempotent_and_rollback_refused(f, ids, state):
    old = f.sign(f.card(ids[0], created_at=f.NOW - 100), ids[0])
    new = f.sign(f.card(ids[0], created_at=f.NOW - 50, license="mit"), ids[0])
    state.update_card(old.raw, now=f.NOW)
    state.update_card(old.raw, now=f.NOW)  # replay of the same bytes: no change
    state.update_card(new.raw, now=f.NOW)
    with pytest.raises(RollbackError, match="newer than"):
        state.update_card(old.raw, now=f.NOW)
    conflicting = f.sign(f.card(ids[0], created_at=f.NOW - 50, license="bsd"), ids[0])
    with pytest.raises(RollbackError):
        state.update_card(conflicting.raw, now=f.NOW)
    assert state.cards[ids[0].public_key].raw == new.raw


def test_manifest_needs_card_and_current_round(f, ids, state):
    card = f.sign(f.card(ids[0]), ids[0])
    manifest = f.sign(f.manifest(ids[0], card.id)[0], ids[0])
    with pytest.raises(UnknownSignerError, match="expert card"):
        state.update_manifest(manifest.raw, now=f.NOW)
    state.update_card(card.raw, now=f.NOW)
    assert state.update_manifest(manifest.raw, now=f.NOW).message.round == 1
    wrong_card = f.sign(f.manifest(ids[0], "ee" * 32)[0], ids[0])
    with pytest.raises(SchemaError, match="card_id"):
        state.update_manifest(wrong_card.raw, now=f.NOW)


def test_stale_and_future_rounds(f, ids, state):
    card = f.sign(f.card(ids[0]), ids[0])
    state.update_card(card.raw, now=f.NOW)
    state.update_round(3)
    stale = f.sign(f.manifest(ids[0], card.id, round_number=2)[0], ids[0])
    with pytest.raises(StaleRoundError, match="stale round 2"):
        state.update_manifest(stale.raw, now=f.NOW)
    ahead = f.sign(f.manifest(ids[0], card.id, round_number=5)[0], ids[0])
    with pytest.raises(FutureTimeError, match="round <= 4"):
        state.update_manifest(ahead.raw, now=f.NOW)
    with pytest.raises(RollbackError):
        state.update_round(2)


def test_older_manifest_for_same_round_is_rollback(f, ids, state):
    card = f.sign(f.card(ids[0]), ids[0])
    state.update_card(card.raw, now=f.NOW)
    first = f.sign(f.manifest(ids[0], card.id, created_at=f.NOW - 50)[0], ids[0])
    second = f.sign(f.manifest(ids[0], card.id, seed=1, created_at=f.NOW - 40)[0], ids[0])
    state.update_manifest(second.raw, now=f.NOW)
    with pytest.raises(RollbackError):
        state.update_manifest(first.raw, now=f.NOW)


def test_far_future_time_and_other_network(f, ids, state):
    late = f.sign(f.card(ids[0], created_at=f.NOW + 3600), ids[0])
    with pytest.raises(FutureTimeError):
        state.update_card(late.raw, now=f.NOW)
    other = f.sign(f.card(ids[0], network_id="othernet"), ids[0])
    with pytest.raises(NetworkMismatchError):
        state.update_card(other.raw, now=f.NOW)


def test_allowlist(f, ids):
    state = TrustedState(network_id=f.NETWORK, allowed_signers=frozenset({ids[0].public_key}))
    state.update_card(f.sign(f.card(ids[0]), ids[0]).raw, now=f.NOW)
    with pytest.raises(UnknownSignerError, match="allowlist"):
        state.update_card(f.sign(f.card(ids[1]), ids[1]).raw, now=f.NOW)


def test_quorum_counts_distinct_valid_signers(f, ids):
    signed, atts = attested(f, ids, signers=(1, 2))
    duplicate = [*atts, atts[0], atts[0]]
    outcome = check_quorum(signed, duplicate, quorum=3, network_id=f.NETWORK)
    assert not outcome.ok and outcome.missing == 1 and len(outcome.signers) == 2
    with pytest.raises(QuorumError, match="at least 3 distinct signers, got 2"):
        verify_quorum(signed, duplicate, quorum=3, network_id=f.NETWORK)
    assert verify_quorum(signed, atts, quorum=2, network_id=f.NETWORK).signers == {
        ids[1].public_key,
        ids[2].public_key,
    }


def test_quorum_ignores_attestations_of_other_results_and_forgeries(f, ids):
    signed, atts = attested(f, ids, signers=(1,))
    _other, other_atts = attested(f, ids, seed=7, signers=(2, 3))
    wrong_fp = f.sign(f.attestation(ids[3], signed, merged_fingerprint="00" * 32), ids[3]).raw
    forged = f.sign(f.attestation(ids[2], signed), ids[2]).raw[:-3] + b"abc"
    outcome = check_quorum(
        signed, [*atts, *other_atts, wrong_fp, forged, b"junk"], quorum=2, network_id=f.NETWORK
    )
    assert not outcome.ok
    assert outcome.signers == {ids[1].public_key}
    assert [index for index, _ in outcome.rejected] == [1, 2, 3, 4, 5]
    assert outcome.rejected[0][1].startswith("schema: expected an attestation of result")


def test_result_quorum_rollback_and_conflict(f, ids, state):
    r1, atts1 = attested(f, ids, round_number=1)
    with pytest.raises(QuorumError):
        state.update_result(r1.raw, atts1[:1], quorum=2, now=f.NOW)
    assert state.latest_result is None
    state.update_result(r1.raw, atts1, quorum=2, now=f.NOW)
    assert state.update_result(r1.raw, [], quorum=2, now=f.NOW) is state.latest_result  # replay: no-op
    conflict, catts = attested(f, ids, round_number=1, seed=9)
    with pytest.raises(RollbackError, match="round after 1"):
        state.update_result(conflict.raw, catts, quorum=2, now=f.NOW)
    state.update_round(2)
    r2, atts2 = attested(f, ids, round_number=2)
    state.update_result(r2.raw, atts2, quorum=3, now=f.NOW)
    assert state.latest_result.message.round == 2
    with pytest.raises(StaleRoundError):
        state.update_result(r1.raw, atts1, quorum=2, now=f.NOW)


def test_result_rollback_within_allowed_window(f, ids):
    state = TrustedState(network_id=f.NETWORK, current_round=1, max_rounds_ahead=2)
    r2, atts2 = attested(f, ids, round_number=2)
    r1, atts1 = attested(f, ids, round_number=1)
    state.update_result(r2.raw, atts2, quorum=2, now=f.NOW)
    with pytest.raises(RollbackError):
        state.update_result(r1.raw, atts1, quorum=2, now=f.NOW)


def test_attestation_by_wrong_key(f, ids):
    signed, _ = attested(f, ids, signers=())
    att = f.sign(f.attestation(ids[1], signed), ids[1])
    fields = unpack(att.raw, max_size=1 << 16)
    # bob's attestation payload, signed with carol's key
    swapped = pack(
        {**fields, "signature": ids[2].sign(signing_input("attestation", f.NETWORK, fields["payload"]))}
    )
    with pytest.raises(SignatureError):
        open_envelope(swapped, network_id=f.NETWORK)
    assert not check_quorum(signed, [swapped], quorum=1, network_id=f.NETWORK).ok


def test_error_family_has_one_reason_per_failure():
    import protocol.errors as errors
    from merging.errors import UmmError

    family = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.ProtocolError)]
    assert issubclass(errors.ProtocolError, UmmError)
    reasons = [c.reason for c in family if c is not errors.ProtocolError]
    assert len(reasons) == len(set(reasons)) == len(family) - 1 >= 17


def test_check_chunk(f):
    from protocol.chunks import check_chunk, verify_chunk
    from protocol.encoding import sha256_hex
    from protocol.errors import OversizeError

    data = b"chunk"
    assert check_chunk(sha256_hex(data), data)
    assert not check_chunk(sha256_hex(data), data + b"!")
    assert not check_chunk(sha256_hex(data), data, max_size=4)
    with pytest.raises(OversizeError):
        verify_chunk(sha256_hex(data), data, max_size=4)
