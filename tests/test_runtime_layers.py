"""The runtime's sub-packages import each other only along the data flow (docs/ARCHITECTURE.md).

Read from the source with ``ast``, so the check covers imports inside functions too, and fails
when a new module adds an edge the architecture does not have (and with it, possibly, a cycle).
"""
from __future__ import annotations

import ast
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"

#: package -> the runtime packages it may import (besides itself).
ALLOWED = {
    "atomic": set(),
    "knowledge": {"atomic"},
    "sources": set(),
    "rom": set(),
    "learn": set(),
    "mapping": {"knowledge"},
    "exchange": {"atomic", "knowledge", "mapping"},
    "cli": {"device", "exchange", "knowledge", "rom", "sources"},
    "device": {"atomic", "exchange", "knowledge", "mapping", "rom", "sources", "learn"},
    "machine": set(),
}


def _package_of(path: Path) -> str:
    rel = path.relative_to(RUNTIME)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["skill_edge", "runtime"] and len(parts) > 2:
                found.add(parts[2])
    return found


def edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in RUNTIME.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == RUNTIME:
            continue
        pkg = _package_of(path)
        graph.setdefault(pkg, set()).update(_imported_packages(path) - {pkg})
    return graph


def test_every_runtime_package_is_known():
    assert set(edges()) == set(ALLOWED), "a new runtime package needs a row in ALLOWED and in ARCHITECTURE.md"


def test_packages_import_only_along_the_data_flow():
    bad = {pkg: sorted(deps - ALLOWED[pkg]) for pkg, deps in edges().items() if deps - ALLOWED[pkg]}
    assert not bad, f"runtime packages import outside the architecture: {bad}"


def test_no_import_cycle_between_packages():
    graph = edges()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(trail + [node, nxt])}"
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])
