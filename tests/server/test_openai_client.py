"""The official openai client against a real server: chat and completions, whole and streamed,
n, stop, seed, logprobs, usage, and greedy chat equal to LLM.chat."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import OpenAI
from server_process import MODEL, Server

from kvserve import LLM, SamplingParams

MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three colours."},
]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def expected_chat(llm_f32: LLM):
    """What LLM.chat (float32, the same pool) answers greedily: the server must say the same."""
    return llm_f32.chat(MESSAGES, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))


def test_models_lists_the_served_model(client: OpenAI) -> None:
    assert [model.id for model in client.models.list()] == [MODEL]


def test_greedy_chat_equals_llm_chat(client: OpenAI, expected_chat) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0
    )
    [choice] = response.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected_chat.text
    assert choice.finish_reason == expected_chat.finish_reason
    assert response.object == "chat.completion" and response.model == MODEL
    assert response.usage.prompt_tokens == len(expected_chat.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected_chat.token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + len(
        expected_chat.token_ids
    )


def test_streamed_chat_has_openais_shape_and_the_same_text(
    client: OpenAI, expected_chat
) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_completion_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    first, *middle, finish, usage_chunk = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert all(c.choices[0].finish_reason is None for c in [first, *middle])
    assert "".join(c.choices[0].delta.content for c in middle) == expected_chat.text
    assert finish.choices[0].finish_reason == expected_chat.finish_reason
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == len(expected_chat.token_ids)
    assert usage_chunk.usage.prompt_tokens == len(expected_chat.prompt_token_ids)
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_the_wire_format_ends_with_done(server: Server) -> None:
    body = {"messages": MESSAGES, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.api_url + "/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
         "finish_reason": None}
    ]  # fmt: skip
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_text_parts_are_the_same_as_a_string(client: OpenAI, expected_chat) -> None:
    parts = [
        MESSAGES[0],
        {"role": "user", "content": [{"type": "text", "text": MESSAGES[1]["content"]}]},
    ]
    response = client.chat.completions.create(
        model=MODEL, messages=parts, max_tokens=MAX_TOKENS, temperature=0
    )
    assert response.choices[0].message.content == expected_chat.text


def test_completions_whole_and_streamed_agree(client: OpenAI) -> None:
    prompts = ["The capital of France is", "1, 2, 3, 4,"]
    whole = client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in whole.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in whole.choices)
    assert whole.usage.completion_tokens == 12
    texts = {0: "", 1: ""}
    reasons = {}
    for chunk in client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=6, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    ):  # fmt: skip
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert reasons == {0: "length", 1: "length"}


def test_token_id_prompts_equal_text_prompts(client: OpenAI, llm_f32: LLM) -> None:
    text = "The capital of France is"
    ids = llm_f32.tokenizer.encode(text)
    by_text = client.completions.create(model=MODEL, prompt=text, max_tokens=5, temperature=0)
    by_ids = client.completions.create(
        model=MODEL, prompt=[ids, ids], max_tokens=5, temperature=0
    )
    assert [c.text for c in by_ids.choices] == [by_text.choices[0].text] * 2
    assert by_ids.usage.prompt_tokens == 2 * len(ids)


def test_n_choices_differ_and_a_seed_reproduces_them(client: OpenAI) -> None:
    def ask(seed: int) -> list[str]:
        response = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Write a word."}],
            max_tokens=8,
            temperature=1.0,
            n=2,
            seed=seed,
        )
        assert [c.index for c in response.choices] == [0, 1]
        return [c.message.content for c in response.choices]

    first = ask(seed=7)
    assert first[0] != first[1]
    assert ask(seed=7) == first
    assert ask(seed=8) != first


def test_streamed_n_choices_carry_their_index(client: OpenAI) -> None:
    stream = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=5, n=2, seed=1, stream=True
    )
    finished = sorted(c.index for chunk in stream for c in chunk.choices if c.finish_reason)
    assert finished == [0, 1]


def test_stop_strings_cut_the_output(client: OpenAI) -> None:
    prompt = "1, 2, 3, 4,"
    free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    text = free.choices[0].text
    stop = text.strip().split()[1]  # a token that comes after some output
    cut = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stop=[stop, "zzz"]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_chat_logprobs(client: OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = response.choices[0]
    content = choice.logprobs.content
    assert len(content) == response.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and bytes(item.bytes).decode() == item.token
        assert len(item.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert item.top_logprobs[0].token == item.token
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-4)
    streamed = [
        item
        for chunk in client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
            top_logprobs=3, stream=True,
        )  # fmt: skip
        if chunk.choices and chunk.choices[0].logprobs
        for item in chunk.choices[0].logprobs.content
    ]
    assert [i.token for i in streamed] == [i.token for i in content]


def test_completion_logprobs(client: OpenAI) -> None:
    response = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2
    )
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert len(logprobs.top_logprobs) == 4 and all(len(t) == 2 for t in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0
    assert logprobs.text_offset[1:] == [
        logprobs.text_offset[i] + len(logprobs.tokens[i]) for i in range(3)
    ]
    assert "".join(logprobs.tokens) == response.choices[0].text


def test_a_repeated_prompt_reports_cached_tokens(client: OpenAI) -> None:
    prompt = "Here is a long shared preamble that fills a few KV blocks. " * 4
    usages = [
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0).usage
        for _ in range(2)
    ]
    block_size = 16
    assert usages[1].prompt_tokens == usages[0].prompt_tokens > 2 * block_size
    cached = usages[1].prompt_tokens_details.cached_tokens
    assert cached == (usages[1].prompt_tokens - 1) // block_size * block_size
