"""AsyncEngine: concurrent streams equal offline results; abort, overload, failures and
shutdown free everything."""

from __future__ import annotations

import asyncio
import time

import pytest

from kvserve import LLM, SamplingParams
from kvserve.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    QueueFullError,
    RequestFailedError,
)

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = [[100 + i, 200 + i, 300, 400 + 7 * i, 17, 18 + i] for i in range(6)]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32", kv_cache_memory="16MiB", quantization="none", enforce_eager=True)


@pytest.fixture
def engine(llm: LLM):
    async_engine = AsyncEngine.in_thread(llm.engine.core, llm.tokenizer, max_queue=None)
    async_engine.start()
    yield async_engine
    async_engine.shutdown(timeout=5)
    assert not async_engine.is_running


def wait_idle(engine: AsyncEngine, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats["num_running"] == stats["num_waiting"] == 0 and not engine.num_in_flight:
            return stats
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {engine.stats()}")


async def collect(engine: AsyncEngine, prompt: list[int], params=GREEDY) -> list[int]:
    tokens: list[int] = []
    async for delta in engine.generate(prompt, params):
        tokens.extend(delta.token_ids)
    return tokens


def test_concurrent_streams_equal_offline_generation(llm: LLM, engine: AsyncEngine) -> None:
    async def main() -> list[list[int]]:
        return await asyncio.gather(*(collect(engine, p) for p in PROMPTS))

    streamed = asyncio.run(main())
    stats = wait_idle(engine)
    engine.shutdown(timeout=5)
    offline = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert streamed == offline
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_a_consumer_that_stops_early_aborts_its_request(engine: AsyncEngine) -> None:
    async def main() -> None:
        stream = engine.generate(PROMPTS[0], SamplingParams(max_tokens=500, ignore_eos=True))
        async for _ in stream:
            break  # the client went away after its first token
        await stream.aclose()

    asyncio.run(main())
    stats = wait_idle(engine)
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_a_full_queue_refuses_new_requests_and_keeps_nothing(llm: LLM) -> None:
    engine = AsyncEngine.in_thread(llm.engine.core, llm.tokenizer, max_queue=0)
    engine.start()
    try:
        with pytest.raises(QueueFullError, match="max_queue 0"):
            asyncio.run(collect(engine, PROMPTS[0]))
        assert engine.num_in_flight == 0
    finally:
        engine.shutdown(timeout=5)


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(
    llm: LLM, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = llm.engine.runner
    launch = runner.launch
    calls = {"n": 0}

    def fail_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated kernel failure")
        return launch(*args, **kwargs)

    monkeypatch.setattr(runner, "launch", fail_once)
    with pytest.raises(RequestFailedError):
        asyncio.run(collect(engine, PROMPTS[1]))
    assert asyncio.run(collect(engine, PROMPTS[1])) == asyncio.run(collect(engine, PROMPTS[1]))
    stats = wait_idle(engine)
    assert engine.num_step_failures == 1
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_shutdown_ends_in_flight_requests_with_a_clear_error(llm: LLM) -> None:
    engine = AsyncEngine.in_thread(llm.engine.core, llm.tokenizer)
    engine.start()

    async def main() -> None:
        got = []
        with pytest.raises(EngineDeadError, match="shutting down"):
            async for delta in engine.generate(
                PROMPTS[2], SamplingParams(max_tokens=5000, ignore_eos=True)
            ):
                got.append(delta)
                if len(got) == 2:
                    await asyncio.to_thread(engine.shutdown, 0.0)
        assert len(got) >= 2

    asyncio.run(main())
    assert not engine.is_running
    assert llm.get_stats()["kv_blocks_free"] == llm.get_stats()["kv_blocks_total"]
    with pytest.raises(EngineDeadError):
        asyncio.run(collect(engine, PROMPTS[0]))


def test_bad_prompts_are_refused_before_they_are_queued(engine: AsyncEngine) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        asyncio.run(collect(engine, [10**9]))
    assert engine.num_in_flight == 0


def test_a_request_that_cannot_be_sent_leaves_nothing_behind(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message the client cannot encode (the process client's msgpack refuses an int past
    64 bits) fails that request alone: it is not left in flight, nor counted as waiting."""
    send = engine.client.send

    def refuse_adds(message: object) -> None:
        if type(message).__name__ == "AddRequest":
            raise OverflowError("can't serialize ints < -2**63 or > 2**64 - 1")
        send(message)

    monkeypatch.setattr(engine.client, "send", refuse_adds)
    with pytest.raises(OverflowError):
        asyncio.run(collect(engine, PROMPTS[0]))
    assert (engine.num_in_flight, engine.num_waiting) == (0, 0)
    monkeypatch.setattr(engine.client, "send", send)
    assert len(asyncio.run(collect(engine, PROMPTS[0]))) == GREEDY.max_tokens
