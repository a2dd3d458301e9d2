"""Tenants: who a request belongs to, and each tenant's policy (weight, KV quota, priority,
queue limit, prefix-cache isolation), read from ``--tenant-config`` (TOML or JSON).

A request's tenant is its API key's name, else the request's ``user`` field, else
``default``. Only the tenants the file names (and ``default``) are told apart: every other
name counts as ``other``, so the scheduler's state and the metrics' label values stay bounded
however many names clients send. ``other`` may be configured like any tenant.

The file::

    [tenants.alice]            # JSON: {"tenants": {"alice": {"weight": 2, ...}}}
    weight = 2                 # share of served tokens against the others' weights
    kv_quota = 0.5             # most of the KV pool its running requests hold while others wait
    priority = 1               # breaks ties in fair share: higher goes first
    max_queue = 16             # most of its requests waiting; past it, 429
    isolate_prefix_cache = true  # its cached blocks are its own
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TENANT = "default"
OTHER_TENANT = "other"
_POLICY_FIELDS = ("weight", "kv_quota", "priority", "max_queue", "isolate_prefix_cache")


@dataclass(frozen=True)
class TenantPolicy:
    """How the scheduler treats one tenant's requests."""

    name: str
    weight: float = 1.0
    kv_quota: float = 1.0  # share of the pool, in (0, 1]
    priority: int = 0
    max_queue: int | None = None
    isolate_prefix_cache: bool = False

    def __post_init__(self) -> None:
        where = f"tenant {self.name!r}:"
        if not self.name:
            raise ValueError("a tenant's name must not be empty")
        if not (isinstance(self.weight, int | float) and 0 < self.weight < math.inf):
            raise ValueError(f"{where} weight must be a number > 0, got {self.weight!r}")
        if not (isinstance(self.kv_quota, int | float) and 0 < self.kv_quota <= 1):
            raise ValueError(f"{where} kv_quota must be in (0, 1], got {self.kv_quota!r}")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise ValueError(f"{where} priority must be an integer, got {self.priority!r}")
        if self.max_queue is not None and (
            not isinstance(self.max_queue, int) or self.max_queue < 0
        ):
            raise ValueError(f"{where} max_queue must be an integer >= 0, got {self.max_queue!r}")
        if not isinstance(self.isolate_prefix_cache, bool):
            raise ValueError(f"{where} isolate_prefix_cache must be true or false")

    @property
    def cache_salt(self) -> str | None:
        """What salts this tenant's block hashes: its name when isolated."""
        return f"tenant:{self.name}" if self.isolate_prefix_cache else None


@dataclass(frozen=True)
class TenantConfig:
    """The configured tenants; ``policy`` answers for any name (unknown ones are ``other``)."""

    policies: tuple[TenantPolicy, ...] = ()
    _by_name: dict[str, TenantPolicy] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name = {policy.name: policy for policy in self.policies}
        if len(by_name) != len(self.policies):
            raise ValueError("a tenant is configured twice")
        for name in (DEFAULT_TENANT, OTHER_TENANT):
            by_name.setdefault(name, TenantPolicy(name))
        object.__setattr__(self, "_by_name", by_name)

    @property
    def names(self) -> tuple[str, ...]:
        """Every tenant told apart, ``default`` and ``other`` included: the label values."""
        return tuple(self._by_name)

    def bucket(self, name: str | None) -> str:
        """The tenant a request of ``name`` counts as: itself if configured, else ``other``
        (``default`` when no name was given)."""
        if not name:
            return DEFAULT_TENANT
        return name if name in self._by_name else OTHER_TENANT

    def policy(self, name: str | None) -> TenantPolicy:
        return self._by_name[self.bucket(name)]

    @classmethod
    def from_mapping(cls, data: object, source: str = "tenant config") -> TenantConfig:
        """From ``{"tenants": {name: {field: value}}}``; ValueError naming what is wrong."""
        if not isinstance(data, dict) or not isinstance(data.get("tenants", {}), dict):
            raise ValueError(f"{source}: expected a 'tenants' table of tenant names")
        unknown = set(data) - {"tenants"}
        if unknown:
            raise ValueError(f"{source}: unknown top-level keys {sorted(unknown)}")
        policies = []
        for name, fields in data.get("tenants", {}).items():
            if not isinstance(fields, dict):
                raise ValueError(f"{source}: tenant {name!r} must be a table of fields")
            extra = set(fields) - set(_POLICY_FIELDS)
            if extra:
                raise ValueError(f"{source}: tenant {name!r} has unknown fields {sorted(extra)}; "
                                 f"known: {list(_POLICY_FIELDS)}")
            try:
                policies.append(TenantPolicy(name=str(name), **fields))
            except ValueError as error:
                raise ValueError(f"{source}: {error}") from None
        return cls(tuple(policies))

    @classmethod
    def from_file(cls, path: str | Path) -> TenantConfig:
        """Read a ``.toml`` or ``.json`` file (by its suffix; TOML otherwise)."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as error:
            raise ValueError(f"--tenant-config {path}: cannot read it ({error.strerror})") from None
        try:
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
            raise ValueError(f"--tenant-config {path}: not valid {path.suffix or 'TOML'}: "
                             f"{error}") from None
        return cls.from_mapping(data, f"--tenant-config {path}")
