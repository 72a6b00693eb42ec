"""The SQLite audit backend behind a real HTTP server: calls land as queryable rows."""

from __future__ import annotations

from pathlib import Path

import httpx2
import pytest
from fastmcp_guard import AuditLog, SQLiteBackend

from tests.conftest import http_client

pytestmark = pytest.mark.http


async def test_http_calls_land_in_the_sqlite_audit(make_server, serve, store, tmp_path: Path):
    audit = AuditLog(backend=SQLiteBackend(tmp_path / "audit.db", flush_interval_ms=20))
    mcp, guard = make_server(keys=store, audit=audit)
    key = guard.keys.create(name="alice", scopes=["read:data"])
    async with serve(mcp) as url:
        async with http_client(url, key.token) as client:
            result = await client.call_tool("echo", {"text": "hi"})
            assert result.content[0].text == "echo: hi"
            await client.call_tool("boom", {}, raise_on_error=False)
        async with httpx2.AsyncClient() as raw:
            resp = await raw.post(url, json={}, headers={"authorization": "Bearer nope"})
        assert resp.status_code == 401

    calls = await audit.query(key_id=key.id)
    assert [(r["tool"], r["status"]) for r in calls] == [
        ("boom", "error"),
        ("echo", "ok"),
        ("", "created"),
    ]
    ok = calls[1]
    assert ok["key_name"] == "alice" and ok["scopes"] == ["read:data"]
    assert ok["input_args"] == {"text": "hi"} and ok["output_preview"] == "echo: hi"
    assert ok["client_ip"] == "127.0.0.1" and ok["ts"].endswith("Z")
    assert "tool failed on purpose" in calls[0]["error"]
    [refused] = await audit.query(status="unauthorized")
    assert refused["key_id"] == "" and refused["client_ip"] == "127.0.0.1"
