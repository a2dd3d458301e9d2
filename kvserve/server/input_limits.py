"""The counting limits of a request, checked on its decoded JSON before pydantic validates it
(so that 100,000 messages cost a ``len``, not 100,000 models): messages, stop strings, prompts
in a batch and prompt characters. Values of the wrong type are left to validation, which names
them. The completion-token bound needs the prompts' lengths: ``check_request_tokens``.
"""

from __future__ import annotations

from typing import Any

from kvserve.server.limits import ServerLimits, over_limit


def check_chat_limits(data: dict[str, Any], limits: ServerLimits) -> None:
    """400 for too many messages or stop strings, or too much text in the messages."""
    messages = data.get("messages")
    if isinstance(messages, list):
        if len(messages) > limits.max_messages:
            raise over_limit(limits, "max_messages",
                             f"the request has {len(messages)} messages", "messages")
        num_chars = sum(_message_chars(m) for m in messages if isinstance(m, dict))
        _check_prompt_chars(num_chars, limits, "messages", "of text in its messages")
    _check_stop(data.get("stop"), limits)


def check_completion_limits(data: dict[str, Any], limits: ServerLimits) -> None:
    """400 for too many prompts or stop strings, or prompts too long to tokenize."""
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        _check_prompt_chars(len(prompt), limits, "prompt", "in its prompt")
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) > limits.max_prompts:
            raise over_limit(limits, "max_prompts",
                             f"the request has {len(prompt)} prompts", "prompt")
        num_chars = sum(len(p) for p in prompt if isinstance(p, str))
        _check_prompt_chars(num_chars, limits, "prompt", "in its prompts")
    _check_stop(data.get("stop"), limits)


def check_request_tokens(
    limits: ServerLimits, max_tokens: list[int], n: int, requested: int | None, param: str
) -> None:
    """400 when ``n`` choices of prompts allowed ``max_tokens`` each (one number per prompt:
    ``requested``, or the rest of the context when it is None) ask for more completion tokens
    than ``max_request_tokens``."""
    total = n * sum(max_tokens)
    if total <= limits.max_request_tokens:
        return
    each = f"{param}={requested}" if requested is not None else (
        f"the rest of the context ({param} is unset)")
    prompts = f"{len(max_tokens)} prompts" if len(max_tokens) > 1 else "1 prompt"
    raise over_limit(
        limits, "max_request_tokens",
        f"the request asks for up to {total} completion tokens (n={n} x {each}, over {prompts})",
        param, advice=f"lower n or {param}, or send fewer prompts at a time")


def _check_stop(stop: Any, limits: ServerLimits) -> None:
    strings = [stop] if isinstance(stop, str) else stop
    if not isinstance(strings, list):
        return
    if len(strings) > limits.max_stop_strings:
        raise over_limit(limits, "max_stop_strings",
                         f"the request has {len(strings)} stop strings", "stop")
    longest = max((len(s) for s in strings if isinstance(s, str)), default=0)
    if longest > limits.max_stop_chars:
        raise over_limit(limits, "max_stop_chars",
                         f"a stop string is {longest} characters", "stop")


def _check_prompt_chars(num_chars: int, limits: ServerLimits, param: str, where: str) -> None:
    if num_chars > limits.max_prompt_chars:
        raise over_limit(limits, "max_prompt_chars",
                         f"the request has {num_chars} characters {where}", param)


def _message_chars(message: dict[str, Any]) -> int:
    """Characters of a message's content (a string or text parts) and tool-call arguments."""
    content = message.get("content")
    num_chars = len(content) if isinstance(content, str) else 0
    if isinstance(content, list):
        num_chars += sum(len(p["text"]) for p in content
                         if isinstance(p, dict) and isinstance(p.get("text"), str))
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        num_chars += len(arguments) if isinstance(arguments, str) else 0
    return num_chars
