"""``--kv-host`` and ``--kv-port`` of ``kvserve serve --role prefill|decode``: where an engine's
internal ``/kv`` routes listen (``KVListener``).

Without them the ``/kv`` routes share the public listener (``--host``:``--port``) with the
OpenAI API. With ``--kv-port`` they get a listener of their own, on ``--kv-host`` (default
``--host``): the public port then answers 404 for every ``/kv`` route, and the KV port 404 for
every public one (``cli.listeners.ByListener``). The router is pointed at the KV listener
(``kvserve router --prefill http://KV_HOST:KV_PORT``): it only ever calls ``/kv`` routes.

Without a KV secret the ``/kv`` routes take no credential, so wherever they listen must be a
loopback address (``disagg.kv_secret.check_role_host``); the public listener may then be any
address, its routes being the OpenAI API (``--api-key`` guards them).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvserve.disagg.kv_secret import KVSecret

MAX_PORT = 65535
# addresses that listen on every interface: they overlap any other address of the same port
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def add_kv_listener_args(group: argparse._ActionsContainer) -> None:
    group.add_argument("--kv-host", default=None, metavar="HOST",
                       help="with --role prefill|decode and --kv-port: the address the /kv "
                       "routes listen on (default: --host); without a KV secret it must be a "
                       "loopback address")
    group.add_argument("--kv-port", type=int, default=None, metavar="PORT",
                       help="with --role prefill|decode: serve the /kv routes on this port only "
                       "(the public --port answers 404 for them, and this one 404 for the "
                       "OpenAI routes); point `kvserve router` at it (default: the /kv routes "
                       "share --port)")


def _same_host(host: str, other: str) -> bool:
    return host == other or host in WILDCARD_HOSTS or other in WILDCARD_HOSTS


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass(frozen=True)
class KVListener:
    """Where an engine's ``/kv`` routes listen: on ``kv_host``:``kv_port`` when ``kv_port`` is
    given (``kv_host`` None: ``public_host``), else on the public listener."""

    public_host: str
    public_port: int
    kv_host: str | None = None
    kv_port: int | None = None

    def __post_init__(self) -> None:
        if self.kv_port is None:
            if self.kv_host is not None:
                raise ValueError(f"--kv-host {self.kv_host} needs --kv-port: the /kv routes "
                                 "share the public --host and --port unless they have a port "
                                 "of their own")
            return
        if not 1 <= self.kv_port <= MAX_PORT:
            raise ValueError(f"--kv-port must be in 1..{MAX_PORT}, got {self.kv_port}")
        if self.kv_port == self.public_port and _same_host(self.host, self.public_host):
            raise ValueError(f"--kv-port {self.kv_port} is the public --port on the same host "
                             f"({self.host} and {self.public_host}); give the /kv routes "
                             "another port, or leave --kv-port out to share the public one")

    @property
    def separate(self) -> bool:
        """Whether the /kv routes have a listener of their own."""
        return self.kv_port is not None

    @property
    def host(self) -> str:
        """The address the /kv routes listen on."""
        return self.kv_host if self.kv_host is not None else self.public_host

    @property
    def port(self) -> int:
        """The port the /kv routes listen on."""
        return self.kv_port if self.kv_port is not None else self.public_port

    @property
    def url(self) -> str:
        """The base URL to give ``kvserve router`` for this engine."""
        return f"http://{_url_host(self.host)}:{self.port}"

    def describe(self, secret: KVSecret | None) -> str:
        """The start log's line: where the /kv routes listen and whether they take a secret."""
        where = "their own listener" if self.separate else "the public listener"
        guard = ("each needs the X-KV-Secret header (--kv-secret)" if secret is not None
                 else "no credential (no --kv-secret): loopback only")
        return f"/kv routes on {self.url} ({where}; {guard}); give `kvserve router` this URL"


def _given(args: argparse.Namespace) -> list[str]:
    return [name for name, value in (("--kv-host", args.kv_host), ("--kv-port", args.kv_port))
            if value is not None]


def check_no_kv_listener_for_a_set(args: argparse.Namespace) -> None:
    """ValueError if ``serve --disaggregated`` is given --kv-host or --kv-port: its engines
    serve their /kv routes on their own ports, behind the set's secret."""
    if given := _given(args):
        raise ValueError(f"{' and '.join(given)}: a --disaggregated set serves each engine's "
                         "/kv routes on that engine's port (after --port), behind the set's "
                         "KV secret; to give them ports of their own, start the engines "
                         "(`kvserve serve --role prefill|decode --kv-port N`) and `kvserve "
                         "router` yourself")


def kv_listener_from_args(args: argparse.Namespace) -> KVListener | None:
    """The engine's KVListener, None for a colocated server; ValueError naming the flag when
    --kv-host or --kv-port is given without a KV role, or is out of range."""
    given = _given(args)
    if args.role == "colocated":
        if given:
            raise ValueError(f"{' and '.join(given)}: only an engine with --role prefill|decode "
                             "has /kv routes; leave the flag out, or give --role")
        return None
    return KVListener(args.host, args.port, args.kv_host, args.kv_port)
