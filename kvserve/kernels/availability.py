"""Whether the Triton kernels handle a tensor: a CUDA tensor with Triton installed.

Tests also run them on CPU tensors under Triton's interpreter: they set ``TRITON_INTERPRET=1``
before any kernel module is imported (Triton reads it when a kernel is defined) and turn the CPU
path on with ``run_on_cpu``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
_on_cpu = False


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_enabled(tensor: torch.Tensor) -> bool:
    """True when the Triton kernels should handle ``tensor``."""
    if not HAS_TRITON:
        return False
    return tensor.is_cuda or (_on_cpu and tensor.device.type == "cpu")


@contextlib.contextmanager
def run_on_cpu() -> Iterator[None]:
    """Route CPU tensors through the kernels (under the interpreter) while the block runs."""
    if not (HAS_TRITON and interpreter_on()):
        raise RuntimeError("running Triton kernels on CPU needs triton and TRITON_INTERPRET=1")
    global _on_cpu
    previous, _on_cpu = _on_cpu, True
    try:
        yield
    finally:
        _on_cpu = previous


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
