"""The per-process credit book: spends a key's credits from local leases.

Credits live in the key store (``ApiKey.credits``). Writing the store on every call would
cost a round trip per call, so each process takes *leases*: blocks of units subtracted
from the store balance in one atomic step (``KeyStore.lease_credits``), then spent
locally with a dict lookup and a subtraction (:meth:`CreditBook.spend`). When a lease
runs short, :meth:`CreditBook.acquire` takes another (in a worker thread, one at a time
per key). Unspent units go back to the store at :meth:`CreditBook.close`.

Lease size: ``clamp(last known store balance // 16, units needed, lease_max)``; the
first lease of a key asks only for what the call needs. Near exhaustion leases are a
few units, so little can sit in one process while another runs dry.

Guarantees (README words in ``credits_refusal_text``'s neighbours below):

- **Never more than N.** Every unit is granted by the store to one process at most, and
  spent by one call at most: N credits admit at most N cost units, whatever the number
  of processes and however concurrent the calls.
- **All N, while calls keep coming.** A process refuses a call only when its own lease
  cannot pay it *and* the store has not enough left. Units can then only be in other
  processes' leases, each at most ``lease_max`` (default 256); such a process spends them
  on its next calls. So when calls keep reaching every process (3N calls spread over two
  nodes), exactly N units are spent. What a process that receives no more calls holds
  stays unspent until it closes (its leases go back to the store then).
- **Crash bound.** A process killed without closing (``kill -9``, power loss) loses its
  unspent leases: at most ``lease_max`` units per key (or a call's cost minus 1, if a
  call costs more), never more.
- **Refills.** Calendar based in UTC: at 00:00 UTC (``/day``) or on the 1st at 00:00 UTC
  (``/month``) the balance *becomes* N (the old period's leftovers, in the store or in
  leases, are dropped). A lease of the old period is not spent after the boundary.
- **Operator changes.** ``set_credits`` / ``add_credits`` take effect in the store at once;
  leases processes already hold are not recalled (at most ``lease_max`` per process and
  key are spent on top of a ``set``), and after a ``set`` they are not given back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, NamedTuple

import anyio.to_thread

if TYPE_CHECKING:
    from fastmcp_guard._core import CreditLease
    from fastmcp_guard.keys import KeyStore

__all__ = [
    "CREDITS_CLAIM", "DEFAULT_LEASE_MAX", "EXHAUSTED_RECHECK_S", "MAX_CREDITS", "CreditBook",
    "CreditOutcome",
    "credits_refusal_text",
]  # fmt: skip

#: The access-token claim of a key with credits: ``{"shadow": bool}``.
CREDITS_CLAIM = "credits"

log = logging.getLogger("fastmcp_guard.keys")

#: The largest lease a process takes (also the most a crashed process can lose per key).
DEFAULT_LEASE_MAX = 256
#: The largest balance a key can hold (2**53: exact in every store, JSON and Lua).
MAX_CREDITS = 2**53
#: A lease is about this fraction of the store balance (so near exhaustion it is small).
_LEASE_FRACTION = 16
#: Leases one payment may take before it gives up (each round pays or drains the store:
#: more are needed only while concurrent calls keep spending what was leased).
_MAX_LEASE_ROUNDS = 16
#: "Low" means below this fraction of the base.
_LOW = 0.10
#: After the store said a key's credits are spent, this process refuses that key's calls
#: for this long without asking the store again (a flood of calls from an exhausted key
#: costs no store write each). Credits added by an operator, or given back by another
#: process, are therefore seen up to this late; a refill at its time.
EXHAUSTED_RECHECK_S = 1.0


class CreditOutcome(NamedTuple):
    """What :meth:`CreditBook.acquire` decided for one call."""

    #: The call's cost was paid.
    paid: bool
    #: Not paid, but the key (or the book) runs credits in shadow: the call goes on and is
    #: audited ``would_refuse``.
    shadow: bool
    #: The best local estimate of the balance: the store balance at the last lease plus
    #: this process's unspent lease. ``None``: the key has no credits in the store
    #: (unlimited; the call is paid).
    balance: int | None
    #: The next top-up, or ``None`` (no refill).
    refill_at: datetime | None
    #: ``"credits_low"`` the first time this process sees the balance below 10 % of the
    #: base in the current period, ``"credits_exhausted"`` the first time it sees a call
    #: it cannot pay in the current period; else ``None``.
    event: str | None
    #: What "10 %" is measured against (the refill amount, or the last balance set).
    base: int = 0
    #: The call's cost.
    cost: int = 1


class _Account:
    """This process's view of one key's credits."""

    __slots__ = ("base", "epoch", "exhausted_epoch", "lease", "low_epoch", "recheck_ts",
                 "refill_at", "refill_ts", "shadow", "store_balance")  # fmt: skip

    def __init__(self) -> None:
        self.lease = 0  # unspent units held here
        self.epoch = -1  # the epoch of those units
        self.store_balance = 0  # the store balance at the last lease
        self.refill_at: datetime | None = None
        self.refill_ts: float | None = None  # refill_at as Unix seconds (the hot path)
        self.base = 0
        self.shadow = False
        self.low_epoch = -1  # the epoch "credits_low" was reported in
        self.exhausted_epoch = -1
        self.recheck_ts = 0.0  # the store was empty: do not ask it again before this


def _utc(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


class CreditBook:
    """Spends keys' credits for one process (see the module docs for the guarantees).

    Args:
        store: the key store (``guard.keys``).
        clock: returns the current time as an aware UTC datetime; refill decisions use
            it (tests set it). Default: the system clock.
        lease_max: the largest lease (units); also the most a crashed process loses per
            key.
        shadow: every key's credits in shadow (the ``credits_mode="shadow"`` setting):
            running out is audited ``would_refuse``, never refused.

    Used from one event loop by many tasks. :meth:`spend` is the hot path (no I/O);
    :meth:`acquire` leases from the store in a worker thread, one lease at a time per key.
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        clock: Callable[[], datetime] | None = None,
        lease_max: int = DEFAULT_LEASE_MAX,
        shadow: bool = False,
    ) -> None:
        from fastmcp_guard.errors import ConfigError

        if isinstance(lease_max, bool) or not isinstance(lease_max, int) or lease_max < 1:
            raise ConfigError(f"lease_max must be a whole number >= 1, got {lease_max!r}")
        self.store = store
        self.clock = clock
        self.lease_max = lease_max
        self.shadow = bool(shadow)
        self._accounts: dict[str, _Account] = {}
        # key id -> [lock, tasks using it]: created on demand, dropped when unused.
        self._locks: dict[str, list[object]] = {}
        #: Bumped by :meth:`close`: a lease that returns after it belongs to no account.
        self._generation = 0

    # -- time ------------------------------------------------------------------------

    def _now(self) -> datetime:
        if self.clock is None:
            return datetime.now(timezone.utc)
        now = self.clock()
        if now.tzinfo is None:
            from fastmcp_guard.errors import ConfigError

            raise ConfigError("CreditBook clock() must return an aware datetime (UTC)")
        return now

    def _now_ts(self) -> float:
        return time.time() if self.clock is None else self._now().timestamp()

    # -- the hot path ----------------------------------------------------------------

    def spend(self, key_id: str, cost: int) -> int | None:
        """Pay ``cost`` from this process's lease: ``None`` if paid (no I/O); otherwise
        the units missing, and the caller awaits :meth:`acquire` for this call."""
        acct = self._accounts.get(key_id)
        if acct is None:
            return cost
        if acct.refill_ts is not None and self._now_ts() >= acct.refill_ts:
            return cost  # a new period: the store tops up, this lease is void
        if acct.lease >= cost:
            acct.lease -= cost
            return None
        return cost - acct.lease

    def epoch(self, key_id: str) -> int:
        """The period this process's lease for ``key_id`` belongs to (what a call paid in;
        give it back to :meth:`refund`); -1 if it holds none."""
        acct = self._accounts.get(key_id)
        return -1 if acct is None else acct.epoch

    def refund(self, key_id: str, cost: int, epoch: int) -> None:
        """Give back ``cost`` units :meth:`spend` or :meth:`acquire` paid, in ``epoch``
        (:meth:`epoch` right after paying), for a call that was then refused by something
        else or never ran (a refusal consumes nothing): they return to this process's
        lease, no I/O. Nothing happens if that lease was voided since (a refill, a
        ``set_credits``: units of an old period are never spent in a new one) or the book
        was closed."""
        acct = self._accounts.get(key_id)
        if (
            acct is not None
            and acct.epoch == epoch
            and (acct.refill_ts is None or self._now_ts() < acct.refill_ts)
        ):
            acct.lease += cost

    def balance(self, key_id: str) -> tuple[int, datetime | None] | None:
        """The local estimate ``(balance, refill_at)`` for the agent's ``_meta`` (no I/O);
        ``None`` if this process has not leased for the key yet."""
        acct = self._accounts.get(key_id)
        if acct is None:
            return None
        return acct.store_balance + acct.lease, acct.refill_at

    # -- the slow path ---------------------------------------------------------------

    async def acquire(self, key_id: str, cost: int) -> CreditOutcome:
        """Pay ``cost``, taking a lease from the store if the local one cannot (in a worker
        thread; one lease at a time per key, tasks waiting for the same key reuse it).

        Raises the store's error (:class:`~fastmcp_guard.errors.StoreError`) if it cannot
        be reached; nothing is paid then.
        """
        import asyncio

        entry = self._locks.get(key_id)
        if entry is None:
            entry = self._locks[key_id] = [asyncio.Lock(), 0]
        entry[1] = int(entry[1]) + 1  # type: ignore[call-overload]
        lock = entry[0]
        assert isinstance(lock, asyncio.Lock)
        try:
            async with lock:
                return await self._acquire_locked(key_id, cost)
        finally:
            entry[1] = int(entry[1]) - 1  # type: ignore[call-overload]
            if entry[1] == 0 and self._locks.get(key_id) is entry:
                del self._locks[key_id]

    async def _acquire_locked(self, key_id: str, cost: int) -> CreditOutcome:
        acct = self._accounts.get(key_id)
        empty = False
        # Again while the store still has units: a new epoch mid-way voids the local ones,
        # and calls paid from the lease while this one waited for the store may have
        # spent what it counted on. Each round either pays or drains the store.
        for _ in range(_MAX_LEASE_ROUNDS):
            now = self._now()
            now_ts = now.timestamp()
            if acct is not None and acct.refill_ts is not None and now_ts >= acct.refill_ts:
                acct.lease = 0  # the old period's units are void
            if acct is not None and acct.lease >= cost:
                # Another task's lease (taken while this one waited) pays it.
                acct.lease -= cost
                return self._outcome(acct, True, cost)
            if acct is not None and now_ts < acct.recheck_ts and (
                acct.refill_ts is None or now_ts < acct.refill_ts
            ):
                # Spent, as the store said just now.
                return self._outcome(acct, False, cost, exhausted=True)
            local = acct.lease if acct is not None else 0
            need = cost - local
            if acct is None:
                want = need
            else:
                want = min(max(acct.store_balance // _LEASE_FRACTION, need), max(self.lease_max, need))
            generation = self._generation
            lease: CreditLease | None = await anyio.to_thread.run_sync(
                self.store.lease_credits, key_id, want, now
            )
            if self._generation != generation:
                # Closed while the store answered (a server lifespan ended): the account
                # these units were for is gone. Give them back, and ask again for this
                # call's cost only (so nothing is left held by nobody).
                if lease is not None and lease.granted:
                    await anyio.to_thread.run_sync(
                        self.store.return_credits, key_id, lease.granted, lease.epoch
                    )
                acct = self._accounts.get(key_id)
                continue
            if lease is None:
                # No credits in the store (removed, or never had them): unlimited.
                self._accounts.pop(key_id, None)
                return CreditOutcome(True, False, None, None, None, 0, cost)
            if acct is None:
                acct = self._accounts[key_id] = _Account()
            if lease.epoch != acct.epoch:
                acct.lease = 0  # a refill or a set since: what was held is void
                acct.epoch = lease.epoch
            acct.lease += lease.granted
            acct.store_balance = lease.balance_after
            acct.recheck_ts = 0.0  # the store answered: its word is news again
            acct.refill_ts = lease.refill_at
            acct.refill_at = _utc(lease.refill_at)
            acct.base = lease.base
            acct.shadow = lease.shadow
            if acct.lease >= cost:
                acct.lease -= cost
                return self._outcome(acct, True, cost)
            if lease.balance_after == 0 and (acct.refill_ts is None or now_ts < acct.refill_ts):
                acct.recheck_ts = now_ts + EXHAUSTED_RECHECK_S
                empty = True
                break  # the store is empty for this period
        assert acct is not None
        return self._outcome(acct, False, cost, exhausted=empty)

    def _outcome(
        self, acct: _Account, paid: bool, cost: int, *, exhausted: bool = False
    ) -> CreditOutcome:
        balance = acct.store_balance + acct.lease
        event = None
        if not paid and exhausted and acct.exhausted_epoch != acct.epoch:
            acct.exhausted_epoch = acct.low_epoch = acct.epoch
            event = "credits_exhausted"
        elif acct.base > 0 and balance < acct.base * _LOW and acct.low_epoch != acct.epoch:
            acct.low_epoch = acct.epoch
            event = "credits_low"
        shadow = not paid and (acct.shadow or self.shadow)
        return CreditOutcome(paid, shadow, balance, acct.refill_at, event, acct.base, cost)

    # -- closing ---------------------------------------------------------------------

    def close(self) -> None:
        """Give every unspent lease back to the store (blocking; errors are logged: those
        units are then lost, as in a crash). Idempotent; the book stays usable (a server
        lifespan ends with it, and an in-process server may start another): a lease still
        on its way from the store is given back when it arrives."""
        self._generation += 1
        accounts, self._accounts = self._accounts, {}
        for key_id, acct in accounts.items():
            if acct.lease <= 0:
                continue
            try:
                self.store.return_credits(key_id, acct.lease, acct.epoch)
            except Exception as exc:  # noqa: BLE001 - closing must go on for other keys
                log.warning("credits of key %s: giving back %d unspent units failed (%s)",
                            key_id, acct.lease, exc)  # fmt: skip

    async def aclose(self) -> None:
        """:meth:`close` in a worker thread."""
        await anyio.to_thread.run_sync(self.close)


def credits_refusal_text(outcome: CreditOutcome) -> str:
    """The refusal an agent reads when a call cannot be paid, e.g. ``"Credits exhausted for
    this key: 0 of 5000 left; they refill to 5000 at 2027-01-01T00:00:00Z."``"""
    left = outcome.balance or 0
    head = f"Credits exhausted for this key: {left} of {outcome.base} left"
    if left > 0:
        head += f", and this call costs {outcome.cost}"
    if outcome.refill_at is not None:
        when = outcome.refill_at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"{head}; they refill to {outcome.base} at {when}."
    return f"{head}; no refill is scheduled; ask the operator to add credits."
