"""Fast PyTorch attention over the paged cache, built on scaled_dot_product_attention.

Three cases, each checked against the reference backend in tests:
- decodes (one query each) are batched: every request's blocks are gathered into one padded
  tensor and attended in one call, with a mask hiding the padding;
- a prefill with no cached prefix attends to its own fresh K/V with the causal kernel (no
  gather, no explicit mask);
- a chunk after a cached prefix gathers its context and uses an offset causal mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.attention.backend import AttentionBackend, store_kv
from kvserve.attention.metadata import AttentionMetadata
from kvserve.attention.torch_reference import causal_attention, gather_context
from kvserve.device_copy import to_device


class TorchSDPABackend(AttentionBackend):
    """The default CPU backend: few kernel launches, no per-token Python."""

    name = "sdpa"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        store_kv(k_cache, v_cache, key, value, metadata.slot_mapping)
        if metadata.is_decode_only:
            return batched_decode(query, k_cache, v_cache, metadata, scale)
        out = torch.empty_like(query)
        decode_rows: list[int] = []
        start = 0
        for i, (query_len, seq_len) in enumerate(
            zip(metadata.query_lens_list, metadata.seq_lens_list, strict=True)
        ):
            rows = slice(start, start + query_len)
            start += query_len
            if query_len == 1:
                decode_rows.append(i)
            elif query_len == seq_len:
                out[rows] = _causal_fresh(query[rows], key[rows], value[rows], scale)
            else:
                keys, values = gather_context(k_cache, v_cache, metadata.block_tables[i], seq_len)
                out[rows] = causal_attention(query[rows], keys, values, scale)
        if decode_rows:
            _decode_subset(out, query, k_cache, v_cache, metadata, scale, decode_rows)
        return out


def batched_decode(
    query: torch.Tensor,  # [num_reqs, num_heads, head_dim], one query per request
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """All requests' single queries against their whole cached context, in one SDPA call."""
    num_reqs = query.shape[0]
    block_size = k_cache.shape[1]
    max_len = metadata.max_seq_len
    num_blocks = -(-max_len // block_size)
    tables = metadata.block_tables[:, :num_blocks].reshape(-1)  # [num_reqs * num_blocks]
    shape = (num_reqs, num_blocks * block_size, *k_cache.shape[2:])
    keys = k_cache.index_select(0, tables).view(shape)[:, :max_len]  # [reqs, len, kv_heads, dim]
    values = v_cache.index_select(0, tables).view(shape)[:, :max_len]
    mask = None
    if any(n != max_len for n in metadata.seq_lens_list):
        positions = torch.arange(max_len, device=query.device)
        mask = (positions < metadata.seq_lens.unsqueeze(1)).view(num_reqs, 1, 1, max_len)
    out = F.scaled_dot_product_attention(
        query.unsqueeze(2),  # [num_reqs, num_heads, 1, head_dim]
        keys.transpose(1, 2).to(query.dtype),  # [num_reqs, kv_heads, max_len, head_dim]
        values.transpose(1, 2).to(query.dtype),
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(2)  # [num_reqs, num_heads, head_dim]


def _decode_subset(
    out: torch.Tensor,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    request_indices: list[int],
) -> None:
    """Batched decode for the single-query requests of a mixed step, written into ``out``."""
    rows = metadata.query_start_loc[request_indices]
    index = to_device(request_indices, torch.int64, query.device)
    sub = AttentionMetadata(
        query_start_loc=torch.arange(len(request_indices) + 1, device=query.device),
        seq_lens=metadata.seq_lens[index],
        block_tables=metadata.block_tables[index],
        slot_mapping=metadata.slot_mapping[:0],
        query_lens_list=[1] * len(request_indices),
        seq_lens_list=[metadata.seq_lens_list[i] for i in request_indices],
        block_size=metadata.block_size,
    )
    out[rows] = batched_decode(query[rows], k_cache, v_cache, sub, scale)


def _causal_fresh(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """A whole prompt attending to itself: [len, heads, dim] in, [len, heads, dim] out."""
    # 4-D inputs: with a batch dimension the CPU flash kernel is used (3-D falls back to math).
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),  # [1, heads, len, dim]
        k.transpose(0, 1).unsqueeze(0).to(q.dtype),
        v.transpose(0, 1).unsqueeze(0).to(q.dtype),
        is_causal=True,
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(0).transpose(0, 1)

