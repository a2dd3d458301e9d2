"""The step trace by tenant (kvserve/analysis/trace.py) on a real engine with a tenant config:
each step's tokens by tenant add up to the step's and, over the run, to each tenant's prompt and
output tokens; its blocks by tenant add up to the blocks in use; the unwritten slots are at most
a block's worth less one per running request. Without a tenant config the lines keep their keys."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from tenant_runs import BLOCK_SIZE, TENANTS, Sent, mixed_requests, read_lines, run_all, tiny_engine

STEP_KEYS = {"type", "step", "time", "duration_s", "prefill_tokens", "decode_tokens",
             "num_running", "num_waiting", "kv_usage", "prefix_cache_hits", "preemptions"}
REQUEST_KEYS = {"type", "request_id", "time", "queue_s", "prefill_s", "decode_s", "ttft_s",
                "prompt_tokens", "cached_tokens", "output_tokens", "finish_reason"}


def test_tokens_by_tenant_add_up_to_each_tenants_requests(
    mixed_trace: tuple[Path, list[Sent]],
) -> None:
    steps, requests = read_lines(mixed_trace[0])
    sent = mixed_trace[1]
    assert sum(s["preemptions"] for s in steps) == 0  # so every token is computed once
    assert all(set(s["tenants"]) == set(TENANTS.names) for s in steps)
    for step in steps:
        figures = step["tenants"].values()
        assert sum(f["prefill_tokens"] for f in figures) == step["prefill_tokens"]
        assert sum(f["decode_tokens"] for f in figures) == step["decode_tokens"]
    # request ids are given in the order sent: the request lines' tenants are the bucketed ones
    assert {r["request_id"]: r["tenant"] for r in requests} == {
        str(i): TENANTS.bucket(s.tenant) for i, s in enumerate(sent)}
    want_prefill: Counter[str] = Counter()
    want_decode: Counter[str] = Counter()
    for request in requests:
        assert request["cached_tokens"] == 0  # no two prompts share a block
        want_prefill[request["tenant"]] += request["prompt_tokens"]
        want_decode[request["tenant"]] += request["output_tokens"] - 1
    assert sorted(want_prefill.values()) != [0] * 5
    for name in TENANTS.names:
        assert sum(s["tenants"][name]["prefill_tokens"] for s in steps) == want_prefill[name]
        assert sum(s["tenants"][name]["decode_tokens"] for s in steps) == want_decode[name]
    assert sum(len(s.prompt) for s in sent if s.tenant == "A") == want_prefill["A"]
    assert sum(s.max_tokens - 1 for s in sent if s.tenant == "A") == want_decode["A"]


def test_blocks_by_tenant_add_up_to_the_blocks_in_use(
    contended_trace: tuple[Path, list[Sent]],
) -> None:
    steps, _ = read_lines(contended_trace[0])
    assert sum(s["preemptions"] for s in steps) > 0 and max(s["num_waiting"] for s in steps) > 0
    peak: defaultdict[str, int] = defaultdict(int)
    for step in steps:
        assert step["block_size"] == BLOCK_SIZE
        figures = step["tenants"]
        in_use = round(step["kv_usage"] * step["kv_blocks_total"])
        assert sum(f["kv_blocks"] for f in figures.values()) == in_use
        assert sum(f["num_running"] for f in figures.values()) == step["num_running"]
        assert sum(f["num_waiting"] for f in figures.values()) == step["num_waiting"]
        assert sum(f["preemptions"] for f in figures.values()) == step["preemptions"]
        assert sum(f["prefill_tokens"] for f in figures.values()) == step["prefill_tokens"]
        assert sum(f["decode_tokens"] for f in figures.values()) == step["decode_tokens"]
        for name, f in figures.items():
            # each running request's table ends in a block its tokens only partly fill
            assert 0 <= f["kv_unwritten_slots"] <= f["num_running"] * (BLOCK_SIZE - 1)
            assert f["kv_unwritten_slots"] < max(1, f["kv_blocks"] * BLOCK_SIZE)
            assert (f["kv_blocks"] == 0) == (f["num_running"] == 0)
            peak[name] = max(peak[name], f["kv_blocks"])
    assert all(peak[name] > 0 for name in ("A", "B", "C", "other", "default"))
    assert any(s["tenants"][n]["kv_unwritten_slots"] for s in steps for n in s["tenants"])
    assert all(f["kv_blocks"] == 0 for f in steps[-1]["tenants"].values())  # it ends idle


def test_shared_prefix_blocks_count_for_each_table_and_hits_stay_in_a_tenant(
    tmp_path: Path,
) -> None:
    """Two of isolated B's requests share a 16-token prefix and run together, C sends it too:
    B's tables hold more blocks than are in use, B's hits are its second request's cached
    tokens, and C (not isolated) finds none of B's blocks."""
    prefix = list(range(1, 17))
    sent = [Sent("B", [*prefix, 40, 41], 12), Sent("B", [*prefix, 50], 6),
            Sent("C", [*prefix, 60], 6)]
    trace = tmp_path / "trace.jsonl"
    run_all(tiny_engine(tmp_path, trace, TENANTS), sent, steps_between=1)
    steps, requests = read_lines(trace)
    cached = {r["tenant"]: 0 for r in requests}
    for request in requests:
        cached[request["tenant"]] += request["cached_tokens"]
    assert cached == {"B": 16, "C": 0}
    assert sum(s["tenants"]["B"]["prefix_cache_hits"] for s in steps) == 16
    assert sum(s["tenants"]["C"]["prefix_cache_hits"] for s in steps) == 0
    shared = [s for s in steps if s["tenants"]["B"]["num_running"] == 2]
    assert shared
    for step in shared:
        in_use = round(step["kv_usage"] * step["kv_blocks_total"])
        assert sum(f["kv_blocks"] for f in step["tenants"].values()) == in_use + 16 // BLOCK_SIZE


def test_without_a_tenant_config_the_lines_keep_their_keys(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    run_all(tiny_engine(tmp_path, trace, None), mixed_requests()[:4])
    steps, requests = read_lines(trace)
    assert steps and len(requests) == 4
    assert all(set(s) == STEP_KEYS for s in steps)
    assert all(set(r) == REQUEST_KEYS for r in requests)
