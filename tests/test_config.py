"""EngineConfig: the GPU-related defaults resolve from the machine, bad values name the field."""

from __future__ import annotations

import pytest
import torch

from kvserve.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig


def test_auto_device_and_backend_follow_the_machine() -> None:
    config = EngineConfig()
    if torch.cuda.is_available():
        assert (config.device, config.attention_backend) == ("cuda", "triton")
        assert config.kv_cache_bytes is None  # sized from gpu_memory_utilization
    else:
        assert (config.device, config.attention_backend) == ("cpu", "sdpa")
        assert config.kv_cache_bytes == DEFAULT_CPU_KV_CACHE_BYTES


def test_explicit_choices_are_kept() -> None:
    config = EngineConfig(device="cpu", attention_backend="torch", kv_cache_memory="64MiB")
    assert (config.device, config.attention_backend) == ("cpu", "torch")
    assert config.kv_cache_bytes == 64 * 2**20
    gpu = EngineConfig(device="cuda:1", kv_cache_memory=None)
    assert gpu.on_gpu and gpu.kv_cache_bytes is None and gpu.torch_dtype() == torch.bfloat16


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_gpu_memory_utilization_out_of_range_names_the_field(value: float) -> None:
    with pytest.raises(ValueError, match=r"gpu_memory_utilization must be in \(0, 1\]"):
        EngineConfig(gpu_memory_utilization=value)
