"""What the chat and completions endpoints share: the server's context, turning a request into
engine requests (limits, sampling params, ``n`` choices), usage, and the two ways a response
is delivered (whole, or as server-sent events).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from kvserve.core.tenants import DEFAULT_TENANT, TenantConfig
from kvserve.engine.async_engine import EngineDeadError, RequestFailedError
from kvserve.model.tokenizer import Tokenizer
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.server import sse
from kvserve.server.api_keys import DEFAULT_CLIENT, ApiKeys
from kvserve.server.errors import (
    APIError,
    context_length_exceeded,
    engine_failure,
    from_sampling_error,
    internal_error,
    invalid_request,
)
from kvserve.server.input_limits import check_request_tokens
from kvserve.server.limits import ServerLimits
from kvserve.server.protocol import PromptTokensDetails, SamplingRequest, Usage
from kvserve.server.request_log import log_finished
from kvserve.server.serving_engine import ServingEngine
from kvserve.server.streams import ChoiceRequest, ChoiceStreams
from kvserve.structured import check_grammar

logger = logging.getLogger("kvserve.server")

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer
LOGPROB_FLOOR = -9999.0  # JSON has no -inf
Result = TypeVar("Result")


def unix_time() -> int:
    return int(time.time())


@dataclass
class ServerContext:
    """What every endpoint needs: the engine, the tokenizer, the served name, the metrics and
    the tenants (``--tenant-config``; None: every request is the ``default`` tenant's)."""

    engine: ServingEngine
    tokenizer: Tokenizer
    model_name: str
    api_keys: ApiKeys | None = None
    metrics: Any = None  # a ServerMetrics, or None
    limits: ServerLimits = field(default_factory=ServerLimits)
    tenant_config: TenantConfig | None = None
    draining: bool = False  # set on SIGTERM: new requests get 503
    created: int = field(default_factory=unix_time)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                HTTPStatus.NOT_FOUND,
                f"The model {name!r} does not exist; this server serves {self.model_name!r}.",
                param="model",
                code="model_not_found",
            )

    def check_accepting(self) -> None:
        if self.draining:
            raise APIError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "the server is shutting down; retry on another instance",
                type="server_error",
            )

    def tenant_bucket(self, tenant: str | None) -> str:
        """The tenant ``tenant`` counts as in the metrics and the log: a configured name,
        ``default`` or ``other`` (always ``default`` without a tenant config)."""
        if self.tenant_config is None:
            return DEFAULT_TENANT
        return self.tenant_config.bucket(tenant)

    def on_finished(
        self, output: RequestOutput, client_name: str | None = None, tenant: str | None = None
    ) -> None:
        bucket = self.tenant_bucket(tenant)
        if self.metrics is not None:
            self.metrics.observe_finished(output, client_name, bucket)
        log_finished(output, client_name=client_name, tenant=bucket)

    def streams(self, requests: list[ChoiceRequest], request: Request) -> ChoiceStreams:
        """The choices' streams; each finished one is logged and counted under the client
        that ``request``'s API key names (``request.state.client_name``) and its tenant."""
        client_name = getattr(request.state, "client_name", None)
        tenant = requests[0].tenant if requests else None
        return ChoiceStreams(self.engine, requests,
                             lambda output: self.on_finished(output, client_name, tenant),
                             lambda: self.draining)


def tenant_of(request: Request, body: SamplingRequest) -> str | None:
    """Who a request belongs to: its API key's name (``request.state.client_name``), else the
    body's ``user``, else None (the ``default`` tenant). The single ``--api-key`` is named
    ``default``, which names no one: its requests go by ``user`` too. The raw name: the
    scheduler and the metrics bucket it with the tenant config."""
    client_name = getattr(request.state, "client_name", None)
    if client_name is not None and client_name != DEFAULT_CLIENT:
        return client_name
    return body.user or None


@dataclass(frozen=True)
class PromptInput:
    token_ids: list[int]
    text: str | None  # None when the client sent token ids (or chat messages)


async def off_loop(function: Callable[..., Result], *args: Any) -> Result:
    """``function(*args)`` in a worker thread: how prompts are tokenized and chat templates
    rendered, so that a large prompt never stalls the event loop and the other streams (the
    Rust tokenizer releases the GIL while it encodes). Every prompt goes this way: the thread
    adds about 40 us to a small one (measured: encoding a 40-character prompt took 23 us inline
    and 59 us through the thread, its chat template 89 and 144 us), against a request's
    milliseconds in the engine."""
    return await asyncio.to_thread(function, *args)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def choice_requests(
    ctx: ServerContext,
    body: SamplingRequest,
    prompts: Sequence[PromptInput],
    response_id: str,
    prompt_param: str,
    logprobs: int | None,
    max_tokens_param: str = "max_tokens",
    tenant: str | None = None,
) -> list[ChoiceRequest]:
    """``n`` engine requests per prompt of ``tenant`` (``tenant_of``), with the body's
    ``cache_salt``, checked against the model's limits and the server's
    ``max_request_tokens`` first.

    Choice ``j`` of prompt ``i`` is response index ``i * n + j``; with a ``seed`` it samples
    with ``seed + j``, so the choices differ but a repeated request gives the same ones.
    """
    refuse_unsupported(body)
    structured = checked_structured(body)
    requested = getattr(body, max_tokens_param)
    max_tokens_each = [
        _max_tokens(ctx, prompt.token_ids, requested,
                    prompt_param if len(prompts) == 1 else f"{prompt_param}.{i}")
        for i, prompt in enumerate(prompts)
    ]
    check_request_tokens(ctx.limits, max_tokens_each, body.n, requested, max_tokens_param)
    requests = []
    for i, (prompt, max_tokens) in enumerate(zip(prompts, max_tokens_each, strict=True)):
        for j in range(body.n):
            index = i * body.n + j
            requests.append(
                ChoiceRequest(
                    index=index,
                    request_id=f"{response_id}-{index}",
                    prompt_token_ids=prompt.token_ids,
                    prompt=prompt.text,
                    params=sampling_params(body, max_tokens, j, logprobs, max_tokens_param,
                                           structured),
                    tenant=tenant,
                    cache_salt=body.cache_salt,
                )
            )
    try:
        ctx.engine.validate_params(requests[0].params)
    except ValueError as error:
        raise invalid_request(f"logit_bias: {error}", param="logit_bias") from None
    return requests


def refuse_unsupported(body: SamplingRequest) -> None:
    """400 naming the first field the request uses that kvserve does not honour yet."""
    unsupported = body.unsupported_field()
    if unsupported is not None:
        raise invalid_request(
            f"{unsupported} is not supported by this server yet: remove it, or see the README "
            "for what kvserve honours", param=unsupported)


def checked_structured(body: SamplingRequest) -> tuple[str, str] | None:
    """The request's grammar, checked: 400 naming the field and the problem if it is
    malformed or its schema, regex or grammar is invalid."""
    try:
        asked = body.structured()
    except ValueError as error:
        param = getattr(error, "param", None) or (
            "response_format" if body.response_format is not None else "structured_outputs")
        raise invalid_request(f"{param}: {error}", param=param) from None
    if asked is None:
        return None
    param, (kind, spec) = asked
    if body.ignore_eos:
        raise invalid_request(f"{param} cannot be combined with ignore_eos", param=param)
    try:
        check_grammar(kind, spec)
    except ValueError as error:
        raise invalid_request(f"{param}: invalid {kind}: {error}", param=param) from None
    return (kind, spec)


def _max_tokens(
    ctx: ServerContext, prompt_token_ids: list[int], requested: int | None, param: str
) -> int:
    """``requested``, or what is left of the context; 400 if it does not fit (nothing is
    capped silently) or the prompt itself is invalid."""
    num_prompt_tokens = len(prompt_token_ids)
    limit = ctx.max_model_len
    if num_prompt_tokens + max(requested or 0, 1) > limit:
        raise context_length_exceeded(limit, num_prompt_tokens, requested, param)
    try:
        ctx.engine.validate(prompt_token_ids)
    except ValueError as error:
        raise invalid_request(f"{param}: {error}", param=param) from None
    return requested if requested is not None else limit - num_prompt_tokens


def sampling_params(
    body: SamplingRequest,
    max_tokens: int,
    choice: int,
    logprobs: int | None,
    max_tokens_param: str,
    structured: tuple[str, str] | None = None,
) -> SamplingParams:
    stop = body.stop if body.stop is not None else ()
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=-1 if body.top_k is None else body.top_k,
            min_p=0.0 if body.min_p is None else body.min_p,
            seed=None if body.seed is None else body.seed + choice,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            logit_bias=tuple((int(t), b) for t, b in (body.logit_bias or {}).items()),
            structured=structured,
        )
    except ValueError as error:
        raise from_sampling_error(error, max_tokens_param) from None


def usage(prompts: Sequence[PromptInput], outputs: dict[int, RequestOutput], n: int) -> Usage:
    """Each prompt counts once; its cached tokens are the fewest any of its choices found."""
    num_prompt_tokens = sum(len(p.token_ids) for p in prompts)
    num_completion_tokens = sum(len(o.token_ids) for o in outputs.values())
    cached = 0
    for i in range(len(prompts)):
        found = [outputs[i * n + j].num_cached_tokens for j in range(n) if i * n + j in outputs]
        cached += min(found, default=0)
    return Usage(
        prompt_tokens=num_prompt_tokens,
        completion_tokens=num_completion_tokens,
        total_tokens=num_prompt_tokens + num_completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def finish_reason(output: RequestOutput) -> str:
    return "length" if output.finish_reason == "length" else "stop"


def clamp_logprob(value: float) -> float:
    return value if math.isfinite(value) else LOGPROB_FLOOR


async def run_to_completion(request: Request, streams: ChoiceStreams) -> dict[int, RequestOutput]:
    """Every choice's final output; if the client disconnects first, abort them all."""

    async def consume() -> None:
        async for _ in streams:
            pass

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if consumer.done():
            consumer.result()  # raises the engine's failure, if any
            return streams.outputs
        raise APIError(CLIENT_CLOSED_REQUEST, "the client closed the connection")
    finally:
        watcher.cancel()
        consumer.cancel()
        streams.close()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def event_stream(streams: ChoiceStreams, events: AsyncIterator[bytes]) -> StreamingResponse:
    """Send ``events``, then ``data: [DONE]``. A failure after the response has started is
    sent as an error event (OpenAI's shape); a client that goes away aborts every choice
    (Starlette cancels this generator when the connection drops)."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for data in events:
                yield data
        except (RequestFailedError, EngineDeadError) as error:
            yield sse.event(engine_failure(error).body())
        except APIError as error:  # the router's: an engine behind it failed
            yield sse.event(error.body())
        except Exception:
            logger.exception("stream failed")
            yield sse.event(internal_error().body())
        finally:
            streams.close()
        yield sse.DONE

    return StreamingResponse(body(), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)


def json_response(payload: Any) -> Response:
    return Response(payload.model_dump_json(), media_type="application/json")
