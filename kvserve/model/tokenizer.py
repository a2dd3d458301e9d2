"""The tokenizer of a model source: a thin wrapper over a transformers tokenizer.

Loading never contacts the Hugging Face Hub (``local_files_only=True``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kvserve.model.gguf_loader import read_gguf_header
from kvserve.model.source import ModelSource

# metadata keys of a GGUF's end-of-generation tokens (llama.cpp stops on all of them)
_GGUF_EOS_KEYS = (
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
)
# The tokenizer class AutoTokenizer picks for a GGUF of each architecture when the directory has
# no tokenizer files of its own. Naming it skips AutoTokenizer's model config, which it builds by
# parsing the whole file with gguf.GGUFReader (~6 s for the embedded model); the test suite
# checks the result is the same.
_GGUF_TOKENIZER_CLASSES = {
    "llama": "TokenizersBackend",
    "qwen2": "Qwen2Tokenizer",
    "qwen3": "Qwen2Tokenizer",
}
# files that can change AutoTokenizer's choice; with any of them next to the GGUF, use it
_TOKENIZER_FILES = (
    "config.json",
    "tokenizer_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tekken.json",
    "params.json",
)


class Tokenizer:
    """Text <-> token ids, chat templates and end-of-sequence ids of one model.

    ``hf`` is the underlying transformers tokenizer. ``eos_token_ids`` holds every id that ends
    generation (the tokenizer's EOS, plus generation_config.json's for HF directories, or the
    GGUF's eos/eot/eom ids).
    """

    def __init__(self, hf: Any, eos_token_ids: Iterable[int]) -> None:
        self.hf = hf
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)
        self._rust_decode = _equivalent_rust_decode(hf)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added special tokens included (the model's
        embedding may be larger: Qwen pads it)."""
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    def replace_chat_template(self, template: str) -> None:
        """Render chats with ``template`` (Jinja, as a tokenizer_config.json's
        ``chat_template``) instead of the model's own; ValueError if it does not parse."""
        check_chat_template(template)
        self.hf.chat_template = template

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with BOS only if the tokenizer itself adds one."""
        return list(self.hf.encode(text))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (ids beyond the tokenizer's vocabulary are skipped).

        The detokenizer calls this twice per generated token of every request, so where the Rust
        tokenizer's own decode gives the same text (checked at load), it is called directly,
        without transformers' per-call Python.
        """
        if self._rust_decode is not None:
            return self._rust_decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template.

        A message's ``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts,
        whose texts are joined with newlines. ``tools`` (OpenAI's shape) reach the template,
        which renders them if it knows how.
        """
        if not self.has_chat_template:
            raise ValueError(
                "this model's tokenizer has no chat template, so chat messages cannot be "
                "formatted; send a plain text prompt (completion) instead"
            )
        normalized = [_normalize_message(message, index) for index, message in enumerate(messages)]
        return list(
            self.hf.apply_chat_template(
                normalized,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                return_dict=False,
                tools=tools,
            )
        )

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary strings of ``ids`` ("" for ids beyond the vocabulary)."""
        return [token or "" for token in self.hf.convert_ids_to_tokens(list(ids))]

    def id_to_text(self, token_id: int) -> str:
        """The decoded text of one token (special tokens included), e.g. for logprob displays."""
        return self.hf.decode([token_id], skip_special_tokens=False)


def check_chat_template(template: str) -> None:
    """ValueError naming the line if ``template`` is not a Jinja template that transformers'
    ``apply_chat_template`` can compile (its own environment: sandboxed, with its extensions)."""
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template)
    except TemplateSyntaxError as error:
        raise ValueError(f"line {error.lineno}: {error.message}") from None


def _normalize_message(message: dict[str, Any], index: int) -> dict[str, Any]:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return message
    if not isinstance(content, list):
        raise ValueError(
            f"messages[{index}].content must be a string or a list of text parts, "
            f"got {type(content).__name__}"
        )
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or "text" not in part:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(
                f"messages[{index}].content has a part of type {kind!r}; only "
                '{"type": "text", "text": ...} parts are supported'
            )
        texts.append(str(part["text"]))
    return {**message, "content": "\n".join(texts)}


def load_tokenizer(source: ModelSource) -> Tokenizer:
    """The tokenizer of a GGUF file or a Hugging Face directory (local files only)."""
    if source.kind == "gguf":
        return _load_gguf_tokenizer(source.path)
    return _load_hf_tokenizer(source.path)


def _load_gguf_tokenizer(path: Path) -> Tokenizer:
    import transformers

    metadata = read_gguf_header(path).metadata
    class_name = _GGUF_TOKENIZER_CLASSES.get(str(metadata.get("general.architecture")))
    has_own_files = any((path.parent / name).exists() for name in _TOKENIZER_FILES)
    if class_name is None or has_own_files:
        tokenizer_class = transformers.AutoTokenizer
    else:
        tokenizer_class = getattr(transformers, class_name)
    hf = tokenizer_class.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    eos = {int(metadata[key]) for key in _GGUF_EOS_KEYS if key in metadata}
    return Tokenizer(hf, eos | _tokenizer_eos(hf))


def _load_hf_tokenizer(directory: Path) -> Tokenizer:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return Tokenizer(hf, _tokenizer_eos(hf) | _generation_config_eos(directory))


def _tokenizer_eos(hf: Any) -> set[int]:
    return {hf.eos_token_id} if hf.eos_token_id is not None else set()


def _generation_config_eos(directory: Path) -> set[int]:
    """``eos_token_id`` (an int or a list) of ``generation_config.json``, if there is one."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return set()
    try:
        value = json.loads(path.read_text()).get("eos_token_id")
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, list) else {int(value)}


_DECODE_PROBE = "Hello , world ! It 's a test . Don 't stop ; ok ? Yes : \u00e9t\u00e9 \U0001f600"


def _equivalent_rust_decode(hf: Any) -> Any:
    """The fast tokenizer's Rust ``decode`` if it returns exactly what ``hf.decode`` does on a
    probe that transformers' clean-up of spaces before punctuation would change, else None."""
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        return None
    ids = list(hf.encode(_DECODE_PROBE, add_special_tokens=False))
    for skip in (True, False):
        if backend.decode(ids, skip_special_tokens=skip) != hf.decode(
            ids, skip_special_tokens=skip
        ):
            return None
    return backend.decode
