"""Structured outputs' grammars, checked without a tokenizer: what ``SamplingParams.structured``
may hold, and the 400 the front end gives for an invalid one. The engine compiles them for its
vocabulary (``kvserve.worker.grammar``). xgrammar is imported on first use.

A grammar is ``(kind, spec)``: ``json_schema`` (a JSON schema, as JSON text), ``json_object``
(any JSON object; spec ignored), ``regex``, ``choice`` (a JSON list of strings: one of them,
exactly) or ``grammar`` (EBNF, as xgrammar reads it).
"""

from __future__ import annotations

import json
import re
from typing import Any

GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


def xgrammar_module() -> Any:
    import xgrammar

    return xgrammar


def build_grammar(kind: str, spec: str) -> Any:
    """The tokenizer-free xgrammar Grammar of ``(kind, spec)``; ValueError naming the problem
    if it is invalid."""
    if kind not in GRAMMAR_KINDS:
        raise ValueError(f"unknown grammar kind {kind!r}; choose one of {GRAMMAR_KINDS}")
    xgr = xgrammar_module()
    try:
        if kind == "json_schema":  # compact JSON: no runs of whitespace to wander into
            return xgr.Grammar.from_json_schema(spec, any_whitespace=False)
        if kind == "json_object":
            return xgr.Grammar.builtin_json_grammar()
        if kind == "regex":
            return xgr.Grammar.from_regex(spec)
        if kind == "choice":
            choices = json.loads(spec)
            if not (isinstance(choices, list) and choices
                    and all(isinstance(c, str) and c for c in choices)):
                raise ValueError("a choice must be a non-empty list of non-empty strings")
            return xgr.Grammar.from_regex("|".join(re.escape(c) for c in choices))
        return xgr.Grammar.from_ebnf(spec)
    except (RuntimeError, json.JSONDecodeError) as error:
        raise ValueError(_clean(str(error))) from None


def check_grammar(kind: str, spec: str) -> None:
    """Raise ValueError naming the problem if ``(kind, spec)`` is not a valid grammar."""
    build_grammar(kind, spec)


def _clean(message: str) -> str:
    """xgrammar's message without its timestamp and C++ source location."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", message.strip()).strip()
