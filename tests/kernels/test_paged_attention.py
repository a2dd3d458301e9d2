"""The Triton paged attention kernels against the torch reference, on random inputs: prefill
with and without a cached prefix, chunks starting mid-block, decode with context lengths that
are not multiples of the block size, split-KV decode, mixed batches and padding rows."""

from __future__ import annotations

import random

import pytest
import torch

from kvserve.attention.torch_reference import causal_attention, gather_context
from tests.kernels.conftest import KernelTarget, relative_error

BLOCK_SIZE = 16


def make_batch(target: KernelTarget, query_lens: list[int], seq_lens: list[int],
               num_heads: int, num_kv_heads: int, head_dim: int, seed: int):
    """Random queries and caches, each request's blocks scattered over the pool in random
    order. Returns query, caches, block tables, seq lens and query start offsets."""
    gen = torch.Generator().manual_seed(seed)
    shuffle = random.Random(seed)
    blocks_needed = [-(-s // BLOCK_SIZE) for s in seq_lens]
    num_blocks = sum(blocks_needed) + 3
    ids = list(range(num_blocks))
    shuffle.shuffle(ids)
    tables, used = [], 0
    for n in blocks_needed:
        tables.append(ids[used : used + n])
        used += n
    width = max(blocks_needed)
    padded = [t + [0] * (width - len(t)) for t in tables]

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(target.dtype).to(target.device)

    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    return (
        rand(starts[-1], num_heads, head_dim),
        rand(*shape),
        rand(*shape),
        torch.tensor(padded, dtype=torch.int64, device=target.device),
        torch.tensor(seq_lens, dtype=torch.int64, device=target.device),
        torch.tensor(starts, dtype=torch.int64, device=target.device),
    )


def reference(query, k_cache, v_cache, tables, query_lens, seq_lens, scale) -> torch.Tensor:
    """The torch oracle in float32, one request at a time."""
    outs, start = [], 0
    for i, (q_len, s_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        keys, values = gather_context(k_cache.float(), v_cache.float(), tables[i], s_len)
        outs.append(causal_attention(query[start : start + q_len].float(), keys, values, scale))
        start += q_len
    return torch.cat(outs)


CASES = {
    # name: (query_lens, seq_lens)
    "prefill, no cached prefix": ([37, 80, 5], [37, 80, 5]),
    "prefill after a cached prefix": ([20, 64], [52, 96]),
    "chunk starting mid-block": ([24, 9], [24 + 40, 9 + 7]),
    "mixed prefill and decode": ([1, 33, 1, 17], [45, 33, 130, 50]),
    "decode rows only": ([1, 1, 1], [1, 17, 99]),
}


@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 4, 48)], ids=["gqa3-d64", "mha-d48"])
@pytest.mark.parametrize("case", list(CASES))
def test_prefill_kernel_matches_reference(target: KernelTarget, case: str, heads) -> None:
    from kvserve.kernels.paged_attention import paged_prefill

    query_lens, seq_lens = CASES[case]
    num_heads, num_kv_heads, head_dim = heads
    query, k_cache, v_cache, tables, lens, starts = make_batch(
        target, query_lens, seq_lens, num_heads, num_kv_heads, head_dim, seed=len(case)
    )
    scale = head_dim**-0.5
    out = torch.full_like(query, float("nan"))  # poisoned: every row must be written
    paged_prefill(query, k_cache, v_cache, tables, lens, starts, query_lens, scale, out=out)
    ref = reference(query, k_cache, v_cache, tables, query_lens, seq_lens, scale)
    assert not out.isnan().any()
    assert relative_error(out, ref) < target.rel_tol


@pytest.mark.parametrize("num_splits", [1, 2, 4])
@pytest.mark.parametrize("heads", [(9, 3, 64), (16, 8, 128)], ids=["gqa3-d64", "gqa2-d128"])
def test_decode_kernel_matches_reference(target: KernelTarget, num_splits: int, heads) -> None:
    from kvserve.kernels.paged_attention import paged_decode

    seq_lens = [1, 15, 16, 17, 130, 257]  # around block and tile edges, one longer than splits
    num_heads, num_kv_heads, head_dim = heads
    query, k_cache, v_cache, tables, lens, _ = make_batch(
        target, [1] * len(seq_lens), seq_lens, num_heads, num_kv_heads, head_dim,
        seed=num_splits,
    )
    scale = head_dim**-0.5
    out = torch.full_like(query, float("nan"))
    paged_decode(query, k_cache, v_cache, tables, lens, scale, num_splits, out=out)
    ref = reference(query, k_cache, v_cache, tables, [1] * len(seq_lens), seq_lens, scale)
    assert not out.isnan().any()
    assert relative_error(out, ref) < target.rel_tol


def test_decode_padding_rows_write_zeros_and_leave_real_rows_alone(target: KernelTarget) -> None:
    """A CUDA-graph batch pads with seq_len 0 rows: their output is 0, the others unchanged."""
    from kvserve.kernels.paged_attention import paged_decode

    seq_lens = [40, 3]
    query, k_cache, v_cache, tables, lens, _ = make_batch(target, [1, 1], seq_lens, 4, 2, 32, 7)
    padded_tables = torch.cat([tables, torch.zeros_like(tables[:2])])
    padded_lens = torch.cat([lens, torch.zeros_like(lens[:2])])
    padded_query = torch.cat([query, query[:2]])
    for num_splits in (1, 4):
        out = paged_decode(padded_query, k_cache, v_cache, padded_tables, padded_lens, 0.3,
                           num_splits)
        ref = reference(query, k_cache, v_cache, tables, [1, 1], seq_lens, 0.3)
        assert relative_error(out[:2], ref) < target.rel_tol
        assert out[2:].eq(0).all()


def test_decode_splits_fill_the_gpu_and_respect_short_contexts() -> None:
    pytest.importorskip("triton")
    from kvserve.kernels.paged_attention import decode_splits

    assert decode_splits(num_reqs=1, num_kv_heads=8, max_seq_len=4096, num_sms=132) == 16
    assert decode_splits(num_reqs=1, num_kv_heads=8, max_seq_len=300, num_sms=132) == 2
    assert decode_splits(num_reqs=256, num_kv_heads=8, max_seq_len=4096, num_sms=132) == 1
    assert decode_splits(num_reqs=1, num_kv_heads=1, max_seq_len=10**6, num_sms=132) == 32
