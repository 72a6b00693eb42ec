"""Threat: beating the failure throttle by guessing in parallel (issue 10, finding 7).

The throttle allowed 10 failures per (client, key id) and minute when guesses came one
after another, but 30 guesses fired at once got 29 to 47 argon2 runs: the throttle was
checked before waiting for a hashing slot and not again after. Now each attempt reserves
its place in the budgets atomically before hashing, so parallel attempts never get more
hash runs than sequential ones.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastmcp_guard._core import KeyManager, VerifyError

from tests.security._tokens import wrong_secret

MAX_FAILURES = 10  # the default per (client, key id) and minute


@pytest.mark.parametrize("attackers", [30, 50])
def test_parallel_guesses_get_exactly_the_sequential_number_of_hash_runs(
    attackers: int,
) -> None:
    manager = KeyManager.memory(max_concurrent_verifications=2)
    _, token = manager.create("victim")
    start = threading.Barrier(attackers)

    def guess(n: int) -> str:
        start.wait()
        try:
            manager.verify(wrong_secret(token, n), "198.51.100.9")
        except VerifyError as exc:
            return exc.reason
        return "admitted"

    with ThreadPoolExecutor(attackers) as pool:
        reasons = list(pool.map(guess, range(attackers)))
    assert manager.stats()["argon2_runs"] == MAX_FAILURES
    assert sorted(reasons) == sorted(
        ["bad_secret"] * MAX_FAILURES + ["throttled"] * (attackers - MAX_FAILURES)
    )
    manager.close()


def test_the_same_holds_for_sequential_guesses() -> None:
    manager = KeyManager.memory()
    _, token = manager.create("victim")
    reasons = []
    for n in range(30):
        try:
            manager.verify(wrong_secret(token, n), "198.51.100.9")
        except VerifyError as exc:
            reasons.append(exc.reason)
    assert manager.stats()["argon2_runs"] == MAX_FAILURES
    assert reasons == ["bad_secret"] * MAX_FAILURES + ["throttled"] * 20
    manager.close()
