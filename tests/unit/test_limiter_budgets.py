"""The core limiter's budgets for agents (issue 12): cost-weighted calls, shadow rules, the
loop breaker, and the argument hash behind it, through the binding (``Limiter.call`` /
``call_at``, ``Verdict``, ``args_hash``). Times are explicit (``call_at``): no clocks."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from fastmcp_guard._core import Limiter, Refusal, Verdict, args_hash
from fastmcp_guard.errors import ArgumentTypeError, InvalidArgumentError, InvalidRateError
from hypothesis import given, settings
from hypothesis import strategies as st

NS = 1_000_000_000
T0 = 10**12


def used(lim: Limiter, key: str, now: int = T0) -> dict[str, Any]:
    st_ = lim.status_at(key, now)
    return {
        "per_key": st_.get("per_key", {}).get("used"),
        "global": st_.get("global", {}).get("used"),
        "tools": {name: b["used"] for name, b in st_.get("tools", {}).items()},
    }


# -- cost --------------------------------------------------------------------------------


def test_a_call_consumes_its_cost_from_every_bucket() -> None:
    lim = Limiter(per_key="10/minute", global_limit="20/minute")
    lim.set_tool_rate("t", "8/minute")
    v = lim.call_at("k", "t", 5, None, T0)
    assert v.refusal is None and v.shadow is None and v.settled
    assert (v.remaining, v.limit, v.reset_after) == (3, "8/minute", 37.5)
    assert used(lim, "k") == {"per_key": 5, "global": 5, "tools": {"t": 5}}
    refused = lim.call_at("k", "t", 4, None, T0)
    assert refused.refusal is not None and refused.remaining is None
    assert (refused.refusal.scope, refused.refusal.retry_after) == ("tool", 7.5)
    assert used(lim, "k") == {"per_key": 5, "global": 5, "tools": {"t": 5}}, "refused: nothing"
    assert lim.call_at("k", "t", 3, None, T0).remaining == 0


def test_call_defaults_to_cost_1_and_check_is_unchanged() -> None:
    lim = Limiter(per_key="3/minute")
    assert lim.call("k").remaining == 2
    assert lim.call("k", None, 1, None).remaining == 1
    assert lim.check("k") is None
    refusal = lim.check("k")
    assert isinstance(refusal, Refusal) and refusal.scope == "per_key"
    assert lim.call("k").refusal is not None


def test_a_cost_above_a_limit_is_refused_with_retry_equal_to_reset() -> None:
    lim = Limiter(per_key="4/minute")
    v = lim.call_at("k", None, 5, None, T0)
    assert v.refusal is not None
    assert (v.refusal.retry_after, v.refusal.reset_after) == (0.0, 0.0)
    assert lim.call_at("k", None, 2, None, T0).remaining == 2
    v = lim.call_at("k", None, 5, None, T0)
    assert v.refusal is not None and v.refusal.retry_after == v.refusal.reset_after == 30.0


@pytest.mark.parametrize("cost", [0, -1, 1_000_001, 2**64, 2**200])
def test_a_cost_out_of_range_is_an_invalid_argument(cost: int) -> None:
    lim = Limiter(per_key="4/minute")
    with pytest.raises(InvalidArgumentError, match="cost must be a whole number from 1 to 1000000"):
        lim.call("k", "t", cost)
    with pytest.raises(InvalidArgumentError):
        lim.call_at("k", "t", cost, None, T0)
    assert used(lim, "k")["per_key"] == 0


@pytest.mark.parametrize("cost", [1.0, "2", True])
def test_a_cost_that_is_not_an_int_is_a_type_error(cost: object) -> None:
    with pytest.raises(ArgumentTypeError, match="cost must be an int"):
        Limiter().call("k", None, cost)  # type: ignore[arg-type]


def test_the_largest_cost_is_accepted() -> None:
    lim = Limiter(per_key="1000000/day")
    assert lim.call_at("k", None, 1_000_000, None, T0).remaining == 0


# -- shadow ------------------------------------------------------------------------------


def test_a_shadow_rule_admits_everything_and_reports_what_enforcement_would_refuse() -> None:
    shadow = Limiter(per_key="10/minute", per_key_shadow=True)
    enforced = Limiter(per_key="10/minute")
    verdicts = [shadow.call_at("k", None, 1, None, T0 + i) for i in range(15)]
    for i in range(15):
        enforced.call_at("k", None, 1, None, T0 + i)
    assert all(v.refusal is None for v in verdicts)
    hits = [v.shadow for v in verdicts if v.shadow is not None]
    assert len(hits) == 5
    assert {(h.scope, h.limit) for h in hits} == {("per_key", "10/minute")}
    assert all(v.remaining is None and v.limit is None for v in verdicts), "nothing enforced"
    assert shadow.status_at("k", T0 + 20) == enforced.status_at("k", T0 + 20)


def test_shadow_global_and_tool_rules_report_their_scope() -> None:
    lim = Limiter(per_key="100/minute", global_limit="1/minute", global_shadow=True)
    lim.set_tool_rate("t", "1/hour", shadow=True)
    assert lim.call_at("a", "t", 1, None, T0).shadow is None
    v = lim.call_at("b", "t", 1, None, T0)
    assert v.refusal is None and v.shadow is not None
    assert (v.shadow.scope, v.shadow.limit) == ("global", "1/minute"), "60 s > 0 s wait"
    v = lim.call_at("a", "t", 1, None, T0)
    assert v.shadow is not None and (v.shadow.scope, v.shadow.retry_after) == ("tool", 3600.0)
    assert (v.remaining, v.limit) == (98, "100/minute"), "the enforced per-key bucket"


def test_an_enforced_refusal_consumes_nothing_from_shadow_buckets() -> None:
    lim = Limiter(per_key="5/minute", global_limit="1/minute", per_key_shadow=True)
    lim.set_tool_rate("t", "5/minute", shadow=True)
    assert lim.call_at("a", "t", 1, None, T0).refusal is None
    v = lim.call_at("b", "t", 1, None, T0)
    assert v.refusal is not None and v.refusal.scope == "global" and v.shadow is None
    assert used(lim, "b") == {"per_key": 0, "global": 1, "tools": {"t": 0}}


# -- loop breaker ------------------------------------------------------------------------


def test_the_loop_breaker_trips_at_n_plus_one_identical_calls_and_releases() -> None:
    lim = Limiter(per_key="1000/minute")
    lim.set_loop_breaker("3/minute", shadow=False)
    args = {"q": "weather", "city": "Paris"}
    for _ in range(3):
        v = lim.call_at("k", "search", 1, args, T0)
        assert v.refusal is None and v.args_hash == args_hash(args)
    v = lim.call_at("k", "search", 1, {"city": "Paris", "q": "weather"}, T0)
    assert v.refusal is not None
    assert (v.refusal.scope, v.refusal.limit, v.refusal.count) == ("loop", "3/minute", 3)
    assert v.refusal.retry_after == 20.0 and v.args_hash == args_hash(args)
    assert used(lim, "k")["per_key"] == 3, "the refused repetition consumed nothing"
    assert lim.call_at("k", "search", 1, {**args, "page": 2}, T0).refusal is None
    assert lim.call_at("k", "other", 1, args, T0).refusal is None
    assert lim.call_at("j", "search", 1, args, T0).refusal is None
    assert lim.call_at("k", "search", 1, None, T0).args_hash is None, "no args: not applied"
    assert lim.call_at("k", "search", 1, args, T0 + 20 * NS - 1).refusal is not None
    assert lim.call_at("k", "search", 1, args, T0 + 20 * NS).refusal is None, "released"
    lim.reset("k")
    assert [lim.call_at("k", "search", 1, args, T0 + 20 * NS).refusal for _ in range(3)] == [
        None
    ] * 3, "reset forgets the loop buckets"


def test_the_loop_breaker_in_shadow_and_per_tool_overrides() -> None:
    lim = Limiter()
    assert lim.loop_breaker("t") is None, "none configured in the core by default"
    lim.set_loop_breaker("2/minute")  # shadow by default
    assert lim.loop_breaker("t") == ("2/minute", True)
    verdicts = [lim.call_at("k", "t", 1, [1, 2], T0) for _ in range(4)]
    assert all(v.refusal is None for v in verdicts)
    assert [v.shadow.scope if v.shadow else None for v in verdicts] == [None, None, "loop", "loop"]
    lim.set_tool_loop_breaker("t", None)
    assert lim.loop_breaker("t") is None
    assert lim.call_at("k", "t", 1, [1, 2], T0).args_hash is None, "off: not even hashed"
    lim.set_tool_loop_breaker("t", "1/hour", shadow=False)
    assert lim.call_at("k", "t", 1, "x", T0).refusal is None
    assert lim.call_at("k", "t", 1, "x", T0).refusal is not None
    lim.clear_tool_loop_breaker("t")
    assert lim.loop_breaker("t") == ("2/minute", True)
    lim.set_loop_breaker(None)
    assert lim.loop_breaker("t") is None
    with pytest.raises(InvalidRateError):
        lim.set_loop_breaker("20/fortnight")


def test_an_admitted_plain_call_shares_one_verdict() -> None:
    lim = Limiter()
    assert lim.call("k") is lim.call("k", "t", 3)
    assert lim.call("k").remaining is None and lim.call("k").reset_after == 0.0


# -- Verdict -----------------------------------------------------------------------------


def test_verdict_is_built_by_other_limiters() -> None:
    v = Verdict()
    assert (v.refusal, v.shadow, v.remaining, v.reset_after, v.limit, v.args_hash) == (
        None, None, None, 0.0, None, None)  # fmt: skip
    r = Refusal.unavailable(1.0)
    v = Verdict(refusal=r, remaining=3, reset_after=2.5, limit="10 per minute",
                args_hash="00ff00ff00ff00ff")  # fmt: skip
    assert v.refusal is r and v.limit == "10/minute" and v.args_hash == "00ff00ff00ff00ff"
    assert "remaining=3" in repr(v) and v.settled
    with pytest.raises(InvalidArgumentError, match="16 lowercase hex"):
        Verdict(args_hash="XYZ")
    with pytest.raises(InvalidArgumentError, match="reset_after"):
        Verdict(reset_after=math.nan)
    with pytest.raises(InvalidRateError):
        Verdict(limit="ten a minute")
    with pytest.raises(AttributeError):
        v.remaining = 1  # type: ignore[misc]


# -- argument hash -----------------------------------------------------------------------

KNOWN = "e0443edcc28e27e4"  # blake3('{"a":[1.5,"x"],"b":1}')[:8], checked in src/limiter.rs


def test_the_hash_is_blake3_of_the_canonical_json() -> None:
    assert args_hash({"b": 1, "a": [1.5, "x"]}) == KNOWN
    assert args_hash({"a": (1.5, "x"), "b": 1}) == KNOWN, "tuples are lists"
    h = args_hash({"x": 1})
    assert len(h) == 16 and h == h.lower() and int(h, 16) >= 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip


def reorder(value: Any, seed: int) -> Any:
    """The same value with every dict's insertion order changed."""
    if isinstance(value, dict):
        items = [(k, reorder(v, seed)) for k, v in value.items()]
        items = items[seed % max(len(items), 1):] + items[: seed % max(len(items), 1)]
        return dict(reversed(items)) if seed % 2 else dict(items)
    if isinstance(value, list):
        return [reorder(v, seed) for v in value]
    return value


@settings(max_examples=300, deadline=None)
@given(json_values, st.integers(0, 7))
def test_equal_values_hash_alike_whatever_the_key_order(value: Any, seed: int) -> None:
    assert args_hash(reorder(value, seed)) == args_hash(value)
    assert args_hash(json.loads(json.dumps(value))) == args_hash(value), "a JSON round trip"


@settings(max_examples=300, deadline=None)
@given(json_values, json_values)
def test_different_values_hash_differently(a: Any, b: Any) -> None:
    def canonical(v: Any) -> str:
        return json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    if canonical(a) != canonical(b):
        assert args_hash(a) != args_hash(b)


def test_distinct_scalars_do_not_collide() -> None:
    values: list[object] = [None, True, False, 0, 1, -1, 1.0, 0.5, "1", "true", "null", "",
                            [], {}, [1], {"1": 1}, 2**70, 1e300, "é", "\n", "\\n"]  # fmt: skip
    assert len({args_hash(v) for v in values}) == len(values)


def test_odd_objects_hash_without_raising() -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    class Printable:
        def __str__(self) -> str:
            return "same"

    deep: Any = []
    for _ in range(10_000):
        deep = [deep]
    loop: list[Any] = []
    loop.append(loop)
    wide_deep: dict[str, Any] = {}
    for _ in range(100):
        wide_deep = {"x": wide_deep}
    odd = [deep, loop, wide_deep, Unprintable(), {1: "int key", None: 0, 2.5: 1, (1, 2): 3},
           "\ud800 lone surrogate", float("nan"), float("inf"), 10**5000, {1, 2, 3},
           b"bytes"]  # fmt: skip
    for value in odd:
        h = args_hash(value)
        assert len(h) == 16 and h == args_hash(value)
    assert args_hash(Printable()) == args_hash("same"), "other objects: their str()"
    assert args_hash(deep) != args_hash([[[]]])


def test_nesting_beyond_64_levels_is_cut_with_a_marker() -> None:
    def nest(n: int, leaf: object) -> Any:
        v: Any = leaf
        for _ in range(n):
            v = [v]
        return v

    assert args_hash(nest(64, 1)) != args_hash(nest(64, 2)), "64 levels are hashed"
    assert args_hash(nest(70, 1)) == args_hash(nest(70, 2)), "what is deeper is not"
    assert args_hash(nest(65, 1)) == args_hash(nest(66, 1)), "a cut value hashes as the marker"
    assert args_hash(nest(65, 1)) != args_hash(nest(64, "\0depth")), "not as any JSON text"


def test_text_beyond_one_mib_is_cut_with_a_marker() -> None:
    big = "a" * (1 << 20)
    assert args_hash([big, 1]) == args_hash([big, 2]), "beyond 1 MiB is not hashed"
    assert args_hash(["a" * 1000, 1]) != args_hash(["a" * 1000, 2])
    assert args_hash("a" * ((1 << 20) - 2)) != args_hash("a" * ((1 << 20) - 3))


def test_non_string_keys_are_written_as_json_dumps_writes_them() -> None:
    assert args_hash({1: "a", False: "b"}) == args_hash({"1": "a", "false": "b"})
    assert args_hash({None: 0}) == args_hash({"null": 0})
