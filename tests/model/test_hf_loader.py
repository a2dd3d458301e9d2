"""HF directories: config.json mapping and safetensors loading, checked against transformers."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from kvserve.model.config import RopeScaling
from kvserve.model.hf_loader import load_hf_weights, read_hf_config
from kvserve.model.weight_names import check_weights

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _save_tiny(tmp_path: Path, config_class: str, **overrides: Any) -> dict[str, torch.Tensor]:
    """A random tiny transformers model saved (safetensors) in tmp_path; returns its state dict."""
    import transformers

    config = getattr(transformers, config_class)(**{**TINY, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    return model.state_dict()


@pytest.mark.parametrize(
    ("config_class", "overrides", "expected"),
    [
        ("LlamaConfig", {}, {"architecture": "llama"}),
        ("LlamaConfig", {"tie_word_embeddings": True}, {"tie_word_embeddings": True}),
        ("MistralConfig", {"sliding_window": None}, {"architecture": "mistral"}),
        ("Qwen2Config", {}, {"architecture": "qwen2", "attention_bias": True}),
        (
            "Qwen3Config",
            {"head_dim": 32},
            {"architecture": "qwen3", "qk_norm": True, "head_dim": 32},
        ),
    ],
)
def test_round_trip(tmp_path: Path, config_class: str, overrides: dict, expected: dict) -> None:
    state = _save_tiny(tmp_path, config_class, rope_theta=12345.0, **overrides)
    config = read_hf_config(tmp_path)
    assert config.vocab_size == 96 and config.hidden_size == 64 and config.num_hidden_layers == 2
    assert config.num_key_value_heads == 2 and config.max_position_embeddings == 256
    assert config.rope_theta == 12345.0 and config.rope_scaling is None
    for field, value in {"head_dim": 16, **expected}.items():
        assert getattr(config, field) == value, field

    weights = load_hf_weights(tmp_path, config)
    check_weights(weights, config, str(tmp_path))
    for name, tensor in weights.items():
        assert torch.equal(tensor, state[name]), name


def _write_config(tmp_path: Path, **fields: Any) -> Path:
    raw = {"model_type": "llama", **TINY, **fields}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
OLD_LLAMA3 = {key: value for key, value in LLAMA3.items() if key != "rope_type"}


@pytest.mark.parametrize(
    "fields",
    [
        {"rope_theta": 500000.0, "rope_scaling": LLAMA3},  # transformers 4 style
        {"rope_parameters": {**LLAMA3, "rope_theta": 500000.0}},  # transformers 5 style
        {"rope_theta": 500000.0, "rope_scaling": {**OLD_LLAMA3, "type": "llama3"}},  # old key
    ],
)
def test_llama3_rope_scaling_in_each_spelling(tmp_path: Path, fields: dict) -> None:
    config = read_hf_config(_write_config(tmp_path, **fields))
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)


def test_linear_rope_scaling_and_defaults(tmp_path: Path) -> None:
    fields = {"rope_scaling": {"type": "linear", "factor": 2.0}, "num_key_value_heads": None}
    config = read_hf_config(_write_config(tmp_path, **fields))
    assert config.rope_scaling == RopeScaling("linear", 2.0)
    assert config.num_key_value_heads == 4  # defaults to num_attention_heads
    assert config.rope_theta == 10000.0 and config.rms_norm_eps == 1e-6


def test_transformers_llama3_config_reads_back(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(**{**TINY, "max_position_embeddings": 16384}, rope_scaling=LLAMA3).save_pretrained(
        tmp_path
    )
    assert read_hf_config(tmp_path).rope_scaling == RopeScaling("llama3", 8.0)


def test_unsupported_model_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model_type 'gemma2'.*llama, mistral, qwen2, qwen3"):
        read_hf_config(_write_config(tmp_path, model_type="gemma2"))


def test_unsupported_rope_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'yarn'"):
        read_hf_config(_write_config(tmp_path, rope_scaling={"rope_type": "yarn", "factor": 4.0}))


def test_missing_field_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hidden_size is missing"):
        read_hf_config(_write_config(tmp_path, hidden_size=None))


def test_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_hf_config(tmp_path)


def test_mistral_sliding_window_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="kvserve.model.hf_loader"):
        config = read_hf_config(_write_config(tmp_path, model_type="mistral", sliding_window=4096))
    assert config.architecture == "mistral"
    assert "sliding_window=4096 is ignored" in caplog.text


def test_sharded_checkpoint_and_dropped_buffers(tmp_path: Path) -> None:
    config = read_hf_config(_write_config(tmp_path, num_hidden_layers=1, tie_word_embeddings=True))
    from kvserve.model.dummy_loader import dummy_weights

    weights = dummy_weights(config)
    names = sorted(weights)
    save_file({n: weights[n] for n in names[:5]}, tmp_path / "model-00001-of-00002.safetensors")
    rest = {n: weights[n] for n in names[5:]}
    rest["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    rest["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()  # shipped though tied
    save_file(rest, tmp_path / "model-00002-of-00002.safetensors")
    loaded = load_hf_weights(tmp_path, config)
    assert sorted(loaded) == names
    check_weights(loaded, config, str(tmp_path))


def test_no_safetensors(tmp_path: Path) -> None:
    config = read_hf_config(_write_config(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        load_hf_weights(tmp_path, config)


def _save_tiny_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "hi": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    hf.save_pretrained(directory)


def test_load_model_files_hf_dir(tmp_path: Path) -> None:
    from kvserve.model.loader import load_model_files

    # (with a Qwen2 config.json, AutoTokenizer would rebuild this word-level tokenizer as BPE)
    state = _save_tiny(tmp_path, "LlamaConfig")
    _save_tiny_tokenizer(tmp_path)
    loaded = load_model_files(str(tmp_path), "safetensors")
    assert loaded.config.architecture == "llama" and loaded.tokenizer.encode("hi hi") == [2, 2]
    assert torch.equal(loaded.weights["model.norm.weight"], state["model.norm.weight"])
    assert load_model_files(str(tmp_path)).config == loaded.config  # auto
    with pytest.raises(ValueError, match="--load-format gguf needs a .gguf file"):
        load_model_files(str(tmp_path), "gguf")
