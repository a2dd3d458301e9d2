"""The internal HTTP routes a prefill engine and a decode engine add to their OpenAI server.

The router drives a request through them in three calls:
1. ``POST /kv/reserve`` on the decode engine: it looks the prompt up in its prefix cache,
   allocates blocks for the rest, and answers with the transfer plan and its KV rank.
2. ``POST /kv/prefill`` on the prefill engine, with that plan and rank: it computes the prompt,
   streams every layer's K/V to the decode rank as each layer finishes, waits until all of it
   has been sent, frees its blocks and answers with the first token it sampled.
3. ``POST /kv/continue`` on the decode engine, with the first token: once every layer has
   arrived it admits the request and streams its tokens as JSON lines (``token_ids``, ``text``,
   ``finished``, ``finish_reason``), which the router turns into OpenAI responses.
A plan the decode engine never receives in full is cancelled after ``TRANSFER_TIMEOUT_S`` and
its blocks freed; a failed prefill frees the prefill engine's blocks and answers 502. A body
with a missing or malformed field is a 400 naming the field (OpenAI's error shape).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from kvserve.disagg.connector import KVLoader, KVSaver, first_token_params
from kvserve.disagg.metrics import KVTransferStats
from kvserve.disagg.transfer import TransferPlan
from kvserve.disagg.transport import KVTransport
from kvserve.engine.async_engine import AsyncEngine
from kvserve.engine.engine_core import EngineCore
from kvserve.sampling_params import SamplingParams
from kvserve.server.errors import APIError, invalid_request
from kvserve.worker.model_runner import SampledToken

TRANSFER_TIMEOUT_S = 30.0
POLL_S = 0.001


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


def add_decode_routes(
    app: FastAPI, engine: AsyncEngine, loader: KVLoader, kv_rank: int, stats: KVTransferStats
) -> None:
    router = APIRouter(prefix="/kv")
    reserved_at: dict[str, float] = {}

    @router.post("/reserve")
    async def reserve(body: dict[str, Any]) -> JSONResponse:
        prompt_ids = token_ids_field(body, "prompt_token_ids")
        params = sampling_from(body)
        try:
            plan = await engine.call(lambda core: loader.reserve(prompt_ids, params))
        except (ValueError, RuntimeError) as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        reserved_at[plan.transfer_id] = time.monotonic()
        return JSONResponse({"transfer_id": plan.transfer_id, "num_tokens": plan.num_tokens,
                             "skip_tokens": plan.skip_tokens, "kv_rank": kv_rank})

    @router.post("/continue")
    async def continue_(body: dict[str, Any]) -> Any:
        transfer_id = str_field(body, "transfer_id")
        first = SampledToken(int_field(body, "first_token_id"))
        if not loader.has(transfer_id):
            raise APIError(404, f"no reservation {transfer_id!r}", param="transfer_id")
        waiting_since = time.monotonic()
        deadline = waiting_since + TRANSFER_TIMEOUT_S
        while not loader.is_complete(transfer_id):
            if time.monotonic() > deadline:
                await engine.call(lambda core: loader.cancel(transfer_id))
                reserved_at.pop(transfer_id, None)
                stats.add(failures=1)
                return JSONResponse({"error": f"KV of {transfer_id!r} did not arrive"},
                                    status_code=504)
            await asyncio.sleep(POLL_S)
        done = time.monotonic()
        stats.bytes_received = loader.received_bytes
        stats.add(transfers=1, wait_seconds=done - waiting_since,
                  seconds=done - reserved_at.pop(transfer_id, waiting_since))
        deltas = engine.follow(lambda core: loader.admit_for_stream(transfer_id, first))
        return StreamingResponse(_json_lines(deltas), media_type="application/x-ndjson")

    @router.post("/cancel")
    async def cancel(body: dict[str, Any]) -> JSONResponse:
        transfer_id = str_field(body, "transfer_id")
        await engine.call(lambda core: loader.cancel(transfer_id))
        reserved_at.pop(transfer_id, None)
        stats.add(failures=1)
        return JSONResponse({"cancelled": transfer_id})

    @router.get("/stats")
    async def kv_stats() -> JSONResponse:
        stats.bytes_received = loader.received_bytes
        return JSONResponse({"role": "decode", **stats.snapshot()})

    app.include_router(router)


async def _json_lines(deltas: AsyncIterator) -> AsyncIterator[bytes]:
    async for delta in deltas:
        output = delta.output
        line = {"token_ids": delta.token_ids, "text": delta.text, "finished": delta.finished,
                "finish_reason": output.finish_reason if delta.finished else None}
        yield (json.dumps(line) + "\n").encode()


def add_prefill_routes(
    app: FastAPI,
    engine: AsyncEngine,
    saver: KVSaver,
    sender_for: Callable[[int], KVTransport],
    stats: KVTransferStats,
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
        first_params = first_token_params(sampling_from(body))
        try:
            sender = sender_for(int_field(body, "kv_rank"))
        except ValueError as error:
            raise invalid_request(str(error), param="kv_rank") from error

        def start(core: EngineCore):
            request = core.new_request(prompt_ids, first_params)
            request.hold_kv = True  # blocks stay until every layer has been sent
            saver.add(request.request_id, plan, sender)
            return request, core.add_request(request)

        started = time.monotonic()
        request, output = await engine.call(start)
        try:
            while not request.is_finished:
                await asyncio.sleep(POLL_S)
            # K/V travel as copies, so the blocks can be freed even if a send never finishes.
            await asyncio.wait_for(asyncio.to_thread(sender.flush), TRANSFER_TIMEOUT_S)
        except TimeoutError:
            stats.add(failures=1)
            return JSONResponse({"error": "the decode engine did not take the KV within "
                                 f"{TRANSFER_TIMEOUT_S:g} s"}, status_code=504)
        except Exception as error:  # noqa: BLE001 (the router gets a 502 naming it)
            stats.add(failures=1)
            return JSONResponse({"error": f"the KV transfer to the decode engine failed: {error}"},
                                status_code=502)
        finally:
            def release(core: EngineCore) -> None:
                saver.drop(request.request_id)
                core.scheduler.release_held(request)

            await engine.call(release)
        if output.finish_reason == "abort" or not output.token_ids:
            return JSONResponse({"error": "the prefill was aborted"}, status_code=502)
        stats.bytes_sent = saver.sent_bytes
        stats.add(transfers=1, seconds=time.monotonic() - started)
        return JSONResponse({"first_token_id": output.token_ids[0]})

    @router.get("/stats")
    async def kv_stats() -> JSONResponse:
        stats.bytes_sent = saver.sent_bytes
        return JSONResponse({"role": "prefill", **stats.snapshot()})

    app.include_router(router)
