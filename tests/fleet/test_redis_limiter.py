"""What only the Redis limiter has: one round trip, its keys, TTLs, the script's life cycle."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastmcp_guard import RateLimit
from fastmcp_guard.errors import ConfigError, MissingExtraError
from fastmcp_guard.rate.redis import LUA_CHECK_SHA
from redis.crc import key_slot

from tests.fleet.conftest import SEC, T0, RedisServer

pytestmark = [pytest.mark.fleet, pytest.mark.redis]


@contextmanager
def client_commands(server: RedisServer) -> Iterator[list[str]]:
    """The commands clients send while the block runs (``MONITOR``; the commands a script
    runs inside Redis are left out): filled in when the block ends."""
    client, marker_client = server.client(), server.client()
    marker_client.ping()  # connected before MONITOR starts, so its HELLO is not seen
    seen: list[str] = []
    with client.monitor() as monitor:
        yield seen
        marker = "fmg-test-end-of-block"
        marker_client.echo(marker)
        for event in monitor.listen():
            if event["command"] == f"ECHO {marker}":
                break
            if event["client_type"] != "lua":
                seen.append(event["command"].split(" ", 1)[0].upper())
    client.close()
    marker_client.close()


@pytest.fixture
def limit(redis_server: RedisServer, key_prefix: str) -> Any:
    made = RateLimit("5/minute", "100/minute", backend="redis", url=redis_server.url,
                     key_prefix=key_prefix)  # fmt: skip
    made.set_tool_rate("search", "2/minute")
    yield made
    made.close()


async def test_each_call_is_exactly_one_evalsha(
    limit: RateLimit, redis_server: RedisServer
) -> None:
    await limit.acquire("warm-up")  # connects, loads the script
    with client_commands(redis_server) as sent:
        for i in range(20):
            await limit.acquire(f"k{i % 3}", "search" if i % 2 else None)
    assert sent == ["EVALSHA"] * 20


async def test_a_flushed_script_is_loaded_again(
    limit: RateLimit, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    assert await limit.acquire("k") is None
    client.script_flush()
    assert client.script_exists(LUA_CHECK_SHA) == [False]
    assert await limit.acquire("k") is None
    assert limit.hit("k") is None, "the sync twin too"
    assert client.script_exists(LUA_CHECK_SHA) == [True]
    client.script_flush()
    results = await asyncio.gather(*(limit.acquire(f"j{i}") for i in range(10)))
    assert results == [None] * 10, "a pipelined batch reloads it too"
    assert (await limit.status_async("k"))["per_key"]["used"] == 3


async def test_all_keys_of_a_call_share_one_cluster_slot(limit: RateLimit) -> None:
    remote = limit.remote
    assert remote is not None
    names = [remote.hash_key("alice"), remote.hash_key("bob{x}"), remote.global_key]
    assert all("{g}" in n for n in names)
    assert len({key_slot(n.encode()) for n in names}) == 1, "global limit: one slot for all"


def test_without_a_global_limit_callers_spread_over_slots(
    redis_server: RedisServer, key_prefix: str
) -> None:
    limit = RateLimit("5/minute", backend="redis", url=redis_server.url, key_prefix=key_prefix)
    remote = limit.remote
    assert remote is not None
    slots = {key_slot(remote.hash_key(f"fmg_key_{i}").encode()) for i in range(50)}
    assert len(slots) > 40
    limit.set_tool_rate("t", "1/minute")
    assert limit.hit("fmg_key_1", "t") is None
    assert limit.hit("fmg_key_1", "t") is not None, "per-key and tool buckets in one hash"
    limit.close()


async def test_every_key_expires_when_its_bucket_is_full_again(
    limit: RateLimit, redis_server: RedisServer, key_prefix: str
) -> None:
    client = redis_server.client()
    assert await limit.acquire("k", "search") is None
    remote = limit.remote
    assert remote is not None
    hash_ttl = client.pttl(remote.hash_key("k"))
    global_ttl = client.pttl(remote.global_key)
    # per key: TAT 12 s ahead; tool: 30 s ahead (the hash lives as long as its longest
    # bucket); global: 0.6 s ahead.
    assert 29_000 < hash_ttl <= 30_000
    assert 0 < global_ttl <= 600
    assert all(client.pttl(n) > 0 for n in client.scan_iter(match=key_prefix + "*"))


async def test_buckets_are_on_the_redis_clock(limit: RateLimit, redis_server: RedisServer) -> None:
    client = redis_server.client()
    assert await limit.acquire("k") is None
    secs, micros = client.time()
    redis_now = secs * SEC + micros * 1000
    remote = limit.remote
    assert remote is not None
    tat = int(client.hget(remote.hash_key("k"), "k"))
    assert 0 < redis_now + 12 * SEC - tat < 5 * SEC, "TAT = Redis TIME at the call + T"


def test_odd_key_ids_tool_names_and_prefixes_round_trip(redis_server: RedisServer) -> None:
    prefix = "p*[?]\\:"
    limit = RateLimit("1/minute", backend="redis", url=redis_server.url, key_prefix=prefix)
    limit.set_tool_rate("tool:with}brace", "1/minute")
    keys = ["ip:127.0.0.1", "a}b{c", "", "ключ", "x:k:y"]
    for key in keys:
        assert limit.hit(key, "tool:with}brace") is None
        assert limit.hit(key) is not None
    assert limit.tracked_keys() == sorted(keys)
    status = limit.status("a}b{c")
    assert status["per_key"]["used"] == 1 and status["tools"]["tool:with}brace"]["used"] == 1
    assert limit.reset("a}b{c") is True
    assert limit.tracked_keys() == sorted(set(keys) - {"a}b{c"})
    other = RateLimit("1/minute", backend="redis", url=redis_server.url, key_prefix="p:")
    assert other.tracked_keys() == [], "another prefix sees none of them"
    for key in keys:
        limit.reset(key)
    limit.close()
    other.close()


async def test_two_limiters_on_one_redis_share_the_buckets(
    redis_server: RedisServer, key_prefix: str
) -> None:
    a, b = (RateLimit("3/hour", backend="redis", url=redis_server.url, key_prefix=key_prefix)
            for _ in range(2))  # fmt: skip
    assert [await x.acquire("k") for x in (a, b, a)] == [None] * 3
    assert await b.acquire("k") is not None
    assert await a.tracked_keys_async() == await b.tracked_keys_async() == ["k"]
    assert await b.reset_async("k") is True
    assert await a.acquire("k") is None, "a reset through one node holds on every node"
    a.close()
    b.close()


def test_a_missing_redis_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'fastmcp-guard\[redis\]'"):
        RateLimit("1/minute", backend="redis")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"backend": "redis", "url": "http://h:1"}, "bad Redis URL 'http://h:1'"),
        ({"backend": "redis", "url": "redis://:hunter2@h:notaport/0"}, r"redis://:\*\*\*\*@h"),
        ({"backend": "redis", "on_backend_error": "ignore"}, "'allow', 'deny' or 'local'"),
        ({"backend": "redis", "key_prefix": "a{b}:"}, "without '{' or '}'"),
        ({"backend": "redis", "timeout": 0}, "timeout must be > 0"),
        ({"url": "redis://h:1/0"}, r"apply to RateLimit\(backend='redis'\) only"),
        ({"on_backend_error": "deny"}, r"applies to RateLimit\(backend='redis'\) only"),
        ({"backend": "memcached"}, "expected 'memory' or 'redis'"),
    ],
)
def test_bad_options_say_what_to_fix(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        RateLimit("1/minute", **options)
    assert "hunter2" not in str(info.value)


def test_repr_masks_the_password() -> None:
    limit = RateLimit("1/minute", backend="redis", url="redis://:hunter2@redis:6379/0",
                      on_backend_error="local")  # fmt: skip
    assert repr(limit) == (
        "RateLimit(per_key='1/minute', global_limit=None, backend='redis', "
        "url='redis://:****@redis:6379/0', on_backend_error='local')"
    )


def test_injected_times_do_not_disturb_the_real_clock(limit: RateLimit) -> None:
    remote = limit.remote
    assert remote is not None
    assert remote.check("k", None, now_ns=T0) is None
    assert remote.status("k", now_ns=T0)["per_key"]["used"] == 1


async def test_concurrent_calls_share_round_trips_and_stay_exact(
    redis_server: RedisServer, key_prefix: str
) -> None:
    limit = RateLimit("100/hour", "150/hour", backend="redis", url=redis_server.url,
                      key_prefix=key_prefix)  # fmt: skip
    await limit.status_async("warm-up")
    with client_commands(redis_server) as sent:
        results = await asyncio.gather(*(limit.acquire("a" if i % 2 else "b") for i in range(400)))
    assert sent == ["EVALSHA"] * 400, "one command per call, pipelined"
    refusals = [r for r in results if r is not None]
    assert len(results) - len(refusals) == 150, "the global limit binds: 2 keys x 100 > 150"
    assert {r.scope for r in refusals} <= {"per_key", "global"}
    a, b = await limit.status_async("a"), await limit.status_async("b")
    assert a["per_key"]["used"] + b["per_key"]["used"] == 150
    limit.close()
