"""Credits across two real guarded servers (``fastmcp-guard run``) sharing one key store,
on PostgreSQL and on Redis: N credits and 3N concurrent calls from both nodes admit
exactly N; the usage both nodes record adds up to the calls each admitted."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastmcp import Client
from fastmcp.utilities.tests import find_available_port

from tests.cli.test_cli_keys import create, ok
from tests.cli.test_cli_run import Server, stop_server
from tests.fleet.test_fleet_keys import dsn, pg, redis_dsn  # noqa: F401 - the fixtures
from tests.fleet.test_fleet_processes import wait_ready

pytestmark = [pytest.mark.fleet, pytest.mark.http]

HERE = Path(__file__).parent
N = 40


@pytest.fixture(params=["postgres", pytest.param("redis", marks=pytest.mark.redis)])
def keys_url(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres":
        return str(request.getfixturevalue("dsn"))
    return str(request.getfixturevalue("redis_dsn"))


def launch(cwd: Path, name: str, keys_url: str) -> tuple[subprocess.Popen[bytes], str]:
    """``fastmcp-guard run server.py`` with the key store at ``keys_url``, in-process limits."""
    port = find_available_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTMCP_GUARD_")}
    env.update({"FASTMCP_GUARD_KEYS": keys_url, "FASTMCP_GUARD_AUDIT": f"audit-{name}.jsonl"})
    with (cwd / f"server-{name}.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastmcp_guard.cli", "run", "server.py", "--port", str(port)],
            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


async def fire(server: Server, token: str, calls: int) -> list[Any]:
    """``calls`` concurrent tool calls at one node, over 4 client sessions."""
    async def session(count: int) -> list[Any]:
        async with Client(server.mcp_url, auth=token) as client:
            return list(await asyncio.gather(*(
                client.call_tool("echo", {"text": f"call {i}"}, raise_on_error=False)
                for i in range(count)
            )))  # fmt: skip

    parts = await asyncio.gather(*(session(calls // 4) for _ in range(4)))
    return [r for part in parts for r in part]


async def test_n_credits_admit_exactly_n_calls_across_two_nodes(
    tmp_path: Path, keys_url: str
) -> None:
    cwd = tmp_path
    shutil.copy(HERE.parent / "cli" / "plain_server.py", cwd / "server.py")
    env = {"FASTMCP_GUARD_KEYS": keys_url}
    key = create(cwd, "--name", "agent", "--credits", str(N), env=env)
    servers: list[Server] = []
    try:
        for name in ("a", "b"):
            proc, url = launch(cwd, name, keys_url)
            servers.append(wait_ready(cwd, name, proc, url))
        a, b = servers
        results = await asyncio.gather(fire(a, key["token"], 3 * N // 2),
                                       fire(b, key["token"], 3 * N // 2))  # fmt: skip
        flat = [r for node in results for r in node]
        admitted = [r for r in flat if not r.is_error]
        refused = [r for r in flat if r.is_error]
        assert len(flat) == 3 * N
        assert len(admitted) == N, [len([r for r in n if not r.is_error]) for n in results]
        assert all("Credits exhausted" in r.content[0].text for r in refused)
        assert all(r.structured_content["error"] == "credits_exhausted" for r in refused)
    finally:
        for server in servers:
            stop_server(server)
    shown = ok(cwd, "keys", "inspect", key["id"], "--json", env=env).stdout
    assert '"credits": 0' in shown
    # Both nodes flushed their usage at shutdown: the store's totals are the calls made.
    report = ok(cwd, "usage", "--key", key["id"], "--json", env=env).stdout
    totals = json.loads(report)["totals"]
    assert totals["calls"] == N and totals["cost"] == N
    assert totals["refusals"].get("credits_exhausted") == 2 * N
