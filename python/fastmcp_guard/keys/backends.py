"""The interface a key store written in Python implements (PostgreSQL, Redis).

The Rust core's ``KeyManager.external(backend)`` calls these methods; it keeps
everything else (argon2id, the verified-token cache, lifecycle rules, the failure
throttle, batched ``last_used_at``, the change watcher). Records are dicts with the
fields of the core's ``KeyRecord``; times are Unix milliseconds (``int``) or ``None``;
``metadata`` is JSON text; ``scopes`` a list of str. A raised exception reaches the
caller as :class:`~fastmcp_guard.errors.StoreError` (its message kept; mask secrets).
"""

from __future__ import annotations

import builtins
from typing import Any, Protocol

__all__ = ["KeyBackend", "Record", "apply_lease"]

#: The largest balance (2**53), as in the core.
MAX_CREDITS = 2**53

#: One key as stored: id, name, phc_hash, scopes, metadata (JSON text), status,
#: created_at, expires_at, last_used_at, last_used_ip, grace_until, rotated_from,
#: rotated_to, revoked_at, revision, legacy_selector.
Record = dict[str, Any]


class KeyBackend(Protocol):
    """What ``KeyManager.external`` needs. Every write assigns the record a new
    store-wide, increasing ``revision``; ``update`` and ``rotate`` apply only if the
    stored revision still equals the record's (optimistic concurrency)."""

    #: The store as messages name it (password masked).
    name: str

    def insert(self, record: Record) -> int:
        """Store a new record; its revision."""

    def get(self, key_id: str) -> Record | None:
        """The record, or ``None``."""

    def list(self, include_revoked: bool) -> builtins.list[Record]:
        """All records (optionally without revoked ones), oldest first."""

    def update(self, record: Record) -> int | None:
        """Write the management fields (name, scopes, metadata, status, expires_at,
        grace_until, rotated_from, rotated_to, revoked_at) if the stored revision equals
        ``record["revision"]``; the new revision, or ``None`` (changed or gone)."""

    def rotate(self, old: Record, new: Record) -> tuple[int, int] | None:
        """``update(old)`` and ``insert(new)`` atomically; ``None`` if ``old`` changed."""

    def touch_many(self, touches: builtins.list[tuple[str, int, str | None]]) -> None:
        """Record uses ``(key_id, at_ms, client_ip)``; never moves ``last_used_at``
        backwards; no new revision."""

    # Credits (optional; a store without these methods refuses keys with credits). A
    # credits dict: balance, refill ("N/day" | "N/month" | None), shadow, base,
    # refilled_at, refill_at (ms | None), epoch.

    def lease_credits(self, key_id: str, want: int, bounds: dict[str, int]) -> dict[str, Any] | None:
        """In one atomic step: apply a due top-up (:func:`apply_lease`), then take
        ``min(want, balance)``. The lease dict, or ``None`` (no credits, or no such key).
        No new revision."""

    def return_credits(self, key_id: str, n: int, epoch: int) -> bool:
        """Add ``n`` back (at most 2**53) if the stored epoch is still ``epoch``."""

    def write_credits(self, key_id: str, expected: dict[str, Any] | None,
                      new: dict[str, Any] | None) -> int | None:  # fmt: skip
        """If the stored credits still have ``expected``'s balance and epoch (or both are
        absent), store ``new`` with a new revision and announce the change; else ``None``."""

    def current_revision(self) -> int:
        """The highest revision stored."""

    def changed_since(self, revision: int) -> tuple[int, builtins.list[tuple[str, int]]]:
        """``(next revision to ask from, [(key_id, revision), ...])`` changed after it."""


def apply_lease(state: dict[str, Any], want: int, bounds: dict[str, int]) -> tuple[dict[str, Any], bool]:
    """The core's ``Credits::lease`` on a credits dict, for stores that lease in Python
    inside a locked transaction: applies a top-up due at ``bounds["now_ms"]`` (the balance
    becomes the refill amount, a new epoch, the next top-up from ``bounds``), then takes
    ``min(want, balance)``. Changes ``state``; returns the lease dict and whether
    ``state`` changed."""
    changed = False
    refill, refill_at = state["refill"], state["refill_at"]
    if refill and refill_at is not None and bounds["now_ms"] >= refill_at:
        amount, _, period = refill.partition("/")
        state["balance"] = state["base"] = int(amount)
        state["epoch"] += 1
        kind = "day" if period == "day" else "month"
        state["refilled_at"] = bounds[f"{kind}_start_ms"]
        state["refill_at"] = bounds[f"{kind}_next_ms"]
        changed = True
    granted = min(max(want, 0), state["balance"])
    if granted:
        state["balance"] -= granted
        changed = True
    lease = {"granted": granted, "balance_after": state["balance"],
             "refill_at": state["refill_at"], "epoch": state["epoch"], "base": state["base"],
             "shadow": state["shadow"]}  # fmt: skip
    return lease, changed


class Housekeeper:
    """What the core's ``fmg-keys`` thread does for SQLite, done from a Python daemon
    thread for a store written in Python: write batched ``last_used_at`` every
    ``touch_interval`` and read other nodes' changes every ``watch_interval``.

    A Python thread, because the interpreter stops it safely at exit; a Rust thread
    calling into Python then could block finalisation. Errors are logged (once per
    kind until it recovers), never raised: the next round retries.
    """

    def __init__(self, manager: Any, name: str, touch_interval: float,
                 watch_interval: float) -> None:  # fmt: skip
        import threading

        self.manager = manager
        self.name = name
        self.touch_interval = touch_interval
        self.watch_interval = watch_interval
        self._stop = threading.Event()
        self._failing: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="fmg-keys-py", daemon=True)
        self._thread.start()

    def _step(self, what: str, fn: Any) -> None:
        import logging

        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - logged; retried next round
            if what not in self._failing:
                self._failing.add(what)
                logging.getLogger("fastmcp_guard.keys").warning(
                    "key store %s: %s failed (%s); retrying", self.name, what, exc
                )
        else:
            self._failing.discard(what)

    def _run(self) -> None:
        import time

        next_touch = time.monotonic() + self.touch_interval
        while not self._stop.wait(self.watch_interval):
            self._step("reading changes", self.manager.sync_changes)
            if time.monotonic() >= next_touch:
                self._step("writing last_used_at", self.manager.flush)
                next_touch = time.monotonic() + self.touch_interval

    def close(self) -> None:
        """Stop (the caller then closes the manager, which writes what is pending)."""
        self._stop.set()
        self._thread.join(timeout=5)
