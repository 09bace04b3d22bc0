"""The import graph of the production packages, read from the source (nothing is imported).

    python -m tests.import_graph        # every package edge, then any cycle between modules

Every ``import`` and ``from ... import`` counts, also those inside functions (a lazy import that
hides a cycle is still a cycle).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LAYERS = ("core", "model_build", "worker", "batch")  # each may import only those before it
PACKAGES = LAYERS


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_graph(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports (only modules of :data:`PACKAGES` and tests/bench)."""
    modules = {
        _module_name(root, path): path for package in PACKAGES for path in sorted((root / package).rglob("*.py"))
    }
    known_roots = (*PACKAGES, "tests", "bench")
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in names:
                if target.split(".")[0] not in known_roots:
                    continue
                while target and target not in modules and target.split(".")[0] in PACKAGES:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def main() -> int:
    root = Path(__file__).resolve().parents[1]
    graph = module_graph(root)
    edges = sorted({(m.split(".")[0], t.split(".")[0]) for m, targets in graph.items() for t in targets})
    for source, target in edges:
        if source != target:
            print(f"{source} imports {target}")
    cycles = find_cycles(graph)
    print(f"{len(graph)} modules, {sum(len(t) for t in graph.values())} imports, {len(cycles)} cycles")
    for cycle in cycles:
        print("cycle: " + " <-> ".join(cycle))
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
