"""The engine against transformers on the same weights, float32: tokens and logits."""

from __future__ import annotations

import pytest
import torch

from kvserve import LLM, SamplingParams

GREEDY_32 = SamplingParams(max_tokens=32, temperature=0.0)

RAW_PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who every "
    "morning walked down to the harbour before sunrise. One day he found",
    "1, 2, 3, 4, 5,",
    "Paris is the capital of",
]
CHAT_MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [{"role": "user", "content": "Write a haiku about autumn."}],
]


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        )
    return out[0, len(prompt_ids) :].tolist()


@pytest.fixture(scope="module")
def parity_prompts(llm_f32: LLM) -> list[list[int]]:
    tokenizer = llm_f32.tokenizer
    prompts = [tokenizer.encode(p) for p in RAW_PROMPTS]
    prompts += [tokenizer.apply_chat_template(m) for m in CHAT_MESSAGES]
    # One prompt whose length is an exact multiple of the block size (16).
    exact = tokenizer.encode(RAW_PROMPTS[2] + " a bottle on the sand with a letter inside it")[:32]
    prompts.append(exact)
    return prompts


def test_prompt_set_covers_the_block_boundary_cases(parity_prompts: list[list[int]]) -> None:
    lengths = [len(p) for p in parity_prompts]
    assert len(parity_prompts) >= 8
    assert 32 in lengths  # exact multiple of the block size
    assert any(n > 32 for n in lengths)  # spans several blocks


def test_greedy_batch_equals_transformers(llm_f32: LLM, hf_model, parity_prompts) -> None:
    outputs = llm_f32.generate(parity_prompts, GREEDY_32)
    for prompt_ids, output in zip(parity_prompts, outputs, strict=True):
        expected = hf_greedy(hf_model, prompt_ids, 32)
        assert output.token_ids == expected, f"prompt of {len(prompt_ids)} tokens diverged"
        assert output.finish_reason == ("stop" if len(expected) < 32 else "length")


def test_batch_gives_exactly_the_tokens_each_gives_alone(llm_f32: LLM, parity_prompts) -> None:
    batch = llm_f32.generate(parity_prompts, GREEDY_32)
    for prompt_ids, together in zip(parity_prompts, batch, strict=True):
        [alone] = llm_f32.generate([prompt_ids], GREEDY_32)
        assert alone.token_ids == together.token_ids


def test_every_decode_step_logits_equal_a_full_recompute(llm_f32: LLM, hf_model) -> None:
    prompt_ids = llm_f32.tokenizer.encode(RAW_PROMPTS[2])  # spans several blocks
    engine = llm_f32.engine
    request = engine.new_request(
        prompt_ids, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    )
    output = engine.add_request(request, capture_logits=True)
    while not output.finished:
        engine.step()
    step_logits = engine.captured_logits.pop(request.request_id)
    assert len(step_logits) == 20
    tokens = prompt_ids + output.token_ids
    with torch.no_grad():  # one forward over everything, no cache
        full = hf_model(torch.tensor([tokens]), use_cache=False).logits[0]
    for step, logits in enumerate(step_logits):
        position = len(prompt_ids) - 1 + step
        diff = (logits - full[position]).abs().max().item()
        assert diff <= 1e-4, f"step {step}: max abs logit difference {diff}"


def test_prefill_then_decode_equals_generate(llm_f32: LLM) -> None:
    prompt = RAW_PROMPTS[2]
    config = llm_f32.engine.runner.model.config
    prefilled = llm_f32.prefill(prompt)
    n = len(prefilled.prompt_token_ids)
    assert len(prefilled.kv) == config.num_hidden_layers
    for keys, values in prefilled.kv:
        assert keys.shape == values.shape == (n, config.num_key_value_heads, config.head_dim)
    assert prefilled.logits.shape == (config.vocab_size,)
    free_before = llm_f32.engine.scheduler.kv.num_free_blocks
    for params in (GREEDY_32, SamplingParams(max_tokens=24, temperature=0.9, seed=7)):
        [generated] = llm_f32.generate([prompt], params)
        decoded = llm_f32.decode(prefilled, params)
        assert decoded.token_ids == generated.token_ids
        assert decoded.text == generated.text
    assert llm_f32.engine.scheduler.kv.num_free_blocks == free_before


def test_prefilled_kv_equals_the_kv_of_a_fresh_forward(llm_f32: LLM, hf_model) -> None:
    prefilled = llm_f32.prefill(RAW_PROMPTS[0])
    with torch.no_grad():
        cache = hf_model(torch.tensor([prefilled.prompt_token_ids]), use_cache=True).past_key_values
    hf_keys = cache.layers[0].keys[0].transpose(0, 1)  # [tokens, kv_heads, head_dim]
    torch.testing.assert_close(prefilled.kv[0][0], hf_keys, atol=1e-4, rtol=1e-4)
