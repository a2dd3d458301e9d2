"""kvserve: an LLM inference engine over a paged, layer-wise KV cache."""

from kvserve.engine.llm import LLM, Prefilled
from kvserve.outputs import RequestOutput, TokenLogprob
from kvserve.sampling_params import SamplingParams

__all__ = ["LLM", "Prefilled", "RequestOutput", "SamplingParams", "TokenLogprob"]
__version__ = "0.1.0"
