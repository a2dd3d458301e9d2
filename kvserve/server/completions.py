"""``POST /v1/completions``: one or several prompts (text or token ids), ``n`` choices each,
whole or streamed. Choice ``j`` of prompt ``i`` has index ``i * n + j``, as in OpenAI's API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from kvserve.outputs import TokenLogprob
from kvserve.server import sse
from kvserve.server.errors import invalid_request
from kvserve.server.protocol import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Usage,
)
from kvserve.server.serving import (
    PromptInput,
    ServerContext,
    choice_requests,
    clamp_logprob,
    event_stream,
    finish_reason,
    json_response,
    new_id,
    off_loop,
    run_to_completion,
    unix_time,
    usage,
)
from kvserve.server.streams import ChoiceStreams


async def create_completion(
    ctx: ServerContext, request: Request, body: CompletionRequest
) -> Response:
    ctx.check_model(body.model)
    if body.echo:
        raise invalid_request("echo is not supported", param="echo")
    prompts = await off_loop(_prompts, ctx, body.prompt)  # tokenized in a worker thread
    response_id = new_id("cmpl")
    requests = choice_requests(ctx, body, prompts, response_id, "prompt", body.logprobs)
    streams = ctx.streams(requests)
    await streams.start()
    if body.stream:
        return event_stream(streams, _chunks(ctx, body, streams, response_id, prompts))
    outputs = await run_to_completion(request, streams)
    choices = [
        CompletionChoice(
            index=index,
            text=output.text,
            logprobs=None if body.logprobs is None else _logprobs(output.logprobs, 0),
            finish_reason=finish_reason(output),
        )
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
    exclude = None if body.include_usage else {"usage"}
    text_offsets: dict[int, int] = {}  # per choice: characters streamed so far

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        payload = Completion(
            id=response_id, created=created, model=ctx.model_name, choices=choices, usage=usage
        )
        return sse.event(payload, exclude=exclude)

    async for index, delta in streams:
        logprobs = None
        if body.logprobs is not None and delta.logprobs:
            logprobs = _logprobs(delta.logprobs, text_offsets.get(index, 0))
            text_offsets[index] = text_offsets.get(index, 0) + sum(
                len(t) for t in logprobs.tokens
            )
        if delta.text or logprobs:
            yield chunk([CompletionChoice(index=index, text=delta.text, logprobs=logprobs)])
        if delta.finished:
            reason = finish_reason(delta.output)
            yield chunk([CompletionChoice(index=index, text="", finish_reason=reason)])
    if body.include_usage:
        yield chunk([], usage=usage(prompts, streams.outputs, body.n))


def _logprobs(logprobs: list[TokenLogprob] | None, text_offset: int) -> CompletionLogprobs:
    """OpenAI's legacy shape: parallel lists of tokens, their logprobs, the top alternatives
    ({token: logprob}) and each token's character offset in the completion text."""
    items = logprobs or []
    offsets = []
    for item in items:
        offsets.append(text_offset)
        text_offset += len(item.token)
    return CompletionLogprobs(
        tokens=[item.token for item in items],
        token_logprobs=[clamp_logprob(item.logprob) for item in items],
        top_logprobs=[
            {text: clamp_logprob(lp) for _, text, lp in item.top_logprobs} for item in items
        ],
        text_offset=offsets,
    )
