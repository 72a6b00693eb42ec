"""Client addresses behind proxies (issue 10, finding 2).

Before: only the first ``X-Forwarded-For`` line was read, so a client sending its own
line ahead of HAProxy's was admitted under a deny list; an unparsable hop was replaced by
the proxy's own address; admin actions recorded the proxy.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx2 as httpx
import pytest
from fastmcp import Client, FastMCP
from fastmcp.client.transports import StreamableHttpTransport
from fastmcp_guard import AuditLog, FileBackend, Guard, IPPolicy, KeyStore

from tests.conftest import read_audit, serve_http

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}  # fmt: skip
HEADERS = [("accept", "application/json, text/event-stream"), ("content-type", "application/json")]


def guarded(tmp_path: Path, **ip: list[str]) -> tuple[FastMCP, Guard, Path]:
    mcp = FastMCP("xff")

    @mcp.tool
    def echo(text: str) -> str:
        return text

    audit_file = tmp_path / "a.jsonl"
    guard = Guard(mcp, keys=KeyStore(), ip=IPPolicy(trusted_proxies=["127.0.0.1"], **ip),
                  audit=AuditLog(backend=FileBackend(audit_file, flush_interval_ms=10)))  # fmt: skip
    return mcp, guard, audit_file


async def test_every_forwarded_line_is_read_right_to_left(tmp_path: Path) -> None:
    mcp, guard, audit_file = guarded(tmp_path, deny=["10.99.0.0/16"])
    async with serve_http(mcp) as url, httpx.AsyncClient() as h:
        # The client's own line first, then the one HAProxy adds for the real peer.
        two_lines = await h.post(url, json=INIT, headers=[
            *HEADERS, ("x-forwarded-for", "8.8.8.8"), ("x-forwarded-for", "10.99.0.1")])  # fmt: skip
        allowed = await h.post(url, json=INIT, headers=[
            *HEADERS, ("x-forwarded-for", "10.99.0.1"), ("x-forwarded-for", "8.8.8.8")])  # fmt: skip
    guard.close()
    assert two_lines.status_code == 403
    assert allowed.status_code != 403
    (denied,) = [e for e in read_audit(audit_file) if e["status"] == "ip_denied"]
    assert denied["client_ip"] == "10.99.0.1"


async def test_an_unparsable_hop_is_the_client_and_is_refused(tmp_path: Path) -> None:
    mcp, guard, audit_file = guarded(tmp_path, allow=["127.0.0.0/8"])
    async with serve_http(mcp) as url, httpx.AsyncClient() as h:
        # What nginx writes when it cannot name its peer: never replaced by the proxy.
        resp = await h.post(url, json=INIT, headers=[*HEADERS, ("x-forwarded-for", "unknown")])
    guard.close()
    assert resp.status_code == 403
    (denied,) = read_audit(audit_file)
    assert denied["status"] == "ip_denied" and denied["client_ip"] == "unknown"


async def test_calls_and_admin_actions_record_the_resolved_address(tmp_path: Path) -> None:
    mcp, guard, audit_file = guarded(tmp_path)
    key = guard.keys.create("alice")
    admin = guard.keys.create("ops", scopes=["guard:admin"])
    forwarded = {"X-Forwarded-For": "203.0.113.9"}
    async with serve_http(mcp) as url:
        transport = StreamableHttpTransport(url, headers=forwarded, auth=str(key.token))
        async with Client(transport) as client:
            await client.call_tool("echo", {"text": "x"})
        async with httpx.AsyncClient() as h:
            base = url.rsplit("/mcp", 1)[0]
            status = await h.get(base + "/_guard/rate", headers={
                "Authorization": f"Bearer {admin.token}", **forwarded})  # fmt: skip
            reset = await h.post(base + "/_guard/rate/reset", json={"key": key.id}, headers={
                "Authorization": f"Bearer {admin.token}", **forwarded})  # fmt: skip
    guard.close()
    assert status.status_code == 200 and reset.status_code == 200
    events = read_audit(audit_file)
    by_tool = {e["tool"]: e for e in events}
    assert by_tool["echo"]["client_ip"] == "203.0.113.9"
    assert by_tool["admin:rate.status"]["client_ip"] == "203.0.113.9"
    assert by_tool["admin:rate.reset"]["client_ip"] == "203.0.113.9"
    assert "127.0.0.1" not in {e["client_ip"] for e in events}


async def test_a_huge_path_is_cut_in_the_refusal_line(tmp_path: Path) -> None:
    mcp, guard, audit_file = guarded(tmp_path, deny=["127.0.0.1"])
    async with serve_http(mcp) as url, httpx.AsyncClient() as h:
        resp = await h.get(url.rsplit("/mcp", 1)[0] + "/" + "a" * 60_000)
    guard.close()
    assert resp.status_code == 403
    line = audit_file.read_text()
    assert len(line) < 2_000
    (denied,) = read_audit(audit_file)
    assert denied["path"].startswith("/aaaa") and len(denied["path"]) <= 257


async def test_a_server_taking_the_address_from_the_header_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn's own proxy handling (on by default for 127.0.0.1 peers) lets a local peer
    pick the address the guard judges: the guard cannot undo it, so it says so, once."""
    mcp = FastMCP("uvicorn-default")
    guard = Guard(mcp, keys=KeyStore(), ip=IPPolicy(allow=["10.0.0.0/8"]))
    caplog.set_level(logging.WARNING, logger="fastmcp_guard")
    async with serve_http(mcp, proxy_headers=True) as url, httpx.AsyncClient() as h:
        for _ in range(3):
            await h.post(url, json=INIT, headers=[*HEADERS, ("x-forwarded-for", "10.1.2.3")])
    guard.close()
    warnings = [r for r in caplog.records if "took the client address" in r.getMessage()]
    assert len(warnings) == 1 and "proxy_headers" in warnings[0].getMessage()
