"""The house rules, read from the code's own imports (module level and inside functions).

Every import runs down the module map (docs/architecture.md): the ground imports only the
ground; the wings (store, data, backbones, heads) import their own wing and the ground; nothing
imports in a circle. Imports under ``if TYPE_CHECKING:`` are for annotations and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "featcache"
GROUND = {"featcache", "featcache.errors", "featcache.choices", "featcache.config", "featcache.fields", "featcache.units",
          "featcache.keys", "featcache.pooling", "featcache.metrics", "featcache.runtime", "featcache.progress",
          "featcache.names", "featcache.npy", "featcache.persist", "featcache.stream",
          "featcache.files"}
WINGS = ("featcache.store", "featcache.data", "featcache.backbones", "featcache.heads")
MAX_LINES = 400


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    mods = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _imports(module: str, modules: dict[str, Path] = MODULES) -> set[str]:
    """The package's modules ``module`` imports at run time."""
    path = modules[module]
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for b in node.body for n in ast.walk(b)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            names = [f"{name}.{a.name}" if f"{name}.{a.name}" in modules else name for a in node.names]
        else:
            names = [a.name for a in node.names]
        for target in names:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module:
                out.add(target)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of an import graph that hold more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return circles


def _wing(module: str) -> str | None:
    return next((w for w in WINGS if module == w or module.startswith(w + ".")), None)


def test_no_import_circles():
    assert _circles(GRAPH) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_down(module):
    up = set()
    if module in GROUND:
        up = {t for t in GRAPH[module] if t not in GROUND}
    elif wing := _wing(module):
        up = {t for t in GRAPH[module] if t not in GROUND and _wing(t) != wing}
    assert not up, f"{module} imports {sorted(up)} above it"


def test_files_are_short():
    """One job per file: at most one module over 400 lines (named in docs/architecture.md)."""
    long = sorted((sum(1 for _ in p.open()), m) for m, p in MODULES.items() if sum(1 for _ in p.open()) > MAX_LINES)
    assert len(long) <= 1, long


def test_the_checker_sees_lazy_and_relative_imports_and_their_circles(tmp_path):
    """The graph builder is not blind: a circle made only of an import inside a function, through a
    relative import, is found; an import under TYPE_CHECKING is not an edge."""
    pkg = tmp_path / "pkg"
    (pkg / "wing").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "wing" / "__init__.py").write_text("")
    (pkg / "top.py").write_text("from .wing import low\n")
    (pkg / "wing" / "low.py").write_text("def f():\n    from .. import top\n")
    modules = _modules(pkg)
    graph = {m: _imports(m, modules) for m in modules}
    assert graph["pkg.top"] == {"pkg.wing.low"} and graph["pkg.wing.low"] == {"pkg.top"}
    assert _circles(graph) == [["pkg.top", "pkg.wing.low"]]
    (pkg / "wing" / "low.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..top import g\n")
    graph = {m: _imports(m, modules) for m in modules}
    assert graph["pkg.wing.low"] == set() and _circles(graph) == []
