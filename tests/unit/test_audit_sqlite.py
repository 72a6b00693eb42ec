"""The SQLite audit backend: real database files in tmp_path, read back with sqlite3."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastmcp_guard import AuditLog, ConfigError, FileBackend, KeyStore, SQLiteBackend
from fastmcp_guard.errors import AuditWriteError, InvalidArgumentError

# fastmcp-guard 0.2's SQLiteAuditBackend._init_db, verbatim.
DDL_0_2 = """
    CREATE TABLE IF NOT EXISTS audit_log (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts TEXT NOT NULL,
        key_id TEXT,
        key_name TEXT,
        tool TEXT,
        scopes TEXT,
        duration_ms REAL,
        status TEXT,
        error TEXT,
        input_args TEXT,
        output_preview TEXT,
        client_ip TEXT,
        metadata TEXT
    );
    CREATE INDEX IF NOT EXISTS idx_ts ON audit_log(ts);
    CREATE INDEX IF NOT EXISTS idx_key_id ON audit_log(key_id);
    CREATE INDEX IF NOT EXISTS idx_tool ON audit_log(tool);
"""

FIELDS = ["ts", "key_id", "key_name", "tool", "scopes", "duration_ms", "status", "error",
          "input_args", "output_preview", "client_ip", "metadata"]  # fmt: skip


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


@pytest.fixture
def log(db: Path) -> AuditLog:
    a = AuditLog(backend="sqlite", path=db)
    yield a
    a.close()


def rows(path: Path) -> list[dict[str, Any]]:
    with closing(sqlite3.connect(path)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM audit_log ORDER BY id")]


def insert_at(path: Path, ts: str, key_id: str, tool: str = "t", status: str = "ok") -> None:
    """A row with a chosen timestamp, written as the Rust writer writes them."""
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(
            "INSERT INTO audit_log (ts, key_id, key_name, tool, scopes, duration_ms, status, "
            "metadata) VALUES (?, ?, '', ?, '[]', 0.0, ?, '{}')",
            (ts, key_id, tool, status),
        )
        conn.commit()


# --- writing ------------------------------------------------------------------------


def test_logged_events_land_as_rows(log: AuditLog, db: Path) -> None:
    log.log("ok", key_id="fmg_key_a", key_name="alice", tool="search", scopes=["read"],
            duration_ms=1.23456, input_args={"q": "x"}, output_preview="found",
            client_ip="10.0.0.7", metadata={"team": "ops"})  # fmt: skip
    log.log("rate_limited", key_id="fmg_key_a", tool="search", error="slow down",
            extra={"retry_after": 1.5, "status": "ignored"})  # fmt: skip
    log.close()
    assert log.stats()["written"] == 2
    first, second = rows(db)
    assert first["ts"].endswith("Z")
    datetime.fromisoformat(first["ts"].replace("Z", "+00:00"))
    assert (first["key_id"], first["key_name"], first["tool"]) == ("fmg_key_a", "alice", "search")
    assert json.loads(first["scopes"]) == ["read"]
    assert first["duration_ms"] == pytest.approx(1.235)
    assert first["status"] == "ok" and first["error"] is None
    assert json.loads(first["input_args"]) == {"q": "x"}
    assert first["output_preview"] == "found" and first["client_ip"] == "10.0.0.7"
    assert json.loads(first["metadata"]) == {"team": "ops"}
    assert first["extra"] is None
    assert second["status"] == "rate_limited" and second["error"] == "slow down"
    assert json.loads(second["extra"]) == {"retry_after": 1.5}


def test_sqlite_backend_object_and_options(db: Path) -> None:
    log = AuditLog(backend=SQLiteBackend(db, flush_interval_ms=20), log_inputs=False)
    try:
        assert log.path == str(db) and isinstance(log.backend, SQLiteBackend)
        assert log.writer.kind == "sqlite" and "sqlite" in repr(log)
        log.log("ok", tool="t", input_args={"secret": "x"})
    finally:
        log.close()
    assert rows(db)[0]["input_args"] is None


def test_new_database_is_private(log: AuditLog, db: Path) -> None:
    assert os.stat(db).st_mode & 0o777 == 0o600


def test_lifecycle_events_keep_their_extra_fields(log: AuditLog, tmp_path: Path) -> None:
    store = KeyStore(backend="sqlite", path=tmp_path / "keys.db")
    store.audit = log
    try:
        key = store.create(name="alice", scopes=["a"], actor="admin")
    finally:
        store.close()
    log.flush()
    [row] = rows(log.path)
    assert (row["status"], row["key_id"]) == ("created", key.id)
    assert json.loads(row["extra"]) == {"actor": "admin"}


# --- querying -----------------------------------------------------------------------


async def test_query_returns_the_audit_fields_newest_first(log: AuditLog) -> None:
    for i in range(5):
        log.log("ok", key_id=f"k{i}", tool="t", scopes=["s"], input_args={"i": i})
    recs = await log.query()  # no flush needed: query flushes first
    assert [r["key_id"] for r in recs] == ["k4", "k3", "k2", "k1", "k0"]
    assert list(recs[0]) == FIELDS
    assert recs[0]["scopes"] == ["s"] and recs[0]["input_args"] == {"i": 4}
    assert recs[0]["metadata"] == {} and recs[0]["error"] is None


async def test_query_filters(log: AuditLog) -> None:
    log.log("ok", key_id="a", key_name="alice", tool="read")
    log.log("error", key_id="a", key_name="alice", tool="write", error="boom")
    log.log("rate_limited", key_id="b", key_name="bob", tool="read",
            extra={"retry_after": 2.0})  # fmt: skip
    log.log("unauthorized", client_ip="10.0.0.9")

    async def ids(**kw: Any) -> list[tuple[str, str]]:
        return [(r["key_id"], r["status"]) for r in await log.query(**kw)]

    assert await ids(key_id="a") == [("a", "error"), ("a", "ok")]
    assert await ids(key_name="bob") == [("b", "rate_limited")]
    assert await ids(tool="read") == [("b", "rate_limited"), ("a", "ok")]
    assert await ids(status="unauthorized") == [("", "unauthorized")]
    assert await ids(key_id="a", tool="write", status="error") == [("a", "error")]
    assert await ids(key_id="nobody") == []
    assert await ids(limit=2) == [("", "unauthorized"), ("b", "rate_limited")]
    assert await ids(limit=0) == []
    [limited] = await log.query(status="rate_limited")
    assert limited["retry_after"] == 2.0  # extra fields come back at the top level


async def test_since_inclusive_until_exclusive(log: AuditLog, db: Path) -> None:
    log.flush()
    for second in range(4):
        insert_at(db, f"2026-03-09T14:00:0{second}.000Z", f"k{second}")
    t = datetime(2026, 3, 9, 14, 0, 0, tzinfo=timezone.utc)

    async def ids(**kw: Any) -> list[str]:
        return [r["key_id"] for r in await log.query(**kw)]

    assert await ids(since=t + timedelta(seconds=1)) == ["k3", "k2", "k1"]
    assert await ids(until=t + timedelta(seconds=2)) == ["k1", "k0"]
    assert await ids(since=t + timedelta(seconds=1), until=t + timedelta(seconds=3)) == ["k2", "k1"]
    # A naive datetime is UTC (as in 0.2); Unix seconds work too.
    assert await ids(since=datetime(2026, 3, 9, 14, 0, 3)) == ["k3"]
    assert await ids(since=(t + timedelta(seconds=3)).timestamp()) == ["k3"]
    # Millisecond boundaries are exact.
    assert await ids(since=t + timedelta(seconds=2, milliseconds=1)) == ["k3"]
    assert await ids(since=t + timedelta(seconds=2, microseconds=999)) == ["k3", "k2"]


async def test_query_keeps_0_2_positional_order(log: AuditLog, db: Path) -> None:
    log.flush()
    insert_at(db, "2026-03-09T14:00:00.000Z", "a", tool="t")
    insert_at(db, "2026-03-09T14:00:01.000Z", "a", tool="t")
    since = datetime(2026, 3, 9, 14, 0, 1, tzinfo=timezone.utc)
    # 0.2: query(key_id, key_name, tool, since, limit)
    assert [r["ts"] for r in await log.query("a", None, "t", since, 10)] == [
        "2026-03-09T14:00:01.000Z"
    ]


async def test_query_refuses_bad_filters(log: AuditLog) -> None:
    # A bad filter value is an argument error (the core's, through errors.rs); a filter
    # of the wrong type is the facade's ConfigError. Both are GuardError + ValueError.
    with pytest.raises(InvalidArgumentError, match=r"unknown audit status \"OK\".*rate_limited"):
        await log.query(status="OK")
    with pytest.raises(InvalidArgumentError, match="limit must be >= 0"):
        await log.query(limit=-1)
    with pytest.raises(ConfigError, match="since must be a datetime"):
        await log.query(since="yesterday")  # type: ignore[arg-type]


async def test_query_runs_in_a_worker_thread(
    log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fastmcp_guard.audit as audit_module

    threads: list[threading.Thread] = []
    real = audit_module.audit_query

    def spy(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(audit_module, "audit_query", spy)
    log.log("ok", key_id="a")
    assert [r["key_id"] for r in await log.query()] == ["a"]
    assert len(threads) == 1 and threads[0] is not threading.current_thread()


async def test_query_on_a_file_backend_says_it_needs_sqlite(tmp_path: Path) -> None:
    log = AuditLog(backend=FileBackend(tmp_path / "a.jsonl"))
    try:
        with pytest.raises(ConfigError, match="needs the sqlite backend"):
            await log.query(key_id="a")
    finally:
        log.close()


async def test_query_after_close_reads_the_file(log: AuditLog) -> None:
    log.log("ok", key_id="a")
    log.close()
    assert [r["key_id"] for r in await log.query()] == ["a"]


# --- fastmcp-guard 0.2 databases ----------------------------------------------------


def make_0_2_db(path: Path) -> None:
    """The table 0.2 created, with one row exactly as 0.2's ``_write_sync`` wrote it."""
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(DDL_0_2)
        conn.execute(
            "INSERT INTO audit_log (ts, key_id, key_name, tool, scopes, duration_ms, status, "
            "error, input_args, output_preview, client_ip, metadata) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                "2026-03-09T13:59:59.123456+00:00", "fmg_key_old", "legacy", "get_data",
                json.dumps(["read:data"]), 4.56, "ok", None, json.dumps({"query": "x"}),
                "Results for: x", "10.0.0.1", json.dumps({"team": "data"}),
            ),
        )  # fmt: skip
        conn.commit()


async def test_a_0_2_database_is_reused_and_its_rows_stay_queryable(db: Path) -> None:
    make_0_2_db(db)
    log = AuditLog(backend="sqlite", path=db)
    try:
        log.log("ok", key_id="fmg_key_new", tool="get_data")
        recs = await log.query(tool="get_data")
        assert [r["key_id"] for r in recs] == ["fmg_key_new", "fmg_key_old"]
        old = recs[1]
        assert old == {
            "ts": "2026-03-09T13:59:59.123456+00:00",
            "key_id": "fmg_key_old",
            "key_name": "legacy",
            "tool": "get_data",
            "scopes": ["read:data"],
            "duration_ms": 4.56,
            "status": "ok",
            "error": None,
            "input_args": {"query": "x"},
            "output_preview": "Results for: x",
            "client_ip": "10.0.0.1",
            "metadata": {"team": "data"},
        }
        assert await log.query(key_id="fmg_key_old", status="ok") == [old]
        t = datetime(2026, 3, 9, 13, 59, 59, tzinfo=timezone.utc)
        assert await log.query(since=t, until=t + timedelta(seconds=1)) == [old]
    finally:
        log.close()
    with closing(sqlite3.connect(db)) as conn:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(audit_log)")]
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert columns[:13] == ["id", *FIELDS] and columns[13:] == ["extra"]
    assert indexes == {"idx_ts", "idx_key_id_ts", "idx_tool_ts", "idx_status_ts"}
    assert len(rows(db)) == 2


# --- bad paths ----------------------------------------------------------------------


def test_missing_directory_fails_at_construction(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "audit.db"
    with pytest.raises(AuditWriteError) as info:
        AuditLog(backend="sqlite", path=missing)
    assert str(missing) in str(info.value) and "create the directory" in str(info.value)
    assert not missing.parent.exists()


def test_a_file_that_is_not_a_database_fails_at_construction(tmp_path: Path) -> None:
    jsonl = tmp_path / "audit.jsonl"
    jsonl.write_text('{"ts":"2026-03-09T14:00:00.000Z","status":"ok"}\n' * 20)
    with pytest.raises(AuditWriteError) as info:
        AuditLog(backend=SQLiteBackend(jsonl))
    assert str(jsonl) in str(info.value) and "not a database" in str(info.value)
    assert jsonl.read_text().count("\n") == 20


def test_a_directory_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(AuditWriteError, match=str(tmp_path)):
        AuditLog(backend="sqlite", path=tmp_path)


def test_http_without_a_url_says_what_to_give() -> None:
    with pytest.raises(ConfigError, match="needs url="):
        AuditLog(backend="http")


def test_sqlite_retention_deletes_old_rows(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "a.db"
    log = AuditLog(backend=SQLiteBackend(db))
    for i in range(3):
        log.log("ok", key_id=f"k{i}", tool="t")
    log.close()
    con = sqlite3.connect(db)
    con.execute("UPDATE audit_log SET ts = '2020-01-01T00:00:00.000Z' WHERE key_id != 'k2'")
    con.commit()
    con.close()
    log = AuditLog(backend=SQLiteBackend(db, retention_days=30))
    log.close()
    con = sqlite3.connect(db)
    assert [r[0] for r in con.execute("SELECT key_id FROM audit_log")] == ["k2"]
    con.close()
    with pytest.raises(ConfigError, match="retention_days"):
        AuditLog(backend=SQLiteBackend(db, retention_days=0))
