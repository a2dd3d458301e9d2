"""The engine core's loop, driven message by message: aborts of unknown or finished requests
are harmless, a request aborted while its tokens are on their way to the front end frees its
blocks at the next step (and the front end drops those tokens), a rejected add and a named
operation on a colocated engine answer instead of failing the loop."""

from __future__ import annotations

import pytest

from kvserve import LLM, SamplingParams
from kvserve.engine.core_client import QueueInbox
from kvserve.engine.core_loop import CoreLoop
from kvserve.engine.messages import (
    AbortRequests,
    AddRequest,
    CallResult,
    CoreCall,
    GetKVBytes,
    Shutdown,
    StepOutputs,
)
from kvserve.engine.output_processor import OutputProcessor

PARAMS = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
PROMPT = [100, 200, 300, 400, 500]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32", kv_cache_memory="16MiB", quantization="none", enforce_eager=True)


@pytest.fixture
def loop(llm: LLM):
    sent: list = []
    inbox = QueueInbox()
    loop = CoreLoop(llm.engine.core, inbox, sent.append)
    loop.sent = sent
    loop.put = inbox.put
    yield loop
    for request_id in list(llm.engine.scheduler.requests):
        llm.engine.core.abort(request_id)
    stats = llm.get_stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def outputs_of(sent: list, request_id: str) -> list:
    return [o for m in sent if isinstance(m, StepOutputs) for o in m.outputs
            if o.request_id == request_id]


def test_an_abort_for_an_unknown_or_finished_request_is_harmless(loop, llm: LLM) -> None:
    short = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    loop.put(AddRequest("done", PROMPT, short, 0.0))
    for _ in range(5):
        loop.turn()
    assert outputs_of(loop.sent, "done")[-1].finish_reason == "length"
    free = llm.get_stats()["kv_blocks_free"]
    loop.put(AbortRequests(["done", "never-existed"]))
    assert loop.turn()
    assert llm.get_stats()["kv_blocks_free"] == free
    loop.put(AddRequest("next", PROMPT, short, 0.0))  # the loop still serves
    for _ in range(5):
        loop.turn()
    assert [len(o.tokens) for o in outputs_of(loop.sent, "next")] == [1, 1]


def test_a_request_aborted_with_tokens_in_flight_frees_its_blocks_next_step(
    loop, llm: LLM
) -> None:
    front = OutputProcessor(llm.tokenizer)
    front.add_request("r", None, PROMPT, PARAMS, 0.0)
    loop.put(AddRequest("r", PROMPT, PARAMS, 0.0))
    loop.turn()
    loop.turn()
    in_flight = [m for m in loop.sent if isinstance(m, StepOutputs)]  # not yet read by the front
    assert llm.get_stats()["num_running"] == 1
    front.abort("r")  # the client went away; the abort travels while tokens still arrive
    loop.put(AbortRequests(["r"]))
    loop.turn()
    stats = llm.get_stats()
    assert stats["num_running"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert loop.sent[-1].stats["num_running"] == 0  # the front end hears of it
    deltas, stopped = front.process([o for m in in_flight for o in m.outputs])
    assert deltas == [] and stopped == []


def test_a_rejected_add_and_an_unsupported_call_are_answered(loop) -> None:
    loop.put(AddRequest("bad", [10**9], PARAMS, 0.0))
    loop.put(CoreCall(7, GetKVBytes()))
    loop.turn()
    [step] = [m for m in loop.sent if isinstance(m, StepOutputs)]
    assert "outside the vocabulary" in step.rejected["bad"]
    assert step.num_adds == 1
    [result] = [m for m in loop.sent if isinstance(m, CallResult)]
    assert result.call_id == 7 and result.error_kind == "invalid"


def test_shutdown_ends_the_loop_and_aborts_what_runs(loop, llm: LLM) -> None:
    loop.put(AddRequest("long", PROMPT, PARAMS, 0.0))
    loop.turn()
    loop.put(Shutdown())
    loop.run()
    stats = llm.get_stats()
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
