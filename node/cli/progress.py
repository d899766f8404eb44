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
    with steps_progress(description) as update:
        yield lambda done, total: update("", done, total)


@contextlib.contextmanager
def steps_progress(description: str) -> Iterator[Callable[[str, int, int], None]]:
    """A transient bar for steps in turn; yields ``update(step, done, total)`` (any thread), which
    shows ``description: step`` (or `description` alone for an empty step)."""
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

        def update(step: str, done: int, total: int) -> None:
            with lock:
                shown = f"{description}: {step}" if step else description
                bars.update(task, description=shown, completed=done, total=total)

        yield update
