"""Architecture rules of the package, checked on its source with ``ast``: nothing is imported.

* no module of ``anomalib_tiled/`` is over :data:`MAX_MODULE_LINES` physical lines, and the façade
  ``engine.py`` is at most :data:`MAX_ENGINE_LINES`;
* no function or method is over :data:`MAX_FUNCTION_LINES` lines. A function's length runs from its
  ``def`` line (decorators not counted) to its last line, *excluding its docstring*; blank lines and
  comments inside count, and a nested function counts both on its own and inside its parent;
* no import cycle between modules of the package. Every ``import``/``from ... import`` statement counts,
  wherever it stands (module level, inside functions, inside ``try``), except the ones under
  ``if TYPE_CHECKING:``, which never run. Edges are resolved so (``P`` a package of ``anomalib_tiled``):

  - ``import anomalib_tiled.x.y`` -> module ``anomalib_tiled.x.y``;
  - ``from anomalib_tiled.x import y`` -> ``anomalib_tiled.x.y`` when ``y`` is a module of the package,
    else ``anomalib_tiled.x`` (``from anomalib_tiled.cli import main`` -> ``anomalib_tiled.cli``, i.e.
    ``cli/__init__.py``); relative imports (``from . import y``, ``from .x import y``) likewise, from the
    importing module's package;
  - a package is the module of its ``__init__.py``, so a package ``__init__`` that imports its
    submodules has edges to them;
  - a submodule is *not* given an edge to its parent package just because Python runs the parent's
    ``__init__`` first (that edge would make every package that re-exports its submodules cyclic);
    it has one only when it names the parent (``import anomalib_tiled.report`` or
    ``from anomalib_tiled.report import <something defined in __init__>``).
"""

from __future__ import annotations

import ast
import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "anomalib_tiled"
MAX_MODULE_LINES = 400
MAX_ENGINE_LINES = 250
MAX_FUNCTION_LINES = 50
MAX_TOP_LEVEL_MODULES = 12
ARCHITECTURE_DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

LAYER_RULES: dict[str, tuple[str, ...]] = {
    # importer (a module or a package prefix) -> what it never imports
    "settings": ("*", "!errors", "!tiling"),
    "errors": ("*",),
    "tiling": ("*",),
    "config": ("execution", "stages", "merge", "report", "export", "deploy", "cli", "integration"),
    "data": ("execution", "stages", "merge", "report", "export", "deploy", "cli", "integration"),
    "run": ("execution", "stages", "merge", "report", "export", "deploy", "cli", "integration"),
    "merge": ("execution", "stages", "report", "export", "deploy", "cli", "integration"),
    "sinks": ("execution", "stages", "report", "export", "deploy", "cli", "integration"),
    "report": ("execution", "stages", "export", "deploy", "cli", "integration"),
    "execution": ("stages", "report", "export", "deploy", "cli", "integration"),
    "export": ("stages", "deploy", "cli", "integration"),
    "deploy": ("stages", "execution", "cli", "integration"),
    "stages": ("cli", "integration", "engine"),
    "engine": ("cli", "integration"),
}
"""One-way layers: ``*`` is every module of the package, ``!name`` an exception to it."""


def package_dir() -> Path:
    """Folder of the package under test, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    assert spec is not None and spec.submodule_search_locations, f"{PACKAGE} is not importable"
    return Path(next(iter(spec.submodule_search_locations)))


def modules(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file below ``root`` (``__init__`` = the package)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


# -- lengths ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FunctionLength:
    """Length of one function or method."""

    where: str
    length: int

    def __str__(self) -> str:
        return f"{self.where}: {self.length} lines"


def function_lengths(path: Path, name: str) -> Iterator[FunctionLength]:
    """Every function and method of a file, ``def`` line to last line, docstring excluded."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    parents: dict[ast.AST, ast.AST] = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        length = node.end_lineno - node.lineno + 1
        body = node.body[0]
        if isinstance(body, ast.Expr) and isinstance(body.value, ast.Constant) and isinstance(body.value.value, str):
            length -= body.end_lineno - body.lineno + 1
        qualified, parent = [node.name], parents.get(node)
        while parent is not None and not isinstance(parent, ast.Module):
            if isinstance(parent, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                qualified.insert(0, parent.name)
            parent = parents.get(parent)
        yield FunctionLength(f"{name}.{'.'.join(qualified)} (line {node.lineno})", length)


def long_functions(files: dict[str, Path], limit: int = MAX_FUNCTION_LINES) -> list[FunctionLength]:
    """Functions over ``limit`` lines, longest first."""
    lengths = [f for name, path in files.items() for f in function_lengths(path, name) if f.length > limit]
    return sorted(lengths, key=lambda f: (-f.length, f.where))


def line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def long_modules(files: dict[str, Path], limit: int = MAX_MODULE_LINES) -> list[str]:
    return [f"{name}: {line_count(path)} lines" for name, path in files.items() if line_count(path) > limit]


# -- imports ---------------------------------------------------------------------------------------


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` (their ``else`` runs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that module ``name`` (file ``path``) imports, resolved as the docstring says."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            edges |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = own_package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                edges.add(submodule if submodule in known else base)
    return {edge for edge in edges if edge in known and edge != name}


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    known = set(files)
    return {name: imported_modules(name, path, known) for name, path in files.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_through(graph, component) for component in components]


def _cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle inside a strongly connected component, from its first module (breadth first)."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if target not in previous:
                    previous[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def format_cycles(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join(cycle) for cycle in cycles)


# -- the rules, on the package ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def package_files() -> dict[str, Path]:
    files = modules(package_dir())
    assert {f"{PACKAGE}.engine", f"{PACKAGE}.cli", f"{PACKAGE}.report.html"} <= set(files)
    return files


def test_no_module_is_over_400_lines(package_files: dict[str, Path]) -> None:
    offenders = long_modules(package_files)
    assert not offenders, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(offenders)


def test_engine_facade_is_at_most_250_lines(package_files: dict[str, Path]) -> None:
    lines = line_count(package_files[f"{PACKAGE}.engine"])
    assert lines <= MAX_ENGINE_LINES, f"engine.py has {lines} lines; the façade may have {MAX_ENGINE_LINES}"


def test_no_function_is_over_50_lines(package_files: dict[str, Path]) -> None:
    """``def`` line to last line, docstring excluded (see the module docstring)."""
    offenders = long_functions(package_files)
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines (docstring excluded):\n" + "\n".join(
        map(str, offenders)
    )


@pytest.fixture(scope="module")
def benchmark_files() -> dict[str, Path]:
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    if not root.is_dir():
        pytest.skip("benchmarks/ is not part of this installation")
    return modules(root, "benchmarks")


def test_benchmarks_follow_the_size_and_cycle_rules(benchmark_files: dict[str, Path]) -> None:
    offenders = [*long_modules(benchmark_files), *map(str, long_functions(benchmark_files))]
    assert not offenders, "benchmarks over the size limits:\n" + "\n".join(offenders)
    cycles = import_cycles(import_graph(benchmark_files))
    assert not cycles, "import cycles in benchmarks/:\n" + format_cycles(cycles)


def test_benchmark_entry_scripts_import_only_the_harness(benchmark_files: dict[str, Path]) -> None:
    graph = import_graph(benchmark_files)
    packages = {"benchmarks.harness", "benchmarks.children", "benchmarks.tests"}
    scripts = {name for name in graph if name.count(".") == 1 and name not in packages}
    importers = [name for name in graph if not name.startswith("benchmarks.tests")]  # tests run the scripts
    crossing = sorted(f"{name} -> {target}" for name in importers for target in graph[name] & scripts)
    assert not crossing, "benchmark entry scripts used as libraries:\n" + "\n".join(crossing)


def test_no_import_cycle_between_modules(package_files: dict[str, Path]) -> None:
    graph = import_graph(package_files)
    # The resolution rules at work on edges the package is known to have.
    assert f"{PACKAGE}.engine" in graph[PACKAGE]  # lazy import inside __getattr__
    assert f"{PACKAGE}.report.collector" in graph[f"{PACKAGE}.report"]  # package __init__ -> submodule
    assert f"{PACKAGE}.report.curves" in graph[f"{PACKAGE}.report.collector"]  # from package import submodule
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + format_cycles(cycles)


def _part(module: str) -> str:
    """``anomalib_tiled.config.format`` -> ``config``; the package itself -> ``""``."""
    return module.split(".")[1] if "." in module else ""


def layer_violations(graph: dict[str, set[str]], rules: dict[str, tuple[str, ...]]) -> list[str]:
    """``importer -> imported`` edges that :data:`LAYER_RULES`-style ``rules`` forbid."""
    found = []
    for importer, imported in sorted(graph.items()):
        rule = rules.get(_part(importer), ())
        allowed = {name[1:] for name in rule if name.startswith("!")}
        forbidden = {name for name in rule if not name.startswith("!")}
        for target in sorted(imported):
            part = _part(target)
            if part == _part(importer) or part in allowed:
                continue
            if "*" in forbidden or part in forbidden:
                found.append(f"{importer} -> {target}")
    return found


def test_imports_follow_the_layers(package_files: dict[str, Path]) -> None:
    violations = layer_violations(import_graph(package_files), LAYER_RULES)
    assert not violations, "imports against the layers (docs/architecture.md):\n" + "\n".join(violations)


def test_only_the_cli_and_the_integration_import_the_cli(package_files: dict[str, Path]) -> None:
    graph = import_graph(package_files)
    importers = sorted(
        name
        for name, imported in graph.items()
        if any(_part(target) == "cli" for target in imported) and _part(name) not in {"cli", "integration"}
    )
    assert importers == [f"{PACKAGE}.__main__"], f"modules importing cli/: {importers}"


def test_the_top_level_holds_at_most_12_modules(package_files: dict[str, Path]) -> None:
    top = sorted(
        path.name for name, path in package_files.items() if name.count(".") <= 1 and path.parent == package_dir()
    )
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} modules at the top level: {top}"


def test_every_subpackage_says_its_role_in_one_line(package_files: dict[str, Path]) -> None:
    for name, path in package_files.items():
        if path.name != "__init__.py" or name == PACKAGE:
            continue
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        summary, _, rest = (docstring or "").partition("\n")
        assert summary.endswith("."), f"{path}: its docstring starts with one line saying the subpackage's role"
        assert not rest or rest.startswith("\n"), f"{path}: the role fits in the docstring's first line"


def documented_modules(text: str) -> set[str]:
    """Module paths in the first column of the "Module map" table of ``docs/architecture.md``."""
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {path for row in rows for path in re.findall(r"`([\w/]+\.py)`", row.split("|")[1])}


def test_the_module_map_lists_every_module_and_nothing_else(package_files: dict[str, Path]) -> None:
    root = package_dir()
    files = {path.relative_to(root).as_posix() for path in package_files.values() if path.name != "__init__.py"}
    documented = documented_modules(ARCHITECTURE_DOC.read_text(encoding="utf-8"))
    assert not files - documented, (
        f"modules missing from docs/architecture.md's module map: {sorted(files - documented)}"
    )
    assert not documented - files, f"docs/architecture.md lists modules that do not exist: {sorted(documented - files)}"


# -- the checker itself, on tiny packages ----------------------------------------------------------


def _write_package(root: Path, sources: dict[str, str]) -> dict[str, Path]:
    for relative, source in sources.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
    return modules(root, "pkg")


def test_function_length_excludes_the_docstring_only(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(48))
    source = (
        "@decorator\n"
        f'def documented():\n    """One\n\n    two.\n    """\n{body}\n    # a comment counts\n\n    return 1\n'
        "class C:\n    def method(self):\n        def inner():\n            pass\n        return inner\n"
    )
    (tmp_path / "m.py").write_text(source, encoding="utf-8")
    lengths = {f.where.split(" ")[0]: f.length for f in function_lengths(tmp_path / "m.py", "m")}
    assert lengths == {"m.documented": 1 + 48 + 3, "m.C.method": 4, "m.C.method.inner": 2}
    assert [str(f) for f in long_functions({"m": tmp_path / "m.py"})] == ["m.documented (line 2): 52 lines"]


def test_imports_are_resolved_and_cycles_printed(tmp_path: Path) -> None:
    files = _write_package(
        tmp_path / "pkg",
        {
            "__init__.py": "def __getattr__(name):\n    from pkg.engine import Engine\n    return Engine\n",
            "engine.py": "from pkg.cli import main\nfrom pkg import helpers\n",
            "helpers.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.engine import Engine\n",
            "cli/__init__.py": "from .commands import run\n",
            "cli/commands.py": "def run():\n    from ..engine import Engine\n",
            "cli/other.py": "from .. import helpers\nimport pkg.cli\n",
        },
    )
    graph = import_graph(files)
    assert graph == {
        "pkg": {"pkg.engine"},
        "pkg.engine": {"pkg.cli", "pkg.helpers"},
        "pkg.helpers": set(),  # TYPE_CHECKING imports never run
        "pkg.cli": {"pkg.cli.commands"},
        "pkg.cli.commands": {"pkg.engine"},
        "pkg.cli.other": {"pkg.helpers", "pkg.cli"},
    }
    assert format_cycles(import_cycles(graph)) == "pkg.cli -> pkg.cli.commands -> pkg.engine -> pkg.cli"
    del graph["pkg.cli.commands"]
    graph["pkg.cli"] = set()
    assert import_cycles(graph) == []


def test_module_length_counts_physical_lines(tmp_path: Path) -> None:
    files = _write_package(tmp_path / "pkg", {"a.py": "x = 1\n" * 401, "b.py": "x = 1\n" * 400})
    assert long_modules(files) == ["pkg.a: 401 lines"]


def test_layer_violations_name_the_forbidden_edges() -> None:
    graph = {
        "pkg.settings": {"pkg.errors", "pkg.merge.x"},
        "pkg.config.a": {"pkg.config.b", "pkg.stages.train"},
        "pkg.config.b": set(),
        "pkg.stages.train": {"pkg.config.a"},
    }
    rules = {"settings": ("*", "!errors"), "config": ("stages",)}
    assert layer_violations(graph, rules) == ["pkg.config.a -> pkg.stages.train", "pkg.settings -> pkg.merge.x"]


def test_documented_modules_come_from_the_first_column_of_the_map() -> None:
    table = "| Module | Holds |\n| --- | --- |\n| `a.py`, `b/c.py` | see `d.py` |\n"
    text = f"## Module map\n\n{table}\n## Seams\n| `e.py` | x |\n"
    assert documented_modules(text) == {"a.py", "b/c.py"}
