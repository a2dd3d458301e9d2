"""Tenants on the embedded model (float32) with a small pool: fair share, quotas, isolation and
the preemptions they cause change the order requests run in, never their tokens (each equals
the prompt run alone), and the pool is idle afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_stepping import GREEDY, alone_reference, assert_idle, float32_block_bytes, step_until

from kvserve import LLM
from kvserve.core.tenants import TenantConfig, TenantPolicy
from kvserve.outputs import RequestOutput

BLOCK_SIZE = 16
NUM_BLOCKS = 8
TENANTS = TenantConfig((
    TenantPolicy("A", isolate_prefix_cache=True),
    TenantPolicy("B", kv_quota=0.5),
    TenantPolicy("C", weight=2),
))
TEXTS = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The weather that morning was cold, and the wind blew hard from the north across the bay",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) +",
]


def make_llm(embedded_gguf: Path, **options: object) -> LLM:
    return LLM(dtype="float32", quantization="none", enforce_eager=True, block_size=BLOCK_SIZE,
               kv_cache_memory=NUM_BLOCKS * float32_block_bytes(embedded_gguf, BLOCK_SIZE),
               **options)


@pytest.fixture(scope="module")
def reference(embedded_gguf: Path) -> LLM:
    return make_llm(embedded_gguf, enable_prefix_caching=False)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_tenants_change_the_order_of_requests_never_their_tokens(
    embedded_gguf: Path, reference: LLM, async_scheduling: bool
) -> None:
    llm = make_llm(embedded_gguf, tenant_config=TENANTS, max_num_batched_tokens=40,
                   async_scheduling=async_scheduling)
    encode = llm.tokenizer.encode
    shared = encode(TEXTS[0])[:16]  # one block every tenant's prompts start with
    prompts = [shared + encode(text)[:n] for text in TEXTS for n in (4, 17)]
    alone = alone_reference(reference)
    runs: list[tuple[str, list[int], RequestOutput]] = []
    for index, prompt in enumerate(prompts):
        for tenant in ("A", "B", "C", "nobody"):
            request = llm.engine.new_request(prompt, GREEDY, f"{tenant}-{index}", tenant=tenant)
            runs.append((tenant, prompt, llm.engine.add_request(request)))
    step_until(llm, lambda: not llm.engine.has_unfinished)
    stats = llm.get_stats()
    assert stats["num_preemptions"] > 0  # 24 requests in 8 blocks: they competed
    for tenant, prompt, output in runs:
        assert output.token_ids == alone(prompt), (tenant, len(prompt))
    assert stats["tenants"]["A"]["prefix_cache_hits"] > 0  # A's requests share among them
    assert {name: stats["tenants"][name]["served_tokens"] > 0 for name in "ABC"} == {
        "A": True, "B": True, "C": True}
    assert stats["tenants"]["other"]["served_tokens"] > 0  # "nobody" is not configured
    assert all(figures["kv_blocks"] == 0 for figures in stats["tenants"].values())
    assert_idle(llm)


def test_an_isolated_tenants_cached_prompt_is_no_hit_for_another_tenant(
    embedded_gguf: Path,
) -> None:
    llm = make_llm(embedded_gguf, tenant_config=TENANTS)
    prompt = llm.tokenizer.encode(TEXTS[1] + TEXTS[2])[:40]  # 2 full blocks can hit

    def cached(tenant: str, salt: str | None = None) -> int:
        request = llm.engine.new_request(prompt, GREEDY, tenant=tenant, cache_salt=salt)
        output = llm.engine.add_request(request)
        step_until(llm, lambda: output.finished)
        return output.num_cached_tokens

    assert cached("A") == 0
    assert cached("B") == 0  # A's blocks are A's alone
    assert cached("A") == 32
    assert cached("C") == 32  # B and C are not isolated: C finds B's
    assert cached("C", salt="s1") == 0  # a cache_salt keeps a request's blocks apart
    assert cached("B", salt="s1") == 32  # the same salt shares them across open tenants
    assert_idle(llm)
