"""The import rules of docs/ARCHITECTURE.md, read from the source with ``ast`` (nothing is imported):

(a) no import of a project module (``spae``, ``pipeline``, ``jobs``) inside a function or method,
    unless the import line (or the line above it) says why with a ``# lazy: <reason>`` comment;
    third-party imports are not checked (an optional heavy dependency may be imported where used);
(b) imports point ``jobs -> pipeline -> spae`` only: ``spae`` never imports ``pipeline`` or ``jobs``,
    ``pipeline`` never imports ``jobs`` (anywhere: module level, functions, ``TYPE_CHECKING`` blocks,
    ``importlib.import_module("...")`` with a literal name);
(c) the module-level import graph (``TYPE_CHECKING`` blocks excluded, class bodies included: they run
    at import) has no cycle.

Every failure lists its offenders as ``file:line``.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("spae", "pipeline", "jobs")  # in layer order: each may import only those before it
LAZY = re.compile(r"#\s*lazy:\s*\S.{2,}")  # "# lazy: <reason>", the reason at least 3 characters


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository root, e.g. "spae/metrics.py"
    line: int
    source: str  # the importing module, e.g. "spae.metrics"
    target: str  # the imported project module (or package), e.g. "spae.fvd"
    in_function: bool
    type_checking: bool
    lazy_comment: bool  # "# lazy: <reason>" on the import's lines or the line above
    dynamic: bool = False  # importlib.import_module("...") / __import__("...")

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@cache
def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the three packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _module_of(path: Path) -> tuple[str, bool]:
    """(dotted name, is a package ``__init__``)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _is_project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The project modules an import statement loads: ``from a import b`` names ``a.b`` where that is a
    module, else ``a``; relative imports are resolved against ``module``."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if _is_project(a.name)]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    if not _is_project(base):
        return []
    known = modules()
    return sorted({f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names})


def _dynamic_target(node: ast.Call) -> str:
    """The literal module name of ``importlib.import_module("x")`` / ``__import__("x")``, else ""."""
    f = node.func
    named = (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
        isinstance(f, ast.Name) and f.id in ("import_module", "__import__")
    )
    if named and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
        return node.args[0].value
    return ""


@cache
def imports_of(path: Path) -> tuple[Import, ...]:
    return scan(path.read_text(), path.relative_to(ROOT).as_posix())


def scan(text: str, rel: str) -> tuple[Import, ...]:
    """Every project import in the source ``text`` of file ``rel``, with where it sits (function body,
    ``TYPE_CHECKING`` block)."""
    lines = text.splitlines()
    module, is_package = _module_of(ROOT / rel)
    found: list[Import] = []

    def commented(node: ast.stmt) -> bool:
        first, last = node.lineno, node.end_lineno or node.lineno
        return any(LAZY.search(lines[i - 1]) for i in range(max(first - 1, 1), last + 1))

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                lazy = commented(child)
                for target in _targets(child, module, is_package):
                    found.append(Import(rel, child.lineno, module, target, in_function, type_checking, lazy))
            elif isinstance(child, ast.Call) and _is_project(target := _dynamic_target(child)):
                found.append(
                    Import(rel, child.lineno, module, target, in_function, type_checking, False, True)
                )
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), in_function, True)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), in_function, type_checking)
                continue
            nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, in_function or nested, type_checking)

    visit(ast.parse(text, filename=rel), False, False)
    return tuple(found)


def all_imports() -> list[Import]:
    return [imp for path in modules().values() for imp in imports_of(path)]


# ----------------------------------------------------------------------------- the three rules


def function_level_offenders() -> list[str]:
    """(a) project imports inside a function without a ``# lazy: <reason>`` comment."""
    return [
        f"{imp.where}: imports {imp.target} inside a function"
        for imp in all_imports()
        if imp.in_function and not imp.dynamic and not imp.lazy_comment
    ]


def layer_offenders() -> list[str]:
    """(b) an import against ``jobs -> pipeline -> spae``."""
    rank = {pkg: i for i, pkg in enumerate(PACKAGES)}
    return [
        f"{imp.where}: {imp.source} ({imp.source.split('.')[0]}) imports {imp.target}"
        for imp in all_imports()
        if rank[imp.target.split(".")[0]] > rank[imp.source.split(".")[0]]
    ]


def module_graph() -> dict[str, dict[str, str]]:
    """Module -> {imported module: "file:line"} of the imports that run when the module is imported."""
    graph: dict[str, dict[str, str]] = {name: {} for name in modules()}
    for imp in all_imports():
        if not (imp.in_function or imp.type_checking or imp.dynamic) and imp.target != imp.source:
            graph[imp.source].setdefault(imp.target, imp.where)
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as one cycle through
    all of its modules' edges found by a walk, in a deterministic order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # the graph is ~100 modules: recursion depth is no concern
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in graph:
                continue
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(components)


def _one_cycle(graph: dict[str, dict[str, str]], component: list[str]) -> list[str]:
    """A closed path inside ``component``, from its first module: [a, b, ..., a]."""
    members, start = set(component), component[0]
    path, seen = [start], {start}
    while True:
        nxt = next(w for w in sorted(graph[path[-1]]) if w in members)
        if nxt in seen:
            return path[path.index(nxt) :] + [nxt]
        path.append(nxt)
        seen.add(nxt)


def cycle_offenders() -> list[str]:
    """(c) each import cycle as its modules, then each edge of one closed path with its file:line."""
    graph = module_graph()
    out = []
    for component in cycles(graph):
        path = _one_cycle(graph, component)
        edges = ", ".join(f"{a} -> {b} ({graph[a][b]})" for a, b in zip(path, path[1:], strict=False))
        out.append(f"cycle among {', '.join(component)}: {edges}")
    return out


def _report(offenders: list[str]) -> str:
    return "\n".join(["", *offenders])


def test_no_function_level_import_of_a_project_module_without_a_reason():
    offenders = function_level_offenders()
    assert not offenders, (
        "move these imports to module level (break a loop by moving the shared code into a small module); "
        "only an optional heavy dependency stays lazy, with '# lazy: <reason>' on its line:"
        + _report(offenders)
    )


PIPELINE_BASE = ("pipeline.inputs", "pipeline.outputs", "pipeline.runtime")  # what jobs' steps build on
PIPELINE_TOP = ("pipeline.steps", "pipeline.llm")


def group_offenders() -> list[str]:
    """Inside ``pipeline``: the base groups (inputs, outputs, runtime) never import a step or the LLM code."""
    return [
        f"{imp.where}: {imp.source} imports {imp.target}"
        for imp in all_imports()
        if imp.source.startswith(PIPELINE_BASE) and imp.target.startswith(PIPELINE_TOP)
    ]


def test_pipeline_base_groups_never_import_the_steps():
    offenders = group_offenders()
    assert not offenders, "pipeline.inputs/outputs/runtime must not import steps or llm:" + _report(offenders)


def test_imports_point_jobs_to_pipeline_to_spae_only():
    offenders = layer_offenders()
    assert not offenders, "imports must point jobs -> pipeline -> spae only:" + _report(offenders)


def test_module_level_imports_have_no_cycle():
    offenders = cycle_offenders()
    assert not offenders, "import cycles at module level:" + _report(offenders)


# ----------------------------------------------------------------------------- the checker itself


def test_the_checker_sees_function_level_type_checking_relative_and_dynamic_imports():
    source = (
        "from typing import TYPE_CHECKING\n"
        "import torch\n"
        "from spae.fvd import FVD\n"
        "from . import config\n"
        "if TYPE_CHECKING:\n"
        "    from pipeline.runtime.storage import Location\n"
        "class A:\n"
        "    from spae import video\n"
        "def f():\n"
        "    import open_clip\n"
        "    from spae.codebook import FrozenCodebook\n"
        "    # lazy: an optional heavy dependency\n"
        "    from spae.scorers import OpenCLIPScorer\n"
        "    importlib.import_module('jobs.cli')\n"
    )
    found = {(i.line, i.target): i for i in scan(source, "spae/metrics.py")}
    assert sorted(found) == [
        (3, "spae.fvd"),
        (4, "spae.config"),
        (6, "pipeline.runtime.storage"),
        (8, "spae.video"),
        (11, "spae.codebook"),
        (13, "spae.scorers"),
        (14, "jobs.cli"),
    ]
    assert not found[(3, "spae.fvd")].in_function and not found[(8, "spae.video")].in_function
    assert found[(6, "pipeline.runtime.storage")].type_checking
    assert found[(11, "spae.codebook")].in_function and not found[(11, "spae.codebook")].lazy_comment
    assert found[(13, "spae.scorers")].lazy_comment
    assert found[(14, "jobs.cli")].dynamic


def test_cycles_are_found_and_named_with_their_lines():
    graph = {
        "spae.a": {"spae.b": "spae/a.py:3"},
        "spae.b": {"spae.c": "spae/b.py:4"},
        "spae.c": {"spae.a": "spae/c.py:5"},
        "spae.d": {"spae.a": "spae/d.py:1"},
    }
    assert cycles(graph) == [["spae.a", "spae.b", "spae.c"]]
    assert _one_cycle(graph, ["spae.a", "spae.b", "spae.c"]) == ["spae.a", "spae.b", "spae.c", "spae.a"]
    graph["spae.c"] = {}
    assert cycles(graph) == []
