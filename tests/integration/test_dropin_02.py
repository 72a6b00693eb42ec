"""Drop-in for fastmcp-guard 0.2: what 0.2's users' own tests rely on (issue 10).

0.2 wrote each audit line before answering, and its users' tests read the file right
after ``async with Client(mcp)`` exits, without closing the log.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from fastmcp import Client, FastMCP
from fastmcp_guard import AuditLog, FileBackend, Guard
from fastmcp_guard.audit import SQLiteBackend

from tests.conftest import read_audit


def server(audit: AuditLog) -> FastMCP:
    mcp = FastMCP("dropin")

    @mcp.tool
    def echo(text: str) -> str:
        return text

    Guard(mcp, audit=audit)
    return mcp


async def test_every_event_of_an_in_process_session_is_in_the_file_when_it_closes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    # A long flush interval: without the flush at the session's end the lines would wait.
    audit = AuditLog(backend=FileBackend(path, flush_interval_ms=60_000))
    mcp = server(audit)
    for session in range(3):
        async with Client(mcp) as client:
            for i in range(5):
                await client.call_tool("echo", {"text": f"{session}-{i}"})
        events = read_audit(path)  # right after the session, the log still open
        assert len(events) == 5 * (session + 1)
        assert events[-1]["input_args"] == {"text": f"{session}-4"}
    audit.close()


async def test_the_sqlite_backend_has_them_too(tmp_path: Path) -> None:
    audit = AuditLog(backend=SQLiteBackend(tmp_path / "audit.db", flush_interval_ms=60_000))
    mcp = server(audit)
    async with Client(mcp) as client:
        await client.call_tool("echo", {"text": "x"})
    # Read by another connection, as a user's test would: the row is committed.
    with sqlite3.connect(tmp_path / "audit.db") as db:
        assert db.execute("select tool, status from audit_log").fetchall() == [("echo", "ok")]
    audit.close()
