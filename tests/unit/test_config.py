"""The configuration model: precedence, sources, paths, masking, validation, factories."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from fastmcp import FastMCP
from fastmcp_guard import AuditLog, ConfigError, FileBackend, Guard, IPPolicy, KeyStore, RateLimit
from fastmcp_guard._util import mask_url
from fastmcp_guard.config import (
    AuditTarget,
    GuardConfig,
    InvalidSettingError,
    KeysTarget,
)


def load(tmp_path: Path, env: dict[str, str] | None = None, **kwargs: Any) -> GuardConfig:
    """Load with an explicit environment and cwd (nothing leaks in from the test process)."""
    return GuardConfig.load(env=env or {}, cwd=tmp_path, **kwargs)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# -- defaults ----------------------------------------------------------------------------


def test_library_defaults_are_the_0_2_behaviour(tmp_path: Path) -> None:
    config = load(tmp_path)
    assert config.profile == "library"
    assert config.keys == KeysTarget("memory")
    assert config.audit == ()  # off
    assert (config.rate, config.global_rate) == (None, None)
    assert (config.allow, config.deny, config.trusted_proxies) == ((), (), ())
    assert (config.log_inputs, config.log_outputs) == (True, True)
    assert (config.url, config.host, config.port, config.transport) == (
        "http://127.0.0.1:8000", "127.0.0.1", 8000, "http")  # fmt: skip
    assert config.admin_key is None
    assert config.config_file is None
    assert {v.source for v in config.views()} == {"default"}


def test_embedded_defaults_are_files_in_the_cwd(tmp_path: Path) -> None:
    config = load(tmp_path, profile="embedded")
    assert config.keys == KeysTarget("sqlite", path=str(tmp_path / "fastmcp-guard-keys.db"))
    assert config.audit == (AuditTarget("jsonl", str(tmp_path / "fastmcp-guard-audit.jsonl")),)
    assert config.source("keys") == config.source("audit") == "default"


def test_unknown_profile_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="profile"):
        load(tmp_path, profile="server")


# -- precedence ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("use_arg", "use_env", "use_file", "expected", "source"),
    [
        (True, True, True, "3/second", "argument --rate"),
        (False, True, True, "2/second", "env FASTMCP_GUARD_RATE"),
        (False, False, True, "1/second", "fastmcp-guard.toml"),
        (False, False, False, None, "default"),
    ],
)
def test_precedence_argument_env_file_default(
    tmp_path: Path, use_arg: bool, use_env: bool, use_file: bool, expected: str | None, source: str
) -> None:
    if use_file:
        write(tmp_path / "fastmcp-guard.toml", 'rate = "1/second"\n')
    env = {"FASTMCP_GUARD_RATE": "2/second"} if use_env else {}
    arguments = {"rate": "3/second"} if use_arg else None
    config = load(tmp_path, env, arguments=arguments, labels={"rate": "argument --rate"})
    assert config.rate == expected
    assert config.source("rate") == source


def test_each_setting_keeps_its_own_source(tmp_path: Path) -> None:
    write(tmp_path / "fastmcp-guard.toml", 'rate = "5/minute"\nallow = ["10.0.0.0/8"]\n')
    config = load(tmp_path, {"FASTMCP_GUARD_GLOBAL_RATE": "100/minute"},
                  arguments={"keys": "sqlite:///k.db"}, labels={"keys": "argument --db"},
                  profile="embedded")  # fmt: skip
    sources = {v.name: v.source for v in config.views()}
    assert sources["keys"] == "argument --db"
    assert sources["global_rate"] == "env FASTMCP_GUARD_GLOBAL_RATE"
    assert sources["rate"] == sources["allow"] == "fastmcp-guard.toml"
    assert sources["audit"] == "default"
    assert config.allow == ("10.0.0.0/8",)


def test_argument_label_defaults_to_the_setting_name(tmp_path: Path) -> None:
    config = load(tmp_path, arguments={"port": 9001, "host": None})
    assert config.port == 9001 and config.source("port") == "argument port"
    assert config.source("host") == "default"  # None arguments are ignored


def test_empty_environment_variable_counts_as_unset(tmp_path: Path) -> None:
    write(tmp_path / "fastmcp-guard.toml", 'rate = "1/second"\n')
    config = load(tmp_path, {"FASTMCP_GUARD_RATE": "  "})
    assert config.rate == "1/second" and config.source("rate") == "fastmcp-guard.toml"


def test_off_in_the_environment_overrides_a_file_rate(tmp_path: Path) -> None:
    write(tmp_path / "fastmcp-guard.toml", 'rate = "1/second"\naudit = "a.jsonl"\n')
    config = load(tmp_path, {"FASTMCP_GUARD_RATE": "off", "FASTMCP_GUARD_AUDIT": "none"})
    assert config.rate is None and config.audit == ()
    write(tmp_path / "fastmcp-guard.toml", 'audit = ["off"]\n')
    assert load(tmp_path).audit == ()


def test_os_environ_is_read_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTMCP_GUARD_DENY", "10.0.0.1, 10.0.0.2")
    config = GuardConfig.load(cwd=tmp_path)
    assert config.deny == ("10.0.0.1", "10.0.0.2")
    assert config.source("deny") == "env FASTMCP_GUARD_DENY"


def test_url_follows_host_and_port_unless_set(tmp_path: Path) -> None:
    config = load(tmp_path, {"FASTMCP_GUARD_HOST": "0.0.0.0", "FASTMCP_GUARD_PORT": "9100"})
    assert config.url == "http://127.0.0.1:9100"
    assert config.source("url") == "default (from host and port)"
    config = load(tmp_path, {"FASTMCP_GUARD_PORT": "9100",
                             "FASTMCP_GUARD_URL": "https://guard.example.com/"})  # fmt: skip
    assert config.url == "https://guard.example.com"


# -- config files ------------------------------------------------------------------------


def test_pyproject_table_is_read_when_there_is_no_guard_toml(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml",
          '[project]\nname = "x"\n\n[tool.fastmcp-guard]\nrate = "7/minute"\nlog_inputs = false\n')  # fmt: skip
    config = load(tmp_path)
    assert config.rate == "7/minute" and config.log_inputs is False
    assert config.source("rate") == "pyproject.toml [tool.fastmcp-guard]"
    assert config.config_file == str(tmp_path / "pyproject.toml")


def test_pyproject_without_the_table_is_not_a_config_file(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", '[project]\nname = "x"\n[tool.other]\nrate = 1\n')
    config = load(tmp_path)
    assert config.config_file is None and config.rate is None


def test_guard_toml_wins_over_pyproject(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", '[tool.fastmcp-guard]\nrate = "7/minute"\n')
    write(tmp_path / "fastmcp-guard.toml", 'rate = "8/minute"\n')
    config = load(tmp_path)
    assert config.rate == "8/minute" and config.source("rate") == "fastmcp-guard.toml"


def test_config_file_named_by_env_and_by_argument(tmp_path: Path) -> None:
    write(tmp_path / "fastmcp-guard.toml", 'rate = "1/minute"\n')
    write(tmp_path / "conf" / "a.toml", 'rate = "2/minute"\n')
    write(tmp_path / "conf" / "b.toml", 'rate = "3/minute"\n')
    config = load(tmp_path, {"FASTMCP_GUARD_CONFIG": "conf/a.toml"})
    assert config.rate == "2/minute"
    assert config.source("rate") == str(tmp_path / "conf" / "a.toml")
    assert config.config_file_source == "env FASTMCP_GUARD_CONFIG"
    config = load(tmp_path, {"FASTMCP_GUARD_CONFIG": "conf/a.toml"}, config_file="conf/b.toml")
    assert config.rate == "3/minute" and config.config_file_source == "argument --config"


def test_config_env_off_reads_no_file(tmp_path: Path) -> None:
    write(tmp_path / "fastmcp-guard.toml", 'rate = "1/minute"\n')
    assert load(tmp_path, {"FASTMCP_GUARD_CONFIG": "off"}).rate is None


def test_missing_named_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"nope\.toml \(from env FASTMCP_GUARD_CONFIG\) not found"
    ):
        load(tmp_path, {"FASTMCP_GUARD_CONFIG": "nope.toml"})


def test_unknown_key_in_a_config_file_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "fastmcp-guard.toml", 'rate = "1/minute"\nrat_limit = "2/minute"\n')
    with pytest.raises(ConfigError) as info:
        load(tmp_path)
    assert "'rat_limit'" in str(info.value) and str(path) in str(info.value)


def test_typo_in_pyproject_table_suggests_the_setting(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", '[tool.fastmcp-guard]\nglobal_rat = "1/minute"\n')
    with pytest.raises(ConfigError, match="did you mean 'global_rate'"):
        load(tmp_path)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "fastmcp-guard.toml", "rate = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load(tmp_path)
    assert str(path) in str(info.value)


# -- paths -------------------------------------------------------------------------------


def test_relative_paths_in_a_file_resolve_against_its_directory(tmp_path: Path) -> None:
    write(tmp_path / "conf" / "guard.toml",
          'keys = "sqlite:///data/keys.db"\naudit = "logs/audit.db"\n')  # fmt: skip
    config = load(tmp_path, config_file=tmp_path / "conf" / "guard.toml")
    assert config.keys.path == str(tmp_path / "conf" / "data" / "keys.db")
    assert config.audit == (AuditTarget("sqlite", str(tmp_path / "conf" / "logs" / "audit.db")),)


def test_relative_paths_from_env_and_arguments_resolve_against_the_cwd(tmp_path: Path) -> None:
    write(tmp_path / "conf" / "guard.toml", 'keys = "ignored.db"\n')
    config = load(tmp_path, {"FASTMCP_GUARD_KEYS": "data/keys.db",
                             "FASTMCP_GUARD_CONFIG": "conf/guard.toml"},
                  arguments={"audit": "jsonl:///logs/audit.log"})  # fmt: skip
    assert config.keys == KeysTarget("sqlite", path=str(tmp_path / "data" / "keys.db"))
    assert config.audit == (AuditTarget("jsonl", str(tmp_path / "logs" / "audit.log")),)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("memory://", KeysTarget("memory")),
        ("memory", KeysTarget("memory")),
        ("sqlite:///rel/k.db", "REL"),
        ("sqlite:////abs/k.db", KeysTarget("sqlite", path="/abs/k.db")),
        ("/abs/k.db", KeysTarget("sqlite", path="/abs/k.db")),
        ("k.sqlite", "BARE"),
    ],
)
def test_key_store_urls(tmp_path: Path, url: str, expected: Any) -> None:
    if expected == "REL":
        expected = KeysTarget("sqlite", path=str(tmp_path / "rel" / "k.db"))
    elif expected == "BARE":
        expected = KeysTarget("sqlite", path=str(tmp_path / "k.sqlite"))
    assert load(tmp_path, {"FASTMCP_GUARD_KEYS": url}).keys == expected


@pytest.mark.parametrize(
    ("value", "kind", "name"),
    [
        ("audit.jsonl", "jsonl", "audit.jsonl"),
        ("audit.log", "jsonl", "audit.log"),
        ("audit.db", "sqlite", "audit.db"),
        ("audit.SQLITE3", "sqlite", "audit.SQLITE3"),
        ("sqlite:///audit.data", "sqlite", "audit.data"),
        ("jsonl:///audit.db", "jsonl", "audit.db"),
    ],
)
def test_audit_targets(tmp_path: Path, value: str, kind: str, name: str) -> None:
    assert load(tmp_path, {"FASTMCP_GUARD_AUDIT": value}).audit == (
        AuditTarget(kind, str(tmp_path / name)),  # type: ignore[arg-type]
    )


def test_fleet_urls_are_accepted_by_the_model(tmp_path: Path) -> None:
    for url, backend in (("postgresql://u:pw@db.internal/guard", "postgres"),
                         ("postgres://db/guard", "postgres"),
                         ("redis://cache:6379/0", "redis"), ("rediss://cache/0", "redis")):  # fmt: skip
        target = load(tmp_path, {"FASTMCP_GUARD_KEYS": url}).keys
        assert (target.backend, target.dsn) == (backend, url)


# -- secrets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://u:pw@h/db", "postgresql://u:****@h/db"),
        ("redis://:hunter2@cache:6379/0", "redis://:****@cache:6379/0"),
        ("redis://hunter2@cache:6379/0", "redis://****@cache:6379/0"),
        ("postgresql://h/db?user=u&password=pw", "postgresql://h/db?user=u&password=****"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("sqlite:////abs/k.db", "sqlite:////abs/k.db"),
        ("https://u:pw@siem/in", "https://u:****@siem/in"),
        ("https://tok3n@siem/in", "https://****@siem/in"),  # sent as basic authentication
        ("https://siem/in?api_key=k&tenant=a", "https://siem/in?api_key=****&tenant=a"),
        ("http://127.0.0.1:9/in", "http://127.0.0.1:9/in"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_secrets_are_masked_in_every_output(tmp_path: Path) -> None:
    env = {"FASTMCP_GUARD_KEYS": "postgresql://guard:s3cr3t-pw@db/guard",
           "FASTMCP_GUARD_ADMIN_KEY": "fmg_sk_admin-secret-value"}  # fmt: skip
    config = load(tmp_path, env)
    assert config.admin_key == "fmg_sk_admin-secret-value"  # the value itself is kept
    assert config.keys.dsn == "postgresql://guard:s3cr3t-pw@db/guard"
    shown = [json.dumps(config.to_dict()), repr(config), str(config.keys), repr(config.keys),
             " ".join(v.display for v in config.views())]  # fmt: skip
    for text in shown:
        assert "s3cr3t" not in text and "admin-secret" not in text
    data = config.to_dict()["settings"]
    assert data["admin_key"] == {"value": "****", "source": "env FASTMCP_GUARD_ADMIN_KEY",
                                 "env": "FASTMCP_GUARD_ADMIN_KEY"}  # fmt: skip
    assert data["keys"]["value"] == "postgresql://guard:****@db/guard"


# -- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "setting", "needle"),
    [
        ({"FASTMCP_GUARD_RATE": "10/fortnight"}, "rate", "fortnight"),
        ({"FASTMCP_GUARD_GLOBAL_RATE": "abc"}, "global_rate", '"abc"'),
        ({"FASTMCP_GUARD_ALLOW": "10.0.0.0/8,10.0.0.0/33"}, "allow", "10.0.0.0/33"),
        ({"FASTMCP_GUARD_TRUSTED_PROXIES": "proxy"}, "trusted_proxies", '"proxy"'),
        ({"FASTMCP_GUARD_LOG_INPUTS": "maybe"}, "log_inputs", "'maybe'"),
        ({"FASTMCP_GUARD_PORT": "http"}, "port", "1-65535"),
        ({"FASTMCP_GUARD_PORT": "70000"}, "port", "1-65535"),
        ({"FASTMCP_GUARD_TRANSPORT": "sse"}, "transport", "'sse'"),
        ({"FASTMCP_GUARD_KEYS": "ftp://host/keys"}, "keys", "ftp://"),
        ({"FASTMCP_GUARD_KEYS": "sqlite://host/keys.db"}, "keys", "host part"),
        ({"FASTMCP_GUARD_KEYS": "postgresql://"}, "keys", "no host"),
        ({"FASTMCP_GUARD_AUDIT": "ftp://siem/ingest"}, "audit", "ftp://"),
        ({"FASTMCP_GUARD_URL": "localhost:8000"}, "url", "not an http(s) URL"),
        # several audit targets, HTTP targets and their settings: say what to write
        ({"FASTMCP_GUARD_AUDIT": "a.jsonl,b.jsonl"}, "audit",
         ("two jsonl targets", "at most one of each kind")),
        ({"FASTMCP_GUARD_AUDIT": "http://a/x,https://b/y"}, "audit", ("two http targets",)),
        ({"FASTMCP_GUARD_AUDIT": "otel,OTEL"}, "audit", ("two otel targets",)),
        ({"FASTMCP_GUARD_AUDIT": "a.jsonl,,otel"}, "audit",
         ("target 2 of 3 is empty", "separate targets with single commas")),
        ({"FASTMCP_GUARD_AUDIT": "a.jsonl,"}, "audit", ("target 2 of 2 is empty",)),
        ({"FASTMCP_GUARD_AUDIT": "a.jsonl,kafka://broker/t"}, "audit",
         ("'kafka://'", "http://host/path", "otel")),
        ({"FASTMCP_GUARD_AUDIT": "otel://collector"}, "audit", ("'otel://'", "otel (no URL)")),
        ({"FASTMCP_GUARD_AUDIT": "a.jsonl,off"}, "audit", ("cannot be combined",)),
        ({"FASTMCP_GUARD_AUDIT": "https://u:pw-9@:8443/x"}, "audit",
         ("names no host", "https://u:****@")),
        ({"FASTMCP_GUARD_AUDIT": "http://siem:99999/x"}, "audit", ("Port out of range", "a port 1-65535")),
        ({"FASTMCP_GUARD_AUDIT_HTTP_HEADERS": "Authorization Bearer hdr-9"}, "audit_http_headers",
         ("header 1 has no ':'", "Name: value")),
        ({"FASTMCP_GUARD_AUDIT_HTTP_HEADERS": "A: 1;; Bad Name=hdr-9: 2"}, "audit_http_headers",
         ("the name of header 2",)),
        ({"FASTMCP_GUARD_AUDIT_HTTP_HEADERS": "X-Key:  "}, "audit_http_headers",
         ("'X-Key' has no value",)),
        ({"FASTMCP_GUARD_AUDIT_HTTP_HEADERS": "X-Key: a; x-key: b"}, "audit_http_headers",
         ("given twice",)),
        ({"FASTMCP_GUARD_AUDIT_HTTP_CA_FILE": "missing.pem"}, "audit_http_ca_file",
         ("missing.pem does not exist", "PEM")),
    ],
)  # fmt: skip
def test_bad_env_values_name_the_setting_and_the_source(
    tmp_path: Path, env: dict[str, str], setting: str, needle: str | tuple[str, ...]
) -> None:
    with pytest.raises(InvalidSettingError) as info:
        load(tmp_path, env)
    err = info.value
    assert isinstance(err, ConfigError) and isinstance(err, ValueError)
    assert err.setting == setting
    assert err.source == f"env FASTMCP_GUARD_{setting.upper()}"
    assert f"'{setting}' (from {err.source})" in str(err)
    for text in (needle,) if isinstance(needle, str) else needle:
        assert text in str(err), str(err)
    assert "hdr-9" not in str(err) and "pw-9" not in str(err)  # secrets are never echoed


def test_bad_file_value_names_the_file(tmp_path: Path) -> None:
    write(tmp_path / "fastmcp-guard.toml", 'deny = ["10.0.0.1", "nope"]\n')
    with pytest.raises(InvalidSettingError, match=r"'deny' \(from fastmcp-guard\.toml\)"):
        load(tmp_path)


def test_wrong_toml_types_are_refused(tmp_path: Path) -> None:
    write(tmp_path / "fastmcp-guard.toml", "rate = 100\n")
    with pytest.raises(InvalidSettingError, match="expected a string"):
        load(tmp_path)
    write(tmp_path / "fastmcp-guard.toml", "allow = [1, 2]\n")
    with pytest.raises(InvalidSettingError, match="list of addresses"):
        load(tmp_path)


@pytest.mark.parametrize(("word", "value"), [("1", True), ("YES", True), ("on", True),
                                             ("true", True), ("0", False), ("no", False),
                                             ("Off", False), ("false", False)])  # fmt: skip
def test_booleans(tmp_path: Path, word: str, value: bool) -> None:
    assert load(tmp_path, {"FASTMCP_GUARD_LOG_OUTPUTS": word}).log_outputs is value


def test_lists_from_toml_and_env(tmp_path: Path) -> None:
    write(tmp_path / "fastmcp-guard.toml", 'allow = ["10.0.0.0/8", "::1"]\n')
    config = load(tmp_path, {"FASTMCP_GUARD_TRUSTED_PROXIES": "10.0.0.1,,10.0.0.2 "})
    assert config.allow == ("10.0.0.0/8", "::1")
    assert config.trusted_proxies == ("10.0.0.1", "10.0.0.2")


def test_unknown_argument_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'rate'"):
        load(tmp_path, arguments={"rates": "1/second"})


# -- factories ---------------------------------------------------------------------------


def test_factories_build_the_configured_objects(tmp_path: Path) -> None:
    env = {"FASTMCP_GUARD_KEYS": "sqlite:///keys.db", "FASTMCP_GUARD_AUDIT": "audit.db",
           "FASTMCP_GUARD_RATE": "5/minute", "FASTMCP_GUARD_GLOBAL_RATE": "50/minute",
           "FASTMCP_GUARD_ALLOW": "10.0.0.0/8", "FASTMCP_GUARD_LOG_INPUTS": "no"}  # fmt: skip
    config = load(tmp_path, env)
    store = config.key_store()
    audit = config.audit_log()
    try:
        assert store.backend == "sqlite" and store.path == str(tmp_path / "keys.db")
        assert (tmp_path / "keys.db").exists()
        assert audit is not None and audit.path == str(tmp_path / "audit.db")
        assert audit.writer.kind == "sqlite" and audit.log_inputs is False
    finally:
        store.close()
        if audit is not None:
            audit.close()
    limit = config.rate_limit()
    assert (limit.per_key, limit.global_limit) == ("5/minute", "50/minute")
    policy = config.ip_policy()
    assert policy is not None and policy.is_allowed("10.1.2.3") and not policy.is_allowed("8.8.8.8")


def test_factories_for_library_defaults(tmp_path: Path) -> None:
    config = load(tmp_path)
    store = config.key_store()
    assert store.backend == "memory"
    store.close()
    assert config.audit_log() is None and config.ip_policy() is None
    assert config.rate_limit().per_key is None
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("scheme", ["postgresql", "redis"])
def test_a_fleet_url_builds_that_store(tmp_path: Path, scheme: str) -> None:
    from fastmcp.utilities.tests import find_available_port
    from fastmcp_guard.errors import StoreError

    port = find_available_port()  # nothing listens there
    config = load(tmp_path, {"FASTMCP_GUARD_KEYS": f"{scheme}://u:hunter2@127.0.0.1:{port}/1"})
    with pytest.raises(StoreError, match=f"cannot connect to {scheme}://u:[*]{{4}}@") as exc:
        config.key_store()
    assert "hunter2" not in str(exc.value)


# -- Guard reads the configuration for what it is not given ------------------------------


def test_guard_with_nothing_configured_uses_library_defaults() -> None:
    guard = Guard(FastMCP("t"))
    assert guard.keys.backend == "memory" and guard.audit is None and guard.ip is None
    assert guard.rate_limit.per_key is None
    assert guard.config is not None and guard.config.profile == "library"
    guard.close()


def test_guard_reads_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "fastmcp-guard.toml", 'audit = "audit.jsonl"\ndeny = ["10.9.9.9"]\n')
    monkeypatch.setenv("FASTMCP_GUARD_KEYS", str(tmp_path / "keys.db"))
    monkeypatch.setenv("FASTMCP_GUARD_RATE", "3/minute")
    guard = Guard(FastMCP("t"))
    try:
        assert guard.keys.path == str(tmp_path / "keys.db")
        assert guard.rate_limit.per_key == "3/minute"
        assert guard.audit is not None and guard.audit.path == str(tmp_path / "audit.jsonl")
        assert guard.ip is not None and not guard.ip.is_allowed("10.9.9.9")
        assert guard.keys.audit is guard.audit  # lifecycle events go to the configured log
    finally:
        guard.close()


def test_explicit_guard_arguments_win_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTMCP_GUARD_KEYS", str(tmp_path / "env-keys.db"))
    monkeypatch.setenv("FASTMCP_GUARD_RATE", "3/minute")
    monkeypatch.setenv("FASTMCP_GUARD_AUDIT", str(tmp_path / "env-audit.jsonl"))
    monkeypatch.setenv("FASTMCP_GUARD_ALLOW", "10.0.0.0/8")
    keys, rate = KeyStore(), RateLimit(per_key="9/minute")
    audit, ip = AuditLog(backend=FileBackend(tmp_path / "mine.jsonl")), IPPolicy()
    guard = Guard(FastMCP("t"), keys=keys, rate_limit=rate, audit=audit, ip=ip)
    try:
        assert (guard.keys, guard.rate_limit, guard.audit, guard.ip) == (keys, rate, audit, ip)
        assert guard.config is None  # nothing was missing: no configuration read
        assert not (tmp_path / "env-keys.db").exists()
        assert not (tmp_path / "env-audit.jsonl").exists()
    finally:
        guard.close()


def test_guard_fails_at_construction_on_a_bad_env_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTMCP_GUARD_RATE", "lots")
    with pytest.raises(InvalidSettingError, match="env FASTMCP_GUARD_RATE"):
        Guard(FastMCP("t"))


def test_guard_takes_a_config(tmp_path: Path) -> None:
    config = load(tmp_path, {"FASTMCP_GUARD_GLOBAL_RATE": "100/minute"}, profile="embedded")
    guard = Guard(FastMCP("t"), config=config)
    try:
        assert guard.rate_limit.global_limit == "100/minute"
        assert guard.keys.path == str(tmp_path / "fastmcp-guard-keys.db")
        assert guard.audit is not None and guard.audit.path == os.fspath(
            tmp_path / "fastmcp-guard-audit.jsonl"
        )
    finally:
        guard.close()


# -- audit log options -------------------------------------------------------------------


def test_audit_options_reach_the_audit_log(tmp_path: Path) -> None:
    write(tmp_path / "fastmcp-guard.toml", 'audit_redact = ["password", "*.token"]\n'
          'audit_rotate_bytes = "2MiB"\naudit_retention = 3\n')  # fmt: skip
    env = {"FASTMCP_GUARD_AUDIT_ON_FAILURE": "fail_closed",
           "FASTMCP_GUARD_AUDIT_ROTATE_DAILY": "yes",
           "FASTMCP_GUARD_AUDIT_CHAIN_KEY": "chain-s3cret",
           "FASTMCP_GUARD_AUDIT_FLUSH_INTERVAL_MS": "50"}  # fmt: skip
    config = load(tmp_path, env, profile="embedded")
    assert config.audit_rotate_bytes == 2 * 2**20 and config.audit_retention == 3
    assert config.audit_redact == ("password", "*.token")
    audit = config.audit_log()
    assert audit is not None
    try:
        assert audit.on_failure == "fail_closed" and audit.fail_closed
        assert audit.redact == ("password", "*.token")
        backend = audit.backend
        assert isinstance(backend, FileBackend)
        assert (backend.rotate_bytes, backend.rotate_daily, backend.retention) == (
            2 * 2**20,
            True,
            3,
        )
        assert backend.chain_key == "chain-s3cret" and backend.flush_interval_ms == 50
    finally:
        audit.close()
    shown = [
        json.dumps(config.to_dict()),
        repr(config),
        " ".join(v.display for v in config.views()),
    ]
    for text in shown:
        assert "chain-s3cret" not in text
    assert config.to_dict()["settings"]["audit_chain_key"]["value"] == "****"


@pytest.mark.parametrize(("text", "size"), [("100MB", 10**8), ("1GiB", 2**30), ("4096", 4096),
                                             ("off", None), ("64 KiB", 64 * 2**10)])  # fmt: skip
def test_audit_rotate_sizes(tmp_path: Path, text: str, size: int | None) -> None:
    assert load(tmp_path, {"FASTMCP_GUARD_AUDIT_ROTATE_BYTES": text}).audit_rotate_bytes == size


@pytest.mark.parametrize(
    ("setting", "value", "needle"),
    [("AUDIT_ROTATE_BYTES", "1.5GB", "100MB"), ("AUDIT_ROTATE_BYTES", "0", "size"),
     ("AUDIT_RETENTION", "-1", "number of files"), ("AUDIT_ON_FAILURE", "retry", "fail_closed"),
     ("AUDIT_REDACT", "a..b", "key path"), ("AUDIT_FLUSH_INTERVAL_MS", "0", "milliseconds")],
)  # fmt: skip
def test_bad_audit_options_name_the_setting(
    tmp_path: Path, setting: str, value: str, needle: str
) -> None:
    with pytest.raises(InvalidSettingError, match=f"FASTMCP_GUARD_{setting}") as info:
        load(tmp_path, {f"FASTMCP_GUARD_{setting}": value})
    assert needle in str(info.value)


# -- several audit targets, HTTP and OpenTelemetry ----------------------------------------

SIEM = "https://ingest:url-pw-7@siem.example/ingest?token=query-tk-8"


def test_several_audit_targets_from_the_environment(tmp_path: Path) -> None:
    config = load(tmp_path, {"FASTMCP_GUARD_AUDIT": f"./audit.jsonl, {SIEM} ,otel"})
    assert config.audit == (
        AuditTarget("jsonl", str(tmp_path / "audit.jsonl")),
        AuditTarget("http", endpoint=SIEM),  # the URL itself is kept whole
        AuditTarget("otel"),
    )
    assert config.source("audit") == "env FASTMCP_GUARD_AUDIT"
    assert config.public_value("audit") == [
        f"jsonl:///{tmp_path / 'audit.jsonl'}",
        "https://ingest:****@siem.example/ingest?token=****",
        "otel",
    ]


def test_audit_targets_from_a_toml_array_and_a_header_table(tmp_path: Path) -> None:
    write(tmp_path / "conf" / "guard.toml", 'audit = ["logs/audit.db", "http://127.0.0.1:9/in"]\n'
          'audit_http_spool = "spool"\naudit_http_secret = "toml-hmac-1"\n'
          '[audit_http_headers]\nAuthorization = "Bearer toml-tk-2"\nX-Tenant = "acme"\n')  # fmt: skip
    config = load(tmp_path, config_file=tmp_path / "conf" / "guard.toml")
    assert config.audit == (
        AuditTarget("sqlite", str(tmp_path / "conf" / "logs" / "audit.db")),
        AuditTarget("http", endpoint="http://127.0.0.1:9/in"),
    )
    assert config.audit_http_spool == str(tmp_path / "conf" / "spool")  # beside the file
    assert config.audit_http_secret == "toml-hmac-1"
    assert config.audit_http_headers == (("Authorization", "Bearer toml-tk-2"),
                                         ("X-Tenant", "acme"))  # fmt: skip
    assert config.source("audit_http_headers") == str(tmp_path / "conf" / "guard.toml")


def test_http_headers_from_the_environment(tmp_path: Path) -> None:
    env = {"FASTMCP_GUARD_AUDIT_HTTP_HEADERS": "Authorization: Bearer a:b ; X-Tenant:acme;"}
    config = load(tmp_path, env)
    assert config.audit_http_headers == (("Authorization", "Bearer a:b"), ("X-Tenant", "acme"))


@pytest.mark.parametrize(
    ("use_arg", "use_env", "expected", "source"),
    [
        (True, True, ("otel",), "argument --audit"),
        (False, True, ("jsonl", "http"), "env FASTMCP_GUARD_AUDIT"),
        (False, False, ("sqlite", "http", "otel"), "fastmcp-guard.toml"),
    ],
)
def test_audit_list_precedence(
    tmp_path: Path, use_arg: bool, use_env: bool, expected: tuple[str, ...], source: str
) -> None:
    write(tmp_path / "fastmcp-guard.toml",
          'audit = ["a.db", "https://siem.example/x", "otel"]\n')  # fmt: skip
    env = {"FASTMCP_GUARD_AUDIT": "a.jsonl,http://127.0.0.1:9/in"} if use_env else {}
    arguments = {"audit": "otel"} if use_arg else None
    config = load(tmp_path, env, arguments=arguments, labels={"audit": "argument --audit"})
    assert tuple(t.kind for t in config.audit) == expected
    assert config.source("audit") == source


def test_http_spool_defaults_to_the_current_directory(tmp_path: Path) -> None:
    for profile in ("library", "embedded"):
        config = load(tmp_path, profile=profile)  # type: ignore[arg-type]
        assert config.audit_http_spool == str(tmp_path / "fastmcp-guard-audit-spool")
        assert config.audit_http_ca_file is None and config.audit_http_headers == ()
    assert config.display("audit_http_ca_file") == "(system trust store)"


def test_audit_log_builds_every_target_with_the_audit_settings(tmp_path: Path) -> None:
    from fastmcp.utilities.tests import find_available_port
    from fastmcp_guard.audit import HttpBackend, OTelBackend

    ca = _ca_bundle(tmp_path)
    url = f"https://127.0.0.1:{find_available_port()}/ingest"  # nothing is sent: no event
    env = {"FASTMCP_GUARD_AUDIT": f"audit.jsonl,{url},otel",
           "FASTMCP_GUARD_AUDIT_HTTP_SECRET": "hmac-s3cret",
           "FASTMCP_GUARD_AUDIT_HTTP_SPOOL": "spool",
           "FASTMCP_GUARD_AUDIT_HTTP_HEADERS": "Authorization: Bearer hdr-s3cret",
           "FASTMCP_GUARD_AUDIT_HTTP_CA_FILE": str(ca),
           "FASTMCP_GUARD_AUDIT_FLUSH_INTERVAL_MS": "40",
           "FASTMCP_GUARD_AUDIT_REDACT": "password",
           "FASTMCP_GUARD_AUDIT_ON_FAILURE": "block"}  # fmt: skip
    audit = load(tmp_path, env).audit_log()
    assert audit is not None
    try:
        file, http, otel = audit.backends
        assert isinstance(file, FileBackend) and file.path == str(tmp_path / "audit.jsonl")
        assert isinstance(http, HttpBackend) and isinstance(otel, OTelBackend)
        assert (http.url, http.secret, http.spool_dir, http.ca_file) == (
            url, "hmac-s3cret", str(tmp_path / "spool"), str(ca))  # fmt: skip
        assert http.headers == {"Authorization": "Bearer hdr-s3cret"}
        assert file.flush_interval_ms == http.flush_interval_ms == 40
        assert audit.backend is file and audit.path == str(tmp_path / "audit.jsonl")
        assert (audit.redact, audit.on_failure) == (("password",), "block")
        assert (tmp_path / "spool").is_dir()
        assert "hdr-s3cret" not in repr(http) and "hmac-s3cret" not in repr(http)
    finally:
        audit.close()


def test_http_only_audit_log_has_no_file(tmp_path: Path) -> None:
    audit = load(tmp_path, {"FASTMCP_GUARD_AUDIT": "http://127.0.0.1:9/x"}).audit_log()
    assert audit is not None
    try:
        assert audit.path == "" and [type(b).__name__ for b in audit.backends] == ["HttpBackend"]
        assert (tmp_path / "fastmcp-guard-audit-spool").is_dir()
    finally:
        audit.close()


def test_http_secrets_are_masked_in_every_output(tmp_path: Path) -> None:
    from tests.cli.test_cli_keys import ok

    env = {"FASTMCP_GUARD_AUDIT": f"audit.jsonl,{SIEM}",
           "FASTMCP_GUARD_AUDIT_HTTP_SECRET": "hmac-s3cret-3",
           "FASTMCP_GUARD_AUDIT_HTTP_HEADERS": "Authorization: Bearer hdr-s3cret-4; "
                                               "X-Api-Key: hdr-s3cret-5"}  # fmt: skip
    config = load(tmp_path, env)
    secrets = ("url-pw-7", "query-tk-8", "hmac-s3cret-3", "hdr-s3cret-4", "hdr-s3cret-5")
    shown = [json.dumps(config.to_dict()), repr(config), str(config), repr(config.audit),
             " ".join(str(t) for t in config.audit),
             " ".join(v.display for v in config.views()),
             ok(tmp_path, "config", env=env).stdout,
             ok(tmp_path, "config", "--json", env=env).stdout]  # fmt: skip
    for text in shown:
        for secret in secrets:
            assert secret not in text, (secret, text)
    settings = config.to_dict()["settings"]
    assert settings["audit_http_secret"]["value"] == "****"
    assert settings["audit_http_headers"]["value"] == {"Authorization": "****",
                                                       "X-Api-Key": "****"}  # fmt: skip
    assert config.display("audit_http_headers") == "Authorization: ****; X-Api-Key: ****"
    assert settings["audit"]["value"][1] == "https://ingest:****@siem.example/ingest?token=****"


@pytest.mark.parametrize(
    ("toml", "setting", "needle"),
    [
        ("audit = []\n", "audit", 'write audit = "off"'),
        ('audit = ["a.jsonl", ""]\n', "audit", "target 2 of 2 is empty"),
        ('audit = ["a.jsonl", 3]\n', "audit", "list of targets"),
        ('audit_http_headers = ["Authorization: x"]\n', "audit_http_headers", "TOML table"),
        ("audit_http_headers = { X-Key = 1 }\n", "audit_http_headers", "'X-Key' has no value"),
        ("audit_http_secret = 12345\n", "audit_http_secret", "expected a string, got int"),
        ('audit_http_ca_file = "junk.pem"\n', "audit_http_ca_file", "holds no PEM certificate"),
    ],
)
def test_bad_audit_http_values_in_a_file_name_the_file(
    tmp_path: Path, toml: str, setting: str, needle: str
) -> None:
    write(tmp_path / "junk.pem", "not a certificate\n")
    write(tmp_path / "fastmcp-guard.toml", toml)
    with pytest.raises(InvalidSettingError) as info:
        load(tmp_path)
    assert (info.value.setting, info.value.source) == (setting, "fastmcp-guard.toml")
    assert needle in str(info.value) and "12345" not in str(info.value)


def _ca_bundle(tmp_path: Path) -> Path:
    """A PEM file holding one self-signed CA certificate."""
    from tests.integration.tls import make_ca

    return make_ca(tmp_path / "ca").cert_path


@pytest.mark.parametrize(
    ("env", "setting", "says"),
    [
        ({"FASTMCP_GUARD_AUDIT": "a.db", "FASTMCP_GUARD_AUDIT_ROTATE_BYTES": "10MB"},
         "audit_rotate_bytes", "no audit target is a JSONL file"),
        ({"FASTMCP_GUARD_AUDIT": "a.jsonl", "FASTMCP_GUARD_AUDIT_HTTP_SECRET": "s3cr3t"},
         "audit_http_secret", "no audit target is an http(s):// endpoint"),
        ({"FASTMCP_GUARD_AUDIT": "a.jsonl,otel", "FASTMCP_GUARD_AUDIT_HTTP_SPOOL": "sp"},
         "audit_http_spool", "no audit target is an http(s):// endpoint"),
        ({"FASTMCP_GUARD_AUDIT": "http://127.0.0.1:9/in", "FASTMCP_GUARD_AUDIT_HTTP_CA_FILE":
          "ca.pem"}, "audit_http_ca_file", "only applies to https://"),
    ],
)  # fmt: skip
def test_a_setting_no_audit_target_uses_is_refused_not_ignored(
    tmp_path: Path, env: dict[str, str], setting: str, says: str
) -> None:
    from tests.integration.tls import make_ca

    make_ca(tmp_path)  # a real CA certificate at tmp_path / "ca.pem"
    with pytest.raises(InvalidSettingError) as err:
        load(tmp_path, env)
    assert err.value.setting == setting and says in str(err.value)
    assert f"env FASTMCP_GUARD_{setting.upper()}" in str(err.value)
    assert "s3cr3t" not in str(err.value)


def test_audit_off_keeps_its_tuning_settings(tmp_path: Path) -> None:
    cfg = load(tmp_path, {"FASTMCP_GUARD_AUDIT": "off", "FASTMCP_GUARD_AUDIT_ROTATE_BYTES": "10MB",
                          "FASTMCP_GUARD_AUDIT_HTTP_SECRET": "x"})  # fmt: skip
    assert cfg.audit == () and cfg.audit_log() is None
