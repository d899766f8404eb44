"""The quorum rule: how many distinct attestations a shard result needs, and how many of them full.

One place for the rule every node, `umm pull` and `umm status` apply (pure, no imports beyond the
standard library):

- `quorum_for`: a genesis quorum ``q > 0`` is fixed; ``q = 0`` means a majority of the round's
  contributions, at least 2 — ``max(2, n // 2 + 1)``;
- `least_quorum`: the smallest quorum any round of a network can need (``quorum_for(q, 0)``), what a
  reader requires before it bothers to fetch a result;
- `full_quorum`: of those attestations, at least ``min(quorum, FULL_ATTESTATIONS)`` must be full
  (the attester merged the whole shard); the rest may be sampled (protocol.spotcheck).
"""

from __future__ import annotations

FULL_ATTESTATIONS = 2  # full attestations a shard needs (fewer only when the quorum is smaller)


def quorum_for(setting: int, contributions: int) -> int:
    """Attestations a result needs: the fixed quorum `setting`, or (0) a majority of the contributions."""
    if setting > 0:
        return setting
    return max(2, contributions // 2 + 1)


def least_quorum(setting: int) -> int:
    """The smallest quorum a network with genesis quorum `setting` can need in any round."""
    return quorum_for(setting, 0)


def full_quorum(quorum: int) -> int:
    """Full attestations a shard needs under `quorum`: ``min(quorum, FULL_ATTESTATIONS)``."""
    return min(quorum, FULL_ATTESTATIONS)
