"""The Python API: bad input fails at construction with a specific error; 0.2 surface."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fastmcp_guard import (
    AuditLog,
    ConfigError,
    FileBackend,
    GuardError,
    InvalidIPError,
    InvalidRateError,
    IPPolicy,
    KeyNotFoundError,
    KeyRevokedError,
    KeyStore,
    RateLimit,
    rate_limit,
)
from fastmcp_guard.errors import AuditWriteError, StoreError
from fastmcp_guard.rate import ADMITTED


@pytest.mark.parametrize("bad", ["abc", "0/minute", "-1/minute", "10/fortnight", "", "1.5/minute"])
def test_bad_rate_strings_name_the_value(bad: str) -> None:
    with pytest.raises(InvalidRateError) as info:
        RateLimit(per_key=bad)
    assert isinstance(info.value, ValueError) and isinstance(info.value, GuardError)
    assert f'"{bad}"' in str(info.value) or (bad == "" and "empty" in str(info.value))


def test_bad_rate_on_decorator_fails_at_decoration() -> None:
    with pytest.raises(InvalidRateError, match="fortnight"):
        rate_limit("10/fortnight")


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "not-an-ip", "", "10.0.0.0/8/1", "::1/129"])
def test_bad_cidr_names_the_entry(bad: str) -> None:
    with pytest.raises(InvalidIPError) as info:
        IPPolicy(allow=["10.0.0.0/8", bad])
    assert isinstance(info.value, ValueError)
    assert f'"{bad}"' in str(info.value) or f"`{bad}`" in str(info.value)


def test_ip_policy_takes_a_list_not_a_string() -> None:
    with pytest.raises(TypeError, match="list"):
        IPPolicy(allow="10.0.0.0/8")  # type: ignore[arg-type]


def test_ip_policy_0_2_surface() -> None:
    policy = IPPolicy(allow=["10.0.0.0/8", "192.168.1.100"], deny=["10.99.0.0/16"])
    assert policy.is_allowed("10.0.1.5")
    assert not policy.is_allowed("10.99.0.1")
    assert not policy.is_allowed("8.8.8.8")
    assert policy.is_allowed("::ffff:10.0.0.1")
    assert not policy.is_allowed("not an address")


@pytest.mark.parametrize("backend", ["nope", "mysql"])
def test_unknown_key_backend(backend: str) -> None:
    with pytest.raises(ConfigError, match=backend):
        KeyStore(backend=backend)


def test_fleet_key_backends_need_a_dsn() -> None:
    with pytest.raises(ConfigError, match="dsn='postgresql://"):
        KeyStore(backend="postgres")
    with pytest.raises(ConfigError, match="dsn='redis://"):
        KeyStore(backend="redis")


def test_unknown_rate_and_audit_backends() -> None:
    with pytest.raises(ConfigError, match="memcached"):
        RateLimit(per_key="1/second", backend="memcached")
    with pytest.raises(ConfigError, match="kafka"):
        AuditLog(backend="kafka")


def test_sqlite_store_in_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "keys.db"
    with pytest.raises(StoreError) as info:
        KeyStore(backend="sqlite", path=missing)
    assert str(missing.parent) in str(info.value)


def test_audit_in_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "audit.jsonl"
    with pytest.raises(AuditWriteError) as info:
        AuditLog(backend=FileBackend(missing))
    assert str(missing) in str(info.value)


def test_audit_path_under_a_file_is_unwritable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(AuditWriteError, match="file"):
        AuditLog(backend="file", path=blocker / "audit.jsonl")


def test_audit_file_mode_is_0600(tmp_path: Path) -> None:
    log = AuditLog(backend=FileBackend(tmp_path / "a.jsonl"))
    log.close()
    assert os.stat(tmp_path / "a.jsonl").st_mode & 0o777 == 0o600


def test_key_lifecycle_0_2_surface(tmp_path: Path) -> None:
    store = KeyStore(backend="sqlite", path=tmp_path / "k.db")
    a = store.create(name="a", scopes=["x"], expires_in_days=30, metadata={"m": 1})
    b = store.create(name="b")
    assert a.token and a.token.startswith("fmg_sk_") and a.id.startswith("fmg_key_")
    assert a.expires_at is not None and a.metadata == {"m": 1}
    assert [k.id for k in store.list()] == [a.id, b.id]
    assert all(k.token is None for k in store.list())
    got = store.verify(a.token)
    assert got is not None and got.id == a.id and got.token is None
    assert store.verify(a.token + "x") is None and store.verify("nope") is None
    store.flush()
    assert store.get(a.id).last_used_at is not None
    store.revoke(b.id)
    assert [k.id for k in store.list()] == [a.id]
    assert [k.id for k in store.list(include_revoked=True)] == [a.id, b.id]
    with pytest.raises(KeyError, match="fmg_key_doesnotexist"):
        store.revoke("fmg_key_doesnotexist")
    with pytest.raises(KeyNotFoundError, match="fmg_key_doesnotexist"):
        store.rotate("fmg_key_doesnotexist")
    with pytest.raises(ValueError, match=b.id):
        store.rotate(b.id)
    with pytest.raises(KeyRevokedError, match=b.id):
        store.rotate(b.id)
    assert store.verify(b.token) is None
    assert (
        store.get(a.token) is not None and store.get(a.token).id == a.id
    )  # named by token public id
    store.close()


def test_key_input_is_validated() -> None:
    store = KeyStore()
    with pytest.raises(ValueError, match="name"):
        store.create(name="")
    with pytest.raises(ValueError, match="scope"):
        store.create(name="x", scopes=["has space"])
    with pytest.raises(ValueError, match="expir"):
        store.create(name="x", expires_at=datetime.now(timezone.utc) - timedelta(days=1))
    # A negative expires_in_days is 0.2's "already expired" (tests/unit/test_keystore_dropin.py).


async def test_rate_limit_0_2_surface() -> None:
    rl = RateLimit(per_key="2/minute", global_limit="3/minute")
    assert await rl.check(key_id="k1") and await rl.check(key_id="k1")
    assert not await rl.check(key_id="k1")
    st = rl.status("k1")
    assert st["per_key"]["limit"] == 2 and st["per_key"]["used"] == 2
    assert st["per_key"]["remaining"] == 0 and st["per_key"]["window_seconds"] == 60
    assert st["global"]["limit"] == 3 and st["global"]["used"] == 2
    rl.reset("k1")
    assert rl.status("k1")["per_key"]["used"] == 0
    assert await rl.check(key_id="k1")
    assert not await rl.check(key_id="k2")  # the global bucket (3/minute) is spent


async def test_check_decides_in_process_without_awaiting() -> None:
    rl = RateLimit(per_key="1/minute")
    first = rl.check("k", "t")
    assert first is ADMITTED and first.settled and first.refusal is None
    second = rl.check("k", "t")
    assert second.settled and second.refusal is not None
    assert (second.refusal.scope, second.refusal.limit) == ("per_key", "1/minute")
    assert await second.settle() is second.refusal and not await second
    assert repr(second).startswith("Decision(Refusal(scope='per_key'")


async def test_async_twins_run_off_the_event_loop(tmp_path: Path) -> None:
    import asyncio

    store = KeyStore(backend="sqlite", path=tmp_path / "k.db")
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    key = await store.create_async("async", ["read"])  # argon2id in a worker thread
    done = True
    await task
    assert ticks > 0, "the event loop was blocked while the key was hashed"
    assert key.token is not None
    assert (await store.verify_async(key.token)).id == key.id
    new = await store.rotate_async(key.id, grace_period_hours=0)
    assert await store.verify_async(key.token) is None
    assert (await store.revoke_async(new.id)).status == "revoked"
    store.close()
