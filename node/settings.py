"""A node's and a pull's user-facing settings with their defaults, and their checks.

Imports nothing heavy: the command line shows these defaults in its help at once.
"""

from __future__ import annotations

import math

from node.errors import NodeError

POLL_SECONDS = 1.0  # between round steps of a node
FALLBACK_SECONDS = 120.0  # after a round settles, before a node also merges shards lacking a quorum
PULL_TIMEOUT = 120.0  # seconds a pull waits for an attested result
MADDRS_FILE_WAIT = 120.0  # seconds a node waits for its --initial-peers-file to appear
PENDING_SECONDS = 600.0  # longest a round waits for contributions announced as on their way (node.settle)
KEEP_ROUNDS = 2  # decided rounds a node keeps in its store (node.retention); older ones are deleted


def checked_fallback_seconds(value: object) -> float:
    """`value` as a fallback delay: a positive, finite number of seconds (NodeError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value < math.inf:
        raise NodeError(f"expected the fallback delay to be a positive number of seconds, got {value!r}")
    return float(value)
