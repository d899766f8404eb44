"""First copies first: a chunk server sends a chunk to one peer at a time, and the others copy it.

When several fetchers want the same chunks of one source at once (a round's inputs: every
contribution's shards are wanted by three workers), a source that serves every request sends each
chunk several times over its own uplink, which a slow source cannot afford. So a server remembers
to whom it is sending each chunk, and to whom it sent it in the last `window_seconds`; another
peer asking for it meanwhile is answered `ErrorCode.ELSEWHERE` (no bytes), asks the other peers
(the one that received the chunk serves it as soon as it is stored) and asks this server again
later (node.fetch_schedule's rechecks). A peer asking again for a chunk it was sent is served: it
may have lost it. A send that fails is forgotten, so the next asker is served.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

DEFAULT_WINDOW_SECONDS = 2.0
PRUNE_EVERY = 4096  # records kept before the expired ones are dropped


class FirstCopies:
    """To whom each chunk is being sent or was sent within `window_seconds` (see the module doc)."""

    def __init__(
        self, window_seconds: float = DEFAULT_WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if window_seconds < 0:
            raise ValueError(f"expected window_seconds >= 0, got {window_seconds}")
        self.window_seconds = window_seconds
        self.clock = clock
        self._copies: dict[str, tuple[str, float]] = {}  # digest -> (peer, deferring others until)

    def defer(self, digest: str, peer: str) -> bool:
        """Whether to answer `peer` ELSEWHERE for `digest`: another peer is being sent it or was
        within the window. If not, the chunk counts as being sent to `peer` from now on."""
        now = self.clock()
        held = self._copies.get(digest)
        if held is not None and held[0] != peer and held[1] > now:
            return True
        if len(self._copies) >= PRUNE_EVERY:
            self._copies = {d: c for d, c in self._copies.items() if c[1] > now}
        self._copies[digest] = (peer, math.inf)
        return False

    def sent(self, digest: str, peer: str, at: float | None = None) -> None:
        """The copy to `peer` left at `at` (default now): others are deferred for the window after."""
        if self._copies.get(digest, (None,))[0] == peer:
            finished = self.clock() if at is None else at
            self._copies[digest] = (peer, finished + self.window_seconds)

    def failed(self, digest: str, peer: str) -> None:
        """The copy to `peer` did not go out: the next asker is served."""
        if self._copies.get(digest, (None,))[0] == peer:
            del self._copies[digest]
