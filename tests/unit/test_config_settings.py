"""The table of settings in ``fastmcp_guard.config``: every row goes through the same
lookup (argument > environment > config file > profile default), keeps its source, and
shows its defaults the way ``fastmcp-guard config`` always has."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from fastmcp_guard.config import (
    SETTINGS,
    GuardConfig,
    InvalidSettingError,
    known_env_names,
)

#: One valid value per setting, as a string (the form of the environment and of most
#: TOML values), and settings it needs beside it.
SAMPLES: dict[str, tuple[str, dict[str, str]]] = {
    "keys": ("sqlite:///k.db", {}),
    "audit": ("a.jsonl,otel", {}),
    "rate": ("5/minute", {}),
    "global_rate": ("50/minute", {}),
    "rate_backend": ("redis", {}),
    "rate_url": ("redis://:pw@cache:6379/0", {"rate_backend": "redis"}),
    "rate_on_backend_error": ("deny", {}),
    "rate_mode": ("shadow", {}),
    "loop_breaker": ("5/minute", {}),
    "loop_breaker_mode": ("enforce", {}),
    "tool_costs": ("expensive=5", {}),
    "credits_mode": ("shadow", {}),
    "budget_meta": ("false", {}),
    "allow": ("10.0.0.0/8, ::1", {}),
    "deny": ("192.0.2.1", {}),
    "trusted_proxies": ("10.0.0.1", {}),
    "ip_mode": ("shadow", {}),
    "log_inputs": ("no", {}),
    "log_outputs": ("off", {}),
    "audit_redact": ("password,*.token", {}),
    "audit_on_failure": ("block", {}),
    "audit_flush_interval_ms": ("250", {}),
    "audit_rotate_bytes": ("2MiB", {}),
    "audit_rotate_daily": ("yes", {}),
    "audit_retention": ("3", {}),
    "audit_chain_key": ("chain-key", {}),
    "audit_http_secret": ("hmac-key", {}),
    "audit_http_spool": ("spool", {}),
    "audit_http_headers": ("X-Tenant: acme", {}),
    "audit_http_ca_file": ("ca.pem", {}),
    "url": ("https://guard.example.com", {}),
    "admin_key": ("fmg_sk_admin", {}),
    "host": ("0.0.0.0", {}),
    "port": ("9100", {}),
    "transport": ("stdio", {}),
}

#: What ``fastmcp-guard config`` shows for the defaults (``CWD``: the current directory).
LIBRARY_DISPLAY = {
    "keys": "memory://", "audit": "off", "rate": "off", "global_rate": "off",
    "rate_backend": "memory", "rate_url": "off", "rate_on_backend_error": "allow",
    "rate_mode": "enforce", "loop_breaker": "20/minute", "loop_breaker_mode": "shadow",
    "tool_costs": "(none)", "credits_mode": "enforce", "budget_meta": "true",
    "allow": "(none)", "deny": "(none)", "trusted_proxies": "(none)", "ip_mode": "enforce",
    "log_inputs": "true",
    "log_outputs": "true", "audit_redact": "(none)", "audit_on_failure": "drop",
    "audit_flush_interval_ms": "100", "audit_rotate_bytes": "off", "audit_rotate_daily": "false",
    "audit_retention": "off", "audit_chain_key": "(not set)", "audit_http_secret": "(not set)",
    "audit_http_spool": "CWD/fastmcp-guard-audit-spool", "audit_http_headers": "(none)",
    "audit_http_ca_file": "(system trust store)", "url": "http://127.0.0.1:8000",
    "admin_key": "(not set)", "host": "127.0.0.1", "port": "8000", "transport": "http",
}  # fmt: skip
EMBEDDED_DISPLAY = LIBRARY_DISPLAY | {
    "keys": "sqlite:///CWD/fastmcp-guard-keys.db",
    "audit": "jsonl:///CWD/fastmcp-guard-audit.jsonl",
    "audit_rotate_bytes": "100000000",
    "audit_retention": "10",
}


def test_every_setting_has_a_sample() -> None:
    assert list(SAMPLES) == list(SETTINGS)


def test_the_settings_are_the_fields_of_the_model_in_order() -> None:
    fields = [f.name for f in dataclasses.fields(GuardConfig)]
    assert fields[: len(SETTINGS)] == list(SETTINGS)
    assert {"FASTMCP_GUARD_" + name.upper() for name in SETTINGS} <= known_env_names()


@pytest.mark.parametrize("profile", ["library", "embedded"])
def test_defaults_are_shown_as_before(tmp_path: Path, profile: str) -> None:
    config = GuardConfig.load(env={}, cwd=tmp_path, profile=profile)  # type: ignore[arg-type]
    expected = LIBRARY_DISPLAY if profile == "library" else EMBEDDED_DISPLAY
    shown = {v.name: v.display.replace(str(tmp_path), "CWD") for v in config.views()}
    assert shown == expected
    assert {v.source for v in config.views()} == {"default"}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_each_setting_takes_each_layer_and_names_it(tmp_path: Path, name: str) -> None:
    """Argument > environment > file > default, for every setting alike."""
    from tests.integration.tls import make_ca

    make_ca(tmp_path)  # tmp_path / "ca.pem", for audit_http_ca_file
    value, extra = SAMPLES[name]
    toml = "".join(f"{key} = {value!r}\n" for key, value in {name: value, **extra}.items())
    (tmp_path / "fastmcp-guard.toml").write_text(toml.replace("'", '"'), encoding="utf-8")
    env = {"FASTMCP_GUARD_" + key.upper(): text for key, text in {name: value, **extra}.items()}
    variable = "env FASTMCP_GUARD_" + name.upper()

    def load(env: dict[str, str], arguments: dict[str, Any] | None = None) -> GuardConfig:
        return GuardConfig.load(arguments, env=env, cwd=tmp_path)

    layers = [
        (load({}), "fastmcp-guard.toml"),
        (load(env), variable),
        (load(env, {name: value}), f"argument {name}"),
        (load({"FASTMCP_GUARD_CONFIG": "off"} | env), variable),
    ]
    for config, source in layers:
        assert config.source(name) == source
        view = next(v for v in config.views() if v.name == name)
        assert (view.source, view.env) == (source, "FASTMCP_GUARD_" + name.upper())
    assert load({}).display(name) == load(env, {name: value}).display(name)
    if not extra:
        (tmp_path / "fastmcp-guard.toml").unlink()
        assert load({}).source(name).startswith("default")


def test_a_bad_port_in_the_url_does_not_echo_its_password(tmp_path: Path) -> None:
    env = {"FASTMCP_GUARD_URL": "http://admin:url-pw-3@guard.internal:99999"}
    with pytest.raises(InvalidSettingError, match="Port out of range") as info:
        GuardConfig.load(env=env, cwd=tmp_path)
    assert (info.value.setting, info.value.source) == ("url", "env FASTMCP_GUARD_URL")
    assert "url-pw-3" not in str(info.value)
    assert "http://admin:****@guard.internal:99999" in str(info.value)


@pytest.mark.parametrize(
    ("setting", "raw", "says"),
    [
        # TOML gives types the environment cannot; each refusal keeps today's wording.
        ("port", True, "expected a port 1-65535, got True"),
        ("audit_retention", 1.5, "expected a number of files from 0 to 100,000 or off, got 1.5"),
        ("audit_rotate_bytes", 1.5, "expected a string, got 1.5"),
        ("audit_rotate_bytes", " ", "empty value"),
        ("audit_flush_interval_ms", "", "expected milliseconds from 1 to 60000, got ''"),
        ("transport", 3, "expected a string, got 3"),
        ("rate_backend", "Shared",
         "expected 'memory' (limits per process) or 'redis' (shared), got 'Shared'"),
        ("audit_on_failure", "retry", "expected 'drop', 'block' or 'fail_closed', got 'retry'"),
        ("audit_redact", "a.b*", ("'a.b*' is not a key path; write names separated by dots, "
                                  "with * for any one key (password, *.token, "
                                  "headers.authorization)")),
        ("deny", ["10.0.0.1", 2], "expected a list of addresses / CIDRs, got ['10.0.0.1', 2]"),
    ],
)  # fmt: skip
def test_generic_parsers_keep_their_messages(
    tmp_path: Path, setting: str, raw: Any, says: str
) -> None:
    with pytest.raises(InvalidSettingError) as info:
        GuardConfig.load({setting: raw}, env={}, cwd=tmp_path)
    assert str(info.value) == f"bad value for setting {setting!r} (from argument {setting}): {says}"


@pytest.mark.parametrize(
    ("setting", "raw", "value"),
    [
        ("port", 65535, 65535),
        ("audit_retention", "OFF", None),
        ("audit_retention", 0, 0),
        ("audit_rotate_bytes", "o_f f", None),
        ("audit_rotate_bytes", "1_000 kb", 10**6),
        ("audit_rotate_bytes", 2**40, 2**40),
        ("transport", " STDIO ", "stdio"),
        ("allow", ["10.0.0.1", " ::1 "], ("10.0.0.1", "::1")),
    ],
)
def test_generic_parsers_accept(tmp_path: Path, setting: str, raw: Any, value: Any) -> None:
    config = GuardConfig.load({setting: raw}, env={}, cwd=tmp_path)
    assert getattr(config, setting) == value
