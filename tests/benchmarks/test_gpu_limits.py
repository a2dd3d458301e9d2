"""The bytes and FLOPs model of the GPU benchmark's floors, against hand-computed values."""

from __future__ import annotations

from kvserve.benchmarks.gpu_limits import (
    decode_context_tokens,
    decode_floor_s,
    decode_weight_bytes,
    kv_bytes_per_token,
    matmul_weight_count,
    prefill_flops,
)
from kvserve.model.config import ModelConfig

# hidden 8, 2 layers, 4 heads of 2 (q 8), 2 KV heads (kv 4), intermediate 16, vocab 10.
TINY = ModelConfig("llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=2)


def test_weights_each_token_multiplies_by() -> None:
    per_layer = 8 * (8 + 4 + 4) + 8 * 8 + 3 * 8 * 16  # qkv, o, gate+up+down = 128+64+384
    assert matmul_weight_count(TINY) == 2 * per_layer + 10 * 8  # + LM head
    assert decode_weight_bytes(TINY, 2) == 2 * (2 * 576 + 80)


def test_kv_bytes_and_context_read_by_decode_steps() -> None:
    assert kv_bytes_per_token(TINY, 2) == 2 * 2 * 4 * 2  # K and V, 2 layers, kv 4, bf16
    # prompt 5, 3 output tokens: the 2 decode steps read 6 and 7 tokens.
    assert decode_context_tokens([5, 1], [3, 1]) == 6 + 7
    # 2 steps of weights plus 13 tokens of K/V, at 1000 bytes/s
    assert decode_floor_s(TINY, 2, 2, 13, 1000.0) == (2 * 2464 + 13 * 32) / 1000.0


def test_prefill_flops() -> None:
    tokens = 4
    projections = 2 * 1152 * tokens  # layers' weights only
    # QK^T and PV (2 FLOPs per multiply-add each), 2 layers, q 8, over the causal pairs:
    # query i sees i + 1 keys, 1 + 2 + 3 + 4 = 10 pairs.
    attention = 2 * 2 * 2 * 8 * 10
    assert prefill_flops(TINY, tokens) == projections + attention + 2 * 10 * 8
