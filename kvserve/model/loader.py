"""The one entry point from ``--model`` / ``--load-format`` to config, weights and tokenizer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from kvserve.model.config import ModelConfig
from kvserve.model.dummy_loader import dummy_weights, resolve_dummy_config
from kvserve.model.gguf_loader import load_gguf_weights, read_gguf_config
from kvserve.model.hf_loader import load_hf_weights, read_hf_config
from kvserve.model.source import ModelSource, resolve_model_source
from kvserve.model.tokenizer import Tokenizer, load_tokenizer
from kvserve.model.weight_names import check_weights

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "gguf", "safetensors", "dummy")
_KIND_OF_FORMAT = {"gguf": "gguf", "safetensors": "hf_dir"}


@dataclass
class LoadedModel:
    """Everything read from disk for one model, checked against each other.

    ``weights`` use Hugging Face names and shapes (see ``weight_names``); GGUF and dummy weights
    are float32, safetensors weights keep their stored dtype (the caller casts). ``source`` is
    None for dummy weights.
    """

    source: ModelSource | None
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer


def load_model_files(
    model: str | None,
    load_format: str = "auto",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load ``model`` (``None``: the embedded SmolLM2 GGUF) in ``load_format``.

    ``"auto"`` picks GGUF or safetensors from what ``model`` points at; ``"gguf"`` and
    ``"safetensors"`` insist on that kind; ``"dummy"`` builds random weights for a bundled config
    name, a config.json or an HF directory (see ``load_dummy_model``), drawn on ``device`` in
    ``dtype``; weights read from files stay on the CPU and the model casts them as it loads.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(
            f"--load-format {load_format!r} is not supported; use one of {', '.join(LOAD_FORMATS)}"
        )
    if load_format == "dummy":
        return load_dummy_model(model, device=device, dtype=dtype)
    source = resolve_model_source(model)
    wanted = _KIND_OF_FORMAT.get(load_format, source.kind)
    if source.kind != wanted:
        found = "a GGUF file" if source.kind == "gguf" else "a Hugging Face directory"
        raise ValueError(
            f"--load-format {load_format} needs "
            f"{'a .gguf file' if wanted == 'gguf' else 'a directory with *.safetensors'}, "
            f"but --model {model!r} is {found} ({source.path}); use --load-format auto"
        )
    start = time.perf_counter()
    if source.kind == "gguf":
        config = read_gguf_config(source.path)
        weights = load_gguf_weights(source.path, config)
    else:
        config = read_hf_config(source.path)
        weights = load_hf_weights(source.path, config)
    check_weights(weights, config, str(source.path))
    loaded_weights = time.perf_counter()
    tokenizer = load_tokenizer(source)
    logger.info(
        "loaded %s: weights %.1f s, tokenizer %.1f s",
        source.path,
        loaded_weights - start,
        time.perf_counter() - loaded_weights,
    )
    return LoadedModel(source, config, weights, tokenizer)


def load_dummy_model(
    model: str | None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Random weights for ``resolve_dummy_config(model)``, with the embedded SmolLM2 tokenizer.

    The tokenizer only turns text prompts into ids (< 49152). For a config with a larger
    vocabulary, ids above that are reachable through token-id prompts only; for a smaller one,
    text prompts may produce ids the model does not have, so use token-id prompts.
    """
    config = resolve_dummy_config(model)
    weights = dummy_weights(config, seed=seed, device=device, dtype=dtype)
    check_weights(weights, config, f"dummy weights for {model or 'the default config'}")
    tokenizer = load_tokenizer(resolve_model_source(None))
    if config.vocab_size < tokenizer.vocab_size:
        logger.warning(
            "dummy model vocab_size=%d is smaller than the embedded tokenizer's %d: "
            "use token-id prompts (text prompts may produce ids the model does not have)",
            config.vocab_size,
            tokenizer.vocab_size,
        )
    return LoadedModel(None, config, weights, tokenizer)


def load_model_tokenizer(model: str | None, load_format: str = "auto") -> Tokenizer:
    """The tokenizer ``load_model_files`` would give, without reading any weight (a server's
    front end, whose engine process loads the weights)."""
    if load_format == "dummy":
        return load_tokenizer(resolve_model_source(None))
    return load_tokenizer(resolve_model_source(model))
