"""One AuditLog, every Rust-written backend at once (JSONL file, SQLite, the HTTP spool
shipping to a real receiver on 127.0.0.1): one rendering and one queue feed them all,
each backend keeps its own counters and health, and one that is paused or failing does not
starve the others."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastmcp_guard import AuditLog
from fastmcp_guard._core import AuditSink, AuditWriter
from fastmcp_guard.audit import FileBackend, HttpBackend, SQLiteBackend

from tests.integration.audit_receiver import Receiver

SECRET = b"fanout-hmac-key"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(secret=SECRET).start()
    yield r
    r.stop()


def _every_backend(tmp_path: Path, receiver: Receiver, **http: object) -> AuditLog:
    opts: dict[str, object] = {"spool_dir": tmp_path / "spool", "flush_interval_ms": 20,
                               "poll_interval": 0.02, "drain_timeout": 10.0,
                               "secret": SECRET}  # fmt: skip
    opts.update(http)
    return AuditLog(
        backend=[
            FileBackend(tmp_path / "audit.jsonl", flush_interval_ms=20),
            SQLiteBackend(tmp_path / "audit.db", flush_interval_ms=20),
            HttpBackend(receiver.url, **opts),  # type: ignore[arg-type]
        ],
        redact=["password", "*.token"],
        output_preview_chars=8,
    )


def _fields(record: dict[str, object]) -> dict[str, object]:
    """The audit fields every backend stores (no seal fields, no row id)."""
    keep = ("ts", "key_id", "key_name", "tool", "scopes", "duration_ms", "status", "error",
            "input_args", "output_preview", "client_ip", "metadata")  # fmt: skip
    return {k: record.get(k) for k in keep}


async def test_one_rendering_feeds_file_sqlite_and_http_with_the_same_record(
    tmp_path: Path, receiver: Receiver
) -> None:
    audit = _every_backend(tmp_path, receiver)
    logger = audit._core  # the three backends sit behind one queue
    assert isinstance(logger, AuditWriter) and len(logger.sinks) == 3
    assert audit.log == logger.log  # no Python frame per event
    for i in range(200):
        assert audit.log(
            "ok" if i % 3 else "rate_limited",
            key_id=f"k{i}", key_name="alice", tool="search", scopes=["read", "w\"x"],
            duration_ms=i / 7, error=None if i % 3 else "Rate limit exceeded",
            input_args={"q": f"é{i}", "password": "hunter2", "auth": {"token": "t0k"}},
            output_preview="a long result text", client_ip="10.0.0.7",
            metadata={"team": "ops"}, extra={"retry_after": 1.5},
        )  # fmt: skip
    audit.flush()
    receiver.wait_for(200)
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    rows = list(reversed(await audit.query(limit=1000)))
    shipped = sorted(receiver.accepted(), key=lambda e: int(str(e["key_id"])[1:]))
    assert len(lines) == len(rows) == len(shipped) == 200
    for line, row, sent in zip(lines, rows, shipped, strict=True):
        assert _fields(line) == _fields(row) == _fields(sent)
        assert line["retry_after"] == row["retry_after"] == sent["retry_after"] == 1.5
    first = lines[1]
    assert first["input_args"] == {"q": "é1", "password": "[redacted]",
                                   "auth": {"token": "[redacted]"}}  # fmt: skip
    assert first["output_preview"] == "a long r" and first["scopes"] == ["read", 'w"x']
    audit.close()
    stats = audit.stats()
    assert stats["enqueued"] == 200 and stats["written"] == 600  # one event, three backends
    assert stats["dropped"] == 0 and stats["failed"] == 0 and stats["shipped"] == 200
    assert [s.stats()["written"] for s in logger.sinks] == [200, 200, 200]
    per_backend = audit.backend_stats()
    assert [per_backend[k]["written"] for k in ("jsonl", "sqlite", "http")] == [200, 200, 200]
    assert per_backend["http"]["shipped"] == 200 and per_backend["http"]["spool_dropped"] == 0
    for path in (tmp_path / "audit.jsonl", tmp_path / "audit.db", *(tmp_path / "spool").iterdir()):
        assert b"hunter2" not in path.read_bytes() and b"t0k" not in path.read_bytes()


def test_a_paused_spool_skips_only_its_own_copy(
    tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.plan = lambda n: (503, {})  # endpoint down: the spool grows past its limit
    audit = _every_backend(tmp_path, receiver, spool_max_bytes=10_000, backoff_cap=0.2)
    for i in range(60):
        audit.log("ok", key_id=f"early{i}", input_args={"pad": "x" * 200})
    audit.flush()
    deadline = time.monotonic() + 10
    while audit.healthy() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not audit.healthy()
    with caplog.at_level("WARNING", logger="fastmcp_guard.audit"):
        results = [audit.log("ok", key_id=f"late{i}") for i in range(25)]
        audit.flush()
        audit.log("ok", key_id="probe")  # the next call reports the skipped events
    assert results == [True] * 25  # queued: the file and SQLite record them...
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert sum('"key_id":"late' in x for x in lines) == 25
    assert "over spool_max_bytes" in caplog.text and "skipped while paused" in caplog.text
    stats = audit.stats()  # ...the spool skipped them, and says so
    assert stats["spool_dropped"] >= 25 and stats["dropped"] == stats["spool_dropped"]
    receiver.plan = None  # the endpoint is back: the spool drains and resumes
    deadline = time.monotonic() + 15
    while not audit.healthy() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert audit.healthy()
    assert audit.log("ok", key_id="after")
    receiver.wait_for(61)
    audit.close()
    shipped = {e["key_id"] for e in receiver.accepted()}
    assert {f"early{i}" for i in range(60)} | {"after"} <= shipped
    assert not any(k.startswith("late") for k in shipped)


def test_a_writer_over_several_sinks_checks_its_input(tmp_path: Path) -> None:
    nothing = AuditWriter.of_sinks([])  # observers only: records nothing, never fails
    seen: list[tuple[object, ...]] = []
    nothing.add_observer(lambda *fields: seen.append(fields) or True)
    assert nothing.log("ok", "k") and seen[0][:2] == ("ok", "k")
    assert nothing.healthy() and nothing.path == "" and nothing.kind == "none"
    nothing.flush()
    nothing.close()
    a = AuditSink.jsonl(tmp_path / "a.jsonl")
    b = AuditSink.sqlite(tmp_path / "b.db")
    with pytest.raises(ValueError, match="not given to an AuditWriter yet"):
        a.stats()
    fan = AuditWriter.of_sinks([a, b])
    with pytest.raises(ValueError, match="already belongs to an AuditWriter"):
        AuditWriter.of_sinks([a])
    with pytest.raises(ValueError, match="unknown audit status"):
        fan.log("nope", "k", "n", "t", [], 0.0)
    with pytest.raises(TypeError, match="scopes must be"):
        fan.log("ok", "k", "n", "t", "read", 0.0)
    assert fan.stats()["enqueued"] == 0
    assert fan.log("ok", "k", "n", "t", ("read",), 1.0)
    assert fan.log("error", error="boom")  # keywords, every other field defaulted
    fan.close()
    assert not fan.log("ok")  # closed: dropped, no error
    assert fan.stats() == {"enqueued": 2, "written": 4, "dropped": 1, "paused_dropped": 0,
                           "write_errors": 0, "failed": 0, "queue_depth": 0,
                           "refusals_suppressed": 0, "refusal_summaries": 0}  # fmt: skip
    assert a.stats() == b.stats() == {"written": 2, "failed": 0, "write_errors": 0,
                                      "paused_dropped": 0}  # fmt: skip


def test_a_bad_path_fails_at_construction_and_closes_what_was_opened(tmp_path: Path) -> None:
    from fastmcp_guard.errors import AuditWriteError

    with pytest.raises(AuditWriteError, match="missing"):
        AuditLog(backend=[FileBackend(tmp_path / "ok.jsonl"),
                          SQLiteBackend(tmp_path / "missing" / "a.db")])  # fmt: skip
    with pytest.raises(AuditWriteError, match="missing"):
        AuditSink.jsonl(tmp_path / "missing" / "a.jsonl")


def test_one_failing_backend_does_not_stop_the_others(tmp_path: Path) -> None:
    """/dev/full as the JSONL file: every write fails (ENOSPC); SQLite goes on."""
    audit = AuditLog(backend=[FileBackend("/dev/full", chain=False),
                              SQLiteBackend(tmp_path / "a.db", flush_interval_ms=20)])  # fmt: skip
    from fastmcp_guard.errors import AuditWriteError

    for i in range(10):
        assert audit.log("ok", key_id=f"k{i}")
    with pytest.raises(AuditWriteError, match="/dev/full.*No space left"):
        audit.flush()  # as a single writer's flush: a failed write since the last one
    audit.flush()  # reported once
    assert not audit.healthy()  # the file backend failed its last write
    stats = audit.stats()
    assert stats["failed"] == 10 and stats["written"] == 10 and stats["write_errors"] >= 1
    file_sink, db_sink = audit._core.sinks
    assert "No space left" in (file_sink.last_error() or "")
    assert db_sink.healthy() and db_sink.stats()["written"] == 10
    per_backend = audit.backend_stats()
    assert per_backend["jsonl"]["failed"] == 10 and per_backend["sqlite"] == {
        "written": 10, "failed": 0, "write_errors": 0, "paused_dropped": 0}  # fmt: skip
    assert audit.log("ok", key_id="late")
    rows = asyncio.run(audit.query(limit=100))  # the file's failure does not block SQLite
    assert len(rows) == 11
    with pytest.raises(AuditWriteError, match="/dev/full"):
        audit.close()
