"""The import graph of havend's packages, and whether it has a cycle.

Reads every module under service/src/havend with ``ast`` (nothing is
imported), maps each ``import havend.x...`` / ``from havend.x... import`` to
the package it names (``havend.ship``, ``havend.target``, ``havend.volume``...:
the first component under ``havend``), and prints one line per package with
the packages it imports. Imports inside ``if TYPE_CHECKING:`` are left out
(they never run). Exit status 1 when the graph has a cycle, printed.

    .venv/bin/python tools/import_graph.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "service" / "src" / "havend"


def _package(path: Path) -> str:
    """``havend.<first component>`` of a module file."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return "havend." + parts[0] if parts[0] != "__init__" else "havend"


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(tree: ast.AST, module: str) -> set[str]:
    """The havend modules a module's code imports (TYPE_CHECKING blocks left out)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "havend")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package
                anchor = module.split(".")[: -node.level]
                base = ".".join(anchor + ([base] if base else []))
            if base == "havend":  # from havend import x: a module of havend, or a name
                found.update(
                    f"havend.{a.name}"
                    for a in node.names
                    if (ROOT / f"{a.name}.py").exists() or (ROOT / a.name).is_dir()
                )
            elif base.split(".")[0] == "havend":
                found.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        package = _package(path)
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        targets = edges.setdefault(package, set())
        for name in _imported(ast.parse(path.read_text(), str(path)), module):
            parts = name.split(".")
            other = "havend." + parts[1] if len(parts) > 1 else "havend"
            if other != package and other != "havend":  # havend itself: the version
                targets.add(other)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of two or more packages, as one cycle each."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                strong(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            strong(node)
    return found


def main() -> int:
    edges = graph()
    width = max(len(p) for p in edges)
    for package in sorted(edges):
        print(f"{package:<{width}} -> {', '.join(sorted(edges[package])) or '-'}")
    found = cycles(edges)
    for component in found:
        print(f"CYCLE between: {', '.join(component)}", file=sys.stderr)
    if not found:
        print("no import cycle between havend's packages")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
