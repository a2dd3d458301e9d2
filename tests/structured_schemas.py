"""JSON schemas of the structured-output tests (engine, server, router): a nested object,
an array of enums, bounded numbers, an enum at the top level."""

from __future__ import annotations

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 16},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "address"],
    "additionalProperties": False,
}
SCHEMAS = {
    "nested object": PERSON,
    "array of enums": {"type": "object", "properties": {
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                   "minItems": 1, "maxItems": 4}},
        "required": ["colors"], "additionalProperties": False},
    "bounded numbers": {"type": "object", "properties": {
        "score": {"type": "number", "minimum": -1.5, "maximum": 2.5},
        "count": {"type": "integer", "minimum": 3, "maximum": 7},
        "ok": {"type": "boolean"}},
        "required": ["score", "count", "ok"], "additionalProperties": False},
    "enum at top level": {"enum": ["alpha", "beta", 7, None]},
}
