"""Threat: made-up key ids cost a store read each, unthrottled (issue 10, finding 9).

Key ids are public and easy to make up; 30 s of tokens naming unknown ids cost 12,204 store
reads. Now an id the store did not have is remembered for a few seconds (a bounded
negative cache), so repeating it costs nothing; and an address that keeps naming ids the
store does not have (20 a minute by default) is refused before the store is read. A key
created on this node is verifiable at once (creating it forgets the entry); one created on
another node as soon as this node sees the store's change (its watcher, or a NOTIFY /
pub/sub message), and in any case within the short TTL.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastmcp_guard import KeyStore
from fastmcp_guard._core import KeyManager, VerifyError

from tests.security._tokens import unknown_key_token
from tests.unit.test_external_backend import DictBackend


def refused(manager: KeyManager, token: str, client: str = "192.0.2.1") -> VerifyError:
    with pytest.raises(VerifyError) as exc:
        manager.verify(token, client)
    return exc.value


def test_a_repeated_unknown_id_costs_one_store_read(key_db: Path) -> None:
    store = KeyStore(backend="sqlite", path=key_db)
    forged = unknown_key_token(1)
    for i in range(500):
        err = refused(store.core, forged, f"192.0.2.{i % 250}")
        assert err.reason == "unknown_key"
    stats = store.core.stats()
    assert stats["store_reads"] == 1
    assert stats["negative_hits"] == 499
    assert stats["argon2_runs"] == 0
    # Another unknown id is read once too; the known key is unaffected.
    refused(store.core, unknown_key_token(2))
    refused(store.core, unknown_key_token(2))
    assert store.core.stats()["store_reads"] == 2
    key = store.create("real")
    assert store.core.verify(str(key.token), "192.0.2.1").key_id == key.id
    store.close()


def test_an_address_naming_many_unknown_ids_stops_costing_store_reads(key_db: Path) -> None:
    store = KeyStore(backend="sqlite", path=key_db)
    key = store.create("real")
    store.core.verify(str(key.token), "192.0.2.9")  # in use from that address
    reasons = [refused(store.core, unknown_key_token(100 + i), "192.0.2.9").reason
               for i in range(100)]  # fmt: skip
    assert reasons == ["unknown_key"] * 20 + ["throttled"] * 80
    assert store.core.stats()["store_reads"] == 1 + 20
    # The address's working token keeps working (proven); a new one waits (429)...
    store.core.clear_cache()
    assert store.core.verify(str(key.token), "192.0.2.9").key_id == key.id
    new = store.create("new")
    err = refused(store.core, str(new.token), "192.0.2.9")
    assert err.reason == "throttled" and err.retry_after is not None
    assert "unknown key ids" in str(err)
    # ...while other addresses are unaffected.
    assert store.core.verify(str(new.token), "192.0.2.10").key_id == new.id
    store.close()


def test_the_negative_cache_is_short_lived_and_configurable(key_db: Path) -> None:
    from fastmcp_guard._core import VerifyLimits

    off = KeyStore(backend="sqlite", path=key_db, limits=VerifyLimits(unknown_key_ttl_seconds=0))
    for _ in range(3):
        refused(off.core, unknown_key_token(3))
    assert off.core.stats()["store_reads"] == 3
    off.close()


def test_a_key_created_on_another_node_is_verifiable_once_seen_in_the_store() -> None:
    # Node b over a Python store; the keys are made on a node over another store and then
    # copied in, so that b can be asked about an id before it exists.
    elsewhere, shared = DictBackend(), DictBackend()
    maker = KeyManager.external(elsewhere)
    b = KeyManager.external(shared, watch_interval_seconds=3600)
    info, token = maker.create("made elsewhere")
    assert refused(b, token).reason == "unknown_key"
    assert refused(b, token).reason == "unknown_key"
    assert b.stats()["store_reads"] == 1, "remembered as unknown"
    shared.insert(dict(elsewhere.rows[info.id]))
    # Until b looks at the store's changes, the id stays unknown there (at most the TTL)...
    assert refused(b, token).reason == "unknown_key"
    # ...then it is verifiable at once.
    b.sync_changes()
    assert b.verify(token, "192.0.2.1").key_id == info.id
    # A change notification (PostgreSQL NOTIFY, Redis pub/sub) does the same.
    info2, token2 = maker.create("announced")
    refused(b, token2)
    shared.insert(dict(elsewhere.rows[info2.id]))
    b.invalidate(info2.id)
    assert b.verify(token2, "192.0.2.1").key_id == info2.id
    maker.close()
    b.close()
