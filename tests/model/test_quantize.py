"""CPU weight-only quantization against the float32 path it replaces.

The int4 path keeps the embedded Q4_1 GGUF's blocks as torch's int4 groups; the int8 path
requantizes per output channel. Each packed linear is compared with the float32 linear on
random bf16 inputs; the whole model by perplexity on a fixed text (tests/data/perplexity.txt,
over 2,000 tokens) and by greedy tokens.

Not tested, because it does not hold: that a batch gives each prompt the tokens it gets alone.
The int4 and int8 kernels are row-independent (bit for bit), but the float ops around them are
not (batched decode attention pads to the longest context; float32 GEMMs tile by row count), and
the bfloat16 cast at each quantized linear turns those last-bit differences into visible ones:
3 of the 9 float-path parity prompts part from their batch within 32 greedy tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.attention.metadata import build_attention_metadata
from kvserve.kernels.cpu.gemv import load_gemv
from kvserve.model.quantize import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    quantize_int4,
    quantize_int8,
    quantize_model,
    resolve_quantization,
)
from kvserve.worker.kv_cache import allocate_kv_cache, kv_bytes_per_block

TEXT = Path(__file__).parent.parent / "data" / "perplexity.txt"
WINDOW = 512  # tokens per perplexity window (each window starts from an empty cache)
# A packed linear's output against the float32 linear on the same bf16 input: the scales are
# stored in bfloat16 (8 significant bits) and the product comes out in bfloat16, so each output
# is off by up to a few parts in a thousand of the largest one.
LINEAR_TOLERANCE = 0.01
PERPLEXITY_TOLERANCE = 0.01  # the bound: within 1% of the float32 path's
MIN_AGREEING_TOKENS = 16


def make_llm(quantization: str) -> LLM:
    return LLM(dtype="float32", kv_cache_memory="64MiB", block_size=16,
               quantization=quantization, enforce_eager=True)


@pytest.fixture(scope="module")
def llm_int4() -> LLM:
    return make_llm("auto")  # the embedded GGUF is Q4_1: auto keeps it int4


@pytest.fixture(scope="module")
def llm_int8() -> LLM:
    return make_llm("int8")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def test_auto_picks_the_kernel_for_what_the_gguf_stores() -> None:
    assert resolve_quantization("auto", {"Q4_1"}, on_gpu=False)[0] == "int4"
    assert resolve_quantization("auto", {"Q4_0", "Q8_0"}, on_gpu=False)[0] == "int4"
    assert resolve_quantization("auto", {"Q8_0"}, on_gpu=False)[0] == "int8"
    assert resolve_quantization("auto", {"Q6_K"}, on_gpu=False)[0] == "none"
    assert resolve_quantization("auto", None, on_gpu=False)[0] == "none"  # safetensors, dummy
    assert resolve_quantization("auto", {"Q4_1"}, on_gpu=True)[0] == "none"
    assert resolve_quantization("int8", {"Q6_K"}, on_gpu=False)[0] == "int8"
    assert resolve_quantization("none", {"Q4_1"}, on_gpu=False)[0] == "none"


def test_a_q4_1_block_is_recovered_exactly() -> None:
    """w = d * q + m with q spanning 0..15 in every block (as llama.cpp's Q4_1 quantizer makes
    it): quantize_int4 finds the same q, scale d and zero m + 8d."""
    generator = torch.Generator().manual_seed(0)
    rows, cols = 8, 64
    q = torch.randint(0, 16, (rows, cols), generator=generator)
    q[:, ::32], q[:, 1::32] = 0, 15  # each block's minimum and maximum
    d = torch.rand(rows, cols // 32, generator=generator).half().float() * 0.1 + 0.01
    m = (torch.rand(rows, cols // 32, generator=generator).half().float() - 0.5) * 0.2
    weight = d.repeat_interleave(32, 1) * q + m.repeat_interleave(32, 1)
    got_q, scales, zeros = quantize_int4(weight)
    assert torch.equal(got_q, q.to(torch.int32))
    torch.testing.assert_close(scales, d)
    torch.testing.assert_close(zeros, m + 8 * d)
    torch.testing.assert_close(dequantize_int4(got_q, scales, zeros), weight)


def test_int8_round_trip_error_is_at_most_half_a_step() -> None:
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    q, scales = quantize_int8(weight)
    error = (q.float() * scales[:, None] - weight).abs()
    assert (error <= scales[:, None] / 2 + 1e-7).all()
    assert q.abs().max().item() == 127


def model_linears(llm: LLM) -> list[torch.nn.Linear]:
    """Every linear of the embedded model's first and last layers."""
    model = llm.engine.runner.model
    return [linear for layer in (model.layers[0], model.layers[-1])
            for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                           layer.mlp.gate_up_proj, layer.mlp.down_proj)]


def bf16_inputs(rows: int, columns: int, seed: int) -> torch.Tensor:
    """Random inputs that are exact in bfloat16, as the kernels see them."""
    x = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))
    return x.to(torch.bfloat16).float()


def test_an_int4_linear_equals_the_float32_linear(llm_f32: LLM) -> None:
    """The Q4_1 blocks are int4 groups as they are, so only bf16 rounding separates them."""
    for linear in model_linears(llm_f32):
        x = bf16_inputs(5, linear.in_features, seed=3)
        got = Int4Linear(linear.weight, linear.bias)(x)
        assert got.dtype == torch.float32
        want = torch.nn.functional.linear(x, linear.weight)
        assert relative_error(got, want) < LINEAR_TOLERANCE, linear


def assert_within_int8_step(layer: Int8Linear, x: torch.Tensor, weight: torch.Tensor) -> None:
    """The kernel equals the dequantized int8 weight's product up to bf16 rounding, and the
    float32 product within what one scale per row can lose: each output is off by at most
    sum(|x|) * scale / 2, plus that rounding."""
    got = layer(x)
    exact = torch.nn.functional.linear(x, layer.dequantized())
    assert relative_error(got, exact) < LINEAR_TOLERANCE
    want = torch.nn.functional.linear(x, weight)
    step_bound = x.abs().sum(dim=1, keepdim=True) * layer.scales.float()[None, :] / 2
    slack = LINEAR_TOLERANCE * want.abs().max()
    assert ((got - want).abs() <= step_bound + slack).all()


def test_an_int8_linear_is_within_its_quantization_step(llm_f32: LLM) -> None:
    for linear in model_linears(llm_f32):
        layer = Int8Linear(linear.weight, linear.bias)
        assert_within_int8_step(layer, bf16_inputs(5, linear.in_features, seed=3), linear.weight)


def test_the_int8_lm_head_is_within_its_quantization_step(llm_f32: LLM) -> None:
    """The tied embedding is Q8_0 (a scale per 32 weights); one scale per row loses more."""
    head = llm_f32.engine.runner.model.embed_tokens.weight[:4096]
    assert_within_int8_step(Int8Linear(head), bf16_inputs(5, head.shape[1], seed=4), head)


def perplexity(llm: LLM, token_ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of each token given the ones before it in its window."""
    model = llm.engine.runner.model
    backend = llm.engine.runner.backend
    block_size = 16
    per_block = kv_bytes_per_block(model.config, block_size, torch.float32)
    cache = allocate_kv_cache(model.config, per_block * (WINDOW // block_size + 1), block_size,
                              torch.float32)
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(token_ids) - 1, WINDOW):
            window = token_ids[start : start + WINDOW + 1]
            inputs, targets = window[:-1], torch.tensor(window[1:])
            metadata = build_attention_metadata(
                [len(inputs)], [len(inputs)], [list(range(cache.num_blocks))], block_size
            )
            hidden = model(torch.tensor(inputs), torch.arange(len(inputs)), cache.layers,
                           metadata, backend)
            logits = model.compute_logits(hidden)
            total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += len(targets)
    return math.exp(total / count)


@pytest.fixture(scope="module")
def text_ids(llm_f32: LLM) -> list[int]:
    ids = llm_f32.tokenizer.encode(TEXT.read_text())
    assert len(ids) > 2000
    return ids


@pytest.fixture(scope="module")
def float32_perplexity(llm_f32: LLM, text_ids: list[int]) -> float:
    return perplexity(llm_f32, text_ids)


@pytest.mark.parametrize("name", ["llm_int4", "llm_int8"])
def test_perplexity_is_within_one_percent_of_float32(
    name: str, request, text_ids: list[int], float32_perplexity: float
) -> None:
    llm = request.getfixturevalue(name)
    got = perplexity(llm, text_ids)
    assert abs(got / float32_perplexity - 1) < PERPLEXITY_TOLERANCE, (got, float32_perplexity)


def test_perplexity_with_kvserve_gemv_on_every_row(llm_f32: LLM, text_ids: list[int],
                                                  float32_perplexity: float) -> None:
    """kvserve's CPU GEMV ops for every row (a perplexity window is 512 rows, which the int4
    layers would otherwise hand to torch's kernel): still within 1% of float32."""
    kernels = load_gemv()
    if kernels is None:
        pytest.skip("kvserve's CPU GEMV ops did not build here")
    model = copy.deepcopy(llm_f32.engine.runner.model)
    quantize_model(model, "int4", gemv=dataclasses.replace(kernels, int4_rows=10**9))
    original, llm_f32.engine.runner.model = llm_f32.engine.runner.model, model
    try:
        got = perplexity(llm_f32, text_ids)
    finally:
        llm_f32.engine.runner.model = original
    assert abs(got / float32_perplexity - 1) < PERPLEXITY_TOLERANCE, (got, float32_perplexity)


def test_int4_greedy_tokens_agree_with_float32(llm_int4: LLM, llm_f32: LLM) -> None:
    """At least the first 16 tokens of each prompt, or the prompt names the near-tie where the
    paths part (the float32 path's top-2 logit margin there is small)."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was",
               "List three primary colors:"]
    params = SamplingParams(max_tokens=MIN_AGREEING_TOKENS, temperature=0.0, ignore_eos=True)
    quantized = llm_int4.generate(prompts, params, use_tqdm=False)
    exact = llm_f32.generate(prompts, params, use_tqdm=False)
    for prompt, q, f in zip(prompts, quantized, exact, strict=True):
        if q.token_ids == f.token_ids:
            continue
        pairs = zip(q.token_ids, f.token_ids, strict=True)
        parted = next(i for i, (a, b) in enumerate(pairs) if a != b)
        margin = top2_margin(llm_f32, llm_f32.tokenizer.encode(prompt) + f.token_ids[:parted])
        assert margin < 0.5, f"{prompt!r}: int4 parts at token {parted} where float32's " \
                             f"top-2 margin is {margin:.2f}, not a near-tie"


def top2_margin(llm: LLM, prompt_ids: list[int]) -> float:
    """The float32 path's top-2 logit gap for the token after ``prompt_ids``."""
    prefilled = llm.prefill(prompt_ids)
    top = prefilled.logits.topk(2).values
    return (top[0] - top[1]).item()
