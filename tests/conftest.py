"""Shared fixtures: the embedded model's path and its Hugging Face tokenizer (loaded once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvserve.model.embedded import embedded_model_path


@pytest.fixture(scope="session")
def embedded_gguf() -> Path:
    return embedded_model_path()


@pytest.fixture(scope="session")
def hf_tokenizer(embedded_gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_gguf.parent, gguf_file=embedded_gguf.name)
