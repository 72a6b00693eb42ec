"""Threat: out-of-range input crashes the tooling (issue 10, finding 13).

``fastmcp-guard keys create --expires 99999999d`` printed a traceback. Every duration,
time and size the CLI and the configuration take now has bounds: out of range is one
line on stderr and exit 2 (CLI), or a ``ConfigError`` naming the setting (configuration,
Python API). The parsers themselves are property-tested in
``tests/property/test_input_bounds.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fastmcp_guard import AuditLog, FileBackend, SQLiteBackend
from fastmcp_guard.audit import HttpBackend
from fastmcp_guard.config import GuardConfig, InvalidSettingError
from fastmcp_guard.errors import ConfigError

from tests.cli.test_cli_keys import cli


def one_line_error(proc: object, *needles: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)  # type: ignore[attr-defined]
    err = proc.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def test_keys_create_with_a_huge_expiry_is_one_line_and_exit_2(tmp_path: Path) -> None:
    for value in ("99999999d", "36501d", "9" * 400, "99999999999w", "1e400"):
        one_line_error(cli(tmp_path, "keys", "create", "--name", "a", "--expires", value),
                       "--expires")  # fmt: skip
    # The bound itself is fine, and nothing was created before.
    proc = cli(tmp_path, "keys", "create", "--name", "a", "--expires", "36500d", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["expires_at"].startswith(("21", "22"))


def test_keys_rotate_with_a_huge_grace_is_one_line_and_exit_2(tmp_path: Path) -> None:
    key = json.loads(cli(tmp_path, "keys", "create", "--name", "a", "--json").stdout)["id"]
    one_line_error(cli(tmp_path, "keys", "rotate", key, "--grace", "99999999999999999"),
                   "--grace", "too long")  # fmt: skip
    assert cli(tmp_path, "keys", "rotate", key, "--grace", "36500d").returncode == 0


def test_audit_times_and_counts_are_bounded(tmp_path: Path) -> None:
    (tmp_path / "fastmcp-guard-audit.jsonl").write_text("")
    for args, needle in (
        (("--since", "99999999999d"), "--since"),
        (("--until", "99999999999999999999h"), "--until"),
        (("--since", "0001-01-01T00:00:00+14:00"), "--since"),
        (("--until", "9999-12-31T23:59:59-14:00"), "--until"),
        (("--limit", "9" * 40), "--limit"),
        (("--limit", "-1"), "--limit"),
    ):
        one_line_error(cli(tmp_path, "audit", "query", *args), needle)
        if args[0] != "--limit":
            one_line_error(cli(tmp_path, "audit", "export", "--out", "x.csv", *args), needle)
    one_line_error(cli(tmp_path, "audit", "tail", "-n", "9" * 40), "--lines")
    # Bad input wins over a missing log: exit 2, not "no audit log" (1).
    (tmp_path / "fastmcp-guard-audit.jsonl").unlink()
    one_line_error(cli(tmp_path, "audit", "query", "--since", "99999999999d"), "--since")
    # In range: fine.
    (tmp_path / "fastmcp-guard-audit.jsonl").write_text("")
    assert cli(tmp_path, "audit", "query", "--since", "36500d", "--limit", "0").returncode == 0


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("audit_rotate_bytes", "99999999999999999999999"),
        ("audit_rotate_bytes", "2TiB"),
        ("audit_rotate_bytes", "0"),
        ("audit_retention", "100001"),
        ("audit_retention", "²"),
        ("audit_flush_interval_ms", "60001"),
        ("audit_flush_interval_ms", "0"),
        ("port", "65536"),
        ("port", "9" * 5000),  # int() would refuse more than 4300 digits
    ],
)
def test_config_values_out_of_range_name_the_setting(
    tmp_path: Path, setting: str, value: str
) -> None:
    env = {f"FASTMCP_GUARD_{setting.upper()}": value}
    with pytest.raises(InvalidSettingError, match=f"setting {setting!r}") as info:
        GuardConfig.load(profile="embedded", env=env, cwd=tmp_path)
    assert info.value.setting == setting
    if len(value) < 100:
        one_line_error(cli(tmp_path, "config", env=env), setting)


def test_a_config_file_value_out_of_range_names_the_setting(tmp_path: Path) -> None:
    (tmp_path / "fastmcp-guard.toml").write_text("audit_rotate_bytes = 99999999999999999\n")
    with pytest.raises(InvalidSettingError, match="'audit_rotate_bytes' .*fastmcp-guard.toml"):
        GuardConfig.load(cwd=tmp_path, env={})


def test_backend_options_out_of_range_are_config_errors_naming_them(tmp_path: Path) -> None:
    for backend, name in (
        (FileBackend(tmp_path / "a.jsonl", queue_capacity=2**40), "queue_capacity"),
        (FileBackend(tmp_path / "a.jsonl", flush_interval_ms=-1), "flush_interval_ms"),
        (FileBackend(tmp_path / "a.jsonl", rotate_bytes=2**64), "rotate_bytes"),
        (FileBackend(tmp_path / "a.jsonl", retention=2**64), "retention"),
        (SQLiteBackend(tmp_path / "a.db", flush_interval_ms=10**9), "flush_interval_ms"),
    ):
        with pytest.raises(ConfigError, match=name):
            AuditLog(backend=backend)
    with pytest.raises(ConfigError, match="retention_days"):
        AuditLog(backend=SQLiteBackend(tmp_path / "b.db", retention_days=math.inf))
    for name, value in (("timeout", math.inf), ("backoff_cap", math.nan),
                        ("drain_timeout", 10**9), ("poll_interval", 0)):  # fmt: skip
        with pytest.raises(ConfigError, match=name):
            HttpBackend("http://127.0.0.1:9/x", spool_dir=tmp_path / "s", **{name: value})
