"""The store's scrub: corrupt blobs are found and fetched again from peers, not only when asked for.

`ContentStore.get` checks every read against the chunk's sha256; a blob that fails is removed and
its digest kept in `ContentStore.dropped`. Each poll, `StoreScrub.step`:

1. re-reads (and so verifies) up to `budget` bytes of stored blobs, round robin over the index,
   so a flipped bit in a blob nobody reads is found within one pass over the store;
2. fetches every dropped digest again from the announced peers (one try per poll; a digest no
   peer serves after `REPAIR_TRIES` polls is given up: it was this node's only copy).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from node.errors import FetchError, StoreError
from node.store import ContentStore

logger = logging.getLogger("node.service")

SCRUB_BYTES_PER_POLL = 8 * 1024 * 1024
REPAIR_TRIES = 20

Fetch = Callable[..., Awaitable[object]]  # (digests, holders, *, attempts=...): into the store


class StoreScrub:
    """Verify a slice of the store per poll and fetch dropped blobs again (the module docstring)."""

    def __init__(self, store: ContentStore, fetch: Fetch, *, budget: int = SCRUB_BYTES_PER_POLL) -> None:
        self.store = store
        self.fetch = fetch
        self.budget = budget
        self._queue: list[str] = []
        self._tries: dict[str, int] = {}

    async def step(self) -> None:
        """One poll: verify, then repair."""
        await asyncio.to_thread(self.verify_slice)
        await self.repair()

    def verify_slice(self) -> None:
        """Read up to `budget` bytes of blobs, continuing where the last slice stopped."""
        spent, refilled = 0, False
        while spent < self.budget:
            if not self._queue:
                if refilled:
                    return  # one pass per poll at most
                self._queue = sorted(self.store, reverse=True)
                refilled = True
                if not self._queue:
                    return
            digest = self._queue.pop()
            try:
                spent += len(self.store.get(digest))
            except StoreError:
                continue  # removed, and its digest is in `store.dropped`

    async def repair(self) -> None:
        """Fetch the dropped digests again (what arrives is verified by the store on write)."""
        dropped = sorted(self.store.dropped)
        if not dropped:
            return
        wanted = self.store.missing(dropped)
        if wanted:
            try:
                await self.fetch(wanted, [], attempts=1)
            except FetchError as exc:
                logger.debug("store repair: %s", exc)
        self._settle(dropped)

    def _settle(self, dropped: Sequence[str]) -> None:
        """Forget repaired digests, and those tried `REPAIR_TRIES` times without a peer serving them."""
        still = set(self.store.missing(dropped))
        repaired = [d for d in dropped if d not in still]
        if repaired:
            logger.info("store repair: fetched %d dropped chunks again from peers", len(repaired))
        for digest in dropped:
            tries = self._tries.get(digest, 0) + 1
            if digest not in still or tries >= REPAIR_TRIES:
                self.store.dropped.discard(digest)
                self._tries.pop(digest, None)
                if digest in still:
                    logger.warning("store repair: no peer serves chunk %s; given up", digest)
            else:
                self._tries[digest] = tries
