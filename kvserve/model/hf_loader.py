"""Read a Hugging Face model directory: config.json into a ``ModelConfig``, *.safetensors into
a weights dict (names as stored: the HF naming the model expects)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from kvserve.model.config import ModelConfig, RopeScaling
from kvserve.model.weight_names import drop_tied_lm_head

logger = logging.getLogger(__name__)

HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Defaults of the transformers config classes for keys a config.json may omit.
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768, "qwen3": 32768}
_IGNORED_BUFFERS = ("rotary_emb.inv_freq",)  # non-persistent buffers some old checkpoints saved


def read_hf_config(directory: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of ``directory/config.json`` (a path to the file itself also works)."""
    path = Path(directory)
    path = path if path.suffix == ".json" else path / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no config.json at {path}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    return config_from_hf_dict(raw, str(path))


def config_from_hf_dict(raw: dict[str, Any], source: str) -> ModelConfig:
    """Map a transformers config.json dict onto ``ModelConfig``; ``source`` names it in errors."""
    model_type = raw.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(HF_MODEL_TYPES)}"
        )
    _reject_unsupported_features(raw, source)
    _warn_sliding_window(raw, source)

    def required(key: str) -> Any:
        if raw.get(key) is None:
            raise ValueError(f"{source}: {key} is missing")
        return raw[key]

    hidden, heads = int(required("hidden_size")), int(required("num_attention_heads"))
    rope_params = _rope_parameters(raw)
    return ModelConfig(
        architecture=model_type,
        vocab_size=int(required("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(required("intermediate_size")),
        num_hidden_layers=int(required("num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_params.get("rope_theta", raw.get("rope_theta", 10000.0))),
        rope_scaling=_rope_scaling(rope_params, source),
        max_position_embeddings=int(
            raw.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS[model_type]
        ),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2",  # Qwen2 always has q/k/v biases
        qk_norm=model_type == "qwen3",
    )


def _reject_unsupported_features(raw: dict[str, Any], source: str) -> None:
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={raw['hidden_act']!r} is not supported (silu only)")
    if raw.get("mlp_bias"):
        raise ValueError(f"{source}: mlp_bias=true is not supported")
    if raw.get("attention_bias") and raw.get("model_type") != "qwen2":
        raise ValueError(
            f"{source}: attention_bias=true (biases on q/k/v/o) is not supported for "
            f"{raw.get('model_type')}; only Qwen2's q/k/v biases are"
        )


def _warn_sliding_window(raw: dict[str, Any], source: str) -> None:
    uses_window = raw.get("sliding_window") is not None and raw.get("use_sliding_window", True)
    if uses_window:
        logger.warning(
            "%s: sliding_window=%s is ignored; kvserve attends to the full context",
            source,
            raw["sliding_window"],
        )


def _rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """Rope settings from ``rope_parameters`` (transformers 5) or ``rope_scaling`` (older)."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    # transformers 5 may nest per-layer-type parameters ({"full_attention": {...}})
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    return dict(params)


def _rope_scaling(params: dict[str, Any], source: str) -> RopeScaling | None:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("default", None):
        return None
    if rope_type == "linear":
        return RopeScaling("linear", float(params["factor"]))
    if rope_type == "llama3":
        return RopeScaling(
            "llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings", 8192)
            ),
        )
    raise ValueError(
        f"{source}: rope scaling type {rope_type!r} is not supported; use 'llama3' or 'linear'"
    )


def load_hf_weights(directory: str | Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every tensor of ``directory/*.safetensors``, in the stored dtype (the caller casts).

    Rotary ``inv_freq`` buffers are dropped, and so is an ``lm_head.weight`` that a config with
    tied embeddings does not use.
    """
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in directory.glob("*.bin")) or ["none"]
        raise FileNotFoundError(
            f"no *.safetensors files in {directory} (found .bin files: {', '.join(others)}); "
            "kvserve loads safetensors checkpoints only"
        )
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        for name, tensor in load_file(file).items():
            if name.endswith(_IGNORED_BUFFERS):
                continue
            if name in weights:
                raise ValueError(f"tensor {name} appears in more than one file of {directory}")
            weights[name] = tensor
    drop_tied_lm_head(weights, config)
    return weights
