"""The package's imports flow one way: no cycle, pure math never reaches the PyTorch plumbing.

The graph is built statically from the source (``ast``): an edge ``a -> b`` for every import
that runs when ``a`` is imported (the module body, including class bodies, ``try`` and ``if``
blocks), excluding imports inside functions (run on call, where a cycle cannot deadlock the
import) and under ``if TYPE_CHECKING:`` (never run). ``from pkg import name`` is an edge to
``pkg.name`` when that is a module, else to ``pkg``. Importing a submodule also runs its
parent packages' ``__init__``; those implicit edges are left out, since every module would
otherwise sit on a cycle through ``deconflict/__init__.py``, which imports the public API.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "deconflict"

# The layers of the package: pure math <- PyTorch plumbing (engine, tracking, update,
# distributed, ...) <- the application (experiments, demo, CLI). Pure math may import pure math
# and the error types only: whatever plumbing module is added later stays out of it.
PURE_MATH = ("linalg", "solvers", "gramian", "kernels", "methods")
PURE_MATH_MAY_IMPORT = (*PURE_MATH, "errors")
APPLICATION = ("experiments", "cli", "demo")
# What `pip install 'deconflict[experiments]'` adds (pyproject.toml): only the experiments, the
# demo, the CLI and the diagnostics' plots may import these when they are imported.
EXPERIMENTS_EXTRA = ("matplotlib", "tqdm", "sklearn")
MAY_IMPORT_EXTRA = ("experiments", "cli", "demo", "diagnostics.plots")


def module_name(path: Path, source: Path = SOURCE) -> str:
    parts = list(path.relative_to(source).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(source: Path = SOURCE, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of ``package`` (under ``source``) by its full name."""
    return {module_name(path, source): path
            for path in sorted((source / package).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_time_statements(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements of ``body`` that run when the module is imported."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from import_time_statements(node.body)
            yield from import_time_statements(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse,
                          node.finalbody):
                yield from import_time_statements(block)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from import_time_statements(node.body)


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module (ours or not) that importing ``name`` imports directly, by full name;
    ``known`` (our modules) tells a submodule from a name defined in a package."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in import_time_statements(tree.body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        if node.level:
            anchor = name.split(".")
            if not is_package:
                anchor = anchor[:-1]
            anchor = anchor[:len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        submodules = {f"{base}.{alias.name}" for alias in node.names} & set(known)
        found.update(submodules)
        if len(submodules) < len(node.names):  # a name defined in base itself
            found.add(base)
    return found


def import_graph(source: Path = SOURCE, package: str = PACKAGE) -> dict[str, set[str]]:
    """Our modules and, for each, the modules of ours it imports at import time."""
    known = modules(source, package)
    return {name: {m for m in imported_modules(name, path, known) if m in known}
            for name, path in known.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_within(graph, component) for component in components]


def _cycle_within(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle from the component's first module back to itself, as a path."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & members):
                if target == start:
                    return [*paths[node], start]
                if target not in paths:
                    paths[target] = [*paths[node], target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"{component} is not strongly connected")


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module that importing ``start`` imports, with the chain of imports that does."""
    chains = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node]):
                if target not in chains:
                    chains[target] = [*chains[node], target]
                    following.append(target)
        frontier = following
    return chains


def _in(name: str, parts: tuple[str, ...]) -> bool:
    return any(name == f"{PACKAGE}.{part}" or name.startswith(f"{PACKAGE}.{part}.")
               for part in parts)


# ---------------------------------------------------------------------- the graph builder itself
def _write(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")


def test_the_graph_builder_sees_import_time_imports_only(tmp_path):
    """A hand-made package: each kind of import statement gives the edges worked out here.

    ``a`` imports ``b`` at module level (edge), ``c`` in a function (none), ``d`` under
    ``if TYPE_CHECKING:`` (none), ``e`` in a ``try`` (edge); ``from . import sub`` names a module
    (edge to it, not to the package), ``from .b import value`` a name in ``b`` (edge to ``b``).
    """
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from typing import TYPE_CHECKING\nfrom . import b, sub\n"
                    "from .b import value\ntry:\n    from . import e\nexcept ImportError:\n"
                    "    pass\nif TYPE_CHECKING:\n    from . import d\n"
                    "def later():\n    from . import c\n",
        "pkg/b.py": "value = 1\n", "pkg/c.py": "from . import a\n",
        "pkg/d.py": "from .a import x\n", "pkg/e.py": "",
        "pkg/sub/__init__.py": "from ..b import value\n", "pkg/f.py": "from . import a, name\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.b", "pkg.sub", "pkg.e"}
    assert graph["pkg.f"] == {"pkg", "pkg.a"}  # name is defined in pkg/__init__.py
    assert graph["pkg.sub"] == {"pkg.b"}
    assert graph["pkg.c"] == {"pkg.a"} and graph["pkg.d"] == {"pkg.a"}
    # c and d import a, but a imports them only lazily or for types: no cycle
    assert find_cycles(graph) == []
    graph["pkg.b"] = {"pkg.sub"}
    assert find_cycles(graph) == [["pkg.b", "pkg.sub", "pkg.b"]]


def test_the_graph_covers_the_package():
    graph = import_graph()
    assert len(graph) > 60
    assert "deconflict.methods.base" in graph["deconflict.methods.gradops"]
    assert "deconflict.engine" in graph["deconflict"]


# ------------------------------------------------------------------------------- the package
def test_the_package_has_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("part", PURE_MATH)
def test_pure_math_never_imports_the_plumbing_or_the_application(part):
    """Not engine, tracking, update, distributed, experiments, cli, nor any other module."""
    graph = import_graph()
    starts = [name for name in graph if _in(name, (part,))]
    assert starts
    for start in starts:
        for target, chain in reachable(graph, start).items():
            assert _in(target, PURE_MATH_MAY_IMPORT), " -> ".join(chain)


def test_only_the_experiments_import_the_experiments_extra():
    """``import deconflict`` (and any core module) works without ``deconflict[experiments]``."""
    known = modules()
    for name, path in known.items():
        if _in(name, MAY_IMPORT_EXTRA):
            continue
        extra = {m for m in imported_modules(name, path, known)
                 if m.partition(".")[0] in EXPERIMENTS_EXTRA}
        assert not extra, f"{name} imports {sorted(extra)} when imported"


def test_the_library_never_imports_the_application():
    """Neither ``import deconflict`` nor any module outside experiments/, demo and cli imports
    those."""
    graph = import_graph()
    for start in (name for name in graph if not _in(name, APPLICATION)):
        for target, chain in reachable(graph, start).items():
            assert not _in(target, APPLICATION), " -> ".join(chain)


def test_every_module_imports_first():
    """Each module imported first, in a fresh interpreter state of the package: catches the
    cycles the static graph cannot see (``problems`` imports its modules with importlib)."""
    import subprocess
    import sys

    script = """
import importlib, pkgutil, sys
import deconflict
names = [m.name for m in pkgutil.walk_packages(deconflict.__path__, "deconflict.")]
failed = []
for name in names:
    for loaded in [k for k in sys.modules if k == "deconflict" or k.startswith("deconflict.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ImportError as error:
        if "circular" in str(error) or "partially initialized" in str(error):
            failed.append(f"{name}: {error}")
print("\\n".join(failed))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, check=True)
    assert not result.stdout.strip(), result.stdout
