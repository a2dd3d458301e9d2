"""The compiled CPU decode step against the eager one on the same weights: exact tokens on the
float32 path, at batch 1 and in a batch (its two graphs), with no recompilation; greedy
agreement on the int4 path. Slow to build (inductor compiles both graphs once per model)."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.worker.compiled_decode import COMPILED_MAX_BATCH, CompiledDecode
from tests.engine.engine_stepping import assert_idle
from tests.engine.test_llm_parity import RAW_PROMPTS

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
# the parity prompts' raw texts and three more: 4 to 40 tokens, tables of 1 to 4 blocks
PROMPTS = [*RAW_PROMPTS, "Write a haiku about autumn.", "List three primary colors:",
           "import numpy as np\n"]
MIN_AGREEING_TOKENS = 16
# inductor's CPU backend compiles C++: without a compiler the engine stays eager (tested below)
needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="no C++ compiler"
)
TINY_LLAMA = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "max_position_embeddings": 256}


def count_batch_sizes(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> Counter[int]:
    """Batch sizes of the decode steps that went through the compiled step from now on."""
    step = llm.engine.runner.decode_step
    assert isinstance(step, CompiledDecode)
    sizes: Counter[int] = Counter()
    run = step.run

    def counted(input_ids, positions, block_tables, fill=None):
        sizes[len(input_ids)] += 1
        return run(input_ids, positions, block_tables, fill)

    monkeypatch.setattr(step, "run", counted)
    return sizes


@pytest.fixture(scope="module")
def compiled_f32() -> LLM:
    return LLM(dtype="float32", kv_cache_memory="64MiB", block_size=16, quantization="none")


@needs_compiler
def test_float32_compiled_tokens_equal_the_eager_ones(
    compiled_f32: LLM, llm_f32: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = count_batch_sizes(compiled_f32, monkeypatch)
    eager = [o.token_ids for o in llm_f32.generate(PROMPTS, GREEDY, use_tqdm=False)]
    alone = [compiled_f32.generate([p], GREEDY, use_tqdm=False)[0].token_ids for p in PROMPTS]
    batch = [o.token_ids for o in compiled_f32.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert alone == eager
    assert batch == eager
    # every decode of both runs went through a graph: 23 steps alone for each prompt, and the
    # batch's decodes (the last prompt's prefill rides with the others' first decodes)
    assert sizes[1] == len(PROMPTS) * (GREEDY.max_tokens - 1)
    assert sizes[len(PROMPTS)] >= GREEDY.max_tokens - 2
    assert_idle(compiled_f32)


@needs_compiler
def test_async_scheduling_fills_the_compiled_steps_placeholders(
    compiled_f32: LLM, llm_f32: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each decode's input is the token the step before sampled, put in place inside the
    compiled step's inputs (TokenFill) rather than read back first."""
    sizes = count_batch_sizes(compiled_f32, monkeypatch)
    monkeypatch.setattr(compiled_f32.engine.core, "async_scheduling", True)
    eager = [o.token_ids for o in llm_f32.generate(PROMPTS, GREEDY, use_tqdm=False)]
    batch = [o.token_ids for o in compiled_f32.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert batch == eager
    assert sizes[len(PROMPTS)] >= GREEDY.max_tokens - 2
    assert_idle(compiled_f32)


@needs_compiler
def test_more_decodes_than_the_graph_takes_run_eagerly(
    compiled_f32: LLM, llm_f32: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --max-num-seqs above COMPILED_MAX_BATCH a step can hold more decodes than the
    graphs take (shrunk to 4 here): those steps run eagerly, the others compiled."""
    sizes = count_batch_sizes(compiled_f32, monkeypatch)
    monkeypatch.setattr(compiled_f32.engine.runner.decode_step, "max_batch", 4)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for prompts in (PROMPTS, PROMPTS[:3]):  # 8 decodes a step: eager; 3: compiled
        got = [o.token_ids for o in compiled_f32.generate(prompts, params, use_tqdm=False)]
        want = [o.token_ids for o in llm_f32.generate(prompts, params, use_tqdm=False)]
        assert got == want
    assert set(sizes) == {3}
    assert_idle(compiled_f32)


@needs_compiler
def test_the_compiled_step_refuses_what_it_was_not_built_for(compiled_f32: LLM) -> None:
    step = compiled_f32.engine.runner.decode_step
    assert step.max_batch == COMPILED_MAX_BATCH  # the CPU default max_num_seqs, 64
    assert step.warm_up_sizes() == [1, 2]  # not quantized: one graph serves 2..64
    too_many = COMPILED_MAX_BATCH + 1
    with pytest.raises(ValueError, match=f"{too_many} decodes; this step takes at most 64"):
        step.run([1] * too_many, [0] * too_many, [[0]] * too_many)
    fresh = CompiledDecode(step.model, step.kv_caches, step.block_size)
    with pytest.raises(RuntimeError, match="before compile"):
        fresh.run([1], [0], [[0]])


def test_enforce_eager_builds_no_compiled_step(llm_f32: LLM) -> None:
    assert llm_f32.engine.runner.decode_step is None


@needs_compiler
def test_int4_compiled_greedy_tokens_agree_with_eager_int4(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The quantized path: the fused graph rounds differently from eager ops (inductor keeps
    intermediates in float32, eager rounds each op's output to bfloat16 at the int4 kernels),
    so tokens agree for the first 16, or part where the eager path's top-2 logit margin says
    it is a near-tie."""
    options = {"dtype": "float32", "kv_cache_memory": "64MiB", "quantization": "int4"}
    eager = LLM(enforce_eager=True, **options)
    compiled = LLM(**options)
    params = SamplingParams(max_tokens=MIN_AGREEING_TOKENS, temperature=0.0, ignore_eos=True)
    for prompt in PROMPTS[:4]:
        want = eager.generate([prompt], params, use_tqdm=False)[0].token_ids
        got = compiled.generate([prompt], params, use_tqdm=False)[0].token_ids
        if got == want:
            continue
        parted = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
        top = eager.prefill(eager.tokenizer.encode(prompt) + want[:parted]).logits.topk(2)
        margin = (top.values[0] - top.values[1]).item()
        assert margin < 0.5, f"{prompt!r} parts at token {parted}, top-2 margin {margin:.2f}"
    # a third graph from 33 decodes on, where float32 int4 layers take their dense copy
    step = compiled.engine.runner.decode_step
    assert step.warm_up_sizes() == [1, 2, 33]
    sizes = count_batch_sizes(compiled, monkeypatch)
    many = [f"Question {i}: what is {i} plus {i}?" for i in range(34)]
    short = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    got = [o.token_ids for o in compiled.generate(many, short, use_tqdm=False)]
    want = [o.token_ids for o in eager.generate(many, short, use_tqdm=False)]
    assert got == want
    assert max(sizes) >= 33
    assert_idle(compiled)
    del eager, compiled
    torch._dynamo.reset()


@needs_compiler
def test_many_compiled_engines_in_one_process_each_get_their_graphs(tmp_path) -> None:
    """Dynamo limits recompilations per code object (8): engines must not share one, or the
    fifth engine built in a process would find the limit reached."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_LLAMA))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    want = None
    engines = []  # all kept alive, as a server's or a benchmark's engines would be
    for _ in range(6):  # 12 graphs in all
        llm = LLM(str(config), load_format="dummy", dtype="float32", kv_cache_memory="4MiB",
                  block_size=4)
        engines.append(llm)
        assert isinstance(llm.engine.runner.decode_step, CompiledDecode)
        got = [o.token_ids for o in llm.generate([[5, 17, 200], [1, 2]], params, use_tqdm=False)]
        assert want is None or got == want  # dummy weights are seeded: the same every time
        want = got


def test_a_failed_compilation_leaves_the_engine_eager(
    tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No C++ compiler, say: the engine still starts, decodes eagerly, and says why."""
    def no_compiler(self) -> None:
        raise RuntimeError("Compiler: cc is not found")

    monkeypatch.setattr(CompiledDecode, "compile", no_compiler)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_LLAMA))
    with caplog.at_level("WARNING", logger="kvserve"):
        llm = LLM(str(config), load_format="dummy", dtype="float32", kv_cache_memory="4MiB",
                  block_size=4)
    assert llm.engine.runner.decode_step is None
    assert "compiling the CPU decode step failed" in caplog.text
    assert "cc is not found" in caplog.text
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    assert len(llm.generate([[5, 17, 200]], params, use_tqdm=False)[0].token_ids) == 3


@needs_compiler
def test_a_step_that_would_recompile_runs_eagerly_and_turns_the_graphs_off(
    compiled_f32: LLM, llm_f32: LLM, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    step = compiled_f32.engine.runner.decode_step

    def refuses(*args):
        raise RuntimeError("Detected recompile when torch.compile stance is 'fail_on_recompile'")

    monkeypatch.setattr(step, "_compiled", refuses)
    monkeypatch.setattr(step, "max_batch", step.max_batch)  # restored after the test
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    with caplog.at_level("WARNING", logger="kvserve"):
        got = compiled_f32.generate(PROMPTS[:2], params, use_tqdm=False)
    want = llm_f32.generate(PROMPTS[:2], params, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert step.max_batch == 0 and "would need recompiling" in caplog.text
    assert_idle(compiled_f32)
