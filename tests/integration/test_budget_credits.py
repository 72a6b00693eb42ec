"""Credits through a guarded server over real HTTP (issue 12): refusals written for the
agent, a refill at a UTC day boundary on a clock the test sets, shadow credits, the budget
events reaching a real HTTP receiver signed, ``_meta`` with the credits, and usage totals
equal to the audit log's counts."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastmcp import FastMCP
from fastmcp_guard import AuditLog, Guard, KeyStore, RateLimit
from fastmcp_guard.audit import HttpBackend
from fastmcp_guard.budget import BUDGET_META_KEY
from fastmcp_guard.rate import cost

from tests.conftest import http_client, read_audit
from tests.integration.audit_receiver import Receiver

pytestmark = pytest.mark.http

SECRET = b"budget-events-hmac-key"


class Clock:
    """A UTC clock the test moves."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def credit_server(store: KeyStore, **guard_kwargs: Any) -> tuple[FastMCP[Any], Guard]:
    mcp: FastMCP[Any] = FastMCP("credits")

    @mcp.tool
    def echo(text: str) -> str:
        return f"echo: {text}"

    @mcp.tool
    @cost(3)
    def expensive(query: str) -> str:
        return f"costly: {query}"

    return mcp, Guard(mcp, keys=store, rate_limit=RateLimit(loop_breaker=None), **guard_kwargs)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(secret=SECRET).start()
    yield r
    r.stop()


async def test_credits_run_out_with_a_refusal_for_the_agent_and_refill_at_midnight(
    serve, store, audit, audit_path
):
    clock = Clock(datetime(2026, 12, 3, 23, 59, 0, tzinfo=timezone.utc))
    mcp, guard = credit_server(store, audit=audit)
    assert guard.credits is not None
    guard.credits.clock = clock
    key = guard.keys.create(name="agent", credits=10, refill="10/day")
    async with serve(mcp) as url, http_client(url, key.token) as client:
        for _ in range(3):
            await client.call_tool("expensive", {"query": "q"})  # 9 units
        result = await client.call_tool("echo", {"text": "last"})  # the 10th
        budget = result.meta[BUDGET_META_KEY]
        assert budget["credits"] == 0 and budget["refill_at"] == "2026-12-04T00:00:00Z"
        refused = await client.call_tool("echo", {"text": "one more"}, raise_on_error=False)
        assert refused.is_error
        text = refused.content[0].text
        assert text == ("Credits exhausted for this key: 0 of 10 left; they refill to 10 at "
                        "2026-12-04T00:00:00Z.")  # fmt: skip
        data = refused.structured_content
        assert data["error"] == "credits_exhausted" and data["refill_at"] == "2026-12-04T00:00:00Z"
        # The day ends: the balance becomes 10 again.
        clock.now = datetime(2026, 12, 4, 0, 0, 1, tzinfo=timezone.utc)
        again = await client.call_tool("expensive", {"query": "new day"})
        assert again.data == "costly: new day"
        assert again.meta[BUDGET_META_KEY]["refill_at"] == "2026-12-05T00:00:00Z"
    audit.flush()
    events = read_audit(audit_path)
    # Spending the last unit fell below 10 %: one credits_low; then the first refusal of
    # the period is the credits_exhausted budget event.
    low = [e for e in events if e["status"] == "credits_low"]
    assert len(low) == 1 and low[0]["budget_event"] is True and low[0]["credits"] == 0
    (exhausted,) = [e for e in events if e["status"] == "credits_exhausted"]
    assert exhausted["budget_event"] is True and exhausted["tool"] == "echo"
    assert exhausted["credits"] == 0 and exhausted["refill_at"] == "2026-12-04T00:00:00Z"


async def test_a_rate_refusal_gives_the_credits_back(serve, store):
    mcp, guard = credit_server(store)
    guard.rate_limit = RateLimit(per_key="2/minute", loop_breaker=None)
    key = guard.keys.create(name="agent", credits=100)
    async with serve(mcp) as url, http_client(url, key.token) as client:
        await client.call_tool("echo", {"text": "a"})
        await client.call_tool("echo", {"text": "b"})
        refused = await client.call_tool("echo", {"text": "c"}, raise_on_error=False)
        assert refused.is_error and "Rate limit exceeded" in refused.content[0].text
        assert guard.credits is not None
        balance = guard.credits.balance(key.id)
        assert balance is not None and balance[0] == 98
    # The server stopped: this process gave its unspent lease back to the store.
    assert guard.keys.inspect(key.id).credits == 98


async def test_shadow_credits_admit_and_record_would_refuse(serve, store, audit, audit_path):
    mcp, guard = credit_server(store, audit=audit)
    key = guard.keys.create(name="agent", credits=2, credits_shadow=True)
    async with serve(mcp) as url, http_client(url, key.token) as client:
        for i in range(4):
            assert (await client.call_tool("echo", {"text": str(i)})).data == f"echo: {i}"
    audit.flush()
    events = [e for e in read_audit(audit_path) if e.get("tool") == "echo"]
    assert [e["status"] for e in events].count("ok") == 4
    shadow = [e for e in events if e["status"] == "would_refuse"]
    assert len(shadow) == 2 and {e["rule"] for e in shadow} == {"credits"}
    assert "Credits exhausted" in shadow[0]["error"]


async def test_budget_events_reach_an_http_receiver_signed(serve, store, receiver, tmp_path):
    audit = AuditLog(backend=HttpBackend(receiver.url, secret=SECRET, spool_dir=tmp_path / "sp",
                                         flush_interval_ms=20, poll_interval=0.02))  # fmt: skip
    mcp, guard = credit_server(store, audit=audit)
    key = guard.keys.create(name="agent", credits=25)
    try:
        async with serve(mcp) as url, http_client(url, key.token) as client:
            for i in range(9):  # 8 x 3 = 24 paid (1 left: below 10 %), the 9th refused
                await client.call_tool("expensive", {"query": str(i)}, raise_on_error=False)
    finally:
        audit.close()
    events = receiver.accepted()
    low = [e for e in events if e["status"] == "credits_low"]
    exhausted = [e for e in events if e["status"] == "credits_exhausted"]
    assert len(low) == 1 and low[0]["budget_event"] is True and low[0]["key_id"] == key.id
    assert len(exhausted) == 1 and exhausted[0]["budget_event"] is True
    assert all(r.signed_ok for r in receiver.requests)


async def test_usage_totals_equal_the_audit_log(serve, store, audit, audit_path):
    mcp, guard = credit_server(store, audit=audit)
    guard.rate_limit = RateLimit(per_key="6/minute", loop_breaker=None)
    a = guard.keys.create(name="a", credits=4)
    b = guard.keys.create(name="b")
    async with serve(mcp) as url:
        async with http_client(url, a.token) as client:
            await asyncio.gather(*(client.call_tool("echo", {"text": str(i)},
                                                    raise_on_error=False) for i in range(6)))  # fmt: skip
        async with http_client(url, b.token) as client:
            for i in range(8):
                await client.call_tool("echo", {"text": str(i)}, raise_on_error=False)
            await client.call_tool("expensive", {"query": "x"}, raise_on_error=False)
    audit.flush()
    assert guard.usage is not None
    guard.usage.flush()
    counted: Counter[tuple[str, str]] = Counter(
        (e["key_id"], e["status"]) for e in read_audit(audit_path) if e.get("tool")
    )
    for key in (a, b):
        report = guard.usage.query(key_id=key.id, by="key")
        totals = report.totals
        assert totals["calls"] == counted[(key.id, "ok")] + counted[(key.id, "error")]
        for kind in ("rate_limited", "credits_exhausted"):
            assert totals["refusals"].get(kind, 0) == counted[(key.id, kind)], (key.name, kind)
    assert counted[(a.id, "ok")] == 4 and counted[(a.id, "credits_exhausted")] == 2
    assert counted[(b.id, "ok")] == 6 and counted[(b.id, "rate_limited")] == 3


def test_credits_survive_a_restart(key_db: Path):
    store = KeyStore(backend="sqlite", path=key_db)
    key = store.create(name="agent", credits=5000, refill="5000/month")
    store.close()
    again = KeyStore(backend="sqlite", path=key_db)
    try:
        info = again.inspect(key.id)
        assert info.credits == 5000 and info.refill == "5000/month"
        now = datetime.now(timezone.utc)
        assert info.refill_at is not None and now < info.refill_at <= now + timedelta(days=31)
    finally:
        again.close()


def test_bad_credits_input_is_refused(store):
    from fastmcp_guard.errors import InvalidKeyInputError

    for kwargs, needle in (({"credits": -1}, "credits"), ({"refill": "5/fortnight"}, "refill"),
                           ({"credits": 1.5}, "credits"), ({"refill": "0/day"}, "refill")):  # fmt: skip
        with pytest.raises(InvalidKeyInputError, match=needle):
            store.create(name="bad", **kwargs)


async def test_reading_guard_usage_spends_no_credits(serve, store):
    import json

    mcp, guard = credit_server(store)
    key = guard.keys.create(name="agent", credits=50)
    async with serve(mcp) as url, http_client(url, key.token) as client:
        await client.call_tool("expensive", {"query": "x"})
        docs = [json.loads((await client.read_resource("guard://usage"))[0].text)
                for _ in range(3)]  # fmt: skip
        result = await client.call_tool("echo", {"text": "y"})
    assert result.meta[BUDGET_META_KEY]["credits"] == 46  # 50 - 3 - 1: the reads were free
    assert [d["credits"]["balance"] for d in docs] == [47, 47, 47]
    assert docs[-1]["usage_today"]["tools"]["expensive"]["cost"] == 3


async def test_calls_refused_down_the_chain_spend_no_credits_and_make_no_usage_rows(
    serve, store, audit
):
    import json

    mcp, guard = credit_server(store, audit=audit)
    key = guard.keys.create(name="agent", credits=10)
    async with serve(mcp) as url, http_client(url, key.token) as client:
        await client.call_tool("echo", {"text": "paid"})
        for i in range(3):  # unknown tools: FastMCP refuses them after the guard
            refused = await client.call_tool(f"made-up-{i}", {}, raise_on_error=False)
            assert refused.is_error
        result = await client.call_tool("echo", {"text": "paid too"})
        doc = json.loads((await client.read_resource("guard://usage"))[0].text)
    assert result.meta[BUDGET_META_KEY]["credits"] == 8, "only the two echo calls were paid"
    tools = doc["usage_today"]["tools"]
    assert set(tools) == {"echo", "*other*"}, tools
    assert tools["*other*"]["errors"] == 3


async def test_the_global_limit_is_not_shown_to_callers(serve, store):
    import json

    mcp, guard = credit_server(store)
    guard.rate_limit = RateLimit(per_key="100/minute", global_limit="50/minute",
                                 loop_breaker=None)  # fmt: skip
    victim, attacker = guard.keys.create(name="victim"), guard.keys.create(name="attacker")
    async with serve(mcp) as url:
        async with http_client(url, victim.token) as client:
            for i in range(30):
                await client.call_tool("echo", {"text": str(i)})
        async with http_client(url, attacker.token) as client:
            result = await client.call_tool("echo", {"text": "probe"})
            doc = json.loads((await client.read_resource("guard://usage"))[0].text)
    budget = result.meta[BUDGET_META_KEY]
    assert budget["limit"] == "100/minute" and budget["remaining"] == 99
    assert "global" not in doc["limits"] and doc["limits"]["per_key"]["used"] == 2


async def test_credits_mode_is_an_argument_too(serve, store, audit, audit_path):
    from fastmcp_guard.errors import ConfigError

    with pytest.raises(ConfigError, match="'enforce' or 'shadow'"):
        credit_server(store, audit=audit, ip=None, credits_mode="off")
    mcp, guard = credit_server(store, audit=audit, ip=None, credits_mode="shadow")
    key = guard.keys.create(name="agent", credits=1)
    async with serve(mcp) as url, http_client(url, key.token) as client:
        for i in range(3):
            assert (await client.call_tool("echo", {"text": str(i)})).data == f"echo: {i}"
    audit.flush()
    shadow = [e for e in read_audit(audit_path) if e["status"] == "would_refuse"]
    assert [e["rule"] for e in shadow] == ["credits", "credits"]
