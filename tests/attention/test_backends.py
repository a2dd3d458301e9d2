"""Both paged attention backends equal plain causal attention on contiguous K/V."""

from __future__ import annotations

import math

import pytest
import torch

from kvserve.attention import backend as backend_module
from kvserve.attention.backend import BACKENDS, available_backends, create_backend, store_kv
from kvserve.attention.metadata import build_attention_metadata
from kvserve.kernels.availability import HAS_TRITON, interpreter_on

BLOCK_SIZE = 4
HEADS, KV_HEADS, DIM = 4, 2, 8


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Textbook softmax(QK^T / sqrt(d)) V with a causal mask, queries at the end of the context."""
    query_len, seq_len = q.shape[0], k.shape[0]
    group = HEADS // KV_HEADS
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(DIM)
    for i in range(query_len):
        scores[:, i, seq_len - query_len + i + 1 :] = float("-inf")
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def skip_unless_runnable(backend_name: str) -> None:
    """The Triton backend runs these CPU tensors under Triton's interpreter, or is skipped."""
    if backend_name != "triton":
        return
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        pytest.skip("CPU-interpreter check; on a GPU, tests/kernels covers the Triton backend")
    assert interpreter_on(), "tests/conftest.py turns on TRITON_INTERPRET=1 without a GPU"


@pytest.mark.parametrize("backend_name", ["torch", "sdpa", "triton"])
@pytest.mark.parametrize(
    ("query_lens", "seq_lens"),
    [
        ([7], [7]),  # plain prefill spanning two blocks
        ([8], [8]),  # prompt an exact multiple of the block size
        ([1], [9]),  # decode, context not a multiple of the block size
        ([3], [10]),  # chunk starting mid-block after a cached prefix
        ([5, 1, 2, 1], [5, 13, 6, 4]),  # mixed batch of prefills and decodes
        ([1, 1, 1], [9, 16, 3]),  # decode-only batch, ragged context lengths
        ([1, 1], [8, 8]),  # decode-only batch, equal lengths (no padding mask)
    ],
)
def test_paged_attention_matches_naive(
    backend_name: str, query_lens: list[int], seq_lens: list[int]
) -> None:
    skip_unless_runnable(backend_name)
    torch.manual_seed(0)
    backend = create_backend(backend_name)
    num_blocks = 32
    k_cache = torch.zeros(num_blocks, BLOCK_SIZE, KV_HEADS, DIM)
    v_cache = torch.zeros_like(k_cache)
    # Scattered, non-contiguous block ids, distinct across requests.
    free = list(torch.randperm(num_blocks).tolist())
    tables = [[free.pop() for _ in range(-(-s // BLOCK_SIZE))] for s in seq_lens]
    contexts = [(torch.randn(s, KV_HEADS, DIM), torch.randn(s, KV_HEADS, DIM)) for s in seq_lens]
    # Pre-fill the cache with each request's already-computed prefix.
    prefix = build_attention_metadata(
        [s - q for q, s in zip(query_lens, seq_lens, strict=True) if s > q],
        [s - q for q, s in zip(query_lens, seq_lens, strict=True) if s > q],
        [t for t, q, s in zip(tables, query_lens, seq_lens, strict=True) if s > q],
        BLOCK_SIZE,
    )
    if prefix.num_reqs:
        keys = torch.cat(
            [
                k[: s - q]
                for (k, _), q, s in zip(contexts, query_lens, seq_lens, strict=True)
                if s > q
            ]
        )
        values = torch.cat(
            [
                v[: s - q]
                for (_, v), q, s in zip(contexts, query_lens, seq_lens, strict=True)
                if s > q
            ]
        )
        store_kv(k_cache, v_cache, keys, values, prefix.slot_mapping)
    metadata = build_attention_metadata(query_lens, seq_lens, tables, BLOCK_SIZE)
    new_k = torch.cat(
        [k[s - q :] for (k, _), q, s in zip(contexts, query_lens, seq_lens, strict=True)]
    )
    new_v = torch.cat(
        [v[s - q :] for (_, v), q, s in zip(contexts, query_lens, seq_lens, strict=True)]
    )
    query = torch.randn(sum(query_lens), HEADS, DIM)
    out = backend.forward(query, new_k, new_v, k_cache, v_cache, metadata, DIM**-0.5)

    start = 0
    for (k, v), q_len in zip(contexts, query_lens, strict=True):
        expected = naive_attention(query[start : start + q_len], k, v)
        torch.testing.assert_close(out[start : start + q_len], expected, atol=1e-5, rtol=1e-5)
        start += q_len


def test_slot_mapping_follows_block_table() -> None:
    metadata = build_attention_metadata([3], [6], [[7, 2]], BLOCK_SIZE)
    # positions 3, 4, 5 -> block 7 slot 3, block 2 slots 0 and 1
    assert metadata.slot_mapping.tolist() == [7 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1]


def test_metadata_rejects_too_few_blocks() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        build_attention_metadata([5], [5], [[0]], BLOCK_SIZE)


def test_unknown_backend_names_the_choices() -> None:
    assert {"torch", "sdpa"} <= set(available_backends())
    assert ("triton" in available_backends()) == HAS_TRITON
    with pytest.raises(ValueError, match=r"unknown attention backend 'nope'; choose one of \["):
        create_backend("nope")


def test_backends_are_built_from_the_name_table() -> None:
    """Each name maps to a module and class; nothing registers itself into a global dict."""
    assert set(BACKENDS) == {"torch", "sdpa", "triton"}
    assert type(create_backend("torch")).__name__ == BACKENDS["torch"][1]
    assert type(create_backend("sdpa")).__name__ == BACKENDS["sdpa"][1]
    assert not hasattr(backend_module, "register_backend")
    with pytest.raises(TypeError):
        BACKENDS["mine"] = ("my.module", "MyBackend")  # type: ignore[index]
