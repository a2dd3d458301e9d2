"""EngineConfig: the GPU-related defaults resolve from the machine, bad values name the field."""

from __future__ import annotations

import pytest
import torch

from kvserve.config import DEFAULT_CPU_KV_CACHE_BYTES, DEFAULT_MAX_NUM_SEQS, EngineConfig


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


def test_max_num_seqs_defaults_follow_the_device() -> None:
    """A GPU's decode step costs about the same for 256 requests as for 64; a CPU's does not."""
    assert EngineConfig(device="cpu").max_num_seqs == DEFAULT_MAX_NUM_SEQS["cpu"] == 64
    assert EngineConfig(device="cuda:0").max_num_seqs == DEFAULT_MAX_NUM_SEQS["cuda"] == 256
    assert EngineConfig(device="cuda:0", max_num_seqs=32).max_num_seqs == 32
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1, got 0"):
        EngineConfig(max_num_seqs=0)
