"""Hypothesis strategies for request bodies (test_fuzz_bodies.py): well-formed-ish chat and
completion bodies, with the fields OpenAI clients send (roles, tools, response_format, stop,
logit_bias, n, logprobs, stream), unicode, and long or deep values within the fuzz server's
limits (FUZZ_ARGS); and ``mutated``, the same bodies with a wrong type, a field missing or
unknown fields. Sizes are kept small: a body the server accepts runs at most 8 tokens."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

VOCAB_SIZE = 49152  # the embedded model's
MAX_TOKENS = 4


def _nest(depth: int) -> Any:
    """A value nesting ``depth`` arrays and objects."""
    value: Any = 1
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def _json_text(value: Any) -> str:
    return json.dumps(value)


def _named_choice(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}

text = st.text(max_size=40)  # any code point but lone surrogates (hypothesis leaves them out)
long_text = st.text(alphabet="ab \u00e9\U0001f600\n", min_size=500, max_size=3000)
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,9}", fullmatch=True)
# JSON values nested up to 40 deep (the server's --max-json-depth is 64)
deep = st.integers(1, 40).map(_nest)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | text,
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(text, inner, max_size=3), max_leaves=8)


def _optional(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy[dict[str, Any]]:
    """Some of ``fields``: each present or not."""
    return st.fixed_dictionaries({}, optional=fields)


content = st.one_of(text, long_text, st.none(),
                    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}),
                             max_size=3))
tool_call = st.fixed_dictionaries({
    "id": names, "type": st.just("function"),
    "function": st.fixed_dictionaries({"name": names, "arguments": st.one_of(
        text, json_values.map(_json_text), st.just("[" * 2000 + "]" * 2000))})})
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user"]),
                           "content": content}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": content},
                          optional={"tool_calls": st.lists(tool_call, min_size=1, max_size=2)}),
    st.fixed_dictionaries({"role": st.just("tool"), "content": content,
                           "tool_call_id": names}),
)
parameters = st.one_of(
    st.just({"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}),
    st.just({"type": "object"}), st.dictionaries(text, json_values, max_size=3))
tool = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": names}, optional={"description": text, "parameters": parameters})})
response_format = st.one_of(
    st.just({"type": "text"}), st.just({"type": "json_object"}),
    st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries(
        {"name": names, "schema": parameters})}))
token_ids = st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=20)

SAMPLING = {
    "max_tokens": st.one_of(st.integers(1, MAX_TOKENS), st.none(), st.integers(-2, 10**6)),
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 100),
    "min_p": st.floats(0, 1), "seed": st.integers(-(2**63), 2**63 - 17),
    "n": st.integers(1, 2), "stop": st.one_of(text, st.lists(text, max_size=3)),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "logit_bias": st.dictionaries(st.integers(0, VOCAB_SIZE + 10).map(str),
                                  st.floats(-200, 200), max_size=3),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "user": text, "ignore_eos": st.booleans(), "structured_outputs": st.one_of(
        st.fixed_dictionaries({"choice": st.lists(text, max_size=3)}),
        st.fixed_dictionaries({"regex": st.sampled_from(["[ab]+", "(", "a{2,3}"])}),
        st.fixed_dictionaries({"json": parameters})),
    "x_unknown": json_values, "x_deep": deep,
}

chat_bodies = st.builds(
    lambda required, optional: {**required, **optional},
    st.fixed_dictionaries({"messages": st.lists(message, min_size=1, max_size=4),
                           "max_tokens": st.integers(1, MAX_TOKENS)}),
    _optional({**SAMPLING, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 20),
               "tools": st.lists(tool, min_size=1, max_size=2),
               "tool_choice": st.one_of(st.sampled_from(["none", "auto", "required"]),
                                        names.map(_named_choice)),
               "response_format": response_format,
               "max_completion_tokens": st.integers(1, MAX_TOKENS)}),
)

completion_bodies = st.builds(
    lambda required, optional: {**required, **optional},
    st.fixed_dictionaries({
        "prompt": st.one_of(text, long_text, st.lists(text, min_size=1, max_size=3), token_ids,
                            st.lists(token_ids, min_size=1, max_size=2)),
        "max_tokens": st.integers(0, MAX_TOKENS)}),
    _optional({**SAMPLING, "logprobs": st.integers(0, 5), "echo": st.booleans(),
               "prompt_logprobs": st.integers(0, 3)}),
)

wrong_types = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                        st.floats(allow_nan=False), text, st.lists(st.integers(), max_size=2),
                        st.dictionaries(text, st.integers(), max_size=2))


@st.composite
def mutated(draw: st.DrawFn, bodies: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """A body from ``bodies`` with one field of a wrong type, or one field dropped, or
    unknown fields added."""
    body = dict(draw(bodies))
    kind = draw(st.sampled_from(["wrong type", "missing", "unknown"]))
    if kind == "unknown" or not body:
        body.update(draw(st.dictionaries(text, json_values, min_size=1, max_size=3)))
        return body
    key = draw(st.sampled_from(sorted(body)))
    if kind == "missing":
        del body[key]
    else:
        body[key] = draw(wrong_types)
    return body

