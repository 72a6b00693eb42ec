"""HttpBackend against a real HTTP receiver on 127.0.0.1 (no mocks): batches, gzip, HMAC,
idempotency, outages, restarts, Retry-After, the spool limit, and no secrets on disk."""

from __future__ import annotations

import gzip
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastmcp_guard import AuditLog
from fastmcp_guard.audit import HttpBackend
from fastmcp_guard.audit.http import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
from fastmcp_guard.errors import ConfigError

from tests.integration.audit_receiver import Receiver

SECRET = b"s3cret-hmac-key-for-tests"
TOKEN = "fmg_sk_do_not_leak_this_token_123456"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(secret=SECRET).start()
    yield r
    r.stop()


def _log(audit: AuditLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        assert audit.log("ok", key_id=f"k{i}", key_name="alice", tool="echo",
                         input_args={"i": i})  # fmt: skip


def _backend(receiver: Receiver, spool: Path, **kw: object) -> HttpBackend:
    opts: dict[str, object] = {"spool_dir": spool, "flush_interval_ms": 20,
                               "poll_interval": 0.02, "drain_timeout": 10.0}  # fmt: skip
    opts.update(kw)
    return HttpBackend(receiver.url, **opts)  # type: ignore[arg-type]


def test_events_arrive_as_gzipped_json_arrays_with_unique_ids(
    receiver: Receiver, tmp_path: Path
) -> None:
    audit = AuditLog(backend=_backend(receiver, tmp_path / "spool", batch_max=50))
    _log(audit, 300)
    audit.close()
    assert len(receiver.ids) == 300 and set(receiver.ids.values()) == {1}
    assert all(r.headers["Content-Encoding"] == "gzip" for r in receiver.requests)
    assert all(isinstance(json.loads(gzip.decompress(r.body)), list) for r in receiver.requests)
    assert max(len(r.events) for r in receiver.requests) <= 50
    assert sorted(e["key_id"] for e in receiver.accepted()) == sorted(f"k{i}" for i in range(300))
    assert audit.stats()["shipped"] == 300


def test_gzip_off_sends_plain_json(receiver: Receiver, tmp_path: Path) -> None:
    audit = AuditLog(backend=_backend(receiver, tmp_path / "spool", gzip=False))
    _log(audit, 20)
    audit.close()
    assert "Content-Encoding" not in receiver.requests[0].headers
    assert len(json.loads(receiver.requests[0].body)) == 20


def test_hmac_verifies_with_the_secret_and_fails_with_another(
    receiver: Receiver, tmp_path: Path
) -> None:
    audit = AuditLog(backend=_backend(receiver, tmp_path / "spool", secret=SECRET))
    _log(audit, 10)
    audit.close()
    req = receiver.requests[0]
    assert req.signed_ok is True
    assert req.headers[SIGNATURE_HEADER].startswith("sha256=")
    assert not verify_signature(b"another-secret", req.headers, req.body)
    assert not verify_signature(SECRET, req.headers, req.body + b" ")
    assert not verify_signature(  # replayed ten minutes later
        SECRET, req.headers, req.body, now=float(req.headers[TIMESTAMP_HEADER]) + 600
    )


def test_backend_by_name_with_url_and_spool_path(receiver: Receiver, tmp_path: Path) -> None:
    audit = AuditLog(backend="http", url=receiver.url, path=tmp_path / "spool")
    _log(audit, 5)
    audit.close()
    assert len(receiver.ids) == 5
    assert "http" in repr(audit)


def test_a_spool_in_use_is_refused(receiver: Receiver, tmp_path: Path) -> None:
    audit = AuditLog(backend=_backend(receiver, tmp_path / "spool"))
    with pytest.raises(ConfigError, match="in use by another"):
        AuditLog(backend=_backend(receiver, tmp_path / "spool"))
    audit.close()


def test_a_bad_url_says_what_to_give() -> None:
    with pytest.raises(ConfigError, match="http://host"):
        HttpBackend("ftp://example.com/x")


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_endpoint_down_for_30_s_then_up_gets_every_event_exactly_once(
    receiver: Receiver, tmp_path: Path
) -> None:
    up_at = time.monotonic() + 30
    receiver.plan = lambda n: (503, {}) if time.monotonic() < up_at else None
    audit = AuditLog(backend=_backend(receiver, tmp_path / "spool", batch_max=500,
                                      backoff_cap=2.0, spool_file_bytes=64 * 1024))  # fmt: skip
    _log(audit, 2000)
    # The second half is logged while the endpoint is still down, once the sender has
    # been refused a few times (backing off, spooling).
    _wait(lambda: sum(r.status == 503 for r in receiver.requests) >= 3, timeout=25)
    assert time.monotonic() < up_at
    _log(audit, 2000, start=2000)
    receiver.wait_for(4000, timeout=60)
    audit.close()
    assert any(r.status == 503 for r in receiver.requests)
    assert len(receiver.ids) == 4000 and set(receiver.ids.values()) == {1}
    got = {e["key_id"] for e in receiver.accepted()}
    assert got == {f"k{i}" for i in range(4000)}
    assert audit.stats()["retries"] > 0
    # Fully shipped rotated spool files are gone.
    assert len(list((tmp_path / "spool").glob("audit-spool*.jsonl"))) == 1


_SENDER = textwrap.dedent(
    """
    import sys, time
    from fastmcp_guard import AuditLog
    from fastmcp_guard.audit import HttpBackend
    url, spool, n, drain = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    audit = AuditLog(backend=HttpBackend(url, spool_dir=spool, batch_max=100,
                                         flush_interval_ms=20, poll_interval=0.02,
                                         drain_timeout=drain, spool_file_bytes=32 * 1024))
    for i in range(n):
        audit.log("ok", key_id=f"k{i}", tool="echo")
    audit.flush()
    print("spooled", flush=True)
    if sys.argv[5] == "wait":
        time.sleep(600)
    audit.close()
    """
)


def _sender(
    receiver: Receiver, spool: Path, n: int, drain: float, mode: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _SENDER, receiver.url, str(spool), str(n), str(drain), mode],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2],
    )  # fmt: skip


def test_a_crash_mid_way_loses_nothing_and_resends_at_most_one_batch(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.delay = 0.03  # about 3,300 events/s: the crash lands mid-way
    spool = tmp_path / "spool"
    first = _sender(receiver, spool, 3000, 10.0, "wait")
    assert first.stdout is not None and first.stdout.readline().strip() == "spooled"
    receiver.wait_for(500)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert len(receiver.ids) < 3000, "the first process shipped everything: no crash mid-way"
    second = _sender(receiver, spool, 0, 10.0, "close")
    assert second.wait(30) == 0
    assert len(receiver.ids) == 3000
    assert {e["key_id"] for e in receiver.accepted()} == {f"k{i}" for i in range(3000)}
    assert sum(receiver.ids.values()) - 3000 <= 100  # only the batch in flight, if any


def test_a_clean_restart_resumes_from_the_cursor_without_resending(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.delay = 0.03
    spool = tmp_path / "spool"
    first = _sender(receiver, spool, 2000, 0.3, "close")  # drains 0.3 s, leaves the rest
    assert first.wait(30) == 0
    shipped_first = len(receiver.ids)
    assert 0 < shipped_first < 2000
    second = _sender(receiver, spool, 500, 10.0, "close")
    assert second.wait(30) == 0
    assert len(receiver.ids) == 2500 and set(receiver.ids.values()) == {1}


def test_429_with_retry_after_is_honoured(receiver: Receiver, tmp_path: Path) -> None:
    receiver.plan = lambda n: (429, {"Retry-After": "1"}) if n == 0 else None
    audit = AuditLog(backend=_backend(receiver, tmp_path / "spool"))
    _log(audit, 10)
    receiver.wait_for(10, timeout=10)
    audit.close()
    first, second = receiver.requests[0], receiver.requests[1]
    assert first.status == 429 and second.status == 200
    assert second.at - first.at >= 0.95
    assert audit.stats()["retries"] == 1


def _wait(cond: object, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_spool_limit_drops_new_events_and_counts_them(
    receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.plan = lambda n: (503, {})
    audit = AuditLog(backend=_backend(receiver, tmp_path / "spool", spool_max_bytes=20_000,
                                      backoff_cap=0.2))  # fmt: skip
    _log(audit, 100)  # about 30 kB: over the limit once spooled
    audit.flush()
    with caplog.at_level(logging.WARNING, logger="fastmcp_guard.audit"):
        _wait(lambda: not audit.healthy())
        dropped = sum(not audit.log("ok", key_id="late") for _ in range(50))
    assert dropped == 50
    stats = audit.stats()
    assert stats["spool_dropped"] == 50 and stats["dropped"] >= 50
    assert stats["spooled_bytes"] > 20_000
    assert "over spool_max_bytes" in caplog.text
    receiver.plan = None  # the endpoint is back: the spool drains, events flow again
    _wait(audit.healthy, timeout=10)
    assert audit.log("ok", key_id="after")
    receiver.wait_for(101)
    audit.close()


def test_spool_limit_with_fail_closed_makes_the_log_unhealthy(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.plan = lambda n: (503, {})
    audit = AuditLog(backend=_backend(receiver, tmp_path / "spool", spool_max_bytes=5_000,
                                      backoff_cap=0.2, drain_timeout=0.0),
                     on_failure="fail_closed")  # fmt: skip
    assert audit.healthy()
    _log(audit, 50)
    audit.flush()
    _wait(lambda: not audit.healthy())
    audit.close()


def test_no_token_or_secret_in_the_spool_or_the_logs(
    receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.plan = lambda n: (401, {}) if n < 2 else None  # refused, then fixed
    spool = tmp_path / "spool"
    with caplog.at_level(logging.DEBUG, logger="fastmcp_guard"):
        audit = AuditLog(backend=_backend(receiver, spool, secret=SECRET, backoff_cap=0.3,
                                          headers={"Authorization": f"Bearer {TOKEN}"}))  # fmt: skip
        _log(audit, 20)
        receiver.wait_for(20, timeout=10)
        audit.close()
    assert receiver.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert caplog.text.count("HTTP 401") == 1  # logged once, then retried quietly
    for f in spool.iterdir():
        data = f.read_bytes()
        assert TOKEN.encode() not in data and SECRET not in data, f
    assert TOKEN not in caplog.text and SECRET.decode() not in caplog.text
    assert TOKEN not in repr(audit.backend) and SECRET.decode() not in repr(audit.backend)
    assert os.stat(spool).st_mode & 0o077 == 0
