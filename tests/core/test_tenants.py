"""Tenant configuration: the file formats, the checks on every field, and the buckets that keep
the tenants told apart bounded."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from kvserve.core.tenants import TenantConfig, TenantPolicy

TOML = """
[tenants.alice]
weight = 2
kv_quota = 0.5
priority = 1
max_queue = 16
isolate_prefix_cache = true

[tenants.bob]
"""


def test_a_toml_file_and_a_json_file_give_the_same_policies(tmp_path: Path) -> None:
    toml = tmp_path / "tenants.toml"
    toml.write_text(TOML)
    json = tmp_path / "tenants.json"
    json.write_text('{"tenants": {"alice": {"weight": 2, "kv_quota": 0.5, "priority": 1, '
                    '"max_queue": 16, "isolate_prefix_cache": true}, "bob": {}}}')
    for path in (toml, json):
        config = TenantConfig.from_file(path)
        assert config.policy("alice") == TenantPolicy("alice", 2, 0.5, 1, 16, True)
        assert config.policy("bob") == TenantPolicy("bob")
        assert config.names == ("alice", "bob", "default", "other")


def test_names_not_configured_count_as_other_and_a_missing_name_as_default() -> None:
    config = TenantConfig((TenantPolicy("alice"),))
    assert config.bucket("alice") == "alice"
    assert config.bucket("mallory") == "other"
    assert config.bucket(None) == config.bucket("") == "default"
    assert config.policy("mallory").name == "other"


def test_other_and_default_can_be_configured_like_any_tenant() -> None:
    config = TenantConfig((TenantPolicy("other", weight=0.5),))
    assert config.policy("someone").weight == 0.5


def test_the_config_survives_pickling_to_the_engine_process() -> None:
    config = TenantConfig((TenantPolicy("alice", kv_quota=0.25),))
    copy = pickle.loads(pickle.dumps(config))
    assert copy.policy("alice").kv_quota == 0.25
    assert copy.bucket("x") == "other"


@pytest.mark.parametrize(("fields", "message"), [
    ({"weight": 0}, "weight must be a number > 0"),
    ({"kv_quota": 1.5}, "kv_quota must be in (0, 1]"),
    ({"kv_quota": 0}, "kv_quota must be in (0, 1]"),
    ({"priority": 1.5}, "priority must be an integer"),
    ({"max_queue": -1}, "max_queue must be an integer >= 0"),
    ({"isolate_prefix_cache": "yes"}, "isolate_prefix_cache must be true or false"),
    ({"quota": 0.5}, "unknown fields ['quota']"),
])
def test_a_bad_field_is_an_error_naming_the_tenant_and_the_field(
    fields: dict, message: str
) -> None:
    with pytest.raises(ValueError, match="tenant 'alice'") as error:
        TenantConfig.from_mapping({"tenants": {"alice": fields}})
    assert message in str(error.value)


def test_a_bad_file_is_an_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read it"):
        TenantConfig.from_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[tenants.alice\n")
    with pytest.raises(ValueError, match=r"bad.toml: not valid"):
        TenantConfig.from_file(bad)
    top = tmp_path / "top.json"
    top.write_text('{"tenant": {}}')
    with pytest.raises(ValueError, match="unknown top-level keys"):
        TenantConfig.from_file(top)
