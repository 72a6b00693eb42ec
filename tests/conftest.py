"""Shared fixtures: temporary stores and logs, guarded servers, real HTTP."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from fastmcp import Client, FastMCP
from fastmcp.utilities.tests import find_available_port
from fastmcp_guard import AuditLog, FileBackend, Guard, KeyStore


def read_audit(path: Path | str) -> list[dict[str, Any]]:
    """Every event in a JSONL audit file (each line must parse)."""
    text = Path(path).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line]


@pytest.fixture(autouse=True)
def _isolated_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No stray ``FASTMCP_GUARD_*`` variable or config file in the repo changes a test:
    clear the environment's settings and run each test in its own empty directory."""
    for name in list(os.environ):
        if name.startswith("FASTMCP_GUARD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def key_db(tmp_path: Path) -> Path:
    return tmp_path / "keys.db"


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


@pytest.fixture
def store(key_db: Path) -> KeyStore:
    """A real SQLite key store in a temporary directory."""
    s = KeyStore(backend="sqlite", path=key_db)
    yield s
    s.close()


@pytest.fixture
def audit(audit_path: Path) -> AuditLog:
    log = AuditLog(backend=FileBackend(audit_path, flush_interval_ms=20))
    yield log
    log.close()


@pytest.fixture
def make_server() -> Callable[..., tuple[FastMCP[Any], Guard]]:
    """Build a FastMCP server with a few tools, guarded with the given options."""
    guards: list[Guard] = []

    def factory(**guard_kwargs: Any) -> tuple[FastMCP[Any], Guard]:
        mcp: FastMCP[Any] = FastMCP("guarded")

        @mcp.tool
        def echo(text: str) -> str:
            return f"echo: {text}"

        @mcp.tool
        def boom() -> str:
            raise ValueError("tool failed on purpose")

        g = Guard(mcp, **guard_kwargs)
        guards.append(g)
        return mcp, g

    yield factory
    for g in guards:
        if g.audit is not None:
            g.audit.close()


@asynccontextmanager
async def serve_http(
    mcp: FastMCP[Any], host: str = "127.0.0.1", *, proxy_headers: bool = False
) -> AsyncIterator[str]:
    """Serve ``mcp`` over streamable HTTP on a free loopback port; yield its URL.

    Like ``fastmcp.utilities.tests.run_server_async``, but with uvicorn's own
    proxy-header handling off (it trusts ``X-Forwarded-For`` from 127.0.0.1 by
    default), so that the guard sees the real TCP peer (``proxy_headers=True``: uvicorn's
    default, for the tests of what that does).
    """
    port = find_available_port()
    task = asyncio.create_task(
        mcp.run_http_async(host=host, port=port, show_banner=False,
                           uvicorn_config={"proxy_headers": proxy_headers})
    )  # fmt: skip
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            if task.done():
                task.result()  # raises the server's start-up error
            try:
                _, writer = await asyncio.open_connection(host, port)
            except OSError:
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"server did not listen on {host}:{port}") from None
                await asyncio.sleep(0.02)
                continue
            writer.close()
            await writer.wait_closed()
            break
        yield f"http://{host}:{port}/mcp"
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError, asyncio.TimeoutError):
            await asyncio.wait_for(task, timeout=5.0)


@pytest.fixture
def serve() -> Callable[[FastMCP[Any]], Any]:
    """``async with serve(mcp) as url``: the server on a free loopback port over real HTTP."""
    return serve_http


def http_client(url: str, token: str | None = None, **kwargs: Any) -> Client[Any]:
    """A real ``fastmcp.Client`` over streamable HTTP with an optional Bearer key."""
    return Client(url, auth=token, **kwargs)
