"""One GCRA strategy (issue 11, point 3): the core's ``Gcra`` gives the constants, status
and refusals for every storage; the in-process limiter and the Redis limiter share it."""

from __future__ import annotations

import pytest
from fastmcp_guard._core import Gcra, Limiter, Refusal
from fastmcp_guard.errors import InvalidRateError
from fastmcp_guard.rate import RefusalInfo
from fastmcp_guard.rate.redis import LimitRefusal
from hypothesis import given, settings
from hypothesis import strategies as st

NS = 1_000_000_000


def test_the_constants_of_a_rate() -> None:
    g = Gcra("10/minute")
    assert (g.rate, g.limit, g.window_seconds) == ("10/minute", 10, 60.0)
    assert (g.emission_ns, g.tau_ns) == (6 * NS, 54 * NS)
    # A period that does not divide: T rounds up, so a full burst is still admitted.
    g = Gcra("3/second")
    assert g.emission_ns == 333_333_334 and g.tau_ns == 2 * 333_333_334
    assert repr(g) == "Gcra('3/second')"


def test_a_bad_rate_says_what_to_give() -> None:
    with pytest.raises(InvalidRateError, match="10/minute"):
        Gcra("10 per fortnight")


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 50), st.sampled_from(["second", "minute", "hour", "day"]),
       st.lists(st.integers(0, 10 * NS), max_size=40))  # fmt: skip
def test_status_and_refusals_are_the_in_process_limiters(
    count: int, unit: str, gaps: list[int]
) -> None:
    rate = f"{count}/{unit}"
    g, lim = Gcra(rate), Limiter(per_key=rate)
    now, tat = 10**12, 0
    for gap in gaps:
        now += gap
        refused = lim.check_at("k", None, now)
        # The same arithmetic over a TAT kept here, as the Redis script keeps it.
        ahead = max(tat, now) - now
        if ahead <= g.tau_ns:
            assert refused is None
            tat = max(tat, now) + g.emission_ns
        else:
            assert refused is not None and refused.scope == "per_key"
            mine = g.refusal("per_key", ahead - g.tau_ns, ahead)
            assert (mine.limit, mine.count, mine.window_seconds) == (
                refused.limit, refused.count, refused.window_seconds)  # fmt: skip
            assert mine.retry_after == pytest.approx(refused.retry_after, abs=1e-9)
            assert mine.reset_after == pytest.approx(refused.reset_after, abs=1e-9)
        assert g.status(tat, now) == lim.status_at("k", now)["per_key"]


def test_refusals_are_one_type() -> None:
    assert RefusalInfo is Refusal and LimitRefusal is Refusal
    with pytest.raises(ValueError, match="expected 'per_key', 'global', 'tool' or 'loop'"):
        Gcra("1/second").refusal("backend", 1, 1)
    down = Refusal.unavailable(1.0)
    assert (down.scope, down.limit, down.count, down.retry_after) == ("backend", "unavailable", 0, 1.0)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="retry_after must be"):
            Refusal.unavailable(bad)


def test_decide_answers_what_set_decisions_gave_and_only_once_set() -> None:
    """RateLimit.check in process is the core's decide(): it must not answer before its
    decisions are given, and they cannot be swapped afterwards (a second call is refused)."""
    from fastmcp_guard import RateLimit
    from fastmcp_guard.errors import InvalidArgumentError
    from fastmcp_guard.rate import ADMITTED, Decision

    bare = Limiter(per_key="1/minute")
    with pytest.raises(InvalidArgumentError, match="set_decisions"):
        bare.decide("k")
    rate = RateLimit(per_key="1/minute")
    assert rate.check("k") is ADMITTED
    refused = rate.check("k")
    assert isinstance(refused, Decision) and refused.settled
    assert refused.refusal is not None and refused.refusal.scope == "per_key"
    with pytest.raises(InvalidArgumentError, match="set already"):
        rate.core.set_decisions(object(), Decision)
    assert rate.check("other") is ADMITTED  # still the guard's own decisions
