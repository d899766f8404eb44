import dataclasses

import pytest

from protocol.encoding import pack, sha256_hex, unpack
from protocol.envelope import open_envelope, signing_input
from protocol.errors import (
    FutureTimeError,
    MalformedError,
    NetworkMismatchError,
    OversizeError,
    ProtocolError,
    SchemaError,
    SignatureError,
    VersionError,
)
from protocol.messages import (
    Attestation,
    DeltaManifest,
    ExpertCard,
    MergeRecipe,
    MergeResult,
    derive_seed,
)
from protocol.verify import check_message, verify_message


def envelope(payload: dict, message_type: str, who, network: str = "testnet", v: int = 1) -> bytes:
    """Sign an arbitrary payload map the way an attacker with key `who` could."""
    body = pack(payload)
    signature = who.sign(signing_input(message_type, network, body))
    return pack({"v": v, "type": message_type, "payload": body, "signature": signature})


@pytest.fixture
def alice(f):
    return f.identity(1)


@pytest.fixture
def signed_messages(f, alice):
    card = f.sign(f.card(alice), alice)
    manifest, _ = f.manifest(alice, card.id)
    result, _ = f.result(alice)
    signed_result = f.sign(result, alice)
    att = f.sign(f.attestation(f.identity(2), signed_result), f.identity(2))
    return [card, f.sign(manifest, alice), signed_result, att]


def test_every_message_round_trips(f, signed_messages):
    for signed in signed_messages:
        opened = open_envelope(signed.raw, type(signed.message), network_id=f.NETWORK, now=f.NOW)
        assert opened.message == signed.message
        assert opened.id == sha256_hex(signed.raw) == signed.id
        assert type(signed.message).from_dict(signed.message.to_dict()) == signed.message
        # the payload is the canonical encoding of to_dict()
        assert (
            unpack(unpack(signed.raw, max_size=1 << 24)["payload"], max_size=1 << 24)
            == signed.message.to_dict()
        )


def test_unknown_missing_and_mistyped_fields_are_rejected(f, alice):
    good = f.card(alice).to_dict()
    for payload, match in [
        ({**good, "extra": 1}, "unknown field 'extra'"),
        ({k: v for k, v in good.items() if k != "license"}, "expected field 'license'"),
        ({**good, "created_at": "now"}, "ExpertCard.created_at to be an int"),
        ({**good, "created_at": True}, "ExpertCard.created_at to be an int"),
        ({**good, "signer": b"\x00" * 31}, "ExpertCard.signer to be 32 bytes"),
        ({**good, "domains": ["x"] * 33}, "ExpertCard.domains to be a list of 0..32 items"),
        ({**good, "network_id": "Test Net"}, "ExpertCard.network_id to match"),
    ]:
        with pytest.raises(SchemaError, match=match):
            open_envelope(envelope(payload, "expert_card", alice), network_id=f.NETWORK)


def test_versions(f, alice):
    good = f.card(alice).to_dict()
    for old in (2, 4):  # version 2 summaries carried no responses
        with pytest.raises(VersionError, match=f"schema version 3, got {old}"):
            open_envelope(envelope({**good, "v": old}, "expert_card", alice), network_id=f.NETWORK)
    with pytest.raises(VersionError, match="envelope version 1, got 2"):
        open_envelope(envelope(good, "expert_card", alice, v=2), network_id=f.NETWORK)


def test_other_network_is_rejected(f, alice):
    other = f.sign(f.card(alice, network_id="othernet"), alice)
    with pytest.raises(NetworkMismatchError, match="expected network 'testnet', got 'othernet'"):
        open_envelope(other.raw, network_id=f.NETWORK)
    # a testnet payload whose signature was made for another network's domain
    cross = envelope(f.card(alice).to_dict(), "expert_card", alice, network="othernet")
    with pytest.raises(SignatureError):
        open_envelope(cross, network_id=f.NETWORK)


def test_wrong_key_and_tampering_are_rejected(f, alice):
    bob = f.identity(2)
    forged = envelope(f.card(bob).to_dict(), "expert_card", alice)  # claims bob, signed by alice
    with pytest.raises(SignatureError):
        open_envelope(forged, network_id=f.NETWORK)
    good = f.sign(f.card(alice), alice)
    fields = unpack(good.raw, max_size=1 << 20)
    changed = f.card(alice, license="mit").to_dict()
    tampered = pack({**fields, "payload": pack(changed)})
    with pytest.raises(SignatureError):
        open_envelope(tampered, network_id=f.NETWORK)


def test_domain_separation_between_types(f, alice):
    good = f.sign(f.card(alice), alice)
    fields = unpack(good.raw, max_size=1 << 20)
    with pytest.raises(SchemaError):
        open_envelope(pack({**fields, "type": "attestation"}), network_id=f.NETWORK)
    with pytest.raises(SchemaError, match="expected a attestation, got a expert_card"):
        open_envelope(good.raw, Attestation, network_id=f.NETWORK)
    with pytest.raises(SchemaError, match="message type"):
        open_envelope(pack({**fields, "type": "nonsense"}), network_id=f.NETWORK)


def test_size_limits(f, alice, monkeypatch):
    big = envelope({**f.card(alice).to_dict(), "name": "x" * 20000}, "expert_card", alice)
    with pytest.raises(OversizeError):
        open_envelope(big, ExpertCard, network_id=f.NETWORK)
    with pytest.raises(OversizeError):
        open_envelope(
            big, network_id=f.NETWORK
        )  # any type: still bounded by the largest limit + payload limit
    monkeypatch.setattr(ExpertCard, "MAX_SIZE", 100)
    with pytest.raises(OversizeError, match="expected a expert_card of at most 100 bytes"):
        f.sign(f.card(alice), alice)


def test_future_time(f, alice):
    late = f.sign(f.card(alice, created_at=f.NOW + 301), alice)
    with pytest.raises(FutureTimeError, match=f"at most {f.NOW + 300}"):
        open_envelope(late.raw, network_id=f.NETWORK, now=f.NOW)
    assert open_envelope(late.raw, network_id=f.NETWORK, now=f.NOW + 1).message.created_at == f.NOW + 301


def test_check_message_result_form(f, alice):
    good = f.sign(f.card(alice), alice)
    ok = check_message(good.raw, network_id=f.NETWORK)
    assert ok.ok and ok.signed.message == good.message and ok.reason is None
    bad = check_message(good.raw[:-1], network_id=f.NETWORK)
    assert (bad.ok, bad.reason) == (False, "malformed")
    assert "expected" in bad.detail
    with pytest.raises(MalformedError):
        verify_message(good.raw[:-1], network_id=f.NETWORK)


def test_manifest_rules(f, alice):
    manifest, _ = f.manifest(alice, "cc" * 32)
    entry = manifest.tensors[0]
    with pytest.raises(SchemaError, match="total_bytes"):
        dataclasses.replace(manifest, total_bytes=manifest.total_bytes + 1)
    with pytest.raises(SchemaError, match="sorted by name"):
        dataclasses.replace(manifest, tensors=tuple(reversed(manifest.tensors)))
    with pytest.raises(SchemaError, match="chunks"):
        dataclasses.replace(manifest, tensors=(dataclasses.replace(entry, chunks=entry.chunks * 2),))
    raw = dataclasses.replace(entry.codec, name="raw", zstd=False, block_size=0)
    numel = entry.shape[0] * (entry.shape[1] if len(entry.shape) > 1 else 1)
    raw_entry = dataclasses.replace(entry, codec=raw, dtype="float32", nbytes=4 * numel, chunks=("ab" * 32,))
    with pytest.raises(SchemaError, match="delta codec"):
        dataclasses.replace(manifest, tensors=(raw_entry,), total_bytes=raw_entry.nbytes)
    with pytest.raises(SchemaError, match="nbytes"):
        dataclasses.replace(raw_entry, nbytes=4 * numel + 1)
    with pytest.raises(SchemaError, match="k > 0 exactly for topk"):
        dataclasses.replace(entry.codec, name="topk")
    with pytest.raises(SchemaError, match="dtype"):
        dataclasses.replace(entry, dtype="complex64")


def test_recipe_seed_and_order(f):
    recipe = f.recipe(contributions=("22" * 32, "11" * 32, "22" * 32))
    assert recipe.contributions == ("11" * 32, "22" * 32)
    fields = {k: v for k, v in recipe.to_dict().items() if k != "seed"}
    expected = int(sha256_hex(pack(["umm-seed-v1", fields]))[:16], 16) >> 1
    assert recipe.seed == expected == derive_seed(recipe.to_dict())
    with pytest.raises(SchemaError, match="seed"):
        dataclasses.replace(recipe, seed=recipe.seed + 1)
    with pytest.raises(SchemaError, match="sorted without duplicates"):
        MergeRecipe.from_dict({**recipe.to_dict(), "contributions": ["22" * 32, "11" * 32]})
    assert recipe.id == sha256_hex(recipe.to_bytes())
    assert MergeRecipe.from_dict(unpack(recipe.to_bytes(), max_size=MergeRecipe.MAX_SIZE)) == recipe


def test_result_fingerprint_and_round_bound_to_recipe(f, alice):
    result, _ = f.result(alice)
    with pytest.raises(SchemaError, match="merged_fingerprint"):
        dataclasses.replace(result, merged_fingerprint="00" * 32)
    with pytest.raises(SchemaError, match="round"):
        dataclasses.replace(result, round=result.round + 1)
    assert isinstance(result, MergeResult)


def test_every_failure_is_a_protocol_error(f, alice):
    good = f.sign(f.manifest(alice, "cc" * 32)[0], alice)
    for cut in range(0, len(good.raw), 97):
        with pytest.raises(ProtocolError):
            open_envelope(good.raw[:cut], DeltaManifest, network_id=f.NETWORK)


def test_a_card_with_fused_from_round_trips(f, alice):
    ids = ("0a" * 32, "1b" * 32)
    signed = f.sign(f.card(alice, fused_from=ids), alice)
    opened = open_envelope(signed.raw, ExpertCard, network_id=f.NETWORK, now=f.NOW)
    assert opened.message.fused_from == ids
    payload = unpack(unpack(signed.raw, max_size=1 << 24)["payload"], max_size=1 << 24)
    assert payload["fused_from"] == ["0a" * 32, "1b" * 32]
    assert f.card(alice).fused_from == () and f.card(alice).to_dict()["fused_from"] == []


@pytest.mark.parametrize(
    ("fused_from", "match"),
    [
        (["1b" * 32, "0a" * 32], "fused_from to be sorted without duplicates"),
        (["0a" * 32, "0a" * 32], "fused_from to be sorted without duplicates"),
        (["0A" * 32], r"fused_from\[0\] to be a lower-case hex sha256"),
        (["0a" * 31], r"fused_from\[0\] to be a lower-case hex sha256"),
        ([f"{i:064x}" for i in range(65)], r"fused_from to be a list of 0\.\.64 items"),
        ("0a" * 32, "fused_from to be a list"),
    ],
)
def test_a_card_with_bad_fused_from_is_refused(f, alice, fused_from, match):
    payload = {**f.card(alice).to_dict(), "fused_from": fused_from}
    with pytest.raises(SchemaError, match=match):
        open_envelope(envelope(payload, "expert_card", alice), network_id=f.NETWORK)


def test_a_card_without_fused_from_is_refused(f, alice):
    payload = {k: v for k, v in f.card(alice).to_dict().items() if k != "fused_from"}
    with pytest.raises(SchemaError, match="expected field 'fused_from'"):
        open_envelope(envelope(payload, "expert_card", alice), network_id=f.NETWORK)
