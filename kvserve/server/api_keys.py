"""The clients' API keys: ``--api-key KEY`` and ``--api-key-file FILE`` (one ``name:key`` a
line), each key with the name that logs and metrics tell its client by.

A file holds one ``name:key`` per line; blank lines and lines starting with ``#`` are skipped,
the key is everything after the first ``:`` (so it may hold colons), and whitespace around
either is dropped. A name is letters, digits, ``_``, ``.`` and ``-`` (it goes on log lines and
into a Prometheus label), at most ``MAX_NAME_CHARS`` long. A malformed line, a repeated name
or a repeated key is a start-up error naming the file and the line; no error ever shows a key.
``--api-key KEY`` is the client named ``default``.

``ApiKeys.match`` compares the offered key with every key, always all of them, in constant
time: SHA-256 digests of both sides through ``hmac.compare_digest``, so neither the position
of the matching key nor the offered key's length shows in the time taken.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CLIENT = "default"  # the name of the single --api-key
NO_CLIENT = "none"  # the metrics' label of requests to a server without keys
MAX_NAME_CHARS = 64
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class ApiKeys:
    """Client names and the SHA-256 digests of their keys; build it with ``from_flags``."""

    digests: tuple[tuple[str, bytes], ...]  # (client name, sha256 of its key)

    def __post_init__(self) -> None:
        if not self.digests:
            raise ValueError("ApiKeys needs at least one key (--api-key or --api-key-file)")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.digests)

    def match(self, given: str) -> str | None:
        """The name of the client whose key is ``given``, or None. Every key is compared, in
        constant time, whichever matches: the time does not tell which one did."""
        offered = _digest(given)
        found = None
        for name, digest in self.digests:
            if hmac.compare_digest(offered, digest):
                found = name
        return found

    @classmethod
    def from_flags(cls, api_key: str | None, api_key_file: str | None) -> ApiKeys | None:
        """The keys of ``--api-key`` (named ``default``) and ``--api-key-file``; None when
        neither is given. ValueError naming the flag, the file and the line when one is
        malformed or repeats a name or a key."""
        entries: list[tuple[str, str, str]] = []  # (name, key, where it came from)
        if api_key is not None:
            if not api_key:
                raise ValueError("--api-key is empty: give a key, or leave the flag out")
            entries.append((DEFAULT_CLIENT, api_key, "--api-key"))
        if api_key_file is not None:
            entries += read_api_key_file(api_key_file)
        if not entries:
            return None
        _check_unique(entries)
        return cls(tuple((name, _digest(key)) for name, key, _ in entries))


def read_api_key_file(path: str) -> list[tuple[str, str, str]]:
    """``(name, key, "--api-key-file FILE:LINE")`` of every key in ``--api-key-file FILE``."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ValueError(f"--api-key-file {path}: cannot read it ({error.strerror})") from None
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"--api-key-file {path}:{number}"
        name, colon, key = (part.strip() for part in line.partition(":"))
        if not colon or not name or not key:
            raise ValueError(f"{where}: expected 'name:key' (a client name, a "
                             "colon, its key), or a blank line, or a '#' comment")
        if not _NAME.fullmatch(name) or len(name) > MAX_NAME_CHARS:
            raise ValueError(f"{where}: the name {name!r} must be 1 to "
                             f"{MAX_NAME_CHARS} letters, digits, '_', '.' or '-'")
        if name == NO_CLIENT:
            raise ValueError(f"{where}: the name {NO_CLIENT!r} is reserved (it "
                             "labels requests made without a key); choose another")
        entries.append((name, key, where))
    if not entries:
        raise ValueError(f"--api-key-file {path}: it holds no 'name:key' line; add one, or "
                         "leave the flag out to serve without keys")
    return entries


def _check_unique(entries: list[tuple[str, str, str]]) -> None:
    """ValueError at the second use of a name or a key (a key must tell one client)."""
    names: dict[str, str] = {}
    keys: dict[str, str] = {}
    for name, key, where in entries:
        if name in names:
            raise ValueError(f"{where}: the client name {name!r} is already used at "
                             f"{names[name]}; give each client its own name")
        if key in keys:
            raise ValueError(f"{where}: the key of {name!r} is the same as the key at "
                             f"{keys[key]}; give each client its own key")
        names[name] = where
        keys[key] = where
