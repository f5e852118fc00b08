"""The layers read top to bottom: core <- stages (siamese, keypoints, ranker) <- engine <- cli.

Reads every import (module level and inside functions) with ast and fails on an upward import or a
cycle between modules."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "siamese", "keypoints", "ranker", "engine")
# what each layer may import, besides itself and third-party packages
ALLOWED = {
    "core": set(),
    "siamese": {"core"},
    "keypoints": {"core"},
    "ranker": {"core"},
    "engine": {"core", "siamese", "keypoints", "ranker"},
    "cli": {"core", "siamese", "keypoints", "ranker", "engine"},
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path, known: set[str]) -> set[str]:
    """Project modules imported anywhere in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name in known:
                out.add(name)
    return out


def project_graph(root: Path, packages=PACKAGES, top=("cli",)) -> dict[str, set[str]]:
    files = [p for pkg in packages for p in (root / pkg).rglob("*.py")] + \
        [root / f"{t}.py" for t in top if (root / f"{t}.py").exists()]
    known = {module_name(p, root) for p in files}
    return {module_name(p, root): imports_of(p, root, known) - {module_name(p, root)} for p in files}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in graph.items():
        layer = mod.split(".")[0]
        for dep in deps:
            dep_layer = dep.split(".")[0]
            if dep_layer != layer and dep_layer not in ALLOWED.get(layer, set()):
                bad.append(f"{mod} imports {dep}")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (one per back edge)."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            # a package's __init__ is imported with its modules: not an edge of its own
            if node.startswith(dep + "."):
                continue
            if state.get(dep) == 1:
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_no_upward_import():
    assert upward_imports(project_graph(ROOT)) == []


def test_no_import_cycle():
    assert cycles(project_graph(ROOT)) == []


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "core" / "a.py").write_text("def f():\n    from engine.b import g\n")
    (tmp_path / "engine" / "b.py").write_text("from core.a import f\ng = 1\n")
    (tmp_path / "ranker" / "c.py").write_text("import core.a\nfrom siamese import d\n")
    (tmp_path / "siamese" / "d.py").write_text("import numpy\n")
    graph = project_graph(tmp_path)
    assert upward_imports(graph) == ["core.a imports engine.b", "ranker.c imports siamese",
                                     "ranker.c imports siamese.d"]
    assert cycles(graph) == [["core.a", "engine.b", "core.a"]]
