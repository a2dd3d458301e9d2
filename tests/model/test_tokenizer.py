"""Tokenizer: the embedded model's tokenizer against transformers' AutoTokenizer, chat templates,
EOS ids, and the fast GGUF path against AutoTokenizer for qwen2/qwen3 files."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from kvserve.model.source import ModelSource, resolve_model_source
from kvserve.model.tokenizer import Tokenizer, load_tokenizer

TEXTS = ["Hello world", "  leading spaces", "naïve café 東京 🙂", "line\nbreak\ttab", ""]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(resolve_model_source(None))


def test_encode_without_bos(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("Hello world") == [19556, 905]  # SmolLM2 adds no BOS


def test_same_as_auto_tokenizer(tokenizer: Tokenizer, hf_tokenizer) -> None:
    assert type(tokenizer.hf) is type(hf_tokenizer)
    assert tokenizer.hf.backend_tokenizer.to_str() == hf_tokenizer.backend_tokenizer.to_str()
    assert tokenizer.hf.chat_template == hf_tokenizer.chat_template
    assert tokenizer.hf.special_tokens_map == hf_tokenizer.special_tokens_map
    for text in TEXTS:
        assert tokenizer.encode(text) == hf_tokenizer.encode(text), text


def test_direct_rust_decode_equals_transformers_decode(tokenizer: Tokenizer) -> None:
    """The detokenizer's fast path (the Rust decode) is taken for SmolLM2 and gives exactly
    transformers' text, special tokens and partial UTF-8 sequences included."""
    import random

    assert tokenizer._rust_decode is not None
    rng = random.Random(0)
    special = sorted(tokenizer.hf.all_special_ids)
    for _ in range(200):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 12))]
        ids.insert(rng.randrange(len(ids) + 1), rng.choice(special))
        for skip in (True, False):
            assert tokenizer.decode(ids, skip) == tokenizer.hf.decode(ids, skip_special_tokens=skip)


def test_round_trip(tokenizer: Tokenizer) -> None:
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_vocab_eos_and_single_tokens(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 49152
    assert 2 in tokenizer.eos_token_ids
    assert tokenizer.convert_ids_to_tokens([905, 10**6]) == ["Ġworld", ""]
    assert tokenizer.id_to_text(905) == " world"
    assert tokenizer.id_to_text(2) == "<|im_end|>"
    assert tokenizer.decode([1, 19556, 2]) == "Hello"  # special tokens skipped by default
    assert tokenizer.decode([1, 19556], skip_special_tokens=False) == "<|im_start|>Hello"


def test_chat_template_matches_transformers(tokenizer: Tokenizer, hf_tokenizer) -> None:
    for add_generation_prompt in (True, False):
        expected = hf_tokenizer.apply_chat_template(
            CHAT, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
        got = tokenizer.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt)
        assert got == list(expected)
    text = tokenizer.decode(tokenizer.apply_chat_template(CHAT), skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n")


def test_content_as_text_parts(tokenizer: Tokenizer) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert tokenizer.apply_chat_template(parts) == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}]
    )
    two = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    assert tokenizer.apply_chat_template(two) == tokenizer.apply_chat_template(
        [{"role": "user", "content": "a\nb"}]
    )


def test_non_text_part_is_rejected(tokenizer: Tokenizer) -> None:
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(ValueError, match=r"messages\[0\].content has a part of type 'image_url'"):
        tokenizer.apply_chat_template(image)


# ---------------------------------------------------------------- a tiny HF tokenizer directory


def _save_tiny_hf_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "<eot>": 2, "hello": 3, "world": 4}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    hf.save_pretrained(directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))


def test_hf_dir_eos_from_generation_config_and_no_chat_template(tmp_path: Path) -> None:
    _save_tiny_hf_tokenizer(tmp_path)
    tokenizer = load_tokenizer(ModelSource("hf_dir", tmp_path))
    assert tokenizer.eos_token_ids == frozenset({1, 2})
    assert tokenizer.encode("hello world") == [3, 4]
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])


# ---------------------------------------------------------------- tiny qwen GGUF tokenizers

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _write_tokenizer_gguf(path: Path, arch: str) -> Path:
    """A GGUF holding only metadata: a byte-level BPE vocabulary with a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    merged = ["he", "ll", "llo", "hello", "Ġw", "or", "Ġwor"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot|>"]
    tokens = byte_chars + merged + specials
    writer = gguf.GGUFWriter(path, arch)
    for key, value in {"block_count": 1, "context_length": 64, "embedding_length": 8}.items():
        writer.add_uint32(f"{arch}.{key}", value)
    for key, value in {"feed_forward_length": 16, "attention.head_count": 2}.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_uint32(f"{arch}.attention.head_count_kv", 1)
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "qwen2")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", [1] * (len(tokens) - 4) + [3] * 4)
    merges = ["h e", "l l", "ll o", "he llo", "Ġ w", "o r", "Ġw or"]
    writer.add_array("tokenizer.ggml.merges", merges)
    writer.add_uint32("tokenizer.ggml.eos_token_id", tokens.index("<|im_end|>"))
    writer.add_uint32("tokenizer.ggml.padding_token_id", tokens.index("<|endoftext|>"))
    writer.add_uint32("tokenizer.ggml.bos_token_id", tokens.index("<|endoftext|>"))
    writer.add_uint32("tokenizer.ggml.eot_token_id", tokens.index("<|eot|>"))
    writer.add_bool("tokenizer.ggml.add_bos_token", False)
    writer.add_string("tokenizer.chat_template", CHATML)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_fast_gguf_path_equals_auto_tokenizer(tmp_path: Path, arch: str) -> None:
    from transformers import AutoTokenizer

    path = _write_tokenizer_gguf(tmp_path / "tok.gguf", arch)
    tokenizer = load_tokenizer(ModelSource("gguf", path))
    auto = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert type(tokenizer.hf) is type(auto)
    assert tokenizer.hf.backend_tokenizer.to_str() == auto.backend_tokenizer.to_str()
    for text in ["hello world", "hello  wor", " hello"]:
        assert tokenizer.encode(text) == auto.encode(text), text
    chat = [{"role": "user", "content": "hello"}]
    expected = auto.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    assert tokenizer.apply_chat_template(chat) == list(expected)
    n = 256 + 7
    assert tokenizer.eos_token_ids == frozenset({n + 2, n + 3})  # <|im_end|> and <|eot|>
