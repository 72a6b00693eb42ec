"""The rate-limit contract, run on every backend (in process and Redis).

The same admit / refuse sequences, the same ``retry_after`` and ``reset_after`` to the
nanosecond, the same ``status`` shapes, the same ``reset``. Sequences are driven at
explicit times (``Clocked``: the core's ``check_at``, the Redis script's ``now_ns``) so
the expected numbers are exact; a few tests use the real clocks through the public API.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from fastmcp_guard import RateLimit
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
