"""Fused element-wise kernels of a decoder layer: RMSNorm (with the residual add), rotary
embedding in place, and SiLU-and-multiply (with a folded RMSNorm's row scale, optionally). Each
does in one pass over memory what PyTorch does in several, and rounds where the Hugging Face
reference rounds: values are computed in float32 and cast to the model dtype at the same points
as ``kvserve.model.layers``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvserve.kernels.availability import next_power_of_2


@triton.jit
def _rms_norm_kernel(
    X, Residual, Weight, Out, ResidualOut, stride_x, stride_r, stride_o, stride_ro, eps,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    valid = offs < HIDDEN
    x = tl.load(X + row * stride_x + offs, mask=valid, other=0.0)
    if ADD_RESIDUAL:
        r = tl.load(Residual + row * stride_r + offs, mask=valid, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)  # rounded like torch
        tl.store(ResidualOut + row * stride_ro + offs, x, mask=valid)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / HIDDEN + eps)
    normed = (xf * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(Weight + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + offs, (normed * w).to(Out.dtype.element_ty), mask=valid)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``norm(x)``, or with ``residual``: ``s = x + residual; (norm(s), s)``. x: [rows, hidden]."""
    rows, hidden = x.shape
    out = torch.empty_like(x)
    residual_out = torch.empty_like(x) if residual is not None else None
    if rows:
        _rms_norm_kernel[(rows,)](
            x, residual if residual is not None else x, weight, out,
            residual_out if residual_out is not None else out,
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
            residual_out.stride(0) if residual_out is not None else 0, eps,
            HIDDEN=hidden, BLOCK=next_power_of_2(hidden), ADD_RESIDUAL=residual is not None,
            num_warps=4 if hidden <= 4096 else 8,
        )
    return out, residual_out


@triton.jit
def _rotary_kernel(
    Heads, positions, Cos, Sin, stride_t, stride_h, stride_cos,
    NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    pos = tl.load(positions + token)
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HALF_PAD)
    d_valid = offs_d < HALF
    cos = tl.load(Cos + pos * stride_cos + offs_d, mask=d_valid, other=0.0)[None, :]
    sin = tl.load(Sin + pos * stride_cos + offs_d, mask=d_valid, other=0.0)[None, :]
    mask = (offs_h < NUM_HEADS)[:, None] & d_valid[None, :]
    first = Heads + token * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(Heads.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(Heads.dtype.element_ty), mask=mask)


def rotary_in_place(
    heads: torch.Tensor,  # [num_tokens, num_heads, head_dim], last dim contiguous
    positions: torch.Tensor,  # [num_tokens]
    cos: torch.Tensor,  # [max_positions, head_dim / 2] float32
    sin: torch.Tensor,
) -> torch.Tensor:
    """Rotate-half rotary embedding, written back into ``heads`` (which may be a view)."""
    num_tokens, num_heads, head_dim = heads.shape
    if heads.stride(2) != 1:
        raise ValueError("rotary_in_place needs the head dimension contiguous")
    if num_tokens:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            heads, positions, cos, sin, heads.stride(0), heads.stride(1), cos.stride(0),
            NUM_HEADS=num_heads, HEADS_PAD=next_power_of_2(num_heads), HALF=half,
            HALF_PAD=next_power_of_2(half), num_warps=4,
        )
    return heads


@triton.jit
def _silu_and_mul_kernel(
    GateUp, Out, Normed, stride_g, stride_o, stride_n, eps, WIDTH: tl.constexpr,
    BLOCK: tl.constexpr, SCALE_ROWS: tl.constexpr, NORM_WIDTH: tl.constexpr,
    NORM_PAD: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < WIDTH
    gate = tl.load(GateUp + row * stride_g + offs, mask=valid, other=0.0).to(tl.float32)
    up = tl.load(GateUp + row * stride_g + WIDTH + offs, mask=valid, other=0.0).to(tl.float32)
    if SCALE_ROWS:  # gate_up = x @ (W * w)^T: RMSNorm's 1 / rms(x) comes in here
        rstd = row_rstd(Normed + row * stride_n, eps, NORM_WIDTH, NORM_PAD)
        gate = gate * rstd
        up = up * rstd
    act = (gate * tl.sigmoid(gate)).to(Out.dtype.element_ty).to(tl.float32)
    tl.store(Out + row * stride_o + offs, (act * up).to(Out.dtype.element_ty), mask=valid)


@triton.jit
def row_rstd(Row, eps, WIDTH: tl.constexpr, PAD: tl.constexpr):
    """1 / sqrt(mean(x * x) + eps) of one row of WIDTH values, in float32."""
    offs = tl.arange(0, PAD)
    x = tl.load(Row + offs, mask=offs < WIDTH, other=0.0).to(tl.float32)
    return 1.0 / tl.sqrt(tl.sum(x * x, 0) / WIDTH + eps)


def silu_and_mul(
    gate_up: torch.Tensor, normed: tuple[torch.Tensor, float] | None = None
) -> torch.Tensor:
    """[rows, 2 * width] (gate then up) -> silu(gate) * up, [rows, width].

    With ``normed = (x, eps)`` ([rows, hidden]), gate and up are first multiplied by each row's
    ``1 / rms(x)``: the RMSNorm before a gate_up projection whose weight holds the norm's
    (``LlamaForCausalLM`` folds it there on the GPU path), since norm(x) @ W^T is
    (x @ (W * w)^T) / rms(x)."""
    rows, double = gate_up.shape
    width = double // 2
    out = torch.empty(rows, width, dtype=gate_up.dtype, device=gate_up.device)
    x, eps = normed if normed is not None else (gate_up, 0.0)
    if normed is not None and (x.shape[0] != rows or x.stride(-1) != 1):
        raise ValueError("silu_and_mul: normed must be [rows, hidden] with contiguous rows")
    if rows:
        block = min(1024, next_power_of_2(width))
        _silu_and_mul_kernel[(rows, triton.cdiv(width, block))](
            gate_up, out, x, gate_up.stride(0), out.stride(0), x.stride(0), eps, WIDTH=width,
            BLOCK=block, SCALE_ROWS=normed is not None, NORM_WIDTH=x.shape[-1],
            NORM_PAD=next_power_of_2(x.shape[-1]), num_warps=4,
        )
    return out
