"""Credits across processes: real node processes spend one key's credits on one store.

Each node (``tests/fleet/credit_node.py``) is a separate Python process with its own
``CreditBook`` over the same store: Redis, PostgreSQL, or one SQLite file.

- N credits and 3N concurrent calls spread over two nodes: exactly N are paid;
- a node killed with ``kill -9`` while it holds a lease loses that lease and nothing more:
  the store balance is the original minus what was paid minus the unspent lease, and
  that lease is at most ``lease_max``;
- a node that closes gives its unspent lease back.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from fastmcp_guard.keys import KeyStore

from tests.fleet.test_fleet_keys import dsn, pg, redis_dsn  # noqa: F401 - the fixtures

pytestmark = pytest.mark.fleet

HERE = Path(__file__).parent


@pytest.fixture(params=["sqlite", "postgres", pytest.param("redis", marks=pytest.mark.redis)])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """``(backend, file / DSN / URL)``: each shared store in turn."""
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "keys.db")
    if request.param == "postgres":
        return "postgres", str(request.getfixturevalue("dsn"))
    return "redis", str(request.getfixturevalue("redis_dsn"))


def open_store(where: tuple[str, str]) -> KeyStore:
    backend, place = where
    if backend == "sqlite":
        return KeyStore(backend="sqlite", path=place)
    return KeyStore(backend=backend, dsn=place)


def start_nodes(where: tuple[str, str], key_id: str, calls: int, lease_max: int, mode: str,
                nodes: int) -> list[subprocess.Popen[str]]:  # fmt: skip
    argv = [sys.executable, str(HERE / "credit_node.py"), where[0], where[1], key_id,
            str(calls), str(lease_max), mode]  # fmt: skip
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    procs = [subprocess.Popen(argv, text=True, **pipes) for _ in range(nodes)]  # type: ignore[call-overload]
    for proc in procs:  # each says "ready" once its store is open
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", line + (proc.stderr.read() if proc.stderr else "")
    for proc in procs:  # the start signal, for all at once
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    return procs


def finish(procs: list[subprocess.Popen[str]]) -> list[dict[str, int]]:
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            results.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def balance(where: tuple[str, str], key_id: str) -> int | None:
    store = open_store(where)
    try:
        key = store.inspect(key_id)
    finally:
        store.close()
    return key.credits


@pytest.mark.slow
def test_n_credits_and_3n_concurrent_calls_on_two_processes_pay_exactly_n(
    where: tuple[str, str],
) -> None:
    n = 150
    store = open_store(where)
    key = store.create("agent", credits=n)
    store.close()
    results = finish(start_nodes(where, key.id, calls=3 * n // 2, lease_max=256,
                                 mode="close", nodes=2))  # fmt: skip
    paid = [r["paid"] for r in results]
    assert sum(paid) == n, results
    assert sum(r["refused"] for r in results) == 2 * n
    assert balance(where, key.id) == 0


def test_a_node_killed_with_a_lease_loses_at_most_that_lease(where: tuple[str, str]) -> None:
    n, calls, lease_max = 1000, 10, 40
    store = open_store(where)
    key = store.create("agent", credits=n)
    store.close()
    [proc] = start_nodes(where, key.id, calls=calls, lease_max=lease_max, mode="hold", nodes=1)
    try:
        assert proc.stdout is not None
        report = json.loads(proc.stdout.readline())
        assert report["paid"] == calls
        assert 0 < report["held"] <= lease_max, report  # a lease is outstanding
        proc.send_signal(signal.SIGKILL)  # kill -9: no close, no give-back
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = balance(where, key.id)
    assert left == n - calls - report["held"]
    assert left >= n - calls - lease_max  # the crash bound


def test_a_node_that_closes_gives_its_lease_back(where: tuple[str, str]) -> None:
    n = 500
    store = open_store(where)
    key = store.create("agent", credits=n)
    store.close()
    [result] = finish(start_nodes(where, key.id, calls=7, lease_max=64, mode="close", nodes=1))
    assert result["paid"] == 7
    assert balance(where, key.id) == n - 7


@pytest.fixture(params=["postgres", pytest.param("redis", marks=pytest.mark.redis)])
def fleet(request: pytest.FixtureRequest) -> tuple[str, str]:
    if request.param == "postgres":
        return "postgres", str(request.getfixturevalue("dsn"))
    return "redis", str(request.getfixturevalue("redis_dsn"))


def test_credit_operations_on_the_fleet_stores(fleet: tuple[str, str]) -> None:
    from datetime import timedelta

    from fastmcp_guard.keys.verifier import access_token_for

    a, b = open_store(fleet), open_store(fleet)
    try:
        key = a.create("agent", credits=3, refill="10/day", credits_shadow=True)
        assert b.inspect(key.id) == key
        assert key.refill_at is not None
        before = key.refill_at - timedelta(milliseconds=1)
        lease = a.lease_credits(key.id, 5, before)
        assert lease is not None and (lease.granted, lease.balance_after, lease.epoch) == (3, 0, 0)
        lease = b.lease_credits(key.id, 4, key.refill_at)  # midnight UTC: topped up to 10
        assert lease is not None and (lease.granted, lease.balance_after, lease.epoch) == (4, 6, 1)
        assert lease.refill_at == (key.refill_at + timedelta(days=1)).timestamp()
        assert (lease.base, lease.shadow) == (10, True)
        assert not a.return_credits(key.id, 3, 0), "the old day's lease is dropped"
        assert b.return_credits(key.id, 2, 1)
        assert a.inspect(key.id).credits == 8
        assert a.add_credits(key.id, -100).credits == 0
        assert b.set_credits(key.id, 2**53).credits == 2**53, "exact at the largest balance"
        assert a.lease_credits(key.id, 1, key.refill_at) is not None
        assert b.inspect(key.id).credits == 2**53 - 1
        # The claim follows a set in another process (a new revision, announced).
        plain = a.create("plain")
        assert plain.token is not None
        claims = access_token_for(plain.token, b.core.verify(plain.token)).claims
        assert "credits" not in claims
        a.set_credits(plain.id, 5)
        b.core.sync_changes()
        claims = access_token_for(plain.token, b.core.verify(plain.token)).claims
        assert claims["credits"] == {"shadow": False}
        # Rotation moves the balance.
        new = a.rotate(plain.id, grace_period_hours=1)
        assert (new.credits, b.inspect(plain.id).credits) == (5, 0)
    finally:
        a.close()
        b.close()


def test_a_version_1_postgres_store_gains_credits_and_keeps_its_keys(dsn: str) -> None:  # noqa: F811
    from fastmcp_guard.keys import postgres

    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(postgres._MIGRATIONS[1])
        c.execute("CREATE TABLE fmg_schema_version (version INTEGER NOT NULL)")
        c.execute("INSERT INTO fmg_schema_version VALUES (1)")
        c.execute(
            "INSERT INTO fmg_api_keys (id, name, phc_hash, scopes, metadata, status, created_at,"
            " revision) VALUES ('fmg_key_AAAAAAAAAAAAAAAA', 'old', '$argon2id$x', '[]', '{}',"
            " 'active', now(), nextval('fmg_key_revision'))"
        )
    store = KeyStore(backend="postgres", dsn=dsn)
    try:
        old = store.inspect("fmg_key_AAAAAAAAAAAAAAAA")
        assert (old.name, old.credits) == ("old", None)
        assert store.set_credits(old.id, 12).credits == 12
    finally:
        store.close()
    with psycopg.connect(dsn) as c:
        row = c.execute("SELECT max(version) FROM fmg_schema_version").fetchone()
    assert row is not None and row[0] == postgres.SCHEMA_VERSION == 2
