"""Seeded workloads: reproducible for a seed, lengths in range, ordinary token ids only."""

from __future__ import annotations

import pytest

from kvserve import LLM
from kvserve.benchmarks.workload import (
    ordinary_token_ids,
    parse_length_range,
    prefix_workload,
    throughput_workload,
)

TOKEN_IDS = list(range(100, 1000))


def test_throughput_workload_is_reproducible_and_in_range() -> None:
    first = throughput_workload(50, (8, 24), (2, 6), TOKEN_IDS, seed=3)
    assert first == throughput_workload(50, (8, 24), (2, 6), TOKEN_IDS, seed=3)
    assert first != throughput_workload(50, (8, 24), (2, 6), TOKEN_IDS, seed=4)
    assert len(first) == 50
    assert all(8 <= len(r.prompt_token_ids) <= 24 for r in first)
    assert all(2 <= r.output_len <= 6 for r in first)
    assert all(set(r.prompt_token_ids) <= set(TOKEN_IDS) for r in first)
    # Uniform over the whole range: with 50 draws both ends of [2, 6] appear.
    assert {r.output_len for r in first} == {2, 3, 4, 5, 6}


def test_fixed_lengths() -> None:
    requests = throughput_workload(4, (16, 16), (3, 3), TOKEN_IDS, seed=0)
    assert [len(r.prompt_token_ids) for r in requests] == [16] * 4
    assert [r.output_len for r in requests] == [3] * 4


def test_prefix_workload_shares_exactly_the_prefix() -> None:
    workload = prefix_workload(5, 40, 8, 2, TOKEN_IDS, seed=1)
    assert workload == prefix_workload(5, 40, 8, 2, TOKEN_IDS, seed=1)
    requests = workload.requests
    assert len(requests) == 5 and len(workload.prefix) == 40
    assert all(r.prompt_token_ids[:40] == workload.prefix for r in requests)
    assert all(len(r.prompt_token_ids) == 48 and r.output_len == 2 for r in requests)
    first_suffix_ids = [r.prompt_token_ids[40] for r in requests]
    assert len(set(first_suffix_ids)) == 5  # the requests differ right after the prefix


def test_ordinary_token_ids_skip_special_and_chat_tokens(llm_f32: LLM) -> None:
    tokenizer = llm_f32.tokenizer
    ids = ordinary_token_ids(tokenizer)
    # SmolLM2: ids 0-16 are special or chat-markup tokens; EOS is among them.
    assert ids[0] == 17 and ids[-1] == tokenizer.vocab_size - 1
    assert len(ids) == tokenizer.vocab_size - 17
    assert not set(ids) & set(tokenizer.eos_token_ids)


def test_parse_length_range() -> None:
    assert parse_length_range("64:256") == (64, 256)
    assert parse_length_range("128") == (128, 128)
    for bad in ("256:64", "0:4", "a:b", "1:"):
        with pytest.raises(ValueError, match="length range"):
            parse_length_range(bad)


def test_bad_workload_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_requests"):
        throughput_workload(0, (1, 2), (1, 2), TOKEN_IDS)
    with pytest.raises(ValueError, match="output_len"):
        throughput_workload(1, (1, 2), (3, 2), TOKEN_IDS)
    with pytest.raises(ValueError, match="suffix_len"):
        prefix_workload(2, 16, 0, 1, TOKEN_IDS)
