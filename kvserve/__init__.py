"""kvserve: an LLM inference engine over a paged, layer-wise KV cache.

The public names are imported lazily, so ``kvserve.core`` (pure Python) can be used without
loading torch or the model stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvserve.engine.llm import LLM, Prefilled
    from kvserve.outputs import RequestOutput, TokenLogprob
    from kvserve.sampling_params import SamplingParams

__all__ = ["LLM", "Prefilled", "RequestOutput", "SamplingParams", "TokenLogprob"]
__version__ = "0.1.0"

_HOMES = {
    "LLM": "kvserve.engine.llm",
    "Prefilled": "kvserve.engine.llm",
    "RequestOutput": "kvserve.outputs",
    "TokenLogprob": "kvserve.outputs",
    "SamplingParams": "kvserve.sampling_params",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'kvserve' has no attribute {name!r}")
