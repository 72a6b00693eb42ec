"""Transports without HTTP: in-process and stdio (identity from FASTMCP_GUARD_KEY)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastmcp import Client
from fastmcp.client.transports import PythonStdioTransport
from fastmcp.exceptions import ToolError
from fastmcp_guard import AuditLog, FileBackend, KeyStore, RateLimit
from fastmcp_guard._util import os_user

from tests.conftest import read_audit

SERVER = Path(__file__).with_name("stdio_server.py")


def _events_when_written(path: Path, count: int) -> list[dict]:
    """The audit events once ``count`` are in the file.

    The client does not wait for the stdio server to exit, and the server writes its
    events within the writer's tick (10 ms) and at exit: poll with a deadline.
    """
    deadline = time.monotonic() + 10
    while True:
        events = read_audit(path) if path.exists() else []
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.02)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FASTMCP_GUARD_KEY"}
    env.update(TEST_KEYS_DB=str(tmp_path / "keys.db"), TEST_AUDIT=str(tmp_path / "audit.jsonl"))
    env.update(extra)
    return env


async def test_in_process_calls_are_limited_and_audited(make_server, tmp_path):
    path = tmp_path / "a.jsonl"
    audit = AuditLog(backend=FileBackend(path))
    mcp, _ = make_server(rate_limit=RateLimit(per_key="2/minute"), audit=audit)
    async with Client(mcp) as client:
        await client.call_tool("echo", {"text": "1"})
        await client.call_tool("echo", {"text": "2"})
        with pytest.raises(ToolError, match="Rate limit exceeded"):
            await client.call_tool("echo", {"text": "3"})
    audit.close()
    events = read_audit(path)
    assert [e["status"] for e in events] == ["ok", "ok", "rate_limited"]
    assert {e["key_name"] for e in events} == {f"local:{os_user()}"}


async def test_stdio_calls_are_attributed_to_the_env_key(tmp_path):
    store = KeyStore(backend="sqlite", path=tmp_path / "keys.db")
    key = store.create(name="stdio-bot", scopes=["read"])
    store.close()
    env = _env(tmp_path, FASTMCP_GUARD_KEY=key.token)
    transport = PythonStdioTransport(SERVER, env=env, python_cmd=sys.executable)
    async with Client(transport) as client:
        assert (await client.call_tool("whoami", {})).content[0].text == key.id
        await client.call_tool("whoami", {})
        with pytest.raises(ToolError, match="Rate limit exceeded"):
            await client.call_tool("whoami", {})
    events = _events_when_written(tmp_path / "audit.jsonl", 3)
    calls = [e for e in events if e["tool"] == "whoami"]
    assert [(e["key_id"], e["key_name"], e["status"]) for e in calls] == [
        (key.id, "stdio-bot", "ok"), (key.id, "stdio-bot", "ok"), (key.id, "stdio-bot", "rate_limited"),
    ]  # fmt: skip
    assert key.token not in (tmp_path / "audit.jsonl").read_text()


async def test_stdio_without_key_is_the_local_user(tmp_path):
    transport = PythonStdioTransport(SERVER, env=_env(tmp_path), python_cmd=sys.executable)
    async with Client(transport) as client:
        assert (await client.call_tool("whoami", {})).content[0].text == "nobody"
    events = _events_when_written(tmp_path / "audit.jsonl", 1)
    assert len(events) == 1
    assert events[0]["key_id"] == "" and events[0]["key_name"] == f"local:{os_user()}"


def test_stdio_refuses_to_start_with_a_revoked_key(tmp_path):
    store = KeyStore(backend="sqlite", path=tmp_path / "keys.db")
    key = store.create(name="gone")
    store.revoke(key.id)
    store.close()
    env = _env(tmp_path, FASTMCP_GUARD_KEY=key.token)
    proc = subprocess.run(
        [sys.executable, str(SERVER)], env=env, capture_output=True, text=True, timeout=30,
        stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "FASTMCP_GUARD_KEY was refused (revoked)" in proc.stderr
    assert key.token not in proc.stderr
