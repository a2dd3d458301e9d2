"""CUDA graphs of decode steps: the bucket sizes (anywhere), and on a GPU, a replayed graph gives
the eager forward pass's hidden states (or, in buckets up to ``LOGITS_MAX_BATCH``, its logits)
for ragged batches padded up to their bucket."""

from __future__ import annotations

import random

import pytest
import torch

from kvserve.worker.cuda_graphs import bucket_sizes


def test_bucket_sizes_end_at_max_batch() -> None:
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(6) == [1, 2, 4, 6]
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert bucket_sizes(100)[-2:] == [96, 100]


SEQ_LENS = [1, 17, 40, 95, 130, 3, 50, 64, 65, 8, 200]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_reqs", [1, 5, 11])  # buckets 1 and 8 (logits) and 16 (hidden)
def test_replayed_decode_equals_eager_forward(num_reqs: int) -> None:
    from kvserve.attention.backend import create_backend
    from kvserve.attention.metadata import build_attention_metadata
    from kvserve.model.config import ModelConfig
    from kvserve.model.dummy_loader import dummy_weights
    from kvserve.model.llama import LlamaForCausalLM
    from kvserve.worker.cuda_graphs import LOGITS_MAX_BATCH, DecodeGraphs
    from kvserve.worker.kv_cache import allocate_kv_cache, kv_bytes_per_block

    config = ModelConfig("qwen3", vocab_size=512, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=64, qk_norm=True, tie_word_embeddings=True,
                         max_position_embeddings=1024)
    device = torch.device("cuda")
    model = LlamaForCausalLM.from_weights(  # the GPU path: fused kernels, Triton attention
        config, dummy_weights(config), torch.float32, device, fused_ops=True
    )
    block_size, num_blocks = 16, 64
    cache = allocate_kv_cache(config, num_blocks * kv_bytes_per_block(config, block_size,
                              torch.float32), block_size, torch.float32, device)
    backend = create_backend("triton")
    graphs = DecodeGraphs(model, cache.layers, backend, block_size, max_batch=16,
                          max_model_len=512, device=device)
    graphs.capture()
    rng = random.Random(0)
    free = list(range(num_blocks))
    rng.shuffle(free)
    seq_lens = SEQ_LENS[:num_reqs]
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in seq_lens]
    with torch.inference_mode():
        for k, v in cache.layers:  # a random context already in the cache
            k.normal_()
            v.normal_()
        ids = [rng.randrange(config.vocab_size) for _ in seq_lens]
        positions = [n - 1 for n in seq_lens]
        replayed = graphs.run(ids, positions, tables).clone()
        metadata = build_attention_metadata([1] * num_reqs, seq_lens, tables, block_size, device)
        eager = model(torch.tensor(ids, device=device), torch.tensor(positions, device=device),
                      cache.layers, metadata, backend)
        assert graphs.gives_logits(num_reqs) == (num_reqs <= LOGITS_MAX_BATCH)
        if graphs.gives_logits(num_reqs):
            eager = model.compute_logits(eager)
    assert replayed.shape == eager.shape
    torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)
