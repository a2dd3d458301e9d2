"""``POST /v1/chat/completions``: the messages go through the model's chat template (as
``LLM.chat`` does), then ``n`` choices are generated, whole or streamed in OpenAI's format:
a first chunk per choice with the assistant role, content deltas, a chunk with the
``finish_reason``, an optional usage chunk with no choices, then ``data: [DONE]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response
from jinja2 import TemplateError

from kvserve.engine.output_processor import StreamDelta
from kvserve.outputs import RequestOutput, TokenLogprob
from kvserve.server import sse
from kvserve.server.errors import invalid_request
from kvserve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatTokenLogprob,
    TopLogprob,
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
    tenant_of,
    unix_time,
    usage,
)
from kvserve.server.streams import ChoiceStreams
from kvserve.server.tool_parser import ParsedText, ToolCallStream, parse_tool_calls
from kvserve.server.tools import calls_as_text, tool_calls


async def create_chat_completion(
    ctx: ServerContext, request: Request, body: ChatCompletionRequest
) -> Response:
    ctx.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise invalid_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    messages = [message.to_template() for message in body.messages]
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    try:  # templating and tokenizing in a worker thread: see serving.off_loop
        prompt_ids = await off_loop(_render, ctx, messages, tools)
    except (ValueError, TemplateError) as error:
        raise invalid_request(f"messages: {error}", param="messages") from None
    prompts = [PromptInput(prompt_ids, None)]
    max_tokens_param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    response_id = new_id("chatcmpl")
    requests = choice_requests(
        ctx, body, prompts, response_id, "messages", logprobs, max_tokens_param,
        tenant_of(request, body),
    )
    streams = ctx.streams(requests, request)
    await streams.start()
    if body.stream:
        return event_stream(streams, _chunks(ctx, body, streams, response_id, prompts))
    outputs = await run_to_completion(request, streams)
    choices = []
    for index, output in sorted(outputs.items()):
        message = _message(body, output.text)
        choices.append(ChatChoice(
            index=index,
            message=message,
            logprobs=_logprobs(output.logprobs) if body.logprobs else None,
            finish_reason=_finish_reason(output, bool(message.tool_calls)),
        ))
    completion = ChatCompletion(
        id=response_id,
        created=unix_time(),
        model=ctx.model_name,
        choices=choices,
        usage=usage(prompts, outputs, body.n),
    )
    return json_response(completion)


async def _chunks(
    ctx: ServerContext,
    body: ChatCompletionRequest,
    streams: ChoiceStreams,
    response_id: str,
    prompts: list[PromptInput],
) -> AsyncIterator[bytes]:
    created = unix_time()
    exclude = None if body.include_usage else {"usage"}

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
        payload = ChatCompletionChunk(
            id=response_id, created=created, model=ctx.model_name, choices=choices, usage=usage
        )
        return sse.event(payload, exclude=exclude)

    for index in range(body.n):
        yield chunk([ChatChunkChoice(index=index, delta={"role": "assistant", "content": ""})])
    forced = body.forced_tool_choice
    parsers = {index: ToolCallStream(body.tool_names) for index in range(body.n)}
    async for index, delta in streams:
        logprobs = _delta_logprobs(delta) if body.logprobs else None
        if forced is not None:  # the call, whole, once its arguments are complete
            if delta.finished:
                message = _message(body, delta.output.text)
                yield chunk([ChatChunkChoice(index=index, delta=_whole_delta(message))])
                reason = _finish_reason(delta.output, bool(message.tool_calls))
                yield chunk([ChatChunkChoice(index=index, delta={}, finish_reason=reason)])
            continue
        parser = parsers[index]
        parsed = _parsed(parser, delta) if body.parses_tool_calls else ParsedText(delta.text)
        if parsed.content or logprobs:
            content = {"content": parsed.content}
            yield chunk([ChatChunkChoice(index=index, delta=content, logprobs=logprobs)])
        if parsed.calls:
            first = parser.num_calls - len(parsed.calls)
            numbered = [{"index": first + i, **call} for i, call in enumerate(parsed.calls)]
            yield chunk([ChatChunkChoice(index=index, delta={"tool_calls": numbered})])
        if delta.finished:
            reason = _finish_reason(delta.output, parser.num_calls > 0)
            yield chunk([ChatChunkChoice(index=index, delta={}, finish_reason=reason)])
    if body.include_usage:
        yield chunk([], usage=usage(prompts, streams.outputs, body.n))


def _parsed(parser: ToolCallStream, delta: StreamDelta) -> ParsedText:
    """The content and calls this delta decides (tool_choice auto); the last delta also
    takes what the parser still held back."""
    parsed = parser.feed(delta.text)
    if not delta.finished:
        return parsed
    rest = parser.finish()
    return ParsedText(parsed.content + rest.content, parsed.calls + rest.calls)


def _render(ctx: ServerContext, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """The prompt's token ids. A template that knows no tool calls (it reads every message's
    content as text) gets an assistant call written as Hermes-style ``<tool_call>`` text."""
    try:
        return ctx.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tools=tools)
    except TemplateError:
        if not any(m.get("tool_calls") and m.get("content") is None for m in messages):
            raise
    as_text = [{**m, "content": calls_as_text(m["tool_calls"])}
               if m.get("tool_calls") and m.get("content") is None else m for m in messages]
    return ctx.tokenizer.apply_chat_template(as_text, add_generation_prompt=True, tools=tools)


def _message(body: ChatCompletionRequest, text: str) -> AssistantMessage:
    """The reply as OpenAI gives it: its text, the call a forced choice made, or (auto) the
    calls parsed out of the text and the text around them."""
    forced = body.forced_tool_choice
    if forced is not None:
        calls = tool_calls(text, forced)
        if calls:
            return AssistantMessage(content=None, tool_calls=calls)
        return AssistantMessage(content=text)
    if body.parses_tool_calls:
        content, calls = parse_tool_calls(text, body.tool_names)
        return AssistantMessage(content=content, tool_calls=calls or None)
    return AssistantMessage(content=text)


def _whole_delta(message: AssistantMessage) -> dict:
    """A forced choice's reply as one delta: its numbered calls, or its text if it made none."""
    if message.tool_calls:
        return {"tool_calls": [{"index": i, **call} for i, call in enumerate(message.tool_calls)]}
    return {"content": message.content}


def _finish_reason(output: RequestOutput, called: bool) -> str:
    reason = finish_reason(output)
    if reason == "stop" and called:
        return "tool_calls"
    return reason


def _delta_logprobs(delta: StreamDelta) -> ChatLogprobs | None:
    return _logprobs(delta.logprobs) if delta.logprobs else None


def _logprobs(logprobs: list[TokenLogprob] | None) -> ChatLogprobs:
    """OpenAI's ``logprobs.content``: each token with its bytes and the top alternatives."""
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=item.token,
                logprob=clamp_logprob(item.logprob),
                bytes=list(item.token.encode()),
                top_logprobs=[
                    TopLogprob(token=text, logprob=clamp_logprob(lp), bytes=list(text.encode()))
                    for _, text, lp in item.top_logprobs
                ],
            )
            for item in logprobs or []
        ]
    )
