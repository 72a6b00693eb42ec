"""More decisions over real HTTP: forbidden, resources and prompts, throttling,
revocation from another process, and the audit flush at exit."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest
from fastmcp import FastMCP
from fastmcp.exceptions import ToolError
from fastmcp.server.auth import require_scopes
from fastmcp_guard import Guard, KeyStore, RateLimit

from tests.conftest import http_client, read_audit
from tests.integration.test_http_auth import raw_post

pytestmark = pytest.mark.http

_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def with_checksum(body: str) -> str:
    """Complete a token body with its CRC32 base62 checksum (the token format's rule)."""
    value, digits = zlib.crc32(body.encode()), []
    for _ in range(6):
        value, r = divmod(value, 62)
        digits.append(_B62[r])
    return body + "".join(reversed(digits))


async def test_scope_refusal_is_audited_as_forbidden(serve, audit, audit_path):
    mcp: FastMCP = FastMCP("scoped")

    @mcp.tool(auth=require_scopes("admin"))
    def wipe() -> str:
        return "wiped"

    guard = Guard(mcp, audit=audit)
    key = guard.keys.create(name="intern", scopes=["read"])
    async with serve(mcp) as url, http_client(url, key.token) as client:
        with pytest.raises(ToolError, match="Unknown tool"):
            await client.call_tool("wipe", {})
        with pytest.raises(ToolError, match="Unknown tool"):
            await client.call_tool("no_such_tool", {})
    audit.flush()
    calls = [(e["tool"], e["status"]) for e in read_audit(audit_path) if e["tool"]]
    assert calls == [("wipe", "forbidden"), ("no_such_tool", "error")]


async def test_resources_and_prompts_are_limited_and_audited(serve, audit, audit_path):
    mcp: FastMCP = FastMCP("rp")

    @mcp.resource("data://config")
    def config() -> str:
        return "cfg"

    @mcp.prompt
    def greet(name: str) -> str:
        return f"Hello {name}"

    guard = Guard(mcp, audit=audit, rate_limit=RateLimit(per_key="2/hour"))
    key = guard.keys.create(name="reader")
    async with serve(mcp) as url, http_client(url, key.token) as client:
        await client.list_resources()
        await client.list_prompts()
        assert (await client.read_resource("data://config"))[0].text == "cfg"
        await client.get_prompt("greet", {"name": "x"})
        with pytest.raises(Exception, match="Rate limit exceeded"):
            await client.read_resource("data://config")
    audit.flush()
    events = [(e["tool"], e["status"]) for e in read_audit(audit_path) if e["tool"]]
    assert events == [("data://config", "ok"), ("greet", "ok"), ("data://config", "rate_limited")]


async def test_failed_verifications_are_throttled_per_client_and_key(make_server, serve):
    mcp, guard = make_server()
    good = guard.keys.create(name="good")
    other = guard.keys.create(name="other")
    # Same key id, wrong secret, valid checksum: it reaches the store and argon2.
    forged = with_checksum(good.token[: -6 - 43] + "A" * 43)
    statuses = []
    async with serve(mcp) as url:
        async with http_client(url, good.token) as client:  # the real owner, cached
            await client.call_tool("echo", {"text": "before"})
        for _ in range(15):
            statuses.append((await raw_post(url, authorization=f"Bearer {forged}")).status_code)
        stats = guard.keys.core.stats()
        # 10 verdicts (401), then the throttle: 429 with Retry-After, never a 401 that
        # would tell the key's owner the key is bad.
        assert statuses == [401] * 10 + [429] * 5
        assert stats["throttled"] >= 1
        assert stats["argon2_runs"] <= 2 + 10  # two real keys, then the throttle's 10 failures
        # The same address still gets in with another key (argon2 runs for it), and the
        # owner's cached token keeps working: the throttle is per (address, key id).
        for token in (other.token, good.token):
            async with http_client(url, token) as client:
                await client.call_tool("echo", {"text": "ok"})


async def test_revoke_from_another_process_is_seen_within_a_second(make_server, serve, key_db):
    store = KeyStore(backend="sqlite", path=key_db)
    mcp, guard = make_server(keys=store)
    key = guard.keys.create(name="victim")
    async with serve(mcp) as url:
        async with http_client(url, key.token) as client:  # verified and cached
            await client.call_tool("echo", {"text": "1"})
        code = textwrap.dedent(f"""
            from fastmcp_guard import KeyStore
            s = KeyStore(backend="sqlite", path={str(key_db)!r})
            s.revoke({key.id!r})
            s.close()
        """)
        await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", code], check=True, timeout=60
        )
        revoked_at = time.monotonic()
        while True:
            status = (await raw_post(url, authorization=f"Bearer {key.token}")).status_code
            if status == 401:
                break
            assert time.monotonic() - revoked_at < 1.0, "revocation not seen within 1 s"
            await asyncio.sleep(0.02)
    store.close()


def test_audit_is_flushed_at_interpreter_exit(tmp_path):
    path = tmp_path / "exit.jsonl"
    code = textwrap.dedent(f"""
        from fastmcp_guard import AuditLog, FileBackend
        log = AuditLog(backend=FileBackend({str(path)!r}, flush_interval_ms=60000))
        for i in range(5000):
            log.log("ok", key_id="k", tool=f"t{{i}}")
        # no close(): the atexit hook must flush
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    events = read_audit(path)
    assert len(events) == 5000 and events[-1]["tool"] == "t4999"


async def test_key_store_down_is_503_and_cached_keys_keep_working(make_server, serve, key_db):
    store = KeyStore(backend="sqlite", path=key_db)
    mcp, guard = make_server(keys=store)
    cached = guard.keys.create(name="cached")
    fresh = guard.keys.create(name="fresh")
    async with serve(mcp) as url:
        async with http_client(url, cached.token) as client:
            await client.call_tool("echo", {"text": "warm"})
        # The database is gone: its files now hold garbage.
        for suffix in ("", "-wal", "-shm"):
            path = Path(f"{key_db}{suffix}")
            if path.exists():
                path.write_bytes(b"\x00garbage" * 4096)
        resp = await raw_post(url, authorization=f"Bearer {fresh.token}")
        assert resp.status_code == 503
        assert resp.headers["retry-after"] == "1"
        assert resp.json()["error"] == "temporarily_unavailable"
        async with http_client(url, cached.token) as client:  # served from the cache
            assert (await client.call_tool("echo", {"text": "x"})).content[0].text == "echo: x"
