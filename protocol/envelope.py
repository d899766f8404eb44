"""Signed envelopes: ``{v, type, payload, signature}`` in canonical msgpack.

``payload`` is the canonical msgpack of a message's fields, kept as the exact bytes that were
signed; the signature covers ``pack(["umm-signed-message-v1", type, network_id, payload])``, so a
signature is valid for one message type on one network only (domain separation). The signer's
public key is the payload's ``signer`` field, so an envelope is self-contained: it can be stored
under any DHT key and verified by anyone. A message's id is the sha256 of the envelope bytes
(Ed25519 signatures are deterministic and not malleable, so one message has one id).

`open_envelope` verifies and decodes the bytes received, never a re-encoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from protocol.encoding import pack, sha256_hex, unpack
from protocol.errors import (
    FutureTimeError,
    NetworkMismatchError,
    OversizeError,
    SchemaError,
    VersionError,
)
from protocol.faults import ContributionFault
from protocol.identity import SIGNATURE_SIZE, Identity, verify_signature
from protocol.messages import MESSAGE_TYPES, SCHEMA_VERSION, SignedMessage
from protocol.proposal import SearchProposal
from protocol.schema import Record, field, integer, raw_bytes, text

ENVELOPE_VERSION = 1
ENVELOPE_OVERHEAD = 256
SIGNING_DOMAIN = "umm-signed-message-v1"
DEFAULT_MAX_CLOCK_SKEW = 300
# every type an envelope may carry: the round's messages, searched-merge proposals and faults
ENVELOPE_TYPES = {
    **MESSAGE_TYPES,
    SearchProposal.TYPE: SearchProposal,
    ContributionFault.TYPE: ContributionFault,
}
MAX_ENVELOPE_SIZE = max(cls.MAX_SIZE for cls in ENVELOPE_TYPES.values()) + ENVELOPE_OVERHEAD

M = TypeVar("M", bound=SignedMessage)


def signing_input(message_type: str, network_id: str, payload: bytes) -> bytes:
    """The exact bytes a signature covers: domain, message type, network id and payload, framed."""
    return pack([SIGNING_DOMAIN, message_type, network_id, payload])


@dataclass(frozen=True)
class _EnvelopeFields(Record):
    v: int = field(integer(0, 2**32))
    type: str = field(text(64))
    payload: bytes = field(lambda name, value: _payload_bytes(name, value))
    signature: bytes = field(raw_bytes(SIGNATURE_SIZE))


def _payload_bytes(name: str, value: object) -> bytes:
    if type(value) is not bytes:
        raise SchemaError(f"expected {name} to be bytes, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Signed(Generic[M]):
    """A verified message with the exact envelope bytes it arrived in."""

    message: M
    raw: bytes

    @property
    def id(self) -> str:
        """sha256 of the envelope bytes: the message's content address."""
        return sha256_hex(self.raw)


def sign_message(message: SignedMessage, identity: Identity) -> Signed:
    """Encode and sign `message` with `identity` (whose public key must be the message's signer)."""
    if message.signer != identity.public_key:
        raise RuntimeError("sign_message: the message's signer field is not this identity's public key")
    payload = pack(message.to_dict())
    if len(payload) > message.MAX_SIZE:
        raise OversizeError(
            f"expected a {message.TYPE} of at most {message.MAX_SIZE} bytes, got {len(payload)}"
        )
    signature = identity.sign(signing_input(message.TYPE, message.network_id, payload))
    raw = pack({"v": ENVELOPE_VERSION, "type": message.TYPE, "payload": payload, "signature": signature})
    return Signed(message, raw)


def open_envelope(
    data: bytes,
    expected: type[M] | None = None,
    *,
    network_id: str,
    now: int | None = None,
    max_clock_skew: int = DEFAULT_MAX_CLOCK_SKEW,
) -> Signed[M]:
    """Verify and decode envelope bytes; raise a ProtocolError naming the first rule broken.

    Checks, in order: size, canonical msgpack, envelope fields, version, message type (and that it
    is `expected` if given), payload schema (unknown fields rejected), network id, signature over
    the received payload bytes, and, if `now` is given, ``created_at <= now + max_clock_skew``.
    """
    limit = expected.MAX_SIZE + ENVELOPE_OVERHEAD if expected else MAX_ENVELOPE_SIZE
    fields = _EnvelopeFields.from_dict(unpack(data, max_size=limit), where="envelope")
    if fields.v != ENVELOPE_VERSION:
        raise VersionError(f"expected envelope version {ENVELOPE_VERSION}, got {fields.v}")
    cls = ENVELOPE_TYPES.get(fields.type)
    if cls is None:
        raise SchemaError(f"expected a message type in {sorted(ENVELOPE_TYPES)}, got {fields.type[:64]!r}")
    if expected is not None and cls is not expected:
        raise SchemaError(f"expected a {expected.TYPE}, got a {cls.TYPE}")
    body = unpack(fields.payload, max_size=cls.MAX_SIZE)
    if isinstance(body, dict) and type(body.get("v")) is int and body["v"] != SCHEMA_VERSION:
        raise VersionError(f"expected {cls.TYPE} schema version {SCHEMA_VERSION}, got {body['v']}")
    message = cls.from_dict(body)
    if message.network_id != network_id:
        raise NetworkMismatchError(f"expected network {network_id!r}, got {message.network_id!r}")
    verify_signature(message.signer, fields.signature, signing_input(cls.TYPE, network_id, fields.payload))
    if now is not None and message.created_at > now + max_clock_skew:
        raise FutureTimeError(
            f"expected created_at at most {now + max_clock_skew} (now + {max_clock_skew} s), "
            f"got {message.created_at}"
        )
    return Signed(message, data)
