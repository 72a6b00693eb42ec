"""Redis stopped in the middle of a run: each ``on_backend_error`` policy does what it
declares; Redis started again: the nodes share their limits again."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastmcp import Client, FastMCP
from fastmcp_guard import Guard, KeyStore, RateLimit, RateLimitExceeded
from fastmcp_guard.errors import RateBackendError

from tests.fleet.conftest import RedisServer

pytestmark = [pytest.mark.fleet, pytest.mark.redis]


def node(server: RedisServer, per_key: str, policy: str, **options: Any) -> RateLimit:
    """One node's limiter; every call tries Redis (no pause after a failure)."""
    limit = RateLimit(per_key, backend="redis", url=server.url, on_backend_error=policy,
                      key_prefix="outage:", **options)  # fmt: skip
    assert limit.remote is not None
    limit.remote.retry_interval = 0.0
    return limit


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fastmcp_guard.rate"]


async def test_allow_admits_while_redis_is_down_and_warns_once(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    limit = node(own_redis, "1/hour", "allow")
    assert await limit.acquire("k") is None
    assert await limit.acquire("k") is not None
    # RateLimit.check: with Redis the decision is one round trip away.
    wrapped = RateLimit(per_key="1/hour", backend="redis", url=own_redis.url,
                        key_prefix="fmg:check:")  # fmt: skip
    pending = wrapped.check("k")
    assert not pending.settled and repr(pending) == "Decision(pending)"
    assert await pending.settle() is None and pending.settled
    assert not await wrapped.check("k"), "0.2's await check(): False when refused"
    await wrapped.aclose()
    own_redis.stop()
    assert [await limit.acquire("k") for _ in range(5)] == [None] * 5
    (warning,) = warnings_of(caplog)
    assert f"Redis at {own_redis.url} unreachable" in warning
    assert "admitting calls unchecked (on_backend_error='allow')" in warning
    own_redis.start()
    assert await limit.acquire("k") is None, "Redis restarted empty: a fresh bucket"
    assert await limit.acquire("k") is not None, "and shared limits apply again"
    assert "answers again" in warnings_of(caplog)[-1]
    limit.close()


async def test_deny_refuses_with_a_clear_error_while_redis_is_down(
    own_redis: RedisServer,
) -> None:
    limit = node(own_redis, "5/hour", "deny")
    assert await limit.acquire("k") is None
    own_redis.stop()
    refusal = await limit.acquire("k")
    assert refusal is not None and (refusal.scope, refusal.retry_after) == ("backend", 1.0)
    exc = RateLimitExceeded(refusal)
    assert str(exc) == (
        "Rate limiter unavailable: the shared limits cannot be checked right now "
        "(on_backend_error='deny'); retry after 1.00 s"
    )
    assert exc.data == {"error": "rate_limiter_unavailable", "scope": "backend", "limit": None,
                        "remaining": 0, "retry_after": 1.0, "reset": 1.0}  # fmt: skip
    assert limit.hit("k") is not None, "the sync twin too"
    own_redis.start()
    assert await limit.acquire("k") is None
    limit.close()


async def test_local_limits_per_node_while_down_then_shares_again(
    own_redis: RedisServer,
) -> None:
    a, b = node(own_redis, "2/hour", "local"), node(own_redis, "2/hour", "local")
    assert [await a.acquire("k"), await b.acquire("k")] == [None, None]
    assert await a.acquire("k") is not None, "shared: 2 across both nodes"
    own_redis.stop()
    for limit in (a, b):  # each node now limits on its own, with the same rate
        assert [await limit.acquire("k") for _ in range(2)] == [None, None]
        refusal = await limit.acquire("k")
        assert refusal is not None and refusal.scope == "per_key" and refusal.limit == "2/hour"
    own_redis.start()
    assert [await a.acquire("k"), await b.acquire("k")] == [None, None]
    assert await a.acquire("k") is not None and await b.acquire("k") is not None, "shared again"
    a.close()
    b.close()


async def test_a_guarded_server_answers_the_declared_error(own_redis: RedisServer) -> None:
    mcp: FastMCP[Any] = FastMCP("fleet")

    @mcp.tool
    def echo(text: str) -> str:
        return text

    guard = Guard(mcp, keys=KeyStore(backend="memory"),
                  rate_limit=node(own_redis, "100/minute", "deny"))  # fmt: skip
    async with Client(mcp) as client:
        assert (await client.call_tool("echo", {"text": "hi"})).data == "hi"
        own_redis.stop()
        refused = await client.call_tool("echo", {"text": "hi"}, raise_on_error=False)
        assert refused.is_error and "Rate limiter unavailable" in refused.content[0].text
        assert refused.structured_content["retry_after"] == 1.0
        own_redis.start()
        assert (await client.call_tool("echo", {"text": "hi"})).data == "hi"
    guard.close()


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A TCP port that accepts connections and never answers (a hung Redis)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    sock.close()


async def test_a_hung_redis_costs_one_timeout_then_nothing(black_hole: str) -> None:
    limit = RateLimit("5/minute", backend="redis", url=black_hole, on_backend_error="deny")
    start = time.perf_counter()
    first = await limit.acquire("k")
    first_took = time.perf_counter() - start
    assert first is not None and first.scope == "backend"
    assert first_took < 0.5, f"one call waited {first_took:.3f} s"
    start = time.perf_counter()
    for _ in range(200):  # Redis is not tried again for retry_interval (1 s)
        assert await limit.acquire("k") is not None
    assert time.perf_counter() - start < 0.1
    assert limit.remote is not None and not limit.remote.available
    limit.close()


async def test_status_and_reset_say_what_failed(own_redis: RedisServer) -> None:
    limit = node(own_redis, "5/hour", "allow")
    own_redis.stop()
    for call in (limit.status_async("k"), limit.reset_async("k"), limit.tracked_keys_async()):
        with pytest.raises(RateBackendError, match=f"Redis at {own_redis.url} failed") as info:
            await call
        assert "check that it is running and reachable" in str(info.value)
    with pytest.raises(RateBackendError, match="cannot read the rate limits"):
        limit.status("k")
    limit.close()


def test_the_warning_is_rate_limited_itself(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "fastmcp_guard.rate")
    limit = node(own_redis, "5/hour", "allow")
    own_redis.stop()
    for _ in range(50):
        assert limit.hit("k") is None
    assert len(warnings_of(caplog)) == 1
    assert limit.remote is not None
    limit.remote.warn_interval = 0.0
    assert limit.hit("k") is None
    assert "51 call(s) decided without Redis so far" in warnings_of(caplog)[-1]
    limit.close()


async def test_concurrent_calls_on_a_hung_redis_wait_one_timeout_at_most(black_hole: str) -> None:
    limit = RateLimit("5/minute", backend="redis", url=black_hole, on_backend_error="allow")
    start = time.perf_counter()
    results = await asyncio.gather(*(limit.acquire(f"k{i}") for i in range(100)))
    took = time.perf_counter() - start
    assert results == [None] * 100, "allow: admitted"
    assert took < 0.5, f"100 concurrent calls took {took:.3f} s"
    limit.close()
