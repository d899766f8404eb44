"""A rich progress bar per trained model: steps done, last loss, elapsed time and ETA.

Where the console is not a terminal (a log file), a line per `LOG_EVERY` steps replaces the bars.
"""

from __future__ import annotations

import contextlib
import time
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

LOG_EVERY = 4


def _line_reporter(console: Console) -> Callable[[str, int], StepHook]:
    def reporter(name: str, steps: int) -> StepHook:
        start = time.perf_counter()

        def hook(step: int, loss: float) -> None:
            if step % LOG_EVERY and step != steps:
                return
            took = time.perf_counter() - start
            eta = took / step * (steps - step)
            console.print(f"{name}: step {step}/{steps}, loss {loss:.4f}, {took:.0f} s, ETA {eta:.0f} s")

        return hook

    return reporter


@contextlib.contextmanager
def rich_reporter(console: Console | None = None) -> Iterator[Callable[[str, int], StepHook]]:
    """Yields ``reporter(name, steps) -> hook``; each hook moves that model's bar by one step."""
    console = console or Console()
    if not console.is_terminal:
        yield _line_reporter(console)
        return
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
