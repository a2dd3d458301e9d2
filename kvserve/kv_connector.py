"""The KV connector interface: how a model runner lets another component see each layer's K/V as
soon as it is computed (a neutral module: the worker calls it, kvserve.disagg implements it).

The model runner is handed a connector when it is built. Each step it calls ``begin_step`` with
the step's requests; if that returns True it runs the step layer by layer, calling
``save_layer(l)`` right after layer ``l`` stored its K/V, and ``end_step`` once the forward pass
is over (also when it raised).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvserve.core.scheduler import ScheduledRequest
    from kvserve.worker.kv_cache import PagedKVCache


class KVConnector(ABC):
    """Worker-side hooks of a KV transfer."""

    @abstractmethod
    def bind(self, kv_cache: PagedKVCache) -> None:
        """The engine's paged KV cache, once it is allocated (before the first step)."""

    @abstractmethod
    def begin_step(self, scheduled: list[ScheduledRequest]) -> bool:
        """Note what this step makes available; False when the step needs no layer hook."""

    @abstractmethod
    def save_layer(self, layer: int) -> None:
        """Called right after ``layer`` stored this step's K/V."""

    @abstractmethod
    def end_step(self) -> None:
        """Called after the step's forward pass."""
