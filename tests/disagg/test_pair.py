"""A prefill engine and a decode engine joined by the in-process transport: the same greedy
tokens as one colocated engine, only the blocks the decode engine lacks travel, layer ``l``
travels while later layers compute, and no block is left held on either side."""

from __future__ import annotations

import json
import random

import pytest

from kvserve.disagg.pair import DisaggregatedPair
from kvserve.engine.llm import LLM
from kvserve.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
# the first token is sampled by the prefill engine, the rest by the decode engine
SEEDED = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True,
                        logprobs=3)
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"], "additionalProperties": False}


OPTIONS = {"dtype": "float32", "quantization": "none", "enforce_eager": True,
           "kv_cache_memory": "64MiB", "max_num_seqs": 8}


def make_llm() -> LLM:
    return LLM(**OPTIONS)


@pytest.fixture(scope="module")
def colocated() -> LLM:
    return make_llm()


@pytest.fixture
def pair():
    pair = DisaggregatedPair.build(**OPTIONS)
    yield pair
    pair.close()


def random_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(length)]


def referenced_blocks(llm: LLM) -> int:
    kv = llm.engine.scheduler.kv
    kv.check_invariants()
    return sum(1 for count in kv.pool.ref_counts if count > 0)


def kv_bytes_per_token(llm: LLM) -> int:
    """K and V of every layer for one token, in the cache's dtype."""
    k_cache, _ = llm.engine.runner.kv_cache.layers[0]
    per_layer = 2 * k_cache.shape[2] * k_cache.shape[3] * k_cache.element_size()
    return per_layer * len(llm.engine.runner.kv_cache.layers)


def test_greedy_tokens_equal_the_colocated_engine(colocated: LLM, pair) -> None:
    prompts = [random_prompt(n, seed=n) for n in (5, 16, 17, 40, 67)]
    prompts.append("The capital of France is")
    expected = [o.token_ids for o in colocated.generate(prompts, GREEDY, use_tqdm=False)]
    got = [o.token_ids for o in pair.generate(prompts, GREEDY)]
    assert got == expected
    assert referenced_blocks(pair.prefill) == 0
    assert referenced_blocks(pair.decode) == 0


def test_a_shared_prefix_travels_once(pair) -> None:
    prefix = random_prompt(64, seed=1)  # 4 full blocks of 16
    first, second = prefix + random_prompt(10, seed=2), prefix + random_prompt(12, seed=3)
    pair.generate([first], GREEDY)
    assert pair.transport.sent_bytes == len(first) * kv_bytes_per_token(pair.decode)
    before = pair.transport.sent_bytes
    received_before = pair.loader.received_bytes
    pair.generate([second], GREEDY)
    new_tokens = len(second) - 64  # the decode engine already holds the prefix's 4 blocks
    assert pair.transport.sent_bytes - before == new_tokens * kv_bytes_per_token(pair.decode)
    assert pair.loader.received_bytes - received_before == pair.transport.sent_bytes - before


def test_layer_zero_travels_before_the_last_layer_is_computed(pair) -> None:
    import time

    computed_at: dict[int, float] = {}
    save_layer = pair.saver.save_layer

    def timed_save_layer(layer: int) -> None:  # runs right after the layer's compute
        computed_at[layer] = time.perf_counter()
        save_layer(layer)

    pair.saver.save_layer = timed_save_layer
    pair.generate([random_prompt(256, seed=4)], GREEDY)
    last = max(computed_at)
    first_send = min(t for chunk, t in pair.transport.send_started if chunk.layer == 0)
    assert last == len(pair.decode.engine.runner.kv_cache.layers) - 1
    assert first_send < computed_at[last]


def test_a_failed_prefill_gives_the_decode_blocks_back(pair, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise RuntimeError("prefill engine down")

    monkeypatch.setattr(pair, "_prefill_and_send", fail)
    with pytest.raises(RuntimeError, match="prefill engine down"):
        pair.generate([random_prompt(40, seed=5)], GREEDY)
    assert referenced_blocks(pair.decode) == 0


def test_seeded_sampling_and_logprobs_equal_the_colocated_engine(colocated: LLM, pair) -> None:
    prompts = [random_prompt(n, seed=n) for n in (9, 33)]
    expected = colocated.generate(prompts, SEEDED, use_tqdm=False)
    got = pair.generate(prompts, SEEDED)
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.token_ids == theirs.token_ids
        assert [lp.token_id for lp in mine.logprobs] == mine.token_ids
        for a, b in zip(mine.logprobs, theirs.logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _, _ in a.top_logprobs] == [t for t, _, _ in b.top_logprobs]


def test_a_grammar_holds_across_the_handover(colocated: LLM, pair) -> None:
    """The prefill engine samples the first token under the grammar; the decode engine's
    matcher starts from it, so the reply is the colocated engine's, and valid JSON."""
    params = SamplingParams(max_tokens=80, temperature=1.0, seed=3,
                            structured=("json_schema", json.dumps(SCHEMA)))
    prompts = ["Give a person as JSON: ", random_prompt(20, seed=8)]
    expected = colocated.generate(prompts, params, use_tqdm=False)
    got = pair.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    for output in got:
        reply = json.loads(output.text)
        assert set(reply) == {"name", "age"} and reply["age"] >= 0
    assert referenced_blocks(pair.decode) == 0
