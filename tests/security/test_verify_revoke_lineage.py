"""Threat: a rotated-away token outlives the revocation of its successor (finding 16).

Rotating a key keeps the old token valid for a grace period. Revoking the new key (say
it leaked, along with the old one) left the old token working until the grace ended.
Now revoking a key also revokes its predecessors still in their grace period, following
``rotated_from``; the lifecycle event and ``fastmcp-guard keys revoke`` name them. The
same runs over PostgreSQL and Redis in ``tests/fleet/test_fleet_keys.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastmcp_guard import AuditLog, FileBackend, KeyStore

from tests.cli.test_cli_keys import create, ok
from tests.conftest import read_audit


@pytest.fixture(params=["memory", "sqlite"])
def keys(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    store = KeyStore(backend=request.param, path=tmp_path / "keys.db")
    store.audit = AuditLog(backend=FileBackend(tmp_path / "audit.jsonl", flush_interval_ms=10))
    yield store
    store.audit.close()
    store.close()


def test_revoking_a_key_revokes_its_predecessors_in_grace(keys: KeyStore, tmp_path: Path) -> None:
    first = keys.create("svc")
    second = keys.rotate(first.id, grace_period_hours=24)
    third = keys.rotate(second.id, grace_period_hours=1)
    for key in (first, second, third):
        assert keys.verify(str(key.token)) is not None

    revoked = keys.revoke(third.id, actor="carol")
    for key in (third, second, first):
        assert keys.verify(str(key.token)) is None, key.id
        assert keys.inspect(key.id).status == "revoked"
    assert revoked.status == "revoked"
    assert revoked.revoked_predecessors == [second.id, first.id]

    assert keys.audit is not None
    keys.audit.flush()
    events = [e for e in read_audit(tmp_path / "audit.jsonl") if e["status"] == "revoked"]
    assert [(e["key_id"], e["actor"]) for e in events] == [
        (third.id, "carol"), (second.id, "carol"), (first.id, "carol"),
    ]  # fmt: skip
    assert events[0]["revoked_predecessors"] == [second.id, first.id]
    assert events[1]["revoked_with"] == events[2]["revoked_with"] == third.id


def test_only_predecessors_still_in_grace_are_touched(keys: KeyStore) -> None:
    old = keys.create("svc")
    new = keys.rotate(old.id, grace_period_hours=0)  # old revoked at once
    newer = keys.rotate(new.id, grace_period_hours=1)
    assert keys.revoke(newer.id).revoked_predecessors == [new.id]
    # Revoking the old key of a rotation leaves its successor alone.
    a = keys.create("a")
    b = keys.rotate(a.id, grace_period_hours=1)
    assert keys.revoke(a.id).revoked_predecessors == []
    assert keys.verify(str(b.token)) is not None
    # Nothing to do twice.
    assert keys.revoke(newer.id).revoked_predecessors == []


def test_the_cli_says_which_predecessors_it_revoked(tmp_path: Path) -> None:
    first = create(tmp_path, "--name", "svc")
    second = json.loads(ok(tmp_path, "keys", "rotate", first["id"], "--json").stdout)
    out = ok(tmp_path, "keys", "revoke", second["id"], "--force").stdout
    assert f"Revoked key {second['id']} (svc)" in out
    assert f"Also revoked the key it replaced, still in its rotation grace period: {first['id']}" in out
    shown = json.loads(ok(tmp_path, "keys", "inspect", first["id"], "--json").stdout)
    assert shown["status"] == "revoked"
    third = json.loads(ok(tmp_path, "keys", "rotate",
                          create(tmp_path, "--name", "x")["id"], "--json").stdout)  # fmt: skip
    data = json.loads(ok(tmp_path, "keys", "revoke", third["id"], "--force", "--json").stdout)
    assert data["status"] == "revoked" and data["revoked_predecessors"] == [third["rotated_from"]]
