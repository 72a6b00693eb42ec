"""The bridge between the core's KeyManager and a key store written in Python.

A small dict-backed store implements the protocol (the PostgreSQL store is tested
against a real server in tests/fleet/); these tests pin the bridge's contract: what a
store must provide, how its errors surface, and that the core's logic runs over it.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fastmcp_guard._core import KeyManager, StoreError, VerifyError

from tests.inflight import verify_while


class DictBackend:
    name = "dict://test"

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.rev = 0
        self.lock = threading.Lock()
        self.fail: str | None = None
        self.answer: Any = None  # when set, get() returns it as is

    def _next(self) -> int:
        self.rev += 1
        return self.rev

    def _check(self, method: str) -> None:
        if self.fail == method:
            raise ConnectionError("connection to db://u:****@h lost")

    def insert(self, record: dict[str, Any]) -> int:
        self._check("insert")
        with self.lock:
            record = dict(record, revision=self._next())
            self.rows[record["id"]] = record
            return int(record["revision"])

    def get(self, key_id: str) -> dict[str, Any] | None:
        self._check("get")
        if self.answer is not None:
            return self.answer  # type: ignore[no-any-return]
        row = self.rows.get(key_id)
        return None if row is None else dict(row)

    def list(self, include_revoked: bool) -> list[dict[str, Any]]:
        return [dict(r) for r in self.rows.values() if include_revoked or r["status"] != "revoked"]

    def update(self, record: dict[str, Any]) -> int | None:
        with self.lock:
            cur = self.rows.get(record["id"])
            if cur is None or cur["revision"] != record["revision"]:
                return None
            keep = {k: cur[k] for k in ("phc_hash", "created_at", "last_used_at", "last_used_ip",
                                        "legacy_selector")}  # fmt: skip
            self.rows[record["id"]] = dict(record, **keep, revision=self._next())
            return int(self.rows[record["id"]]["revision"])

    def rotate(self, old: dict[str, Any], new: dict[str, Any]) -> tuple[int, int] | None:
        a = self.update(old)
        return None if a is None else (a, self.insert(new))

    def touch_many(self, touches: list[tuple[str, int, str | None]]) -> None:
        for key_id, at, ip in touches:
            row = self.rows.get(key_id)
            if row is not None:
                row["last_used_at"] = max(row["last_used_at"] or 0, at)
                row["last_used_ip"] = ip or row["last_used_ip"]

    def current_revision(self) -> int:
        return self.rev

    def changed_since(self, revision: int) -> tuple[int, list[tuple[str, int]]]:
        rows = sorted(
            (r["revision"], r["id"]) for r in self.rows.values() if r["revision"] > revision
        )
        return (rows[-1][0] if rows else revision), [(i, r) for r, i in rows]


def test_the_core_lifecycle_runs_over_a_python_store() -> None:
    backend = DictBackend()
    km = KeyManager.external(backend)
    info, token = km.create("alice", scopes=["read"], metadata={"team": "x"})
    assert backend.rows[info.id]["phc_hash"].startswith("$argon2id$")
    assert token not in repr(backend.rows)
    ident = km.verify(token, "10.0.0.1")
    assert ident.key_name == "alice" and ident.scopes == ["read"]
    assert km.verify_cached(token) is not None
    new, new_token = km.rotate(info.id, grace_seconds=0)
    with pytest.raises(VerifyError) as exc:
        km.verify(token, None)
    assert exc.value.reason == "revoked"
    assert km.verify(new_token, "10.0.0.2").key_id == new.id
    km.flush()  # batched last use, written through touch_many
    assert backend.rows[new.id]["last_used_ip"] == "10.0.0.2"
    assert backend.rows[new.id]["last_used_at"] > backend.rows[new.id]["created_at"] - 1
    km.close()


def test_another_writer_is_seen_through_changed_since() -> None:
    backend = DictBackend()
    a, b = KeyManager.external(backend), KeyManager.external(backend, watch_interval_seconds=3600)
    info, token = a.create("bob")
    b.verify(token, None)
    a.revoke(info.id)
    assert b.verify_cached(token) is not None  # b has not looked yet
    assert b.sync_changes() >= 1
    assert b.verify_cached(token) is None
    a.close()
    b.close()


def test_a_store_missing_a_method_is_refused_by_name() -> None:
    class Half:
        def insert(self, record: Any) -> int:
            return 1

    with pytest.raises(TypeError, match=r"needs a get\(\) method; Half has none"):
        KeyManager.external(Half())


def test_store_failures_and_bad_answers_become_store_errors() -> None:
    backend = DictBackend()
    km = KeyManager.external(backend)
    backend.fail = "insert"
    with pytest.raises(
        StoreError,
        match=r"key store dict://test: insert\(\) failed: ConnectionError: connection to db://u:\*\*\*\*@h lost",
    ):
        km.create("x")
    backend.fail = None
    info, _token = km.create("y")
    backend.rows[info.id]["status"] = "weird"
    km.clear_cache()
    with pytest.raises(StoreError, match=r'get\(\) returned a record with unknown status "weird"'):
        km.get(info.id)
    backend.answer = "not a dict"
    with pytest.raises(StoreError, match=r"get\(\) returned a str instead of a dict"):
        km.get(info.id)
    km.close()


def test_interpreter_exit_with_an_open_manager_is_clean() -> None:
    """The watcher thread may poll the Python store while the interpreter shuts down:
    an error it keeps to itself, never a panic or a hang."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import time
        from fastmcp_guard._core import KeyManager
        from tests.unit.test_external_backend import DictBackend
        km = KeyManager.external(DictBackend(), watch_interval_seconds=0.001)
        km.create("x")
        time.sleep(0.05)
        """
    )
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for _ in range(4):  # the race with finalisation does not show every time
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, check=False, cwd=root)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "panicked" not in proc.stderr


# -- verifications in flight while keys change -------------------------------------------


def two_keys(km: KeyManager) -> tuple[str, str, str]:
    """Key a's id and token, and key b's id."""
    a, token_a = km.create("a")
    b, _ = km.create("b")
    return a.id, token_a, b.id


@pytest.mark.parametrize("change", ["revoke here", "change notice", "another node's revoke"])
def test_a_change_to_another_key_costs_a_verification_in_flight_no_second_argon2_run(
    change: str,
) -> None:
    backend = DictBackend()
    km = KeyManager.external(backend, watch_interval_seconds=3600)
    other = KeyManager.external(backend, watch_interval_seconds=3600)
    a, token_a, b = two_keys(km)
    km.sync_changes()  # nothing pending from the creations

    def change_b() -> None:
        if change == "revoke here":
            km.revoke(b)
        elif change == "change notice":
            km.invalidate(b)  # what the PostgreSQL / Redis listeners call
        else:
            other.revoke(b)
            assert km.sync_changes() == 1

    assert verify_while(km, backend, token_a, a, change_b).key_id == a
    assert km.verify_cached(token_a) is not None
    km.verify(token_a, None)
    assert km.stats()["argon2_runs"] == 1
    km.close()
    other.close()


def test_a_key_revoked_during_its_verification_is_not_cached() -> None:
    backend = DictBackend()
    km = KeyManager.external(backend, watch_interval_seconds=3600)
    a, token_a, _ = two_keys(km)
    # The verification read the record before the revocation: this request is admitted,
    # the next one is refused, by the store and not from the cache.
    assert verify_while(km, backend, token_a, a, lambda: km.revoke(a)).key_id == a
    assert km.verify_cached(token_a) is None
    with pytest.raises(VerifyError) as exc:
        km.verify(token_a, None)
    assert exc.value.reason == "revoked"
    km.close()


def test_clear_cache_during_a_verification_stops_it_caching() -> None:
    backend = DictBackend()
    km = KeyManager.external(backend, watch_interval_seconds=3600)
    a, token_a, _ = two_keys(km)
    verify_while(km, backend, token_a, a, km.clear_cache)
    assert km.verify_cached(token_a) is None
    km.verify(token_a, None)
    assert km.verify_cached(token_a) is not None
    # The second verification re-read the record; the digest was proven already.
    assert (km.stats()["argon2_runs"], km.stats()["proof_refreshes"]) == (1, 1)
    km.close()
