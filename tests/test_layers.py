"""The package's import graph: no cycle, and no import up a layer (docs/architecture.md).

Every `import` statement of megatron_opcd/, at module level, inside a function or under
`if TYPE_CHECKING:`, is read with `ast`; nothing is imported, so this needs neither torch nor
megatron-core and is not in conftest's MCORE_MODULES: it runs once, in `make test-311`. The
layers are the table of docs/architecture.md, read from there, so the picture the docs show is
the one the test holds the code to.
"""

from __future__ import annotations

import ast
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "megatron_opcd"
DOC = ROOT / "docs" / "architecture.md"


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    path: str  # relative to the repository
    line: int
    lazy: bool  # inside a function

    def where(self) -> str:
        return f"{self.path}:{self.line}{', in a function' if self.lazy else ''}"


def package_modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        modules[".".join(parts)] = (path, is_package)
    return modules


def _imported(module: str, is_package: bool, node: ast.AST, modules) -> list[str]:
    """The in-package modules one statement (or import_module call) depends on."""
    named: list[str] = []
    if isinstance(node, ast.Import):
        named = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: `from . import x` in a/b.py is `from a import x`
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        # `from a import b` reads b off the package a (running a's __init__), and imports a.b
        # where b is a submodule: it depends on both.
        named = [source] + [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in modules]
    elif isinstance(node, ast.Call):
        named = [node.args[0].value]
    found = []
    for name in named:
        while name not in modules and "." in name:  # `import a.b.Class`-like names: the module part
            name = name.rpartition(".")[0]
        if name in modules and name != module:
            found.append(name)
    return found


def _is_import_module_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call) or not node.args:
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    first = node.args[0]
    return (name in ("import_module", "__import__") and isinstance(first, ast.Constant)
            and isinstance(first.value, str) and first.value.startswith(PACKAGE))


def module_edges(module: str, is_package: bool, tree: ast.AST, path: str, modules) -> list[Edge]:
    """The edges of one parsed module, each marked lazy when it sits inside a function."""
    edges = []

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)) or _is_import_module_call(node):
            edges.extend(Edge(module, target, path, node.lineno, lazy)
                         for target in _imported(module, is_package, node, modules))
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return edges


def import_edges() -> list[Edge]:
    modules = package_modules()
    edges = []
    for module, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges += module_edges(module, is_package, tree, str(path.relative_to(ROOT)), modules)
    return edges


def layers() -> list[tuple[int, list[str]]]:
    """The table of docs/architecture.md under its `| layer | modules | ...` header:
    [(layer, [module names; a package stands for its modules])], bottom first."""
    rows, inside = [], False
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == ["layer", "modules"]:
            inside = True
        elif inside and not line.startswith("|"):
            break
        elif inside and cells[0].isdigit():
            names = re.findall(r"`([\w.]+)`", cells[1])
            rows.append((int(cells[0]), [PACKAGE if n == "__init__" else f"{PACKAGE}.{n}" for n in names]))
    assert rows, f"{DOC} holds no layer table (a '| layer | modules | ... |' header, then '| n | `module`, ... |' rows)"
    return rows


def layer_of(module: str, table) -> tuple[int, str]:
    """(layer, the table entry it belongs to): the longest entry that is the module or a package above it."""
    best = None
    for layer, names in table:
        for name in names:
            if module == name or (module.startswith(name + ".") and name != PACKAGE):
                if best is None or len(name) > len(best[1]):
                    best = (layer, name)
    return best


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def strongconnect(v: str) -> None:  # recursion depth <= number of modules (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return sorted(found, key=lambda c: (-len(c), c))


def shortest_cycle(start: str, members: set[str], edges: list[Edge]) -> list[Edge]:
    """The shortest chain of edges inside one component from `start` back to `start` (BFS)."""
    out: dict[str, list[Edge]] = {}
    for e in edges:
        if e.source in members and e.target in members:
            out.setdefault(e.source, []).append(e)
    previous: dict[str, Edge] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for e in sorted(out.get(v, []), key=lambda e: (e.target, e.line)):
            if e.target == start:
                chain = [e]
                while chain[0].source != start:
                    chain.insert(0, previous[chain[0].source])
                return chain
            if e.target not in previous:
                previous[e.target] = e
                queue.append(e.target)
    raise AssertionError(f"{start} is in a component but on no cycle")


def _short(module: str) -> str:
    return module[len(PACKAGE) + 1:] if module.startswith(PACKAGE + ".") else module


def describe_cycles(edges: list[Edge]) -> str:
    """Each component: its modules, then the shortest cycle through each of them (deduplicated)."""
    lines = []
    for component in cycles(edges):
        lines.append(f"import cycle of {len(component)} modules: {', '.join(map(_short, component))}")
        seen = set()
        for module in component:
            chain = shortest_cycle(module, set(component), edges)
            key = frozenset((e.source, e.target) for e in chain)
            if key in seen:
                continue
            seen.add(key)
            lines.append("  " + " -> ".join([_short(chain[0].source)] + [_short(e.target) for e in chain]))
            lines.extend(f"      {_short(e.source)} -> {_short(e.target)}  ({e.where()})" for e in chain)
    return "\n".join(lines)


def test_every_module_has_a_layer_and_every_table_entry_exists():
    table = layers()
    modules = package_modules()
    missing = sorted(m for m in modules if layer_of(m, table) is None)
    assert not missing, (f"modules in no layer of {DOC.relative_to(ROOT)}: {', '.join(missing)}; "
                         "add each (or its package) to the row it belongs to")
    listed = [name for _, names in table for name in names]
    unknown = [n for n in listed if n not in modules]
    assert not unknown, f"the layer table names modules that do not exist: {', '.join(unknown)}"
    duplicated = sorted({n for n in listed if listed.count(n) > 1})
    assert not duplicated, f"the layer table lists these in two rows: {', '.join(duplicated)}"
    assert [layer for layer, _ in table] == list(range(len(table))), "layers are numbered 0, 1, 2, ... bottom first"


def test_no_import_cycle():
    report = describe_cycles(import_edges())
    assert not report, ("the package's imports form cycles (function-level imports included): break each one "
                        "by moving what both sides need down a layer\n" + report)


def test_no_import_points_up_a_layer():
    table = layers()
    upward = []
    for e in import_edges():
        if layer_of(e.source, table) is None or layer_of(e.target, table) is None:
            continue  # a module in no layer: the first test names it
        (low, low_name), (high, high_name) = layer_of(e.source, table), layer_of(e.target, table)
        if high > low:
            upward.append(f"  {_short(e.source)} (layer {low}, {_short(low_name)}) imports {_short(e.target)} "
                          f"(layer {high}, {_short(high_name)})  ({e.where()})")
    assert not upward, (f"imports that point up a layer ({DOC.relative_to(ROOT)}): move the code both need "
                        "down, or the importing code up\n" + "\n".join(sorted(upward)))


def test_errors_imports_nothing_of_the_package():
    edges = [e for e in import_edges() if e.source == f"{PACKAGE}.errors"]
    assert not edges, "megatron_opcd/errors.py must import nothing of the package: " + ", ".join(
        f"{_short(e.target)} ({e.where()})" for e in edges)


def test_the_walker_sees_every_form_of_import():
    """The graph's own check: each form of import in a made-up module megatron_opcd/a/b.py is an edge."""
    root, a, c, d = PACKAGE, f"{PACKAGE}.a", f"{PACKAGE}.a.c", f"{PACKAGE}.d"
    modules = {root, a, f"{PACKAGE}.a.b", c, d}
    source = ("import megatron_opcd.d\n"                      # 1: the module named
              "from . import c\n"                             # 2: the package a and its submodule c
              "from .c import thing\n"                        # 3: c (thing is not a module)
              "from megatron_opcd.a import c as see\n"        # 4: as 2
              "from .. import d\n"                            # 5: the root package and d
              "import os.path\n"                              # 6: not ours: nothing
              "class K:\n"
              "    from megatron_opcd.a.c import thing\n"     # 8: a class body runs at import: not lazy
              "def f():\n"
              "    import importlib\n"
              "    importlib.import_module('megatron_opcd.a.c')\n")  # 11: a literal name counts, lazy
    edges = module_edges(f"{PACKAGE}.a.b", False, ast.parse(source), "a/b.py", modules)
    assert [(e.line, e.target, e.lazy) for e in edges] == [
        (1, d, False), (2, a, False), (2, c, False), (3, c, False), (4, a, False), (4, c, False),
        (5, root, False), (5, d, False), (8, c, False), (11, c, True)], edges


def test_cycles_are_found_and_named():
    """The graph's own check: a three-module cycle is one component, named with its lines; the
    module it also imports (outside the cycle) is not in it."""
    a, b, c, d = (f"{PACKAGE}.{m}" for m in "abcd")
    edges = [Edge(a, b, "a.py", 1, False), Edge(b, c, "b.py", 2, True), Edge(c, a, "c.py", 3, False),
             Edge(c, d, "c.py", 4, False)]
    assert cycles(edges) == [[a, b, c]]
    report = describe_cycles(edges)
    assert report.splitlines()[:2] == ["import cycle of 3 modules: a, b, c", "  a -> b -> c -> a"], report
    assert "      b -> c  (b.py:2, in a function)" in report.splitlines(), report
    assert cycles(edges[:2] + edges[3:]) == []
