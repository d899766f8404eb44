"""A node's data folder: where its keys, store and state live, and the node's Ed25519 identity.

| path               | what                                                     |
|--------------------|----------------------------------------------------------|
| `identity.key`     | the node's Ed25519 key (mode 0600; `load_or_create_identity`) |
| `dht_key.der`      | the RSA key of its owner-only DHT records (node.dht)     |
| `p2p_identity.key` | the libp2p identity (stable peer id)                     |
| `store/`           | content-addressed chunks (node.store)                    |
| `state.sqlite`     | genesis, rounds, own contributions and results (node.state, node.round_state) |
"""

from __future__ import annotations

from pathlib import Path

from node.errors import NodeError
from protocol.identity import Identity

STATE_FILE = "state.sqlite"
STORE_DIR = "store"


def identity_path(data_dir: Path) -> Path:
    return Path(data_dir) / "identity.key"


def load_or_create_identity(data_dir: str | Path) -> Identity:
    """The node's Ed25519 identity in ``<data_dir>/identity.key`` (created on first use, mode 0600)."""
    path = identity_path(Path(data_dir))
    if not path.exists():
        Identity.generate().save(path)
    return Identity.load(path)


def check_node_folder(data_dir: str | Path) -> Path:
    """`data_dir` if it is a node's data folder (it holds ``state.sqlite``); NodeError otherwise.

    Checked before anything opens the state, so a wrong path leaves nothing behind.
    """
    path = Path(data_dir)
    if not (path / STATE_FILE).is_file():
        raise NodeError(f"expected a node data folder with a network genesis at {path}, got none")
    return path
