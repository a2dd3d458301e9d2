"""Dummy weights and the bundled configs."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

from kvserve.model.dummy_loader import dummy_config_names, dummy_weights, resolve_dummy_config
from kvserve.model.weight_names import check_weights, expected_weight_shapes

CONFIGS = Path(__file__).parents[2] / "kvserve/model/configs"


def test_bundled_configs_hold_the_real_numbers() -> None:
    assert dummy_config_names() == ["llama-3-8b", "qwen3-0.6b", "smollm2-135m"]
    llama = resolve_dummy_config("llama-3-8b")
    assert (llama.hidden_size, llama.num_hidden_layers, llama.intermediate_size) == (
        4096,
        32,
        14336,
    )
    assert (llama.num_attention_heads, llama.num_key_value_heads, llama.head_dim) == (32, 8, 128)
    assert (llama.vocab_size, llama.rope_theta, llama.tie_word_embeddings) == (128256, 5e5, False)
    qwen = resolve_dummy_config("qwen3-0.6b")
    assert (qwen.hidden_size, qwen.num_hidden_layers, qwen.head_dim, qwen.q_size) == (
        1024,
        28,
        128,
        2048,
    )
    assert qwen.qk_norm and qwen.tie_word_embeddings and qwen.rms_norm_eps == 1e-6
    assert qwen.vocab_size == 151936 and qwen.rope_theta == 1e6


def test_default_is_smollm2_and_matches_the_embedded_gguf(embedded_gguf: Path) -> None:
    from kvserve.model.gguf_loader import read_gguf_config

    assert resolve_dummy_config(None) == resolve_dummy_config("smollm2-135m")
    assert resolve_dummy_config(None) == read_gguf_config(embedded_gguf)


def test_config_from_a_path(tmp_path: Path) -> None:
    source = CONFIGS / "qwen3-0.6b.json"
    (tmp_path / "config.json").write_text(source.read_text())
    assert resolve_dummy_config(str(tmp_path)) == resolve_dummy_config("qwen3-0.6b")
    assert resolve_dummy_config(str(tmp_path / "config.json")) == resolve_dummy_config("qwen3-0.6b")


def test_unknown_name_lists_the_bundled_ones() -> None:
    with pytest.raises(FileNotFoundError, match="llama-3-8b, qwen3-0.6b, smollm2-135m"):
        resolve_dummy_config("gpt-5")


def test_dummy_weights_names_values_and_determinism() -> None:
    config = dataclasses.replace(resolve_dummy_config("smollm2-135m"), num_hidden_layers=2)
    weights = dummy_weights(config, seed=3)
    check_weights(weights, config, "dummy")
    assert set(weights) == set(expected_weight_shapes(config))
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert torch.equal(weights["model.norm.weight"], torch.ones(576))
    embed = weights["model.embed_tokens.weight"]
    assert abs(float(embed.std()) - 0.02) < 1e-3 and abs(float(embed.mean())) < 1e-3
    again = dummy_weights(config, seed=3)["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(again, weights["model.layers.1.mlp.up_proj.weight"])
    other = dummy_weights(config, seed=4)["model.layers.1.mlp.up_proj.weight"]
    assert not torch.equal(other, again)


def test_biases_are_zero_for_qwen2() -> None:
    config = dataclasses.replace(
        resolve_dummy_config("smollm2-135m"),
        architecture="qwen2",
        attention_bias=True,
        num_hidden_layers=1,
    )
    weights = dummy_weights(config)
    assert torch.equal(weights["model.layers.0.self_attn.q_proj.bias"], torch.zeros(576))


# ---------------------------------------------------------------- load_model_files(..., "dummy")


def test_load_format_dummy_for_a_small_config(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from kvserve.model.loader import load_model_files

    raw = json.loads((CONFIGS / "qwen3-0.6b.json").read_text())
    raw.update(num_hidden_layers=1, vocab_size=1000, hidden_size=64, intermediate_size=64)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING, logger="kvserve.model.loader"):
        loaded = load_model_files(str(tmp_path), "dummy")
    assert loaded.source is None and loaded.config.qk_norm
    assert loaded.weights["model.embed_tokens.weight"].shape == (1000, 64)
    assert loaded.tokenizer.encode("Hello world") == [19556, 905]  # the embedded tokenizer
    assert "use token-id prompts" in caplog.text


def test_unknown_load_format_lists_valid_ones() -> None:
    from kvserve.model.loader import load_model_files

    with pytest.raises(
        ValueError, match="'pt' is not supported; use one of auto, gguf, safetensors, dummy"
    ):
        load_model_files(None, "pt")
