"""Threat: unauthenticated floods fill the disk (issue 10, finding 11; probe finding 4).

Every refusal made before there is an identity used to be one ~500-byte line, and the
embedded defaults did not rotate. Now :meth:`AuditLog.log_refusal` aggregates them per
(status, reason, claimed key id, client address; IPv6 per /64) and interval: the first
few are written, the rest counted into one summary event per group (``count``), so the
file stays small and every attempt is still accounted for; the guard's metrics still
count every refusal; the chain still verifies. The CLI's and ``fastmcp-guard run``'s
defaults rotate the JSONL log at 100 MB x 10 files.

The bound was on lines per group, not on bytes: a refused request's path went into its
line uncut (a 100 KB path, a 100 KB line; 40 /64s x 6 requests of 60 KB paths wrote
12.1 MB). Now every string of a refusal line and of a summary is cut in the core (at
most 256 bytes as written, escapes included), and at most ``refusal_max_lines`` (1,000)
refusal lines are written per interval across all groups; past it refusals are only
counted, and their groups' summaries carry them.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from fastmcp import FastMCP
from fastmcp_guard import AuditLog, FileBackend, Guard, KeyStore, SQLiteBackend
from fastmcp_guard._core import AuditWriter
from fastmcp_guard.audit import OTelBackend
from fastmcp_guard.config import GuardConfig
from fastmcp_guard.errors import ConfigError
from fastmcp_guard.ip import IPPolicy
from fastmcp_guard.metrics import GuardMetrics

from tests.cli.test_cli_keys import cli

CHAIN_KEY = "flood-test-chain-key"
PRE_IDENTITY = ("unauthorized", "ip_denied", "rate_limited")


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def attempts_accounted(evs: list[dict[str, Any]]) -> int:
    """Refusals the events stand for: 1 per written line, ``count`` per summary."""
    return sum(e["count"] if e.get("summary") else 1 for e in evs if e["status"] in PRE_IDENTITY)


def flood(audit: AuditLog, n: int) -> dict[str, int]:
    """``n`` refusals from many addresses: a botnet of IPv4 addresses, one IPv6 /64
    cycling through its host part, statuses and reasons mixed. Returns the attempts per
    status."""
    per_status: dict[str, int] = {}
    for i in range(n):
        if i % 3 == 0:
            ip = f"2001:db8:bad:1::{i:x}"  # one /64: one group
        else:
            ip = f"198.51.{i % 7}.{i % 250}"
        status, reason = [("unauthorized", "missing_token"), ("unauthorized", "bad_secret"),
                          ("ip_denied", "denied"), ("rate_limited", "throttled")][i % 4]  # fmt: skip
        key_id = "fmg_key_victimvictimvict" if reason in ("bad_secret", "throttled") else ""
        assert audit.log_refusal(status, client_ip=ip, reason=reason, key_id=key_id,
                                 error="missing or invalid token", extra={"path": "/mcp"})  # fmt: skip
        per_status[status] = per_status.get(status, 0) + 1
    return per_status


def test_a_flood_writes_bounded_lines_counts_every_attempt_and_still_verifies(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(backend=[FileBackend(path, chain_key=CHAIN_KEY),
                              SQLiteBackend(tmp_path / "audit.db")])  # fmt: skip
    metrics = GuardMetrics()
    audit.add_observer(metrics)  # as Guard(metrics=True) does
    n = 20_000
    per_status = flood(audit, n)
    audit.close()
    evs = events(path)
    # 7 * 250 IPv4 addresses cap at the 1024 groups; the rest join overflow groups.
    assert len(evs) < 1024 * 5 + 1024 + 100, len(evs)
    assert attempts_accounted(evs) == n
    for status, count in per_status.items():
        assert attempts_accounted([e for e in evs if e["status"] == status]) == count, status
    summaries = [e for e in evs if e.get("summary")]
    assert summaries and all(e["count"] > 0 and e["reason"] and e["since"] for e in summaries)
    v6 = [e for e in summaries if e["client_ip"] == "2001:db8:bad:1::/64"]
    assert v6, "an IPv6 /64 is one group"
    assert any(e.get("overflow") and e["client_ip"] is None for e in summaries)
    # The claimed key id is part of the group: `audit query --key` finds the attacks.
    assert any(e["key_id"] == "fmg_key_victimvictimvict" for e in summaries)
    # Written lines carry the reason too.
    assert all(e["reason"] for e in evs if e["status"] in PRE_IDENTITY)
    # The metrics counted every refusal, not the lines.
    rendered = metrics.render()
    for status, count in per_status.items():
        assert f'fastmcp_guard_decisions_total{{status="{status}",tool=""}} {count}' in rendered
    assert f"fastmcp_guard_auth_failures_total {per_status['unauthorized']}" in rendered
    # The SQLite backend holds the same rows.
    import sqlite3

    with sqlite3.connect(tmp_path / "audit.db") as db:
        assert db.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0] == len(evs)
    stats = audit.stats()
    assert stats["refusals_suppressed"] == sum(e["count"] for e in summaries)
    # The chain still verifies, through the real command.
    proc = cli(tmp_path, "audit", "verify", str(path), "--chain-key-env", "FLOOD_KEY",
               env={"FLOOD_KEY": CHAIN_KEY})  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"OK: {len(evs)} events"), proc.stdout


def test_a_flood_from_one_address_is_a_few_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(backend=FileBackend(path))
    for _ in range(5000):
        audit.log_refusal("unauthorized", client_ip="203.0.113.9", reason="missing_token",
                          error="missing or invalid token")  # fmt: skip
    audit.flush()  # flush ends the interval too
    evs = events(path)
    assert len(evs) == 6 and [e.get("summary", False) for e in evs] == [False] * 5 + [True]
    assert evs[-1]["count"] == 4995 and evs[-1]["client_ip"] == "203.0.113.9"
    assert evs[-1]["error"] == "missing or invalid token"
    audit.close()
    assert len(events(path)) == 6  # nothing more to summarise at close


#: The longest refusal line or summary the guard's fields can make: five strings of at
#: most 256 bytes as written (address, reason, key id, error, path) and the fixed fields.
MAX_LINE_BYTES = 2048


def test_60_kb_paths_from_40_64s_write_bounded_bytes_and_every_attempt_counts(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(backend=FileBackend(path, chain_key=CHAIN_KEY))
    long_path = "/" + "x" * 60_000
    n = 0
    # 40 /64s x 6 claimed key ids: 240 groups, 6 refusals each (the burst is 5: 1,200
    # lines without a cap across groups).
    for net in range(40):
        for k in range(6):
            for i in range(6):
                assert audit.log_refusal(
                    "unauthorized", client_ip=f"2001:db8:0:{net:x}::{i + 1}",
                    reason="bad_secret", key_id=f"fmg_key_{net:08d}{k:08d}",
                    error="invalid secret " + "!" * 60_000, extra={"path": f"{long_path}{i}"},
                )  # fmt: skip
                n += 1
    audit.close()
    data = path.read_bytes()
    evs = events(path)
    lines = [e for e in evs if not e.get("summary")]
    summaries = [e for e in evs if e.get("summary")]
    assert len(lines) == 1000, "refusal_max_lines across all groups"
    assert len(summaries) == 240
    assert attempts_accounted(evs) == n == 1440
    assert max(len(line) for line in data.splitlines()) <= MAX_LINE_BYTES
    assert len(data) <= (1000 + 240) * MAX_LINE_BYTES  # 12 MB for 240 lines before
    assert all(len(e["path"]) <= 256 and len(e["error"]) <= 256 for e in lines)
    assert all(len(e["error"]) <= 256 for e in summaries)
    stats = audit.stats()
    assert stats["refusals_suppressed"] == sum(e["count"] for e in summaries) == 440


def test_every_string_of_a_refusal_is_cut_in_the_core(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writer = AuditWriter(str(path), refusal_burst=1)
    seen: list[tuple[Any, ...]] = []
    writer.add_observer(lambda *fields: seen.append(fields) or True)
    huge = '"\\\x01' * 20_000  # each character escaped when written: 2, 2 and 6 bytes
    extra = {"path": huge, huge: "key", "headers": {"x": "y" * 60_000}, "n": 10**700}
    for _ in range(2):  # one written line, one summary
        assert writer.log_refusal("ip_denied", client_ip=huge, reason=huge, key_id=huge,
                                  error=huge, extra=extra)  # fmt: skip
    writer.close()
    raw = path.read_bytes().splitlines()
    # Nine strings of at most 256 bytes as written, and the fixed fields.
    assert len(raw) == 2 and max(len(line) for line in raw) <= 9 * 258 + 400
    line, summary = (json.loads(r) for r in raw)
    for field in ("client_ip", "key_id", "error", "reason", "path"):
        written = json.dumps(line[field], ensure_ascii=False)
        assert 0 < len(written.encode()) <= 256 + 2, field  # as written, quotes included
    assert all(len(k.encode()) <= 256 for k in line)
    # Values that are not strings and render long are kept as their JSON text, cut.
    assert isinstance(line["headers"], str) and line["headers"].startswith('{"x":"yyy')
    assert isinstance(line["n"], str) and len(line["n"]) <= 256
    assert summary["count"] == 1 and len(summary["error"]) <= 256
    # The taps (OpenTelemetry, metrics) see the same cut values.
    assert len(seen) == 2
    key_id, error, client_ip, extra_seen = seen[0][1], seen[0][6], seen[0][9], seen[0][11]
    assert all(0 < len(v) <= 256 for v in (key_id, error, client_ip, extra_seen["path"]))


def test_a_string_python_cannot_encode_is_recorded_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writer = AuditWriter(str(path))
    lone = "bad\ud800path"  # a lone surrogate: no UTF-8 for it
    assert writer.log_refusal("unauthorized", client_ip=lone, reason="bad_secret",
                              key_id=lone, error=lone, extra={"path": lone})  # fmt: skip
    writer.close()
    (line,) = events(path)
    assert line["status"] == "unauthorized" and line["reason"] == "bad_secret"
    assert line["path"].startswith("bad") and line["path"].endswith("path")


@pytest.mark.http
async def test_over_http_denied_requests_with_60_kb_paths_write_bounded_bytes(
    serve, tmp_path: Path
) -> None:
    path = tmp_path / "audit.jsonl"
    mcp: FastMCP = FastMCP("denied")
    audit = AuditLog(backend=FileBackend(path, flush_interval_ms=20))
    guard = Guard(mcp, keys=KeyStore(), audit=audit,
                  ip=IPPolicy(deny=["2001:db8::/32"], trusted_proxies=["127.0.0.1"]))  # fmt: skip
    sent = 0
    async with serve(mcp) as url:
        port = int(url.split(":")[2].split("/")[0])
        for net in range(40):
            for i in range(6):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(f"GET /{'x' * 60_000}{i} HTTP/1.1\r\nHost: a\r\n"
                             f"X-Forwarded-For: 2001:db8:0:{net:x}::1\r\n"
                             "Connection: close\r\n\r\n".encode())  # fmt: skip
                await writer.drain()
                status = (await reader.readline()).split()[1]
                writer.close()
                assert status == b"403", status
                sent += 1
    audit.close()
    data = path.read_bytes()
    evs = events(path)
    assert attempts_accounted(evs) == sent == 240
    assert max(len(line) for line in data.splitlines()) <= MAX_LINE_BYTES
    assert len(data) <= 240 * MAX_LINE_BYTES  # 12.1 MB before
    guard.keys.close()


def test_the_writer_thread_writes_the_summary_when_the_interval_ends(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(backend=FileBackend(path, flush_interval_ms=5), refusal_interval_s=0.05)
    for _ in range(50):
        audit.log_refusal("ip_denied", client_ip="192.0.2.1", reason="denied")
    deadline = time.monotonic() + 20  # no timing is asserted: only that it comes
    while time.monotonic() < deadline:
        if path.exists() and any(e.get("summary") for e in events(path)):
            break
        time.sleep(0.02)
    evs = events(path)  # neither flush nor close was called
    assert [e["count"] for e in evs if e.get("summary")] == [45]
    audit.close()


def test_without_a_written_backend_every_refusal_goes_to_the_targets() -> None:
    metrics = GuardMetrics()
    # What Guard(metrics=True) builds without a log.
    audit = AuditLog(backend=[], observers=[metrics], log_inputs=False, log_outputs=False)
    for _ in range(30):
        assert audit.log_refusal("unauthorized", client_ip="192.0.2.7", reason="missing_token")
    assert 'fastmcp_guard_decisions_total{status="unauthorized",tool=""} 30' in metrics.render()
    otel = AuditLog(backend=OTelBackend())
    assert otel.log_refusal("unauthorized", client_ip=None, reason="missing_token")


def test_refusal_options_are_bounded() -> None:
    for kwargs in ({"refusal_burst": -1}, {"refusal_interval_s": 0},
                   {"refusal_interval_s": float("nan")}, {"refusal_interval_s": 10**9},
                   {"refusal_max_groups": 0}, {"refusal_max_groups": True}):  # fmt: skip
        with pytest.raises(ConfigError, match=next(iter(kwargs))):
            AuditLog(backend=OTelBackend(), **kwargs)


def test_the_core_bounds_refusal_max_lines(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="refusal_max_lines"):
        AuditWriter(str(tmp_path / "a.jsonl"), refusal_max_lines=1_000_001)
    # 0: summaries only.
    writer = AuditWriter(str(tmp_path / "b.jsonl"), refusal_max_lines=0)
    for _ in range(3):
        assert writer.log_refusal("unauthorized", client_ip="192.0.2.1", reason="x")
    writer.close()
    assert [(e.get("summary"), e.get("count")) for e in events(tmp_path / "b.jsonl")] == [(True, 3)]


def test_the_embedded_defaults_rotate_at_100_mb_times_10(tmp_path: Path) -> None:
    proc = cli(tmp_path, "config", "--json")
    assert proc.returncode == 0, proc.stderr
    settings = json.loads(proc.stdout)["settings"]
    assert settings["audit_rotate_bytes"] == {"value": 100_000_000, "source": "default",
                                              "env": "FASTMCP_GUARD_AUDIT_ROTATE_BYTES"}  # fmt: skip
    assert settings["audit_retention"]["value"] == 10
    # And the log `fastmcp-guard run` opens rotates so.
    config = GuardConfig.load(profile="embedded", cwd=tmp_path, env={})
    audit = config.audit_log()
    assert audit is not None
    backend = audit.backend
    audit.close()
    assert isinstance(backend, FileBackend)
    assert (backend.rotate_bytes, backend.retention) == (100_000_000, 10)
    # Configured values win; the library profile (Guard in code, as 0.2) stays unrotated.
    proc = cli(tmp_path, "config", "--json", env={"FASTMCP_GUARD_AUDIT_ROTATE_BYTES": "off"})
    assert json.loads(proc.stdout)["settings"]["audit_rotate_bytes"]["value"] is None
    library = GuardConfig.load(profile="library", cwd=tmp_path, env={})
    assert (library.audit_rotate_bytes, library.audit_retention) == (None, None)
