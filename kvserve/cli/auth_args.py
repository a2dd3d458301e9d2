"""The credential flags of ``kvserve serve`` and ``kvserve router``: the clients' API keys
(``--api-key``, ``--api-key-file``, see ``server.api_keys``) and the secret between the router
and the engines (``--kv-secret``, ``--kv-secret-file``, see ``disagg.kv_secret``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvserve.disagg.kv_secret import KVSecret
    from kvserve.server.api_keys import ApiKeys


def add_api_key_args(group: argparse._ActionsContainer) -> None:
    group.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every /v1 route (the "
                       "client named 'default' in logs and metrics)")
    group.add_argument("--api-key-file", default=None, metavar="FILE",
                       help="client keys, one 'name:key' a line ('#' comments and blank lines "
                       "skipped): every /v1 route needs one of them, and its name labels the "
                       "request's log line and kvserve:client_requests_total")


def add_kv_secret_args(group: argparse._ActionsContainer, who: str) -> None:
    """``--kv-secret`` and ``--kv-secret-file``; ``who`` says what the secret does here."""
    group.add_argument("--kv-secret", default=None, metavar="SECRET",
                       help=f"the secret shared by the router and the engines, sent as the "
                       f"X-KV-Secret header: {who} (visible in `ps`: prefer --kv-secret-file)")
    group.add_argument("--kv-secret-file", default=None, metavar="FILE",
                       help="a file holding the --kv-secret, on one line (readable only by you)")


def api_keys_from_args(args: argparse.Namespace) -> ApiKeys | None:
    """The keys of ``--api-key`` and ``--api-key-file``; ValueError naming a bad line."""
    from kvserve.server.api_keys import ApiKeys

    return ApiKeys.from_flags(args.api_key, args.api_key_file)


def kv_secret_from_args(args: argparse.Namespace) -> KVSecret | None:
    """The secret of ``--kv-secret`` or ``--kv-secret-file``; ValueError naming the flag."""
    from kvserve.disagg.kv_secret import kv_secret_from_flags

    return kv_secret_from_flags(args.kv_secret, args.kv_secret_file)
