"""The weight names and shapes a config implies (Hugging Face naming), and a strict check."""

from __future__ import annotations

import torch

from kvserve.model.config import ModelConfig

LM_HEAD = "lm_head.weight"
EMBED_TOKENS = "model.embed_tokens.weight"
_MAX_LISTED = 20  # per kind of problem, so a wrong config gives a readable error


def expected_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight the model needs, by Hugging Face name; linear weights are (out, in).

    ``lm_head.weight`` is listed only when the config does not tie it to the embedding.
    """
    hidden, inter = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {EMBED_TOKENS: (config.vocab_size, hidden)}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        attn = f"{prefix}.self_attn"
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
        shapes[f"{attn}.q_proj.weight"] = (config.q_size, hidden)
        shapes[f"{attn}.k_proj.weight"] = (config.kv_size, hidden)
        shapes[f"{attn}.v_proj.weight"] = (config.kv_size, hidden)
        if config.attention_bias:
            shapes[f"{attn}.q_proj.bias"] = (config.q_size,)
            shapes[f"{attn}.k_proj.bias"] = (config.kv_size,)
            shapes[f"{attn}.v_proj.bias"] = (config.kv_size,)
        if config.qk_norm:
            shapes[f"{attn}.q_norm.weight"] = (config.head_dim,)
            shapes[f"{attn}.k_norm.weight"] = (config.head_dim,)
        shapes[f"{attn}.o_proj.weight"] = (hidden, config.q_size)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes[LM_HEAD] = (config.vocab_size, hidden)
    return shapes


def check_weights(weights: dict[str, torch.Tensor], config: ModelConfig, source: str) -> None:
    """Raise ``ValueError`` unless ``weights`` has exactly the expected names and shapes.

    The message names ``source`` (the file or directory the weights came from) and lists the
    missing names, the unexpected names and the shape mismatches (up to 20 of each). An
    ``lm_head.weight`` of the embedding's shape is tolerated when the config ties embeddings
    (some checkpoints ship both); ``drop_tied_lm_head`` removes it.
    """
    expected = expected_weight_shapes(config)
    if _is_redundant_lm_head(weights, config):
        expected = {**expected, LM_HEAD: expected[EMBED_TOKENS]}
    missing = [name for name in expected if name not in weights]
    unexpected = [name for name in weights if name not in expected]
    mismatched = [
        f"{name} has shape {tuple(weights[name].shape)}, expected {shape}"
        for name, shape in expected.items()
        if name in weights and tuple(weights[name].shape) != shape
    ]
    problems = (
        _listed("missing", missing) + _listed("unexpected", unexpected) + _listed("", mismatched)
    )
    if problems:
        raise ValueError(
            f"weights in {source} do not match the {config.architecture} config: "
            + "; ".join(problems)
        )


def drop_tied_lm_head(weights: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Remove (in place) an ``lm_head.weight`` that a tied-embedding model does not use."""
    if _is_redundant_lm_head(weights, config):
        del weights[LM_HEAD]


def _is_redundant_lm_head(weights: dict[str, torch.Tensor], config: ModelConfig) -> bool:
    embed_shape = (config.vocab_size, config.hidden_size)
    return (
        config.tie_word_embeddings
        and LM_HEAD in weights
        and tuple(weights[LM_HEAD].shape) == embed_shape
    )


def _listed(prefix: str, items: list[str]) -> list[str]:
    """``items`` with ``prefix``, at most ``_MAX_LISTED`` of them, then a count of the rest."""
    shown = [f"{prefix} {item}".strip() for item in items[:_MAX_LISTED]]
    if len(items) > _MAX_LISTED:
        kind = prefix or "shape-mismatched"
        shown.append(f"... and {len(items) - _MAX_LISTED} more {kind} tensors")
    return shown
