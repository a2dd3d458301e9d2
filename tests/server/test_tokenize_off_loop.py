"""A large prompt is tokenized (or its chat template rendered) off the event loop: while its
tokenizer is held up, a small streamed request is served to its end. A real uvicorn server
in a thread of the test, over an in-thread engine and an instrumented tokenizer that blocks
on large inputs until the test lets it go."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_process import served_in_thread

from kvserve import LLM
from kvserve.engine.async_engine import AsyncEngine
from kvserve.model.tokenizer import Tokenizer
from kvserve.server.app import build_app

LARGE = 100_000  # characters from which the tokenizer blocks
WAIT_S = 20.0


class BlockingTokenizer:
    """``tokenizer``, except that encoding or templating a large text waits for ``release``."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.entered = threading.Event()
        self.release = threading.Event()
        self.released_in_time: bool | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def _block(self) -> None:
        self.entered.set()
        self.released_in_time = self.release.wait(WAIT_S)

    def encode(self, text: str) -> list[int]:
        if len(text) >= LARGE:
            self._block()
            text = text[:100]
        return self.tokenizer.encode(text)

    def apply_chat_template(self, messages: list[dict], **kwargs: Any) -> list[int]:
        if sum(len(m["content"]) for m in messages) >= LARGE:
            self._block()
            messages = [{**m, "content": m["content"][:100]} for m in messages]
        return self.tokenizer.apply_chat_template(messages, **kwargs)


@pytest.fixture
def served(llm_f32: LLM) -> Iterator[tuple[str, BlockingTokenizer]]:
    tokenizer = BlockingTokenizer(llm_f32.tokenizer)
    engine = AsyncEngine.in_thread(llm_f32.engine.core, llm_f32.tokenizer)
    app = build_app(engine, tokenizer, "m")  # type: ignore[arg-type]
    with served_in_thread(app) as url:
        try:
            yield f"{url}/v1", tokenizer
        finally:
            tokenizer.release.set()  # before the server stops: its blocked threads end


LARGE_BODIES = {
    "/completions": {"prompt": "word " * (LARGE // 5), "max_tokens": 2},
    "/chat/completions": {"messages": [{"role": "user", "content": "word " * (LARGE // 5)}],
                          "max_tokens": 2},
}


@pytest.mark.parametrize("path", LARGE_BODIES)
def test_a_small_stream_runs_while_a_large_prompt_tokenizes(
    served: tuple[str, BlockingTokenizer], path: str
) -> None:
    url, tokenizer = served
    large: dict[str, httpx.Response] = {}
    sender = threading.Thread(target=lambda: large.update(
        response=httpx.post(url + path, json=LARGE_BODIES[path], timeout=60)))
    sender.start()
    try:
        assert tokenizer.entered.wait(10), "the large prompt never reached the tokenizer"
        small = {"prompt": "Hello", "max_tokens": 8, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/completions", json=small, timeout=10) as stream:
            events = [line.removeprefix("data: ") for line in stream.iter_lines() if line]
        # the small stream ran start to end while the large prompt's tokenizer was held
        assert not tokenizer.release.is_set() and sender.is_alive()
    finally:
        tokenizer.release.set()
        sender.join(60)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["text"]) == 8
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert tokenizer.released_in_time is True
    assert large["response"].status_code == 200, large["response"].text
