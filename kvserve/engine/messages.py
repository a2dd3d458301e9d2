"""The typed messages between the front end and the engine core (msgspec Structs, MessagePack
on the wire). Nothing callable crosses: every message is data, and this module is the whole
protocol.

Front end -> core (``ToCore``):
    AddRequest       a tokenized request to schedule
    AbortRequests    end requests now and free their blocks (a client left, a stop string hit)
    CoreCall         a named operation with a call id (the KV transfers of disaggregation)
    Shutdown         finish the loop (requests still running are aborted)
Core -> front end (``ToFront``):
    EngineReady      sent once the model is loaded: the limits the front end validates against
    StepOutputs      after each step: new tokens per request, finish reasons, failures, stats
    CallResult       the answer to a CoreCall, with its call id
    EngineFailed     the core could not start (or its loop crashed), with the reason

msgspec was chosen over pickle because it decodes into these exact types (a malformed or
unknown message is a ValidationError, never code run), and over JSON because MessagePack keeps
token-id lists small and fast to encode.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from kvserve.sampling_params import SamplingParams
from kvserve.step_output import SampledToken

logger = logging.getLogger("kvserve")

# counters and gauges by name; "tenants" (when configured) maps each tenant to its own
Stats = dict[str, int | float | dict[str, dict[str, int | float]]]


class AddRequest(msgspec.Struct, tag=True, frozen=True):
    """Schedule a request. ``arrival_time`` is the front end's ``time.perf_counter()`` (one
    monotonic clock for every process of a machine)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    tenant: str | None = None  # kvserve.core.tenants: None is the default tenant
    cache_salt: str | None = None  # a request's own prefix-cache salt (vLLM's cache_salt)


class AbortRequests(msgspec.Struct, tag=True, frozen=True):
    """End these requests at the next step boundary and free their blocks. ``reason`` is what
    the core records ("abort", or "stop" when the front end found a stop string). Unknown and
    finished ids are ignored."""

    request_ids: list[str]
    reason: str = "abort"


class Shutdown(msgspec.Struct, tag=True, frozen=True):
    """Stop the loop; requests still running are aborted."""


# -- named KV-transfer operations (disaggregation), carried by CoreCall ---------------------


class ReserveKV(msgspec.Struct, tag=True, frozen=True):
    """Decode engine: look the prompt up in the prefix cache and reserve blocks for the rest.
    Answered with ReservedKV."""

    prompt_token_ids: list[int]
    params: SamplingParams


class ReservedKV(msgspec.Struct, tag=True, frozen=True):
    """A reservation: the prefill engine sends tokens ``skip_tokens..num_tokens``."""

    transfer_id: str
    num_tokens: int
    skip_tokens: int


class CancelKV(msgspec.Struct, tag=True, frozen=True):
    """Decode engine: give a reservation's blocks back. Answered with None."""

    transfer_id: str


class PrefillAndSend(msgspec.Struct, tag=True, frozen=True):
    """Prefill engine: compute the prompt, send every layer's K/V of tokens
    ``skip_tokens..num_tokens`` to KV rank ``kv_rank`` as each layer finishes, hold the blocks
    until all of it has been sent, then free them. Answered with PrefilledKV."""

    prompt_token_ids: list[int]
    params: SamplingParams  # the request's own; the first token is sampled with them
    transfer_id: str
    num_tokens: int
    skip_tokens: int
    kv_rank: int


class PrefilledKV(msgspec.Struct, tag=True, frozen=True):
    first_token: SampledToken  # with its logprobs when the request asked for them
    sent_bytes: int  # every byte this engine has sent so far


class AdmitWithKV(msgspec.Struct, tag=True, frozen=True):
    """Decode engine: once every layer of the reservation has arrived, add it as a request
    (its id is the transfer id) whose KV is already in the cache, continuing from
    ``first_token`` (the prefill engine's, logprobs included); its tokens then come in
    StepOutputs like any request's. Answered with AdmittedKV, or an error of kind "timeout"
    if the KV does not arrive in time (the reservation is then cancelled)."""

    transfer_id: str
    first_token: SampledToken


class AdmittedKV(msgspec.Struct, tag=True, frozen=True):
    wait_seconds: float  # from this call until the last layer arrived
    transfer_seconds: float  # from the reservation until the last layer arrived
    received_bytes: int  # every byte this engine has received so far


class GetKVBytes(msgspec.Struct, tag=True, frozen=True):
    """Either role: the bytes sent and received so far. Answered with KVBytes."""


class KVBytes(msgspec.Struct, tag=True, frozen=True):
    sent: int
    received: int


CoreOp = ReserveKV | CancelKV | PrefillAndSend | AdmitWithKV | GetKVBytes
CallValue = ReservedKV | PrefilledKV | AdmittedKV | KVBytes | None


class CoreCall(msgspec.Struct, tag=True, frozen=True):
    call_id: int
    op: CoreOp


class CallResult(msgspec.Struct, tag=True, frozen=True):
    """``value`` on success; else ``error`` (a message for the client), ``error_kind``
    ("invalid": bad arguments, a 400; "timeout"; "failed") and the field it names, if any."""

    call_id: int
    value: CallValue = None
    error: str | None = None
    error_kind: str = ""
    error_param: str | None = None


# -- core -> front end ----------------------------------------------------------------------


class EngineOutput(msgspec.Struct, frozen=True):
    """What one step gave one request: its new tokens and, if it ended, why. With its first
    token, a request that asked for prompt logprobs gets them all: entry ``i`` is about prompt
    token ``i + 1``."""

    request_id: str
    tokens: list[SampledToken]
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    prompt_logprobs: list[SampledToken] | None = None


class StepOutputs(msgspec.Struct, tag=True, frozen=True):
    """Everything since the last StepOutputs: outputs, requests the step failed (the core
    aborted them), requests refused on add (id -> reason), and the counters afterwards.
    ``num_adds`` counts every AddRequest the core has taken, so the front end knows how many
    are still on their way."""

    outputs: list[EngineOutput]
    failed_ids: list[str]
    rejected: dict[str, str]
    stats: Stats
    num_adds: int


class EngineReady(msgspec.Struct, tag=True, frozen=True):
    max_model_len: int
    vocab_size: int
    stats: Stats


class EngineFailed(msgspec.Struct, tag=True, frozen=True):
    reason: str


ToCore = AddRequest | AbortRequests | CoreCall | Shutdown
ToFront = StepOutputs | CallResult | EngineReady | EngineFailed

_encoder = msgspec.msgpack.Encoder()
_to_core = msgspec.msgpack.Decoder(ToCore)
_to_front = msgspec.msgpack.Decoder(ToFront)


def encode(message: ToCore | ToFront) -> bytes:
    return _encoder.encode(message)


def decode_to_core(data: bytes) -> ToCore | None:
    """The message, or None (logged) when ``data`` is malformed or of an unknown type."""
    return _decode(_to_core, data)


def decode_to_front(data: bytes) -> ToFront | None:
    """The message, or None (logged) when ``data`` is malformed or of an unknown type."""
    return _decode(_to_front, data)


def _decode(decoder: msgspec.msgpack.Decoder, data: bytes) -> Any:
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, ValueError, TypeError) as error:
        logger.error("dropped a malformed message of %d bytes: %s", len(data), error)
        return None
