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
# worker's groups, in the same rule: each may import only those before it; the entry points at worker's top level
# (handler, run_job, __main__) may import any group. A job's data flows request -> generation -> output, and the
# handler, not the engine, hands images to output.
WORKER_GROUPS = ("request", "output", "prompting", "adapters", "model", "generation")


def worker_group(module: str) -> str | None:
    """The group of a worker module (``worker.generation.stages`` -> ``generation``), ``"top"`` for the entry
    points, None outside worker."""
    parts = module.split(".")
    if parts[0] != "worker":
        return None
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in WORKER_GROUPS) else "top"


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Every import from a package or worker group to one after it in :data:`LAYERS` / :data:`WORKER_GROUPS`."""
    rank = {package: index for index, package in enumerate(LAYERS)}
    group_rank = {group: index for index, group in enumerate(WORKER_GROUPS)} | {"top": len(WORKER_GROUPS)}
    upward = []
    for module, targets in graph.items():
        for target in targets:
            source_package, target_package = module.split(".")[0], target.split(".")[0]
            if rank[target_package] > rank[source_package]:
                upward.append((module, target))
            elif source_package == target_package == "worker":
                source_group, target_group = worker_group(module), worker_group(target)
                if source_group != target_group and group_rank[target_group] >= group_rank[source_group]:
                    upward.append((module, target))
    return sorted(upward)


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
    group_edges = sorted(
        {(worker_group(m), worker_group(t)) for m, targets in graph.items() for t in targets if worker_group(t)}
        - {(None, group) for group in (*WORKER_GROUPS, "top")}
    )
    for source, target in group_edges:
        if source and source != target:
            print(f"worker.{source} imports worker.{target}")
    for module, target in upward_imports(graph):
        print(f"upward: {module} imports {target}")
    cycles = find_cycles(graph)
    print(f"{len(graph)} modules, {sum(len(t) for t in graph.values())} imports, {len(cycles)} cycles")
    for cycle in cycles:
        print("cycle: " + " <-> ".join(cycle))
    return 1 if cycles or upward_imports(graph) else 0


if __name__ == "__main__":
    sys.exit(main())
