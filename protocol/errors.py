"""The protocol's error family: every decode or verification failure raises a `ProtocolError`.

Each subclass carries a short machine-readable `reason` (the node answers peers with it) and a
one-sentence message naming what is wrong ("expected X, got Y").
"""

from __future__ import annotations

from merging.errors import UmmError


class ProtocolError(UmmError):
    """Bytes or a message from a peer (or a key file) failed to decode or verify."""

    reason = "protocol"


class MalformedError(ProtocolError):
    """The bytes are not canonical msgpack of the expected shape."""

    reason = "malformed"


class SchemaError(ProtocolError):
    """A field is missing, unknown, of the wrong type or out of range."""

    reason = "schema"


class OversizeError(ProtocolError):
    """A message, chunk or tensor is larger than its type allows."""

    reason = "oversize"


class VersionError(ProtocolError):
    """The schema version is not one this code understands."""

    reason = "version"


class SignatureError(ProtocolError):
    """A signature does not verify under the stated key."""

    reason = "signature"


class NetworkMismatchError(ProtocolError):
    """The message belongs to another network."""

    reason = "network"


class HashMismatchError(ProtocolError):
    """Bytes do not hash to the address or fingerprint they were announced under."""

    reason = "hash"


class TensorMismatchError(ProtocolError):
    """A decoded tensor's shape, dtype or size is not what its manifest says."""

    reason = "tensor"


class NonFiniteValuesError(ProtocolError):
    """Decoded values contain NaN or Inf."""

    reason = "nonfinite"


class StaleRoundError(ProtocolError):
    """The message's round is older than the verifier's current round."""

    reason = "stale"


class RollbackError(ProtocolError):
    """The message would replace a newer one the verifier already holds."""

    reason = "rollback"


class FutureTimeError(ProtocolError):
    """The message's time is further in the future than the allowed clock skew."""

    reason = "future"


class QuorumError(ProtocolError):
    """Fewer distinct valid attestations than the quorum requires."""

    reason = "quorum"


class KeyFileError(ProtocolError):
    """A key file is missing, unreadable, malformed or readable by others."""

    reason = "keyfile"


class CodecError(ProtocolError):
    """A tensor cannot be encoded or decoded with the requested codec."""

    reason = "codec"


class UnknownSignerError(ProtocolError):
    """The signer is not on the network's allowlist, or sent data before its expert card."""

    reason = "unknown-signer"


class ModelFolderError(ProtocolError):
    """A local model folder cannot be fingerprinted (missing or malformed files)."""

    reason = "model-folder"


class RecipeError(ProtocolError):
    """A merge recipe cannot be carried out (bad method or parameters, inputs that do not fit)."""

    reason = "recipe"
