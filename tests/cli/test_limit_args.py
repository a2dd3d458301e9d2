"""`kvserve serve` has one flag per ServerLimits field, and the flags build the limits."""

from __future__ import annotations

import dataclasses

import pytest

from kvserve.cli.limit_args import limits_from_args
from kvserve.cli.main import build_parser
from kvserve.server.limits import ServerLimits


def test_every_limit_is_a_serve_flag_with_the_fields_default() -> None:
    args = build_parser().parse_args(["serve"])
    assert limits_from_args(args) == ServerLimits()


def test_the_flags_set_the_limits_one_to_one() -> None:
    argv = ["serve"]
    for number, item in enumerate(dataclasses.fields(ServerLimits), start=2):
        argv += ["--" + item.name.replace("_", "-"), str(number)]
    limits = limits_from_args(build_parser().parse_args(argv))
    assert dataclasses.astuple(limits) == tuple(range(2, 2 + len(dataclasses.fields(limits))))


def test_a_bad_value_names_its_flag() -> None:
    args = build_parser().parse_args(["serve", "--max-json-depth", "0"])
    with pytest.raises(ValueError, match="--max-json-depth must be a positive integer, got 0"):
        limits_from_args(args)
