"""bfloat16 on CPU: weights and KV cache in bf16, same answers as float32 where it matters."""

from __future__ import annotations

import torch

from kvserve import LLM, SamplingParams
from kvserve.config import EngineConfig, cpu_has_fast_bf16


def test_bfloat16_engine_agrees_with_float32(llm_f32: LLM) -> None:
    llm = LLM(dtype="bfloat16", kv_cache_memory="16MiB", quantization="none", enforce_eager=True)
    model = llm.engine.runner.model
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert llm.engine.runner.kv_cache.layers[0][0].dtype == torch.bfloat16
    assert model.rotary.cos.dtype == torch.float32  # rotary tables stay float32
    # The chat answer's first token is a near-tie in bf16 (rounding can flip it), so compare
    # logits within bf16 tolerance, and greedy tokens on a prompt with a clear margin.
    prompt = llm_f32.tokenizer.encode("The capital of France is")
    logits = {}
    for name, engine in (("bf16", llm.engine), ("f32", llm_f32.engine)):
        request = engine.new_request(prompt, SamplingParams(max_tokens=1, temperature=0.0))
        engine.add_request(request, capture_logits=True)
        while not request.is_finished:
            engine.step()
        [logits[name]] = engine.captured_logits.pop(request.request_id)
    assert (logits["bf16"] - logits["f32"]).abs().max().item() < 1.5  # logits here are ~25
    params = SamplingParams(max_tokens=4, temperature=0.0)
    [bf16] = llm.generate([prompt], params)
    [f32] = llm_f32.generate([prompt], params)
    assert "Paris" in bf16.text
    assert bf16.token_ids[:2] == f32.token_ids[:2]


def test_auto_dtype_follows_the_cpu() -> None:
    expected = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    assert EngineConfig(dtype="auto").torch_dtype() == expected
    assert EngineConfig(dtype="float32").torch_dtype() == torch.float32
