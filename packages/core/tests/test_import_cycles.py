"""The core package's modules import each other without circles (DESIGN.md §6).

Every ``import`` / ``from ... import`` of a ``plugtune`` module counts, also those inside
functions (a lazy import still makes the two modules depend on each other); only imports
under ``if TYPE_CHECKING:`` do not. A circle of any length fails, naming its modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import plugtune

ROOT = Path(plugtune.__file__).parent


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, modname: str, is_pkg: bool, known: set[str]) -> set[str]:
    """``plugtune`` modules that ``tree`` imports (``from pkg import sub`` -> ``pkg.sub``)."""
    found: set[str] = set()

    def target(name: str) -> str | None:
        while name and name not in known:  # plugtune.data.DataError -> plugtune.data
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("plugtune"):
                    found.add(target(alias.name))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = modname if is_pkg else modname.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            if base.split(".")[0] == "plugtune":
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    found.add(full if full in known else target(base))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(None)
    found.discard(modname)
    # importing a module also runs its package's __init__: that is the package's own business
    return {m for m in found if not modname.startswith(m + ".")}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``module -> plugtune modules it imports`` for every ``.py`` file under ``root``."""
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    known = set(files)
    return {m: _imports(ast.parse(p.read_text(encoding="utf-8")), m, p.name == "__init__.py", known)
            for m, p in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_core_package_has_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles in plugtune: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_sees_long_and_lazy_circles(tmp_path):
    pkg = tmp_path / "plugtune"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from plugtune.b import x\n")
    (pkg / "b.py").write_text("def f():\n    from plugtune.sub import c\n")  # lazy: still counts
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from .. import a\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from plugtune import a\n")
    (pkg / "e.py").write_text("import plugtune.d\n")
    cycles = find_cycles(import_graph(pkg))
    assert cycles == [["plugtune.a", "plugtune.b", "plugtune.sub.c"]]


def test_methods_do_not_import_train():
    graph = import_graph()
    methods = [m for m in graph if m.startswith("plugtune.methods.")]
    assert {"plugtune.methods.sft", "plugtune.methods.dpo"} <= set(methods)
    for m in methods:
        assert "plugtune.train" not in graph[m], f"{m} imports plugtune.train"
    assert not any(m.startswith("plugtune.methods") for m in graph["plugtune.train"])
