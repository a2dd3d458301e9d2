"""The layer-wise paged KV cache tensors, sized from a memory budget."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from kvserve.model.config import ModelConfig

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_memory_size(value: str | int) -> int:
    """'2GiB', '512MiB', '1.5GB' or a plain byte count -> bytes."""
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"kv_cache_memory={value!r} is not a size; write e.g. '2GiB', '512MiB' or bytes"
            )
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"kv_cache_memory must be > 0 bytes, got {value!r}")
    return size


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V of every layer for ``block_size`` tokens."""
    element = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return per_token * block_size * element


@dataclass
class PagedKVCache:
    """Per layer, K and V of shape [num_blocks, block_size, num_kv_heads, head_dim]."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    num_blocks: int
    block_size: int

    @property
    def num_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.layers)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


def allocate_kv_cache(
    config: ModelConfig,
    memory_bytes: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> PagedKVCache:
    """As many blocks as fit in ``memory_bytes`` (at least one, or a clear error)."""
    per_block = kv_bytes_per_block(config, block_size, dtype)
    num_blocks = memory_bytes // per_block
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_memory={memory_bytes} bytes holds no block: one block of {block_size} "
            f"tokens needs {per_block} bytes for this model"
        )
    shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    layers = [
        (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        for _ in range(config.num_hidden_layers)
    ]
    return PagedKVCache(layers=layers, num_blocks=num_blocks, block_size=block_size)
