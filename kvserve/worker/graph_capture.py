"""Capturing one CUDA graph per size, largest first, all sharing one memory pool: what the decode
graphs and the small-prefill graphs both do."""

from __future__ import annotations

from collections.abc import Callable

import torch


def capture_graphs(
    sizes: list[int], forward: Callable[[int], torch.Tensor], device: torch.device
) -> tuple[dict[int, torch.cuda.CUDAGraph], dict[int, torch.Tensor]]:
    """A graph of ``forward(size)`` for each size, and its static output. Each size runs twice
    first (Triton compiles its kernels, cuBLAS picks its algorithms)."""
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    outputs: dict[int, torch.Tensor] = {}
    pool = None
    for size in sorted(sizes, reverse=True):  # the largest first: the others fit its pool
        for _ in range(2):
            forward(size)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs[size] = forward(size)
        pool = graph.pool()
        graphs[size] = graph
    torch.cuda.synchronize(device)
    return graphs, outputs
