"""What every `umm` command shares: light click types, human-readable numbers, quiet third parties.

This module imports only click and the standard library, so `umm --help` stays fast; commands
import their heavy modules inside their functions.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import click

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# not hivemind: its log level also sets its p2pd daemon's, and a daemon that never logs never sees
# its output pipe break, so it would outlive a SIGKILLed pull
# asyncio: "Loop ... that handles pid ... is closed" when a p2pd daemon exits after its event loop
NOISY_LOGGERS = ("transformers", "torch", "urllib3", "filelock", "huggingface_hub", "asyncio")
IDENTITY_LOGGER = "hivemind.p2p.p2p_daemon"  # "Generating new identity ...": filtered, not its level


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
    identity = logging.getLogger(IDENTITY_LOGGER)
    if _identity_notice not in identity.filters:
        identity.addFilter(_identity_notice)


def _identity_notice(record: logging.LogRecord) -> bool:
    """False for hivemind's notices about the p2p identity file it makes or checks (log noise)."""
    return "identity" not in record.getMessage() or record.levelno > logging.INFO


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


PORT = click.IntRange(0, 65535)  # a TCP port; 0 = any free one


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12} | {
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
    "TIB": 1 << 40,
}


class ByteSize(click.ParamType):
    """A size in bytes written as a number and an optional unit: `2GiB`, `500MiB`, `1.5GB`, `4096`."""

    name = "size"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        number = str(value).strip().upper()
        digits = number.rstrip("KMGTIB")
        unit = number[len(digits) :].strip()
        try:
            size = int(float(digits) * SIZE_UNITS[unit])
        except (KeyError, ValueError):
            self.fail(f"expected a size such as 2GiB, 500MiB or 4096, got {value!r}", param, ctx)
        if size <= 0:
            self.fail(f"expected a positive size, got {value!r}", param, ctx)
        return size


def check_writable_target(path: Path, option: str) -> None:
    """Raise click.BadParameter unless `path` can be created or replaced: the nearest existing
    folder above it is a folder this process may write to (checked before anything is created)."""
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise click.BadParameter(f"{path} lies under {parent}, a file, not a folder", param_hint=option)
    if not os.access(parent, os.W_OK | os.X_OK):
        message = f"{path} lies under {parent}, where this user cannot write"
        raise click.BadParameter(message, param_hint=option)


@contextlib.contextmanager
def removed_on_failure(folder: Path) -> Iterator[Callable[[], None]]:
    """Remove `folder` if this command created it and fails before calling the yielded ``keep()``
    (e.g. a node that never became ready): a failed command leaves no data folder behind."""
    existed = folder.exists()
    kept = [existed]
    try:
        yield lambda: kept.__setitem__(0, True)
    except BaseException:
        if not kept[0]:
            shutil.rmtree(folder, ignore_errors=True)
        raise
