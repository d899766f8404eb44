"""hivemind's package `__init__`, run when a name is first read from the package, not at import.

Any ``import hivemind.p2p`` runs ``hivemind/__init__.py`` first, and that imports the averager, the
optimizer and the mixture-of-experts server (scipy, pydantic and much of hivemind with them), none
of which a node uses: it needs `hivemind.p2p`, `hivemind.dht` and `hivemind.utils` only.
`defer_hivemind_init` makes the next import of hivemind register the package as a module that has
its ``__path__`` (submodules import as usual) and runs the real ``__init__`` the first time a name
is read from it (``hivemind.DHT``, ``from hivemind import Optimizer``): code that uses the
package's top-level names still gets them, and a process that never does never loads them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
from types import ModuleType

PACKAGE = "hivemind"
# dunder names the real `__init__` defines; any other dunder read is a probe
# (`hasattr(module, "__wrapped__")`), answered without running it
_DUNDERS_DEFINED = ("__version__", "__all__")


class _DeferredInitLoader(importlib.abc.Loader):
    """Creates the package as its real loader would and runs its code at the first name read."""

    def __init__(self, real: importlib.abc.Loader) -> None:
        self.real = real
        self._lock = threading.RLock()
        self._started = False

    def __getattr__(self, name: str) -> object:  # resource readers and the like: the real loader's
        return getattr(self.real, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.real.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        def __getattr__(name: str) -> object:
            if name.startswith("__") and name not in _DUNDERS_DEFINED:
                raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}")
            submodule = sys.modules.get(f"{PACKAGE}.{name}")
            if submodule is not None:  # one still importing (`import hivemind.p2p.x as y` inside it)
                return submodule
            with self._lock:
                if not self._started:  # a read made while the `__init__` runs sees what it has so far
                    self._started = True
                    self.real.exec_module(module)
            if name in module.__dict__:
                return module.__dict__[name]
            raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}")

        module.__getattr__ = __getattr__  # type: ignore[method-assign]


class _DeferredInitFinder(importlib.abc.MetaPathFinder):
    """Answers the first import of hivemind with its real spec and a `_DeferredInitLoader`."""

    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if fullname != PACKAGE:
            return None
        sys.meta_path.remove(self)  # once: the lookup below, and any later one, is the usual one
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or spec.loader is None or spec.submodule_search_locations is None:
            return spec
        spec.loader = _DeferredInitLoader(spec.loader)
        return spec


def defer_hivemind_init() -> None:
    """Defer the `__init__` of hivemind's next import (module docstring); no-op if it is imported."""
    if PACKAGE in sys.modules or any(isinstance(f, _DeferredInitFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _DeferredInitFinder())
