"""The request-limit flags of ``kvserve serve``: one per ``ServerLimits`` field, generated from
the dataclass (``max_request_bytes`` is ``--max-request-bytes``), so that none is missed and
each refusal can name its flag."""

from __future__ import annotations

import argparse
import dataclasses

from kvserve.server.limits import ServerLimits, flag


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    """One integer flag per ServerLimits field, its default the field's."""
    group = parser.add_argument_group(
        "request limits", "a request past one of them is refused with 400 (413 for the body) "
        "naming the flag")
    for item in dataclasses.fields(ServerLimits):
        group.add_argument(flag(item.name), dest=item.name, type=int, default=item.default,
                           metavar="N", help=item.metadata["help"])


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    """The ServerLimits the flags give; ValueError naming the flag of a bad value."""
    return ServerLimits(**{item.name: getattr(args, item.name)
                           for item in dataclasses.fields(ServerLimits)})
