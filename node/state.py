"""A node's small durable state (genesis, current round, own contributions, latest result) in SQLite.

Values are canonical msgpack; every write is one transaction with `synchronous=FULL`, so a kill
leaves either the old or the new value. Several processes (the node and `umm contribute`) may
share one data folder.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from protocol.encoding import pack, unpack

MAX_STATE_VALUE = 64 << 20


class NodeState:
    """Key-value state under ``<data_dir>/state.sqlite``."""

    def __init__(self, data_dir: str | Path) -> None:
        path = Path(data_dir)
        path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            path / "state.sqlite", check_same_thread=False, isolation_level=None, timeout=60
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL)")

    def get(self, key: str, default: Any = None) -> Any:
        """The value stored under `key`, or `default`."""
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return default if row is None else unpack(row[0], max_size=MAX_STATE_VALUE)

    def set(self, key: str, value: Any) -> None:
        """Store `value` (anything canonical msgpack carries) under `key`."""
        data = pack(value)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, data))

    def delete(self, key: str) -> None:
        """Remove `key` (absent keys are ignored)."""
        with self._lock:
            self._db.execute("DELETE FROM kv WHERE key = ?", (key,))

    def keys(self, prefix: str = "") -> list[str]:
        """Keys starting with `prefix`, sorted."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key FROM kv WHERE substr(key, 1, ?) = ? ORDER BY key", (len(prefix), prefix)
            ).fetchall()
        return [row[0] for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> NodeState:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
