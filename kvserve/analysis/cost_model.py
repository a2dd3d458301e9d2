"""FLOPs and bytes of one engine step, from the model's shape alone.

The model counts what cannot be avoided:
- every matmul weight is multiplied by every token of the step (2 FLOPs per weight per token)
  and read from memory once per step;
- attention costs ``2 * q_size`` FLOPs per (query, key) pair for QK^T and as much for PV, and
  each visible key's K/V is read once per step;
- the step writes its new tokens' K/V;
- the LM head runs only for the tokens that sample (the last token of each request).
Activations, norms and the embedding lookup (a few rows) are small and left out. Grouped-query
attention shrinks the K/V bytes (``kv_size``), not the attention FLOPs (``q_size``).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvserve.model.config import ModelConfig


@dataclass(frozen=True)
class Ceilings:
    """A machine's two roofs, measured: matmul FLOP/s and copy bandwidth (read + written)."""

    flops_per_s: float
    bytes_per_s: float

    @property
    def ridge(self) -> float:
        """The intensity (FLOPs per byte) where the two roofs meet."""
        return self.flops_per_s / self.bytes_per_s


@dataclass(frozen=True)
class StepCost:
    flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOPs per byte."""
        return self.flops / self.bytes


def layer_weight_count(config: ModelConfig) -> int:
    """Matmul weights of all layers: qkv, o, gate, up and down projections."""
    per_layer = config.hidden_size * (config.q_size + 2 * config.kv_size)
    per_layer += config.q_size * config.hidden_size
    per_layer += 3 * config.hidden_size * config.intermediate_size
    return config.num_hidden_layers * per_layer


def lm_head_weight_count(config: ModelConfig) -> int:
    """The LM head's weights (the embedding table itself when embeddings are tied)."""
    return config.vocab_size * config.hidden_size


def matmul_weight_count(config: ModelConfig) -> int:
    """Weights a sampling token multiplies by: the layers' and the LM head's."""
    return layer_weight_count(config) + lm_head_weight_count(config)


def kv_bytes_per_token(config: ModelConfig, element_size: int) -> int:
    """K and V of every layer for one token."""
    return 2 * config.num_hidden_layers * config.kv_size * element_size


def attention_flops(config: ModelConfig, query_positions: range) -> float:
    """QK^T and PV over every layer for queries at ``query_positions`` (causal: the query at
    position p sees p + 1 keys)."""
    pairs = sum(p + 1 for p in query_positions)
    return 4.0 * config.num_hidden_layers * config.q_size * pairs


def prefill_cost(
    config: ModelConfig, num_tokens: int, cached_tokens: int = 0, element_size: int = 2
) -> StepCost:
    """One request's prefill of ``num_tokens`` tokens after ``cached_tokens`` already cached."""
    positions = range(cached_tokens, cached_tokens + num_tokens)
    flops = 2.0 * layer_weight_count(config) * num_tokens
    flops += attention_flops(config, positions)
    flops += 2.0 * lm_head_weight_count(config)  # the last token samples
    per_token = kv_bytes_per_token(config, element_size)
    weights = matmul_weight_count(config) * element_size
    kv = per_token * (cached_tokens + num_tokens) + per_token * num_tokens  # read + written
    return StepCost(flops, weights + kv)


def decode_cost(config: ModelConfig, context_lens: list[int], element_size: int = 2) -> StepCost:
    """One decode step of ``len(context_lens)`` requests; request ``i``'s new token sits at
    position ``context_lens[i] - 1`` and attends to all ``context_lens[i]`` tokens."""
    batch = len(context_lens)
    flops = 2.0 * matmul_weight_count(config) * batch
    flops += sum(attention_flops(config, range(n - 1, n)) for n in context_lens)
    per_token = kv_bytes_per_token(config, element_size)
    weights = matmul_weight_count(config) * element_size
    kv = per_token * sum(context_lens) + per_token * batch  # read + written
    return StepCost(flops, weights + kv)
