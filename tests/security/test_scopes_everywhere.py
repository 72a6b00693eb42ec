"""Scopes hold on stdio, and every hidden component is audited ``forbidden``
(issue 10, findings 15 and 17).

Before: with ``FASTMCP_GUARD_KEY`` set to a read-only key, a ``require_scopes("write:data")``
tool ran on stdio and was audited ``ok`` (FastMCP skips component auth on stdio); over
HTTP a resource or prompt hidden by scopes was audited ``error`` while a tool was
audited ``forbidden``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from fastmcp import Client, FastMCP
from fastmcp.client.transports import PythonStdioTransport
from fastmcp.exceptions import ToolError
from fastmcp.server.auth import require_scopes
from fastmcp_guard import AuditLog, FileBackend, Guard, KeyStore

from tests.conftest import http_client, read_audit, serve_http

SERVER = Path(__file__).with_name("scoped_stdio_server.py")


def wait_for(path: Path, count: int) -> list[dict]:
    deadline = time.monotonic() + 10
    while True:
        events = read_audit(path) if path.exists() else []
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.02)


async def test_stdio_applies_the_components_scopes_to_the_env_key(tmp_path: Path) -> None:
    keys = KeyStore(backend="sqlite", path=tmp_path / "keys.db")
    reader = keys.create("reader", scopes=["read:data"])
    keys.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTMCP_GUARD_")}
    env.update(TEST_KEYS_DB=str(tmp_path / "keys.db"), TEST_AUDIT=str(tmp_path / "a.jsonl"),
               FASTMCP_GUARD_KEY=str(reader.token))  # fmt: skip
    transport = PythonStdioTransport(SERVER, env=env, python_cmd=sys.executable)
    async with Client(transport) as client:
        assert [t.name for t in await client.list_tools()] == ["read_data"]
        # Only the guard's own guard://usage (the caller's own budget) is listed.
        assert [str(r.uri) for r in await client.list_resources()] == ["guard://usage"]
        assert await client.list_resource_templates() == []
        assert await client.list_prompts() == []
        assert (await client.call_tool("read_data", {})).data == "data"
        with pytest.raises(ToolError, match="Unknown tool|not authorized"):
            await client.call_tool("write_data", {"item": "x"})
        with pytest.raises(Exception, match="Unknown resource|Resource not found|not authorized"):
            await client.read_resource("secret://vault")
        with pytest.raises(Exception, match="Unknown resource|Resource not found|not authorized"):
            await client.read_resource("users://42/private")
        with pytest.raises(Exception, match="Unknown prompt|not authorized"):
            await client.get_prompt("admin_prompt", {})
        # FastMCP's AuthMiddleware (restrict_tag) and a mounted server's checks too.
        for name in ("drop_database", "kid_child_admin"):
            result = await client.call_tool(name, {}, raise_on_error=False)
            assert result.is_error and "ran" not in str(result.content), name
            assert "dropped" not in str(result.content), name
    events = wait_for(tmp_path / "a.jsonl", 7)
    assert [(e["tool"], e["status"]) for e in events] == [
        ("read_data", "ok"), ("write_data", "forbidden"), ("secret://vault", "forbidden"),
        ("users://42/private", "forbidden"), ("admin_prompt", "forbidden"),
        ("drop_database", "forbidden"), ("kid_child_admin", "forbidden"),
    ]  # fmt: skip
    assert {e["key_id"] for e in events} == {reader.id}


async def test_stdio_with_a_writer_key_sees_and_calls_everything(tmp_path: Path) -> None:
    keys = KeyStore(backend="sqlite", path=tmp_path / "keys.db")
    writer = keys.create("writer", scopes=["read:data", "write:data"])
    keys.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTMCP_GUARD_")}
    env.update(TEST_KEYS_DB=str(tmp_path / "keys.db"), TEST_AUDIT=str(tmp_path / "a.jsonl"),
               FASTMCP_GUARD_KEY=str(writer.token))  # fmt: skip
    transport = PythonStdioTransport(SERVER, env=env, python_cmd=sys.executable)
    async with Client(transport) as client:
        assert {t.name for t in await client.list_tools()} == {
            "read_data", "write_data", "drop_database", "kid_child_admin"}  # fmt: skip
        assert (await client.call_tool("drop_database", {})).data == "database dropped"
        assert (await client.call_tool("kid_child_admin", {})).data == "child admin ran"
        assert (await client.call_tool("write_data", {"item": "x"})).data == "wrote x"
        assert "the vault" in str(await client.read_resource("secret://vault"))
        assert len(await client.list_prompts()) == 1


async def test_hidden_resources_and_prompts_are_audited_forbidden_over_http(
    tmp_path: Path,
) -> None:
    mcp = FastMCP("scoped")

    @mcp.resource("secret://vault", auth=require_scopes("write:data"))
    def vault() -> str:
        return "the vault"

    @mcp.resource("users://{user_id}/private", auth=require_scopes("write:data"))
    def private(user_id: str) -> str:
        return user_id

    @mcp.prompt(auth=require_scopes("write:data"))
    def admin_prompt() -> str:
        return "admin"

    audit_file = tmp_path / "a.jsonl"
    guard = Guard(mcp, keys=KeyStore(), audit=AuditLog(backend=FileBackend(audit_file)))
    reader = guard.keys.create("reader", scopes=["read:data"])
    async with serve_http(mcp) as url, http_client(url, str(reader.token)) as client:
        for read in (lambda: client.read_resource("secret://vault"),
                     lambda: client.read_resource("users://7/private"),
                     lambda: client.read_resource("nothing://here"),
                     lambda: client.get_prompt("admin_prompt", {})):  # fmt: skip
            with pytest.raises(Exception, match="Unknown|not found"):
                await read()
    guard.close()
    calls = [e for e in read_audit(audit_file) if e["status"] != "created"]
    assert [(e["tool"], e["status"]) for e in calls] == [
        ("secret://vault", "forbidden"), ("users://7/private", "forbidden"),
        ("nothing://here", "error"), ("admin_prompt", "forbidden"),
    ]  # fmt: skip
