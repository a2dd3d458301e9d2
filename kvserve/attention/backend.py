"""The attention backend interface, the shared K/V store, and the backend registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from kvserve.attention.metadata import AttentionMetadata
from kvserve.kernels.availability import HAS_TRITON


class AttentionBackend(ABC):
    """Stores a step's new K/V into the paged cache and attends over each request's context.

    Caches have shape ``[num_blocks, block_size, num_kv_heads, head_dim]``; a token at
    position ``p`` of a request lives in block ``block_table[p // block_size]``, slot
    ``p % block_size``. ``key``/``value`` are this step's new K/V, already rotated.
    """

    name: str = "abstract"

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...


def store_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] block_id * block_size + offset
) -> None:
    """Write each new token's K/V into its slot of the paged cache."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    flat_k = k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    flat_v = v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    flat_k.index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    flat_v.index_copy_(0, slot_mapping, value.to(v_cache.dtype))


_REGISTRY: dict[str, Callable[[], AttentionBackend]] = {}


def register_backend(name: str, factory: Callable[[], AttentionBackend]) -> None:
    _REGISTRY[name] = factory


def create_backend(name: str) -> AttentionBackend:
    """Instantiate a registered backend by name."""
    _import_builtin_backends()
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]()


def available_backends() -> list[str]:
    _import_builtin_backends()
    return sorted(_REGISTRY)


def _import_builtin_backends() -> None:
    import kvserve.attention.torch_reference  # noqa: F401  (registers itself)
    import kvserve.attention.torch_sdpa  # noqa: F401

    if HAS_TRITON:
        import kvserve.attention.triton_backend  # noqa: F401
