"""Structured outputs in the worker: the bitmask applied to the logits bit for bit, grammars
compiled once per spec, and a matcher that allows exactly what its grammar allows next."""

from __future__ import annotations

import json

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.worker.grammar import Grammars
from kvserve.worker.sampler import apply_token_bitmask


def test_bitmask_keeps_exactly_the_set_bits() -> None:
    vocab = 70  # three 32-bit words, the last one partly used
    allowed = [[0, 31, 32, 69], [5]]
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    for row, tokens in enumerate(allowed):
        for t in tokens:
            word = bitmask[row, t // 32].item() | (1 << (t % 32))
            bitmask[row, t // 32] = word - (1 << 32) if word >= 1 << 31 else word  # as int32
    logits = torch.randn(3, vocab)
    out = apply_token_bitmask(logits, bitmask, rows=[2, 0])
    assert torch.equal(out[1], logits[1])  # a row without a grammar is untouched
    for row, tokens in zip([2, 0], allowed, strict=True):
        kept = torch.isfinite(out[row]).nonzero().flatten().tolist()
        assert kept == tokens
        assert torch.equal(out[row, tokens], logits[row, tokens])


@pytest.fixture(scope="module")
def grammars() -> Grammars:
    from kvserve.model.embedded import embedded_model_path
    from kvserve.model.tokenizer import _load_gguf_tokenizer

    tokenizer = _load_gguf_tokenizer(embedded_model_path())
    return Grammars(tokenizer.hf, tokenizer.vocab_size)


def test_a_spec_compiles_once(grammars: Grammars) -> None:
    spec = json.dumps(["red", "green"])
    first = grammars.compile("choice", spec)
    assert grammars.compile("choice", spec) is first
    assert first.result() is not None


def test_a_choice_matcher_allows_only_its_choices(grammars: Grammars) -> None:
    from kvserve.model.embedded import embedded_model_path
    from kvserve.model.tokenizer import _load_gguf_tokenizer

    tokenizer = _load_gguf_tokenizer(embedded_model_path())
    grammars.start("r", grammars.compile("choice", json.dumps([" yes", " no"])).result())
    mask = grammars.bitmask(["r"])
    logits = torch.zeros(1, tokenizer.vocab_size)
    allowed = torch.isfinite(apply_token_bitmask(logits, mask, [0])[0]).nonzero().flatten()
    texts = {tokenizer.decode([t]) for t in allowed.tolist()}
    assert texts and all(" yes".startswith(t) or " no".startswith(t) for t in texts)
    [yes] = tokenizer.encode(" yes")[:1]
    grammars.accept("r", yes)
    grammars.drop("r")
    assert not grammars.has("r")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grammars_bind_the_gpu_path() -> None:
    """Dummy weights on the GPU (CUDA graphs, async scheduling on by default): whatever the
    random logits, the mask leaves only what the grammar allows."""
    llm = LLM("smollm2-135m", load_format="dummy", device="cuda", kv_cache_memory="1GiB",
              max_num_seqs=8, max_model_len=512)
    params = [SamplingParams(max_tokens=20, temperature=1.0, seed=1,
                             structured=("choice", json.dumps(["left", "right", "up"]))),
              SamplingParams(max_tokens=20, temperature=1.0, seed=2,
                             structured=("regex", "[0-9]{4}")),
              SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)]
    choice, digits, free = llm.generate([[5, 6, 7]] * 3, params, use_tqdm=False)
    assert choice.text in ("left", "right", "up") and choice.finish_reason == "stop"
    assert len(digits.text) == 4 and digits.text.isdigit()
    assert len(free.token_ids) == 8
    stats = llm.get_stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["num_running"] == 0
