"""The layering the design fixes: node -> protocol -> merging, never back; no import cycle in node/.

Read from the source with `ast` (no module is imported): every ``import`` and ``from ... import``
anywhere in a file counts for the direction rule, function-level ones included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("merging", "protocol", "node")
FORBIDDEN = {"merging": ("protocol", "node"), "protocol": ("node",)}


def _modules(package: str) -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, *, module_level_only: bool = False) -> set[str]:
    """Absolute module names `path` imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    return _imports_of(path.read_text(encoding="utf-8"), package, module_level_only=module_level_only)


def _imports_of(source: str, package: str, *, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(source)
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_never_import_higher_ones(package):
    offending = sorted(
        f"{module} imports {name}"
        for module, path in _modules(package).items()
        for name in _imports(path)
        if _top(name) in FORBIDDEN[package]
    )
    assert offending == []


def test_the_reader_sees_imports_anywhere_in_a_file_and_resolves_relative_ones():
    source = "import torch\nfrom node.store import ContentStore\ndef f():\n    import node.dht\n"
    assert _imports_of(source, "protocol") == {"torch", "node.store", "node.store.ContentStore", "node.dht"}
    assert _imports_of(source, "protocol", module_level_only=True) == {
        "torch",
        "node.store",
        "node.store.ContentStore",
    }
    assert _imports_of("from . import quorum\n", "protocol") == {"protocol", "protocol.quorum"}
    assert _imports_of("from ..node import dht\n", "protocol.sub") == {"protocol.node", "protocol.node.dht"}


def test_node_has_no_module_level_import_cycle():
    modules = _modules("node")
    graph = {
        name: {m for m in _imports(path, module_level_only=True) if m in modules and m != name}
        for name, path in modules.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, trail: list[str]) -> list[str] | None:
        state[name] = 1
        for other in sorted(graph[name]):
            if state.get(other) == 1:
                return [*trail, name, other]
            if other not in state and (cycle := visit(other, [*trail, name])) is not None:
                return cycle
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name, [])
            assert cycle is None, " -> ".join(cycle)
