"""Request and response bodies of the OpenAI API, as pydantic models with OpenAI's field names.

Requests accept and ignore fields they do not know (OpenAI clients send extras), but a known
field with an invalid value is an error that names the field and its limit. ``top_k``,
``min_p``, ``ignore_eos`` and ``cache_salt`` are extensions (as in vLLM). A field kvserve
knows but does not honour yet (``best_of``, ``functions``...) is refused by name
(``unsupported_field``), never silently ignored.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from kvserve.server.tools import tool_schema

MAX_N = 16  # most choices per prompt
MAX_TOP_LOGPROBS = 20  # as SamplingParams allows
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_LOGIT_BIAS = 100.0  # OpenAI's range; larger biases are clamped to it
MAX_CACHE_SALT_CHARS = 256  # a salt is an opaque tag, not a payload


class FieldError(ValueError):
    """A ValueError about one request field, named by ``param``."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class TextPart(_Request):
    type: Literal["text"]
    text: str


def _check_content(value: Any) -> Any:
    """One clear error for content that is neither a string nor a list of text parts."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(
                    f"has a part of type {kind!r}; only text parts "
                    '({"type": "text", "text": "..."}) are supported'
                )
        return value
    raise ValueError('must be a string or a list of {"type": "text", "text": "..."} parts')


class FunctionCall(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    """One message; ``developer`` is OpenAI's newer name for ``system``. An assistant message
    may hold ``tool_calls`` (and no content); a ``tool`` message answers one by its id."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str | list[TextPart] | None, BeforeValidator(_check_content)]
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def to_template(self) -> dict[str, Any]:
        """The message as the tokenizer's chat template takes it."""
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": self.content}
        if isinstance(self.content, list):
            out["content"] = [part.model_dump() for part in self.content]
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": c.type, "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _arguments(text: str) -> Any:
    """A call's arguments as templates take them: the parsed object (the text if not JSON,
    or if it nests too deep for the parser: the body's depth limit does not see inside
    strings)."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text


class ToolFunction(_Request):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Request):
    type: Literal["function"]
    function: ToolFunction


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class SamplingRequest(_Request):
    """The fields chat and completions share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX - MAX_N)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # the tenant, for a request without an API key's name
    # vLLM's extension: requests with different salts never share prefix-cache blocks
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)
    top_k: int | None = Field(None, le=INT64_MAX)  # extension: -1 or 0 disables
    min_p: float | None = None  # extension
    ignore_eos: bool = False  # extension
    honours_tools: ClassVar[bool] = False  # chat does (a forced call), completions not
    honours_prompt_logprobs: ClassVar[bool] = False  # completions do, chat not (yet)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias
    # Known but not honoured yet: a request that uses one is refused (unsupported_field).
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    best_of: int | None = None
    prompt_logprobs: int | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_as_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        """Keys must be token ids; values are clamped to [-100, 100] (as OpenAI's range)."""
        if value is None:
            return None
        out = {}
        for key, bias in value.items():
            if not key.strip().isdigit():
                raise ValueError(f"keys must be token ids (non-negative integers), got {key!r}")
            out[str(int(key))] = max(-MAX_LOGIT_BIAS, min(MAX_LOGIT_BIAS, bias))
        return out

    def structured(self) -> tuple[str, tuple[str, str]] | None:
        """``(field, (kind, spec))`` of the grammar this request asks for, if any: OpenAI's
        ``response_format`` (``json_schema``, ``json_object``), or vLLM's ``structured_outputs``
        (``json``, ``json_object``, ``regex``, ``choice``, ``grammar``). ValueError for a
        malformed one (checked in the front end, with ``kvserve.structured.check_grammar``)."""
        asked = []
        if self.response_format is not None and self.response_format.get("type") != "text":
            asked.append(("response_format", _response_format(self.response_format)))
        if self.structured_outputs is not None:
            asked.append(("structured_outputs", _structured_outputs(self.structured_outputs)))
        if len(asked) > 1:
            raise ValueError("give response_format or structured_outputs, not both")
        return asked[0] if asked else None

    def unsupported_field(self) -> str | None:
        """The first field this request uses that kvserve does not honour, if any."""
        if not self.honours_tools:
            if self.tools:
                return "tools"
            if self.tool_choice not in (None, "none"):
                return "tool_choice"
        if self.best_of not in (None, 1):
            return "best_of"
        if self.modalities not in (None, ["text"]):
            return "modalities"
        for name in ("functions", "function_call", "guided_json", "guided_regex",
                     "guided_choice", "guided_grammar", "audio", "prediction"):
            if getattr(self, name) is not None:
                return name
        if self.prompt_logprobs is not None and not self.honours_prompt_logprobs:
            return "prompt_logprobs"
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


def _response_format(value: dict[str, Any]) -> tuple[str, str]:
    kind = value.get("type")
    if kind == "json_object":
        return ("json_object", "")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError('json_schema must be {"name": ..., "schema": {...}}')
        return ("json_schema", json.dumps(spec["schema"]))
    raise ValueError(f"type must be text, json_object or json_schema, got {kind!r}")


_STRUCTURED_KEYS = {"json": "json_schema", "json_object": "json_object", "regex": "regex",
                    "choice": "choice", "grammar": "grammar"}


def _structured_outputs(value: Any) -> tuple[str, str]:
    keys = [k for k in _STRUCTURED_KEYS if isinstance(value, dict) and value.get(k) is not None]
    if len(keys) != 1:
        raise ValueError(f"must be an object with exactly one of {sorted(_STRUCTURED_KEYS)}")
    key, spec = keys[0], value[keys[0]]
    if key == "json":
        spec = spec if isinstance(spec, str) else json.dumps(spec)
    elif key == "json_object":
        spec = ""
    elif key == "choice":
        spec = json.dumps(spec)
    elif not isinstance(spec, str):
        raise ValueError(f"{key} must be a string")
    return (_STRUCTURED_KEYS[key], spec)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None  # type: ignore[assignment]
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    honours_tools: ClassVar[bool] = True

    @property
    def forced_tool_choice(self) -> Any:
        """``required`` or the named choice (as a dict) when a call is forced, else None."""
        if not self.tools or self.tool_choice in (None, "none", "auto"):
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.model_dump()
        return self.tool_choice

    @property
    def parses_tool_calls(self) -> bool:
        """True for ``tool_choice: "auto"`` (the default when tools are given): the reply is
        free text, and the calls in it are parsed out (``kvserve.server.tool_parser``)."""
        return bool(self.tools) and self.tool_choice in (None, "auto")

    @property
    def tool_names(self) -> set[str]:
        return {tool.function.name for tool in self.tools or []}

    def structured(self) -> tuple[str, tuple[str, str]] | None:
        forced = self.forced_tool_choice
        if forced is None:
            return super().structured()
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise FieldError("response_format", "give tool_choice or response_format, not both")
        if self.structured_outputs is not None:
            raise FieldError("structured_outputs",
                             "give tool_choice or structured_outputs, not both")
        tools = [tool.model_dump() for tool in self.tools or []]
        try:
            schema = tool_schema(tools, forced)
        except ValueError as error:
            raise FieldError("tool_choice", str(error)) from None
        return ("tool_choice", ("json_schema", json.dumps(schema)))

    def unsupported_field(self) -> str | None:
        if self.tool_choice not in (None, "none") and not self.tools:
            return "tool_choice"
        return super().unsupported_field()


def _check_prompt(value: Any) -> Any:
    """Give one clear error for a prompt of the wrong shape (instead of one per union member)."""

    def is_ids(item: Any) -> bool:
        return isinstance(item, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in item
        )

    if isinstance(value, str) or is_ids(value):
        return value
    if isinstance(value, list) and value and (
        all(isinstance(p, str) for p in value) or all(is_ids(p) and p for p in value)
    ):
        return value
    raise ValueError(
        "must be a string, a non-empty list of strings, a list of token ids (integers), or a "
        "non-empty list of lists of token ids"
    )


Prompt = Annotated[str | list[str] | list[int] | list[list[int]], BeforeValidator(_check_prompt)]


class CompletionRequest(SamplingRequest):
    """``echo`` puts the prompt before the completion (text and logprobs); ``max_tokens: 0``
    (with echo only) returns the prompt alone. ``prompt_logprobs`` is vLLM's extension."""

    prompt: Prompt
    max_tokens: int | None = Field(None, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None  # not honoured: refused
    honours_prompt_logprobs: ClassVar[bool] = True

    def unsupported_field(self) -> str | None:
        return "suffix" if self.suffix is not None else super().unsupported_field()


# -- responses -----------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, Any]  # {"role": "assistant", "content": ""}, {"content": ...}, {"tool_calls"}
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """None in ``token_logprobs`` and ``top_logprobs`` only for an echoed prompt's first token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    """vLLM's ``Logprob``: one token's entry in ``prompt_logprobs``."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None  # vLLM's extension


class Completion(BaseModel):
    """A completion, and also each chunk of a streamed one (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvserve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
