"""Where the kernel tests run: the GPU in bfloat16 when there is one, else Triton's CPU
interpreter in float32 (bfloat16 is not supported there). Skipped without Triton.

The kernels run on whatever tensors they are handed; the layers run them when built with
``fused_ops=True``. No flag routes CPU tensors anywhere."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kvserve.kernels.availability import HAS_TRITON, interpreter_on


@dataclass(frozen=True)
class KernelTarget:
    device: str
    dtype: torch.dtype
    rel_tol: float  # ||out - ref|| / ||ref|| allowed against a float32 reference


@pytest.fixture
def target() -> KernelTarget:
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        return KernelTarget("cuda", torch.bfloat16, 1e-2)
    if not interpreter_on():
        raise RuntimeError("Triton kernels on CPU need TRITON_INTERPRET=1 (tests/conftest.py)")
    return KernelTarget("cpu", torch.float32, 1e-5)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()
