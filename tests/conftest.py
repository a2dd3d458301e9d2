"""Shared fixtures: the embedded model's path and its Hugging Face tokenizer (loaded once),
and the device the Triton kernel tests run on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import triton_interpreter

# Without a GPU, the Triton kernels are checked under Triton's CPU interpreter, which Triton
# consults when a kernel is defined: turn it on before any kernel module is imported.
if not torch.cuda.is_available():
    triton_interpreter.enable()

from kvserve.model.embedded import embedded_model_path


@pytest.fixture(scope="session")
def embedded_gguf() -> Path:
    return embedded_model_path()


@pytest.fixture(scope="session")
def hf_tokenizer(embedded_gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_gguf.parent, gguf_file=embedded_gguf.name)


@pytest.fixture(scope="session")
def hf_model(embedded_gguf: Path):
    """transformers' float32 model from the same GGUF: the reference implementation."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        embedded_gguf.parent, gguf_file=embedded_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def llm_f32():
    """The embedded model in float32 with a small pool of 16-token blocks."""
    from kvserve import LLM

    return LLM(dtype="float32", kv_cache_memory="64MiB", block_size=16, quantization="none",
               enforce_eager=True)
