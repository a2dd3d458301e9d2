"""Grammars checked without a tokenizer: each kind builds, and an invalid one is a ValueError
whose message names the problem (xgrammar's, without its source location)."""

from __future__ import annotations

import json

import pytest

from kvserve.structured import build_grammar, check_grammar


@pytest.mark.parametrize(("kind", "spec"), [
    ("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})),
    ("json_object", ""),
    ("regex", "[0-9]{3}-[a-z]+"),
    ("choice", json.dumps(["yes", "no", "maybe (a.k.a. 50/50)"])),
    ("grammar", 'root ::= "a" | "b"'),
])
def test_each_kind_builds(kind: str, spec: str) -> None:
    assert "root ::=" in str(build_grammar(kind, spec))


@pytest.mark.parametrize(("kind", "spec", "words"), [
    ("json_schema", '{"type": "objekt"}', 'Unsupported type "objekt"'),
    ("json_schema", "{not json", "Failed to parse JSON"),
    ("regex", "([a-", "Unclosed"),
    ("choice", "[]", "non-empty list"),
    ("choice", '["a", 3]', "non-empty strings"),
    ("grammar", "root ::= ", "EBNF parser error"),
    ("xml", "", "unknown grammar kind"),
])
def test_invalid_grammars_name_the_problem(kind: str, spec: str, words: str) -> None:
    with pytest.raises(ValueError, match=words) as raised:
        check_grammar(kind, spec)
    assert "/project/" not in str(raised.value) and ".cc:" not in str(raised.value)
