"""Contribution faults: the message's schema and envelope, and the one admission rule of a tensor."""

from __future__ import annotations

import pytest
import torch

from protocol.envelope import open_envelope, sign_message
from protocol.errors import NetworkMismatchError, NonFiniteValuesError, SchemaError, SignatureError
from protocol.faults import ContributionFault, tensor_faults, tensor_norm
from protocol.messages import SCHEMA_VERSION
from tests.protocol.conftest import NETWORK, NOW, identity

CID = "ab" * 32


def fault(**changes) -> ContributionFault:
    fields = dict(
        v=SCHEMA_VERSION,
        network_id=NETWORK,
        signer=identity(1).public_key,
        created_at=NOW,
        round=4,
        contribution=CID,
        tensor="model.layers.0.mlp.up_proj.weight",
        kind="undecodable",
    )
    fields.update(changes)
    return ContributionFault(**fields)


def test_a_fault_round_trips_through_its_dict_and_a_signed_envelope():
    message = fault(kind="outlier")
    assert ContributionFault.from_dict(message.to_dict()) == message
    signed = sign_message(message, identity(1))
    opened = open_envelope(signed.raw, ContributionFault, network_id=NETWORK, now=NOW)
    assert opened.message == message and opened.id == signed.id
    assert len(signed.raw) < 400  # a DHT record holds several (node.records.MAX_FAULTS_PER_RECORD)


def test_unknown_and_missing_fields_are_refused():
    fields = fault().to_dict()
    with pytest.raises(SchemaError, match="unknown"):
        ContributionFault.from_dict({**fields, "detail": "trust me"})
    del fields["tensor"]
    with pytest.raises(SchemaError, match="tensor"):
        ContributionFault.from_dict(fields)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"kind": "slow"}, "kind"),
        ({"kind": ""}, "kind"),
        ({"contribution": "AB" * 32}, "contribution"),
        ({"contribution": "ab" * 31}, "contribution"),
        ({"tensor": "bad name with spaces"}, "tensor"),
        ({"tensor": "x" * 513}, "tensor"),
        ({"round": -1}, "round"),
        ({"signer": b"\x01" * 31}, "signer"),
    ],
)
def test_bad_values_are_refused(change, match):
    with pytest.raises(SchemaError, match=match):
        ContributionFault.from_dict({**fault().to_dict(), **change})


def test_a_fault_for_another_network_or_with_another_contribution_does_not_open():
    signed = sign_message(fault(), identity(1))
    with pytest.raises(NetworkMismatchError):
        open_envelope(signed.raw, ContributionFault, network_id="othernet", now=NOW)
    with pytest.raises(RuntimeError):
        sign_message(fault(), identity(2))  # the signer field names key 1
    tampered = signed.raw.replace(CID.encode(), ("cd" * 32).encode())
    assert tampered != signed.raw
    with pytest.raises(SignatureError):
        open_envelope(tampered, ContributionFault, network_id=NETWORK, now=NOW)


def _deltas(norms: dict[str, float]) -> dict[str, torch.Tensor]:
    """One tensor per contribution whose L2 norm is exactly the given value ([3k, 4k] has norm 5k)."""
    return {cid: torch.tensor([3.0, 4.0]) * (n / 5.0) for cid, n in norms.items()}


def test_the_rule_flags_a_norm_above_factor_times_the_median():
    deltas = _deltas({"a": 1.0, "b": 1.2, "c": 0.9, "d": 3.7})  # median of the four: 1.1
    found = tensor_faults(3.0, "w", deltas, deltas.__getitem__)
    assert set(found) == {"d"} and found["d"].kind == "outlier"
    assert found["d"].detail == "expected w's delta norm <= 3 x median 1.1, got 3.7"
    at_limit = _deltas({"a": 5.0, "b": 5.0, "c": 15.0})  # exactly 3 x the median is not above it
    assert tensor_faults(3.0, "w", at_limit, at_limit.__getitem__) == {}


def test_the_rule_needs_three_decodable_contributions_and_a_nonzero_median():
    two = _deltas({"a": 1.0, "b": 100.0})
    assert tensor_faults(3.0, "w", two, two.__getitem__) == {}
    still = _deltas({"a": 0.0, "b": 0.0, "c": 5.0})  # the others left w unchanged: median 0
    assert tensor_faults(3.0, "w", still, still.__getitem__) == {}


def test_an_undecodable_delta_is_a_fault_and_is_not_compared():
    deltas = _deltas({"a": 1.0, "b": 1.0, "c": 10.0})

    def decode(cid: str) -> torch.Tensor:
        if cid == "b":
            raise NonFiniteValuesError("expected finite values, got NaN")
        return deltas[cid]

    found = tensor_faults(3.0, "w", deltas, decode)
    # b does not decode; a and c are only two decodable deltas: no norm comparison
    assert {cid: f.kind for cid, f in found.items()} == {"b": "undecodable"}
    assert found["b"].detail == "w: NonFiniteValuesError: expected finite values, got NaN"


def test_a_norm_that_overflows_is_undecodable_and_other_errors_are_the_callers():
    huge = {"a": torch.tensor([1.0]), "b": torch.tensor([1.0]), "c": torch.full((4,), 3e38)}
    assert tensor_norm(huge["c"]) == pytest.approx(6e38)  # float64 holds it
    inf = {**huge, "c": torch.tensor([float("inf")])}
    assert tensor_faults(3.0, "w", inf, inf.__getitem__)["c"].kind == "undecodable"

    def lost(cid: str) -> torch.Tensor:
        raise OSError("the store lost a chunk")

    with pytest.raises(OSError):
        tensor_faults(3.0, "w", huge, lost)


def test_the_rule_does_not_depend_on_the_order_contributions_are_given():
    deltas = _deltas({"a": 1.0, "b": 1.2, "c": 0.9, "d": 3.7, "e": 1.1})
    first = tensor_faults(3.0, "w", list(deltas), deltas.__getitem__)
    second = tensor_faults(3.0, "w", list(reversed(deltas)), deltas.__getitem__)
    assert first == second and set(first) == {"d"}
