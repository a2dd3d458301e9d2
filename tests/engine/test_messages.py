"""The front end <-> engine core protocol: every message type survives encoding, and a malformed
or unknown message is logged and dropped by the receiver (a real ZeroMQ socket pair), which
goes on reading the next one."""

from __future__ import annotations

import logging

import msgspec
import pytest
import zmq

from kvserve.engine.core_process import ZmqInbox
from kvserve.engine.messages import (
    AbortRequests,
    AddRequest,
    AdmittedKV,
    AdmitWithKV,
    CallResult,
    CancelKV,
    CoreCall,
    EngineFailed,
    EngineOutput,
    EngineReady,
    GetKVBytes,
    KVBytes,
    PrefillAndSend,
    PrefilledKV,
    ReservedKV,
    ReserveKV,
    Shutdown,
    StepOutputs,
    decode_to_core,
    decode_to_front,
    encode,
)
from kvserve.sampling_params import SamplingParams
from kvserve.step_output import SampledToken

PARAMS = SamplingParams(max_tokens=7, temperature=0.5, top_k=3, seed=11, stop=("\n\n",),
                        stop_token_ids=(5,), logprobs=2, logit_bias={3: -100, 9: 2.5},
                        structured=("json_schema", "{\"type\": \"object\"}"),
                        prompt_logprobs=3)
STATS = {"num_running": 1, "kv_usage": 0.25}

TO_CORE = [
    AddRequest("r-1", [1, 2, 3], PARAMS, 12.5),
    AbortRequests(["r-1", "r-2"], reason="stop"),
    Shutdown(),
    CoreCall(1, ReserveKV([4, 5], PARAMS)),
    CoreCall(2, CancelKV("xfer-1")),
    CoreCall(3, PrefillAndSend([4, 5, 6], PARAMS, "xfer-1", 3, 0, kv_rank=1)),
    CoreCall(4, AdmitWithKV("xfer-1", SampledToken(9, -0.5, [(9, -0.5), (4, -1.5)]))),
    CoreCall(5, GetKVBytes()),
]
TO_FRONT = [
    EngineReady(max_model_len=1456, vocab_size=49152, stats=STATS),
    EngineFailed("out of memory"),
    StepOutputs(
        outputs=[
            EngineOutput("r-1", [SampledToken(7, -0.5, [(7, -0.5), (8, -1.25)])]),
            EngineOutput("r-2", [SampledToken(2)], "stop", 2, num_cached_tokens=16,
                         first_scheduled_time=3.5),
            EngineOutput("r-5", [SampledToken(4)], prompt_logprobs=[
                SampledToken(8, -2.5, [(3, -0.5)], rank=4), SampledToken(1, -0.25, [], rank=1)]),
        ],
        failed_ids=["r-3"],
        rejected={"r-4": "request id 'r-4' is already in use"},
        stats=STATS,
        num_adds=4,
    ),
    CallResult(1, ReservedKV("xfer-1", 3, 0)),
    CallResult(3, PrefilledKV(SampledToken(9), sent_bytes=1024)),
    CallResult(4, AdmittedKV(0.01, 0.2, 2048)),
    CallResult(5, KVBytes(sent=1, received=2)),
    CallResult(2),
    CallResult(6, error="no reservation 'x'", error_kind="invalid", error_param="transfer_id"),
]


@pytest.mark.parametrize("message", TO_CORE, ids=lambda m: type(m).__name__)
def test_every_message_to_the_core_round_trips(message) -> None:
    assert decode_to_core(encode(message)) == message


@pytest.mark.parametrize("message", TO_FRONT, ids=lambda m: type(m).__name__)
def test_every_message_to_the_front_end_round_trips(message) -> None:
    assert decode_to_front(encode(message)) == message


BAD = [
    b"\xc1 not msgpack",
    msgspec.msgpack.encode({"type": "LaunchMissiles", "target": "x"}),  # unknown type
    msgspec.msgpack.encode({"type": "AddRequest", "request_id": "r"}),  # fields missing
    msgspec.msgpack.encode({"type": "AddRequest", "request_id": "r", "prompt_token_ids": [1],
                            "params": {"temperature": -1.0}, "arrival_time": 0.0}),
    msgspec.msgpack.encode([1, 2, 3]),
]


@pytest.mark.parametrize("data", BAD)
def test_a_malformed_or_unknown_message_is_logged_and_dropped(data: bytes, caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="kvserve"):
        assert decode_to_core(data) is None
        assert decode_to_front(data) is None
    assert "dropped a malformed message" in caplog.text


def test_the_core_s_socket_drops_bad_messages_and_keeps_reading() -> None:
    context = zmq.Context()
    try:
        pull = context.socket(zmq.PULL)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push = context.socket(zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{port}")
        good = [TO_CORE[0], TO_CORE[1]]
        push.send(BAD[0])
        push.send(encode(good[0]))
        push.send(BAD[1])
        push.send(encode(good[1]))
        inbox = ZmqInbox(pull, parent_pid=0)
        received = []
        for _ in range(50):
            received += inbox.receive(timeout_s=0.1)
            if len(received) == len(good):
                break
        assert received == good
    finally:
        context.destroy(linger=0)
