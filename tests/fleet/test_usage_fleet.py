"""Usage on the fleet key stores (real PostgreSQL and Redis): the rows go into the key
store's database, several writers (``Usage`` objects, processes) add up, queries sum and
filter, a store that cannot be reached keeps the rows for the next flush."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastmcp_guard import KeyStore
from fastmcp_guard.errors import StoreError
from fastmcp_guard.usage import REDIS_TTL_DAYS, Usage

from tests.fleet import test_fleet_keys

#: The fleet key store tests' fixtures: PostgreSQL (a fresh database per test) and Redis
#: (a fresh database per test).
pg = test_fleet_keys.pg
dsn = test_fleet_keys.dsn
redis_dsn = test_fleet_keys.redis_dsn

pytestmark = pytest.mark.fleet

DAY = 20_500  # 2026-02-16


@pytest.fixture(params=["postgres", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[KeyStore]:
    """A fleet key store of each kind in turn."""
    url = str(request.getfixturevalue("dsn" if request.param == "postgres" else "redis_dsn"))
    ks = KeyStore(backend=request.param, dsn=url)
    yield ks
    ks.close()


def fill(u: Usage, n: int = 1) -> None:
    for _ in range(n):
        for day in (DAY - 1, DAY):
            u.record_at("k1", "search", "ok", 2, 10.0, day)
            u.record_at("k1", "search", "error", 2, 30.0, day)
            u.record_at("k2", "fetch|raw", "ok", 5, 1.5, day)
            u.record_at("k2", "fetch|raw", "rate_limited", 5, 99.0, day)
            u.record_at("k2", "fetch|raw", "would_refuse", 0, 0.0, day)


def test_two_usage_objects_on_one_store_add_up(store: KeyStore) -> None:
    a = Usage.for_store(store, flush_interval=0)
    b = Usage.for_store(store, flush_interval=0)
    fill(a, 3)
    fill(b, 2)
    assert a.flush() == 4 and b.flush() == 4
    fill(a)
    a.flush()
    by_key = {r["key_id"]: r for r in b.query(by="key").rows}
    assert by_key["k1"] == {"key_id": "k1", "calls": 24, "errors": 12, "cost": 48,
                            "refusals": {}, "duration_ms": 480.0, "avg_ms": 20.0}  # fmt: skip
    assert by_key["k2"]["calls"] == 12 and by_key["k2"]["cost"] == 60
    assert by_key["k2"]["refusals"] == {"rate_limited": 12, "would_refuse": 12}
    by_tool = {r["tool"]: r for r in a.query(by="tool", key_id="k2").rows}
    assert list(by_tool) == ["fetch|raw"]  # a '|' in a tool name survives the Redis fields
    by_day = a.query(by="day", since="2026-02-16")
    assert [r["day"] for r in by_day.rows] == ["2026-02-16"]
    assert by_day.totals["calls"] == 18 and by_day.totals["refusals"]["rate_limited"] == 6
    assert a.query(tool="search", until="2026-02-15").totals["errors"] == 6
    a.close()
    b.close()


def test_writers_in_other_processes_add_up(store: KeyStore) -> None:
    url = store._dsn
    script = (
        "import sys\n"
        "from fastmcp_guard.usage import Usage\n"
        "u = Usage.open(sys.argv[1], dsn=sys.argv[2], flush_interval=0)\n"
        "for i in range(300):\n"
        "    u.record_at('k1', 'search', 'ok', 3, 1.0, 20500)\n"
        "    if i % 30 == 0:\n"
        "        u.record_at('k1', 'search', 'loop_detected', 3, 1.0, 20500)\n"
        "        u.flush()\n"
        "u.close()\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(store.backend), str(url)])
             for _ in range(2)]  # fmt: skip
    u = Usage.for_store(store, flush_interval=0)
    for _ in range(100):
        u.record_at("k1", "search", "ok", 3, 1.0, DAY)
    u.flush()
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    (row,) = u.query(by="tool").rows
    assert (row["calls"], row["cost"], row["refusals"]) == (700, 2100, {"loop_detected": 20})
    u.close()


def test_pending_rows_count_in_queries_and_today(store: KeyStore) -> None:
    u = Usage.for_store(store, flush_interval=0)
    u.book.set_day(DAY)
    fill(u)
    u.flush()
    u.record("k1", "search", "ok", 7, 5.0)
    today = u.today("k1")
    assert today["day"] == "2026-02-16"
    assert today["tools"]["search"]["calls"] == 3 and today["tools"]["search"]["cost"] == 11
    assert today["totals"]["errors"] == 1
    u.close()


def test_postgres_rows_are_a_table_in_the_key_store_database(dsn: str) -> None:
    ks = KeyStore(backend="postgres", dsn=dsn)
    u = Usage.for_store(ks, flush_interval=0)
    fill(u)
    u.flush()
    with psycopg.connect(dsn) as c:
        rows = c.execute("SELECT day::text, key_id, tool, calls, cost, refusals FROM fmg_usage "
                         "WHERE key_id = 'k2' ORDER BY day").fetchall()  # fmt: skip
    assert rows == [
        ("2026-02-15", "k2", "fetch|raw", 1, 5, {"rate_limited": 1, "would_refuse": 1}),
        ("2026-02-16", "k2", "fetch|raw", 1, 5, {"rate_limited": 1, "would_refuse": 1}),
    ]
    u.close()
    ks.close()


def test_redis_hashes_expire_after_the_retention(redis_dsn: str) -> None:
    import redis as redis_py

    ks = KeyStore(backend="redis", dsn=redis_dsn)
    u = Usage.for_store(ks, flush_interval=0)
    today = u.book.today()
    u.record("k1", "search", "ok", 2, 1.5)
    u.record("k1", "search", "forbidden", 2, 1.5)
    u.flush()
    client = redis_py.Redis.from_url(redis_dsn, decode_responses=True)
    day = u.query().rows[0]["day"]
    h = f"fmg:{{usage}}:d:{day}:k1"
    assert client.hgetall(h) == {"search|c": "1", "search|u": "2", "search|ms": "1.5",
                                 "search|r:forbidden": "1"}  # fmt: skip
    assert client.expiretime(h) == (today + 1 + REDIS_TTL_DAYS) * 86400
    assert client.smembers(f"fmg:{{usage}}:keys:{day}") == {"k1"}
    u.close()
    ks.close()


def test_an_unreachable_store_keeps_the_rows_for_the_next_flush(own_redis: Any) -> None:
    u = Usage.open("redis", dsn=own_redis.url, flush_interval=0)
    fill(u)
    own_redis.stop()
    try:
        with pytest.raises(StoreError, match="usage write to redis://"):
            u.flush()
        assert u.pending() == 4
        fill(u)  # merged with the kept rows
        assert u.pending() == 4
    finally:
        own_redis.start()
    assert u.flush() == 4
    assert u.flush() == 0
    assert u.query().totals["calls"] == 12
    assert u.query().totals["refusals"] == {"rate_limited": 4, "would_refuse": 4}
    u.close()
