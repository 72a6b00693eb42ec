"""Rate limits, IP policy and audit content over real HTTP."""

from __future__ import annotations

import asyncio

import httpx2
import pytest
from fastmcp import FastMCP
from fastmcp.exceptions import ToolError
from fastmcp_guard import AuditLog, FileBackend, Guard, IPPolicy, RateLimit, rate_limit
from fastmcp_guard.errors import ConfigError
from fastmcp_guard.rate import RATE_LIMITED_CODE

from tests.conftest import http_client, read_audit
from tests.integration.test_http_auth import HEADERS, INIT, raw_post

pytestmark = pytest.mark.http


async def test_per_key_limit_refuses_with_retry_after(make_server, serve, audit, audit_path):
    mcp, guard = make_server(rate_limit=RateLimit(per_key="3/minute"), audit=audit)
    a = guard.keys.create(name="a")
    b = guard.keys.create(name="b")
    async with serve(mcp) as url:
        async with http_client(url, a.token) as client:
            for _ in range(3):
                await client.call_tool("echo", {"text": "x"})
            result = await client.call_tool("echo", {"text": "x"}, raise_on_error=False)
            assert result.is_error
            text = result.content[0].text
            assert "per-key limit 3/minute" in text and "retry after" in text
            data = result.structured_content
            assert data["error"] == "rate_limited" and data["limit"] == "3/minute"
            assert 0 < data["retry_after"] <= 20.0 and data["remaining"] == 0
        async with http_client(url, b.token) as client:  # another key has its own bucket
            await client.call_tool("echo", {"text": "x"})
    audit.flush()
    statuses = [(e["key_name"], e["status"]) for e in read_audit(audit_path) if e["tool"] == "echo"]
    assert statuses == [("a", "ok")] * 3 + [("a", "rate_limited"), ("b", "ok")]
    st = guard.rate_limit.status(a.id)
    assert st["per_key"]["limit"] == 3 and st["per_key"]["used"] == 3


async def test_protocol_refusal_carries_data(make_server, serve):
    mcp, guard = make_server(rate_limit=RateLimit(per_key="1/hour", refusal="protocol"))
    key = guard.keys.create(name="p")
    async with serve(mcp) as url, http_client(url, key.token) as client:
        await client.call_tool("echo", {"text": "x"})
        with pytest.raises(Exception) as info:
            await client.call_tool("echo", {"text": "x"})
    err = info.value
    assert "Rate limit exceeded" in str(err)
    assert err.error.data["retry_after"] > 0  # type: ignore[attr-defined]
    # An application code, outside the range JSON-RPC reserves (-32768..-32000).
    assert err.error.code == RATE_LIMITED_CODE == 429  # type: ignore[attr-defined]


async def test_the_protocol_refusal_code_is_configurable_outside_the_reserved_range(
    make_server, serve
):
    for reserved in (-32000, -32019, -32050, -32768):
        with pytest.raises(ConfigError, match=f"refusal_code {reserved} is in the range"):
            RateLimit(per_key="1/hour", refusal="protocol", refusal_code=reserved)
    with pytest.raises(ConfigError, match="must be an integer"):
        RateLimit(refusal_code=True)
    for huge in (2**31, -(2**31) - 1, 10**30):
        with pytest.raises(ConfigError, match="does not fit a 32-bit integer"):
            RateLimit(refusal_code=huge)
    mcp, guard = make_server(
        rate_limit=RateLimit(per_key="1/hour", refusal="protocol", refusal_code=1429)
    )
    key = guard.keys.create(name="p")
    async with serve(mcp) as url, http_client(url, key.token) as client:
        await client.call_tool("echo", {"text": "x"})
        with pytest.raises(Exception, match="Rate limit exceeded") as info:
            await client.call_tool("echo", {"text": "x"})
    assert info.value.error.code == 1429  # type: ignore[attr-defined]


async def test_global_limit_spans_keys(make_server, serve):
    mcp, guard = make_server(rate_limit=RateLimit(per_key="100/minute", global_limit="4/minute"))
    keys = [guard.keys.create(name=f"k{i}") for i in range(2)]
    admitted = 0
    async with serve(mcp) as url:
        for key in keys:
            async with http_client(url, key.token) as client:
                for _ in range(3):
                    r = await client.call_tool("echo", {"text": "x"}, raise_on_error=False)
                    admitted += not r.is_error
    assert admitted == 4


async def test_per_tool_limit_does_not_consume_key_budget(serve):
    mcp: FastMCP = FastMCP("tools")

    @mcp.tool
    @rate_limit("2/minute")
    async def expensive() -> str:
        return "done"

    @mcp.tool
    def cheap() -> str:
        return "ok"

    @rate_limit("1/minute")
    @mcp.tool
    def sync_above() -> str:
        return "ok"

    guard = Guard(mcp, rate_limit=RateLimit(per_key="5/minute"))
    key = guard.keys.create(name="t")
    async with serve(mcp) as url, http_client(url, key.token) as client:
        results = [await client.call_tool("expensive", {}, raise_on_error=False) for _ in range(4)]
        assert [r.is_error for r in results] == [False, False, True, True]
        assert "tool 'expensive' limit 2/minute" in results[2].content[0].text
        assert not (await client.call_tool("sync_above", {}, raise_on_error=False)).is_error
        assert (await client.call_tool("sync_above", {}, raise_on_error=False)).is_error
        # per-key budget 5: 2 expensive + 1 sync_above admitted, so 2 cheap calls remain
        cheap = [await client.call_tool("cheap", {}, raise_on_error=False) for _ in range(3)]
        assert [r.is_error for r in cheap] == [False, False, True]


async def test_sixteen_concurrent_callers_never_pass_the_limit(make_server, serve):
    mcp, guard = make_server(rate_limit=RateLimit(per_key="10/hour"))
    key = guard.keys.create(name="crowd")
    async with serve(mcp) as url:

        async def caller() -> int:
            ok = 0
            async with http_client(url, key.token) as client:
                for _ in range(3):
                    r = await client.call_tool("echo", {"text": "x"}, raise_on_error=False)
                    ok += not r.is_error
            return ok

        counts = await asyncio.gather(*(caller() for _ in range(16)))
    assert sum(counts) == 10


async def test_handshake_and_listing_do_not_consume_budget(make_server, serve):
    mcp, guard = make_server(rate_limit=RateLimit(per_key="2/hour"))
    key = guard.keys.create(name="lister")
    async with serve(mcp) as url:
        for _ in range(3):
            async with http_client(url, key.token) as client:
                await client.list_tools()
        async with http_client(url, key.token) as client:
            await client.call_tool("echo", {"text": "1"})
            await client.call_tool("echo", {"text": "2"})
            with pytest.raises(ToolError, match="Rate limit exceeded"):
                await client.call_tool("echo", {"text": "3"})


async def test_denied_address_is_refused_before_token_work(make_server, serve, audit, audit_path):
    mcp, guard = make_server(ip=IPPolicy(allow=["10.0.0.0/8"]), audit=audit)
    key = guard.keys.create(name="far")
    runs = guard.keys.core.stats()["argon2_runs"]
    async with serve(mcp) as url:
        resp = await raw_post(url, authorization=f"Bearer {key.token}")
    assert resp.status_code == 403
    assert guard.keys.core.stats()["argon2_runs"] == runs
    audit.flush()
    events = read_audit(audit_path)
    assert [e["status"] for e in events] == ["created", "ip_denied"]
    assert events[-1]["client_ip"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("policy", "allowed"),
    [
        (IPPolicy(allow=["127.0.0.0/8"]), True),
        (IPPolicy(allow=["127.0.0.0/8"], deny=["127.0.0.1"]), False),
        (IPPolicy(deny=["::ffff:127.0.0.1"]), False),
        (IPPolicy(allow=["::1", "192.168.1.100"]), False),
    ],
)
async def test_allow_and_deny_lists(make_server, serve, policy, allowed):
    mcp, guard = make_server(ip=policy)
    key = guard.keys.create(name="ip")
    async with serve(mcp) as url:
        resp = await raw_post(url, authorization=f"Bearer {key.token}")
    assert (resp.status_code == 200) is allowed


async def test_forwarded_for_only_from_trusted_proxy(make_server, serve):
    mcp, guard = make_server(ip=IPPolicy(deny=["203.0.113.0/24"], trusted_proxies=["127.0.0.1"]))
    key = guard.keys.create(name="proxied")
    mcp2, guard2 = make_server(ip=IPPolicy(deny=["203.0.113.0/24"]))
    key2 = guard2.keys.create(name="direct")
    async with serve(mcp) as url, serve(mcp2) as url2:
        auth = {"authorization": f"Bearer {key.token}"}
        assert (
            await raw_post(url, **auth, **{"x-forwarded-for": "203.0.113.9"})
        ).status_code == 403
        assert (
            await raw_post(url, **auth, **{"x-forwarded-for": "198.51.100.1"})
        ).status_code == 200
        # The peer of the second server is not trusted: its X-Forwarded-For is ignored.
        auth2 = {"authorization": f"Bearer {key2.token}", "x-forwarded-for": "203.0.113.9"}
        assert (await raw_post(url2, **auth2)).status_code == 200


async def test_log_inputs_and_outputs_off(make_server, serve, tmp_path):
    path = tmp_path / "pii.jsonl"
    audit = AuditLog(backend=FileBackend(path), log_inputs=False, log_outputs=False)
    mcp, guard = make_server(audit=audit)
    key = guard.keys.create(name="pii")
    async with serve(mcp) as url, http_client(url, key.token) as client:
        await client.call_tool("echo", {"text": "my-ssn-123"})
    audit.close()
    raw = path.read_text()
    assert "my-ssn-123" not in raw
    ev = next(e for e in read_audit(path) if e["tool"] == "echo")
    assert ev["input_args"] is None and ev["output_preview"] is None and ev["status"] == "ok"


async def test_tool_error_is_audited_as_error(make_server, serve, audit, audit_path):
    mcp, guard = make_server(audit=audit)
    key = guard.keys.create(name="err")
    async with serve(mcp) as url, http_client(url, key.token) as client:
        with pytest.raises(ToolError, match="tool failed on purpose"):
            await client.call_tool("boom", {})
    audit.flush()
    ev = next(e for e in read_audit(audit_path) if e["tool"] == "boom")
    assert ev["status"] == "error" and "tool failed on purpose" in ev["error"]
    assert ev["duration_ms"] >= 0


async def test_raw_http_client_sees_json_rpc(make_server, serve):
    """Sanity: the guarded endpoint is a normal MCP endpoint for a raw HTTP client."""
    mcp, guard = make_server()
    key = guard.keys.create(name="raw")
    async with serve(mcp) as url, httpx2.AsyncClient() as c:
        r = await c.post(
            url, json=INIT, headers={**HEADERS, "authorization": f"Bearer {key.token}"}
        )
    assert r.status_code == 200
