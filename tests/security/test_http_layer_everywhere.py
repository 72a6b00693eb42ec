"""The guard's HTTP layer (IP policy, refusal audit, /metrics and admin routes behind it)
is in place whatever the server's auth provider is (issue 10, finding 3).

Before: with ``Guard(mcp, manage_auth=False, ip=IPPolicy(allow=[...]))`` the layer was
installed only through the guard's own verifier, so nothing was enforced over HTTP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from fastmcp import FastMCP
from fastmcp.server.auth.providers.debug import DebugTokenVerifier
from fastmcp.server.auth.providers.jwt import StaticTokenVerifier
from fastmcp_guard import AuditLog, FileBackend, Guard, IPPolicy, KeyStore

from tests.conftest import read_audit, serve_http

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}  # fmt: skip
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def provider(kind: str) -> Any:
    if kind == "none":
        return None
    if kind == "static":
        return StaticTokenVerifier(tokens={"static-token": {"client_id": "ext", "scopes": []}})
    return DebugTokenVerifier()  # admits any token: the guard must still refuse the address


@pytest.mark.parametrize("manage_auth", [None, True, False])
@pytest.mark.parametrize("existing", ["none", "static", "debug"])
async def test_an_address_outside_the_allow_list_is_refused_everywhere(
    tmp_path: Path, manage_auth: bool | None, existing: str
) -> None:
    mcp = FastMCP("layer", auth=provider(existing))

    @mcp.tool
    def echo(text: str) -> str:
        return text

    audit_file = tmp_path / "a.jsonl"
    guard = Guard(mcp, keys=KeyStore(), manage_auth=manage_auth, metrics=True,
                  audit=AuditLog(backend=FileBackend(audit_file, flush_interval_ms=10)),
                  ip=IPPolicy(allow=["10.0.0.0/8"]))  # fmt: skip
    admin = guard.keys.create("ops", scopes=["guard:admin", "guard:metrics"])
    auth = {"Authorization": f"Bearer {admin.token}"}
    async with serve_http(mcp) as url, httpx.AsyncClient() as h:  # the client is 127.0.0.1
        base = url.rsplit("/mcp", 1)[0]
        init = await h.post(url, json=INIT, headers={**HEADERS, "Authorization": "Bearer x"})
        static = await h.post(url, json=INIT, headers={**HEADERS,
                                                        "Authorization": "Bearer static-token"})  # fmt: skip
        metrics = await h.get(base + "/metrics", headers=auth)
        rate = await h.get(base + "/_guard/rate", headers=auth)
    guard.close()
    for resp in (metrics, rate):
        assert resp.status_code == 403, (resp.request.url, resp.text)
    for resp in (init, static):
        # 403 from the HTTP layer, or (no provider for it to ride on) a JSON-RPC error from
        # the guard's middleware: never an answered initialize.
        assert resp.status_code == 403 or (
            resp.status_code == 200 and "client address not allowed" in resp.text
        ), resp.text
        assert '"serverInfo"' not in resp.text
    denied = [e for e in read_audit(audit_file) if e["status"] == "ip_denied"]
    assert len(denied) >= 4 and {e["client_ip"] for e in denied} == {"127.0.0.1"}


async def test_manage_auth_false_leaves_every_token_to_the_servers_provider() -> None:
    mcp = FastMCP("layer", auth=provider("static"))

    @mcp.tool
    def echo(text: str) -> str:
        return text

    guard = Guard(mcp, keys=KeyStore(), manage_auth=False)
    key = guard.keys.create("alice")
    async with serve_http(mcp) as url, httpx.AsyncClient() as h:
        with_static = await h.post(url, json=INIT, headers={**HEADERS,
                                                             "Authorization": "Bearer static-token"})  # fmt: skip
        with_guard_key = await h.post(url, json=INIT, headers={
            **HEADERS, "Authorization": f"Bearer {key.token}"})  # fmt: skip
    guard.close()
    assert with_static.status_code == 200
    assert with_guard_key.status_code == 401  # the provider's decision stands


async def test_the_layer_runs_once_when_installed_twice(tmp_path: Path) -> None:
    """``fastmcp-guard run`` passes the layer as app middleware while the verifier installs
    it too: one refusal, one audit line."""
    mcp = FastMCP("layer")
    audit_file = tmp_path / "a.jsonl"
    guard = Guard(mcp, keys=KeyStore(), ip=IPPolicy(deny=["127.0.0.1"]),
                  audit=AuditLog(backend=FileBackend(audit_file)))  # fmt: skip
    app = mcp.http_app(middleware=guard.http_middleware())
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as h,
    ):
        resp = await h.post("/mcp", json=INIT, headers=HEADERS)
    guard.close()
    assert resp.status_code == 403
    assert [e["status"] for e in read_audit(audit_file)] == ["ip_denied"]
