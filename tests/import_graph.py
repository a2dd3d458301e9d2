"""The kvserve package's import graph, read from the source with ``ast`` (nothing imported), and
the two checks on it: no cycle, and no arrow the layering of ``DESIGN.md`` forbids.

A graph maps each kvserve module to the modules it imports and the line of each import:
``{"kvserve.worker.kv_cache": [("torch", 5), ("kvserve.attention.backend", 9)]}``. Every
``import`` and ``from ... import`` counts, wherever it is written: at the top, inside a function
(a lazy import still makes the module depend on its target) or under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

Graph = Mapping[str, list[tuple[str, int]]]  # module -> [(imported module, line)]
Files = Mapping[str, str]  # module -> its file, as printed in a report
PACKAGE = "kvserve"


@dataclass(frozen=True)
class Rule:
    """Modules under any of ``sources`` import nothing under any of ``forbidden``."""

    sources: tuple[str, ...]
    forbidden: tuple[str, ...]
    why: str


_ENGINE_SIDE = ("kvserve.engine", "kvserve.server", "kvserve.disagg")
_MODEL_STACK = ("kvserve.worker", "kvserve.model", "kvserve.attention", "kvserve.kernels")
LAYERING = (
    Rule(("kvserve.core",), ("torch", *_MODEL_STACK, *_ENGINE_SIDE),
         "core is pure Python: no torch, no model stack, no engine"),
    Rule(_MODEL_STACK, _ENGINE_SIDE, "the model stack knows nothing of engine, server, disagg"),
    # the tokenizer (kvserve.model.tokenizer) is the front end's: the rest of the stack is not
    Rule(("kvserve.server",), ("kvserve.worker", "kvserve.attention", "kvserve.kernels"),
         "the front end does not import the model stack"),
    Rule(("kvserve.analysis",), _ENGINE_SIDE, "analysis is a leaf the engine may use"),
)


def module_files(root: Path) -> dict[str, Path]:
    """Every module of the package under ``root`` (the folder holding ``kvserve/``)."""
    modules = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def read_graph(root: Path) -> tuple[dict[str, list[tuple[str, int]]], dict[str, str]]:
    """The import graph of the package under ``root``, and each module's file."""
    paths = module_files(root)
    graph = {
        module: imports_of(module, path.name == "__init__.py", path.read_text(), paths)
        for module, path in paths.items()
    }
    return graph, {module: str(path.relative_to(root)) for module, path in paths.items()}


def imports_of(
    module: str, is_package: bool, source: str, known: Iterable[str]
) -> list[tuple[str, int]]:
    """Every module ``source`` (the text of ``module``) imports, with its line. Relative
    imports are resolved; ``from kvserve.x import name`` names ``kvserve.x.name`` when that is
    a module of ``known``, else ``kvserve.x``."""
    known = set(known)
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(package, node.module, node.level)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule if submodule in known else base, node.lineno))
    return sorted(set(found), key=lambda item: (item[1], item[0]))


def _resolve_from(package: str, name: str | None, level: int) -> str:
    if level == 0:
        return name or ""
    parts = package.split(".")
    base = ".".join(parts[: len(parts) - (level - 1)])
    return f"{base}.{name}" if name else base


def is_under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layering_violations(
    graph: Graph, files: Files | None = None, rules: Iterable[Rule] = LAYERING
) -> list[str]:
    """``file:line  source -> target  (why)`` for every import a rule forbids."""
    found = []
    for rule in rules:
        for module, imports in sorted(graph.items()):
            if not any(is_under(module, source) for source in rule.sources):
                continue
            for target, line in imports:
                if any(is_under(target, forbidden) for forbidden in rule.forbidden):
                    where = _where(module, line, files)
                    found.append(f"{where}  {module} -> {target}  ({rule.why})")
    return found


@dataclass(frozen=True)
class Cycle:
    """A group of modules that import each other (``members``) and one shortest cycle
    through it (``path``, its first module imported by its last)."""

    path: tuple[str, ...]
    members: tuple[str, ...]


def cycles(graph: Graph) -> list[Cycle]:
    """One shortest cycle through each group of kvserve modules that import each other."""
    edges = {m: sorted({t for t, _ in imports if t in graph}) for m, imports in graph.items()}
    found = []
    for component in _strongly_connected(edges):
        if len(component) > 1 or component[0] in edges[component[0]]:
            path = _shortest_cycle(min(component), edges, set(component))
            found.append(Cycle(tuple(path), tuple(component)))
    return sorted(found, key=lambda cycle: cycle.path)


def describe_cycle(cycle: Cycle, graph: Graph, files: Files | None = None) -> str:
    """A cycle as its path, one line per arrow with the file and line of its import, and the
    other modules of its group."""
    path = list(cycle.path)
    lines = ["cycle " + " -> ".join([*path, path[0]])]
    for source, target in zip(path, path[1:] + path[:1], strict=True):
        line = min(n for t, n in graph[source] if t == target)
        lines.append(f"  {_where(source, line, files)}  {source} -> {target}")
    others = sorted(set(cycle.members) - set(path))
    if others:
        lines.append(f"  (also in this group of modules importing each other: {others})")
    return "\n".join(lines)


def _where(module: str, line: int, files: Files | None) -> str:
    return f"{(files or {}).get(module, module)}:{line}"


def _strongly_connected(edges: Mapping[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit on deep graphs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(edges[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return components


def _shortest_cycle(start: str, edges: Mapping[str, list[str]], members: set[str]) -> list[str]:
    """Breadth-first from ``start`` back to itself, staying inside its component."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        next_frontier = []
        for node in frontier:
            for child in edges[node]:
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return path[::-1]
                if child in members and child not in parents:
                    parents[child] = node
                    next_frontier.append(child)
        frontier = next_frontier
    raise AssertionError(f"{start} is on no cycle")
