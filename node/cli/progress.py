"""A rich progress bar with ETA for a long step of a command (a pull's chunks, a merge's tensors)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextlib.contextmanager
def step_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A transient bar for one step; yields ``update(done, total)``, callable from any thread."""
    lock = threading.Lock()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        transient=True,
    ) as bars:
        task = bars.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            with lock:
                bars.update(task, completed=done, total=total)

        yield update
