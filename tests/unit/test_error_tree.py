"""One error tree: everything fastmcp-guard raises derives from ``GuardError``.

Each error kind is raised here through the API a user calls (``KeyStore``, ``RateLimit``,
``IPPolicy``, ``AuditLog``, ``GuardMetrics``, the core functions behind the ``audit``
CLI), never by calling the class. Each test checks the two promises of the tree: the
error is a ``GuardError`` (one ``except`` for everything of ours), and it is still the
built-in that code written for fastmcp-guard 0.2 caught (``ValueError``, ``KeyError``,
``OSError``, ``FileNotFoundError``...). Its message says what to fix.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastmcp import Client, FastMCP
from fastmcp.exceptions import ToolError
from fastmcp_guard import (
    AuditLog,
    FileBackend,
    Guard,
    IPPolicy,
    KeyStore,
    RateLimit,
    RateLimitExceeded,
    _core,
    errors,
)
from fastmcp_guard.errors import GuardError
from fastmcp_guard.metrics import GuardMetrics

from tests.security._tokens import wrong_secret


def assert_in_tree(exc: BaseException, cls: type[BaseException], *builtins: type) -> None:
    """``exc`` is exactly a ``cls`` (no stray subclass), a ``GuardError`` and each built-in."""
    assert type(exc) is cls, f"{type(exc).__mro__}"
    assert isinstance(exc, GuardError)
    for b in builtins:
        assert isinstance(exc, b), f"{cls.__name__} is not a {b.__name__}"


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    s = KeyStore(backend="sqlite", path=tmp_path / "keys.db")
    yield s
    s.close()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- bad input: GuardError + ValueError / TypeError ------------------------------------


def test_a_bad_rate_string_is_an_invalid_rate_error() -> None:
    with pytest.raises(errors.InvalidRateError, match=r'unknown unit "fortnight".*e\.g\. "10/minute"') as info:
        RateLimit(per_key="10 per fortnight")
    assert_in_tree(info.value, errors.InvalidRateError, ValueError)


def test_a_bad_cidr_is_an_invalid_ip_error() -> None:
    with pytest.raises(errors.InvalidIPError, match=r"10\.0\.0\.300") as info:
        IPPolicy(allow=["10.0.0.300"])
    assert_in_tree(info.value, errors.InvalidIPError, ValueError)


def test_a_bad_key_input_is_an_invalid_key_input_error(store: KeyStore) -> None:
    past = datetime.now(timezone.utc) - timedelta(days=1)
    with pytest.raises(errors.InvalidKeyInputError, match="not in the future") as info:
        store.create(name="late", expires_at=past)
    assert_in_tree(info.value, errors.InvalidKeyInputError, ValueError)


def test_a_bad_backend_name_is_a_config_error() -> None:
    with pytest.raises(errors.ConfigError, match="expected one of 'memory', 'sqlite'") as info:
        KeyStore(backend="mongodb")
    assert_in_tree(info.value, errors.ConfigError, ValueError)


async def test_an_out_of_range_argument_is_an_invalid_argument_error(tmp_path: Path) -> None:
    log = AuditLog(backend="sqlite", path=tmp_path / "audit.db")
    try:
        with pytest.raises(errors.InvalidArgumentError, match="limit must be >= 0") as info:
            await log.query(limit=-1)
    finally:
        log.close()
    assert_in_tree(info.value, errors.InvalidArgumentError, ValueError)


async def test_an_unknown_status_filter_is_an_invalid_argument_error(tmp_path: Path) -> None:
    log = AuditLog(backend="sqlite", path=tmp_path / "audit.db")
    try:
        with pytest.raises(errors.InvalidArgumentError, match="expected one of ok, ") as info:
            await log.query(status="fine")
    finally:
        log.close()
    assert_in_tree(info.value, errors.InvalidArgumentError, ValueError)


def test_one_string_for_a_list_is_an_argument_type_error() -> None:
    with pytest.raises(errors.ArgumentTypeError, match=r"allow=\['10\.0\.0\.0/8'\]") as info:
        IPPolicy(allow="10.0.0.0/8")  # type: ignore[arg-type]
    assert_in_tree(info.value, errors.ArgumentTypeError, TypeError)
    with pytest.raises(errors.ArgumentTypeError, match=r"write allow=\['10\.1\.2\.3'\]"):
        GuardMetrics(allow="10.1.2.3")  # type: ignore[arg-type]


@pytest.fixture
def log(tmp_path: Path) -> str:
    """An empty JSONL audit log."""
    path = tmp_path / "audit.jsonl"
    path.write_text("")
    return str(path)


def test_a_wrong_output_is_an_argument_type_error(log: str) -> None:
    with pytest.raises(errors.ArgumentTypeError, match="path or a binary stream") as info:
        _core.audit_scan(log, 42)
    assert_in_tree(info.value, errors.ArgumentTypeError, TypeError)


def test_a_bad_scan_format_and_an_empty_range_are_invalid_argument_errors(
    log: str, tmp_path: Path
) -> None:
    with pytest.raises(errors.InvalidArgumentError, match="'jsonl' or 'csv'") as info:
        _core.audit_scan(log, tmp_path / "out", format="xml")  # type: ignore[arg-type]
    assert_in_tree(info.value, errors.InvalidArgumentError, ValueError)
    with pytest.raises(errors.InvalidArgumentError, match="swap them or widen the range"):
        _core.audit_scan(log, tmp_path / "out", since=2.0, until=1.0)


# -- keys: GuardError + KeyError / ValueError / OSError --------------------------------


def test_an_unknown_key_id_is_a_key_not_found_error(store: KeyStore) -> None:
    with pytest.raises(errors.KeyNotFoundError, match="fmg_key_doesnotexist") as info:
        store.rotate("fmg_key_doesnotexist")
    assert_in_tree(info.value, errors.KeyNotFoundError, KeyError)


def test_rotating_a_revoked_key_is_a_key_revoked_error(store: KeyStore) -> None:
    key = store.create(name="gone")
    store.revoke(key.id)
    with pytest.raises(errors.KeyRevokedError, match=f"{key.id}.*revoked") as info:
        store.rotate(key.id)
    assert_in_tree(info.value, errors.KeyRevokedError, ValueError)


def test_a_store_that_cannot_be_opened_is_a_store_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "keys.db"
    with pytest.raises(errors.StoreError, match="no-such-dir") as info:
        KeyStore(backend="sqlite", path=missing)
    assert_in_tree(info.value, errors.StoreError, OSError)


def test_a_refused_token_is_a_verify_error_and_a_throttled_one_names_its_budget(
    store: KeyStore,
) -> None:
    with pytest.raises(errors.VerifyError, match="fmg_sk_") as info:
        store.core.verify("not-a-token", "10.0.0.1")
    assert_in_tree(info.value, errors.VerifyError)
    assert info.value.reason == "malformed" and info.value.scope is None

    key = store.create(name="target")
    assert key.token is not None
    reasons = []
    for n in range(11):  # the default budget: 10 failures per (address, key id)
        with pytest.raises(errors.VerifyError, match=key.id) as info:
            store.core.verify(wrong_secret(key.token, n), "10.0.0.1")
        reasons.append(info.value.reason)
    assert reasons == ["bad_secret"] * 10 + ["throttled"]
    throttled = info.value
    assert throttled.scope == "client" and throttled.retry_after is not None
    assert throttled.key_id == key.id


# -- audit: GuardError + OSError and its kinds -----------------------------------------


def test_an_audit_log_that_cannot_be_opened_is_an_audit_write_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "audit.jsonl"
    with pytest.raises(errors.AuditWriteError, match="create the directory") as info:
        AuditLog(backend=FileBackend(missing))
    assert_in_tree(info.value, errors.AuditWriteError, OSError)


def test_an_export_file_that_cannot_be_created_is_an_audit_write_error(
    log: str, tmp_path: Path
) -> None:
    out = tmp_path / "no-dir" / "export.csv"
    with pytest.raises(errors.AuditWriteError, match="choose another output file") as info:
        _core.audit_scan(log, out)
    assert_in_tree(info.value, errors.AuditWriteError, OSError)
    assert info.value.errno == errno.ENOENT


def test_a_missing_audit_log_is_still_a_file_not_found_error(tmp_path: Path) -> None:
    missing = tmp_path / "audit.jsonl"
    with pytest.raises(FileNotFoundError, match="check the path") as info:
        _core.audit_scan(str(missing), tmp_path / "out.jsonl")
    assert_in_tree(info.value, errors.AuditFileNotFoundError,
                   errors.AuditReadError, FileNotFoundError, OSError)  # fmt: skip
    assert info.value.errno == errno.ENOENT
    with pytest.raises(errors.AuditFileNotFoundError, match="audit.jsonl") as info:
        _core.audit_verify(str(missing))
    assert info.value.errno == errno.ENOENT


def test_a_directory_for_an_audit_log_is_still_an_is_a_directory_error(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError, match="give the JSONL file inside it") as info:
        _core.audit_scan(str(tmp_path), tmp_path / "out.jsonl")
    assert_in_tree(info.value, errors.AuditIsADirectoryError,
                   errors.AuditReadError, IsADirectoryError)  # fmt: skip


_SCAN_UNREADABLE = """
import json, sys
from fastmcp_guard import _core, errors
try:
    _core.audit_scan(sys.argv[1], sys.argv[2])
except Exception as exc:
    print(json.dumps({
        "tree": [issubclass(type(exc), c) for c in
                 (errors.AuditPermissionError, errors.AuditReadError, errors.GuardError,
                  PermissionError)],
        "errno": exc.errno, "message": str(exc),
    }))
"""


def _drop_file_override() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE (1) and CAP_DAC_READ_SEARCH (2)
    from the bounding set (prctl PR_CAPBSET_DROP = 24), so the exec'd root process has
    neither."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_an_unreadable_audit_log_is_still_a_permission_error(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        log = tmp_path / "audit.jsonl"
        log.write_text("{}\n")
        log.chmod(0)
        try:
            with pytest.raises(PermissionError, match="run as a user that can read") as info:
                _core.audit_scan(str(log), tmp_path / "out.jsonl")
        finally:
            log.chmod(0o600)
        assert_in_tree(info.value, errors.AuditPermissionError,
                       errors.AuditReadError, PermissionError)  # fmt: skip
        assert info.value.errno == errno.EACCES
        return
    # Root reads everything: read the file in a child without the capabilities that let
    # root bypass file permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH).
    log = tmp_path / "audit.jsonl"
    log.write_text("{}\n")
    log.chmod(0)
    done = subprocess.run(
        [sys.executable, "-c", _SCAN_UNREADABLE, str(log), str(tmp_path / "out.jsonl")],
        check=False, preexec_fn=_drop_file_override, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    log.chmod(0o600)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["tree"] == [True, True, True, True], got
    assert got["errno"] == errno.EACCES and "run as a user that can read" in got["message"]


def test_logging_an_unknown_status_is_an_invalid_argument_error(tmp_path: Path) -> None:
    log = AuditLog(backend=FileBackend(tmp_path / "audit.jsonl"))
    try:
        with pytest.raises(errors.InvalidArgumentError, match="expected one of") as info:
            log.log("bogus")
        assert_in_tree(info.value, errors.InvalidArgumentError, ValueError)
        with pytest.raises(errors.ArgumentTypeError, match="scopes must be") as typed:
            log.log("ok", scopes="read")  # a str, not a list of them
        assert_in_tree(typed.value, errors.ArgumentTypeError, TypeError)
    finally:
        log.close()


# -- extras and backends ---------------------------------------------------------------


def test_a_missing_extra_is_a_missing_extra_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # The redis package is installed here; None in sys.modules makes importing it fail
    # as it does where the [redis] extra is not installed.
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(errors.MissingExtraError, match=r"pip install 'fastmcp-guard\[redis\]'") as info:
        RateLimit(per_key="10/minute", backend="redis")
    assert_in_tree(info.value, errors.MissingExtraError, ImportError)


def test_an_unreachable_redis_is_a_rate_backend_error() -> None:
    url = f"redis://127.0.0.1:{closed_port()}/0"
    rate = RateLimit(per_key="10/minute", backend="redis", url=url)
    try:
        with pytest.raises(errors.RateBackendError, match=r"127\.0\.0\.1") as info:
            rate.status("fmg_key_x")
    finally:
        rate.close()
    assert_in_tree(info.value, errors.RateBackendError, ConnectionError, OSError)


# -- the rate refusal: GuardError + FastMCP's ToolError --------------------------------


async def test_a_rate_refusal_is_a_guard_error_and_a_tool_error_with_retry_after() -> None:
    # The guard's middleware answers a refused tool call with a tool-error result made
    # from a RateLimitExceeded (its text and ``data``), or raises its ``as_mcp_error()``
    # (refusal="protocol"): the exception itself is never raised to a caller today, so it
    # is made here from a refusal the public RateLimit gave, as the middleware makes it.
    assert issubclass(RateLimitExceeded, GuardError) and issubclass(RateLimitExceeded, ToolError)
    rate = RateLimit(per_key="1/hour")
    assert rate.check("fmg_key_a").refusal is None
    refusal = rate.check("fmg_key_a").refusal
    assert refusal is not None
    exc = RateLimitExceeded(refusal, "echo")
    assert_in_tree(exc, RateLimitExceeded, ToolError)
    assert 0 < exc.retry_after <= 3600 and exc.data["retry_after"] == pytest.approx(exc.retry_after, abs=1)
    assert str(exc).startswith("Rate limit exceeded (per-key limit 1/hour); retry after ")

    # What a client of a guarded server reads: that message, as a tool error.
    mcp: FastMCP[Any] = FastMCP("limited")

    @mcp.tool
    def echo(text: str) -> str:
        return text

    guard = Guard(mcp, rate_limit=RateLimit(per_key="1/hour"))
    try:
        async with Client(mcp) as client:
            await client.call_tool("echo", {"text": "first"})
            with pytest.raises(ToolError, match=r"Rate limit exceeded \(per-key limit 1/hour\); retry after"):
                await client.call_tool("echo", {"text": "second"})
    finally:
        guard.close()
