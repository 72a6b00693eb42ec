"""Usage per key x tool x UTC day: the Rust book through its binding, and ``Usage`` over a
real SQLite key store file (record -> flush -> query, filters, pending rows, a flush that
fails while another connection holds the write lock)."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastmcp_guard import KeyStore
from fastmcp_guard._core import UsageBook
from fastmcp_guard.errors import ConfigError, InvalidArgumentError, StoreError
from fastmcp_guard.usage import OTHER, Usage, parse_day

from tests.inflight import wait_until

DAY = 20_500  # 2026-02-16
D = date(1970, 1, 1) + timedelta(days=DAY)


def stored(path: Path) -> list[tuple[Any, ...]]:
    """The rows of ``fmg_usage`` (none before the table exists)."""
    with sqlite3.connect(path) as c:
        if c.execute("SELECT 1 FROM sqlite_master WHERE name = 'fmg_usage'").fetchone() is None:
            return []
        return c.execute(
            "SELECT day, key_id, tool, calls, errors, cost, duration_ms, refusals "
            "FROM fmg_usage ORDER BY day, key_id, tool"
        ).fetchall()


@pytest.fixture
def usage(store: KeyStore) -> Any:
    u = Usage.for_store(store, flush_interval=0)
    u.book.set_day(DAY)
    yield u
    u.close()


def fill(u: Usage) -> None:
    """3 days x 2 keys x 2 tools, with errors and refusals."""
    for day in (DAY - 2, DAY - 1, DAY):
        for key in ("k1", "k2"):
            u.record_at(key, "search", "ok", 2, 10.0, day)
            u.record_at(key, "search", "error", 2, 30.0, day)
            u.record_at(key, "fetch", "ok", 5, 1.0, day)
            u.record_at(key, "fetch", "rate_limited", 5, 99.0, day)
    u.record_at("k1", "fetch", "would_refuse", 0, 0.0, DAY)


# -- the book ---------------------------------------------------------------------------


def test_book_counts_calls_cost_and_refusals_apart() -> None:
    book = UsageBook()
    book.record_at("k", "t", "ok", 3, 2.0, DAY)
    book.record_at("k", "t", "error", 1, 4.0, DAY)
    book.record_at("k", "t", "credits_exhausted", 7, 50.0, DAY)
    book.record_at("k", "t", "would_refuse", 0, 0.0, DAY)
    assert book.pending() == 1
    assert book.drain() == [
        (DAY, "k", "t", 2, 1, 4, 6.0, {"credits_exhausted": 1, "would_refuse": 1})
    ]
    assert book.pending() == 0
    assert book.drain() == []


def test_book_refuses_bad_kind_and_negative_cost() -> None:
    book = UsageBook()
    bad_kind = 'usage kind "Rate-Limited" is not valid; use .ok., .error. or a refusal kind'
    with pytest.raises(InvalidArgumentError, match=bad_kind):
        book.record("k", "t", "Rate-Limited", 1, 1.0)
    with pytest.raises(InvalidArgumentError, match="cost must be a whole number >= 0, got -1"):
        book.record("k", "t", "ok", -1, 1.0)
    with pytest.raises(InvalidArgumentError, match="max_rows must be at least 1"):
        UsageBook(max_rows=0)
    assert book.pending() == 0


def test_a_flood_of_distinct_keys_folds_into_other_and_keeps_every_count() -> None:
    u = Usage(flush_interval=0, max_rows=50)
    u.book.set_day(DAY)
    for i in range(5_000):
        u.record(f"attacker-{i}", f"tool-{i}", "ok", 1, 1.0)
        u.record(f"attacker-{i}", f"tool-{i}", "forbidden", 1, 1.0)
    assert u.pending() == 51  # the bound, plus the day's *other* row
    assert u.folded == 2 * (5_000 - 50)
    by_key = {r["key_id"]: r for r in u.query(by="key").rows}
    assert len(by_key) == 51
    assert by_key[OTHER]["calls"] == 5_000 - 50
    assert by_key[OTHER]["refusals"] == {"forbidden": 5_000 - 50}
    report = u.query(by="day")
    assert report.totals["calls"] == 5_000
    assert report.totals["refusals"] == {"forbidden": 5_000}
    u.close()


def test_long_key_ids_and_tool_names_are_cut_to_128_bytes() -> None:
    book = UsageBook()
    book.record_at("k" * 1000, "t" * 1000, "ok", 1, 1.0, DAY)
    (row,) = book.drain()
    assert (len(row[1]), len(row[2])) == (128, 128)


# -- Usage over SQLite ------------------------------------------------------------------


def test_flush_writes_one_row_per_key_tool_day_and_adds_up(usage: Usage, key_db: Path) -> None:
    fill(usage)
    assert usage.flush() == 12
    assert usage.pending() == 0
    fill(usage)
    assert usage.flush() == 12
    rows = stored(key_db)
    assert len(rows) == 12
    assert (D.isoformat(), "k1", "fetch", 2, 0, 10, 2.0,
            '{"rate_limited":2,"would_refuse":2}') in rows  # fmt: skip
    assert (D.isoformat(), "k2", "search", 4, 2, 8, 80.0, "{}") in rows


def test_query_sums_by_day_tool_and_key(usage: Usage) -> None:
    fill(usage)
    usage.flush()
    by_day = usage.query(by="day")
    assert [r["day"] for r in by_day.rows] == [(D - timedelta(days=n)).isoformat()
                                               for n in (2, 1, 0)]  # fmt: skip
    assert by_day.rows[0] == {"day": (D - timedelta(days=2)).isoformat(), "calls": 6, "errors": 2,
                              "cost": 18, "refusals": {"rate_limited": 2}, "duration_ms": 82.0,
                              "avg_ms": round(82.0 / 6, 3)}  # fmt: skip
    assert by_day.rows[2]["refusals"] == {"rate_limited": 2, "would_refuse": 1}
    assert by_day.totals == {"calls": 18, "errors": 6, "cost": 54,
                             "refusals": {"rate_limited": 6, "would_refuse": 1},
                             "duration_ms": 246.0, "avg_ms": round(246.0 / 18, 3)}  # fmt: skip
    by_tool = {r["tool"]: r for r in usage.query(by="tool").rows}
    assert by_tool["search"]["calls"] == 12 and by_tool["search"]["errors"] == 6
    assert by_tool["search"]["cost"] == 24 and by_tool["search"]["refusals"] == {}
    assert by_tool["fetch"]["calls"] == 6 and by_tool["fetch"]["cost"] == 30
    assert by_tool["fetch"]["refusals"] == {"rate_limited": 6, "would_refuse": 1}
    by_key = {r["key_id"]: r for r in usage.query(by="key").rows}
    assert by_key["k1"]["calls"] == by_key["k2"]["calls"] == 9
    assert by_key["k1"]["refusals"] == {"rate_limited": 3, "would_refuse": 1}


def test_query_filters_by_key_tool_and_days(usage: Usage) -> None:
    fill(usage)
    usage.flush()
    r = usage.query(key_id="k2", tool="fetch", since="2d", by="day")
    assert [x["day"] for x in r.rows] == [(D - timedelta(days=1)).isoformat(), D.isoformat()]
    assert r.totals["calls"] == 2 and r.totals["refusals"] == {"rate_limited": 2}
    assert (r.since, r.until, r.key_id, r.tool) == (D - timedelta(days=1), None, "k2", "fetch")
    only = usage.query(since=D - timedelta(days=1), until=D - timedelta(days=1))
    assert [x["day"] for x in only.rows] == [(D - timedelta(days=1)).isoformat()]
    dt = datetime(D.year, D.month, D.day, 23, 30, tzinfo=timezone(timedelta(hours=-2)))
    assert [x["day"] for x in usage.query(since=dt).rows] == []  # 01:30 UTC the next day
    assert usage.query(until="yesterday").totals["calls"] == 12
    assert usage.query(key_id="nobody").rows == []
    assert usage.query(key_id="nobody").totals["calls"] == 0


def test_query_includes_rows_not_yet_flushed(usage: Usage, key_db: Path) -> None:
    fill(usage)
    usage.flush()
    usage.record("k1", "search", "ok", 100, 5.0)
    usage.record("k9", "new", "ip_denied", 1, 0.0)
    assert usage.pending() == 2
    by_key = {r["key_id"]: r for r in usage.query(by="key").rows}
    assert by_key["k1"]["cost"] == 27 + 100
    assert by_key["k9"]["refusals"] == {"ip_denied": 1}
    assert usage.pending() == 2  # a query does not flush
    usage.flush()
    assert {r["key_id"]: r["cost"] for r in usage.query(by="key").rows}["k1"] == 127


def test_today_gives_this_keys_tools_for_the_current_day(usage: Usage) -> None:
    fill(usage)
    usage.flush()
    usage.record("k1", "search", "ok", 1, 2.0)
    today = usage.today("k1")
    assert today["day"] == D.isoformat() and today["key_id"] == "k1"
    assert set(today["tools"]) == {"search", "fetch"}
    assert today["tools"]["search"]["calls"] == 3
    assert today["tools"]["fetch"]["refusals"] == {"rate_limited": 1, "would_refuse": 1}
    assert today["totals"]["calls"] == 4 and today["totals"]["cost"] == 2 + 2 + 5 + 1


def test_a_failed_flush_keeps_the_rows_and_a_later_flush_writes_them_once(
    store: KeyStore, key_db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    u = Usage.for_store(store, flush_interval=0)
    u.storage.timeout = 0.05  # type: ignore[attr-defined]  # do not wait long on the lock
    u.book.set_day(DAY)
    fill(u)
    u.flush()
    fill(u)
    blocker = sqlite3.connect(key_db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the file
    try:
        with pytest.raises(StoreError, match="database is locked"):
            u.flush()
        assert u.pending() == 12
        u.record("k1", "search", "ok", 1, 1.0)  # merged with the kept rows
        assert u.pending() == 12
        assert u.query(by="day").totals["calls"] == 37  # the kept rows still count
        with caplog.at_level(logging.WARNING, logger="fastmcp_guard.usage"):
            u._flush_quietly()
        assert "flush to sqlite:///" in caplog.text and "12 pending rows are kept" in caplog.text
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert u.flush() == 12
    assert u.flush() == 0
    assert sum(r[3] for r in stored(key_db)) == 37
    assert u.query(by="day").totals["calls"] == 37
    u.close()


def test_the_background_thread_flushes_and_close_flushes_the_rest(
    store: KeyStore, key_db: Path
) -> None:
    u = Usage.for_store(store, flush_interval=0.02)
    u.record("k1", "search", "ok", 1, 1.0)
    wait_until(lambda: len(stored(key_db)) == 1, "the background flush")
    assert u.pending() == 0
    u.record("k1", "search", "ok", 1, 1.0)
    u.record("k2", "search", "ok", 1, 1.0)
    u.close()
    u.close()  # idempotent
    assert sum(r[3] for r in stored(key_db)) == 3


def test_two_processes_on_one_sqlite_file_add_up(store: KeyStore, key_db: Path) -> None:
    script = (
        "import sys\n"
        "from fastmcp_guard import KeyStore\n"
        "from fastmcp_guard.usage import Usage\n"
        "ks = KeyStore(backend='sqlite', path=sys.argv[1])\n"
        "u = Usage.for_store(ks, flush_interval=0)\n"
        "for i in range(1000):\n"
        "    u.record_at('k1', 'search', 'ok', 2, 0.5, 20500)\n"
        "    if i % 10 == 0:\n"
        "        u.record_at('k1', 'search', 'rate_limited', 2, 0.5, 20500)\n"
        "        u.flush()\n"
        "u.close(); ks.close()\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(key_db)]) for _ in range(2)]
    u = Usage.for_store(store, flush_interval=0)
    for _ in range(500):
        u.record_at("k1", "search", "ok", 2, 0.5, DAY)
    u.flush()
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    r = u.query(by="tool")
    assert r.rows[0]["calls"] == 2500 and r.rows[0]["cost"] == 5000
    assert r.rows[0]["refusals"] == {"rate_limited": 200}
    u.close()


def test_reading_a_store_without_usage_is_empty_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.db"
    u = Usage.open("sqlite", path=str(missing), flush_interval=0)
    assert u.query().rows == []
    u.close()
    assert not missing.exists()
    ks = KeyStore(backend="sqlite", path=tmp_path / "k.db")
    u = Usage.for_store(ks, flush_interval=0)
    assert u.query(by="key").totals["calls"] == 0
    u.close()
    ks.close()
    with sqlite3.connect(tmp_path / "k.db") as c:
        names = {r[0] for r in c.execute("SELECT name FROM sqlite_master")}
    assert "fmg_usage" not in names


def test_memory_key_store_keeps_usage_in_process() -> None:
    ks = KeyStore(backend="memory")
    u = Usage.for_store(ks, flush_interval=0)
    u.record("k", "t", "ok", 4, 1.0)
    u.flush()
    u.record("k", "t", "ok", 4, 1.0)
    assert u.storage.name == "memory"
    assert u.query(by="key").rows[0]["cost"] == 8
    u.close()
    ks.close()


def test_refusal_kinds_are_stored_as_json(usage: Usage, key_db: Path) -> None:
    usage.record("k", "t", "loop_detected", 1, 1.0)
    usage.flush()
    usage.record("k", "t", "loop_detected", 1, 1.0)
    usage.record("k", "t", "custom_rule", 1, 1.0)
    usage.flush()
    assert json.loads(stored(key_db)[0][7]) == {"custom_rule": 1, "loop_detected": 2}


# -- arguments --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "day"),
    [("today", DAY), ("yesterday", DAY - 1), ("1d", DAY), ("7d", DAY - 6), ("2w", DAY - 13),
     (" 3 days ", DAY - 2), ("2026-02-01", DAY - 15), ("2026-02-16T23:59:59Z", DAY),
     ("2026-02-16T23:00:00-02:00", DAY + 1), (D, DAY), (datetime(2026, 2, 16, 5), DAY)],
)  # fmt: skip
def test_parse_day_forms(given: Any, day: int) -> None:
    assert parse_day(given, today=DAY) == day


@pytest.mark.parametrize("bad", ["0d", "7x", "last week", "2026-13-01", "", "-3d", "99999999d"])
def test_parse_day_refuses_with_the_accepted_forms(bad: str) -> None:
    with pytest.raises(ConfigError, match="since"):
        parse_day(bad, today=DAY)


def test_query_refuses_bad_by_and_reversed_days(usage: Usage) -> None:
    with pytest.raises(ConfigError, match="by must be one of 'day', 'tool', 'key'"):
        usage.query(by="week")
    with pytest.raises(ConfigError, match="since .* is after until"):
        usage.query(since="today", until="yesterday")
    with pytest.raises(ConfigError, match=r"bad day 'soon'; give a number of days"):
        usage.query(until="soon")


def test_open_refuses_unknown_backend_and_missing_dsn() -> None:
    with pytest.raises(ConfigError, match="unknown key store backend 'mongo'"):
        Usage.open("mongo")
    with pytest.raises(ConfigError, match="needs its dsn"):
        Usage.open("redis")
    with pytest.raises(ConfigError, match="flush_interval must be >= 0"):
        Usage(flush_interval=-1)
