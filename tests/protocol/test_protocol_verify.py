import pytest

from protocol.encoding import pack, unpack
from protocol.envelope import open_envelope, signing_input
from protocol.errors import (
    QuorumError,
    SignatureError,
)
from protocol.verify import check_quorum, verify_quorum


@pytest.fixture
def ids(f):
    return [f.identity(n) for n in (1, 2, 3, 4)]


def attested(f, ids, round_number=1, seed=0, signers=(1, 2, 3)):
    """A signed result by ids[0] and attestations by the given ids."""
    result, _ = f.result(ids[0], round_number=round_number, seed=seed)
    signed = f.sign(result, ids[0])
    atts = [f.sign(f.attestation(ids[i], signed), ids[i]).raw for i in signers]
    return signed, atts


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
