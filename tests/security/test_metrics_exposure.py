"""``/metrics`` stays bounded and private (issue 10, finding 4).

Before: the ``tool`` label took raw resource URIs and unknown tool names (3,000 URIs made
3,003 series), and ``users://<id>/profile`` of other callers was readable without a key.
"""

from __future__ import annotations

import re

import httpx2 as httpx
import pytest
from fastmcp import FastMCP
from fastmcp_guard import Guard, KeyStore
from fastmcp_guard.metrics import GuardMetrics

from tests.conftest import http_client, serve_http


def server(metrics: GuardMetrics | bool = True) -> tuple[FastMCP, Guard]:
    mcp = FastMCP("metrics")

    @mcp.tool
    def echo(text: str) -> str:
        return text

    @mcp.resource("users://{user_id}/profile")
    def profile(user_id: str) -> str:
        return f"profile of {user_id}"

    @mcp.resource("config://app")
    def app_config() -> str:
        return "{}"

    @mcp.prompt
    def greet(name: str) -> str:
        return f"hello {name}"

    return mcp, Guard(mcp, keys=KeyStore(), metrics=metrics)


def series(text: str) -> list[str]:
    return [line for line in text.splitlines()
            if line.startswith("fastmcp_guard_decisions_total{")]  # fmt: skip


async def test_labels_come_only_from_the_servers_components() -> None:
    mcp, guard = server()
    key = guard.keys.create("alice")
    scraper = guard.keys.create("prometheus", scopes=["guard:metrics"])
    async with serve_http(mcp) as url:
        async with http_client(url, str(key.token)) as client:
            for i in range(300):
                await client.read_resource(f"users://secret-user-{i}/profile")
                await client.call_tool(f"no_such_tool_{i}", {}, raise_on_error=False)
                with pytest.raises(Exception, match="not found|Unknown"):
                    await client.read_resource(f"nothing://{i}")
            await client.read_resource("config://app")
            await client.get_prompt("greet", {"name": "x"})
            await client.call_tool("echo", {"text": "x"})
        async with httpx.AsyncClient() as h:
            resp = await h.get(url.rsplit("/mcp", 1)[0] + "/metrics",
                               headers={"Authorization": f"Bearer {scraper.token}"})  # fmt: skip
    guard.close()
    text = resp.text
    assert "secret-user" not in text and "no_such_tool" not in text and "nothing://" not in text
    labels = {re.search(r'tool="([^"]*)"', line).group(1) for line in series(text)}  # type: ignore[union-attr]
    assert labels <= {"users://{user_id}/profile", "config://app", "greet", "echo", "other", ""}
    assert 'status="ok",tool="users://{user_id}/profile"} 300' in text
    assert 'status="error",tool="other"} 600' in text
    assert len(series(text)) <= 8
    assert len(text) < 20_000


async def test_metrics_need_a_metrics_key_or_an_allowed_address() -> None:
    mcp, guard = server()
    reader = guard.keys.create("reader", scopes=["read:data"])
    scraper = guard.keys.create("prometheus", scopes=["guard:metrics"])
    admin = guard.keys.create("ops", scopes=["guard:admin"])
    async with serve_http(mcp) as url, httpx.AsyncClient() as h:
        path = url.rsplit("/mcp", 1)[0] + "/metrics"
        anonymous = await h.get(path)
        with_token_in_url = await h.get(path, params={"token": str(scraper.token)})
        wrong_scope = await h.get(path, headers={"Authorization": f"Bearer {reader.token}"})
        metrics_key = await h.get(path, headers={"Authorization": f"Bearer {scraper.token}"})
        admin_key = await h.get(path, headers={"X-API-Key": str(admin.token)})
    guard.close()
    assert anonymous.status_code == 401 and with_token_in_url.status_code == 401
    assert wrong_scope.status_code == 403
    assert metrics_key.status_code == 200 and admin_key.status_code == 200
    assert "fastmcp_guard_decisions_total" in metrics_key.text


async def test_an_allowed_scraper_address_needs_no_key() -> None:
    mcp, guard = server(GuardMetrics(allow=["127.0.0.0/8"]))
    async with serve_http(mcp) as url, httpx.AsyncClient() as h:
        resp = await h.get(url.rsplit("/mcp", 1)[0] + "/metrics")
    guard.close()
    assert resp.status_code == 200
