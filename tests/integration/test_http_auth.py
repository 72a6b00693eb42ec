"""Keys over real HTTP: a FastMCP server on a loopback port and a real fastmcp.Client."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx2
import pytest
from fastmcp import Client, FastMCP
from fastmcp.client.transports import StreamableHttpTransport
from fastmcp.exceptions import ToolError
from fastmcp.server.auth import require_scopes
from fastmcp.server.auth.providers.jwt import StaticTokenVerifier
from fastmcp_guard import AuditLog, FileBackend, Guard, RateLimit

from tests.conftest import http_client, read_audit

pytestmark = pytest.mark.http

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"},
    },
}
HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


async def raw_post(url: str, **headers: str | bytes) -> httpx2.Response:
    async with httpx2.AsyncClient() as c:
        return await c.post(url, json=INIT, headers={**HEADERS, **headers})


async def test_no_token_is_401_with_www_authenticate(make_server, serve, audit, audit_path):
    mcp, _ = make_server(audit=audit)
    async with serve(mcp) as url:
        resp = await raw_post(url)
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"].startswith("Bearer")
    audit.flush()
    events = read_audit(audit_path)
    assert [e["status"] for e in events] == ["unauthorized"]
    assert events[0]["client_ip"] == "127.0.0.1"


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "fmg_sk_",
        "fmg_sk_" + "A" * 66,
        "fmg_sk_" + "x" * 100_000,
        "fmg_sk_\u00e9\u00e9\u00e9",
    ],
    ids=["garbage", "prefix-only", "bad-checksum", "huge", "non-ascii"],
)
async def test_malformed_tokens_are_401_without_hashing(make_server, serve, token):
    mcp, guard = make_server()
    before = guard.keys.core.stats()["argon2_runs"]
    async with serve(mcp) as url:
        resp = await raw_post(url, authorization=f"Bearer {token}".encode())
    assert resp.status_code == 401
    assert 'error="invalid_token"' in resp.headers["www-authenticate"]
    assert guard.keys.core.stats()["argon2_runs"] == before


async def test_valid_key_calls_tool_and_is_audited(make_server, serve, audit, audit_path, store):
    mcp, guard = make_server(keys=store, audit=audit)
    key = guard.keys.create(name="alice", scopes=["read:data"], metadata={"team": "ops"})
    async with serve(mcp) as url, http_client(url, key.token) as client:
        result = await client.call_tool("echo", {"text": "hi"})
    assert result.content[0].text == "echo: hi"
    audit.flush()
    calls = [e for e in read_audit(audit_path) if e["status"] == "ok"]
    assert len(calls) == 1
    ev = calls[0]
    assert ev["key_id"] == key.id and ev["key_name"] == "alice"
    assert ev["tool"] == "echo" and ev["scopes"] == ["read:data"]
    assert ev["input_args"] == {"text": "hi"} and ev["output_preview"] == "echo: hi"
    assert ev["client_ip"] == "127.0.0.1" and ev["metadata"] == {"team": "ops"}
    assert ev["ts"].endswith("Z")
    datetime.fromisoformat(ev["ts"].replace("Z", "+00:00"))


async def test_x_api_key_header_is_accepted(make_server, serve):
    mcp, guard = make_server()
    key = guard.keys.create(name="desktop")
    async with (
        serve(mcp) as url,
        Client(StreamableHttpTransport(url, headers={"X-API-Key": key.token})) as client,
    ):
        result = await client.call_tool("echo", {"text": "k"})
    assert result.content[0].text == "echo: k"


async def test_revoked_key_is_refused_on_an_open_connection(
    make_server, serve, store, audit, audit_path
):
    mcp, guard = make_server(keys=store, audit=audit)
    key = guard.keys.create(name="bob")
    async with serve(mcp) as url, http_client(url, key.token) as client:
        await client.call_tool("echo", {"text": "1"})
        guard.keys.revoke(key.id)
        with pytest.raises(Exception, match="error response"):
            await client.call_tool("echo", {"text": "2"})
    audit.flush()
    events = [e["status"] for e in read_audit(audit_path)]
    assert events[:3] == ["created", "ok", "revoked"]
    assert "unauthorized" in events[3:] and "ok" not in events[3:]
    unauth = [e for e in read_audit(audit_path) if e["status"] == "unauthorized"]
    assert all(key.id in e["error"] and "revoked" in e["error"] for e in unauth)


async def test_rotate_keeps_old_token_during_grace(make_server, serve, store):
    mcp, guard = make_server(keys=store)
    old = guard.keys.create(name="carol", scopes=["a"])
    new = guard.keys.rotate(old.id, grace_period_hours=1)
    assert new.token and new.token != old.token and new.scopes == ["a"]
    assert guard.keys.get(old.id).status == "rotating"
    async with serve(mcp) as url:
        for token in (old.token, new.token):
            async with http_client(url, token) as client:
                assert (await client.call_tool("echo", {"text": "x"})).content[0].text == "echo: x"


async def test_rotate_with_zero_grace_kills_old_token_at_once(make_server, serve, store):
    mcp, guard = make_server(keys=store)
    old = guard.keys.create(name="dave")
    async with serve(mcp) as url:
        async with http_client(url, old.token) as client:  # cached now
            await client.call_tool("echo", {"text": "x"})
        new = guard.keys.rotate(old.id, grace_period_hours=0)
        assert (await raw_post(url, authorization=f"Bearer {old.token}")).status_code == 401
        async with http_client(url, new.token) as client:
            await client.call_tool("echo", {"text": "x"})


async def test_expired_key_is_refused(make_server, serve):
    mcp, guard = make_server()
    key = guard.keys.create(
        name="temp", expires_at=datetime.now(timezone.utc) + timedelta(seconds=1.5)
    )
    async with serve(mcp) as url:
        assert (await raw_post(url, authorization=f"Bearer {key.token}")).status_code == 200
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if (await raw_post(url, authorization=f"Bearer {key.token}")).status_code == 401:
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail("expired key still accepted")


async def test_require_scopes_uses_key_scopes(serve):
    mcp: FastMCP = FastMCP("scoped")

    @mcp.tool(auth=require_scopes("write:data"))
    def write(text: str) -> str:
        return "written"

    @mcp.tool
    def read() -> str:
        return "read"

    guard = Guard(mcp)
    reader = guard.keys.create(name="reader", scopes=["read:data"])
    writer = guard.keys.create(name="writer", scopes=["read:data", "write:data"])
    async with serve(mcp) as url:
        async with http_client(url, reader.token) as client:
            assert {t.name for t in await client.list_tools()} == {"read"}
            with pytest.raises(ToolError):
                await client.call_tool("write", {"text": "x"})
        async with http_client(url, writer.token) as client:
            assert {t.name for t in await client.list_tools()} == {"read", "write"}
            assert (await client.call_tool("write", {"text": "x"})).content[0].text == "written"


async def test_existing_verifier_keeps_working_beside_guard_keys(serve, tmp_path: Path):
    static = StaticTokenVerifier(tokens={"svc-token": {"client_id": "svc", "scopes": ["read"]}})
    mcp: FastMCP = FastMCP("both", auth=static)

    @mcp.tool
    def who() -> str:
        return "ok"

    audit_file = tmp_path / "a.jsonl"
    audit = AuditLog(backend=FileBackend(audit_file))
    guard = Guard(mcp, audit=audit, rate_limit=RateLimit(per_key="2/minute"))
    key = guard.keys.create(name="alice")
    async with serve(mcp) as url:
        for token in ("svc-token", key.token):
            async with http_client(url, token) as client:
                await client.call_tool("who", {})
                await client.call_tool("who", {})
                with pytest.raises(ToolError, match="Rate limit exceeded"):
                    await client.call_tool("who", {})
        assert (await raw_post(url, authorization="Bearer nope")).status_code == 401
    audit.close()
    events = [e for e in read_audit(audit_file) if e["tool"] == "who"]
    assert [(e["key_id"], e["status"]) for e in events] == [
        ("svc", "ok"), ("svc", "ok"), ("svc", "rate_limited"),
        (key.id, "ok"), (key.id, "ok"), (key.id, "rate_limited"),
    ]  # fmt: skip


async def test_token_never_stored_or_logged(
    make_server, serve, audit, audit_path, key_db, store, caplog
):
    caplog.set_level(logging.DEBUG)  # every logger, FastMCP's and uvicorn's included
    mcp, guard = make_server(keys=store, audit=audit)
    key = guard.keys.create(name="secret-holder")
    secret = key.token.split("_", 3)[-1]
    async with serve(mcp) as url:
        async with http_client(url, key.token) as client:
            await client.call_tool("echo", {"text": "x"})
        await raw_post(url, authorization=f"Bearer {key.token[:-1]}X")  # a refused variant
    guard.keys.revoke(key.id)
    guard.keys.flush()
    audit.flush()
    files = [p for p in key_db.parent.iterdir() if p.is_file()]
    assert any(p.name == "keys.db" for p in files) and any(p.suffix == ".jsonl" for p in files)
    for p in files:
        blob = p.read_bytes()
        assert key.token.encode() not in blob, p
        assert secret.encode() not in blob, p
        assert key.token[:-1].encode() not in blob, p
    assert caplog.records, "nothing was logged: the check below would be vacuous"
    assert secret not in caplog.text and key.token[:-1] not in caplog.text
