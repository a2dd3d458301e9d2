"""Random weights for a config (``--load-format dummy``): benchmarks without downloading weights.

Configs come from ``kvserve/model/configs/<name>.json`` (Hugging Face config.json format), from a
config.json path, or from a Hugging Face model directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvserve.model.config import ModelConfig
from kvserve.model.hf_loader import read_hf_config
from kvserve.model.weight_names import expected_weight_shapes

CONFIGS_DIR = Path(__file__).parent / "configs"
DEFAULT_DUMMY_CONFIG = "smollm2-135m"
INIT_STD = 0.02


def dummy_config_names() -> list[str]:
    """Names of the bundled configs (``llama-3-8b``, ``qwen3-0.6b``, ``smollm2-135m``)."""
    return sorted(path.stem for path in CONFIGS_DIR.glob("*.json"))


def resolve_dummy_config(model: str | None) -> ModelConfig:
    """The config for ``model``: a bundled config name, a config.json path or an HF directory."""
    if model is None:
        model = DEFAULT_DUMMY_CONFIG
    if model in dummy_config_names():
        return read_hf_config(CONFIGS_DIR / f"{model}.json")
    path = Path(model).expanduser()
    if path.is_file() or (path / "config.json").is_file():
        return read_hf_config(path)
    raise FileNotFoundError(
        f"no dummy config {model!r}: not one of the bundled configs "
        f"({', '.join(dummy_config_names())}), and {path} is neither a config.json nor a "
        "directory containing one"
    )


def dummy_weights(
    config: ModelConfig,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Weights of the expected names and shapes: normal(0, 0.02) for matrices, 1.0 for norm
    weights, 0.0 for biases. The same seed on the same device gives the same weights. On a GPU
    they are drawn there, in ``dtype``, so an 8B model never exists in float32 on the host."""
    generator = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for name, shape in expected_weight_shapes(config).items():
        if name.endswith("norm.weight"):  # input_layernorm, q_norm, model.norm, ...
            weights[name] = torch.ones(shape, device=device, dtype=dtype)
        elif name.endswith(".bias"):
            weights[name] = torch.zeros(shape, device=device, dtype=dtype)
        else:
            weights[name] = torch.randn(
                shape, generator=generator, device=device, dtype=dtype
            ).mul_(INIT_STD)
    return weights
