"""The layer-wise paged KV cache tensors, sized from a memory budget."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from kvserve.attention.backend import store_kv
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
    """Per layer, K and V of shape [num_blocks, block_size, num_kv_heads, head_dim].

    A request's token at position ``p`` lives in block ``block_table[p // block_size]``, slot
    ``p % block_size``; ``slots``, ``read`` and ``write`` do that arithmetic for a range of
    positions ``start..end-1``, so callers never do.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    num_blocks: int
    block_size: int

    @property
    def num_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.layers)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def device(self) -> torch.device:
        return self.layers[0][0].device

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """int64 slot ids ``block * block_size + offset`` of positions ``start..end-1``, on
        the cache's device: [end - start]."""
        if not 0 <= start <= end:
            raise ValueError(f"token range {start}..{end} is not 0 <= start <= end")
        capacity = len(block_table) * self.block_size
        if end > capacity:
            raise ValueError(
                f"token range {start}..{end} is beyond the block table: {len(block_table)} "
                f"blocks of {self.block_size} tokens hold positions 0..{capacity - 1}"
            )
        first, last = start // self.block_size, -(-end // self.block_size)
        blocks = block_table[first:last]
        if blocks and not 0 <= min(blocks) <= max(blocks) < self.num_blocks:
            raise ValueError(
                f"block table {blocks} names a block outside the pool of {self.num_blocks}"
            )
        positions = torch.arange(start, end, dtype=torch.int64, device=self.device)
        table = torch.tensor(blocks, dtype=torch.int64, device=self.device)
        offsets = positions % self.block_size
        return table[positions // self.block_size - first] * self.block_size + offsets

    def read(
        self, layer: int, block_table: list[int], start: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of layer ``layer``'s K and V at positions ``start..end-1``:
        [end - start, num_kv_heads, head_dim] each."""
        k_cache, v_cache = self._layer(layer)
        slots = self.slots(block_table, start, end)
        keys = k_cache.flatten(0, 1).index_select(0, slots)  # [end - start, kv_heads, head_dim]
        values = v_cache.flatten(0, 1).index_select(0, slots)
        return keys, values

    def write(
        self,
        layer: int,
        block_table: list[int],
        start: int,
        keys: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        values: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    ) -> None:
        """Store ``keys``/``values`` at positions ``start..start+num_tokens-1`` of layer
        ``layer``, cast to the cache's dtype and moved to its device."""
        k_cache, v_cache = self._layer(layer)
        expected = (keys.shape[0], *k_cache.shape[2:])
        if tuple(keys.shape) != expected or tuple(values.shape) != expected:
            raise ValueError(
                f"keys and values must both have shape {expected} "
                f"(tokens, kv_heads, head_dim), got {tuple(keys.shape)} and {tuple(values.shape)}"
            )
        slots = self.slots(block_table, start, start + keys.shape[0])
        store_kv(
            k_cache,
            v_cache,
            keys.to(device=k_cache.device, dtype=k_cache.dtype),
            values.to(device=v_cache.device, dtype=v_cache.dtype),
            slots,
        )

    def _layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= layer < len(self.layers):
            raise ValueError(f"layer {layer} is not in 0..{len(self.layers) - 1}")
        return self.layers[layer]


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
