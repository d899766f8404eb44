"""When a round's set of contributions counts as settled: quiet for ``settle_seconds``, and no
announced contribution still on its way.

A contribution takes a while to prepare (about a minute per SmolLM2-size expert on two cores), so
`umm contribute` announces itself when it starts: the node beside it publishes a ``pending``
record (node.records) for the round until the contribution is stored. Every node then treats a
round's candidates as settled only when

1. at least ``min_contributions`` are in, the set has not changed for ``settle_seconds``, and
2. no allowed signer without a contribution in the set has a pending record started within the
   last `PENDING_SECONDS` — but a round waits for pending contributions at most
   `PENDING_SECONDS` after its set first reached ``min_contributions``, so pending records
   (even forged ones from many keys) can delay a round by at most that long.

So contributions started before a round settles land in it, however long each takes (within
`PENDING_SECONDS`). Only when a node starts merging depends on this; what a round merges is still
its candidates once every node sees them settled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from node.records import parse_record
from node.settings import PENDING_SECONDS


def pending_signers(
    values: Iterable[bytes],
    contributed: set[bytes],
    *,
    now: float,
    members: frozenset[bytes] | None = None,
    pending_seconds: float = PENDING_SECONDS,
) -> set[bytes]:
    """Signers of well-formed pending records started within `pending_seconds` (and not in the
    future), allowed by `members` (None: open), that have no contribution in `contributed`."""
    waiting = set()
    for value in values:
        record = parse_record("pending", value)
        if record is None or record["signer"] in contributed:
            continue
        if members is not None and record["signer"] not in members:
            continue
        if -60 <= now - record["started"] < pending_seconds:
            waiting.add(record["signer"])
    return waiting


class SettleClock:
    """Rule 1 and 2 of the module docstring for one node's rounds (monotonic `clock`)."""

    def __init__(
        self,
        settle_seconds: float,
        *,
        pending_seconds: float = PENDING_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settle_seconds = settle_seconds
        self.pending_seconds = pending_seconds
        self.clock = clock
        self._seen: dict[int, tuple[tuple[str, ...], float]] = {}
        self._quorate_since: dict[int, float] = {}

    def settled(self, r: int, candidates: tuple[str, ...], pending: set[bytes]) -> float | None:
        """Seconds since round `r`'s quorate set `candidates` settled, or None while it has not."""
        now = self.clock()
        since = self._quorate_since.setdefault(r, now)
        seen = self._seen.get(r)
        if seen is None or seen[0] != candidates:
            self._seen[r] = (candidates, now)
            return None
        if pending and now - since < self.pending_seconds:
            self._seen[r] = (candidates, now)  # quiet time counts from the last pending one
            return None
        waited = now - seen[1] - self.settle_seconds
        return waited if waited >= 0 else None
