"""Credits on a key (memory and SQLite stores) and the per-process CreditBook.

The book's clock is set by the tests (refill decisions); the store's leases take that
time explicitly, so a day boundary is crossed without waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastmcp_guard._core import parse_refill
from fastmcp_guard.errors import ConfigError, InvalidKeyInputError, KeyNotFoundError
from fastmcp_guard.keys import KeyStore
from fastmcp_guard.keys.credits import CreditBook, CreditOutcome, credits_refusal_text
from fastmcp_guard.keys.verifier import access_token_for


@pytest.fixture(params=["memory", "sqlite"])
def keys(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyStore]:
    if request.param == "memory":
        store = KeyStore()
    else:
        store = KeyStore(backend="sqlite", path=tmp_path / "keys.db")
    yield store
    store.close()


class Clock:
    """A settable clock for the book (aware UTC)."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def pay(book: CreditBook, key_id: str, cost: int = 1) -> CreditOutcome | None:
    """One call's payment as the middleware makes it: ``None`` = paid from the lease."""
    if book.spend(key_id, cost) is None:
        return None
    return await book.acquire(key_id, cost)


def paid(outcome: CreditOutcome | None) -> bool:
    return outcome is None or outcome.paid


# -- the key -----------------------------------------------------------------------------


def test_create_set_add_and_inspect(keys: KeyStore) -> None:
    plain = keys.create("plain")
    assert (plain.credits, plain.refill, plain.refill_at, plain.credits_shadow) == (
        None, None, None, False)  # fmt: skip
    key = keys.create("agent", credits=5000, refill="5000/month", credits_shadow=True)
    now = datetime.now(timezone.utc)
    first = (now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
             + timedelta(days=32)).replace(day=1)  # fmt: skip
    assert (key.credits, key.refill, key.credits_shadow, key.credits_base) == (
        5000, "5000/month", True, 5000)  # fmt: skip
    assert key.refill_at == first
    assert keys.inspect(key.id) == key
    assert keys.add_credits(key.id, -4990).credits == 10
    assert keys.set_credits(key.id, 7).credits == 7
    assert keys.add_credits(key.id, -100).credits == 0, "the balance stops at 0"
    assert keys.inspect(key.id).credits == 0
    # Refill without credits starts full; a key without credits gets them by set.
    assert keys.create("full", refill="20/day").credits == 20
    got = keys.set_credits(plain.id, 3)
    assert (got.credits, got.refill, got.credits_base) == (3, None, 3)
    assert keys.set_credits(plain.id, None).credits is None
    listed = {k.id: k for k in keys.list()}
    assert listed[key.id].credits == 0 and listed[plain.id].credits is None
    with pytest.raises(KeyNotFoundError):
        keys.set_credits("fmg_key_AAAAAAAAAAAAAAAA", 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"credits": -1}, "-1 is negative"),
        ({"credits": 1.5}, "expected a whole number"),
        ({"credits": True}, "expected a whole number"),
        ({"credits": "5"}, "expected a whole number"),
        ({"credits": 2**53 + 1}, r"above the largest balance, 2\*\*53"),
        ({"refill": "5/fortnight"}, "N/day.*N/month"),
        ({"refill": "0/day"}, "N/day.*N/month"),
        ({"refill": "-1/day"}, "N/day.*N/month"),
        ({"refill": "5/week"}, "N/day.*N/month"),
        ({"refill": 5}, "expected a str"),
        ({"credits_shadow": True}, "has no credits"),
    ],
)
def test_bad_credits_are_refused_at_construction(
    keys: KeyStore, kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(InvalidKeyInputError, match=match):
        keys.create("bad", **kwargs)  # type: ignore[arg-type]
    assert keys.list(include_revoked=True) == [], "nothing was created"


def test_bad_changes_are_refused(keys: KeyStore) -> None:
    key = keys.create("agent", credits=5)
    for bad in (-1, 1.5, 2**53 + 1, True):
        with pytest.raises(InvalidKeyInputError):
            keys.set_credits(key.id, bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyInputError, match="2\\*\\*53"):
        keys.add_credits(key.id, 2**53)
    assert keys.inspect(key.id).credits == 5


def test_parse_refill_is_the_one_parser() -> None:
    assert parse_refill("5000/month") == (5000, "month")
    assert parse_refill(" 7 / day ") == (7, "day")
    with pytest.raises(ValueError, match="5/fortnight.*N/day"):
        parse_refill("5/fortnight")


def test_credits_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    first = KeyStore(backend="sqlite", path=path)
    key = first.create("agent", credits=40, refill="100/day", credits_shadow=True)
    first.lease_credits(key.id, 15, datetime.now(timezone.utc))
    first.close()
    again = KeyStore(backend="sqlite", path=path)
    try:
        back = again.inspect(key.id)
        assert (back.credits, back.refill, back.credits_shadow, back.refill_at) == (
            25, "100/day", True, key.refill_at)  # fmt: skip
    finally:
        again.close()


def test_the_verifier_claim_says_whether_a_key_has_credits(keys: KeyStore) -> None:
    plain = keys.create("plain", metadata={"credits": "not a claim"})
    shadow = keys.create("shadow", credits=1, credits_shadow=True)
    enforced = keys.create("enforced", refill="9/day")
    claims = {}
    for key in (plain, shadow, enforced):
        assert key.token is not None
        claims[key.id] = access_token_for(key.token, keys.core.verify(key.token)).claims
    assert "credits" not in claims[plain.id]
    assert claims[shadow.id]["credits"] == {"shadow": True}
    assert claims[enforced.id]["credits"] == {"shadow": False}


def test_rotation_moves_the_balance_to_the_new_key(keys: KeyStore) -> None:
    key = keys.create("agent", credits=30, refill="100/month")
    keys.lease_credits(key.id, 12, datetime.now(timezone.utc))
    new = keys.rotate(key.id, grace_period_hours=1)
    assert (new.credits, new.refill, new.credits_base) == (18, "100/month", 100)
    old = keys.inspect(key.id)
    assert (old.credits, old.refill) == (0, None), "no budget is doubled by a rotation"


# -- the book ----------------------------------------------------------------------------


async def test_the_book_pays_from_its_lease_and_gives_the_rest_back(keys: KeyStore) -> None:
    key = keys.create("agent", credits=1000)
    book = CreditBook(keys, lease_max=64)
    assert book.spend(key.id, 1) == 1, "nothing leased yet"
    assert book.balance(key.id) is None
    first = await book.acquire(key.id, 1)
    assert first.paid and first.event is None
    assert [await pay(book, key.id) for _ in range(5)].count(None) >= 1
    in_store = keys.inspect(key.id).credits
    assert in_store is not None and in_store < 1000 - 6, "units are held in a lease"
    estimate = book.balance(key.id)
    assert estimate is not None and estimate[0] == 1000 - 6
    await book.aclose()
    assert keys.inspect(key.id).credits == 1000 - 6, "the unspent lease went back"


async def test_concurrent_calls_in_one_process_pay_exactly_n(keys: KeyStore) -> None:
    key = keys.create("agent", credits=50)
    book = CreditBook(keys)
    results = await asyncio.gather(*(pay(book, key.id) for _ in range(150)))
    assert sum(map(paid, results)) == 50
    events = [r.event for r in results if r is not None and r.event]
    assert events.count("credits_exhausted") == 1 and events.count("credits_low") == 1
    assert book._locks == {}, "per-key locks are dropped when unused"
    await book.aclose()
    assert keys.inspect(key.id).credits == 0


async def test_refill_at_a_day_boundary_with_a_settable_clock(keys: KeyStore) -> None:
    key = keys.create("agent", credits=3, refill="5/day")
    assert key.refill_at is not None
    clock = Clock(key.refill_at - timedelta(milliseconds=1))
    book = CreditBook(keys, clock=clock)
    assert [paid(await pay(book, key.id)) for _ in range(4)] == [True, True, True, False]
    refused = await pay(book, key.id)
    assert refused is not None and not refused.paid and refused.refill_at == key.refill_at
    assert credits_refusal_text(refused) == (
        "Credits exhausted for this key: 0 of 5 left; they refill to 5 at "
        f"{key.refill_at.strftime('%Y-%m-%dT%H:%M:%SZ')}."
    )
    clock.now = key.refill_at  # midnight UTC
    assert book.spend(key.id, 1) == 1, "the old day's lease is void"
    outcomes = [await pay(book, key.id) for _ in range(6)]
    assert list(map(paid, outcomes)) == [True] * 5 + [False], "topped up to 5, not 5 + rest"
    last = outcomes[-1]
    assert last is not None and last.event == "credits_exhausted", "once per period"
    assert last.refill_at == key.refill_at + timedelta(days=1)
    assert keys.inspect(key.id).credits == 0
    await book.aclose()


async def test_shadow_credits_never_refuse_and_say_so(keys: KeyStore) -> None:
    shadow = keys.create("shadow", credits=1, credits_shadow=True)
    enforced = keys.create("enforced", credits=1)
    book = CreditBook(keys)
    assert paid(await pay(book, shadow.id))
    over = await pay(book, shadow.id)
    assert over is not None and (over.paid, over.shadow, over.event) == (
        False, True, "credits_exhausted")  # fmt: skip
    assert paid(await pay(book, enforced.id))
    refused = await pay(book, enforced.id)
    assert refused is not None and (refused.paid, refused.shadow) == (False, False)
    # The global switch (credits_mode="shadow") puts every key in shadow.
    everyone = CreditBook(keys, shadow=True)
    would = await pay(everyone, enforced.id)
    assert would is not None and (would.paid, would.shadow) == (False, True)
    assert credits_refusal_text(refused) == (
        "Credits exhausted for this key: 0 of 1 left; no refill is scheduled; ask the "
        "operator to add credits."
    )


async def test_a_set_voids_held_leases_and_a_key_without_credits_is_paid(
    keys: KeyStore,
) -> None:
    key = keys.create("agent", credits=100)
    book = CreditBook(keys)
    for _ in range(3):
        await pay(book, key.id)
    keys.set_credits(key.id, 10)
    await book.aclose()
    assert keys.inspect(key.id).credits == 10, "a lease of before the set is not given back"
    keys.set_credits(key.id, None)
    out = await book.acquire(key.id, 1)
    assert (out.paid, out.balance) == (True, None)


async def test_a_call_costing_more_than_is_left_is_refused_with_its_cost(keys: KeyStore) -> None:
    key = keys.create("agent", credits=3)
    book = CreditBook(keys)
    out = await book.acquire(key.id, 5)
    assert not out.paid
    assert "3 of 3 left, and this call costs 5" in credits_refusal_text(out)
    assert paid(await pay(book, key.id, 3)), "the units stay usable by a cheaper call"


def test_bad_book_options() -> None:
    with pytest.raises(ConfigError, match="lease_max"):
        CreditBook(KeyStore(), lease_max=0)


def test_a_python_store_without_credit_methods_refuses_credits() -> None:
    from fastmcp_guard._core import KeyManager

    from tests.unit.test_external_backend import DictBackend

    backend = DictBackend()
    km = KeyManager.external(backend)
    with pytest.raises(InvalidKeyInputError, match="cannot keep credits"):
        km.create("agent", credits=5)
    assert backend.rows == {}, "no key made unlimited by a store that cannot limit it"
    info, _ = km.create("plain")
    with pytest.raises(InvalidKeyInputError, match="write_credits"):
        km.set_credits(info.id, 5)
    km.close()


async def test_an_exhausted_key_does_not_ask_the_store_on_every_call(keys: KeyStore) -> None:
    """A flood of calls from a key whose credits are spent costs the store one lease per
    second (EXHAUSTED_RECHECK_S), not one write per call; a refill is seen at its time."""
    from fastmcp_guard.keys.credits import EXHAUSTED_RECHECK_S

    key = keys.create("agent", credits=2, refill="2/day")
    assert key.refill_at is not None
    clock = Clock(key.refill_at - timedelta(seconds=30))
    leases: list[int] = []

    class Counting:  # the real store, its lease calls counted
        def __getattr__(self, name: str) -> Any:
            return getattr(keys, name)

        def lease_credits(self, *args: Any) -> Any:
            leases.append(1)
            return keys.lease_credits(*args)

    book = CreditBook(Counting(), clock=clock)  # type: ignore[arg-type]
    assert [paid(await pay(book, key.id)) for _ in range(2)] == [True, True]
    before = len(leases)
    assert not any([paid(await pay(book, key.id)) for _ in range(50)])
    assert len(leases) - before == 1, "one store lease, then refusals from memory"
    clock.now += timedelta(seconds=EXHAUSTED_RECHECK_S + 0.1)
    assert not paid(await pay(book, key.id))
    assert len(leases) - before == 2, "asked again once the recheck interval passed"
    keys.add_credits(key.id, 5)
    assert not paid(await pay(book, key.id)), "added credits are seen after the interval"
    clock.now += timedelta(seconds=EXHAUSTED_RECHECK_S + 0.1)
    assert paid(await pay(book, key.id))
    clock.now = key.refill_at  # the refill is seen at once, whatever the interval
    assert paid(await pay(book, key.id))
    await book.aclose()


async def test_a_refund_of_an_older_period_is_dropped(keys: KeyStore) -> None:
    key = keys.create("agent", credits=5)
    book = CreditBook(keys)
    assert paid(await pay(book, key.id))
    epoch = book.epoch(key.id)
    keys.set_credits(key.id, 2)  # a new period: what this process holds is void
    assert paid(await pay(book, key.id))
    assert book.epoch(key.id) != epoch
    held = book.balance(key.id)
    book.refund(key.id, 1, epoch)  # paid in the old period: not spendable in this one
    assert book.balance(key.id) == held
    book.refund(key.id, 1, book.epoch(key.id))
    assert book.balance(key.id) is not None and book.balance(key.id)[0] == held[0] + 1  # type: ignore[index]
    await book.aclose()
