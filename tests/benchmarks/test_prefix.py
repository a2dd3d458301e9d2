"""`bench prefix`: with caching, later requests skip the prefix's full blocks; the counts are
exact (only full blocks are shared, a prompt's last token is always computed)."""

from __future__ import annotations

import pytest

from kvserve import LLM
from kvserve.benchmarks.prefix import (
    ARRIVALS,
    expected_computed_with_cache,
    render_prefix_report,
    run_prefix_comparison,
    run_prefix_once,
)
from kvserve.benchmarks.workload import ordinary_token_ids, prefix_workload

TOKEN_IDS = list(range(100, 1000))


@pytest.fixture(scope="module")
def llm_no_cache() -> LLM:
    """Random weights (prefill counts do not depend on them), prefix caching off."""
    return LLM("smollm2-135m", load_format="dummy", dtype="float32", enforce_eager=True,
               kv_cache_memory="16MiB", enable_prefix_caching=False)


def test_expected_counts_follow_the_block_rule() -> None:
    # 3 requests of a 64-token prefix + 8 tokens, blocks of 16: the first computes 72, the
    # others find 4 full prefix blocks and compute their 8 suffix tokens.
    assert expected_computed_with_cache(prefix_workload(3, 64, 8, 1, TOKEN_IDS), 16) == 88
    # A 40-token prefix fills 2 blocks; the third block holds suffix tokens: 8 + 8 computed.
    assert expected_computed_with_cache(prefix_workload(3, 40, 8, 1, TOKEN_IDS), 16) == 80
    # A 48-token prefix + 1 token: all 3 prefix blocks are shared, only the last token runs.
    assert expected_computed_with_cache(prefix_workload(3, 48, 1, 1, TOKEN_IDS), 16) == 51
    # With blocks of 64 a 40-token prefix fills no block: nothing is shared.
    assert expected_computed_with_cache(prefix_workload(3, 40, 8, 1, TOKEN_IDS), 64) == 144


@pytest.mark.parametrize("arrival", ARRIVALS)
@pytest.mark.parametrize(("prefix_len", "suffix_len", "computed"), [(64, 8, 88), (40, 8, 80)])
def test_caching_computes_only_what_the_cache_lacks(
    llm_f32: LLM, arrival: str, prefix_len: int, suffix_len: int, computed: int
) -> None:
    ids = ordinary_token_ids(llm_f32.tokenizer)
    workload = prefix_workload(3, prefix_len, suffix_len, 2, ids, seed=prefix_len)
    run = run_prefix_once(llm_f32, workload, arrival)
    prompt_tokens = 3 * (prefix_len + suffix_len)
    assert run.enable_prefix_caching
    assert run.prompt_tokens == prompt_tokens
    assert run.prompt_tokens_computed == computed == expected_computed_with_cache(workload, 16)
    assert run.prefix_cache_hits == prompt_tokens - computed
    assert len(run.ttft_s) == 3
    assert min(run.ttft_s) <= run.median_ttft_s <= run.p90_ttft_s == max(run.ttft_s)


def test_without_caching_every_prompt_token_is_computed(llm_no_cache: LLM) -> None:
    workload = prefix_workload(3, 64, 8, 2, ordinary_token_ids(llm_no_cache.tokenizer))
    run = run_prefix_once(llm_no_cache, workload, "burst")
    assert not run.enable_prefix_caching
    assert run.prompt_tokens_computed == run.prompt_tokens == 216
    assert run.prefix_cache_hits == 0


def test_comparison_runs_both_and_reports_the_ratios(llm_f32: LLM, llm_no_cache: LLM) -> None:
    built = []

    def make_llm(enabled: bool) -> LLM:
        built.append(enabled)
        return llm_f32 if enabled else llm_no_cache

    result = run_prefix_comparison(
        make_llm, lambda tokenizer: prefix_workload(3, 64, 8, 1, ordinary_token_ids(tokenizer))
    )
    assert built == [True, False]
    assert (result.on.prompt_tokens_computed, result.off.prompt_tokens_computed) == (88, 216)
    report = render_prefix_report("kvserve bench prefix", result)
    assert report.startswith("Command: `kvserve bench prefix`")
    assert "threads" in report and "dtype float32" in report
    assert "prefill tokens computed >= 10x fewer with caching: MISSED (2.45x" in report
    assert "| prefill tokens computed | 88 | 216 | 2.45x |" in report
    assert report.splitlines()[-1].startswith("| wall time (s) |")
    data = result.to_dict()
    assert data["workload"] == {"num_requests": 3, "prefix_len": 64, "suffix_len": 8,
                                "output_len": 1}
    assert data["caching_on"]["prompt_tokens_computed"] == 88


def test_unknown_arrival_is_rejected(llm_f32: LLM) -> None:
    with pytest.raises(ValueError, match="arrival"):
        run_prefix_once(llm_f32, prefix_workload(2, 16, 1, 1, TOKEN_IDS), "poisson")
