"""Bad input raises ValueError naming the field and limit, and allocates nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvserve import LLM, SamplingParams


def assert_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished
    assert engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.num_blocks


def test_unknown_model_path_says_what_was_looked_for(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises((ValueError, FileNotFoundError), match="nope.gguf"):
        LLM(str(missing))


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        LLM(str(tmp_path))


def test_unknown_engine_option_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown engine option.*kv_cache_memoryy"):
        LLM(kv_cache_memoryy="1GiB")


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"dtype": "int3"}, "dtype"),
        ({"kv_cache_memory": "lots"}, "kv_cache_memory"),
        ({"block_size": 12}, "block_size"),
        ({"load_format": "onnx"}, "load_format"),
    ],
)
def test_bad_engine_options(options: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LLM(**options)


def test_empty_prompt(llm_f32: LLM) -> None:
    with pytest.raises(ValueError, match="prompt is empty"):
        llm_f32.generate([""], SamplingParams())
    with pytest.raises(ValueError, match="prompt is empty"):
        llm_f32.generate([[]], SamplingParams())
    assert_idle(llm_f32)


def test_prompt_longer_than_max_model_len_gives_both_numbers() -> None:
    llm = LLM(dtype="float32", kv_cache_memory="16MiB", max_model_len=64, quantization="none",
              enforce_eager=True)
    long_prompt = list(range(100, 200))
    with pytest.raises(ValueError, match=r"100 tokens.*max_model_len is 64"):
        llm.generate(["fine", long_prompt], SamplingParams(max_tokens=4))
    assert_idle(llm)  # the valid prompt before it was not admitted either


def test_token_ids_outside_the_vocabulary(llm_f32: LLM) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm_f32.generate([[1, 2, 10**9]], SamplingParams())
    assert_idle(llm_f32)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"logprobs": 100}, "logprobs"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_invalid_sampling_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"SamplingParams.{field} "):
        SamplingParams(**kwargs)


def test_mismatched_params_list(llm_f32: LLM) -> None:
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        llm_f32.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()])
    assert_idle(llm_f32)
