"""One uvicorn server on several listening sockets, each with an app of its own: ``ByListener``
routes every connection by the local address it arrived on (the ASGI scope's ``server``).

``kvserve serve --role prefill|decode --kv-port N`` binds its public socket and its KV socket
(``bind``) and serves them with ``GracefulServer.run(sockets=...)``: the OpenAI app on the
first, the ``/kv`` app on the second, so neither port answers the other's routes. The first
app also gets the lifespan events (it starts and stops the engine); a connection to an address
no listener has is a 404.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

WILDCARD_ADDRESSES = ("0.0.0.0", "::")
_NOT_FOUND = (b'{"error": {"message": "nothing is served on this address", '
              b'"type": "invalid_request_error", "param": null, "code": null}}')


@dataclass(frozen=True)
class Listener:
    """A listening socket's address as bound (``socket.getsockname()``): ``host`` is a
    concrete address or a wildcard (0.0.0.0, ::), ``port`` the port."""

    host: str
    port: int

    @classmethod
    def of(cls, sock: socket.socket) -> Listener:
        host, port = sock.getsockname()[:2]
        return cls(str(host), int(port))

    def accepts(self, local: tuple[str, int]) -> bool:
        """Whether a connection whose local address is ``local`` came in on this listener (one
        on a wildcard address sees the interface's own address as local)."""
        host, port = local[0], local[1]
        return port == self.port and (host == self.host or self.host in WILDCARD_ADDRESSES)


class ByListener:
    """An ASGI app serving each of ``routes``' apps on its listener: a request goes to the app
    of the listener whose address is the connection's local one (an exact host first, then a
    wildcard of that port). ``routes[0]``'s app gets the lifespan events."""

    def __init__(self, routes: Sequence[tuple[Listener, ASGIApp]]) -> None:
        if not routes:
            raise ValueError("ByListener needs at least one (listener, app)")
        self.routes = list(routes)

    def app_for(self, local: tuple[str, int] | None) -> ASGIApp | None:
        if local is None:
            return None
        exact = [app for listener, app in self.routes
                 if listener.accepts(local) and listener.host == local[0]]
        if exact:
            return exact[0]
        return next((app for listener, app in self.routes if listener.accepts(local)), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.routes[0][1](scope, receive, send)
            return
        app = self.app_for(scope.get("server"))
        if app is None:
            await _not_found(scope, send)
            return
        await app(scope, receive, send)


async def _not_found(scope: Scope, send: Send) -> None:
    if scope["type"] != "http":  # a websocket: refuse the handshake
        await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "http.response.start", "status": 404,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(_NOT_FOUND)).encode())]})
    await send({"type": "http.response.body", "body": _NOT_FOUND})


def bind(host: str, port: int, flags: str) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (a name, an IPv4 or an IPv6 address), as uvicorn
    binds its own (SO_REUSEADDR); ValueError naming ``flags`` if it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise ValueError(f"{flags}: cannot resolve {host} ({error.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise ValueError(f"{flags}: cannot listen on {host}:{port} ({error.strerror})") from None
    return sock
