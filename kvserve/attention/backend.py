"""The attention backend interface, the shared K/V store, and the table of backends by name."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import MappingProxyType

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
    # True when ``attend`` exists: the caller has stored this step's K/V itself (the fused
    # rotary-and-store kernel), and only the attention remains.
    attends_stored_kv: bool = False

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

    def attend(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """``forward`` without the store: this step's K/V are in the cache already. Only for a
        backend with ``attends_stored_kv``."""
        raise NotImplementedError(f"attention backend {self.name!r} stores K/V itself")


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


# name -> (module, class): each backend module is imported only when its backend is created.
BACKENDS: Mapping[str, tuple[str, str]] = MappingProxyType({
    "torch": ("kvserve.attention.torch_reference", "TorchReferenceBackend"),
    "sdpa": ("kvserve.attention.torch_sdpa", "TorchSDPABackend"),
    "triton": ("kvserve.attention.triton_backend", "TritonBackend"),
})
_NEEDS_TRITON = frozenset({"triton"})


def available_backends() -> list[str]:
    """The backend names usable here: ``triton`` only when Triton is installed."""
    return sorted(name for name in BACKENDS if HAS_TRITON or name not in _NEEDS_TRITON)


def create_backend(name: str) -> AttentionBackend:
    """Import the backend module named ``name`` in ``BACKENDS`` and instantiate its class."""
    choices = available_backends()
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {choices}")
    if name not in choices:
        raise ValueError(
            f"attention backend {name!r} needs the triton package, which is not installed; "
            f"choose one of {choices}"
        )
    module_name, class_name = BACKENDS[name]
    backend_class = getattr(importlib.import_module(module_name), class_name)
    return backend_class()
