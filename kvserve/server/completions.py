"""``POST /v1/completions``: one or several prompts (text or token ids), ``n`` choices each,
whole or streamed. Choice ``j`` of prompt ``i`` has index ``i * n + j``, as in OpenAI's API.

``echo`` puts each choice's prompt before its completion, in ``text`` and (with ``logprobs``)
in the logprobs lists; streamed, the prompt comes in the choice's first chunk. ``max_tokens: 0``
with ``echo`` (what lm-eval-harness sends to score a prompt) returns the prompt alone: the
engine generates one token, since every request it runs samples at least one, and that token
is dropped here (its text, logprobs and count; ``finish_reason`` is ``length``), as vLLM does.
vLLM's ``prompt_logprobs`` extension adds ``choices[i].prompt_logprobs``; like vLLM, it is
refused in a stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from kvserve.outputs import RequestOutput
from kvserve.server import sse
from kvserve.server.completion_logprobs import (
    LogprobItem,
    completion_items,
    echo_text,
    engine_prompt_logprobs,
    legacy_logprobs,
    prompt_items,
    vllm_prompt_logprobs,
)
from kvserve.server.errors import invalid_request
from kvserve.server.protocol import Completion, CompletionChoice, CompletionRequest, Usage
from kvserve.server.serving import (
    PromptInput,
    ServerContext,
    choice_requests,
    event_stream,
    finish_reason,
    json_response,
    new_id,
    off_loop,
    run_to_completion,
    tenant_of,
    unix_time,
    usage,
)
from kvserve.server.streams import ChoiceRequest, ChoiceStreams


async def create_completion(
    ctx: ServerContext, request: Request, body: CompletionRequest
) -> Response:
    ctx.check_model(body.model)
    _check_echo_fields(body)
    prompts = await off_loop(_prompts, ctx, body.prompt)  # tokenized in a worker thread
    response_id = new_id("cmpl")
    requests = _engine_requests(ctx, body, prompts, response_id, tenant_of(request, body))
    streams = ctx.streams(requests, request)
    await streams.start()
    if body.stream:
        return event_stream(streams, _chunks(ctx, body, streams, response_id, prompts))
    outputs = _kept(body, await run_to_completion(request, streams))
    choices = [
        _choice(ctx, body, index, prompts[index // body.n], output)
        for index, output in sorted(outputs.items())
    ]
    completion = Completion(
        id=response_id,
        created=unix_time(),
        model=ctx.model_name,
        choices=choices,
        usage=usage(prompts, outputs, body.n),
    )
    return json_response(completion)


def _check_echo_fields(body: CompletionRequest) -> None:
    if body.max_tokens == 0 and not body.echo:
        raise invalid_request("max_tokens 0 asks for no completion, which only makes sense "
                              "with echo: true (the prompt's logprobs); give max_tokens >= 1 "
                              "or set echo", param="max_tokens")
    if body.prompt_logprobs is not None and body.stream:
        raise invalid_request("prompt_logprobs cannot be streamed: remove it or stream: false",
                              param="prompt_logprobs")


def _engine_requests(
    ctx: ServerContext, body: CompletionRequest, prompts: list[PromptInput], response_id: str,
    tenant: str | None,
) -> list[ChoiceRequest]:
    """The engine requests of ``tenant``: one token where ``max_tokens`` is 0, prompt logprobs
    where asked."""
    engine_body = body.model_copy(update={"max_tokens": 1}) if body.max_tokens == 0 else body
    requests = choice_requests(ctx, engine_body, prompts, response_id, "prompt", body.logprobs,
                               tenant=tenant)
    num_prompt = engine_prompt_logprobs(body)
    if num_prompt is not None:
        for item in requests:
            item.params = dataclasses.replace(item.params, prompt_logprobs=num_prompt)
    return requests


def _kept(body: CompletionRequest, outputs: dict[int, RequestOutput]) -> dict[int, RequestOutput]:
    """The outputs as the client sees them: with ``max_tokens: 0``, without the one token."""
    if body.max_tokens != 0:
        return outputs
    return {index: _without_completion(output) for index, output in outputs.items()}


def _without_completion(output: RequestOutput) -> RequestOutput:
    return dataclasses.replace(
        output, text="", token_ids=[], token_times=[], finish_reason="length",
        logprobs=None if output.logprobs is None else [],
    )


def _choice(
    ctx: ServerContext, body: CompletionRequest, index: int, prompt: PromptInput,
    output: RequestOutput,
) -> CompletionChoice:
    echoed = echo_text(ctx.tokenizer, prompt) if body.echo else ""
    logprobs = None
    if body.logprobs is not None:
        items = _prompt_items(ctx, body, prompt, output) + completion_items(output.logprobs)
        logprobs = legacy_logprobs(items, 0)
    return CompletionChoice(
        index=index,
        text=echoed + output.text,
        logprobs=logprobs,
        finish_reason=finish_reason(output),
        prompt_logprobs=None if body.prompt_logprobs is None else vllm_prompt_logprobs(
            output.prompt_logprobs, body.prompt_logprobs),
    )


def _prompt_items(
    ctx: ServerContext, body: CompletionRequest, prompt: PromptInput, output: RequestOutput
) -> list[LogprobItem]:
    """The echoed prompt's legacy logprob items (none without echo or logprobs)."""
    if not body.echo or body.logprobs is None:
        return []
    return prompt_items(ctx.tokenizer, prompt.token_ids, output.prompt_logprobs, body.logprobs)


def _prompts(ctx: ServerContext, prompt: str | list) -> list[PromptInput]:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
    if isinstance(prompt, str):
        return [PromptInput(ctx.tokenizer.encode(prompt), prompt)]
    if prompt and isinstance(prompt[0], str):
        return [PromptInput(ctx.tokenizer.encode(text), text) for text in prompt]
    if prompt and isinstance(prompt[0], list):
        return [PromptInput(list(ids), None) for ids in prompt]
    return [PromptInput(list(prompt), None)]


async def _chunks(
    ctx: ServerContext,
    body: CompletionRequest,
    streams: ChoiceStreams,
    response_id: str,
    prompts: list[PromptInput],
) -> AsyncIterator[bytes]:
    created = unix_time()
    # a chunk's choices never carry prompt_logprobs (refused in a stream), as vLLM's
    exclude: dict = {"choices": {"__all__": {"prompt_logprobs"}}}
    if not body.include_usage:
        exclude["usage"] = True
    text_offsets: dict[int, int] = {}  # per choice: characters streamed so far
    drop = body.max_tokens == 0

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        payload = Completion(
            id=response_id, created=created, model=ctx.model_name, choices=choices, usage=usage
        )
        return sse.event(payload, exclude=exclude)

    async for index, delta in streams:
        first = index not in text_offsets
        text = "" if drop else delta.text
        items = [] if drop else completion_items(delta.logprobs)
        if first and body.echo:  # the prompt, in the choice's first chunk
            prompt = prompts[index // body.n]
            text = echo_text(ctx.tokenizer, prompt) + text
            items = _prompt_items(ctx, body, prompt, delta.output) + items
        logprobs = None
        offset = text_offsets.setdefault(index, 0)
        if body.logprobs is not None and items:
            logprobs = legacy_logprobs(items, offset)
            text_offsets[index] = offset + sum(len(item.token) for item in items)
        if text or logprobs:
            yield chunk([CompletionChoice(index=index, text=text, logprobs=logprobs)])
        if delta.finished:
            reason = "length" if drop else finish_reason(delta.output)
            yield chunk([CompletionChoice(index=index, text="", finish_reason=reason)])
    if body.include_usage:
        yield chunk([], usage=usage(prompts, _kept(body, streams.outputs), body.n))
