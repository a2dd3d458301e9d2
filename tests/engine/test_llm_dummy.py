"""--load-format dummy: random weights of a real architecture run through the same engine."""

from __future__ import annotations

from kvserve import LLM, SamplingParams


def test_dummy_weights_generate_fixed_length_output() -> None:
    llm = LLM("smollm2-135m", load_format="dummy", dtype="float32", enforce_eager=True,
              kv_cache_memory="32MiB")
    config = llm.engine.runner.model.config
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    outputs = llm.generate([[1, 2, 3, 4], [5, 6]], SamplingParams(max_tokens=8, ignore_eos=True))
    assert [len(o.token_ids) for o in outputs] == [8, 8]
    assert all(o.finish_reason == "length" for o in outputs)
