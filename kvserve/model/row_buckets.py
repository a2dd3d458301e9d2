"""Prefill rows padded to a bounded set of counts for CPU bfloat16 matmuls.

oneDNN (torch's CPU bfloat16 matmul) keeps about 0.7 MiB for every input row count it has not
seen before, and keeps it (``bench/bf16_shape_memory.py``; float32 keeps almost nothing). A
server sees prompts of every length, so each new prefill token count cost memory: the soak of
issue 16 measured +0.7 MiB a request on the default engine, without levelling off. Padding the
rows of a CPU bfloat16 linear up to a number with at most five significant bits bounds the row
counts to 16 per power of two (160 up to 8,192 rows), at most 1/16 more rows
computed (about 3% on average). Padding rows are zeros and are sliced off again: a row's
output depends only on that row.
"""

from __future__ import annotations

import torch
from torch.nn import functional

EXACT_ROWS = 16  # row counts up to this stay as they are (decode steps and small prefills)
SIGNIFICANT_BITS = 5


def padded_rows(num_rows: int) -> int:
    """``num_rows`` rounded up to a number with at most five significant bits."""
    if num_rows <= EXACT_ROWS:
        return num_rows
    step = 1 << (num_rows.bit_length() - SIGNIFICANT_BITS)
    return -(-num_rows // step) * step


def bucketed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, with the rows of a CPU bfloat16 ``x`` ([rows, in]) padded
    to ``padded_rows`` and the padding sliced off the result."""
    if (x.dtype is not torch.bfloat16 or x.device.type != "cpu" or x.dim() != 2
            or torch.compiler.is_compiling()):  # a compiled decode step: at most 64 rows
        return functional.linear(x, weight, bias)
    num_rows = x.shape[0]
    padded = padded_rows(num_rows)
    if padded == num_rows:
        return functional.linear(x, weight, bias)
    rows = torch.zeros(padded, x.shape[1], dtype=x.dtype)  # [padded, in]
    rows[:num_rows] = x
    return functional.linear(rows, weight, bias)[:num_rows]
