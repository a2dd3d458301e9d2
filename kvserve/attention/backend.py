"""The attention backend interface and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from kvserve.attention.metadata import AttentionMetadata


class AttentionBackend(ABC):
    """Stores a step's new K/V into the paged cache and attends over each request's context.

    Caches have shape ``[num_blocks, block_size, num_kv_heads, head_dim]``; a token at
    position ``p`` of a request lives in block ``block_table[p // block_size]``, slot
    ``p % block_size``.
    """

    name: str = "abstract"

    @abstractmethod
    def write_kv(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
    ) -> None: ...

    @abstractmethod
    def attend(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...


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
