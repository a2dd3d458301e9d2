"""expected_weight_shapes / check_weights: exact names and shapes, and readable errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvserve.model.config import ModelConfig
from kvserve.model.weight_names import check_weights, drop_tied_lm_head, expected_weight_shapes

TINY = ModelConfig(
    architecture="llama",
    vocab_size=100,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)


def _weights(config: ModelConfig) -> dict[str, torch.Tensor]:
    return {name: torch.zeros(shape) for name, shape in expected_weight_shapes(config).items()}


def test_llama_names_and_shapes() -> None:
    shapes = expected_weight_shapes(TINY)
    assert len(shapes) == 1 + 2 * 9 + 1 + 1
    assert shapes["model.embed_tokens.weight"] == (100, 32)
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == (32, 32)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (16, 32)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (32, 32)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (32, 48)
    assert shapes["lm_head.weight"] == (100, 32)
    assert not any("bias" in name or "_norm" in name.split(".")[-2] for name in shapes)


def test_flags_add_and_remove_names() -> None:
    qwen2 = dataclasses.replace(TINY, architecture="qwen2", attention_bias=True)
    assert expected_weight_shapes(qwen2)["model.layers.0.self_attn.k_proj.bias"] == (16,)
    qwen3 = dataclasses.replace(TINY, architecture="qwen3", qk_norm=True, head_dim=16)
    shapes = expected_weight_shapes(qwen3)
    assert shapes["model.layers.1.self_attn.q_norm.weight"] == (16,)
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == (64, 32)  # q_size != hidden
    assert shapes["model.layers.1.self_attn.o_proj.weight"] == (32, 64)
    tied = dataclasses.replace(TINY, tie_word_embeddings=True)
    assert "lm_head.weight" not in expected_weight_shapes(tied)


def test_exact_weights_pass() -> None:
    check_weights(_weights(TINY), TINY, "/x/model.gguf")


def test_missing_extra_and_wrong_shape_are_all_listed() -> None:
    weights = _weights(TINY)
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.0.self_attn.rotary.weight"] = torch.zeros(3)
    weights["model.norm.weight"] = torch.zeros(100)
    with pytest.raises(ValueError) as info:
        check_weights(weights, TINY, "/x/model.gguf")
    message = str(info.value)
    assert message.startswith("weights in /x/model.gguf do not match the llama config: ")
    assert "missing model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected model.layers.0.self_attn.rotary.weight" in message
    assert "model.norm.weight has shape (100,), expected (32,)" in message


def test_long_lists_are_capped() -> None:
    with pytest.raises(ValueError, match=r"\.\.\. and 1 more missing tensors"):
        check_weights({}, TINY, "x")


def test_redundant_lm_head_with_tied_embeddings() -> None:
    tied = dataclasses.replace(TINY, tie_word_embeddings=True)
    weights = _weights(tied)
    weights["lm_head.weight"] = torch.zeros(100, 32)
    check_weights(weights, tied, "x")  # tolerated
    drop_tied_lm_head(weights, tied)
    assert "lm_head.weight" not in weights
    weights["lm_head.weight"] = torch.zeros(99, 32)  # a wrong shape is still an error
    with pytest.raises(ValueError, match="unexpected lm_head.weight"):
        check_weights(weights, tied, "x")
