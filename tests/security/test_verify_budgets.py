"""Threat: guessing spread over many addresses (issue 10, finding 8), and failures that
lock everyone else out (probe finding 2).

The throttle counted failures per (address, key id) only: 100 addresses against one key
id got 1,006 argon2 runs in 30 s, 121% of two cores. Now there are three budgets, all
refusing without hashing (``throttled``, 429) and only ever unproven tokens:

* per (address, key id), with IPv6 counted per /64 (a host owns a whole /64);
* per key id across all addresses (default 100 per minute); past it an attempt is still
  hashed as a *first try* from a network that has not been failing for that key id, at
  most as many again, so a key costs at most 2 x 100 hash runs per minute and a new
  client with the right token still gets in;
* per server: failed hash runs across all keys (default 600 per minute), the CPU cap;
  past it, likewise, a first try from a network with no failure at all in the window, at
  most 600 more.

A network is an IPv4 address or an IPv6 /48. Before, 600 failures (one address, 60 key
ids) made every unproven token on the server wait (429), and 120 /64s of one /56 used up
a key's first tries so that its owner's new token waited too.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import pytest
from fastmcp_guard import KeyStore, _core
from fastmcp_guard._core import KeyManager, VerifyError

from tests.conftest import http_client
from tests.integration.test_http_auth import HEADERS, INIT
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
    # 40 clean addresses: 12 failures within the budget, then 12 first tries, then none.
    results = [reason(manager, wrong_secret(tokens[i % 6], i), f"192.0.2.{i}") for i in range(40)]
    assert results == ["bad_secret"] * 24 + ["throttled"] * 16
    assert manager.stats()["argon2_runs"] == 1 + 24
    with pytest.raises(VerifyError) as exc:
        manager.verify(tokens[0], "203.0.113.1")  # unproven: waits like the rest
    assert exc.value.reason == "throttled" and exc.value.retry_after is not None
    assert "on this server" in str(exc.value)
    manager.clear_cache()
    assert manager.verify(good, "203.0.113.1").key_name == "good"  # proven: passes
    manager.close()


@pytest.mark.slow
def test_failures_on_60_keys_from_one_address_never_refuse_a_new_key_elsewhere() -> None:
    manager = KeyManager.memory()  # the default budgets: 10 per (address, key), 600 in all
    victims = [manager.create(f"victim {i}")[1] for i in range(60)]
    attacker = "198.51.100.66"

    def attack(part: list[str], offset: int) -> list[str]:
        return [reason(manager, wrong_secret(t, offset + i * 10 + n), attacker)
                for i, t in enumerate(part) for n in range(10)]  # fmt: skip

    # Two threads (the verifications release the GIL): 600 argon2 runs on both cores.
    with ThreadPoolExecutor(2) as pool:
        halves = list(pool.map(attack, [victims[:30], victims[30:]], [0, 1000]))
    assert halves[0] + halves[1] == ["bad_secret"] * 600
    assert manager.stats()["argon2_runs"] == 600, "the server budget is spent"
    # The attacking address waits now, for any key...
    assert reason(manager, wrong_secret(victims[0], 9999), attacker) == "throttled"
    new = manager.create("new")[1]
    assert reason(manager, new, attacker) == "throttled"
    # ...while a brand-new key from another address verifies (a first try), and so does a
    # victim's own unproven token, from IPv4 and from IPv6.
    assert reason(manager, new, "203.0.113.5") == "admitted"
    assert reason(manager, victims[7], "2001:db8:600d::1") == "admitted"
    assert manager.stats()["argon2_runs"] == 602
    manager.close()


def test_many_64s_of_one_48_do_not_use_up_the_first_tries_of_another_48() -> None:
    manager = KeyManager.memory(
        limits=_core.VerifyLimits(key_failure_budget=20, global_failure_budget=40)
    )
    _, victim = manager.create("victim")
    others = [manager.create(f"other {i}")[1] for i in range(6)]
    # 120 /64s of one /56 (inside one /48), two wrong secrets each against the victim.
    hits = [reason(manager, wrong_secret(victim, n * 2 + j), f"2001:db8:bad:{n:x}::1")
            for n in range(120) for j in range(2)]  # fmt: skip
    assert hits.count("bad_secret") == 20, "the key budget, then the /48 is not clean"
    # And against other keys from that /48, past the server budget.
    hits = [reason(manager, wrong_secret(t, 1000 + n), f"2001:db8:bad:{n:x}:1::1")
            for n in range(40) for t in others]  # fmt: skip
    assert hits.count("bad_secret") == 20, "the server budget, then the /48 is not clean"
    assert manager.stats()["argon2_runs"] == 40
    # The victim's unproven token from another /48, and a new key's, get their first try.
    assert reason(manager, victim, "2001:db8:600d:1::1") == "admitted"
    assert reason(manager, manager.create("new")[1], "2001:db8:cafe::1") == "admitted"
    # The attacking /48 waits, whichever /64 it uses (the victim's token, proven now,
    # passes from anywhere).
    assert reason(manager, wrong_secret(victim, 9999), "2001:db8:bad:ffff::1") == "throttled"
    assert reason(manager, victim, "2001:db8:bad:ffff::1") == "admitted"
    manager.close()


def test_failed_hashing_stays_within_twice_each_budget_from_many_clean_networks() -> None:
    manager = KeyManager.memory(
        limits=_core.VerifyLimits(key_failure_budget=10, global_failure_budget=30)
    )
    tokens = [manager.create(f"k{i}")[1] for i in range(8)]
    bad = dict.fromkeys(range(8), 0)
    # 250 IPv4 addresses (250 clean networks), each trying every key once.
    for a in range(250):
        for k, token in enumerate(tokens):
            got = reason(manager, wrong_secret(token, a), f"198.18.0.{a}")
            bad[k] += got == "bad_secret"
    runs = manager.stats()["argon2_runs"]
    assert runs == sum(bad.values()) == 2 * 30, "the budget, then as many first tries"
    assert max(bad.values()) <= 2 * 10, bad
    manager.close()


@pytest.mark.http
async def test_over_http_a_new_key_gets_in_after_the_server_budget_is_spent(
    make_server, serve, key_db: Path
) -> None:
    limits = _core.VerifyLimits(global_failure_budget=12)
    mcp, guard = make_server(keys=KeyStore(backend="sqlite", path=key_db, limits=limits))
    victims = [str(guard.keys.create(name=f"victim {i}").token) for i in range(6)]
    async with serve(mcp) as url:
        # One attacking address (127.0.0.2), 6 key ids x 3 wrong secrets.
        transport = httpx2.AsyncHTTPTransport(local_address="127.0.0.2")
        async with httpx2.AsyncClient(transport=transport) as attacker:
            statuses = [(await attacker.post(url, json=INIT, headers={
                **HEADERS, "authorization": f"Bearer {wrong_secret(t, n)}"})).status_code
                for n in range(3) for t in victims]  # fmt: skip
            assert statuses == [401] * 12 + [429] * 6
            new = guard.keys.create(name="new")
            refused = await attacker.post(
                url, json=INIT, headers={**HEADERS, "authorization": f"Bearer {new.token}"}
            )
            assert refused.status_code == 429 and refused.headers["retry-after"]
        # From another address (127.0.0.1) the new key is checked, and works.
        async with http_client(url, str(new.token)) as client:
            assert (await client.call_tool("echo", {"text": "in"})).data == "echo: in"
    assert guard.keys.core.stats()["argon2_runs"] == 12 + 1
    guard.keys.close()


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
