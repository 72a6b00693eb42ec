"""No token, nor its secret part, in a URL, an audit line, a server log line or an error
(issue 10, finding 1), and the ``rate`` commands issue no throwaway keys (new user).

Before: ``fastmcp-guard rate status <token>`` sent ``GET /_guard/rate?key=<token>``: the
admin route audited ``input_args: {"key": "<token>"}`` and uvicorn logged the URL. Every
``rate`` command without ``--admin-key`` issued and revoked an admin key, even when the
server was unreachable; ``rate status fmg_key_nope`` exited 0 with a made-up row.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastmcp.utilities.tests import find_available_port

from tests.cli.test_cli_keys import assert_user_error, cli, create, ok
from tests.cli.test_cli_run import Server, call, start_server, stop_server
from tests.conftest import read_audit

pytestmark = pytest.mark.http


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    cwd = tmp_path_factory.mktemp("leak")
    srv = start_server(cwd, "--rate", "5/minute")
    yield srv
    stop_server(srv)


def everything_written(server: Server) -> bytes:
    """The server's log, the audit log and the key store, as bytes."""
    files = [server.cwd / "server.log", *server.cwd.glob("fastmcp-guard-audit*.jsonl"),
             *server.cwd.glob("fastmcp-guard-keys.db*")]  # fmt: skip
    return b"".join(p.read_bytes() for p in files if p.is_file())


def secret_of(token: str) -> str:
    return token.rsplit("_", 1)[-1]


def keys_issued(server: Server) -> int:
    listed = json.loads(ok(server.cwd, "keys", "list", "--all", "--json").stdout)
    return len(listed)


async def test_rate_status_with_a_token_sends_only_the_key_id(server: Server) -> None:
    key = create(server.cwd, "--name", "alice")
    assert not (await call(server, key["token"])).is_error
    before = keys_issued(server)
    status = json.loads(ok(server.cwd, "rate", "status", key["token"], "--json",
                           env=server.env()).stdout)  # fmt: skip
    assert status["keys"][0]["key"] == key["id"]
    body = json.loads(ok(server.cwd, "rate", "reset", key["token"], "--json",
                         env=server.env()).stdout)  # fmt: skip
    assert body["reset"] == key["id"]
    # Over the local admin socket: no key was issued, nothing but the two admin actions.
    assert keys_issued(server) == before
    # The server writes its audit events within its flush interval: wait for the reset's
    # line before searching everything written for the token.
    deadline = time.monotonic() + 10
    while True:
        events = read_audit(server.cwd / "fastmcp-guard-audit.jsonl")
        admin = [e for e in events if e["tool"].startswith("admin:")]
        if admin and admin[-1]["tool"] == "admin:rate.reset":
            break
        assert time.monotonic() < deadline, [e["tool"] for e in admin]
        await asyncio.sleep(0.02)
    written = everything_written(server)
    assert secret_of(key["token"]).encode() not in written
    assert key["token"].encode() not in written
    assert [e["tool"] for e in admin][-2:] == ["admin:rate.status", "admin:rate.reset"]
    assert admin[-1]["input_args"] == {"key": key["id"]}
    assert not [e for e in events if e["status"] in ("created", "revoked")
                and "one command" in json.dumps(e)]  # fmt: skip


def test_admin_routes_answer_a_token_with_400_and_record_nothing_of_it(server: Server) -> None:
    admin = create(server.cwd, "--name", "ops", "--scopes", "guard:admin")
    victim = create(server.cwd, "--name", "victim")
    encoded = victim["token"].replace("_", "%5F")
    kid, secret = victim["token"].removeprefix("fmg_sk_").split("_", 1)
    for method, path, data in (
        ("GET", f"/_guard/rate?key={victim['token']}", None),
        # Percent-encoded, whole or only the separator: the access log keeps the raw URL.
        ("GET", f"/_guard/rate?key={encoded}", None),
        ("GET", f"/_guard/rate?key=fmg_sk_{kid}%5F{secret}", None),
        ("GET", f"/_guard/rate?key=fmg%255Fsk%255F{kid}%255F{secret}", None),
        ("POST", "/_guard/rate/reset", json.dumps({"key": victim["token"]}).encode()),
    ):
        req = urllib.request.Request(server.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {admin['token']}", "Content-Type": "application/json"})  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=5)
        body = info.value.read().decode()
        # A token (once decoded) is refused as one; the doubly encoded text is no key id.
        assert info.value.code in (400, 404), (path, info.value.code)
        if info.value.code == 400:
            assert "pass the key id" in body and secret not in body
    written = everything_written(server)
    assert secret_of(victim["token"]).encode() not in written  # not audited, not logged
    assert secret_of(admin["token"]).encode() not in written


def test_unknown_keys_are_exit_1(server: Server) -> None:
    for command in ("status", "reset"):
        proc = cli(server.cwd, "rate", command, "fmg_key_nope", env=server.env())
        assert_user_error(proc, 1, "unknown key", "fmg_key_nope")


def test_an_unreachable_server_gets_no_key_issued(tmp_path: Path) -> None:
    create(tmp_path, "--name", "someone")  # the store exists, so a key could be issued
    before = len(json.loads(ok(tmp_path, "keys", "list", "--all", "--json").stdout))
    port = find_available_port()
    proc = cli(tmp_path, "rate", "status", "--url", f"http://127.0.0.1:{port}")
    assert_user_error(proc, 1, "cannot reach the server")
    after = len(json.loads(ok(tmp_path, "keys", "list", "--all", "--json").stdout))
    assert after == before


async def test_without_an_admin_socket_a_one_minute_key_is_issued_and_revoked(
    tmp_path: Path,
) -> None:
    """A server run by ``Guard(mcp)`` in code has no admin socket: the CLI, sharing its
    SQLite store, issues a short-lived admin key for the one command and revokes it."""
    import asyncio

    from fastmcp import FastMCP
    from fastmcp_guard import Guard, KeyStore

    from tests.conftest import serve_http

    mcp = FastMCP("in-code")
    guard = Guard(mcp, keys=KeyStore(backend="sqlite", path=tmp_path / "fastmcp-guard-keys.db"))
    async with serve_http(mcp) as url:
        base = url.rsplit("/mcp", 1)[0]
        proc = await asyncio.to_thread(cli, tmp_path, "rate", "status", "--url", base, "--json")
    guard.close()
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(ok(tmp_path, "keys", "list", "--all", "--json").stdout)
    (ephemeral,) = [k for k in listed if k["name"].startswith("fastmcp-guard-cli")]
    assert ephemeral["status"] == "revoked"
    from datetime import datetime

    lifetime = datetime.fromisoformat(ephemeral["expires_at"]) - datetime.fromisoformat(
        ephemeral["created_at"]
    )
    assert lifetime.total_seconds() <= 60


async def test_a_token_echoed_by_a_failing_tool_stays_out_of_the_server_log(server: Server) -> None:
    """FastMCP logs "Error calling tool" with the traceback; a user who pastes a token into
    a tool's argument must not find it in the server's log."""
    caller = create(server.cwd, "--name", "caller")
    victim = create(server.cwd, "--name", "pasted")
    result = await call(server, caller["token"], "fail", text=victim["token"])
    assert result.is_error
    assert secret_of(victim["token"]).encode() not in everything_written(server)
