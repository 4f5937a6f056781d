"""The package's shape: imports flow one way (no cycles, among modules or among folders), the model
knows nothing of parallelism or training, and no function grows past a screen.

The import graph is read from the source (``ast``), every ``import`` counted, also those inside
functions (a lazy import still ties two modules together). Importing ``a.b.c`` imports the
packages ``a`` and ``a.b`` first; those edges to a module's own ancestors are Python's, not ours,
and are left out.
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("xoron_dist", "data_prep")
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module ``name`` is, or is inside of (``a.b.Class`` -> ``a.b``); None if not ours."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(name: str, path: Path) -> set[str]:
    """Project modules that ``name`` imports anywhere in its source, ancestors excluded."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    resolved = {_resolve(t) for t in targets}
    return {t for t in resolved if t and t != name and not name.startswith(t + ".")}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _folder(module: str) -> str:
    """``xoron_dist.model.llm.head`` -> ``xoron_dist.model``; ``data_prep.rows`` -> ``data_prep``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "xoron_dist" and len(parts) > 1 else parts[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_modules():
    assert _cycles(GRAPH) == []


def test_no_import_cycle_between_folders():
    folders: dict[str, set[str]] = collections.defaultdict(set)
    for module, targets in GRAPH.items():
        folders[_folder(module)].update(_folder(t) for t in targets if _folder(t) != _folder(module))
    assert _cycles(folders) == []


@pytest.mark.parametrize("folder, forbidden", [
    ("xoron_dist.model", ("xoron_dist.parallel", "xoron_dist.train", "xoron_dist.data", "xoron_dist.plan")),
    ("xoron_dist.parallel", ("xoron_dist.train", "xoron_dist.data", "xoron_dist.plan")),
    ("xoron_dist.plan", ("xoron_dist.model",)),
    ("xoron_dist.config", tuple(f"xoron_dist.{f}" for f in ("model", "parallel", "train", "data", "plan"))),
])
def test_imports_flow_one_way(folder, forbidden):
    """The model is plain single-rank code; parallelism transforms it from outside; the planner counts
    the LLM's parameters without building a model (the multimodal parts' splits it gets as plain data
    from ``parallel.part_splits``, which reads them off the model on the meta device)."""
    offending = sorted(f"{module} imports {target}" for module, targets in GRAPH.items()
                       if _folder(module) == folder for target in targets if _folder(target) in forbidden)
    assert offending == []


def test_the_graph_sees_lazy_imports():
    """A known lazy import (inside a function) is an edge: the checks above are not blind to them."""
    assert "xoron_dist.parallel.experts" in GRAPH["xoron_dist.parallel.parallelize"]


def test_no_function_over_a_screen():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines (split them): {long}"
