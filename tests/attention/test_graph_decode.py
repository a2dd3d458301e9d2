"""The tensor-only decode attention (for the compiled CPU step) equals the reference backend,
eager and compiled, with block tables padded wider than each request needs."""

from __future__ import annotations

import shutil

import pytest
import torch

from kvserve.attention.graph_decode import GraphDecodeBackend, paged_decode_attention
from kvserve.attention.metadata import build_attention_metadata
from kvserve.attention.torch_reference import TorchReferenceBackend

BLOCK_SIZE = 4
HEADS, KV_HEADS, DIM = 4, 2, 8
NUM_BLOCKS = 32


def decode_case(seq_lens: list[int], seed: int = 0):
    """Random caches, scattered tables, one new token per request; tables are padded with block
    0 to the widest one plus two (the padding must be masked out, whatever block 0 holds)."""
    generator = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, DIM, generator=generator)
    v_cache = torch.randn(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, DIM, generator=generator)
    free = (torch.randperm(NUM_BLOCKS - 1, generator=generator) + 1).tolist()
    tables = [[free.pop() for _ in range(-(-s // BLOCK_SIZE))] for s in seq_lens]
    metadata = build_attention_metadata([1] * len(seq_lens), seq_lens, tables, BLOCK_SIZE)
    width = max(len(t) for t in tables) + 2
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    n = len(seq_lens)
    q = torch.randn(n, HEADS, DIM, generator=generator)
    k = torch.randn(n, KV_HEADS, DIM, generator=generator)
    v = torch.randn(n, KV_HEADS, DIM, generator=generator)
    return q, k, v, k_cache, v_cache, metadata, padded


@pytest.mark.parametrize("use_sdpa", [False, True])
@pytest.mark.parametrize("seq_lens", [[1], [9], [4, 4], [9, 16, 3], [1, 13, 6, 8, 2]])
def test_graph_decode_equals_the_reference(seq_lens: list[int], use_sdpa: bool) -> None:
    q, k, v, k_cache, v_cache, metadata, padded = decode_case(seq_lens)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want = TorchReferenceBackend().forward(q, k, v, want_k, want_v, metadata, DIM**-0.5)
    got = paged_decode_attention(q, k, v, k_cache, v_cache, metadata.slot_mapping,
                                 metadata.seq_lens, padded, DIM**-0.5, use_sdpa)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)  # same K/V stored


def test_the_backend_reads_tensors_only() -> None:
    """Host lists may be empty (the compiled step has none): only tensors are read."""
    q, k, v, k_cache, v_cache, metadata, padded = decode_case([5, 2])
    want = paged_decode_attention(q, k, v, k_cache.clone(), v_cache.clone(),
                                  metadata.slot_mapping, metadata.seq_lens, padded, 0.5)
    stripped = type(metadata)(
        query_start_loc=metadata.query_start_loc, seq_lens=metadata.seq_lens,
        block_tables=padded, slot_mapping=metadata.slot_mapping, query_lens_list=[],
        seq_lens_list=[], block_size=BLOCK_SIZE,
    )
    got = GraphDecodeBackend(use_sdpa=False).forward(q, k, v, k_cache, v_cache, stripped, 0.5)
    assert torch.equal(got, want)


def test_the_matmuls_run_for_bfloat16_without_amx_and_sdpa_otherwise() -> None:
    amx = bool(torch.cpu._is_amx_tile_supported())
    backend = GraphDecodeBackend()
    assert backend.uses_sdpa(torch.bfloat16) is amx
    assert backend.uses_sdpa(torch.float32) is True
    assert GraphDecodeBackend(use_sdpa=False).uses_sdpa(torch.float32) is False
    assert GraphDecodeBackend(use_sdpa=True).uses_sdpa(torch.bfloat16) is True


def test_bfloat16_matmuls_stay_near_the_float32_reference() -> None:
    """The bfloat16 step: float32 scores and softmax, one rounding of the result."""
    q, k, v, k_cache, v_cache, metadata, padded = decode_case([9, 16, 3])
    want = TorchReferenceBackend().forward(q, k, v, k_cache.clone(), v_cache.clone(), metadata,
                                           DIM**-0.5)
    half = [t.bfloat16() for t in (q, k, v, k_cache, v_cache)]
    got = paged_decode_attention(*half, metadata.slot_mapping, metadata.seq_lens, padded,
                                 DIM**-0.5)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="inductor's CPU backend needs a C++ compiler")
def test_one_compiled_graph_serves_every_batch_and_width() -> None:
    """Compiled with the batch and the table width dynamic, then run at other sizes with
    recompilation forbidden: equal to the eager function each time."""
    compiled = torch.compile(paged_decode_attention, fullgraph=True, dynamic=False)
    first = decode_case([5, 9])
    for tensor in (first[0], first[1], first[2], first[5].slot_mapping, first[5].seq_lens,
                   first[6]):
        torch._dynamo.mark_dynamic(tensor, 0)
    torch._dynamo.mark_dynamic(first[6], 1)
    cases = [first, decode_case([3, 7, 12], seed=1), decode_case([2, 20, 1, 8, 5], seed=2)]
    for index, (q, k, v, k_cache, v_cache, metadata, padded) in enumerate(cases):
        args = (q, k, v, k_cache, v_cache, metadata.slot_mapping, metadata.seq_lens, padded,
                DIM**-0.5)
        want = paged_decode_attention(*(a.clone() if isinstance(a, torch.Tensor) else a
                                        for a in args))
        stance = "fail_on_recompile" if index else "default"
        with torch.compiler.set_stance(stance):
            got = compiled(*args)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
