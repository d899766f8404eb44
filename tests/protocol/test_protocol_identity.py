import os
import stat

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.cli import cli
from protocol.errors import KeyFileError, SchemaError, SignatureError
from protocol.identity import Identity, peer_id_from_public_key, public_key_from_peer_id, verify_signature

# RFC 8032, section 7.1, test 1
RFC_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


def test_rfc8032_vector():
    who = Identity.from_seed(RFC_SECRET)
    assert who.public_key == RFC_PUBLIC
    assert who.sign(b"") == RFC_SIGNATURE
    verify_signature(RFC_PUBLIC, RFC_SIGNATURE, b"")
    with pytest.raises(SignatureError):
        verify_signature(RFC_PUBLIC, RFC_SIGNATURE, b"x")
    with pytest.raises(SignatureError):
        verify_signature(RFC_PUBLIC, RFC_SIGNATURE[:-1], b"")


def test_peer_id_is_stable_printable_and_reversible():
    peer = peer_id_from_public_key(RFC_PUBLIC)
    assert peer == "umm1" + "25njqamcweflpvkl73j4szahhihoc4xt3ktcgjnpaingr5yhkena"
    assert peer.isascii() and peer.isprintable()
    assert public_key_from_peer_id(peer) == RFC_PUBLIC
    for bad in ("umm1" + "a" * 10, "xyz" + peer[3:], peer.upper(), peer + "a", 5):
        with pytest.raises(SchemaError):
            public_key_from_peer_id(bad)


def test_save_load_round_trip_with_private_mode(tmp_path):
    who = Identity.generate()
    path = who.save(tmp_path / "keys" / "id.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load(path).public_key == who.public_key
    with pytest.raises(KeyFileError, match="existing"):
        who.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["id.key"]  # no temp file left


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_load_refuses_group_or_world_readable(tmp_path, mode):
    path = Identity.generate().save(tmp_path / "id.key")
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match=f"got mode {mode:04o}; run `chmod 600"):
        Identity.load(path)


def test_load_rejects_missing_garbage_and_other_key_types(tmp_path):
    with pytest.raises(KeyFileError, match="expected a readable key file"):
        Identity.load(tmp_path / "none.key")
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"not a key")
    os.chmod(garbage, 0o600)
    with pytest.raises(KeyFileError, match="PEM"):
        Identity.load(garbage)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    other = tmp_path / "ec.key"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    os.chmod(other, 0o600)
    with pytest.raises(KeyFileError, match="Ed25519"):
        Identity.load(other)
    assert isinstance(Ed25519PrivateKey.generate(), Ed25519PrivateKey)


def test_keygen_cli(tmp_path):
    out = tmp_path / "node.key"
    result = CliRunner().invoke(cli, ["keygen", "--out", str(out)])
    assert result.exit_code == 0, result.output
    peer = Identity.load(out).peer_id
    assert result.output == f"peer id: {peer}\nkey file: {out} (mode 0600; keep it private)\n"
    again = CliRunner().invoke(cli, ["keygen", "--out", str(out)])
    assert again.exit_code == 2
    assert again.output.startswith(f"Error: expected no file at {out}, got an existing one")


def test_keygen_help_has_example():
    result = CliRunner().invoke(cli, ["keygen", "--help"])
    assert result.exit_code == 0
    assert "umm keygen --out node1.key" in result.output
