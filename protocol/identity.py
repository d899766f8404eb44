"""Ed25519 identities: key generation, private key files and printable peer ids.

A peer id is ``umm1`` followed by the lower-case, unpadded base32 of the 32-byte public key, so it
is printable, stable and can be turned back into the key that verifies the peer's signatures.
Private keys are stored as unencrypted PKCS#8 PEM with mode 0600; a key file that group or others
can read is refused.
"""

from __future__ import annotations

import base64
import os
import stat
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.errors import KeyFileError, SchemaError, SignatureError

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
PEER_ID_PREFIX = "umm1"


def peer_id_from_public_key(public_key: bytes) -> str:
    """The printable peer id of a 32-byte Ed25519 public key."""
    if type(public_key) is not bytes or len(public_key) != PUBLIC_KEY_SIZE:
        raise SchemaError(f"expected a {PUBLIC_KEY_SIZE}-byte public key, got {_describe(public_key)}")
    return PEER_ID_PREFIX + base64.b32encode(public_key).decode("ascii").rstrip("=").lower()


def public_key_from_peer_id(peer_id: str) -> bytes:
    """The 32-byte public key a peer id stands for; raise SchemaError for anything else."""
    if type(peer_id) is not str or not peer_id.startswith(PEER_ID_PREFIX):
        raise SchemaError(f"expected a peer id starting with {PEER_ID_PREFIX!r}, got {peer_id!r:.80}")
    body = peer_id[len(PEER_ID_PREFIX) :]
    try:
        key = base64.b32decode(body.upper() + "=" * (-len(body) % 8), casefold=False)
    except ValueError:
        raise SchemaError(f"expected base32 after {PEER_ID_PREFIX!r}, got {body!r:.80}") from None
    if len(key) != PUBLIC_KEY_SIZE or peer_id_from_public_key(key) != peer_id:
        raise SchemaError(f"expected a canonical peer id of a 32-byte key, got {peer_id!r:.80}")
    return key


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> None:
    """Raise SignatureError unless `signature` is a valid Ed25519 signature of `data` by `public_key`."""
    if type(signature) is not bytes or len(signature) != SIGNATURE_SIZE:
        raise SignatureError(f"expected a {SIGNATURE_SIZE}-byte signature, got {_describe(signature)}")
    if type(public_key) is not bytes or len(public_key) != PUBLIC_KEY_SIZE:
        raise SignatureError(f"expected a {PUBLIC_KEY_SIZE}-byte public key, got {_describe(public_key)}")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        raise SignatureError(
            f"expected a valid signature by {peer_id_from_public_key(public_key)}, got an invalid one"
        ) from None


class Identity:
    """An Ed25519 private key with its public key and peer id."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id: str = peer_id_from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """The identity whose 32-byte private key is `seed` (tests and reproducible demos)."""
        if type(seed) is not bytes or len(seed) != 32:
            raise SchemaError(f"expected a 32-byte seed, got {_describe(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `data`."""
        return self._key.sign(data)

    def save(self, path: str | Path) -> Path:
        """Write the private key to `path` (mode 0600, atomic); refuse to overwrite an existing file."""
        path = Path(path)
        if path.exists():
            raise KeyFileError(f"expected no file at {path}, got an existing one; choose another path")
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, path)  # fails instead of replacing a file created meanwhile
        finally:
            os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Identity:
        """Read a private key file written by `save`; refuse one readable by group or others."""
        path = Path(path)
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            raise KeyFileError(f"expected a readable key file at {path}, got {exc.strerror}") from None
        if not stat.S_ISREG(mode):
            raise KeyFileError(f"expected a regular key file at {path}, got another kind of file")
        if mode & 0o077:
            raise KeyFileError(
                f"expected key file {path} to be private (mode 0600), got mode {stat.S_IMODE(mode):04o}; "
                f"run `chmod 600 {path}`"
            )
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError, OSError) as exc:
            raise KeyFileError(f"expected an unencrypted PEM private key in {path}, got {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"expected an Ed25519 private key in {path}, got {type(key).__name__}")
        return cls(key)


def _describe(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        return f"{len(value)} bytes"
    return type(value).__name__
