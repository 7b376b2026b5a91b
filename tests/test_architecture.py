"""The package's shape: three layers whose imports point one way, no import cycles, short functions.

Layers (see ARCHITECTURE.md): the guide's utilities at the package root (layer 1), the training
engine in ``engine/`` (layer 2), the applications in ``app/`` (layer 3). A module may import its
own layer and the layers below it, never one above. The package's ``__init__`` and ``__main__``
are the public facade: they re-export from every layer, and no module imports them.

Every import counts for the layers (also ``from .x import y`` inside a function, which is how a
lazy import would hide a wrong-way edge); only module-level imports count for cycles, since an
import inside a function runs after both modules are loaded.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "advanced_training_utils"
SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = SRC / PACKAGE
FACADE = {PACKAGE, f"{PACKAGE}.__main__"}
LAYERS = {"root": 0, "engine": 1, "app": 2}
MAX_FUNCTION_LINES = 80

#: Functions longer than MAX_FUNCTION_LINES today, with their current length in lines (``def``
#: line to last line). The redesign shrinks them and empties this set; it may only shrink.
ALLOWED_LONG: dict[str, int] = {}


@dataclass(frozen=True)
class Edge:
    """One import: ``source`` imports ``target`` at ``line``; ``top`` when at module level."""

    source: str
    target: str
    line: int
    top: bool


def module_name(path: Path) -> str:
    """Dotted name of a source file under ``src/`` (a package's ``__init__`` is the package)."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str:
    """``"facade"``, ``"engine"``, ``"app"`` or ``"root"`` for a module of the package."""
    if module in FACADE:
        return "facade"
    sub = module.split(".")[1]
    return sub if sub in ("engine", "app") else "root"


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> list[Edge]:
    """The package-internal imports of one module's ``source``, resolved to module names.

    ``from a import b`` points at ``a.b`` when that is a module in ``known``, else at ``a``.
    Imports inside functions, classes and ``if`` blocks count, flagged ``top=False`` unless they
    run when the module is imported (module body, or an ``if``/``try`` at module level).
    """
    package = module if is_package else module.rpartition(".")[0]
    edges: list[Edge] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            in_function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                        edges.append(Edge(module, alias.name, child.lineno, top))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    origin = ".".join(base + ([child.module] if child.module else []))
                else:
                    origin = child.module or ""
                if origin != PACKAGE and not origin.startswith(PACKAGE + "."):
                    continue
                for alias in child.names:
                    full = f"{origin}.{alias.name}"
                    target = full if full in known else origin
                    edges.append(Edge(module, target, child.lineno, top))
            # a class body runs at import time; a function body does not
            visit(child, top and not in_function)

    visit(ast.parse(source), True)
    return edges


def package_edges() -> list[Edge]:
    """Every internal import of every module under ``src/advanced_training_utils``."""
    files = sorted(ROOT.rglob("*.py"))
    known = {module_name(f) for f in files}
    edges: list[Edge] = []
    for f in files:
        edges += imports_of(f.read_text(), module_name(f), f.name == "__init__.py", known)
    return edges


def layer_violations(edges: list[Edge]) -> list[str]:
    """Imports that point up a layer, or into the facade."""
    bad = []
    for e in edges:
        src, dst = layer(e.source), layer(e.target)
        if src == "facade":
            continue
        if dst == "facade" or LAYERS[dst] > LAYERS[src]:
            bad.append(f"{e.source} ({src}) imports {e.target} ({dst}), line {e.line}")
    return bad


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search, colours)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def long_functions() -> dict[str, int]:
    """``"relative/path.py::Qual.name" -> lines`` for every function over the limit."""
    found = {}
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT).as_posix()

        def visit(node: ast.AST, prefix: str, rel: str = rel) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = prefix + child.name
                    if not isinstance(child, ast.ClassDef):
                        lines = child.end_lineno - child.lineno + 1
                        if lines > MAX_FUNCTION_LINES:
                            found[f"{rel}::{name}"] = lines
                    visit(child, name + ".")
                else:
                    visit(child, prefix)

        visit(ast.parse(f.read_text()), "")
    return found


# --- the package ------------------------------------------------------------------------------


def test_the_tree_shows_three_layers():
    modules = {module_name(f) for f in ROOT.rglob("*.py")}
    by_layer = {name: {m for m in modules if layer(m) == name} for name in LAYERS}
    assert f"{PACKAGE}.checkpoint" in by_layer["root"]
    assert f"{PACKAGE}.engine.run" in by_layer["engine"]
    assert f"{PACKAGE}.engine.health.guard" in by_layer["engine"]
    assert f"{PACKAGE}.app.cli" in by_layer["app"]
    assert all(by_layer.values())


def test_imports_never_point_up_a_layer():
    edges = package_edges()
    assert len(edges) > 50  # the scan sees the package's imports
    assert layer_violations(edges) == []


def test_no_import_cycles_among_modules():
    graph: dict[str, set[str]] = {}
    for e in package_edges():
        if e.top and e.target != e.source:
            graph.setdefault(e.source, set()).add(e.target)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_new_long_functions_and_none_grows():
    found = long_functions()
    new = {k: v for k, v in found.items() if k not in ALLOWED_LONG}
    grown = {k: (ALLOWED_LONG[k], v) for k, v in found.items() if v > ALLOWED_LONG.get(k, v)}
    assert new == {}, f"functions over {MAX_FUNCTION_LINES} lines: {new}"
    assert grown == {}, f"allowed long functions grew (allowed, now): {grown}"
    gone = set(ALLOWED_LONG) - set(found)
    assert gone == set(), f"no longer long: remove from ALLOWED_LONG: {sorted(gone)}"


# --- the checker itself: it must see what it is there to catch ----------------------------------

KNOWN = {PACKAGE, f"{PACKAGE}.checkpoint", f"{PACKAGE}.engine", f"{PACKAGE}.engine.run",
         f"{PACKAGE}.engine.loop", f"{PACKAGE}.app", f"{PACKAGE}.app.cli"}


@pytest.mark.parametrize(("code", "target", "top"), [
    ("from ..app import cli", f"{PACKAGE}.app.cli", True),
    ("from ..app.cli import main", f"{PACKAGE}.app.cli", True),
    ("from .. import checkpoint as ck", f"{PACKAGE}.checkpoint", True),
    ("from .loop import x", f"{PACKAGE}.engine.loop", True),
    ("import advanced_training_utils.app.cli", f"{PACKAGE}.app.cli", True),
    ("from advanced_training_utils.app.cli import main", f"{PACKAGE}.app.cli", True),
    ("from .. import train_model_advanced", PACKAGE, True),
    ("def f():\n    from ..app.cli import main", f"{PACKAGE}.app.cli", False),
    ("class C:\n    from ..app.cli import main", f"{PACKAGE}.app.cli", True),
    ("try:\n    from ..app import cli\nexcept ImportError:\n    pass", f"{PACKAGE}.app.cli", True),
])
def test_import_resolution(code, target, top):
    (edge,) = imports_of(code, f"{PACKAGE}.engine.run", False, KNOWN)
    assert (edge.target, edge.top) == (target, top)


def test_import_resolution_ignores_other_packages():
    assert imports_of("import os\nfrom torch import nn\n", f"{PACKAGE}.engine.run", False,
                      KNOWN) == []


@pytest.mark.parametrize(("source", "target", "bad"), [
    (f"{PACKAGE}.engine.run", f"{PACKAGE}.app.cli", True),
    (f"{PACKAGE}.checkpoint", f"{PACKAGE}.engine.run", True),
    (f"{PACKAGE}.checkpoint", f"{PACKAGE}.app.cli", True),
    (f"{PACKAGE}.engine.run", PACKAGE, True),
    (f"{PACKAGE}.app.cli", f"{PACKAGE}.engine.run", False),
    (f"{PACKAGE}.engine.run", f"{PACKAGE}.checkpoint", False),
    (f"{PACKAGE}.engine.health.guard", f"{PACKAGE}.engine.loop", False),
    (PACKAGE, f"{PACKAGE}.engine.run", False),
    (f"{PACKAGE}.__main__", f"{PACKAGE}.app.cli", False),
])
def test_layer_rule(source, target, bad):
    assert bool(layer_violations([Edge(source, target, 1, True)])) is bad


def test_cycle_is_found_and_reported():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
