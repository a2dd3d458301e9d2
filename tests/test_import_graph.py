"""The package's imports form no cycle and keep the layering of DESIGN.md (read with ``ast``,
nothing imported), and the checker does fail on a bad import added to a graph."""

from __future__ import annotations

from pathlib import Path

from tests.import_graph import (
    Cycle,
    cycles,
    describe_cycle,
    imports_of,
    layering_violations,
    read_graph,
)

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_has_no_import_cycle_and_keeps_its_layers() -> None:
    graph, files = read_graph(ROOT)
    assert "kvserve.core.scheduler" in graph and "kvserve.worker.kv_cache" in graph
    problems = [describe_cycle(cycle, graph, files) for cycle in cycles(graph)]
    problems += layering_violations(graph, files)
    assert not problems, f"{len(problems)} import problems:\n" + "\n".join(problems)


def test_the_checker_reports_a_forbidden_arrow_and_a_cycle() -> None:
    graph, _ = read_graph(ROOT)
    bad = {module: list(imports) for module, imports in graph.items()}
    bad["kvserve.worker.model_runner"].append(("kvserve.engine.engine_core", 999))
    bad["kvserve.core.block_pool"].append(("torch", 998))
    bad["kvserve.sampling_params"].append(("kvserve.outputs", 997))
    bad["kvserve.outputs"].append(("kvserve.sampling_params", 996))
    violations = layering_violations(bad)
    assert any(
        line.startswith("kvserve.worker.model_runner:999  ")
        and "kvserve.worker.model_runner -> kvserve.engine.engine_core" in line
        for line in violations
    )
    assert any("kvserve.core.block_pool -> torch" in line for line in violations)
    pair = ("kvserve.outputs", "kvserve.sampling_params")
    assert Cycle(pair, pair) in cycles(bad)
    text = describe_cycle(Cycle(pair, pair), bad)
    assert "kvserve.outputs -> kvserve.sampling_params -> kvserve.outputs" in text
    assert "kvserve.sampling_params:997  kvserve.sampling_params -> kvserve.outputs" in text


def test_cycles_and_layers_on_a_tiny_graph() -> None:
    graph = {
        "kvserve.a": [("kvserve.b", 1)],
        "kvserve.b": [("kvserve.c", 2), ("numpy", 3)],
        "kvserve.c": [("kvserve.a", 4)],
        "kvserve.d": [("kvserve.d", 5)],  # a module importing itself
        "kvserve.core.x": [("torch.nn", 6), ("kvserve.corex", 7)],  # a prefix, not core
        "kvserve.corex": [],
        "kvserve.server.app": [("kvserve.worker.sampler", 8), ("kvserve.engine.llm", 9)],
        "kvserve.worker.sampler": [],
        "kvserve.engine.llm": [],
    }
    abc = ("kvserve.a", "kvserve.b", "kvserve.c")
    assert cycles(graph) == [Cycle(abc, abc), Cycle(("kvserve.d",), ("kvserve.d",))]
    assert "also in this group" not in describe_cycle(cycles(graph)[0], graph)
    assert [line.split("  (")[0] for line in layering_violations(graph)] == [
        "kvserve.core.x:6  kvserve.core.x -> torch.nn",
        "kvserve.server.app:8  kvserve.server.app -> kvserve.worker.sampler",
    ]


def test_a_group_larger_than_its_shortest_cycle_names_the_rest() -> None:
    graph = {
        "kvserve.a": [("kvserve.b", 1)],
        "kvserve.b": [("kvserve.a", 2), ("kvserve.c", 3)],
        "kvserve.c": [("kvserve.b", 4)],
    }
    [cycle] = cycles(graph)
    assert cycle == Cycle(("kvserve.a", "kvserve.b"), ("kvserve.a", "kvserve.b", "kvserve.c"))
    assert describe_cycle(cycle, graph).splitlines() == [
        "cycle kvserve.a -> kvserve.b -> kvserve.a",
        "  kvserve.a:1  kvserve.a -> kvserve.b",
        "  kvserve.b:2  kvserve.b -> kvserve.a",
        "  (also in this group of modules importing each other: ['kvserve.c'])",
    ]


def test_imports_are_found_everywhere_and_resolved() -> None:
    source = """
from __future__ import annotations
from typing import TYPE_CHECKING
import torch.nn as nn
from . import sampler
from .kv_cache import PagedKVCache
from ..engine import engine_core, EngineCore
if TYPE_CHECKING:
    from kvserve.disagg.connector import Saver

def lazy():
    import kvserve.server.app
    from kvserve import LLM
"""
    known = {"kvserve", "kvserve.worker.sampler", "kvserve.worker.kv_cache",
             "kvserve.engine", "kvserve.engine.engine_core", "kvserve.disagg.connector",
             "kvserve.server.app"}
    found = imports_of("kvserve.worker.model_runner", False, source, known)
    assert found == [
        ("__future__", 2),
        ("typing", 3),
        ("torch.nn", 4),
        ("kvserve.worker.sampler", 5),
        ("kvserve.worker.kv_cache", 6),
        ("kvserve.engine", 7),  # EngineCore, a name defined in kvserve/engine/__init__.py
        ("kvserve.engine.engine_core", 7),
        ("kvserve.disagg.connector", 9),
        ("kvserve.server.app", 12),
        ("kvserve", 13),
    ]
    in_package = imports_of("kvserve.worker", True, "from .kv_cache import x\n", known)
    assert in_package == [("kvserve.worker.kv_cache", 1)]
