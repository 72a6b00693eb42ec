"""The verifier's ``AccessToken``: built once per verified-token cache entry, attached to
that entry in the core, and gone with it.

Threat: an ``AccessToken`` (scopes, expiry, claims) kept apart from the core's cache
could outlive what it was built from, and be served for a revoked key, after an
expiry, or with the scopes a key had before a change in the store. These tests drive
the real ``GuardTokenVerifier`` over real SQLite stores, and the binding underneath,
and check that each way an entry leaves the cache takes its object with it.
"""

from __future__ import annotations

import gc
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastmcp import FastMCP
from fastmcp.server.auth import AccessToken
from fastmcp_guard import Guard, KeyStore
from fastmcp_guard._core import KeyManager

#: How long a poll for a condition may take before the test fails.
WAIT_S = 4.0


def wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def gone(ref: weakref.ref[Any]) -> bool:
    gc.collect()
    return ref() is None


@pytest.fixture
def guarded(key_db: Path) -> Iterator[tuple[Guard, KeyStore]]:
    store = KeyStore(backend="sqlite", path=key_db, watch_interval_seconds=3600)
    guard = Guard(FastMCP("t"), keys=store)
    yield guard, store
    store.close()


async def verify(guard: Guard, token: str) -> AccessToken | None:
    assert guard.verifier is not None
    return await guard.verifier.verify_token(token)


def change_in_store(path: Path, key_id: str, **columns: Any) -> None:
    """What another process (an admin tool, another server) writing the SQLite file does:
    set the columns and give the row a new revision."""
    with sqlite3.connect(path) as db:
        (rev,) = db.execute(
            "UPDATE fmg_meta SET revision = revision + 1 WHERE id = 1 RETURNING revision"
        ).fetchone()
        sets = ", ".join(f"{c} = ?" for c in columns)
        db.execute(
            f"UPDATE fmg_keys SET {sets}, revision = ? WHERE id = ?",
            (*columns.values(), rev, key_id),
        )


async def test_a_cached_key_gets_the_same_access_token_again(
    guarded: tuple[Guard, KeyStore],
) -> None:
    guard, store = guarded
    key = store.create("alice", scopes=["read"], metadata={"team": "a"})
    first = await verify(guard, str(key.token))
    assert first is not None
    assert (first.client_id, first.scopes, first.claims["team"]) == (key.id, ["read"], "a")
    assert await verify(guard, str(key.token)) is first  # built once, from the cache entry


async def test_a_revoked_key_never_gets_its_access_token_back(
    guarded: tuple[Guard, KeyStore],
) -> None:
    guard, store = guarded
    key = store.create("alice", scopes=["read"])
    access = await verify(guard, str(key.token))
    assert access is not None
    ref = weakref.ref(access)
    del access
    store.revoke(key.id)
    # The object went with the cache entry: nothing keeps it for the token.
    assert gone(ref), "the revoked key's AccessToken outlived its cache entry"
    assert await verify(guard, str(key.token)) is None


async def test_a_key_revoked_by_another_process_loses_its_access_token(
    key_db: Path,
) -> None:
    # The entry is dropped by the watcher thread (``fmg-keys``, no GIL): the object's
    # release is deferred to the next time Python is entered, never a crash.
    store = KeyStore(backend="sqlite", path=key_db, watch_interval_seconds=0.02)
    other = KeyStore(backend="sqlite", path=key_db)
    try:
        guard = Guard(FastMCP("t"), keys=store)
        key = store.create("alice", scopes=["read"])
        access = await verify(guard, str(key.token))
        assert access is not None
        ref = weakref.ref(access)
        del access
        other.revoke(key.id)
        wait_for(lambda: store.core.verify_cached(str(key.token)) is None, "the watcher")
        assert gone(ref)
        assert await verify(guard, str(key.token)) is None
    finally:
        other.close()
        store.close()


async def test_scopes_removed_in_the_store_are_not_served_from_an_old_access_token(
    guarded: tuple[Guard, KeyStore], key_db: Path
) -> None:
    guard, store = guarded
    key = store.create("alice", scopes=["read", "admin"], metadata={"team": "a"})
    before = await verify(guard, str(key.token))
    assert before is not None and before.scopes == ["read", "admin"]
    ref = weakref.ref(before)
    del before
    change_in_store(key_db, key.id, scopes='["read"]', metadata='{"team": "b"}')
    assert store.core.sync_changes() == 1
    assert gone(ref)
    after = await verify(guard, str(key.token))
    assert after is not None
    assert (after.scopes, after.claims["team"]) == (["read"], "b")
    assert await verify(guard, str(key.token)) is after


async def test_an_expiry_set_in_the_store_ends_the_access_token(
    guarded: tuple[Guard, KeyStore], key_db: Path
) -> None:
    guard, store = guarded
    key = store.create("alice", scopes=["read"])
    assert await verify(guard, str(key.token)) is not None
    change_in_store(key_db, key.id, expires_at=int(time.time() * 1000) - 1000)
    store.core.sync_changes()
    assert await verify(guard, str(key.token)) is None


async def test_an_expired_key_gets_no_access_token(guarded: tuple[Guard, KeyStore]) -> None:
    guard, store = guarded
    soon = datetime.now(timezone.utc) + timedelta(seconds=0.5)
    key = store.create("alice", scopes=["read"], expires_at=soon)
    access = await verify(guard, str(key.token))
    assert access is not None and access.expires_at is not None
    assert abs(access.expires_at - soon.timestamp()) <= 1
    ref = weakref.ref(access)
    del access
    # Past its expiry the entry is no longer served (whatever the cache TTL).
    wait_for(lambda: store.core.verify_cached(str(key.token)) is None, "the expiry")
    assert await verify(guard, str(key.token)) is None
    # Then the entry leaves the cache; the object with it.
    store.core.clear_cache()
    assert gone(ref)


async def test_a_rotated_key_gets_an_access_token_ending_with_its_grace_period(
    guarded: tuple[Guard, KeyStore],
) -> None:
    guard, store = guarded
    key = store.create("alice", scopes=["read"])
    before = await verify(guard, str(key.token))
    assert before is not None and before.expires_at is None
    new = store.rotate(key.id, grace_period_hours=1)
    old = store.get(key.id)
    assert old is not None and old.grace_until is not None
    during = await verify(guard, str(key.token))
    assert during is not None and during is not before
    assert during.expires_at == int(old.grace_until.timestamp())
    assert (await verify(guard, str(new.token))) is not None
    store.rotate(new.id, grace_period_hours=0)
    assert await verify(guard, str(new.token)) is None


async def test_after_the_cache_ttl_the_access_token_is_built_again(key_db: Path) -> None:
    store = KeyStore(backend="sqlite", path=key_db, cache_ttl_seconds=0.05)
    try:
        guard = Guard(FastMCP("t"), keys=store)
        key = store.create("alice", scopes=["read"])
        first = await verify(guard, str(key.token))
        assert first is not None
        wait_for(lambda: store.core.verify_cached(str(key.token)) is None, "the cache TTL")
        again = await verify(guard, str(key.token))
        assert again is not None and again is not first
        assert again.model_dump() == first.model_dump()
    finally:
        store.close()


# -- the binding: Identity.attach / Identity.attached ----------------------------------


class Probe:
    """A weakly referenceable stand-in for the attached AccessToken."""


def test_the_first_attach_wins_and_every_hit_sees_it() -> None:
    km = KeyManager.memory()
    _, token = km.create("a")
    ident = km.verify(token, None)
    assert ident.attached is None
    first, second = Probe(), Probe()
    assert ident.attach(first) is first
    assert ident.attach(second) is first
    hit = km.verify_cached(token)
    assert hit is not None and hit.attached is first
    km.close()


def test_attached_objects_are_bounded_by_the_cache_capacity() -> None:
    km = KeyManager.memory(cache_capacity=2)
    refs = []
    for i in range(6):
        _, token = km.create(f"k{i}")
        refs.append(weakref.ref(km.verify(token, None).attach(Probe())))
    gc.collect()
    assert sum(r() is not None for r in refs) <= 2
    km.close()


def test_an_entry_dropped_without_the_gil_releases_its_object_later() -> None:
    # Revocations run with the GIL released: the entry, and its Python object, are
    # dropped on a thread that does not hold it, here several at once.
    km = KeyManager.memory()
    made = [km.create(f"k{i}") for i in range(4)]
    refs = [weakref.ref(km.verify(token, None).attach(Probe())) for _, token in made]
    threads = [threading.Thread(target=km.revoke, args=(info.id,)) for info, _ in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(gone(r) for r in refs)
    assert all(km.verify_cached(token) is None for _, token in made)
    km.close()


def test_an_identity_held_past_a_revocation_does_not_bring_its_object_back() -> None:
    km = KeyManager.memory()
    info, token = km.create("a")
    held = km.verify(token, None)
    held.attach(Probe())
    km.revoke(info.id)
    # The Identity still holds its (dead) entry, but the cache serves nothing for it.
    assert km.verify_cached(token) is None
    assert held.attached is not None
    km.close()


async def test_the_local_key_of_a_stdio_server_follows_a_scope_change_in_the_store(
    key_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FASTMCP_GUARD_KEY (stdio, in-process): the guard's Caller for it is reused only while
    the core's cache entry is the same; a change seen in the store builds a new one."""
    store = KeyStore(backend="sqlite", path=key_db, watch_interval_seconds=3600)
    key = store.create("local-bot", scopes=["read", "admin"])
    monkeypatch.setenv("FASTMCP_GUARD_KEY", str(key.token))
    guard = Guard(FastMCP("t"), keys=store)
    try:
        first = await guard.local_caller()
        assert first.scopes == ["read", "admin"]
        assert await guard.local_caller() is first  # the same entry: reused
        change_in_store(key_db, key.id, scopes='["read"]')
        assert store.core.sync_changes() == 1
        after = await guard.local_caller()
        assert after is not first and after.scopes == ["read"]
        assert after.sdk_user is not None and after.sdk_user.access_token.scopes == ["read"]
    finally:
        store.close()
