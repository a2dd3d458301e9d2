"""32 streaming clients at once: every one completes with its own text, the text its prompt
gets when it runs alone."""

from __future__ import annotations

import asyncio

from openai import AsyncOpenAI
from server_process import MODEL, Server

from kvserve import LLM, SamplingParams

NUM_CLIENTS = 32
MAX_TOKENS = 8


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {i} plus {i + 3}? Answer with a number."}]


async def stream_one(client: AsyncOpenAI, i: int) -> tuple[str, str | None, int]:
    text, reason, usage = "", None, 0
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=messages(i),
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
    return text, reason, usage


def test_32_concurrent_streams_each_get_their_own_text(server: Server, llm_f32: LLM) -> None:
    async def run_all() -> list[tuple[str, str | None, int]]:
        client = AsyncOpenAI(base_url=server.api_url, api_key="unused", max_retries=0)
        try:
            return await asyncio.gather(*(stream_one(client, i) for i in range(NUM_CLIENTS)))
        finally:
            await client.close()

    results = asyncio.run(run_all())
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    alone = [llm_f32.chat(messages(i), params) for i in range(NUM_CLIENTS)]
    assert [r[0] for r in results] == [a.text for a in alone]
    assert [r[1] for r in results] == [a.finish_reason for a in alone]
    assert [r[2] for r in results] == [len(a.token_ids) for a in alone]
    assert len({a.text for a in alone}) > NUM_CLIENTS // 2  # the prompts differ, so do texts
    server.wait_idle()
