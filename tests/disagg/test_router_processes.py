"""A prefill engine, a decode engine and the router as three real processes on 127.0.0.1 (gloo
between the engines): completions through the router carry the colocated engine's greedy
tokens, streamed or not, and both engines' KV pools are idle afterwards."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from kvserve.engine.llm import LLM
from kvserve.sampling_params import SamplingParams
from tests.disagg.router_set import KV_HEADERS, running_set

PROMPTS = [[300 + (29 * i) % 800 for i in range(n)] for n in (7, 16, 45)]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def colocated() -> LLM:
    return LLM(dtype="float32", kv_cache_memory="64MiB", quantization="none", enforce_eager=True)


@pytest.fixture(scope="module")
def expected(colocated: LLM) -> list[str]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [o.text for o in colocated.generate(PROMPTS, params, use_tqdm=False)]


def kv_stats(url: str) -> dict:
    return httpx.get(url + "/kv/stats", headers=KV_HEADERS, timeout=10).json()


def completion(url: str, prompt: list[int], stream: bool = False) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    return httpx.post(url + "/v1/completions", json=body, timeout=120)


def test_router_completions_equal_the_colocated_engine(disaggregated, expected) -> None:
    for prompt, text in zip(PROMPTS, expected, strict=True):
        reply = completion(disaggregated["router"], prompt)
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        assert choice["text"] == text
        assert choice["finish_reason"] == "length"
        assert reply.json()["usage"]["completion_tokens"] == MAX_TOKENS
    for role in ("prefill", "decode"):
        stats = httpx.get(disaggregated[role] + "/v1/stats", timeout=10).json()
        assert stats["kv_blocks_free"] == stats["kv_blocks_total"], (role, stats)
    metrics = httpx.get(disaggregated["router"] + "/metrics", timeout=10).text
    for phase in ("reserve", "prefill", "transfer", "decode"):
        assert f'kvserve:router_phase_seconds_count{{phase="{phase}"}} ' in metrics


def test_a_second_request_with_the_same_prefix_transfers_only_new_tokens(
    disaggregated, colocated: LLM
) -> None:
    k_cache = colocated.engine.runner.kv_cache.layers[0][0]
    per_token = 2 * k_cache.shape[2] * k_cache.shape[3] * k_cache.element_size() * len(
        colocated.engine.runner.kv_cache.layers
    )
    prefix = [500 + (17 * i) % 700 for i in range(96)]  # 6 blocks of 16
    first, second = prefix + [11, 12, 13], prefix + [21, 22, 23, 24, 25]
    assert completion(disaggregated["router"], first).status_code == 200
    sent, received = (kv_stats(disaggregated[r]) for r in ("prefill", "decode"))
    assert completion(disaggregated["router"], second).status_code == 200
    sent_after, received_after = (kv_stats(disaggregated[r]) for r in ("prefill", "decode"))
    assert sent_after["bytes_sent"] - sent["bytes_sent"] == 5 * per_token
    assert received_after["bytes_received"] - received["bytes_received"] == 5 * per_token
    assert received_after["transfers"] == received["transfers"] + 1
    metrics = httpx.get(disaggregated["decode"] + "/metrics", timeout=10).text
    assert 'kvserve:kv_transfer_bytes_received_total{role="decode"} ' in metrics


def test_streamed_text_equals_the_whole_text(disaggregated) -> None:
    whole = completion(disaggregated["router"], PROMPTS[1]).json()["choices"][0]["text"]
    reply = completion(disaggregated["router"], PROMPTS[1], stream=True)
    events = [line.removeprefix("data: ") for line in reply.text.splitlines() if line]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert text == whole


def test_killing_the_decode_engine_mid_request_fails_cleanly(tmp_path: Path) -> None:
    """The client gets an error naming the decode engine, the prefill engine's blocks all come
    back, and the router reports the decode engine down."""
    with running_set(tmp_path) as (urls, processes):
        long_prompt = [300 + (31 * i) % 800 for i in range(1400)]
        reply: dict[str, httpx.Response] = {}
        thread = threading.Thread(
            target=lambda: reply.setdefault("r", completion(urls["router"], long_prompt))
        )
        thread.start()
        time.sleep(0.5)  # the request is in the prefill (1,400 tokens take over a second)
        processes["decode"].kill()
        thread.join(120)
        response = reply["r"]
        assert response.status_code in (502, 503), response.text
        assert "decode engine" in response.json()["error"]["message"]
        deadline = time.monotonic() + 30
        while True:
            stats = httpx.get(urls["prefill"] + "/v1/stats", timeout=10).json()
            idle = stats["kv_blocks_free"] == stats["kv_blocks_total"]
            if idle and stats["num_running"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert idle, stats
        assert urls["decode"] in httpx.get(urls["router"] + "/health", timeout=10).json()[
            "decode_down"
        ]


def test_chat_completion_equals_the_colocated_chat(disaggregated, colocated: LLM) -> None:
    messages = [{"role": "user", "content": "Name a primary color."}]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    expected_text = colocated.chat(messages, params).text
    reply = httpx.post(disaggregated["router"] + "/v1/chat/completions",
                       json={"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0,
                             "ignore_eos": True}, timeout=120)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert (message["role"], message["content"]) == ("assistant", expected_text)


def test_logit_bias_reaches_both_engines(disaggregated, colocated: LLM) -> None:
    """The prefill engine samples the first token and the decode engine the rest: +100 on one
    token (clamped from 500, as the server does) makes it every token."""
    forced = colocated.generate([[5, 6, 7]], SamplingParams(
        max_tokens=3, temperature=0.0, logit_bias={42: 100.0}), use_tqdm=False)[0]
    assert forced.token_ids == [42, 42, 42]
    body = {"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0, "logit_bias": {"42": 500}}
    reply = httpx.post(disaggregated["router"] + "/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == forced.text


def test_bad_input_gets_a_clear_error_and_leaks_nothing(disaggregated) -> None:
    router = disaggregated["router"] + "/v1/completions"
    cases = [
        ({"prompt": []}, "prompt is empty"),
        ({"prompt": [5, 6, 10**9], "max_tokens": 4}, "outside the vocabulary"),
        ({"prompt": [5, 6], "max_tokens": -1}, "max_tokens"),
        ({"prompt": [5, 6], "logit_bias": {"x": 1}}, "keys must be token ids"),
        ({"prompt": [5, 6], "logit_bias": {str(10**9): 1}}, "outside the vocabulary"),
    ]
    for body, text in cases:
        reply = httpx.post(router, json=body, timeout=60)
        assert reply.status_code == 400, reply.text
        assert text in reply.json()["error"]["message"]
    decode, prefill = disaggregated["decode"], disaggregated["prefill"]
    reply = httpx.post(decode + "/kv/reserve", json={"prompt_token_ids": "abc"},
                       headers=KV_HEADERS, timeout=10)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "prompt_token_ids"
    reply = httpx.post(decode + "/kv/continue", json={"transfer_id": "nope",
                                                      "first_token": {"token_id": 1}},
                       headers=KV_HEADERS, timeout=10)
    assert reply.status_code == 404
    assert reply.json()["error"]["param"] == "transfer_id"
    own_rank = {"prompt_token_ids": [5, 6], "transfer_id": "t", "num_tokens": 2,
                "skip_tokens": 0, "kv_rank": 0}
    reply = httpx.post(prefill + "/kv/prefill", json=own_rank, headers=KV_HEADERS, timeout=10)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "kv_rank"
    reply = httpx.post(prefill + "/kv/prefill", json={**own_rank, "num_tokens": 3},
                       headers=KV_HEADERS, timeout=10)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "num_tokens"
    for role in ("prefill", "decode"):
        stats = httpx.get(disaggregated[role] + "/v1/stats", timeout=10).json()
        assert stats["kv_blocks_free"] == stats["kv_blocks_total"], (role, stats)
        assert stats["num_running"] == stats["num_waiting"] == 0, (role, stats)
