"""A rich progress bar per trained model: steps done, last loss, elapsed time and ETA."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from merging.testbed.training import StepHook


@contextlib.contextmanager
def rich_reporter(console: Console | None = None) -> Iterator[Callable[[str, int], StepHook]]:
    """Yields ``reporter(name, steps) -> hook``; each hook moves that model's bar by one step."""
    columns = (
        TextColumn("{task.description:14s}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:

        def reporter(name: str, steps: int) -> StepHook:
            bar = progress.add_task(name, total=steps, loss="-")

            def hook(step: int, loss: float) -> None:
                progress.update(bar, completed=step, loss=f"{loss:.4f}")

            return hook

        yield reporter
