"""What every `umm` command shares: light click types, human-readable numbers, quiet third parties.

This module imports only click and the standard library, so `umm --help` stays fast; commands
import their heavy modules inside their functions.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from collections.abc import Callable

import click

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# not hivemind: its log level also sets its p2pd daemon's, and a daemon that never logs never sees
# its output pipe break, so it would outlive a SIGKILLed pull
NOISY_LOGGERS = ("transformers", "torch", "urllib3", "filelock", "huggingface_hub")


class LazyChoice(click.Choice):
    """A `click.Choice` whose choices come from a library constant imported on first use.

    `source` is ``"module:NAME"`` (a mapping's keys or a sequence), followed by `extra` choices;
    help shows `metavar`, so rendering help imports nothing.
    """

    def __init__(self, source: str, *, metavar: str, extra: tuple[str, ...] = ()) -> None:
        super().__init__([], case_sensitive=True)
        self._source = source
        self._extra = extra
        self._metavar = metavar
        self._loaded = False

    def _load(self) -> None:
        if not self._loaded:
            module, _, name = self._source.partition(":")
            self.choices = (*getattr(importlib.import_module(module), name), *self._extra)
            self._loaded = True

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:  # type: ignore[override]
        return f"[{'|'.join(self.choices)}]" if self._loaded else self._metavar

    def convert(self, value, param, ctx):
        self._load()
        return super().convert(value, param, ctx)

    def shell_complete(self, ctx, param, incomplete):
        self._load()
        return super().shell_complete(ctx, param, incomplete)


def log_level_option(default: str = "INFO") -> Callable:
    """``--log-level``, one of `LOG_LEVELS` (any case)."""
    return click.option(
        "--log-level",
        type=click.Choice(LOG_LEVELS, case_sensitive=False),
        default=default,
        show_default=True,
        help="Python log level.",
    )


def verbose_option() -> Callable:
    """``--verbose``: let third-party warnings, logs and progress bars through."""
    return click.option(
        "--verbose", is_flag=True, help="Also show third-party warnings, logs and progress bars."
    )


def quiet_third_parties(verbose: bool) -> None:
    """Silence the warnings, logs and progress bars of torch and transformers unless `verbose`.

    Environment variables are set for child processes too (node processes inherit them).
    """
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    warnings.filterwarnings("ignore")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def format_bytes(count: float) -> str:
    """`count` bytes in binary units: ``512 B``, ``1.50 KiB``, ``12.8 MiB``, ``2.00 GiB``."""
    if count < 1024:
        return f"{int(count)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        count /= 1024
        if count < 1024 or unit == "TiB":
            return f"{count:.2f} {unit}" if count < 10 else f"{count:.1f} {unit}"
    raise AssertionError("unreachable")


def format_seconds(seconds: float) -> str:
    """A duration as ``0.4 s``, ``12.3 s``, ``4 min 05 s`` or ``2 h 03 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
