"""The fleet key stores against real servers (PostgreSQL, Redis): the same lifecycle as
SQLite, fleet-wide revocation through NOTIFY / pub/sub, and the failure modes (listener
lost, server restarted, server down). Contract tests run over both stores."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastmcp_guard import KeyStore
from fastmcp_guard._core import VerifyError
from fastmcp_guard.errors import KeyNotFoundError, KeyRevokedError, StoreError

from tests.fleet.postgres_server import PostgresServer
from tests.inflight import verify_while, wait_until

pytestmark = pytest.mark.fleet


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    server = PostgresServer()
    yield server
    server.remove()


@pytest.fixture
def dsn(pg: PostgresServer) -> Iterator[str]:
    """A fresh database per test (the store creates its tables in it)."""
    name = f"t{time.monotonic_ns()}"
    with psycopg.connect(pg.dsn, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    yield pg.dsn.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
def redis_dsn(redis_server: Any) -> Iterator[str]:
    """A fresh Redis database per test (flushed first; 16 per server)."""
    db = (time.monotonic_ns() // 1000) % 15 + 1
    url = redis_server.url.rsplit("/", 1)[0] + f"/{db}"
    import redis as redis_py

    redis_py.Redis.from_url(url).flushdb()
    yield url


@pytest.fixture(params=["postgres", "redis"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Each fleet store in turn: the contract tests run over both."""
    return str(request.getfixturevalue("dsn" if request.param == "postgres" else "redis_dsn"))


def node(dsn: str, **kwargs: float) -> KeyStore:
    backend = "redis" if dsn.startswith("redis") else "postgres"
    return KeyStore(backend=backend, dsn=dsn, **kwargs)


def dump_store(dsn: str) -> str:
    """Everything the store holds, as text (to grep for secrets)."""
    if dsn.startswith("redis"):
        import redis as redis_py

        client = redis_py.Redis.from_url(dsn, decode_responses=True)
        out = {}
        for key in client.scan_iter("*"):
            kind = client.type(key)
            out[key] = (client.get(key) if kind == "string" else client.hgetall(key)
                        if kind == "hash" else client.zrange(key, 0, -1))  # fmt: skip
        return json.dumps(out)
    with psycopg.connect(dsn) as c:
        return json.dumps(c.execute("SELECT * FROM fmg_api_keys").fetchall(), default=str)


def wait_refused(store: KeyStore, token: str, within: float = 1.0) -> float:
    """Seconds until ``store`` no longer admits ``token`` from its cache or the database."""
    start = time.monotonic()
    while True:
        if store.core.verify_cached(token) is None:
            try:
                store.core.verify(token, None)
            except VerifyError:
                return time.monotonic() - start
        elapsed = time.monotonic() - start
        assert elapsed < within, f"still admitted after {elapsed:.2f}s"
        time.sleep(0.005)


def test_lifecycle_matches_the_other_stores_and_no_token_is_stored(store_url: str) -> None:
    dsn = store_url
    store = node(dsn)
    key = store.create("alice", scopes=["read:data"], metadata={"team": "data"},
                       expires_in_days=30)  # fmt: skip
    assert key.token is not None and key.id.startswith("fmg_key_")
    got = store.verify(key.token)
    assert got is not None and got.name == "alice" and got.metadata == {"team": "data"}
    assert got.expires_at is not None and got.token is None
    new = store.rotate(key.id, grace_period_hours=1)
    assert store.verify(key.token) is not None and store.verify(str(new.token)) is not None
    assert store.get(key.id).status == "rotating"
    assert [k.name for k in store.list()] == ["alice", "alice"]
    store.revoke(new.id)
    store.revoke(key.id)
    assert store.verify(str(new.token)) is None and store.verify(key.token) is None
    assert store.list() == [] and len(store.list(include_revoked=True)) == 2
    with pytest.raises(KeyRevokedError, match=key.id):
        store.rotate(key.id)
    with pytest.raises(KeyNotFoundError, match="fmg_key_0000000000000000"):
        store.revoke("fmg_key_0000000000000000")
    store.flush()  # last_used_at written in a batch
    assert store.get(key.id).last_used_at is not None
    store.close()
    # Only hashes at rest: no token text anywhere in the store.
    dump = dump_store(dsn)
    assert key.token not in dump and str(new.token) not in dump
    assert "$argon2id$" in dump


def test_revoking_a_key_revokes_its_predecessors_in_grace_on_every_node(
    store_url: str,
) -> None:
    """Issue 10, finding 16, over PostgreSQL and Redis: the old token of a rotation does not
    outlive the revocation of its successor, on this node or another."""
    a, b = node(store_url), node(store_url, watch_interval_seconds=3600)  # b: notified only
    first = a.create("svc")
    second = a.rotate(first.id, grace_period_hours=24)
    third = a.rotate(second.id, grace_period_hours=1)
    for key in (first, second, third):
        assert b.verify(str(key.token)) is not None  # cached on b
    revoked = a.revoke(third.id)
    for key in (third, second, first):
        wait_refused(b, str(key.token))
        assert a.verify(str(key.token)) is None
        assert a.get(key.id).status == "revoked"
    assert revoked.revoked_predecessors == [second.id, first.id]
    a.close()
    b.close()


def test_a_key_made_on_one_node_works_on_another_and_revocation_is_fleet_wide(
    store_url: str,
) -> None:
    dsn = store_url
    a, b = node(dsn), node(dsn, watch_interval_seconds=3600)  # b learns through NOTIFY only
    key = a.create("bob")
    assert b.verify(str(key.token)) is not None
    assert b.core.verify_cached(str(key.token)) is not None  # cached on b
    a.revoke(key.id)
    assert wait_refused(b, str(key.token)) < 1.0
    a.close()
    b.close()


def test_revocation_propagation_p99_over_many_revocations(store_url: str) -> None:
    dsn = store_url
    a, b = node(dsn), node(dsn, watch_interval_seconds=3600)
    delays = []
    for i in range(30):
        key = a.create(f"k{i}")
        b.core.verify(str(key.token), None)
        a.revoke(key.id)
        delays.append(wait_refused(b, str(key.token)))
    delays.sort()
    assert delays[-1] < 1.0, delays
    a.close()
    b.close()


def test_a_lost_listener_reconnects_and_clears_the_cache(dsn: str, pg: PostgresServer) -> None:
    a, b = node(dsn), node(dsn, watch_interval_seconds=3600)
    key = a.create("carol")
    b.core.verify(str(key.token), None)
    listener = b._listener
    assert listener.listening.wait(5)
    pid = listener.backend_pid()
    with psycopg.connect(pg.dsn, autocommit=True) as c:
        c.execute("SELECT pg_terminate_backend(%s)", (pid,))
    # The revoke's NOTIFY may be lost while b is deaf; b must still refuse soon.
    a.revoke(key.id)
    assert wait_refused(b, str(key.token), within=10.0) < 10.0
    deadline = time.monotonic() + 10
    while listener.reconnects < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert listener.listening.wait(5)
    other = a.create("dave")
    b.core.verify(str(other.token), None)
    a.revoke(other.id)
    assert wait_refused(b, str(other.token)) < 1.0  # notifications flow again
    a.close()
    b.close()


def test_without_notifications_the_cache_ttl_bounds_the_delay(store_url: str) -> None:
    dsn = store_url
    a = node(dsn)
    b = node(dsn, watch_interval_seconds=3600, cache_ttl_seconds=1.0)
    b._listener.close()  # no notifications at all
    key = a.create("erin")
    b.core.verify(str(key.token), None)
    a.revoke(key.id)
    assert 0.0 <= wait_refused(b, str(key.token), within=2.0) < 2.0
    a.close()
    b.close()


def notified(store: KeyStore, change: Callable[[], object]) -> Callable[[], None]:
    """Makes ``change`` on another node, then waits until ``store`` applied its change
    notice (NOTIFY / pub/sub; ``store``'s watcher is off)."""

    def run() -> None:
        before = store.core.stats()["invalidations"]
        change()
        wait_until(lambda: store.core.stats()["invalidations"] > before,
                   "the change notice reaching the verifying node")  # fmt: skip

    return run


def test_another_nodes_change_to_another_key_costs_a_verification_in_flight_no_argon2_run(
    store_url: str,
) -> None:
    a, b = node(store_url, watch_interval_seconds=3600), node(store_url)
    assert a._listener.listening.wait(5)
    key, other = b.create("a"), b.create("b")
    token = str(key.token)
    # While a's verification of `key` is in flight, b revokes `other` and a hears of it.
    got = verify_while(a.core, a._fleet_backend, token, key.id,
                       notified(a, lambda: b.revoke(other.id)))  # fmt: skip
    assert got.key_id == key.id
    assert a.core.verify_cached(token) is not None
    a.core.verify(token, None)
    assert a.core.stats()["argon2_runs"] == 1
    a.close()
    b.close()


def test_another_nodes_revocation_of_a_key_in_flight_leaves_it_uncached(store_url: str) -> None:
    a, b = node(store_url, watch_interval_seconds=3600), node(store_url)
    assert a._listener.listening.wait(5)
    key = b.create("a")
    token = str(key.token)
    got = verify_while(a.core, a._fleet_backend, token, key.id,
                       notified(a, lambda: b.revoke(key.id)))  # fmt: skip
    assert got.key_id == key.id  # read before the revocation: this request is admitted
    assert a.core.verify_cached(token) is None
    with pytest.raises(VerifyError) as exc:
        a.core.verify(token, None)
    assert exc.value.reason == "revoked"
    a.close()
    b.close()


def test_restart_and_outage(dsn: str, pg: PostgresServer) -> None:
    store = node(dsn)
    key = store.create("frank")
    uncached = store.create("frank2")
    store.core.verify(str(key.token), None)
    pg.stop()
    try:
        # Cached tokens keep working; a token that needs the database gets "store" (the
        # HTTP layer answers 503 + Retry-After), never a wrong "invalid".
        assert store.core.verify_cached(str(key.token)) is not None
        with pytest.raises(VerifyError) as exc:
            store.core.verify(str(uncached.token), None)
        assert exc.value.reason == "store"
        with pytest.raises(StoreError, match=r"postgresql://fmg:\*\*\*\*@"):
            store.create("nope")
    finally:
        pg.start()
    # Reconnects by itself: no new KeyStore.
    other = store.create("grace")
    assert store.verify(str(other.token)) is not None
    assert store._listener.listening.wait(15)
    store.close()


def test_unreachable_server_and_bad_dsn_fail_at_construction() -> None:
    from fastmcp.utilities.tests import find_available_port

    port = find_available_port()
    with pytest.raises(
        StoreError, match=f"cannot connect to postgresql://u:\\*\\*\\*\\*@127.0.0.1:{port}"
    ):
        KeyStore(backend="postgres", dsn=f"postgresql://u:pw@127.0.0.1:{port}/x")
    with pytest.raises(Exception, match="dsn="):
        KeyStore(backend="postgres")


async def test_two_guarded_servers_share_keys_through_postgres(dsn: str, tmp_path: Path) -> None:
    from tests.cli.test_cli_keys import create, ok
    from tests.cli.test_cli_run import call, http_status, start_server, stop_server

    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    a, b = start_server(a_dir, "--keys", dsn), start_server(b_dir, "--keys", dsn)
    try:
        key = create(a_dir, "--name", "fleet", "--keys", dsn)  # through node A's store
        assert (await call(b, key["token"])).data == "hi"  # works on node B
        assert http_status(b, key["token"]) == 200
        ok(a_dir, "keys", "revoke", key["id"], "--force", "--keys", dsn)
        start = time.monotonic()
        while http_status(b, key["token"]) != 401:
            assert time.monotonic() - start < 1.0
            await asyncio.sleep(0.02)
    finally:
        stop_server(a)
        stop_server(b)


# -- Redis specifics -------------------------------------------------------------------


def test_redis_lost_subscription_reconnects_and_clears_the_cache(redis_dsn: str) -> None:
    a, b = node(redis_dsn), node(redis_dsn, watch_interval_seconds=3600)
    key = a.create("carol")
    b.core.verify(str(key.token), None)
    listener = b._listener
    assert listener.listening.wait(5)
    listener.kill_connection()
    a.revoke(key.id)  # its message may be lost while b is away
    assert wait_refused(b, str(key.token), within=10.0) < 10.0
    deadline = time.monotonic() + 10
    while listener.reconnects < 1 or not listener.listening.is_set():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    other = a.create("dave")
    b.core.verify(str(other.token), None)
    a.revoke(other.id)
    assert wait_refused(b, str(other.token)) < 1.0
    a.close()
    b.close()


def test_redis_restart_and_outage(own_redis: Any) -> None:
    url = own_redis.url
    store = node(url)
    key = store.create("frank")
    uncached = store.create("frank2")
    store.core.verify(str(key.token), None)
    own_redis.stop()
    try:
        assert store.core.verify_cached(str(key.token)) is not None
        with pytest.raises(VerifyError) as exc:
            store.core.verify(str(uncached.token), None)
        assert exc.value.reason == "store"
        with pytest.raises(StoreError, match="redis://127.0.0.1"):
            store.create("nope")
    finally:
        own_redis.start()
    # No persistence in the test server: the restarted Redis is empty. The store
    # reconnects by itself and works again.
    other = store.create("grace")
    assert store.verify(str(other.token)) is not None
    assert store._listener.listening.wait(15)
    store.close()


def test_redis_unreachable_fails_at_construction_with_the_password_masked() -> None:
    from fastmcp.utilities.tests import find_available_port

    port = find_available_port()
    with pytest.raises(
        StoreError, match=f"cannot connect to redis://:\\*\\*\\*\\*@127.0.0.1:{port}"
    ):
        KeyStore(backend="redis", dsn=f"redis://:hunter2@127.0.0.1:{port}/0")
