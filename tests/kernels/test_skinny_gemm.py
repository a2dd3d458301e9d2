"""The few-row Triton GEMM (a decode step's linears) against float32 ``x @ W^T``, with and
without adding into the residual in place, for each candidate tiling and for the measured
choice the model uses."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import KernelTarget, relative_error


def rand(target: KernelTarget, *shape: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(target.dtype).to(target.device)


def configs(target: KernelTarget) -> list:
    from kvserve.kernels.skinny_gemm import CANDIDATES, INTERPRETER_CONFIG

    return list(CANDIDATES) if target.device == "cuda" else [INTERPRETER_CONFIG]


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 32])
@pytest.mark.parametrize("accumulate", [False, True])
def test_skinny_gemm_equals_the_float32_product(
    target: KernelTarget, rows: int, accumulate: bool
) -> None:
    from kvserve.kernels.skinny_gemm import fits, launch

    in_features, out_features = 512, 256
    x = rand(target, rows, in_features, seed=1)
    weight = rand(target, out_features, in_features, seed=2)
    expected = x.float() @ weight.float().t()
    for config in configs(target):
        assert fits(x, weight, config)
        residual = rand(target, rows, out_features, seed=3) if accumulate else None
        before = residual.float().clone() if residual is not None else 0.0
        out = launch(x, weight, residual, config)
        if residual is not None:
            assert out.data_ptr() == residual.data_ptr()  # stored in place
        assert out.shape == (rows, out_features) and out.dtype == target.dtype
        assert relative_error(out, expected + before) < target.rel_tol, str(config)


def test_skinny_gemm_reads_strided_rows(target: KernelTarget) -> None:
    """x may be a view whose rows are further apart than its width (a slice of a wider
    tensor); the output and the residual are written row by row at their own strides."""
    from kvserve.kernels.skinny_gemm import launch

    wide = rand(target, 7, 640, seed=4)
    x = wide[:, 64:576]
    weight = rand(target, 128, 512, seed=5)
    residual_rows = rand(target, 7, 192, seed=6)
    residual = residual_rows[:, :128]
    expected = x.float() @ weight.float().t() + residual.float()
    untouched = residual_rows[:, 128:].clone()
    launch(x, weight, residual, configs(target)[0])
    assert relative_error(residual, expected) < target.rel_tol
    assert torch.equal(residual_rows[:, 128:], untouched)


def test_shapes_it_cannot_tile_are_refused(target: KernelTarget) -> None:
    from kvserve.kernels.skinny_gemm import MAX_ROWS, launch

    config = configs(target)[0]
    weight = rand(target, 128, 512, seed=7)
    with pytest.raises(ValueError, match="rows <= 32"):
        launch(rand(target, MAX_ROWS + 1, 512, seed=8), weight, None, config)
    with pytest.raises(ValueError, match="do not fit"):
        launch(rand(target, 4, 512, seed=8), rand(target, 120, 512, seed=9), None, config)
    with pytest.raises(ValueError, match="residual must be"):
        launch(rand(target, 4, 512, seed=8), weight, rand(target, 4, 64, seed=9), config)


@pytest.mark.parametrize("rows", [3, 32, 33])
def test_skinny_linear_gives_the_product_whichever_it_picks(
    target: KernelTarget, rows: int
) -> None:
    """The model's entry point: the kernel or cuBLAS (measured on a GPU; more than MAX_ROWS
    rows always cuBLAS), the same product either way, in place with a residual."""
    from kvserve.kernels.skinny_gemm import skinny_linear

    x = rand(target, rows, 1024, seed=10)
    weight = rand(target, 512, 1024, seed=11)
    residual = rand(target, rows, 512, seed=12)
    expected = x.float() @ weight.float().t()
    assert relative_error(skinny_linear(x, weight), expected) < target.rel_tol
    summed = expected + residual.float()
    out = skinny_linear(x, weight, residual=residual)
    assert out.data_ptr() == residual.data_ptr()
    assert relative_error(residual, summed) < target.rel_tol
