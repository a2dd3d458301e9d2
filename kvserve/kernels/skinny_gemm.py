"""Linears of a few rows (a decode step of up to ``MAX_ROWS`` requests) as one Triton GEMM,
optionally adding into the residual stream in place.

A decode step of 32 requests on an 8B model reads about 15 GB of weights in GEMMs of 32 rows,
and cuBLAS reaches only about 70% of the copy bandwidth on the smaller ones (qkv 6144x4096 and
o_proj 4096x4096 on an H200, ``bench/gpu_step_profile.py``), splitting K for some and adding a
reduction kernel after them. Here each program owns ``BLOCK_N`` output features for every row,
streams its weight rows through K in a software pipeline (``num_stages``), and computes the
transposed product ``W_tile @ x^T`` so the few rows sit in the MMA's narrow dimension. With
``residual``, the epilogue adds the product into it and stores there (what the folded decoder
layer does with cuBLAS's beta = 1, ``DecoderLayer._forward_folded``).

Whether it pays is measured, not assumed, as ``decode_gemv`` does: on the first call of each
(rows, weight shape, residual or not, dtype, device) outside a graph capture, cuBLAS and each
of ``CANDIDATES`` run as a short CUDA graph, and the fastest is kept for the process. Under
Triton's CPU interpreter (the tests) the kernel always runs, with ``INTERPRETER_CONFIG``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kvserve.kernels.availability import interpreter_on
from kvserve.kernels.decode_gemv import graph_time_us
from kvserve.kernels.paged_attention import dot_precision

logger = logging.getLogger("kvserve")

MAX_ROWS = 32  # more rows: cuBLAS, whose larger tiles are efficient there


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int = 4

    def __str__(self) -> str:
        return f"n{self.block_n}_k{self.block_k}_s{self.num_stages}_w{self.num_warps}"


# Timed against cuBLAS on the first call of each shape: the tilings that won most often in
# bench/gpu_skinny.py's sweep of 40 on an H200 (Llama-3-8B's linears at 8, 16 and 32 rows).
CANDIDATES = (SkinnyConfig(64, 128, 6), SkinnyConfig(64, 128, 4), SkinnyConfig(64, 256, 4))
INTERPRETER_CONFIG = SkinnyConfig(16, 32, 1, 1)
CUBLAS = None  # the choice "cuBLAS" in _choices

_choices: dict[tuple, SkinnyConfig | None] = {}


@triton.jit
def _skinny_kernel(
    X, W, Out, M, K, stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_valid = offs_m < M
    w_ptrs = W + offs_n[:, None] * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    x_ptrs = X + offs_m[None, :] * stride_xm + offs_k[:, None]  # [BLOCK_K, BLOCK_M]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for _ in range(0, tl.cdiv(K, BLOCK_K)):  # K % BLOCK_K == 0 (checked by the caller)
        w = tl.load(w_ptrs)
        x = tl.load(x_ptrs, mask=row_valid[None, :], other=0.0)
        acc = tl.dot(w, x, acc, input_precision=DOT_PRECISION)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    out_ptrs = Out + offs_m[None, :] * stride_om + offs_n[:, None]  # [BLOCK_N, BLOCK_M]
    if ACCUMULATE:  # out += x @ W^T, rounded once (cuBLAS's beta = 1)
        acc += tl.load(out_ptrs, mask=row_valid[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=row_valid[None, :])


def fits(x: torch.Tensor, weight: torch.Tensor, config: SkinnyConfig) -> bool:
    """Whether ``config`` tiles this product exactly (no masks on N or K)."""
    out_features, in_features = weight.shape
    return (out_features % config.block_n == 0 and in_features % config.block_k == 0
            and x.shape[1] == in_features)


def launch(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None,
           config: SkinnyConfig) -> torch.Tensor:
    """``x @ weight^T`` ([M, N], a new tensor), or with ``residual`` ([M, N]) that plus it,
    stored into ``residual``; one program per ``config.block_n`` output features."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    if not (rows <= MAX_ROWS and fits(x, weight, config)):
        raise ValueError(f"skinny GEMM: {rows} rows of {in_features} against {tuple(weight.shape)}"
                         f" do not fit {config} (rows <= {MAX_ROWS})")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("skinny GEMM needs rows of x and of the weight contiguous")
    out = residual if residual is not None else x.new_empty(rows, out_features)
    if residual is not None and (residual.shape != (rows, out_features) or residual.stride(1) != 1):
        raise ValueError(f"skinny GEMM: residual must be [{rows}, {out_features}], rows contiguous")
    if rows:
        _skinny_kernel[(out_features // config.block_n,)](
            x, weight, out, rows, in_features, x.stride(0), weight.stride(0), out.stride(0),
            BLOCK_M=16 if rows <= 16 else 32, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            ACCUMULATE=residual is not None, DOT_PRECISION=dot_precision(x.dtype),
            num_stages=config.num_stages,
            num_warps=config.num_warps,
        )
    return out


def cublas(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None
           ) -> torch.Tensor:
    """What the kernel replaces: ``F.linear``, or ``residual.addmm_`` (beta = 1, in place)."""
    if residual is None:
        return F.linear(x, weight)
    return residual.addmm_(x, weight.t())


def skinny_linear(x: torch.Tensor, weight: torch.Tensor,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T``, or ``residual += x @ weight^T`` in place (returned): by the faster of
    cuBLAS and this module's kernel for these rows and this weight (measured once)."""
    if interpreter_on():
        if x.shape[0] <= MAX_ROWS and fits(x, weight, INTERPRETER_CONFIG):
            return launch(x, weight, residual, INTERPRETER_CONFIG)
        return cublas(x, weight, residual)
    config = _choice(x, weight, residual)
    if config is CUBLAS:
        return cublas(x, weight, residual)
    return launch(x, weight, residual, config)


def measured_choices() -> dict[str, str]:
    """What was measured so far (logs, benchmarks): rows, weight shape, +residual -> choice."""
    return {f"{rows} x {list(shape)}{' +residual' if add else ''}": str(c or "cublas")
            for (rows, shape, add, _, _), c in _choices.items()}


def _choice(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None
            ) -> SkinnyConfig | None:
    rows = x.shape[0]
    if rows > MAX_ROWS or x.device.type != "cuda":
        return CUBLAS
    key = (rows, tuple(weight.shape), residual is not None, weight.dtype, weight.device)
    if key in _choices:
        return _choices[key]
    if torch.cuda.is_current_stream_capturing():
        return CUBLAS  # not measured during a capture: cuBLAS, as before
    scratch = residual.clone() if residual is not None else None  # timing must not touch it

    def timed(config: SkinnyConfig | None) -> float:
        if config is CUBLAS:
            return graph_time_us(lambda: cublas(x, weight, scratch))
        return graph_time_us(lambda: launch(x, weight, scratch, config))

    times = {c: timed(c) for c in (CUBLAS, *CANDIDATES) if c is CUBLAS or fits(x, weight, c)}
    best = min(times, key=times.__getitem__)
    _choices[key] = best
    logger.debug("skinny GEMM %d x %s%s: %s", rows, tuple(weight.shape),
                 " +residual" if residual is not None else "",
                 ", ".join(f"{c or 'cublas'} {t:.1f} us" for c, t in times.items()))
    return best
