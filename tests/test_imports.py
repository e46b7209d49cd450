"""The import graph of the library: no circles, and no module imports a floor above its own.

Floors, bottom to top: mechanics (`compressor.*`) 0, `strategies.*` 1, `compressor.pipelines.*` 2, `cli` and
the top-level `cli_*` modules beside it (renderers, option groups) 3.
Every import counts: module-level, inside functions and under TYPE_CHECKING, `import x` and `from x import y`,
relative imports resolved. An import names the package's own module when `y` is one (`from compressor
import budget` is an edge to `compressor.budget`); importing a submodule is not counted as importing its
parent packages (every module would otherwise sit in a circle with its package's `__init__`).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOOR_NAMES = {0: "mechanics (compressor.*)", 1: "strategies", 2: "pipelines (compressor.pipelines.*)", 3: "cli"}


def library_modules() -> dict[str, Path]:
    """Every module of `compressor/`, `strategies/`, `cli.py` and the `cli_*.py` beside it, by dotted name."""
    paths = [ROOT / "cli.py", *sorted(ROOT.glob("cli_*.py"))]
    paths += [*sorted(ROOT.glob("compressor/**/*.py")), *sorted(ROOT.glob("strategies/**/*.py"))]
    modules = {}
    for path in paths:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `module` (the file at `path`) imports anywhere in its body."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from ..x import y` in a.b.c is a.x
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            for alias in node.names:  # `from package import module` imports the module, else the package
                submodule = f"{origin}.{alias.name}"
                found.add(submodule if submodule in known else origin)
    return {name for name in found if name in known and name != module}


def import_graph() -> dict[str, set[str]]:
    """Each library module and the library modules it imports."""
    modules = library_modules()
    return {module: imported_modules(module, path, set(modules)) for module, path in modules.items()}


def floor(module: str) -> int:
    """The floor a module sits on: 0 mechanics, 1 strategies, 2 pipelines, 3 cli (and cli_*)."""
    if module == "cli" or module.startswith("cli_"):
        return 3
    if module == "compressor.pipelines" or module.startswith("compressor.pipelines."):
        return 2
    if module == "strategies" or module.startswith("strategies."):
        return 1
    return 0


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of `graph` that has one, as [a, b, ..., a]."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
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
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_circle_in(graph, component) for component in components]


def _circle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest circle through the first module of a strongly connected component (breadth first)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    chain = [node]
                    while chain[-1] != start:
                        chain.append(parents[chain[-1]])
                    return [*reversed(chain), start]
                if nxt not in parents:
                    parents[nxt] = node
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    raise AssertionError(f"no circle in component {sorted(component)}")


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Every (importer, imported) pair where the imported module sits on a higher floor."""
    return sorted((a, b) for a, targets in graph.items() for b in targets if floor(b) > floor(a))


def _describe_upward(edges: list[tuple[str, str]]) -> str:
    return "\n".join(f"{a} ({FLOOR_NAMES[floor(a)]}) imports {b} ({FLOOR_NAMES[floor(b)]})" for a, b in edges)


def test_library_has_no_import_circles():
    found = cycles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_module_imports_a_higher_floor():
    edges = upward_imports(import_graph())
    assert not edges, "upward imports:\n" + _describe_upward(edges)


def test_graph_sees_every_kind_of_import(tmp_path):
    """Function-level, TYPE_CHECKING, `from package import module` and relative imports are all edges."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from .a import thing\n")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pkg.b import B\n"
        "def f():\n    from pkg import c\n    import pkg.d\n"
        "from . import e\nfrom .e import name\nfrom pkg import helper\n"
    )
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.e"}
    assert imported_modules("pkg.a", package / "a.py", known) == {"pkg", "pkg.b", "pkg.c", "pkg.d", "pkg.e"}
    assert imported_modules("pkg", package / "__init__.py", known) == {"pkg.a"}


def test_checker_finds_a_circle_and_an_upward_import():
    graph = {
        "cli": {"compressor.pipelines.search"},
        "compressor.pipelines.search": {"compressor.pipelines.pruning", "compressor.plots"},
        "compressor.pipelines.pruning": {"compressor.pipelines.search", "strategies"},
        "compressor.plots": {"compressor.pipelines.records"},
        "compressor.pipelines.records": set(),
        "strategies": {"compressor.budget"},
        "compressor.budget": {"compressor.budget"},
    }
    assert cycles(graph) == [
        ["compressor.budget", "compressor.budget"],
        ["compressor.pipelines.pruning", "compressor.pipelines.search", "compressor.pipelines.pruning"],
    ]
    assert upward_imports(graph) == [("compressor.plots", "compressor.pipelines.records")]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


@pytest.mark.parametrize(
    ("module", "expected"),
    [("cli", 3), ("cli_render", 3), ("compressor.pipelines", 2), ("compressor.pipelines.search", 2),
     ("strategies.grid", 1), ("strategies", 1), ("compressor", 0), ("compressor.budget", 0)],
)  # fmt: skip
def test_floors(module, expected):
    assert floor(module) == expected


def test_the_command_line_starts_without_torch():
    """`compress --help`, `--version` and a mistyped command answer without importing torch or SciPy (about
    2 s of a 2.5 s start): a command imports them when it runs. The strategies, whose options are the
    commands' flags, import them where they use them; `compressor`'s names load on first use."""
    code = "import sys, cli; heavy = {'torch', 'scipy'} & set(sys.modules); assert not heavy, heavy"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
