"""The one-row GEMVs with their prologues against the unfused ops they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvserve.model.layers import RMSNorm
from tests.kernels.conftest import KernelTarget, relative_error

# (in_features, out_features): SmolLM2-135M's qkv, gate/up and LM-head shapes, and odd sizes
# that leave partial blocks in both dimensions
SHAPES = [(576, 960), (576, 3072), (200, 37)]


def rand(target: KernelTarget, *shape: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(target.dtype).to(target.device)


def norm_of(target: KernelTarget, hidden: int) -> RMSNorm:
    norm = RMSNorm(hidden, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden, generator=torch.Generator().manual_seed(7)) + 0.5)
    return norm.to(target.device, target.dtype)


@pytest.mark.parametrize(("hidden", "out_features"), SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_norm_linear_equals_norm_then_linear(
    target: KernelTarget, hidden: int, out_features: int, with_residual: bool
) -> None:
    from kvserve.kernels.decode_gemv import norm_linear

    norm = norm_of(target, hidden)
    x = rand(target, 1, hidden, seed=1)
    residual = rand(target, 1, hidden, seed=2) if with_residual else None
    weight, bias = rand(target, out_features, hidden, seed=3), rand(target, out_features, seed=4)
    out, summed = norm_linear(x, residual, norm.weight, norm.eps, weight, bias)
    expected_sum = x + residual if residual is not None else x
    assert torch.equal(summed, expected_sum)  # the residual stream is exact, not approximated
    expected = F.linear(norm(expected_sum), weight, bias)
    assert out.shape == (1, out_features) and out.dtype == x.dtype
    assert relative_error(out, expected) < target.rel_tol


@pytest.mark.parametrize(("width", "out_features"), [(1536, 576), (100, 12)])
def test_silu_mul_linear_equals_silu_mul_then_linear(
    target: KernelTarget, width: int, out_features: int
) -> None:
    from kvserve.kernels.decode_gemv import silu_mul_linear

    gate_up = rand(target, 1, 2 * width, seed=5)
    weight = rand(target, out_features, width, seed=6)
    gate, up = gate_up.split(width, dim=-1)
    expected = F.linear(F.silu(gate) * up, weight)
    assert relative_error(silu_mul_linear(gate_up, weight), expected) < target.rel_tol


def test_gemv_equals_linear(target: KernelTarget) -> None:
    from kvserve.kernels.decode_gemv import gemv

    x, weight = rand(target, 1, 576, seed=8), rand(target, 576, 576, seed=9)
    assert relative_error(gemv(x, weight), F.linear(x, weight)) < target.rel_tol


def test_more_than_one_row_is_refused(target: KernelTarget) -> None:
    from kvserve.kernels.decode_gemv import gemv

    with pytest.raises(ValueError, match="one contiguous row"):
        gemv(rand(target, 2, 64, seed=10), rand(target, 8, 64, seed=11))
