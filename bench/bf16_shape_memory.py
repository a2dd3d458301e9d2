"""Resident memory a CPU linear keeps per new input shape (issue 16's leak finding).

    .venv/bin/python bench/bf16_shape_memory.py bfloat16
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 .venv/bin/python bench/bf16_shape_memory.py bfloat16
    .venv/bin/python bench/bf16_shape_memory.py float32
    .venv/bin/python bench/bf16_shape_memory.py bfloat16 bucketed   # kvserve's row buckets

One SmolLM2 MLP-sized linear (``[M, 576] x [1536, 576]^T``) run for M = 4..403 (400 shapes
never seen before, as prefills of new token counts are), then for the same 400 shapes again;
prints the process's RSS growth after each 100 new shapes and after the repeat.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from kvserve.model.row_buckets import bucketed_linear


def rss_mib() -> float:
    pages = int(Path(f"/proc/{os.getpid()}/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "bfloat16"
    dtype = getattr(torch, name)
    linear = bucketed_linear if sys.argv[2:] == ["bucketed"] else torch.nn.functional.linear
    torch.set_num_threads(1)
    weight = torch.randn(1536, 576, dtype=dtype)  # [out_features, in_features]
    for m in (1, 2, 3):  # first-use costs, outside the measurement
        linear(torch.randn(m, 576, dtype=dtype), weight)
    start = rss_mib()
    print(f"torch {torch.__version__}, {name}, ONEDNN_PRIMITIVE_CACHE_CAPACITY="
          f"{os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY', 'unset')}, {linear.__name__}")
    for step, m in enumerate(range(4, 404)):
        linear(torch.randn(m, 576, dtype=dtype), weight)  # [m, 1536]
        if step % 100 == 99:
            print(f"{step + 1} new shapes: +{rss_mib() - start:.1f} MiB")
    for m in range(4, 404):
        linear(torch.randn(m, 576, dtype=dtype), weight)
    print(f"the same 400 shapes again: +{rss_mib() - start:.1f} MiB")


if __name__ == "__main__":
    main()
