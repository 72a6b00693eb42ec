"""Guard(metrics=True): Prometheus text at GET /metrics on the real HTTP server, counting
exactly the decisions made (the same ones the audit log records)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx2 as httpx
from fastmcp import FastMCP
from fastmcp_guard import AuditLog, FileBackend, Guard, IPPolicy, KeyStore, RateLimit

from tests.conftest import http_client, read_audit, serve_http


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = (
        rf"^{re.escape(name)}(\{{{re.escape(want)}\}})? (\S+)$" if want else rf"^{name} (\S+)$"
    )
    for line in text.splitlines():
        m = re.match(pattern, line)
        if m:
            return float(m.groups()[-1])
    return 0.0


def server(**kwargs: Any) -> tuple[FastMCP[Any], Guard]:
    mcp = FastMCP("metrics")

    @mcp.tool
    def echo(text: str) -> str:
        return text

    @mcp.tool
    def boom() -> str:
        raise ValueError("no")

    return mcp, Guard(mcp, keys=KeyStore(), metrics=True, **kwargs)


async def test_metrics_count_every_decision_and_match_the_audit_log(tmp_path: Path) -> None:
    audit = AuditLog(backend=FileBackend(tmp_path / "a.jsonl"))
    mcp, guard = server(audit=audit, rate_limit=RateLimit(per_key="3/minute"))
    key = guard.keys.create("alice")
    scraper = guard.keys.create("prometheus", scopes=["guard:metrics"])
    async with serve_http(mcp) as url:
        async with http_client(url, str(key.token)) as client:
            for _ in range(4):
                await client.call_tool("echo", {"text": "x"}, raise_on_error=False)
        base = url.rsplit("/mcp", 1)[0]
        async with httpx.AsyncClient() as h:
            bad = await h.post(url, headers={"Authorization": "Bearer fmg_sk_nope"}, json={})
            assert bad.status_code == 401
            resp = await h.get(base + "/metrics",
                               headers={"Authorization": f"Bearer {scraper.token}"})  # fmt: skip
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    assert sample(text, "fastmcp_guard_decisions_total", status="ok", tool="echo") == 3
    assert sample(text, "fastmcp_guard_decisions_total", status="rate_limited", tool="echo") == 1
    assert sample(text, "fastmcp_guard_rate_limited_total", tool="echo") == 1
    assert sample(text, "fastmcp_guard_auth_failures_total") == 1
    assert sample(text, "fastmcp_guard_overhead_seconds_count") == 3
    assert sample(text, "fastmcp_guard_tool_duration_seconds_count") == 3
    assert (
        "fastmcp_guard_audit_queue_depth" in text and "fastmcp_guard_keys_argon2_runs_total" in text
    )
    assert key.id not in text and str(key.token) not in text  # no key ids as labels
    guard.close()
    # Exactly the audited decisions.
    events = read_audit(tmp_path / "a.jsonl")
    assert sum(e["status"] == "ok" and e["tool"] == "echo" for e in events) == 3


async def test_metrics_without_an_audit_log_and_behind_the_ip_policy() -> None:
    mcp, guard = server(ip=IPPolicy(deny=["127.0.0.1"]))
    assert guard.audit is not None and guard.audit.path == ""  # the metrics-only feed
    async with serve_http(mcp) as url, httpx.AsyncClient() as h:
        resp = await h.get(url.rsplit("/mcp", 1)[0] + "/metrics")
    assert resp.status_code == 403  # the scrape route is behind the IP policy too
    text = guard.metrics.render() if guard.metrics else ""
    assert sample(text, "fastmcp_guard_decisions_total", status="ip_denied", tool="") == 1


async def test_in_process_calls_are_counted() -> None:
    from fastmcp import Client

    mcp, guard = server()
    async with Client(mcp) as client:
        await client.call_tool("echo", {"text": "x"})
        await client.call_tool("boom", {}, raise_on_error=False)
    text = guard.metrics.render() if guard.metrics else ""
    assert sample(text, "fastmcp_guard_decisions_total", status="ok", tool="echo") == 1
    assert sample(text, "fastmcp_guard_decisions_total", status="error", tool="boom") == 1
