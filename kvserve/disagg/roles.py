"""The internal HTTP routes a prefill engine and a decode engine add to their OpenAI server.

The router drives a request through them in three calls:
1. ``POST /kv/reserve`` on the decode engine: it looks the prompt up in its prefix cache,
   allocates blocks for the rest, and answers with the transfer plan and its KV rank.
2. ``POST /kv/prefill`` on the prefill engine, with that plan and rank: it computes the prompt,
   streams every layer's K/V to the decode rank as each layer finishes, waits until all of it
   has been sent, frees its blocks and answers with the first token it sampled.
3. ``POST /kv/continue`` on the decode engine, with the first token: once every layer has
   arrived it admits the request and streams its deltas as JSON lines (``disagg.wire``: token
   ids, text, logprobs, finish reason), which the router turns into OpenAI responses.
``GET /kv/info`` tells the router the model's limits (``max_model_len``, ``vocab_size``).
These routes run in the front end: each sends a typed operation to the engine core
(``engine.messages``: ReserveKV, PrefillAndSend, AdmitWithKV, CancelKV, GetKVBytes), which does
the work next to its KV cache (``disagg.core_ops``). A plan the decode engine never receives in
full is cancelled after ``--kv-transfer-timeout`` and its blocks freed; a failed prefill frees the
prefill engine's blocks and answers 502. A body with a missing or malformed field is a 400
naming the field (OpenAI's error shape). The routes are added to ``app``, which
``kvserve serve`` makes an APIRouter whose dependency checks the ``X-KV-Secret`` header on
every one of them (``disagg.kv_secret``).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from kvserve.config import KVRole
from kvserve.disagg.metrics import KVTransferStats
from kvserve.disagg.transfer import TransferPlan
from kvserve.disagg.wire import delta_json, sampled_token_from, sampled_token_json
from kvserve.engine.async_engine import AsyncEngine, CallFailedError
from kvserve.engine.messages import (
    AdmittedKV,
    AdmitWithKV,
    CancelKV,
    GetKVBytes,
    KVBytes,
    PrefillAndSend,
    PrefilledKV,
    ReservedKV,
    ReserveKV,
)
from kvserve.sampling_params import SamplingParams
from kvserve.server.errors import APIError, invalid_request

_STATUS_OF_KIND = {"invalid": 400, "timeout": 504, "failed": 502}


def add_info_route(app: FastAPI | APIRouter, engine: AsyncEngine, role: str) -> None:
    """``GET /kv/info``: the limits the router validates requests against, as this engine."""

    @app.get("/kv/info")
    async def info() -> JSONResponse:
        return JSONResponse({"role": role, "max_model_len": engine.max_model_len,
                             "vocab_size": engine.vocab_size})


def sampling_from(body: dict[str, Any]) -> SamplingParams:
    """The request's sampling parameters (SamplingParams' own names and checks); a bad one is
    a 400 naming it."""
    sampling = body.get("sampling", {})
    if not isinstance(sampling, dict):
        raise invalid_request("sampling must be an object of SamplingParams fields",
                              param="sampling")
    try:
        return SamplingParams(**sampling)
    except (TypeError, ValueError) as error:
        raise invalid_request(f"sampling: {error}", param="sampling") from error


def int_field(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_request(f"{name} is required and must be an integer, got {value!r}",
                              param=name)
    return value


def token_ids_field(body: dict[str, Any], name: str) -> list[int]:
    value = body.get(name)
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        raise invalid_request(f"{name} is required and must be a list of token ids", param=name)
    return value


def str_field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise invalid_request(f"{name} is required and must be a string", param=name)
    return value


def _failure(error: CallFailedError) -> JSONResponse:
    """A failed core operation as the router expects it: a status and ``{"error"}``."""
    return JSONResponse({"error": str(error)}, status_code=_STATUS_OF_KIND.get(error.kind, 502))


def add_decode_routes(
    app: FastAPI | APIRouter, engine: AsyncEngine, kv_rank: int, stats: KVTransferStats,
    reservation_lease_s: float = KVRole.reservation_lease_s,
) -> None:
    router = APIRouter(prefix="/kv")
    # what a reservation's request is, for the stream that continues it (front-end only)
    reserved: dict[str, tuple[list[int], SamplingParams, float]] = {}

    @router.post("/reserve")
    async def reserve(body: dict[str, Any]) -> JSONResponse:
        prompt_ids = token_ids_field(body, "prompt_token_ids")
        params = sampling_from(body)
        try:
            plan = await engine.call(ReserveKV(prompt_ids, params))
        except CallFailedError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        assert isinstance(plan, ReservedKV)
        now = time.monotonic()
        for transfer_id, (_, _, at) in list(reserved.items()):
            if now - at > reservation_lease_s:  # the core has cancelled it too
                del reserved[transfer_id]
        reserved[plan.transfer_id] = (prompt_ids, params, now)
        return JSONResponse({"transfer_id": plan.transfer_id, "num_tokens": plan.num_tokens,
                             "skip_tokens": plan.skip_tokens, "kv_rank": kv_rank})

    @router.post("/continue")
    async def continue_(body: dict[str, Any]) -> Any:
        transfer_id = str_field(body, "transfer_id")
        try:
            first_token = sampled_token_from(body.get("first_token"))
        except ValueError as error:
            raise invalid_request(str(error), param="first_token") from None
        if transfer_id not in reserved:
            raise APIError(404, f"no reservation {transfer_id!r}", param="transfer_id")
        prompt_ids, params, _ = reserved.pop(transfer_id)
        try:
            admitted, deltas = await engine.admit_with_kv(
                AdmitWithKV(transfer_id, first_token), prompt_ids, params
            )
        except CallFailedError as error:
            stats.add(failures=1)
            if error.kind == "invalid":
                raise APIError(404, str(error), param="transfer_id") from None
            return _failure(error)
        assert isinstance(admitted, AdmittedKV)
        stats.bytes_received = admitted.received_bytes
        stats.add(transfers=1, wait_seconds=admitted.wait_seconds,
                  seconds=admitted.transfer_seconds)
        return StreamingResponse(_json_lines(deltas), media_type="application/x-ndjson")

    @router.post("/cancel")
    async def cancel(body: dict[str, Any]) -> JSONResponse:
        transfer_id = str_field(body, "transfer_id")
        reserved.pop(transfer_id, None)
        await engine.call(CancelKV(transfer_id))
        stats.add(failures=1)
        return JSONResponse({"cancelled": transfer_id})

    @router.get("/stats")
    async def kv_stats() -> JSONResponse:
        counted = await engine.call(GetKVBytes())
        assert isinstance(counted, KVBytes)
        stats.bytes_received = counted.received
        return JSONResponse({"role": "decode", **stats.snapshot()})

    app.include_router(router)


async def _json_lines(deltas: AsyncIterator) -> AsyncIterator[bytes]:
    async for delta in deltas:
        yield (json.dumps(delta_json(delta)) + "\n").encode()


def add_prefill_routes(
    app: FastAPI | APIRouter, engine: AsyncEngine, stats: KVTransferStats
) -> None:
    router = APIRouter(prefix="/kv")

    @router.post("/prefill")
    async def prefill(body: dict[str, Any]) -> JSONResponse:
        prompt_ids = token_ids_field(body, "prompt_token_ids")
        num_tokens = int_field(body, "num_tokens")
        if num_tokens != len(prompt_ids):
            raise invalid_request(f"num_tokens={num_tokens} but prompt_token_ids has "
                                  f"{len(prompt_ids)} tokens", param="num_tokens")
        try:
            plan = TransferPlan(str_field(body, "transfer_id"), num_tokens,
                                int_field(body, "skip_tokens"))
        except ValueError as error:
            raise invalid_request(str(error), param="skip_tokens") from error
        params = sampling_from(body)
        kv_rank = int_field(body, "kv_rank")
        started = time.monotonic()
        try:
            done = await engine.call(PrefillAndSend(
                prompt_ids, params, plan.transfer_id, plan.num_tokens, plan.skip_tokens, kv_rank
            ))
        except CallFailedError as error:
            if error.kind == "invalid":
                raise invalid_request(str(error), param=error.param) from None
            stats.add(failures=1)
            return _failure(error)
        assert isinstance(done, PrefilledKV)
        stats.bytes_sent = done.sent_bytes
        stats.add(transfers=1, seconds=time.monotonic() - started)
        return JSONResponse({"first_token": sampled_token_json(done.first_token)})

    @router.get("/stats")
    async def kv_stats() -> JSONResponse:
        counted = await engine.call(GetKVBytes())
        assert isinstance(counted, KVBytes)
        stats.bytes_sent = counted.sent
        return JSONResponse({"role": "prefill", **stats.snapshot()})

    app.include_router(router)
