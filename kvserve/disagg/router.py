"""`kvserve router`: the OpenAI-compatible front door of a disaggregated set.

For each completion it picks a decode engine and a prefill engine (round robin), has the decode
engine reserve blocks, the prefill engine compute and stream the KV, and streams the decode
engine's tokens back as OpenAI's ``text_completion`` objects (SSE when ``stream`` is true). A
decode engine that cannot be reached is reported in the response and skipped by later
requests; a failed prefill cancels the decode engine's reservation.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jinja2
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import ValidationError

from kvserve.model.tokenizer import Tokenizer
from kvserve.server import sse
from kvserve.server.errors import from_validation_error, install_error_handlers, invalid_request
from kvserve.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from kvserve.server.serving import new_id, refuse_unsupported, unix_time

SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "ignore_eos",
                 "stop", "presence_penalty", "frequency_penalty", "min_tokens")
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
RETRY_DOWN_S = 10.0  # a decode engine found unreachable is skipped this long


def error_message(reply: httpx.Response) -> str:
    """The message of an engine's error reply: ``{"error": "..."}`` or OpenAI's shape."""
    try:
        error = reply.json().get("error", reply.text)
    except ValueError:
        return reply.text
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)


class RouterError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Router:
    """Which engines exist, which decode engines are up, and the three calls of a request."""

    def __init__(self, prefill_urls: list[str], decode_urls: list[str]) -> None:
        if not prefill_urls or not decode_urls:
            raise ValueError("a router needs at least one --prefill and one --decode URL")
        self.prefill_urls = [u.rstrip("/") for u in prefill_urls]
        self.decode_urls = [u.rstrip("/") for u in decode_urls]
        self.down: dict[str, float] = {}  # decode url -> when it was last found unreachable
        self._prefill_turn = itertools.cycle(range(len(self.prefill_urls)))
        self._decode_turn = itertools.cycle(range(len(self.decode_urls)))
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))
        self.registry = CollectorRegistry()
        self.phase_seconds = Histogram(
            "kvserve:router_phase_seconds",
            "per-request time in each phase: reserve (decode engine allocates), prefill "
            "(prefill engine computes and sends the KV), transfer (decode engine waits for the "
            "rest of the KV and admits), decode (first to last token)",
            ["phase"], registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.requests = Counter("kvserve:router_requests", "requests by outcome", ["outcome"],
                                registry=self.registry)

    def mark_down(self, url: str) -> None:
        self.down[url] = time.monotonic()

    def _next_decode(self) -> str:
        """The next decode engine in turn that is not down; one found down is tried again
        after ``RETRY_DOWN_S``."""
        now = time.monotonic()
        for _ in self.decode_urls:
            url = self.decode_urls[next(self._decode_turn)]
            if now - self.down.get(url, -RETRY_DOWN_S) >= RETRY_DOWN_S:
                return url
        raise RouterError(503, f"no decode engine is up (down: {sorted(self.down)})")

    async def start(self, prompt_ids: list[int], sampling: dict) -> tuple[str, dict, int]:
        """Reserve on a decode engine and prefill; returns (decode url, plan, first token)."""
        decode = self._next_decode()
        started = time.perf_counter()
        try:
            reply = await self.client.post(f"{decode}/kv/reserve",
                                           json={"prompt_token_ids": prompt_ids,
                                                 "sampling": sampling})
        except httpx.TransportError as error:
            self.mark_down(decode)
            raise RouterError(502, f"decode engine {decode} is unreachable: {error}") from error
        if reply.status_code != 200:
            raise RouterError(400, error_message(reply))
        self.down.pop(decode, None)
        plan = reply.json()
        reserved = time.perf_counter()
        self.phase_seconds.labels("reserve").observe(reserved - started)
        prefill = self.prefill_urls[next(self._prefill_turn)]
        try:
            done = await self.client.post(f"{prefill}/kv/prefill",
                                          json={**plan, "prompt_token_ids": prompt_ids,
                                                "sampling": sampling})
            failed = None if done.status_code == 200 else error_message(done)
        except httpx.TransportError as error:
            failed = f"prefill engine {prefill} is unreachable: {error}"
        if failed is not None:
            try:
                await self.client.post(f"{decode}/kv/cancel",
                                       json={"transfer_id": plan["transfer_id"]})
            except httpx.TransportError:
                self.mark_down(decode)
                failed += f"; decode engine {decode} is unreachable"
            raise RouterError(502, failed)
        self.phase_seconds.labels("prefill").observe(time.perf_counter() - reserved)
        return decode, plan, int(done.json()["first_token_id"])

    async def tokens(self, decode: str, plan: dict, first_token: int) -> AsyncIterator[dict]:
        """The decode engine's JSON lines for the request."""
        body = {"transfer_id": plan["transfer_id"], "first_token_id": first_token}
        asked = time.perf_counter()
        first_line_at = None
        try:
            async with self.client.stream("POST", f"{decode}/kv/continue", json=body) as reply:
                if reply.status_code != 200:
                    await reply.aread()
                    raise RouterError(502, error_message(reply))
                async for line in reply.aiter_lines():
                    if line:
                        if first_line_at is None:
                            first_line_at = time.perf_counter()
                            self.phase_seconds.labels("transfer").observe(first_line_at - asked)
                        yield json.loads(line)
            if first_line_at is not None:
                self.phase_seconds.labels("decode").observe(time.perf_counter() - first_line_at)
        except httpx.TransportError as error:
            self.mark_down(decode)
            raise RouterError(502, f"decode engine {decode} failed mid-request: {error}") from error


def build_router_app(router: Router, tokenizer: Tokenizer, model_name: str) -> FastAPI:
    app = FastAPI(title="kvserve router")
    install_error_handlers(app)  # a malformed body is a 400 in OpenAI's error shape

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "decode_down": sorted(router.down)})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(router.registry).decode())

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model"}]})

    @app.post("/v1/completions")
    async def completions(body: dict[str, Any]) -> Any:
        parsed = check_like_a_server(body, chat=False)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompt_ids = tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompt_ids = prompt
        else:
            return _error(400, "prompt must be a string or a non-empty list of token ids")
        return await respond(body, parsed, prompt_ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: dict[str, Any]) -> Any:
        parsed = check_like_a_server(body, chat=True)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "messages must be a non-empty list")
        try:
            prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except (ValueError, TypeError, KeyError, jinja2.TemplateError) as error:
            return _error(400, f"messages: {error}")
        return await respond(body, parsed, prompt_ids, chat=True)

    async def respond(
        body: dict[str, Any], parsed: SamplingRequest, prompt_ids: list[int], chat: bool
    ) -> Any:
        sampling = {k: body[k] for k in SAMPLING_KEYS if body.get(k) is not None}
        if parsed.logit_bias:  # token ids as keys, each bias clamped as the server does
            sampling["logit_bias"] = [[int(t), b] for t, b in parsed.logit_bias.items()]
        if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
            sampling["max_tokens"] = body["max_completion_tokens"]
        sampling.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
        try:
            decode, plan, first = await router.start(prompt_ids, sampling)
        except RouterError as error:
            router.requests.labels("error").inc()
            return _error(error.status, str(error))
        response_id = new_id("chatcmpl" if chat else "cmpl")
        lines = router.tokens(decode, plan, first)
        if body.get("stream"):
            return StreamingResponse(_sse(lines, response_id, model_name, chat),
                                     media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
        text, token_ids, finish_reason = "", [], None
        try:
            async for line in lines:
                text += line["text"]
                token_ids += line["token_ids"]
                finish_reason = line["finish_reason"] or finish_reason
        except RouterError as error:
            router.requests.labels("error").inc()
            return _error(error.status, str(error))
        router.requests.labels("ok").inc()
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason,
                      "logprobs": None, "token_ids": token_ids}
        return JSONResponse({
            "id": response_id, "object": "chat.completion" if chat else "text_completion",
            "created": unix_time(), "model": model_name, "choices": [choice],
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(token_ids),
                      "total_tokens": len(prompt_ids) + len(token_ids)},
        })

    return app


def check_like_a_server(body: dict[str, Any], chat: bool) -> SamplingRequest:
    """The colocated server's validation of the body: the same 400s, with the same messages,
    for invalid fields and for fields kvserve does not honour yet."""
    model = ChatCompletionRequest if chat else CompletionRequest
    try:
        parsed = model.model_validate(body)
    except ValidationError as error:
        raise from_validation_error(error) from None
    refuse_unsupported(parsed)
    for field in ("response_format", "structured_outputs", "tool_choice"):
        value = getattr(parsed, field, None)
        if value is not None and value not in ("none", "auto") and not (
                field == "response_format" and value.get("type") == "text"):
            raise invalid_request(f"{field} is not supported through the router yet (the prefill "
                                  "engine samples the first token without the grammar)",
                                  param=field)
    if isinstance(parsed, ChatCompletionRequest) and parsed.parses_tool_calls:
        raise invalid_request("tools with tool_choice auto (the default with tools) are not "
                              "supported through the router yet (its replies are not parsed "
                              "for tool calls): give tool_choice none", param="tool_choice")
    return parsed


async def _sse(
    lines: AsyncIterator[dict], response_id: str, model: str, chat: bool
) -> AsyncIterator[bytes]:
    try:
        async for line in lines:
            if chat:
                choice = {"index": 0, "delta": {"content": line["text"]},
                          "finish_reason": line["finish_reason"], "logprobs": None}
            else:
                choice = {"index": 0, "text": line["text"],
                          "finish_reason": line["finish_reason"], "logprobs": None}
            chunk = {"id": response_id, "model": model, "created": unix_time(),
                     "object": "chat.completion.chunk" if chat else "text_completion",
                     "choices": [choice]}
            yield sse.event(chunk)
    except RouterError as error:
        yield sse.event({"error": {"message": str(error), "code": error.status}})
    yield sse.DONE


def _error(status: int, message: str) -> JSONResponse:
    kind = "invalid_request_error" if status == 400 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}},
                        status_code=status)
