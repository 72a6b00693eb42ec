"""Threat: guessing spread over many addresses (issue 10, finding 8).

The throttle counted failures per (address, key id) only: 100 addresses against one key
id got 1,006 argon2 runs in 30 s, 121% of two cores. Now there are three budgets, all
refusing without hashing (``throttled``, 429) and only ever unproven tokens:

* per (address, key id), with IPv6 counted per /64 (a host owns a whole /64);
* per key id across all addresses (default 100 per minute); past it an attempt is still
  hashed as a *first try* from an address that has not been failing for that key id, at
  most as many again, so a key costs at most 2 x 100 hash runs per minute and a new
  client with the right token still gets in;
* per server: failed hash runs across all keys (default 600 per minute), the CPU cap.
"""

from __future__ import annotations

import pytest
from fastmcp_guard import _core
from fastmcp_guard._core import KeyManager, VerifyError

from tests.security._tokens import wrong_secret

KEY_BUDGET = 100  # default failures per key id and minute


def reason(manager: KeyManager, token: str, client: str) -> str:
    try:
        manager.verify(token, client)
    except VerifyError as exc:
        return exc.reason
    return "admitted"


@pytest.mark.slow
def test_a_key_guessed_from_many_addresses_costs_at_most_twice_its_budget() -> None:
    manager = KeyManager.memory()  # the default budgets
    _, token = manager.create("victim")
    proven = manager.create("busy service")[1]
    manager.verify(proven, "192.0.2.200")
    runs_before = manager.stats()["argon2_runs"]
    # 30 addresses, 10 rounds: each address stays under its own limit of 10.
    reasons = [
        reason(manager, wrong_secret(token, r * 100 + a), f"192.0.2.{a}")
        for r in range(10)
        for a in range(30)
    ]
    runs = manager.stats()["argon2_runs"] - runs_before
    assert KEY_BUDGET <= runs <= 2 * KEY_BUDGET, runs
    assert reasons.count("bad_secret") == runs
    assert reasons.count("throttled") == 300 - runs
    # The right token from an address that has not been failing still gets in (a first
    # try); from an attacking address it must wait.
    assert reason(manager, token, "192.0.2.3") == "throttled"
    assert reason(manager, token, "198.51.100.1") == "admitted"
    # Other keys are untouched.
    assert reason(manager, proven, "192.0.2.3") == "admitted"
    manager.close()


def test_ipv6_addresses_are_counted_per_64() -> None:
    manager = KeyManager.memory()  # 10 failures per (address, key id) and minute
    _, token = manager.create("victim")
    # Ten hosts of one /64 share one budget: the eleventh is throttled, the next /64 not.
    for n in range(10):
        host = f"2001:db8:7:1:{n:x}::{n + 1:x}"
        assert reason(manager, wrong_secret(token, n), host) == "bad_secret"
    assert reason(manager, wrong_secret(token, 10), "2001:db8:7:1:ffff::4") == "throttled"
    assert reason(manager, wrong_secret(token, 11), "2001:db8:7:2::1") == "bad_secret"
    # IPv4 counts per address, also when written IPv4-mapped.
    for n in range(10):
        host = "192.0.2.1" if n % 2 else "::ffff:192.0.2.1"
        assert reason(manager, wrong_secret(token, 20 + n), host) == "bad_secret"
    assert reason(manager, wrong_secret(token, 40), "192.0.2.1") == "throttled"
    assert reason(manager, wrong_secret(token, 41), "192.0.2.2") == "bad_secret"
    manager.close()


def test_the_server_budget_caps_failed_hashing_across_keys() -> None:
    manager = KeyManager.memory(limits=_core.VerifyLimits(global_failure_budget=12))
    tokens = [manager.create(f"k{i}")[1] for i in range(6)]
    good = manager.create("good")[1]
    manager.verify(good, "192.0.2.250")
    results = [
        reason(manager, wrong_secret(tokens[i % 6], i), f"192.0.2.{i}") for i in range(40)
    ]
    assert results == ["bad_secret"] * 12 + ["throttled"] * 28
    assert manager.stats()["argon2_runs"] == 1 + 12
    with pytest.raises(VerifyError) as exc:
        manager.verify(tokens[0], "203.0.113.1")  # unproven: waits like the rest
    assert exc.value.reason == "throttled" and exc.value.retry_after is not None
    assert "on this server" in str(exc.value)
    manager.clear_cache()
    assert manager.verify(good, "203.0.113.1").key_name == "good"  # proven: passes
    manager.close()


def test_limits_are_validated_and_reported() -> None:
    limits = _core.VerifyLimits(max_failures=5, key_failure_budget=0, unknown_key_ttl_seconds=1.5)
    assert (limits.max_failures, limits.key_failure_budget) == (5, 0)
    assert limits.global_failure_budget == 600 and limits.failure_window_seconds == 60.0
    assert limits.unknown_key_ttl_seconds == 1.5 and limits.verify_wait_seconds == 2.0
    assert "max_failures=5" in repr(limits)
    with pytest.raises(ValueError, match="failure_window_seconds"):
        _core.VerifyLimits(failure_window_seconds=0)
    with pytest.raises(ValueError, match="verify_wait_seconds"):
        _core.VerifyLimits(verify_wait_seconds=-1)
