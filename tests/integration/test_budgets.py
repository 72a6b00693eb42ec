"""Budgets for agents over real HTTP: cost, shadow mode, the loop breaker, ``_meta``
and ``guard://usage`` (issue 12). Credits: tests/integration/test_budget_credits.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from fastmcp import FastMCP
from fastmcp_guard import AuditLog, FileBackend, Guard, IPPolicy, RateLimit, rate_limit
from fastmcp_guard.budget import BUDGET_META_KEY, USAGE_URI
from fastmcp_guard.config import GuardConfig, InvalidSettingError
from fastmcp_guard.errors import ConfigError, InvalidRateError
from fastmcp_guard.rate import cost

from tests.conftest import http_client, read_audit

pytestmark = pytest.mark.http


def budget_server(**guard_kwargs: Any) -> tuple[FastMCP[Any], Guard]:
    mcp: FastMCP[Any] = FastMCP("budgets")

    @mcp.tool
    def echo(text: str) -> str:
        return f"echo: {text}"

    @mcp.tool
    @cost(5)
    def expensive(query: str) -> str:
        return f"costly: {query}"

    @mcp.tool
    @rate_limit("12/minute")
    @cost(4)
    def limited(query: str) -> str:
        return f"limited: {query}"

    @mcp.tool
    @rate_limit("2/minute", mode="shadow")
    def tried(query: str) -> str:
        return f"tried: {query}"

    @mcp.tool
    @rate_limit(None, loop_breaker="3/second", loop_breaker_mode="enforce")
    def search(query: str) -> str:
        return f"found: {query}"

    return mcp, Guard(mcp, **guard_kwargs)


def events(path: Any, tool: str | None = None) -> list[dict[str, Any]]:
    return [e for e in read_audit(path) if tool is None or e.get("tool") == tool]


async def test_cost_consumes_from_every_bucket_and_a_refusal_consumes_nothing(
    serve, audit, audit_path
):
    mcp, guard = budget_server(
        rate_limit=RateLimit(per_key="20/minute", global_limit="100/minute"), audit=audit
    )
    key = guard.keys.create(name="agent")
    async with serve(mcp) as url, http_client(url, key.token) as client:
        await client.call_tool("expensive", {"query": "a"})  # 5 units
        await client.call_tool("limited", {"query": "b"})  # 4 units, also the tool bucket
        await client.call_tool("limited", {"query": "c"})  # 4 more
        st = guard.rate_limit.status(key.id)
        assert st["per_key"]["used"] == 13 and st["global"]["used"] == 13
        assert st["tools"]["limited"]["used"] == 8
        # The tool bucket holds 12: a third call of cost 4 still fits, a fourth does not.
        await client.call_tool("limited", {"query": "d"})
        refused = await client.call_tool("limited", {"query": "e"}, raise_on_error=False)
        assert refused.is_error
        text = refused.content[0].text
        assert "tool 'limited' limit 12/minute" in text and "costing 4 units" in text
        st = guard.rate_limit.status(key.id)
        # Refused: nothing consumed anywhere.
        assert st["per_key"]["used"] == 17 and st["global"]["used"] == 17
        assert st["tools"]["limited"]["used"] == 12
    audit.flush()
    statuses = [e["status"] for e in events(audit_path, "limited")]
    assert statuses == ["ok", "ok", "ok", "rate_limited"]


async def test_a_cost_above_a_limit_says_no_wait_helps(serve):
    mcp, guard = budget_server(rate_limit=RateLimit(per_key="3/minute"))
    key = guard.keys.create(name="agent")
    async with serve(mcp) as url, http_client(url, key.token) as client:
        refused = await client.call_tool("expensive", {"query": "a"}, raise_on_error=False)
    assert refused.is_error
    assert "costs 5 units" in refused.content[0].text
    assert "never holds that many" in refused.content[0].text
    assert guard.rate_limit.status(key.id)["per_key"]["used"] == 0


async def test_shadow_rate_rules_refuse_nothing_and_audit_every_would_be_refusal(
    serve, audit, audit_path
):
    mcp, guard = budget_server(
        rate_limit=RateLimit(per_key="3/minute", mode="shadow"), audit=audit
    )
    key = guard.keys.create(name="agent")
    async with serve(mcp) as url, http_client(url, key.token) as client:
        for i in range(5):
            result = await client.call_tool("echo", {"text": str(i)})
            assert result.data == f"echo: {i}"
        for i in range(4):  # the tool's own 2/minute, in shadow (the per-key one too)
            await client.call_tool("tried", {"query": str(i)})
    audit.flush()
    echo = events(audit_path, "echo")
    assert [e["status"] for e in echo].count("ok") == 5
    shadow = [e for e in echo if e["status"] == "would_refuse"]
    # The per-key bucket admitted 3 and would have refused 2: what enforcement would do.
    assert len(shadow) == 2 and {e["rule"] for e in shadow} == {"per_key"}
    assert all(e["limit"] == "3/minute" and "Rate limit exceeded" in e["error"] for e in shadow)
    tried = events(audit_path, "tried")
    assert [e["status"] for e in tried].count("ok") == 4
    assert len([e for e in tried if e["status"] == "would_refuse"]) == 4
    # The per-key bucket moved as enforcement would have moved it: full, 3 of 3.
    assert guard.rate_limit.status(key.id)["per_key"]["used"] == 3


async def test_the_default_loop_breaker_only_records(serve, audit, audit_path):
    mcp, guard = budget_server(audit=audit)  # RateLimit(): loop breaker 20/minute, shadow
    key = guard.keys.create(name="agent")
    async with serve(mcp) as url, http_client(url, key.token) as client:
        for _ in range(23):
            assert (await client.call_tool("echo", {"text": "same"})).data == "echo: same"
    audit.flush()
    echo = events(audit_path, "echo")
    assert [e["status"] for e in echo].count("ok") == 23
    shadow = [e for e in echo if e["status"] == "would_refuse"]
    assert len(shadow) == 3 and {e["rule"] for e in shadow} == {"loop"}
    # One budget event per trip in a window, the first would-be refusal.
    assert [e.get("budget_event") for e in shadow] == [True, None, None]
    assert all(len(e["args_hash"]) == 16 for e in shadow)


async def test_the_loop_breaker_trips_tells_the_agent_and_releases(serve, audit_path):
    log = AuditLog(backend=FileBackend(audit_path, flush_interval_ms=20), log_inputs=False,
                   log_outputs=False)
    mcp, guard = budget_server(audit=log)
    key = guard.keys.create(name="agent")
    try:
        async with serve(mcp) as url, http_client(url, key.token) as client:
            for _ in range(3):
                await client.call_tool("search", {"query": "the same thing"})
            refused = await client.call_tool(
                "search", {"query": "the same thing"}, raise_on_error=False
            )
            assert refused.is_error
            text = refused.content[0].text
            assert "Loop detected" in text and "3 times" in text
            assert "change the arguments" in text and "retry_after=" in text
            data = refused.structured_content
            assert data["error"] == "loop_detected" and 0 < data["retry_after"] <= 1.0
            # Other arguments are another call: admitted.
            assert (await client.call_tool("search", {"query": "else"})).data == "found: else"
            await asyncio.sleep(data["retry_after"] + 0.05)  # the window moves on
            again = await client.call_tool("search", {"query": "the same thing"})
            assert again.data == "found: the same thing"
    finally:
        log.close()
    loops = [e for e in events(audit_path, "search") if e["status"] == "loop_detected"]
    assert len(loops) == 1 and loops[0]["budget_event"] is True
    assert len(loops[0]["args_hash"]) == 16
    # log_inputs=False: the hash, never the arguments.
    assert loops[0]["input_args"] is None and "the same thing" not in audit_path.read_text()


async def test_an_ip_policy_in_shadow_admits_and_records(serve, audit, audit_path):
    mcp, guard = budget_server(
        audit=audit, ip=IPPolicy(deny=["127.0.0.0/8"], mode="shadow")
    )
    key = guard.keys.create(name="agent")
    async with serve(mcp) as url, http_client(url, key.token) as client:
        assert (await client.call_tool("echo", {"text": "hi"})).data == "echo: hi"
    audit.flush()
    shadow = [e for e in read_audit(audit_path) if e["status"] == "would_refuse"]
    assert shadow and {e["rule"] for e in shadow} == {"ip"}
    assert all(e["reason"] == "deny_listed" for e in shadow)
    assert not [e for e in read_audit(audit_path) if e["status"] == "ip_denied"]


async def test_results_carry_the_budget_and_usage_is_a_resource(serve):
    mcp, guard = budget_server(rate_limit=RateLimit(per_key="10/minute"))
    key = guard.keys.create(name="agent")
    other = guard.keys.create(name="other")
    async with serve(mcp) as url:
        async with http_client(url, other.token) as client:
            await client.call_tool("echo", {"text": "not yours"})
        async with http_client(url, key.token) as client:
            result = await client.call_tool("expensive", {"query": "x"})
            budget = result.meta[BUDGET_META_KEY]
            assert budget["remaining"] == 5 and budget["limit"] == "10/minute"
            assert 0 < budget["reset"] <= 60
            result = await client.call_tool("echo", {"text": "y"})
            assert result.meta[BUDGET_META_KEY]["remaining"] == 4
            listed = [str(r.uri) for r in await client.list_resources()]
            assert USAGE_URI in listed
            contents = await client.read_resource(USAGE_URI)
            doc = json.loads(contents[0].text)
    assert doc["key_id"] == key.id
    assert doc["limits"]["per_key"]["limit"] == 10
    today = doc["usage_today"]
    tools = today["tools"]
    assert tools["expensive"]["calls"] == 1 and tools["expensive"]["cost"] == 5
    assert tools["echo"]["calls"] == 1
    assert "not yours" not in json.dumps(doc) and other.id not in json.dumps(doc)


async def test_budget_meta_can_be_switched_off(serve):
    mcp, guard = budget_server(rate_limit=RateLimit(per_key="10/minute"), budget_meta=False)
    key = guard.keys.create(name="agent")
    async with serve(mcp) as url, http_client(url, key.token) as client:
        result = await client.call_tool("echo", {"text": "y"})
    assert not (result.meta or {}).get(BUDGET_META_KEY)


def test_bad_budget_input_is_refused_at_construction():
    for bad in (0, -1, 1.5, True, "5", 10**7):
        with pytest.raises(ConfigError, match="cost"):
            cost(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'enforce' or 'shadow'"):
        rate_limit("1/minute", mode="dry-run")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'enforce' or 'shadow'"):
        RateLimit(mode="off")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'enforce' or 'shadow'"):
        IPPolicy(mode="warn")  # type: ignore[arg-type]
    with pytest.raises(InvalidRateError):
        RateLimit(loop_breaker="5/fortnight")
    with pytest.raises(ConfigError, match="tool_costs"):
        RateLimit(tool_costs={"expensive": 0})


def test_budget_settings_from_the_environment():
    env = {"FASTMCP_GUARD_TOOL_COSTS": "expensive=5, search=2",
           "FASTMCP_GUARD_RATE_MODE": "shadow", "FASTMCP_GUARD_LOOP_BREAKER": "off",
           "FASTMCP_GUARD_IP_MODE": "shadow", "FASTMCP_GUARD_DENY": "10.0.0.0/8"}  # fmt: skip
    config = GuardConfig.load(env=env)
    assert config.tool_costs == (("expensive", 5), ("search", 2))
    rate = config.rate_limit()
    assert rate.mode == "shadow" and rate.loop_breaker is None
    assert rate.cost_of("expensive") == 5 and rate.cost_of("echo") == 1
    ip = config.ip_policy()
    assert ip is not None and ip.mode == "shadow"
    for value, problem in (("expensive=0", "at least 1"), ("expensive", "tool=units"),
                           ("a=1,a=2", "given twice"), ("a=x", "whole number")):  # fmt: skip
        with pytest.raises(InvalidSettingError, match=problem):
            GuardConfig.load(env={"FASTMCP_GUARD_TOOL_COSTS": value})
    with pytest.raises(InvalidSettingError, match="enforce"):
        GuardConfig.load(env={"FASTMCP_GUARD_RATE_MODE": "dry"})


async def test_configured_costs_override_the_decorator(serve):
    mcp, guard = budget_server(
        rate_limit=RateLimit(per_key="10/minute", tool_costs={"expensive": 2, "echo": 3})
    )
    key = guard.keys.create(name="agent")
    async with serve(mcp) as url, http_client(url, key.token) as client:
        await client.call_tool("expensive", {"query": "a"})
        await client.call_tool("echo", {"text": "b"})
    assert guard.rate_limit.status(key.id)["per_key"]["used"] == 5


async def test_guard_usage_shows_an_anonymous_caller_no_one_elses_usage():
    from fastmcp_guard.budget import usage_document
    from fastmcp_guard.middleware import Caller

    _mcp, guard = budget_server(rate_limit=RateLimit(per_key="10/minute"))
    assert guard.usage is not None
    guard.usage.record("(anonymous)", "echo", "ok", 1, 1.0)  # another address's call
    doc = await usage_document(guard, Caller(rate_key="ip:192.0.2.7", client_ip="192.0.2.7"))
    assert "usage_today" not in doc and doc["key_id"] is None
    assert doc["limits"]["per_key"]["used"] == 0


async def test_a_global_limit_in_shadow_refuses_nobody(serve, audit, audit_path):
    mcp, guard = budget_server(
        rate_limit=RateLimit(global_limit="2/minute", mode="shadow"), audit=audit
    )
    a, b = guard.keys.create(name="a"), guard.keys.create(name="b")
    async with serve(mcp) as url:
        for key in (a, b, a):
            async with http_client(url, key.token) as client:
                assert (await client.call_tool("echo", {"text": key.name})).data
    audit.flush()
    echo = events(audit_path, "echo")
    assert [e["status"] for e in echo].count("ok") == 3
    (shadow,) = [e for e in echo if e["status"] == "would_refuse"]
    assert shadow["rule"] == "global" and shadow["key_name"] == "a"
    assert guard.rate_limit.status(a.id)["global"]["used"] == 2


async def test_resources_and_prompts_carry_the_budget_too(serve):
    mcp, guard = budget_server(rate_limit=RateLimit(per_key="10/minute"))

    @mcp.resource("data://note")
    def note() -> str:
        return "a note"

    @mcp.prompt
    def ask(topic: str) -> str:
        return f"Tell me about {topic}"

    key = guard.keys.create(name="agent")
    async with serve(mcp) as url, http_client(url, key.token) as client:
        read = await client.read_resource_mcp("data://note")
        prompt = await client.get_prompt_mcp("ask", {"topic": "x"})
    assert read.meta[BUDGET_META_KEY]["remaining"] == 9
    assert prompt.meta[BUDGET_META_KEY]["remaining"] == 8
    assert prompt.meta[BUDGET_META_KEY]["limit"] == "10/minute"
