"""The FLOPs and bytes model of a step against values computed by hand for tiny configs."""

from __future__ import annotations

import pytest

from kvserve.analysis.cost_model import decode_cost, kv_bytes_per_token, prefill_cost
from kvserve.model.config import ModelConfig


def tiny(num_kv_heads: int, tied: bool) -> ModelConfig:
    # hidden 8, 1 layer, 4 heads of 2 (q_size 8), intermediate 4, vocab 10
    return ModelConfig("llama", vocab_size=10, hidden_size=8, intermediate_size=4,
                       num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=num_kv_heads, head_dim=2, tie_word_embeddings=tied)


# kv_size: 4 heads -> 8 (no GQA), 2 heads -> 4 (GQA)
# layer weights: qkv 8 * (8 + 2 * kv) + o 64 + gate/up/down 3 * 8 * 4 = 96
#   no GQA: 8 * 24 + 64 + 96 = 352; GQA: 8 * 16 + 64 + 96 = 288
# LM head: 10 * 8 = 80 (tied or not: the same matrix is read)
CASES = {"mha": (4, 352, 8), "gqa": (2, 288, 4)}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_by_hand(case: str, tied: bool) -> None:
    kv_heads, layer_weights, kv_size = CASES[case]
    config = tiny(kv_heads, tied)
    # 3 new tokens after 2 cached ones: queries at positions 2, 3, 4 see 3 + 4 + 5 = 12 keys
    cost = prefill_cost(config, num_tokens=3, cached_tokens=2, element_size=2)
    flops = 2 * layer_weights * 3 + 4 * 1 * 8 * 12 + 2 * 80
    per_token = 2 * 1 * kv_size * 2  # K and V, 1 layer, bf16
    assert kv_bytes_per_token(config, 2) == per_token
    kv = per_token * 5 + per_token * 3  # read the 5-token context, write 3
    assert cost.flops == flops
    assert cost.bytes == (layer_weights + 80) * 2 + kv
    assert cost.intensity == flops / cost.bytes


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_decode_by_hand(case: str, tied: bool) -> None:
    kv_heads, layer_weights, kv_size = CASES[case]
    config = tiny(kv_heads, tied)
    cost = decode_cost(config, context_lens=[5, 1], element_size=4)
    flops = 2 * (layer_weights + 80) * 2 + 4 * 1 * 8 * (5 + 1)
    per_token = 2 * 1 * kv_size * 4  # float32
    assert cost.flops == flops
    assert cost.bytes == (layer_weights + 80) * 4 + per_token * 6 + per_token * 2


def test_prefill_is_more_intense_than_batch1_decode_and_batching_raises_decode() -> None:
    config = tiny(2, True)
    decode_1 = decode_cost(config, [64]).intensity
    assert prefill_cost(config, 64).intensity > decode_1
    assert decode_cost(config, [64] * 32).intensity > decode_1
