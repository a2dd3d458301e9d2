"""Rotary embedding of a step's q and k heads and the store of its K/V, in one launch.

A decode step on a GPU is latency-bound: every kernel boundary costs a few microseconds, and
rotating then storing took two launches a layer. Here one program per token rotates the q and
k heads in place (rotate-half layout, float32 math as ``RotaryEmbedding``) and writes the rotated
k heads and the v heads into the token's slot of the paged cache (skipped for a negative slot,
a padding row of a CUDA-graph batch). It can also apply the preceding RMSNorm's row scale
(``normed``), when the norm's weight is folded into the qkv projection.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvserve.kernels.availability import next_power_of_2
from kvserve.kernels.fused_ops import row_rstd


@triton.jit
def _rotary_store_kernel(
    Heads, Value, positions, Cos, Sin, KCache, VCache, slot_mapping, Normed,
    stride_t, stride_h, stride_vt, stride_cos, stride_kc_slot, stride_vc_slot, stride_n, eps,
    NUM_Q_HEADS: tl.constexpr, NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, V_WIDTH: tl.constexpr, V_PAD: tl.constexpr,
    SCALE_ROWS: tl.constexpr, NORM_WIDTH: tl.constexpr, NORM_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    pos = tl.load(positions + token)
    rstd = 1.0
    if SCALE_ROWS:  # qkv = x @ (W * w)^T: RMSNorm's 1 / rms(x) comes in here
        rstd = row_rstd(Normed + token * stride_n, eps, NORM_WIDTH, NORM_PAD)
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HALF_PAD)
    d_valid = offs_d < HALF
    cos = tl.load(Cos + pos * stride_cos + offs_d, mask=d_valid, other=0.0)[None, :]
    sin = tl.load(Sin + pos * stride_cos + offs_d, mask=d_valid, other=0.0)[None, :]
    mask = (offs_h < NUM_HEADS)[:, None] & d_valid[None, :]
    first = Heads + token * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    if SCALE_ROWS:
        x1 = x1 * rstd
        x2 = x2 * rstd
    out1 = (x1 * cos - x2 * sin).to(Heads.dtype.element_ty)
    out2 = (x2 * cos + x1 * sin).to(Heads.dtype.element_ty)
    tl.store(first, out1, mask=mask)
    tl.store(first + HALF, out2, mask=mask)
    slot = tl.load(slot_mapping + token)
    if slot >= 0:
        # k heads are rows NUM_Q_HEADS.. of the rotated tile; each is 2 * HALF wide in the cache
        k_mask = mask & (offs_h >= NUM_Q_HEADS)[:, None]
        k_head = tl.where(offs_h >= NUM_Q_HEADS, offs_h - NUM_Q_HEADS, 0)
        k_first = KCache + slot * stride_kc_slot + k_head[:, None] * (2 * HALF) + offs_d[None, :]
        tl.store(k_first, out1.to(KCache.dtype.element_ty), mask=k_mask)
        tl.store(k_first + HALF, out2.to(KCache.dtype.element_ty), mask=k_mask)
        offs_v = tl.arange(0, V_PAD)
        v_valid = offs_v < V_WIDTH
        v = tl.load(Value + token * stride_vt + offs_v, mask=v_valid)
        if SCALE_ROWS:
            v = v.to(tl.float32) * rstd
        tl.store(VCache + slot * stride_vc_slot + offs_v, v.to(VCache.dtype.element_ty),
                 mask=v_valid)


def rotary_and_store_kv(
    qk: torch.Tensor,  # [num_tokens, num_q_heads + num_kv_heads, head_dim], last dim contiguous
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]; heads and dim contiguous
    positions: torch.Tensor,  # [num_tokens]
    cos: torch.Tensor,  # [max_positions, head_dim / 2] float32
    sin: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens]; a negative slot is not stored
    num_q_heads: int,
    normed: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Rotate ``qk`` in place (it may be a view of the fused qkv output), store the rotated k
    heads and ``value`` into their slots; returns ``qk``.

    With ``normed = (x, eps)`` ([num_tokens, hidden]), q, k and v are first multiplied by each
    token's ``1 / rms(x)``: the RMSNorm before a qkv projection whose weight holds the norm's
    (``silu_and_mul`` says why that is the same)."""
    num_tokens, num_heads, head_dim = qk.shape
    num_kv_heads = num_heads - num_q_heads
    if qk.stride(2) != 1:
        raise ValueError("rotary_and_store_kv needs the head dimension contiguous")
    if value.stride(2) != 1 or value.stride(1) != head_dim:
        raise ValueError("rotary_and_store_kv needs each token's v heads contiguous")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("rotary_and_store_kv needs contiguous caches")
    x, eps = normed if normed is not None else (qk, 0.0)
    if normed is not None and (x.shape[0] != num_tokens or x.stride(-1) != 1):
        raise ValueError("rotary_and_store_kv: normed must be [num_tokens, hidden], rows "
                         "contiguous")
    if num_tokens:
        half = head_dim // 2
        width = num_kv_heads * head_dim
        _rotary_store_kernel[(num_tokens,)](
            qk, value, positions, cos, sin, k_cache, v_cache, slot_mapping, x,
            qk.stride(0), qk.stride(1), value.stride(0), cos.stride(0),
            k_cache.stride(1), v_cache.stride(1), x.stride(0), eps,
            NUM_Q_HEADS=num_q_heads, NUM_HEADS=num_heads, HEADS_PAD=next_power_of_2(num_heads),
            HALF=half, HALF_PAD=next_power_of_2(half), V_WIDTH=width,
            V_PAD=next_power_of_2(width), SCALE_ROWS=normed is not None,
            NORM_WIDTH=x.shape[-1], NORM_PAD=next_power_of_2(x.shape[-1]), num_warps=4,
        )
    return qk
