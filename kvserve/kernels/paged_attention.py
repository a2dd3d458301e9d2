"""Attention over the paged KV cache in Triton: a variable-length causal prefill kernel and a
split-KV decode kernel. Both read K/V through each request's block table, never from a copy.

Shapes follow ``kvserve.attention.backend``: queries ``[num_tokens, num_heads, head_dim]``,
caches ``[num_blocks, block_size, num_kv_heads, head_dim]``, block tables
``[num_reqs, max_blocks]``. Softmax runs online in float32 with base-2 exponentials.

- ``paged_prefill``: one program per (tile of up to ``BLOCK_M`` queries of one request, query
  head). Query ``j`` of a request sits at position ``seq_len - query_len + j`` and sees keys up
  to that position, so a cached prefix, a chunk starting mid-block and a one-token decode row
  are all the same case.
- ``paged_decode``: one query per request. One program per (request, KV head, split): the
  group of query heads sharing a KV head are the rows of one matrix product, and the context
  is cut into ``num_splits`` ranges whose partial results a second kernel merges. The grid
  depends only on the batch size and ``num_splits``, never on context lengths, so a CUDA graph
  captured once replays for any lengths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvserve.kernels.availability import next_power_of_2

LOG2_E = 1.4426950408889634
PREFILL_BLOCK_M = 64
PREFILL_BLOCK_N = 64
DECODE_BLOCK_N = 64
MAX_SPLITS = 32
TOKENS_PER_SPLIT = 256  # a split covers at least this many tokens of the longest context


@triton.jit
def _attend_tile(
    q, K, V, table, start_n, key_end, query_pos, kv_head, offs_d, d_valid, m_i, l_i, acc,
    scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Keys ``start_n .. start_n + BLOCK_N`` (those below ``key_end``) of one request, read
    through its block table, folded into the running max ``m_i``, sum ``l_i`` and ``acc``.
    With ``CAUSAL``, row ``r`` sees only keys at positions <= ``query_pos[r]``."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < key_end
    block = tl.load(table + offs_n // BLOCK_SIZE, mask=n_valid, other=0)
    slot = offs_n % BLOCK_SIZE
    kv_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(
        K + block[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head * stride_kh
        + offs_d[None, :],
        mask=kv_mask, other=0.0,
    )
    # [rows, BLOCK_N], in log2 units
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if CAUSAL:
        scores = tl.where(
            (offs_n[None, :] <= query_pos[:, None]) & n_valid[None, :], scores, float("-inf")
        )
    else:
        scores = tl.where(n_valid[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    p = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        V + block[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh
        + offs_d[None, :],
        mask=kv_mask, other=0.0,
    )
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# The block table's row stride is the widest table of the step: it changes from step to step,
# and Triton would compile a new variant of the kernel each time it changes between a multiple
# of 16 and not (0.7 s the first time, in the middle of serving): never specialize on it.
@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(
    Q, K, V, Out, block_tables, seq_lens, query_start_loc, tile_request, tile_first_query,
    scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    request = tl.load(tile_request + tile)
    first_query = tl.load(tile_first_query + tile)
    query_begin = tl.load(query_start_loc + request)
    query_len = tl.load(query_start_loc + request + 1) - query_begin
    seq_len = tl.load(seq_lens + request)
    context_before = seq_len - query_len

    offs_m = first_query + tl.arange(0, BLOCK_M)  # query index within the request
    m_valid = offs_m < query_len
    query_pos = context_before + offs_m
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    q = tl.load(
        Q + (query_begin + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_valid[:, None] & d_valid[None, :], other=0.0,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    # Keys beyond the tile's last query position are masked for every row: skip them.
    key_end = tl.minimum(context_before + first_query + BLOCK_M, seq_len)
    table = block_tables + request * stride_bt
    for start_n in range(0, key_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, K, V, table, start_n, key_end, query_pos, kv_head, offs_d, d_valid, m_i, l_i,
            acc, scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION,
        )
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        Out + (query_begin + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=m_valid[:, None] & d_valid[None, :],
    )


def dot_precision(dtype: torch.dtype) -> str:
    """Full float32 products for a float32 model (Triton would use tf32 otherwise)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def prefill_tiles(query_lens: list[int], block_m: int = PREFILL_BLOCK_M) -> tuple[list, list]:
    """Per program: which request and which of its queries the tile starts at."""
    requests: list[int] = []
    first_queries: list[int] = []
    for request, query_len in enumerate(query_lens):
        for first in range(0, query_len, block_m):
            requests.append(request)
            first_queries.append(first)
    return requests, first_queries


def prefill_tile_tensors(
    query_lens: list[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``prefill_tiles`` as int32 tensors on ``device``, copied in one transfer."""
    requests, first_queries = prefill_tiles(query_lens)
    both = torch.tensor([requests, first_queries], dtype=torch.int32)
    if device.type == "cuda":
        both = both.pin_memory().to(device, non_blocking=True)
    return both[0], both[1]


def paged_prefill(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_reqs, max_blocks]
    seq_lens: torch.Tensor,  # [num_reqs]
    query_start_loc: torch.Tensor,  # [num_reqs + 1]
    query_lens: list[int],
    scale: float,
    out: torch.Tensor | None = None,
    tiles: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention of every request's queries over its cached context (including them).

    ``tiles`` are ``prefill_tile_tensors(query_lens, device)``, built once per step and shared by
    every layer (building them is a host-to-device copy); built here when not given.
    """
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(query) if out is None else out
    tile_request, tile_first = tiles or prefill_tile_tensors(query_lens, query.device)
    if tile_request.numel() == 0:
        return out
    _prefill_kernel[(tile_request.numel(), num_heads)](
        query, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        tile_request, tile_first, scale * LOG2_E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        GROUP=num_heads // num_kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(16, next_power_of_2(head_dim)),
        BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N,
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=4, num_stages=2,
    )
    return out


@triton.jit(do_not_specialize=["stride_bt"])  # as _prefill_kernel's
def _decode_kernel(
    Q, K, V, Out, PartialAcc, PartialMax, PartialSum, block_tables, seq_lens,
    scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    request = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + request)
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, num_tiles)

    offs_g = tl.arange(0, GROUP_PAD)
    g_valid = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    q = tl.load(
        Q + request * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_valid[:, None] & d_valid[None, :], other=0.0,
    )
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    table = block_tables + request * stride_bt
    for tile in range(tile_begin, tile_end):
        m_i, l_i, acc = _attend_tile(
            q, K, V, table, tile * BLOCK_N, seq_len, offs_g, kv_head, offs_d, d_valid, m_i, l_i,
            acc, scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION,
        )
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l_i == 0: an empty padding row
        tl.store(
            Out + request * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(Out.dtype.element_ty),
            mask=g_valid[:, None] & d_valid[None, :],
        )
    else:
        # Partial results: [num_reqs, num_heads, NUM_SPLITS] (+ [HEAD_DIM_PAD] for acc).
        row = (request * (tl.num_programs(1) * GROUP) + heads) * NUM_SPLITS + split
        tl.store(PartialMax + row, m_i, mask=g_valid)
        tl.store(PartialSum + row, l_i, mask=g_valid)
        tl.store(
            PartialAcc + row[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc,
            mask=g_valid[:, None],
        )


@triton.jit
def _merge_splits_kernel(
    Out, PartialAcc, PartialMax, PartialSum, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    request = tl.program_id(0)
    head = tl.program_id(1)
    rows = (request * tl.num_programs(1) + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    maxes = tl.load(PartialMax + rows)
    sums = tl.load(PartialSum + rows)
    top = tl.max(maxes, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weights = tl.where(sums == 0.0, 0.0, tl.exp2(maxes - top))  # empty splits weigh nothing
    total = tl.sum(sums * weights, 0)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    acc = tl.load(PartialAcc + rows[:, None] * HEAD_DIM_PAD + offs_d[None, :])
    out = tl.sum(acc * weights[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(
        Out + request * stride_ot + head * stride_oh + offs_d, out.to(Out.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


def decode_splits(num_reqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """How many ranges to cut each context into: enough programs to fill the GPU twice over,
    no range shorter than ``TOKENS_PER_SPLIT`` tokens of the longest context. A power of two."""
    by_length = max(1, -(-max_seq_len // TOKENS_PER_SPLIT))
    by_occupancy = max(1, -(-2 * num_sms // max(1, num_reqs * num_kv_heads)))
    return min(MAX_SPLITS, next_power_of_2(min(by_length, by_occupancy)))


def paged_decode(
    query: torch.Tensor,  # [num_reqs, num_heads, head_dim]: one query per request
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_reqs, max_blocks]
    seq_lens: torch.Tensor,  # [num_reqs]; 0 marks a padding row (its output is zeros)
    scale: float,
    num_splits: int,
    out: torch.Tensor | None = None,
    block_n: int = DECODE_BLOCK_N,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Each request's single query over its whole cached context (its own K/V included).
    ``block_n`` (keys per tile), ``num_warps`` and ``num_stages`` are tuning knobs (see
    bench/gpu_profile.py and bench/gpu_decode_attention.py)."""
    num_reqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(query) if out is None else out
    group = num_heads // num_kv_heads
    head_dim_pad = max(16, next_power_of_2(head_dim))
    if num_splits > 1:
        rows = num_reqs * num_heads * num_splits
        partial_acc = torch.empty(rows, head_dim_pad, dtype=torch.float32, device=query.device)
        partial_max = torch.empty(rows, dtype=torch.float32, device=query.device)
        partial_sum = torch.empty(rows, dtype=torch.float32, device=query.device)
    else:
        partial_acc = partial_max = partial_sum = out  # unused
    _decode_kernel[(num_reqs, num_kv_heads, num_splits)](
        query, k_cache, v_cache, out, partial_acc, partial_max, partial_sum,
        block_tables, seq_lens, scale * LOG2_E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, next_power_of_2(group)), BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, DOT_PRECISION=dot_precision(query.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_reqs, num_heads)](
            out, partial_acc, partial_max, partial_sum, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, NUM_SPLITS=num_splits, num_warps=1,
        )
    return out
