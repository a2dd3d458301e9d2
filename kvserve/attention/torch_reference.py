"""Pure-PyTorch paged attention: the oracle every faster backend is tested against.

Each request's K/V is gathered from the cache through its block table, and its queries attend
with a causal mask offset by the length of the context that precedes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.attention.backend import AttentionBackend, store_kv
from kvserve.attention.metadata import AttentionMetadata


class TorchReferenceBackend(AttentionBackend):
    """Gather-by-block-table attention, one request at a time. Slow and obviously correct."""

    name = "torch"

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
        outputs = []
        start = 0
        for i, (query_len, seq_len) in enumerate(
            zip(metadata.query_lens_list, metadata.seq_lens_list, strict=True)
        ):
            q = query[start : start + query_len]  # [query_len, num_heads, head_dim]
            start += query_len
            keys, values = gather_context(k_cache, v_cache, metadata.block_tables[i], seq_len)
            outputs.append(causal_attention(q, keys, values, scale))
        return torch.cat(outputs, dim=0)


def gather_context(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``seq_len`` cached K/V of one request: [seq_len, num_kv_heads, head_dim] each."""
    block_size = k_cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks]
    keys = k_cache[blocks].flatten(0, 1)[:seq_len]
    values = v_cache[blocks].flatten(0, 1)[:seq_len]
    return keys, values


def causal_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of the last ``len(q)`` positions of a context over the whole context.

    Query ``j`` sits at position ``seq_len - query_len + j`` and sees keys ``0..that position``.
    Grouped-query attention repeats each K/V head for its group of query heads.
    """
    query_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    keys = keys.repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_dim]
    values = values.repeat_interleave(group, dim=1)
    offset = seq_len - query_len
    query_pos = torch.arange(query_len, device=q.device).unsqueeze(1) + offset
    key_pos = torch.arange(seq_len, device=q.device).unsqueeze(0)
    mask = key_pos <= query_pos  # [query_len, seq_len]
    out = F.scaled_dot_product_attention(  # 4-D, so CPU can use its flash kernel
        q.transpose(0, 1).unsqueeze(0),  # [1, num_heads, query_len, head_dim]
        keys.transpose(0, 1).unsqueeze(0).to(q.dtype),
        values.transpose(0, 1).unsqueeze(0).to(q.dtype),
        attn_mask=mask,
        scale=scale,
    )
    return out.squeeze(0).transpose(0, 1)  # [query_len, num_heads, head_dim]

