"""``echo``, prompt logprobs and ``max_tokens: 0`` on /v1/completions, through a real server
process and the openai client: the prompt's logprobs against transformers' float32 full
forward of the same weights (log_softmax), the completion part against a request without echo,
whole and streamed, and vLLM's ``prompt_logprobs`` shape."""

from __future__ import annotations

import httpx
import pytest
import torch
from openai import OpenAI
from server_process import MODEL, Server

PROMPT = "The capital of France is Paris, and the capital of Italy is"
ATOL = 1e-4


@pytest.fixture(scope="module")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def prompt_ids(hf_tokenizer) -> list[int]:
    return hf_tokenizer.encode(PROMPT, add_special_tokens=False)


@pytest.fixture(scope="module")
def reference(hf_model, prompt_ids: list[int]) -> torch.Tensor:
    """[prompt_len - 1, vocab]: log-probabilities of the prompt's tokens 1.. given the ones
    before (one float32 forward over the whole prompt, no cache)."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt_ids]), use_cache=False).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1]


def token_texts(hf_tokenizer, ids: list[int]) -> list[str]:
    return [hf_tokenizer.decode([t]) for t in ids]


def assert_offsets_point_into_the_text(logprobs, text: str) -> None:
    offset = 0
    for token, start in zip(logprobs.tokens, logprobs.text_offset, strict=True):
        assert start == offset and text[start : start + len(token)] == token
        offset += len(token)


def test_echo_puts_each_prompt_before_its_completion(client: OpenAI, prompt_ids) -> None:
    prompts = [PROMPT, "1, 2, 3, 4,"]
    plain = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0)
    echoed = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0,
                                       echo=True)
    assert [c.text for c in echoed.choices] == [p + c.text for p, c in
                                                zip(prompts, plain.choices, strict=True)]
    assert echoed.usage == plain.usage
    by_ids = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=5,
                                       temperature=0, echo=True)
    assert by_ids.choices[0].text == echoed.choices[0].text  # token ids decoded


def test_echo_with_max_tokens_0_scores_the_prompt(
    client: OpenAI, hf_tokenizer, prompt_ids, reference: torch.Tensor
) -> None:
    """What lm-eval-harness sends: the prompt alone, each token's logprob given the ones
    before it (null for the first), the top alternatives, no completion token."""
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True,
                                         logprobs=3, temperature=0)
    [choice] = response.choices
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert response.usage.completion_tokens == 0
    assert response.usage.prompt_tokens == len(prompt_ids)
    logprobs = choice.logprobs
    assert logprobs.tokens == token_texts(hf_tokenizer, prompt_ids)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for position in range(1, len(prompt_ids)):
        row = reference[position - 1]
        got = logprobs.token_logprobs[position]
        assert abs(got - row[prompt_ids[position]].item()) <= ATOL, f"position {position}"
        top_lps, top_ids = row.topk(3)
        expected = dict(zip(token_texts(hf_tokenizer, top_ids.tolist()), top_lps.tolist(),
                            strict=True))
        assert logprobs.top_logprobs[position].keys() == expected.keys()
        for text, lp in expected.items():
            assert abs(logprobs.top_logprobs[position][text] - lp) <= ATOL
    assert_offsets_point_into_the_text(logprobs, choice.text)


def test_echo_logprobs_list_the_prompt_then_the_completion(client: OpenAI, prompt_ids) -> None:
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                      logprobs=2).choices[0]
    scored = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                       logprobs=2, echo=True).choices[0]
    n = len(prompt_ids)
    logprobs = scored.logprobs
    assert scored.text == PROMPT + plain.text
    assert len(logprobs.tokens) == n + 4
    assert logprobs.tokens[n:] == plain.logprobs.tokens
    assert logprobs.token_logprobs[n:] == pytest.approx(plain.logprobs.token_logprobs, abs=ATOL)
    assert [list(t) for t in logprobs.top_logprobs[n:]] == [
        list(t) for t in plain.logprobs.top_logprobs]
    assert logprobs.text_offset[n:] == [len(PROMPT) + o for o in plain.logprobs.text_offset]
    assert_offsets_point_into_the_text(logprobs, scored.text)


@pytest.mark.parametrize("max_tokens", [0, 4])
def test_streamed_echo_sends_the_prompt_first_and_equals_the_whole(
    client: OpenAI, max_tokens: int
) -> None:
    options = dict(model=MODEL, prompt=[PROMPT, "Hello"], max_tokens=max_tokens, temperature=0,
                   logprobs=1, echo=True)
    whole = client.completions.create(**options)
    texts: dict[int, str] = {0: "", 1: ""}
    tokens: dict[int, list] = {0: [], 1: []}
    offsets: dict[int, list] = {0: [], 1: []}
    logprobs: dict[int, list] = {0: [], 1: []}
    reasons = {}
    firsts = {}
    for chunk in client.completions.create(**options, stream=True):
        for choice in chunk.choices:
            firsts.setdefault(choice.index, choice.text)
            texts[choice.index] += choice.text
            if choice.logprobs is not None:
                tokens[choice.index] += choice.logprobs.tokens
                offsets[choice.index] += choice.logprobs.text_offset
                logprobs[choice.index] += choice.logprobs.token_logprobs
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert firsts[0].startswith(PROMPT) and firsts[1].startswith("Hello")
    for choice in whole.choices:
        assert texts[choice.index] == choice.text
        assert tokens[choice.index] == choice.logprobs.tokens
        assert offsets[choice.index] == choice.logprobs.text_offset
        assert logprobs[choice.index] == pytest.approx(choice.logprobs.token_logprobs, abs=ATOL)
        assert reasons[choice.index] == choice.finish_reason
    if max_tokens == 0:
        assert texts == {0: PROMPT, 1: "Hello"}


def test_vllm_prompt_logprobs_shape(
    server: Server, hf_tokenizer, prompt_ids, reference: torch.Tensor
) -> None:
    """vLLM's extension: None first, then {token_id: {logprob, rank, decoded_token}} of the
    prompt token itself and the top N (ranks 1..N); no echo needed, the completion as usual."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "temperature": 0,
            "prompt_logprobs": 2}
    response = httpx.post(server.api_url + "/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    [choice] = response.json()["choices"]
    assert not choice["text"].startswith(PROMPT) and choice["logprobs"] is None
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(prompt_ids) and entries[0] is None
    for position in range(1, len(prompt_ids)):
        row, token_id = reference[position - 1], prompt_ids[position]
        entry = entries[position]
        top_lps, top_ids = row.topk(2)
        assert list(entry) == list(dict.fromkeys(map(str, [token_id, *top_ids.tolist()])))
        own = entry[str(token_id)]
        assert abs(own["logprob"] - row[token_id].item()) <= ATOL
        assert own["decoded_token"] == hf_tokenizer.decode([token_id])
        assert own["rank"] == int((row >= row[token_id]).sum())
        for rank, (top_id, lp) in enumerate(zip(top_ids.tolist(), top_lps.tolist(),
                                                strict=True), 1):
            assert entry[str(top_id)]["rank"] == rank
            assert abs(entry[str(top_id)]["logprob"] - lp) <= ATOL


def test_a_repeated_scored_prompt_is_computed_again(server: Server, client: OpenAI) -> None:
    """The second request finds the prompt's blocks cached, but its logprobs need every
    position's logits: it takes none from the cache, and its answer is the same."""
    prompt = "Here is a long shared preamble that fills a few KV blocks. " * 4
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    scored = [client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True,
                                        logprobs=1, temperature=0) for _ in range(2)]
    assert plain.usage.prompt_tokens > 32
    assert [s.usage.prompt_tokens_details.cached_tokens for s in scored] == [0, 0]
    assert scored[0].choices[0].logprobs == scored[1].choices[0].logprobs
    server.wait_idle()
