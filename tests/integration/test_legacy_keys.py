"""Keys issued by fastmcp-guard 0.2 keep working after the switch, over real HTTP.

A 0.2 key file is built the way 0.2 built it, then opened with our ``KeyStore``:
the file is taken over once (its ``api_keys`` rows are imported, the table is left
as it was) and the 0.2 tokens are verified with bcrypt, then cached.

Two ways to build the file, each test runs on both:

* ``wheel``: 0.2's own ``KeyStore`` from the released wheel, run in a subprocess
  (the strongest check: 0.2's real DDL, row format and bcrypt cost 12). The wheel is
  found through ``FMG_LEGACY_WHEEL`` or in ``.cache/legacy/`` (where
  ``scripts/bootstrap.sh`` downloads it from PyPI); without one these cases fail.
* ``handmade``: ``sqlite3`` + ``bcrypt`` with 0.2's DDL and row format copied from
  ``fastmcp_guard/keys/backends/sqlite.py`` (cost 4, to stay quick).
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastmcp_guard import KeyStore

from tests.conftest import http_client, read_audit
from tests.integration.test_http_auth import raw_post

pytestmark = pytest.mark.http


def _find_wheel() -> str | None:
    env = os.environ.get("FMG_LEGACY_WHEEL")
    if env:
        return env
    # scripts/bootstrap.sh downloads the released 0.2.2 wheel here.
    cache = Path(__file__).resolve().parents[2] / ".cache" / "legacy"
    found = sorted(glob.glob(str(cache / "fastmcp_guard-0.2*.whl")))
    return found[-1] if found else None


WHEEL = _find_wheel()

# Runs 0.2's real KeyStore from the wheel (a zip on sys.path). The package's
# __init__ (which imports 0.2's Guard and FastMCP) is bypassed: the key store needs
# only pydantic and bcrypt.
SCRIPT_02 = r"""
import json, sys, types
wheel, path = sys.argv[1], sys.argv[2]
pkg = types.ModuleType("fastmcp_guard")
pkg.__path__ = [wheel + "/fastmcp_guard"]
sys.modules["fastmcp_guard"] = pkg
from fastmcp_guard.keys.store import KeyStore

store = KeyStore(backend="sqlite", path=path)
alice = store.create(name="alice", scopes=["read:data"], metadata={"team": "ops"},
                     expires_in_days=30)
bob = store.create(name="bob", scopes=["read:data"])
bob2 = store.rotate(bob.id, grace_period_hours=1)
carol = store.create(name="carol")
store.revoke(carol.id)
assert store.verify(alice.token) is not None  # sets last_used_at, as real use did
print(json.dumps({
    "alice": [alice.id, alice.token], "bob": [bob.id, bob.token],
    "bob2": [bob2.id, bob2.token], "carol": [carol.id, carol.token],
}))
"""

# 0.2's DDL, verbatim (fastmcp_guard/keys/backends/sqlite.py).
DDL_02 = """
CREATE TABLE IF NOT EXISTS api_keys (
    id            TEXT PRIMARY KEY,
    token_hash    TEXT NOT NULL,
    selector      TEXT NOT NULL,
    name          TEXT NOT NULL,
    scopes        TEXT NOT NULL,
    status        TEXT NOT NULL,
    metadata      TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    expires_at    TEXT,
    last_used_at  TEXT,
    rotated_from  TEXT,
    grace_until   TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS idx_selector ON api_keys(selector);
"""


def _handmade_02(path: Path) -> dict[str, list[str]]:
    """The same keys as SCRIPT_02, written with 0.2's token, hash and row format."""
    import bcrypt

    now = datetime.now(timezone.utc)
    conn = sqlite3.connect(path)
    conn.executescript(DDL_02)
    out: dict[str, list[str]] = {}

    def add(label: str, name: str, **row: Any) -> None:
        selector = secrets.token_hex(8)
        token = f"fmg_sk_{selector}.{secrets.token_urlsafe(32)}"
        values = {
            "id": f"fmg_key_{secrets.token_hex(8)}",
            "token_hash": bcrypt.hashpw(token.encode(), bcrypt.gensalt(4)).decode(),
            "selector": selector,
            "name": name,
            "scopes": json.dumps(row.pop("scopes", [])),
            "status": row.pop("status", "active"),
            "metadata": json.dumps(row.pop("metadata", {})),
            "created_at": now.isoformat(),
            "expires_at": None,
            "last_used_at": None,
            "rotated_from": None,
            "grace_until": None,
            **{k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()},
        }
        cols = ", ".join(values)
        conn.execute(
            f"INSERT INTO api_keys ({cols}) VALUES ({', '.join('?' * len(values))})",
            list(values.values()),
        )
        out[label] = [values["id"], token]

    add("alice", "alice", scopes=["read:data"], metadata={"team": "ops"},
        expires_at=now + timedelta(days=30), last_used_at=now)  # fmt: skip
    add("bob", "bob", scopes=["read:data"], status="rotating",
        grace_until=now + timedelta(hours=1))  # fmt: skip
    add("bob2", "bob", scopes=["read:data"], rotated_from=out["bob"][0])
    add("carol", "carol", status="revoked")
    conn.commit()
    conn.close()
    return out


@pytest.fixture(params=["wheel", "handmade"])
def legacy_file(
    request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[Path, dict[str, list[str]]]:
    """A 0.2 key file and its keys: ``{label: [key id, 0.2 token]}``."""
    path = tmp_path / "keys.db"
    if request.param == "handmade":
        return path, _handmade_02(path)
    if WHEEL is None or not Path(WHEEL).exists():
        pytest.fail("no fastmcp-guard 0.2 wheel: run scripts/bootstrap.sh (it downloads it "
                    "into .cache/legacy) or set FMG_LEGACY_WHEEL")  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT_02, WHEEL, str(path)],
        capture_output=True, text=True, timeout=50, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return path, json.loads(done.stdout)


@pytest.fixture
def legacy_store(legacy_file: tuple[Path, dict[str, list[str]]]) -> KeyStore:
    """Our store over the 0.2 file (the import happens here)."""
    s = KeyStore(backend="sqlite", path=legacy_file[0])
    yield s
    s.close()


async def status_of(url: str, token: str) -> int:
    return (await raw_post(url, authorization=f"Bearer {token}")).status_code


async def test_0_2_token_calls_a_tool(
    make_server, serve, legacy_file, legacy_store, audit, audit_path
):
    keys = legacy_file[1]
    key_id, token = keys["alice"]
    assert token.startswith("fmg_sk_") and "." in token
    mcp, guard = make_server(keys=legacy_store, audit=audit)
    async with serve(mcp) as url, http_client(url, token) as client:
        result = await client.call_tool("echo", {"text": "hi"})
        assert result.content[0].text == "echo: hi"
        await client.call_tool("echo", {"text": "again"})
    stats = guard.keys.core.stats()
    # Read and checked once (then the cache answered every request); argon2 never ran.
    assert stats["store_reads"] == 1
    assert stats["argon2_runs"] == 0
    assert stats["bcrypt_runs"] == 1  # the 0.2 hash, verified once
    audit.flush()
    calls = [e for e in read_audit(audit_path) if e["status"] == "ok"]
    assert [e["key_id"] for e in calls] == [key_id, key_id]
    assert calls[0]["key_name"] == "alice" and calls[0]["scopes"] == ["read:data"]
    assert calls[0]["metadata"] == {"team": "ops"}


async def test_0_2_keys_are_listed_with_their_state(legacy_file, legacy_store):
    keys = legacy_file[1]
    listed = {k.id: k for k in legacy_store.list()}
    alice, bob, bob2 = (listed[keys[n][0]] for n in ("alice", "bob", "bob2"))
    assert keys["carol"][0] not in listed
    assert (alice.name, alice.status, alice.scopes) == ("alice", "active", ["read:data"])
    assert alice.metadata == {"team": "ops"}
    assert alice.expires_at is not None
    assert timedelta(days=29) < alice.expires_at - datetime.now(timezone.utc) < timedelta(days=31)
    assert alice.last_used_at is not None
    assert bob.status == "rotating" and bob.grace_until is not None
    assert bob.rotated_to == bob2.id and bob2.rotated_from == bob.id
    everything = {k.id: k for k in legacy_store.list(include_revoked=True)}
    assert everything[keys["carol"][0]].status == "revoked"
    # Found by id and by the 0.2 token (its public selector).
    assert legacy_store.get(keys["alice"][1]).id == keys["alice"][0]


async def test_0_2_lifecycle_carries_over(make_server, serve, legacy_file, legacy_store):
    keys = legacy_file[1]
    mcp, _ = make_server(keys=legacy_store)
    async with serve(mcp) as url:
        # Rotated in 0.2: both the old token (in its grace period) and the new one work.
        assert await status_of(url, keys["bob"][1]) == 200
        assert await status_of(url, keys["bob2"][1]) == 200
        # Revoked in 0.2, or a wrong secret: refused.
        assert await status_of(url, keys["carol"][1]) == 401
        forged = keys["alice"][1][:-1] + ("A" if keys["alice"][1][-1] != "A" else "B")
        assert await status_of(url, forged) == 401


async def test_0_2_key_can_be_revoked_and_rotated(make_server, serve, legacy_file, legacy_store):
    keys = legacy_file[1]
    mcp, guard = make_server(keys=legacy_store)
    async with serve(mcp) as url:
        async with http_client(url, keys["alice"][1]) as client:  # verified and cached
            await client.call_tool("echo", {"text": "x"})
        revoked = guard.keys.revoke(keys["alice"][0])
        assert revoked.status == "revoked"
        assert await status_of(url, keys["alice"][1]) == 401
        # Rotating a 0.2 key issues a token of the current format.
        new = guard.keys.rotate(keys["bob2"][0], grace_period_hours=0)
        assert new.token is not None and "." not in new.token
        assert await status_of(url, keys["bob2"][1]) == 401
        async with http_client(url, new.token) as client:
            assert (await client.call_tool("echo", {"text": "y"})).content[0].text == "echo: y"
    assert keys["alice"][0] not in {k.id for k in guard.keys.list()}


async def test_0_2_tokens_are_never_stored(make_server, serve, legacy_file, legacy_store):
    path, keys = legacy_file
    mcp, guard = make_server(keys=legacy_store)
    async with serve(mcp) as url:
        for label in ("alice", "bob"):
            async with http_client(url, keys[label][1]) as client:
                await client.call_tool("echo", {"text": "z"})
    guard.keys.flush()
    guard.keys.close()
    conn = sqlite3.connect(path)
    ours = [
        row[0]
        for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'fmg_%'"
        )
    ]
    assert {"fmg_keys", "fmg_legacy_imports"} <= set(ours)
    dump = "\n".join(repr(row) for table in ours for row in conn.execute(f"SELECT * FROM {table}"))
    stored_hash = conn.execute(
        "SELECT phc_hash FROM fmg_keys WHERE id = ?", (keys["alice"][0],)
    ).fetchone()[0]
    old_hash = conn.execute(
        "SELECT token_hash FROM api_keys WHERE id = ?", (keys["alice"][0],)
    ).fetchone()[0]
    conn.close()
    assert stored_hash == old_hash and stored_hash.startswith("$2b$")
    raw = b"".join(p.read_bytes() for p in path.parent.iterdir() if p.name.startswith("keys.db"))
    for _, token in keys.values():
        secret = token.split(".", 1)[1]
        assert token not in dump and secret not in dump
        assert secret.encode() not in raw


async def test_reopening_imports_once(legacy_file):
    path, keys = legacy_file
    first = KeyStore(backend="sqlite", path=path)
    ids = sorted(k.id for k in first.list(include_revoked=True))
    first.revoke(keys["alice"][0])
    first.close()
    again = KeyStore(backend="sqlite", path=path)
    try:
        assert sorted(k.id for k in again.list(include_revoked=True)) == ids
        assert again.get(keys["alice"][0]).status == "revoked"
    finally:
        again.close()
    assert ids == sorted(v[0] for v in keys.values())
