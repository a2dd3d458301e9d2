"""The physical limits a GPU benchmark is judged against, measured on the card in the same run,
and the bytes and FLOPs a step of a model must move or compute.

- Copy bandwidth: a large device-to-device copy, counting bytes read plus bytes written.
- Matmul rate: an 8192^3 bfloat16 product on random data (never zeros: they run faster).
- A decode step must read every weight it multiplies by (the input embedding table only for
  the rows it looks up, which is negligible) and every cached K/V of every running request.
- A prefill's model FLOPs: 2 per weight per token, plus the causal attention products.
"""

from __future__ import annotations

import statistics

import torch

from kvserve.analysis.cost_model import (
    Ceilings,
    kv_bytes_per_token,
    matmul_weight_count,
    prefill_cost,
)
from kvserve.model.config import ModelConfig


def time_cuda_ms(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` timed with CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure_ceilings(copy_gib: float = 2.0, matmul_n: int = 8192) -> Ceilings:
    """Measure both ceilings on the current CUDA device (bf16 matmul on random data, timed with
    CUDA events)."""
    numel = int(copy_gib * 2**30) // 2
    source = torch.randn(numel, dtype=torch.bfloat16, device="cuda")
    target = torch.empty_like(source)
    copy_ms = time_cuda_ms(lambda: target.copy_(source))
    copy_rate = 2 * source.numel() * source.element_size() / (copy_ms / 1e3)
    a = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device="cuda")
    matmul_ms = time_cuda_ms(lambda: a @ b, repeats=10)
    matmul_rate = 2 * matmul_n**3 / (matmul_ms / 1e3)
    return Ceilings(flops_per_s=matmul_rate, bytes_per_s=copy_rate)


def decode_weight_bytes(config: ModelConfig, element_size: int) -> int:
    """Bytes of weights one decode step reads (norm weights are negligible and left out)."""
    return matmul_weight_count(config) * element_size


def prefill_flops(config: ModelConfig, num_tokens: int) -> float:
    """Model FLOPs of one prompt's prefill (see ``kvserve.analysis.cost_model``)."""
    return prefill_cost(config, num_tokens).flops


def decode_floor_s(
    config: ModelConfig,
    element_size: int,
    num_steps: int,
    context_tokens_read: int,
    copy_bytes_per_s: float,
) -> float:
    """The least time ``num_steps`` decode steps can take: every step reads the weights, and
    the steps together read ``context_tokens_read`` cached tokens' K/V."""
    weights = decode_weight_bytes(config, element_size) * num_steps
    cache = kv_bytes_per_token(config, element_size) * context_tokens_read
    return (weights + cache) / copy_bytes_per_s


def decode_context_tokens(prompt_lens: list[int], output_lens: list[int]) -> int:
    """Cached tokens read over all decode steps: a request's step ``t`` (t = 1..out-1) attends
    over ``prompt + t`` tokens. Its first token comes from the prefill."""
    total = 0
    for prompt, output in zip(prompt_lens, output_lens, strict=True):
        steps = output - 1
        total += steps * prompt + steps * (steps + 1) // 2
    return total
