"""No import cycles among the project's Python modules (offload_daemon, nic_model, bench).

Imports are read with `ast`, not executed: every `import` / `from ... import` anywhere in
a module counts, at the top or inside a function (a function-level import only delays a
cycle to the first call; it is still a cycle), and `X.Y` also imports the packages above
it (their __init__ runs first) unless the importer is inside them already.

TYPE_CHECKING-only imports are collected separately and DO count, in a test of their own:
they cannot fail at run time, but they are the same dependency (the lower layer knowing the
upper), and `if TYPE_CHECKING:` is exactly how a cycle gets hidden instead of removed. The
runtime test says which cycles break an import; the type-only test says which ones break
the layering (docs/layout.md).

KNOWN_CYCLES is the allowance for a cycle someone is removing right now: a cycle whose
modules are exactly one of its entries makes the test xfail instead of fail (any other cycle,
or a known one that grew, still fails); an entry that is no longer a cycle makes
test_known_cycles_are_still_there warn (PytestWarning) that it is to be removed.
"""

from __future__ import annotations

import ast
import dataclasses
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("offload_daemon", "nic_model", "bench")

# Cycles being removed right now, each as its set of modules. Remove an entry when its cycle
# is gone (test_known_cycles_are_still_there warns until then). Empty: no allowance.
KNOWN_CYCLES: list[frozenset[str]] = [
    # e.g. frozenset({"offload_daemon.tcp", "offload_daemon.daemon", "offload_daemon.host"}),
    # (tcp.py -> daemon.py / host.py, TYPE_CHECKING only; gone: tcp.py has a narrow interface)
]


@dataclasses.dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    where: str          # path:line
    kind: str           # "top level", "in a function", "TYPE_CHECKING only"


def module_files() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            if any(not p.isidentifier() for p in parts):
                continue
            mods[".".join(parts)] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import node with its kind, found by walking the whole tree."""
    out: list[tuple[ast.Import | ast.ImportFrom, str]] = []

    def visit(node: ast.AST, in_func: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            func = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit_one(stmt, func, True)
                for stmt in child.orelse:
                    visit_one(stmt, func, type_only)
                continue
            visit_one(child, func, type_only)

    def visit_one(node: ast.AST, in_func: bool, type_only: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            kind = "TYPE_CHECKING only" if type_only else "in a function" if in_func else "top level"
            out.append((node, kind))
        visit(node, in_func or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)), type_only)

    visit(tree, False, False)
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_edges() -> list[Edge]:
    mods = module_files()
    edges: list[Edge] = []
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        own = {mod, *_ancestors(mod)}
        for node, kind in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    pkg = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    pkg = node.module or ""
                targets = [pkg]
                targets += [f"{pkg}.{a.name}" for a in node.names if f"{pkg}.{a.name}" in mods]
            for target in targets:
                for dst in [target, *_ancestors(target)]:
                    if dst in mods and dst not in own:
                        where = f"{path.relative_to(ROOT)}:{node.lineno}"
                        edges.append(Edge(mod, dst, where, kind))
    return edges


def cycles(edges: list[Edge]) -> list[tuple[frozenset[str], list[Edge]]]:
    """Each strongly connected component with more than one module (or a self-import), with
    one cycle through it as edges (where each import is)."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e.src, {}).setdefault(e.dst, e)
        graph.setdefault(e.dst, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[set[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan; the graph is small
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            strong(v)
    found = []
    for comp in comps:
        start = min(comp)
        if len(comp) == 1 and start not in graph[start]:
            continue
        # shortest way from start back to start inside the component (BFS)
        prev: dict[str, Edge] = {}
        queue = [start]
        seen = {start}
        path: list[Edge] = []
        while queue and not path:
            v = queue.pop(0)
            for w, e in sorted(graph[v].items()):
                if w not in comp:
                    continue
                if w == start:
                    path = [e]
                    while path[0].src != start:
                        path.insert(0, prev[path[0].src])
                    break
                if w not in seen:
                    seen.add(w)
                    prev[w] = e
                    queue.append(w)
        found.append((frozenset(comp), path))
    return sorted(found, key=lambda c: sorted(c[0]))


def describe(comp: frozenset[str], path: list[Edge], edges: list[Edge] | None = None) -> str:
    """The modules, one cycle through them, and every import between them."""
    lines = [f"cycle among {', '.join(sorted(comp))}:"]
    lines += [f"    {e.src} -> {e.dst}  ({e.where}, {e.kind})" for e in path]
    inside = sorted({(e.src, e.dst, e.where, e.kind) for e in edges or [] if e.src in comp and e.dst in comp})
    if len(inside) > len(path):
        lines.append("  all imports inside it:")
        lines += [f"    {s} -> {d}  ({w}, {k})" for s, d, w, k in inside]
    return "\n".join(lines)


def check(edges: list[Edge]) -> None:
    found = cycles(edges)
    unknown = [c for c in found if c[0] not in KNOWN_CYCLES]
    if unknown:
        text = "\n".join(describe(*c, edges) for c in unknown)
        pytest.fail(f"{len(unknown)} import cycle(s):\n{text}", pytrace=False)
    if found:
        pytest.xfail("known cycle(s), being removed (KNOWN_CYCLES):\n" + "\n".join(describe(*c, edges) for c in found))


def test_no_runtime_import_cycles() -> None:
    """Imports that run (top level and function level) form no cycle."""
    check([e for e in import_edges() if e.kind != "TYPE_CHECKING only"])


def test_no_import_cycles_counting_type_only_imports() -> None:
    """Not even with the TYPE_CHECKING-only imports (see the module docstring for why)."""
    check(import_edges())


def test_known_cycles_are_still_there() -> None:
    found = {c[0] for c in cycles(import_edges())}
    for k in KNOWN_CYCLES:
        if k not in found:
            warnings.warn(pytest.PytestWarning(
                f"no longer a cycle: remove {sorted(k)} from KNOWN_CYCLES in {__file__}"), stacklevel=1)


def test_the_checker_sees_cycles(tmp_path: Path) -> None:
    """The parser and the cycle finder on made-up edges and source."""
    edges = [Edge("a", "b", "a.py:1", "top level"), Edge("b", "c", "b.py:1", "in a function"),
             Edge("c", "a", "c.py:1", "TYPE_CHECKING only"), Edge("c", "d", "c.py:2", "top level")]
    (comp, path), = cycles(edges)
    assert comp == {"a", "b", "c"} and [e.src for e in path] == ["a", "b", "c"]
    assert cycles(edges[:2] + edges[3:]) == []
    src = ("from typing import TYPE_CHECKING\nimport x\nif TYPE_CHECKING:\n    import y\n"
           "def f():\n    import z\n")
    kinds = {n.names[0].name: k for n, k in _imports(ast.parse(src)) if isinstance(n, ast.Import)}
    assert kinds == {"x": "top level", "y": "TYPE_CHECKING only", "z": "in a function"}
