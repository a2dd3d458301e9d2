"""Store a step's new K and V into their slots of the paged cache, in one launch for both."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvserve.kernels.availability import next_power_of_2


@triton.jit
def _store_kv_kernel(
    Key, Value, KCache, VCache, slot_mapping,
    stride_kt, stride_vt, stride_kc_slot, stride_vc_slot,
    WIDTH: tl.constexpr, WIDTH_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping + token)
    if slot < 0:  # a padding row of a CUDA-graph batch: nothing to store
        return
    offs = tl.arange(0, WIDTH_PAD)
    valid = offs < WIDTH
    k = tl.load(Key + token * stride_kt + offs, mask=valid)
    v = tl.load(Value + token * stride_vt + offs, mask=valid)
    tl.store(KCache + slot * stride_kc_slot + offs, k.to(KCache.dtype.element_ty), mask=valid)
    tl.store(VCache + slot * stride_vc_slot + offs, v.to(VCache.dtype.element_ty), mask=valid)


def store_kv(
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]; heads and dim contiguous
    value: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens]; a negative slot is skipped
) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if key.stride(2) != 1 or key.stride(1) != head_dim or value.stride(1) != head_dim:
        raise ValueError("store_kv needs each token's K/V heads contiguous")
    width = num_kv_heads * head_dim
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), value.stride(0), k_cache.stride(1), v_cache.stride(1),
        WIDTH=width, WIDTH_PAD=next_power_of_2(width), num_warps=4,
    )
