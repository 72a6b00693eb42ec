"""`fastmcp-guard run` on an unmodified server, driven by the real CLI and a real client.

One server process per test module; the CLI runs in subprocesses against the same
directory (embedded defaults: ./fastmcp-guard-keys.db, ./fastmcp-guard-audit.jsonl),
exactly as an operator would.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastmcp.utilities.tests import find_available_port

from tests.cli.test_cli_keys import assert_user_error, cli, create, ok
from tests.conftest import http_client, read_audit

pytestmark = pytest.mark.http

HERE = Path(__file__).parent


class Server:
    def __init__(self, cwd: Path, proc: subprocess.Popen[bytes], url: str) -> None:
        self.cwd, self.proc, self.url = cwd, proc, url

    @property
    def mcp_url(self) -> str:
        return self.url + "/mcp"

    def env(self) -> dict[str, str]:
        return {"FASTMCP_GUARD_URL": self.url}


def start_server(
    cwd: Path, *args: str, env: dict[str, str] | None = None, port: int | None = None
) -> Server:
    """``fastmcp-guard run server.py`` in ``cwd``, configured by ``args`` and ``env`` only."""
    shutil.copy(HERE / "plain_server.py", cwd / "server.py")
    port = port or find_available_port()
    settings = env or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTMCP_GUARD_")}
    env.update(settings)
    log = open(cwd / "server.log", "wb")  # noqa: SIM115 - closed by stop_server
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastmcp_guard.cli", "run", "server.py", "--port", str(port), *args],
        cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/_guard/rate", timeout=1)
        except urllib.error.HTTPError:
            break  # 401: up and guarded
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((cwd / "server.log").read_text()) from None
            time.sleep(0.1)
    return Server(cwd, proc, url)


def stop_server(server: Server) -> int:
    server.proc.terminate()
    return server.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    cwd = tmp_path_factory.mktemp("run")
    # An hour: no call refills during a test however slow the machine (3/minute refilled one
    # every 20 s, and a loaded run saw "used" drop).
    srv = start_server(cwd, "--rate", "3/hour")
    yield srv
    stop_server(srv)


def http_status(server: Server, token: str) -> int:
    """Status of a raw MCP ``initialize`` POST with ``token`` (200 admitted, 401 refused)."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"}}}).encode()  # fmt: skip
    req = urllib.request.Request(server.mcp_url, data=body, method="POST", headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def call(server: Server, token: str, tool: str = "echo", **args: Any) -> Any:
    async with http_client(server.mcp_url, token) as client:
        return await client.call_tool(tool, args or {"text": "hi"}, raise_on_error=False)


async def test_a_cli_key_works_and_rate_status_shows_the_calls_made(server: Server) -> None:
    key = create(server.cwd, "--name", "alice", "--scopes", "read:data")
    for _ in range(2):
        result = await call(server, key["token"])
        assert not result.is_error and result.data == "hi"
    status = json.loads(
        ok(server.cwd, "rate", "status", key["id"], "--json", env=server.env()).stdout
    )
    (entry,) = status["keys"]
    assert entry["key"] == key["id"] and entry["name"] == "alice"
    assert entry["per_key"]["used"] == 2 and entry["per_key"]["limit"] == 3
    assert status["per_key_rate"] == "3/hour"
    # Without a key: every tracked key, alice among them.
    listed = json.loads(ok(server.cwd, "rate", "status", "--json", env=server.env()).stdout)
    assert key["id"] in [k["key"] for k in listed["keys"]]
    human = ok(server.cwd, "rate", "status", env=server.env()).stdout
    assert "alice" in human and "2/3 per h" in human


async def test_rate_reset_lets_a_limited_key_through_again(server: Server) -> None:
    key = create(server.cwd, "--name", "bob")
    for _ in range(3):
        assert not (await call(server, key["token"])).is_error
    refused = await call(server, key["token"])
    assert refused.is_error and "rate limit" in refused.content[0].text.lower()
    out = ok(server.cwd, "rate", "reset", key["id"], env=server.env()).stdout
    assert "Reset" in out
    assert not (await call(server, key["token"])).is_error
    # The token's public part names the key too.
    public = "fmg_sk_" + key["id"].removeprefix("fmg_key_")
    body = json.loads(ok(server.cwd, "rate", "reset", public, "--json", env=server.env()).stdout)
    assert body == {"reset": key["id"], "was_tracked": True}


async def test_a_key_revoked_with_the_cli_is_refused_within_a_second(server: Server) -> None:
    key = create(server.cwd, "--name", "carol")
    assert not (await call(server, key["token"])).is_error
    assert http_status(server, key["token"]) == 200
    ok(server.cwd, "keys", "revoke", key["id"], "--force")
    revoked_at = time.monotonic()
    while http_status(server, key["token"]) != 401:
        assert time.monotonic() - revoked_at < 1.0, "still admitted a second after revoke"
        await asyncio.sleep(0.02)
    assert time.monotonic() - revoked_at < 1.0
    with pytest.raises(Exception, match="error response"):
        await call(server, key["token"])


async def test_admin_routes_refuse_keys_without_the_admin_scope(server: Server) -> None:
    key = create(server.cwd, "--name", "dave", "--scopes", "read:data")
    proc = cli(server.cwd, "rate", "status", "--admin-key", key["token"], env=server.env())
    assert_user_error(proc, 1, "HTTP 403", "guard:admin")
    proc = cli(server.cwd, "rate", "status", "--admin-key", "fmg_sk_nope", env=server.env())
    assert_user_error(proc, 1, "HTTP 401")
    assert key["token"] not in proc.stderr


def test_rate_commands_explain_an_unreachable_server(tmp_path: Path) -> None:
    port = find_available_port()
    proc = cli(tmp_path, "rate", "status", "--url", f"http://127.0.0.1:{port}",
               "--admin-key", "fmg_sk_x")  # fmt: skip
    assert_user_error(proc, 1, "cannot reach the server", f"127.0.0.1:{port}")


def test_run_refuses_bad_input_with_exit_2(tmp_path: Path) -> None:
    assert_user_error(cli(tmp_path, "run", "missing.py"), 2, "server file not found")
    shutil.copy(HERE / "plain_server.py", tmp_path / "server.py")
    assert_user_error(cli(tmp_path, "run", "server.py:nope"), 2, "no object named 'nope'")
    assert_user_error(cli(tmp_path, "run", "server.py:echo"), 2, "not a FastMCP server")
    assert_user_error(cli(tmp_path, "run", "server.py", "--rate", "10/fortnight"), 2, "fortnight")
    assert_user_error(cli(tmp_path, "run", "server.py", "--deny", "10.0.0.0/33"), 2, "10.0.0.0/33")


async def test_sigterm_flushes_the_audit_log_and_no_secret_leaks(tmp_path: Path) -> None:
    srv = start_server(tmp_path)
    key = create(tmp_path, "--name", "erin", "--scopes", "read:data")
    for i in range(5):
        result = await call(srv, key["token"], "add", a=i, b=1)
        assert result.data == i + 1
    assert stop_server(srv) == 0
    banner = (tmp_path / "server.log").read_text()
    assert "serving 'plain' on http://127.0.0.1:" in banner
    assert f"keys: sqlite:///{tmp_path}/fastmcp-guard-keys.db" in banner
    events = read_audit(tmp_path / "fastmcp-guard-audit.jsonl")
    calls = [e for e in events if e["tool"] == "add"]
    assert len(calls) == 5 and all(e["key_name"] == "erin" for e in calls)
    (created,) = [e for e in events if e["status"] == "created"]
    assert created["key_id"] == key["id"] and created["actor"]
    for name in ("fastmcp-guard-keys.db", "fastmcp-guard-audit.jsonl", "server.log"):
        data = (tmp_path / name).read_bytes()
        assert key["token"].encode() not in data, name


async def test_audit_to_a_jsonl_file_and_an_http_endpoint_from_the_environment_only(
    tmp_path: Path,
) -> None:
    from fastmcp_guard.audit.http import verify_signature

    from tests.integration.audit_receiver import Receiver

    secret = "e2e-hmac-s3cret"
    receiver = Receiver(secret=secret.encode()).start()
    env = {"FASTMCP_GUARD_AUDIT": f"./audit.jsonl,{receiver.url}",
           "FASTMCP_GUARD_AUDIT_HTTP_SECRET": secret}  # fmt: skip
    try:
        srv = start_server(tmp_path, env=env)
        # The CLI logs with the same settings while the server holds its spool.
        key = create(tmp_path, "--name", "frank", "--scopes", "read:data", env=env)
        for i in range(10):
            result = await call(srv, key["token"], "add", a=i, b=100)
            assert not result.is_error and result.data == i + 100
        assert http_status(srv, "fmg_sk_not_a_key") == 401
        # Shipped while the server runs: start_server's probe and the bad key (2 refusals),
        # the key's creation, 10 calls.
        receiver.wait_for(13)
        assert stop_server(srv) == 0
    finally:
        receiver.stop()

    def summary(events: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
        return sorted((e["status"], e["tool"] or "", e["key_id"] or "",
                       json.dumps(e["input_args"], sort_keys=True)) for e in events)  # fmt: skip

    logged = read_audit(tmp_path / "audit.jsonl")
    shipped = receiver.accepted()
    assert len(logged) == 13 and summary(shipped) == summary(logged)
    statuses = sorted(e["status"] for e in shipped)
    assert statuses == ["created"] + ["ok"] * 10 + ["unauthorized"] * 2
    assert set(receiver.ids.values()) == {1}  # each event once
    for request in receiver.requests:
        assert verify_signature(secret, request.headers, request.body)
        assert not verify_signature("another-secret", request.headers, request.body)
    banner = (tmp_path / "server.log").read_text()
    assert f"audit: jsonl:///{tmp_path}/audit.jsonl, {receiver.url}" in banner
    spool = tmp_path / "fastmcp-guard-audit-spool"
    assert (spool / "cli").is_dir()  # the CLI's own spool: the server held the other
    files = [tmp_path / "audit.jsonl", tmp_path / "server.log", *spool.rglob("*")]
    for f in (f for f in files if f.is_file()):
        data = f.read_bytes()
        assert secret.encode() not in data and key["token"].encode() not in data, f
