"""One rich progress bar over counted steps (summaries, alignment, distillation), drawn on stderr."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def counted_progress(description: str, total: int, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yields `advance(n=1, **fields)`; with `enabled` false nothing is drawn."""
    if not enabled:
        yield lambda n=1, **fields: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    display = Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    with display:
        task = display.add_task(description, total=total, note="")

        def advance(n: int = 1, **fields: object) -> None:
            note = " ".join(f"{key} {value}" for key, value in fields.items())
            display.update(task, advance=n, **({"note": note} if note else {}))

        yield advance
