"""Every zoo size by name: the tiny recipes of `merging.testbed.zoo` and the real zoo.

Importing this module is cheap (the command line reads `ZOO_SIZES` to check `--size`); the zoo
modules, and torch with them, load when a zoo is built.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from merging.testbed.zoo import Zoo

ZOO_SIZES = ("micro", "small", "real")  # merging.testbed.zoo.RECIPES, then the real zoo


def build_any_zoo(
    size: str,
    cache_dir: str | Path | None = None,
    *,
    log: Callable[[str], None] | None = None,
    reporter: Callable[[str, int], Any] | None = None,
) -> Zoo:
    """Build (or fetch from the cache) the zoo of ``size``; ``reporter`` shows the real zoo's
    per-model training progress."""
    from merging.testbed.zoo import RECIPES, ZooError, build_zoo

    if size == "real":
        from merging.testbed.real_zoo import build_real_zoo

        return build_real_zoo(cache_dir, log=log, reporter=reporter)
    if size not in RECIPES:
        raise ZooError(f"expected zoo size {', '.join(ZOO_SIZES)}, got {size!r}.")
    return build_zoo(size, cache_dir, log=log)
