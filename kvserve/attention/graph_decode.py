"""Decode attention in tensor ops only, for a compiled decode step (``torch.compile``).

The eager backends read host lists (``seq_lens_list``) to size their gathers; a compiled graph
cannot, or it would be specialised to one mix of context lengths. Here every size comes from
tensor shapes: the K/V of each request's whole block table (padded with block 0) are gathered,
and positions at or past the request's length are masked out. The block table's width is a
dynamic dimension of the graph, so one graph serves every context length.

Decode steps only (one query per request); tested against the reference backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.attention.backend import AttentionBackend, store_kv
from kvserve.attention.metadata import AttentionMetadata


def paged_decode_attention(
    query: torch.Tensor,  # [num_reqs, num_heads, head_dim]
    key: torch.Tensor,  # [num_reqs, num_kv_heads, head_dim], this step's new K/V
    value: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_reqs] where each new K/V goes
    seq_lens: torch.Tensor,  # [num_reqs] context length including this step's token
    block_tables: torch.Tensor,  # [num_reqs, width] padded with any valid block id
    scale: float,
) -> torch.Tensor:  # [num_reqs, num_heads, head_dim]
    """Store this step's K/V, then attend each query to its request's first ``seq_len``
    cached positions."""
    store_kv(k_cache, v_cache, key, value, slot_mapping)
    num_reqs, width = block_tables.shape
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    length = width * block_size
    shape = (num_reqs, length, num_kv_heads, head_dim)
    keys = k_cache[block_tables].view(shape).transpose(1, 2)  # [reqs, kv_heads, len, dim]
    values = v_cache[block_tables].view(shape).transpose(1, 2)
    positions = torch.arange(length, device=query.device)
    mask = (positions < seq_lens.unsqueeze(1)).view(num_reqs, 1, 1, length)
    out = F.scaled_dot_product_attention(
        query.unsqueeze(2),  # [reqs, heads, 1, dim]
        keys.to(query.dtype),
        values.to(query.dtype),
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(2)


class GraphDecodeBackend(AttentionBackend):
    """``paged_decode_attention`` behind the backend interface: decode-only metadata, and no
    host lists read (``seq_lens_list`` may be empty)."""

    name = "graph-decode"

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
        return paged_decode_attention(
            query, key, value, k_cache, v_cache, metadata.slot_mapping, metadata.seq_lens,
            metadata.block_tables, scale,
        )
