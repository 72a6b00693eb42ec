"""The rate-limit contract, run on every backend (in process and Redis).

The same admit / refuse sequences, the same ``retry_after`` and ``reset_after`` to the
nanosecond, the same ``status`` shapes, the same ``reset``. Sequences are driven at
explicit times (``Clocked``: the core's ``check_at``, the Redis script's ``now_ns``) so
the expected numbers are exact; a few tests use the real clocks through the public API.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastmcp_guard import RateLimit
from fastmcp_guard._core import Limiter, Refusal, Verdict, args_hash
from fastmcp_guard.rate.redis import RedisLimiter
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fleet.conftest import SEC, T0, Clocked, RedisServer

MakeLimit = Callable[..., RateLimit]


def test_a_burst_of_n_is_admitted_then_one_every_period_over_n(make_limit: MakeLimit) -> None:
    c = Clocked(make_limit("3/minute"))
    assert [c.check("k", None, T0) for _ in range(3)] == [None] * 3
    assert c.check("k", None, T0) == ("per_key", "3/minute", 20.0, 60.0)
    assert c.check("k", None, T0 + 19 * SEC) == ("per_key", "3/minute", 1.0, 41.0)
    assert c.check("k", None, T0 + 20 * SEC) is None
    assert c.check("k", None, T0 + 20 * SEC) == ("per_key", "3/minute", 20.0, 60.0)


def test_retry_after_keeps_nanosecond_precision(make_limit: MakeLimit) -> None:
    c = Clocked(make_limit("7/minute"))  # T = ceil(60e9 / 7) ns = 8_571_428_572 ns
    for _ in range(7):
        assert c.check("k", None, T0) is None
    refusal = c.check("k", None, T0 + 1)
    assert refusal == (
        "per_key",
        "7/minute",
        (8_571_428_572 - 1) / 1e9,
        (7 * 8_571_428_572 - 1) / 1e9,
    )


def test_keys_have_separate_buckets(make_limit: MakeLimit) -> None:
    c = Clocked(make_limit("1/minute"))
    assert c.check("a", None, T0) is None
    assert c.check("b", None, T0) is None
    assert c.check("a", None, T0) is not None


def test_a_refused_tool_call_does_not_eat_the_keys_budget(make_limit: MakeLimit) -> None:
    limit = make_limit("5/minute")
    limit.set_tool_rate("t", "1/minute")
    c = Clocked(limit)
    assert c.check("k", "t", T0) is None
    assert c.check("k", "t", T0) == ("tool", "1/minute", 60.0, 60.0)
    assert c.status("k", T0)["per_key"]["used"] == 1
    assert [c.check("k", None, T0) for _ in range(4)] == [None] * 4
    assert c.check("k", None, T0) == ("per_key", "5/minute", 12.0, 60.0)


def test_a_global_refusal_consumes_nothing_from_the_key(make_limit: MakeLimit) -> None:
    c = Clocked(make_limit("2/minute", "3/minute"))
    assert [c.check(k, None, T0) for k in "aab"] == [None] * 3
    assert c.check("b", None, T0) == ("global", "3/minute", 20.0, 60.0)
    assert c.status("b", T0)["per_key"]["used"] == 1
    assert c.status("b", T0)["global"]["used"] == 3


def test_the_bucket_with_the_longest_wait_is_reported(make_limit: MakeLimit) -> None:
    limit = make_limit("2/minute", "4/minute")
    limit.set_tool_rate("t", "1/hour")
    c = Clocked(limit)
    assert c.check("k", "t", T0) is None
    assert c.check("k", None, T0) is None
    # per key (retry 30 s) and tool (retry 3600 s) both refuse: the tool's wait is reported.
    assert c.check("k", "t", T0) == ("tool", "1/hour", 3600.0, 3600.0)
    assert c.check("j", None, T0) is None
    assert c.check("j", None, T0) is None
    # Global (retry 15 s) and k's per-key (retry 30 s): per key wins.
    assert c.check("k", None, T0) == ("per_key", "2/minute", 30.0, 60.0)
    assert c.check("x", None, T0) == ("global", "4/minute", 15.0, 60.0)


def test_a_tool_without_a_rate_is_limited_by_the_key_only(make_limit: MakeLimit) -> None:
    limit = make_limit("2/minute")
    limit.set_tool_rate("t", "1/minute")
    c = Clocked(limit)
    assert c.check("k", "other", T0) is None
    assert c.check("k", "t", T0) is None
    assert c.check("k", "other", T0) == ("per_key", "2/minute", 30.0, 60.0)
    limit.set_tool_rate("t", None)
    assert c.check("j", "t", T0) is None
    assert c.check("j", "t", T0) is None, "a cleared tool rate no longer limits"


def test_status_has_the_same_shape_and_numbers(make_limit: MakeLimit) -> None:
    limit = make_limit("3/minute", "10/minute")
    limit.set_tool_rate("t", "2/minute")
    c = Clocked(limit)
    assert c.check("k", "t", T0) is None
    assert c.check("k", None, T0) is None
    bucket = {"limit": 0, "used": 0, "remaining": 0, "window_seconds": 60.0, "reset_after": 0.0}
    assert c.status("k", T0 + 5 * SEC) == {
        "per_key": {**bucket, "limit": 3, "used": 2, "remaining": 1, "reset_after": 35.0},
        "global": {**bucket, "limit": 10, "used": 2, "remaining": 8, "reset_after": 7.0},
        "tools": {"t": {**bucket, "limit": 2, "used": 1, "remaining": 1, "reset_after": 25.0}},
    }
    assert c.status("new", T0 + 61 * SEC) == {
        "per_key": {**bucket, "limit": 3, "remaining": 3},
        "global": {**bucket, "limit": 10, "remaining": 10},
        "tools": {"t": {**bucket, "limit": 2, "remaining": 2}},
    }


def test_status_without_limits_is_empty(make_limit: MakeLimit) -> None:
    assert Clocked(make_limit()).status("k", T0) == {}


def test_reset_forgets_the_key_and_its_tools_but_not_the_global_bucket(
    make_limit: MakeLimit,
) -> None:
    limit = make_limit("1/minute", "10/minute")
    limit.set_tool_rate("t", "1/minute")
    c = Clocked(limit)
    assert c.check("k", "t", T0) is None
    assert c.check("j", None, T0) is None
    assert limit.tracked_keys() == ["j", "k"]
    assert limit.reset("k") is True
    assert limit.reset("k") is False, "nothing left to reset"
    assert limit.tracked_keys() == ["j"]
    assert c.status("k", T0)["global"]["used"] == 2
    assert c.check("k", "t", T0) is None
    assert c.check("j", None, T0) is not None, "other keys keep their state"


async def test_the_public_api_admits_the_limit_then_refuses(make_limit: MakeLimit) -> None:
    limit = make_limit("3/hour")
    assert [await limit.acquire("k") for _ in range(3)] == [None] * 3
    refusal = await limit.acquire("k")
    assert refusal is not None and refusal.scope == "per_key" and refusal.limit == "3/hour"
    assert 1190 < refusal.retry_after <= 1200 and 3590 < refusal.reset_after <= 3600
    assert await limit.check("k") is False, "0.2's check(): a bool"
    assert await limit.check("other") is True
    status = await limit.status_async("k")
    assert (status["per_key"]["used"], status["per_key"]["remaining"]) == (3, 0)
    assert await limit.tracked_keys_async() == ["k", "other"]
    assert await limit.reset_async("k") is True
    assert await limit.acquire("k") is None


def test_the_sync_api_matches(make_limit: MakeLimit) -> None:
    limit = make_limit("1/hour")
    assert limit.hit("k") is None
    refusal = limit.hit("k")
    assert refusal is not None and refusal.scope == "per_key"
    assert limit.status("k")["per_key"]["used"] == 1


# -- the Redis script against the core, on random sequences ----------------------------------

_prefixes = itertools.count()

rates = st.builds(lambda n, s: f"{n}/{s} seconds", st.integers(1, 5), st.integers(1, 8))
tools = st.sampled_from([None, "t0", "t1", "t2"])
ops = st.lists(
    st.one_of(
        st.tuples(st.just("check"), st.integers(0, 2), tools, st.integers(0, 3 * SEC)),
        st.tuples(st.just("reset"), st.integers(0, 2), st.none(), st.just(0)),
    ),
    min_size=1,
    max_size=60,
)


@pytest.mark.fleet
@pytest.mark.redis
@settings(max_examples=60, deadline=None)
@given(
    per_key=st.none() | rates,
    global_limit=st.none() | rates,
    tool_rates=st.lists(st.none() | rates, min_size=3, max_size=3),
    sequence=ops,
)
def test_the_redis_script_decides_exactly_like_the_core(
    redis_server: RedisServer,
    per_key: str | None,
    global_limit: str | None,
    tool_rates: list[str | None],
    sequence: list[tuple[str, int, str | None, int]],
) -> None:
    core = RateLimit(per_key, global_limit)
    remote = RateLimit(per_key, global_limit, backend="redis", url=redis_server.url,
                       key_prefix=f"prop{next(_prefixes)}:")  # fmt: skip
    for i, rate in enumerate(tool_rates):
        core.set_tool_rate(f"t{i}", rate)
        remote.set_tool_rate(f"t{i}", rate)
    a, b = Clocked(core), Clocked(remote)
    now = T0
    try:
        for op, key_index, tool, advance in sequence:
            key = f"k{key_index}"
            now += advance
            if op == "reset":
                core.reset(key)
                remote.reset(key)
            else:
                assert a.check(key, tool, now) == b.check(key, tool, now)
        for key in ("k0", "k1", "k2"):
            assert a.status(key, now) == b.status(key, now)
    finally:
        remote.close()


# -- budgets for agents (issue 12): cost, shadow rules, the loop breaker ---------------------
#
# Driven through ``call`` on both limiters: the core's ``Limiter.call_at`` and the Redis
# limiter's ``call_sync(..., now_ns=)``; the whole ``Verdict`` must match.

VerdictTuple = tuple[Any, ...]


def _refusal(r: Refusal | None) -> tuple[str, str, float, float] | None:
    return None if r is None else (r.scope, r.limit, r.retry_after, r.reset_after)


def as_tuple(v: Verdict) -> VerdictTuple:
    return (_refusal(v.refusal), _refusal(v.shadow), v.remaining, v.reset_after, v.limit,
            v.args_hash)  # fmt: skip


class Calls:
    """One limiter (in process, or Redis with its in-process twin) driven at explicit times."""

    def __init__(self, remote_url: str | None, key_prefix: str, per_key: str | None,
                 global_limit: str | None, per_key_shadow: bool, global_shadow: bool) -> None:  # fmt: skip
        self.core = Limiter(per_key=per_key, global_limit=global_limit,
                            per_key_shadow=per_key_shadow, global_shadow=global_shadow)  # fmt: skip
        self.remote = None
        if remote_url is not None:
            self.remote = RedisLimiter(self.core, per_key, global_limit, url=remote_url,
                                       key_prefix=key_prefix, per_key_shadow=per_key_shadow,
                                       global_shadow=global_shadow)  # fmt: skip

    @property
    def target(self) -> Limiter | RedisLimiter:
        return self.core if self.remote is None else self.remote

    def call(self, key: str, tool: str | None, cost: int, args: object, now: int) -> VerdictTuple:
        if self.remote is None:
            return as_tuple(self.core.call_at(key, tool, cost, args, now))
        return as_tuple(self.remote.call_sync(key, tool, cost, args, now_ns=now))

    def status(self, key: str, now: int) -> dict[str, Any]:
        if self.remote is None:
            return self.core.status_at(key, now)
        return self.remote.status(key, now_ns=now)

    def reset(self, key: str) -> None:
        self.target.reset(key)

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()


MakeCalls = Callable[..., Calls]


@pytest.fixture
def make_calls(backend: str, request: pytest.FixtureRequest, key_prefix: str) -> Iterator[MakeCalls]:
    made: list[Calls] = []

    def factory(per_key: str | None = None, global_limit: str | None = None, *,
                per_key_shadow: bool = False, global_shadow: bool = False) -> Calls:  # fmt: skip
        url = None
        if backend == "redis":
            url = request.getfixturevalue("redis_server").url
        calls = Calls(url, key_prefix, per_key, global_limit, per_key_shadow, global_shadow)
        made.append(calls)
        return calls

    yield factory
    for calls in made:
        calls.close()


def used(c: Calls, key: str, now: int = T0) -> tuple[Any, ...]:
    s = c.status(key, now)
    return (s.get("per_key", {}).get("used"), s.get("global", {}).get("used"),
            {t: b["used"] for t, b in s.get("tools", {}).items()})  # fmt: skip


def test_a_call_consumes_its_cost_from_every_bucket(make_calls: MakeCalls) -> None:
    c = make_calls("10/minute", "20/minute")
    c.target.set_tool_rate("t", "8/minute")
    assert c.call("k", "t", 5, None, T0) == (None, None, 3, 37.5, "8/minute", None)
    assert used(c, "k") == (5, 5, {"t": 5})
    assert c.call("k", "t", 4, None, T0) == (("tool", "8/minute", 7.5, 37.5),
                                             None, None, 0.0, None, None)  # fmt: skip
    assert used(c, "k") == (5, 5, {"t": 5}), "a refused call consumes nothing"
    assert c.call("k", None, 5, None, T0) == (None, None, 0, 60.0, "10/minute", None)
    assert c.call("j", None, 11, None, T0)[0] == ("global", "20/minute", 3.0, 30.0)
    alone = make_calls("10/minute")
    assert alone.call("j", None, 11, None, T0)[0] == ("per_key", "10/minute", 0.0, 0.0), (
        "a cost above the limit: retry_after is reset_after")


def test_a_shadow_rule_counts_what_enforcement_would_refuse(make_calls: MakeCalls) -> None:
    shadow = make_calls("10/minute", per_key_shadow=True)
    verdicts = [shadow.call("k", None, 1, None, T0 + i) for i in range(15)]
    assert [v[0] for v in verdicts] == [None] * 15, "a shadow rule never refuses"
    assert [v[1][0] if v[1] else None for v in verdicts] == [None] * 10 + ["per_key"] * 5
    assert used(shadow, "k", T0 + 20) == (10, None, {}), "as enforcement after 10 admitted"


def test_an_enforced_refusal_consumes_nothing_from_shadow_rules(make_calls: MakeCalls) -> None:
    c = make_calls("5/minute", "1/minute", per_key_shadow=True)
    c.target.set_tool_rate("t", "5/minute", shadow=True)
    # Only the global bucket is enforced, and callers are never shown it: no remaining.
    assert c.call("a", "t", 1, None, T0) == (None, None, None, 0.0, None, None)
    refused = c.call("b", "t", 1, None, T0)
    assert refused[0] == ("global", "1/minute", 60.0, 60.0) and refused[1] is None
    assert used(c, "b") == (0, 1, {"t": 0})


def test_the_shadow_hit_reported_is_the_longest_wait(make_calls: MakeCalls) -> None:
    c = make_calls("100/minute", "1/minute", global_shadow=True)
    c.target.set_tool_rate("t", "1/hour", shadow=True)
    assert c.call("a", "t", 1, None, T0)[1] is None
    assert c.call("a", "t", 1, None, T0)[1] == ("tool", "1/hour", 3600.0, 3600.0)
    assert c.call("b", None, 1, None, T0) == (None, ("global", "1/minute", 60.0, 60.0), 99,
                                              0.6, "100/minute", None)  # fmt: skip


def test_the_loop_breaker_trips_and_releases(make_calls: MakeCalls) -> None:
    c = make_calls("1000/minute")
    c.target.set_loop_breaker("3/minute", shadow=False)
    args = {"city": "Paris", "q": "weather"}
    h = args_hash(args)
    assert [c.call("k", "s", 2, args, T0)[0] for _ in range(3)] == [None] * 3
    refused = c.call("k", "s", 1, {"q": "weather", "city": "Paris"}, T0)
    assert refused == (("loop", "3/minute", 20.0, 60.0), None, None, 0.0, None, h)
    assert used(c, "k") == (6, None, {}), "charged its cost, refused nothing consumed"
    assert c.call("k", "s", 1, {**args, "page": 2}, T0)[0] is None
    assert c.call("k", "other", 1, args, T0)[0] is None
    assert c.call("k", "s", 1, None, T0)[5] is None, "no arguments: no loop breaker"
    assert c.call("k", "s", 1, args, T0 + 20 * SEC - 1)[0] is not None
    assert c.call("k", "s", 1, args, T0 + 20 * SEC)[0] is None, "released after T"
    c.reset("k")
    assert [c.call("k", "s", 1, args, T0 + 20 * SEC)[0] for _ in range(3)] == [None] * 3, (
        "reset forgets the loop buckets")


def test_the_loop_breaker_in_shadow_and_per_tool(make_calls: MakeCalls) -> None:
    c = make_calls()
    c.target.set_loop_breaker("2/minute")
    verdicts = [c.call("k", "t", 1, [1, 2], T0) for _ in range(3)]
    h = args_hash([1, 2])
    assert verdicts[2] == (None, ("loop", "2/minute", 30.0, 60.0), None, 0.0, None, h)
    c.target.set_tool_loop_breaker("t", None)
    assert c.call("k", "t", 1, [1, 2], T0) == (None, None, None, 0.0, None, None)
    c.target.set_tool_loop_breaker("t", "1/hour", shadow=False)
    assert c.call("k", "t", 1, "x", T0)[0] is None
    assert c.call("k", "t", 1, "x", T0)[0] == ("loop", "1/hour", 3600.0, 3600.0)
    c.target.clear_tool_loop_breaker("t")
    assert c.target.loop_breaker("t") == ("2/minute", True)
    assert c.core.loop_breaker("t") == ("2/minute", True), "the in-process twin follows"


async def test_the_async_call_matches(make_calls: MakeCalls) -> None:
    c = make_calls("2/hour")
    target = c.target
    if isinstance(target, Limiter):
        verdicts = [target.call("k", "t", 1, {"a": 1}) for _ in range(3)]
    else:
        verdicts = list(await asyncio.gather(*(target.call("k", "t", 1, {"a": 1})
                                               for _ in range(3))))  # fmt: skip
    assert [v.remaining for v in verdicts[:2]] == [1, 0]
    refusal = verdicts[2].refusal
    assert refusal is not None and refusal.scope == "per_key" and 1790 < refusal.retry_after <= 1800


@pytest.mark.fleet
@pytest.mark.redis
def test_redis_loop_buckets_are_keys_that_expire(redis_server: RedisServer, key_prefix: str) -> None:
    c = Calls(redis_server.url, key_prefix, None, "1000/second", False, False)
    assert c.remote is not None
    c.remote.set_loop_breaker("20/minute", shadow=False)
    client = redis_server.client()
    try:
        assert c.remote.call_sync("k", "t", 1, {"a": 1}).refusal is None
        name = c.remote.loop_key("k", "t", args_hash({"a": 1}))
        assert name.startswith(f"{key_prefix}{{g}}:l:"), "the global limit's slot"
        # Every loop key expires by itself, at most one emission interval (3 s) after its
        # last call (-2: already gone on a slow machine; -1 would be a key without a TTL).
        assert client.pttl(name) in {-2, *range(1, 3001)}
        # An attacker varying the arguments: every bucket is a key that expires on its own.
        for i in range(500):
            assert c.remote.call_sync("k", "t", 1, {"b": i}).refusal is None
        live = list(client.scan_iter(match=f"{key_prefix}*:l:*", count=1000))
        assert 1 <= len(live) <= 501
        ttls = {client.pttl(n) for n in live}
        assert ttls <= {-2, *range(1, 3001)}, ttls
        assert c.remote.reset("k") is True
        assert list(client.scan_iter(match=f"{key_prefix}*:l:*", count=1000)) == []
        assert c.remote.reset("k") is False
    finally:
        client.close()
        c.close()


@pytest.mark.fleet
@pytest.mark.redis
@pytest.mark.parametrize("policy", ["allow", "deny", "local"])
async def test_call_follows_the_outage_policy(own_redis: RedisServer, policy: str) -> None:
    core = Limiter(per_key="1/hour")
    remote = RedisLimiter(core, "1/hour", None, url=own_redis.url, on_backend_error=policy,  # type: ignore[arg-type]
                          key_prefix="outage-call:")  # fmt: skip
    remote.retry_interval = 0.0
    assert (await remote.call("k")).remaining == 0
    own_redis.stop()
    first, second = await remote.call("k", "t", 1, {"x": 1}), remote.call_sync("k")
    if policy == "allow":
        assert as_tuple(first) == as_tuple(second) == (None, None, None, 0.0, None, None)
    elif policy == "deny":
        assert first.refusal is not None and first.refusal.scope == "backend"
        assert second.refusal is not None and second.refusal.retry_after == 1.0
    else:
        assert (first.refusal, first.remaining) == (None, 0), "the in-process limiter decides"
        assert second.refusal is not None and second.refusal.scope == "per_key"
    remote.close()


# -- the Redis script against the core on random sequences, with cost, shadow and loops -----

rules = st.tuples(rates, st.booleans())
call_op = st.tuples(
    st.just("call"), st.integers(0, 2), tools, st.integers(1, 4), st.none() | st.integers(0, 2),
    st.integers(0, 3 * SEC),
)  # fmt: skip
reset_op = st.tuples(st.just("reset"), st.integers(0, 2), st.none(), st.just(1), st.none(),
                     st.just(0))  # fmt: skip
call_ops = st.lists(st.one_of(call_op, reset_op), min_size=1, max_size=60)


@pytest.mark.fleet
@pytest.mark.redis
@settings(max_examples=60, deadline=None)
@given(
    per_key=st.none() | rules,
    global_limit=st.none() | rules,
    tool_rates=st.lists(st.none() | rules, min_size=3, max_size=3),
    loop=st.none() | rules,
    loop_off_for_t2=st.booleans(),
    sequence=call_ops,
)
def test_the_redis_script_decides_calls_exactly_like_the_core(
    redis_server: RedisServer,
    per_key: tuple[str, bool] | None,
    global_limit: tuple[str, bool] | None,
    tool_rates: list[tuple[str, bool] | None],
    loop: tuple[str, bool] | None,
    loop_off_for_t2: bool,
    sequence: list[tuple[str, int, str | None, int, int | None, int]],
) -> None:
    def make(url: str | None) -> Calls:
        return Calls(url, f"call{next(_prefixes)}:", per_key and per_key[0],
                     global_limit and global_limit[0], bool(per_key and per_key[1]),
                     bool(global_limit and global_limit[1]))  # fmt: skip

    a, b = make(None), make(redis_server.url)
    try:
        for c in (a, b):
            for i, rule in enumerate(tool_rates):
                c.target.set_tool_rate(f"t{i}", rule and rule[0], bool(rule and rule[1]))
            if loop is not None:
                c.target.set_loop_breaker(loop[0], loop[1])
            if loop_off_for_t2:
                c.target.set_tool_loop_breaker("t2", None)
        now = T0
        for op, key_index, tool, cost, args, advance in sequence:
            key = f"k{key_index}"
            now += advance
            if op == "reset":
                a.reset(key)
                b.reset(key)
            else:
                value = None if args is None else {"arg": args}
                assert a.call(key, tool, cost, value, now) == b.call(key, tool, cost, value, now)
        for key in ("k0", "k1", "k2"):
            assert a.status(key, now) == b.status(key, now)
    finally:
        b.close()
