"""umm merging: pure tensor math and model I/O (no network, no processes)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "merge": "merging.engine",
    "merge_state_dicts": "merging.engine",
    "resolve_parameters": "merging.engine",
    "MergeConfig": "merging.config",
    "load_config": "merging.config",
}


def __getattr__(name: str) -> Any:
    """`merging.merge` and friends, imported on first use so that `import merging` stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'merging' has no attribute {name!r}")
