"""The secret the router and the engines share: ``--kv-secret SECRET`` or ``--kv-secret-file
FILE`` on ``kvserve serve --role prefill|decode`` and on ``kvserve router``.

The router sends it in the ``X-KV-Secret`` header on every ``/kv/*`` call (``Authorization`` is
the clients' API key). An engine with a secret refuses every ``/kv/*`` request without it, or
with another one, with a 401 in OpenAI's error shape naming the header and the flags. The check
compares SHA-256 digests of the offered and the expected secret with ``hmac.compare_digest``:
both sides are 32 bytes whatever was sent, so the time taken does not depend on the offered
secret's length nor on how much of it is right.

An engine with a role and no secret serves its ``/kv`` routes to anyone who can reach its
port, so they may only listen on a loopback address: ``--host`` (or ``--kv-host``, where they
have a listener of their own) anything else is refused at start (``check_role_host``), and on
loopback it warns that the routes are open.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from fastapi import Request

from kvserve.server.errors import APIError

KV_SECRET_HEADER = "X-KV-Secret"
MIN_SECRET_CHARS = 16
_HOW_TO_MAKE_ONE = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


@dataclass(frozen=True)
class KVSecret:
    """A shared secret; ``value`` is what the router sends, ``matches`` what an engine checks."""

    value: str

    def __post_init__(self) -> None:
        if len(self.value) < MIN_SECRET_CHARS:
            raise ValueError(f"the KV secret has {len(self.value)} characters; use at least "
                             f"{MIN_SECRET_CHARS}, e.g. {_HOW_TO_MAKE_ONE}")
        if not (self.value.isascii() and self.value.isprintable()) or self.value != \
                self.value.strip():
            raise ValueError("the KV secret must be printable ASCII without surrounding spaces "
                             f"(it travels in an HTTP header), e.g. {_HOW_TO_MAKE_ONE}")

    def matches(self, given: bytes) -> bool:
        """Whether ``given`` is the secret, in time independent of ``given``'s length and
        content (both sides are hashed to 32 bytes before ``hmac.compare_digest``)."""
        return hmac.compare_digest(_digest(given), _digest(self.value.encode()))

    @property
    def header(self) -> dict[str, str]:
        return {KV_SECRET_HEADER: self.value}


def kv_secret_from_flags(secret: str | None, secret_file: str | None) -> KVSecret | None:
    """The secret of ``--kv-secret`` or ``--kv-secret-file`` (its text, less the trailing
    newline); None if neither is given. ValueError naming the flag if both are, or if the
    file cannot be read, or the secret is too short."""
    if secret is not None and secret_file is not None:
        raise ValueError("give --kv-secret or --kv-secret-file, not both")
    where = "--kv-secret"
    if secret_file is not None:
        where = f"--kv-secret-file {secret_file}"
        try:
            secret = Path(secret_file).read_text().rstrip("\r\n")
        except OSError as error:
            raise ValueError(f"{where}: cannot read it ({error.strerror})") from None
    if secret is None:
        return None
    try:
        return KVSecret(secret)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def kv_secret_check(secret: KVSecret | None) -> Callable[[Request], Awaitable[None]]:
    """A dependency for the ``/kv`` routes: 401 unless the request's ``X-KV-Secret`` is
    ``secret`` (nothing is checked without one: such an engine listens on loopback only)."""

    async def check(request: Request) -> None:
        if secret is None:
            return
        given = request.headers.get(KV_SECRET_HEADER, "").encode("latin-1")
        if not secret.matches(given):
            raise APIError(
                HTTPStatus.UNAUTHORIZED,
                f"missing or wrong KV secret: /kv routes need the header '{KV_SECRET_HEADER}' "
                "with the secret this engine was given (--kv-secret or --kv-secret-file); give "
                "`kvserve router` the same flag",
                param=KV_SECRET_HEADER,
                code="invalid_kv_secret",
            )

    return check


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_role_host(
    role: str, host: str, secret: KVSecret | None, flag: str = "--host"
) -> str | None:
    """The warning an engine with ``role`` logs at start, if any. ValueError if it has no
    secret and ``host``, where its /kv routes listen (given by ``flag``: ``--host``, or
    ``--kv-host`` for a listener of their own), is not a loopback address: the routes would be
    open to anyone."""
    if secret is not None:
        return None
    if not is_loopback(host):
        raise ValueError(
            f"--role {role} without --kv-secret would serve the /kv routes (reserve, prefill, "
            f"continue, cancel) to anyone who reaches {flag} {host}; give the engines and the "
            "router the same --kv-secret or --kv-secret-file, or listen on 127.0.0.1")
    return (f"--role {role} without --kv-secret: the /kv routes take no credential, so this "
            f"engine listens for them on {host} only; give the engines and the router the same "
            "--kv-secret or --kv-secret-file to serve other machines")
