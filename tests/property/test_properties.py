"""Property tests: rate parser, token parser, limiter against a reference model."""

from __future__ import annotations

from fastmcp_guard._core import KeyManager, Limiter, parse_rate, token_key_id
from fastmcp_guard.errors import InvalidRateError
from hypothesis import given, settings
from hypothesis import strategies as st

UNITS = ["second", "seconds", "sec", "s", "minute", "minutes", "min", "m",
         "hour", "hours", "hr", "h", "day", "days", "d"]  # fmt: skip


@given(st.integers(1, 10**9), st.sampled_from(UNITS))
def test_rate_round_trip(count: int, unit: str) -> None:
    rate = parse_rate(f"{count}/{unit}")
    assert rate.count == count
    again = parse_rate(str(rate))
    assert (again.count, again.period_seconds) == (rate.count, rate.period_seconds)


@given(st.text(max_size=40))
def test_rate_parser_never_crashes(text: str) -> None:
    try:
        rate = parse_rate(text)
    except InvalidRateError:
        return
    assert rate.count >= 1 and rate.period_seconds > 0


_manager = KeyManager.memory()


@settings(max_examples=300)
@given(st.one_of(st.text(max_size=200), st.text(max_size=20).map(lambda s: "fmg_sk_" + s)))
def test_token_parser_never_crashes(text: str) -> None:
    assert _manager.verify_cached(text) is None
    result = token_key_id(text)
    assert result is None or result.startswith("fmg_key_")


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 8),
    st.integers(1, 4),
    st.lists(st.tuples(st.sampled_from(["k1", "k2", "k3"]), st.sampled_from([None, "t1", "t2"])),
             max_size=60),
)  # fmt: skip
def test_limiter_matches_reference_model(per_key: int, global_n: int, tool_n: int, calls) -> None:
    # Daily rates refill one call every >= 2.9 hours: nothing refills during the test,
    # so the reference is plain counting.
    lim = Limiter(per_key=f"{per_key}/day", global_limit=f"{global_n}/day")
    lim.set_tool_rate("t1", f"{tool_n}/day")
    used: dict[tuple[str, str | None], int] = {}
    for key, tool in calls:
        buckets = [((key, None), per_key), (("*", None), global_n)]
        if tool == "t1":
            buckets.append(((key, "t1"), tool_n))
        expect = all(used.get(b, 0) < cap for b, cap in buckets)
        got = lim.check(key, tool) is None
        assert got == expect
        if expect:
            for b, _ in buckets:
                used[b] = used.get(b, 0) + 1
