"""Decode attention in tensor ops only, for a compiled decode step (``torch.compile``).

The eager backends read host lists (``seq_lens_list``) to size their gathers; a compiled graph
cannot, or it would be specialised to one mix of context lengths. Here every size comes from
tensor shapes: the K/V of each request's whole block table (padded with block 0) are gathered,
and positions at or past the request's length are masked out. The block table's width is a
dynamic dimension of the graph, so one graph serves every context length.

Decode steps only (one query per request); tested against the reference backend.

The attention itself runs as two batched matmuls around a float32 softmax (``use_sdpa=False``)
or as ``F.scaled_dot_product_attention``. With one query a request, SDPA's CPU flash kernel in
bfloat16 is mostly per-call overhead: compiled, at the embedded model's shapes on 2 cores of an
AMD EPYC (family 25, AVX-512 BF16, no AMX), 8 requests of 80 tokens took 637-693 us a layer
against 160-180 us for the matmuls, and 1 request of 1,024 tokens 767-960 against 250-352 us
(``bench/cpu_decode_attention.py``). In float32 the two were within 10% at short contexts and
SDPA was faster at long ones (1 x 1,024: 167 against 229 us). So ``GraphDecodeBackend`` runs the
matmuls for bfloat16 on CPUs without AMX tiles, and SDPA for float32 and on AMX CPUs (where the
matmuls were not measured).
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
    use_sdpa: bool = False,
) -> torch.Tensor:  # [num_reqs, num_heads, head_dim]
    """Store this step's K/V, then attend each query to its request's first ``seq_len``
    cached positions (by SDPA or by matmuls: the module docstring)."""
    store_kv(k_cache, v_cache, key, value, slot_mapping)
    num_reqs, width = block_tables.shape
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    length = width * block_size
    shape = (num_reqs, length, num_kv_heads, head_dim)
    keys = k_cache[block_tables].view(shape).transpose(1, 2)  # [reqs, kv_heads, len, dim]
    values = v_cache[block_tables].view(shape).transpose(1, 2)
    positions = torch.arange(length, device=query.device)
    mask = (positions < seq_lens.unsqueeze(1)).view(num_reqs, 1, 1, length)
    if not use_sdpa:
        return _attend_by_matmuls(query, keys, values, mask, scale)
    out = F.scaled_dot_product_attention(
        query.unsqueeze(2),  # [reqs, heads, 1, dim]
        keys.to(query.dtype),
        values.to(query.dtype),
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(2)


def _attend_by_matmuls(
    query: torch.Tensor,  # [num_reqs, num_heads, head_dim]
    keys: torch.Tensor,  # [num_reqs, num_kv_heads, length, head_dim]
    values: torch.Tensor,
    mask: torch.Tensor,  # [num_reqs, 1, 1, length] bool, True where a position is attended
    scale: float,
) -> torch.Tensor:  # [num_reqs, num_heads, head_dim]
    """Each kv head's group of query heads against its keys: scores, softmax and the weighted
    values in float32, the result in the query's dtype."""
    num_reqs, num_heads, head_dim = query.shape
    num_kv_heads = keys.shape[1]
    grouped = query.view(num_reqs, num_kv_heads, num_heads // num_kv_heads, head_dim).float()
    scores = torch.matmul(grouped, keys.float().transpose(-1, -2)) * scale  # [r, kvh, g, len]
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    out = torch.matmul(weights, values.float())  # [r, kvh, g, dim]
    return out.view(num_reqs, num_heads, head_dim).to(query.dtype)


class GraphDecodeBackend(AttentionBackend):
    """``paged_decode_attention`` behind the backend interface: decode-only metadata, and no
    host lists read (``seq_lens_list`` may be empty). ``use_sdpa`` None: ``uses_sdpa`` picks
    by dtype and CPU (module docstring)."""

    name = "graph-decode"

    def __init__(self, use_sdpa: bool | None = None) -> None:
        self.use_sdpa = use_sdpa
        self._has_amx = bool(torch.cpu._is_amx_tile_supported())

    def uses_sdpa(self, dtype: torch.dtype) -> bool:
        if self.use_sdpa is not None:
            return self.use_sdpa
        return self._has_amx or dtype != torch.bfloat16

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
            metadata.block_tables, scale, self.uses_sdpa(query.dtype),
        )
