"""The package's modules import each other without cycles, counting imports written inside functions too (a
cycle hidden in a function still means two modules that cannot be understood one without the other)."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "dialogsum"


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules that ``path`` imports anywhere in its source (functions and ``if TYPE_CHECKING:``
    blocks included: a module needed only for annotations is still one a reader must understand first)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "dialogsum":
                continue
            found.update(parts[1:2] if len(parts) > 1 else (alias.name for alias in node.names))
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("dialogsum."))
    return (found & modules) - {path.stem}


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports."""
    files = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: _imports(path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_inside_functions_too(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("def f():\n    from dialogsum.b import x\n")
    (tmp_path / "b.py").write_text("from dialogsum import a\n")
    (tmp_path / "c.py").write_text("import dialogsum.a\n")
    names = {"a", "b", "c"}
    graph = {name: _imports(tmp_path / f"{name}.py", names) for name in names}
    assert graph == {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_package_modules_import_each_other_without_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 20 and "checkpointing" in graph["run_folder"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])
