"""The GPU benchmark's transformers peer, on tiny models on the CPU: same weights as kvserve,
same greedy tokens, exact token counts (no timing assertions)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kvserve import LLM
from kvserve.benchmarks.driver import bench_params
from kvserve.benchmarks.hf_gpu_peer import (
    HFBatchLimits,
    hf_generate_batch,
    hf_model_from_config,
    hf_static_cache_decode,
)
from kvserve.model.config import ModelConfig
from kvserve.model.dummy_loader import dummy_weights
from kvserve.model.hf_loader import read_hf_config

TINY = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
CASES = {
    "llama": {"model_type": "llama", "tie_word_embeddings": False},
    "llama3-rope": {"model_type": "llama", "rope_scaling": LLAMA3_ROPE},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": False},
    "qwen3": {"model_type": "qwen3", "tie_word_embeddings": True},
}
HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
PROMPTS = [[5, 17, 200, 3, 99, 41, 7, 250, 12], [1, 2, 3], [60, 61, 62, 63, 64, 65]]
OUTPUT_LENS = [6, 9, 1]
CPU_LIMITS = HFBatchLimits(num_blocks=32, page_size=16, max_batch_tokens=64)


def write_tiny_config(directory: Path, case: str) -> Path:
    path = directory / f"{case}.json"
    path.write_text(json.dumps({**TINY, **CASES[case]}))
    return path


def kvserve_llm(config_path: Path) -> LLM:
    return LLM(
        str(config_path),
        load_format="dummy",
        dtype="float32",
        kv_cache_memory="4MiB",
        block_size=4,
    )


def kvserve_tokens(llm: LLM, prompts: list[list[int]], output_lens: list[int]) -> list[list[int]]:
    params = [bench_params(n) for n in output_lens]
    return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def hf_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        cache_implementation="static",
    )  # [1, prompt + new_tokens]
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelConfig, torch.nn.Module]:
    config = read_hf_config(write_tiny_config(tmp_path_factory.mktemp("hf_gpu_peer"), "llama"))
    return config, hf_model_from_config(config, dummy_weights(config), torch.float32, "cpu")


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_model_gives_kvserve_greedy_tokens_on_the_same_weights(
    tmp_path: Path, case: str
) -> None:
    path = write_tiny_config(tmp_path, case)
    config = read_hf_config(path)
    assert config.qk_norm == (case == "qwen3") and config.attention_bias == (case == "qwen2")
    llm = kvserve_llm(path)
    assert llm.engine.runner.model.config == config
    # kvserve's dummy loader uses dummy_weights(config, seed=0): the same tensors.
    model = hf_model_from_config(config, dummy_weights(config), torch.float32, "cpu")
    assert type(model).__name__ == HF_CLASSES[CASES[case]["model_type"]]
    assert model.dtype == torch.float32 and not model.training
    assert model.config._attn_implementation == "sdpa"
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ours = kvserve_tokens(llm, PROMPTS, [12] * len(PROMPTS))
    assert [hf_greedy(model, p, 12) for p in PROMPTS] == ours
    # Tied tiny models tend to echo a token, so also compare the logits after 21 tokens.
    sequence = PROMPTS[0] + ours[0]
    with torch.inference_mode():
        hf_logits = model(torch.tensor([sequence])).logits[0, -1]  # [vocab_size]
    torch.testing.assert_close(hf_logits, llm.prefill(sequence).logits, atol=1e-4, rtol=1e-4)


def test_random_init_builds_in_the_requested_dtype(tiny_llama) -> None:
    config, _ = tiny_llama
    model = hf_model_from_config(config, None, torch.bfloat16, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not model.training


def test_wrong_weights_are_refused(tiny_llama) -> None:
    config, _ = tiny_llama
    weights = dummy_weights(config)
    del weights["model.norm.weight"]
    with pytest.raises(ValueError, match="missing model.norm.weight"):
        hf_model_from_config(config, weights, torch.float32, "cpu")


def test_static_cache_decode_counts_tokens(tiny_llama) -> None:
    _, model = tiny_llama
    timing = hf_static_cache_decode(model, PROMPTS[0], new_tokens=5, repeats=1)
    assert (timing.context_len, timing.new_tokens, timing.repeats) == (9, 5, 1)
    assert timing.one_token_s > 0 and timing.all_tokens_s > 0
    assert timing.dtype == "float32" and timing.attn_implementation == "sdpa"
    expected = 4 / (timing.all_tokens_s - timing.one_token_s)
    assert math.isnan(timing.decode_tokens_per_s) or timing.decode_tokens_per_s == expected
    assert "static cache" in timing.describe() and "prefill excluded" in timing.describe()
    with pytest.raises(ValueError, match="new_tokens"):
        hf_static_cache_decode(model, PROMPTS[0], new_tokens=1)


def test_generate_batch_gives_each_request_its_own_length(tiny_llama) -> None:
    _, model = tiny_llama
    timing = hf_generate_batch(model, PROMPTS, OUTPUT_LENS, CPU_LIMITS)
    assert [len(t) for t in timing.token_ids] == OUTPUT_LENS
    assert timing.output_tokens == timing.requested_output_tokens == sum(OUTPUT_LENS)
    assert timing.num_requests == 3 and timing.prompt_tokens == sum(len(p) for p in PROMPTS)
    assert timing.elapsed_s > 0 and timing.output_tokens_per_s > 0
    assert "token_ids" not in timing.to_dict() and "output_tokens_per_s" in timing.to_dict()
    assert "own max_new_tokens" in timing.describe()
    # Greedy through the paged cache equals greedy through the static cache, and the model is
    # back on the attention it was built with.
    pairs = zip(PROMPTS, OUTPUT_LENS, strict=True)
    assert timing.token_ids == [hf_greedy(model, p, n) for p, n in pairs]
    assert model.config._attn_implementation == "sdpa"


def test_batch_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        HFBatchLimits(num_blocks=0)
