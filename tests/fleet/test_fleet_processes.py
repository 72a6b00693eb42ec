"""Several processes sharing one Redis: limits hold across them exactly.

- two node processes (``tests/fleet/node.py``) fire concurrent calls at once: a per-key
  limit L admits exactly L across both, a global limit G exactly G;
- two real guarded servers (``fastmcp-guard run`` with ``FASTMCP_GUARD_RATE_BACKEND=redis``)
  share one limit, and ``fastmcp-guard rate status|reset`` through either node sees and
  resets the shared state.
"""

from __future__ import annotations

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

from tests.cli.test_cli_keys import create, ok
from tests.cli.test_cli_run import Server, call, stop_server
from tests.fleet.conftest import RedisServer

pytestmark = [pytest.mark.fleet, pytest.mark.redis, pytest.mark.http]

HERE = Path(__file__).parent


def run_nodes(server: RedisServer, prefix: str, per_key: str, global_limit: str,
              keys: int, calls: int, nodes: int = 2) -> list[dict[str, int]]:  # fmt: skip
    """Start ``nodes`` node processes, release them together, return their counts."""
    node = [sys.executable, str(HERE / "node.py"), server.url, prefix, per_key, global_limit]
    argv = [*node, str(keys), str(calls)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    procs = [subprocess.Popen(argv, **pipes) for _ in range(nodes)]  # type: ignore[call-overload]
    try:
        for proc in procs:  # each says "ready" once connected
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == "ready", line + (proc.stderr.read() if proc.stderr else "")
        server.client().rpush(prefix + "go", *range(nodes))  # the start signal, for all at once
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            results.append(json.loads(out))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_per_key_limit_admits_exactly_l_across_two_processes(
    redis_server: RedisServer, key_prefix: str
) -> None:
    # 2 x 60 calls at a limit of 100: each node alone cannot exhaust it, so both take part.
    results = run_nodes(redis_server, key_prefix, "100/hour", "", keys=1, calls=60)
    assert [r["unavailable"] for r in results] == [0, 0]
    assert sum(r["admitted"] for r in results) == 100, results


def test_a_global_limit_admits_exactly_g_across_two_processes(
    redis_server: RedisServer, key_prefix: str
) -> None:
    results = run_nodes(redis_server, key_prefix, "1000/hour", "120/hour", keys=10, calls=75)
    assert [r["unavailable"] for r in results] == [0, 0]
    assert sum(r["admitted"] for r in results) == 120, results


# -- two guarded servers ---------------------------------------------------------------------


def launch(cwd: Path, name: str, redis_url: str, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = find_available_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTMCP_GUARD_")}
    env.update({
        "FASTMCP_GUARD_RATE_BACKEND": "redis",
        "FASTMCP_GUARD_RATE_URL": redis_url,
        "FASTMCP_GUARD_AUDIT": f"audit-{name}.jsonl",
    })  # fmt: skip
    with (cwd / f"server-{name}.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastmcp_guard.cli", "run", "server.py", "--port", str(port),
             *args],
            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(cwd: Path, name: str, proc: subprocess.Popen[bytes], url: str) -> Server:
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/_guard/rate", timeout=1)
        except urllib.error.HTTPError:
            return Server(cwd, proc, url)  # 401: up and guarded
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((cwd / f"server-{name}.log").read_text()) from None
            time.sleep(0.05)  # polling readiness: there is no event to wait on


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Any]:
    """Nodes A and B: one key store (SQLite in one directory), one Redis, 4 calls/hour per key."""
    cwd = tmp_path_factory.mktemp("fleet")
    shutil.copy(HERE.parent / "cli" / "plain_server.py", cwd / "server.py")
    launched = [(name, *launch(cwd, name, redis_server.url, "--rate", "4/hour"))
                for name in ("a", "b")]  # fmt: skip
    servers = [wait_ready(cwd, name, proc, url) for name, proc, url in launched]
    yield servers
    for server in servers:
        stop_server(server)


def refused(result: Any) -> bool:
    return bool(result.is_error) and "rate limit exceeded" in result.content[0].text.lower()


async def test_two_guarded_servers_share_one_limit(fleet: list[Server]) -> None:
    a, b = fleet
    key = create(a.cwd, "--name", "alice")
    for node in (a, b, a, b):
        result = await call(node, key["token"])
        assert not result.is_error and result.data == "hi"
    assert refused(await call(a, key["token"]))
    assert refused(await call(b, key["token"]))
    banner = (a.cwd / "server-a.log").read_text()
    assert "rate limits: redis://127.0.0.1:" in banner


async def test_rate_status_and_reset_through_either_node(fleet: list[Server]) -> None:
    a, b = fleet
    key = create(a.cwd, "--name", "bob")
    for _ in range(3):
        assert not (await call(a, key["token"])).is_error
    status = json.loads(
        ok(a.cwd, "rate", "status", key["id"], "--json", env={"FASTMCP_GUARD_URL": b.url}).stdout
    )
    (entry,) = status["keys"]
    assert (entry["name"], entry["per_key"]["used"], entry["per_key"]["limit"]) == ("bob", 3, 4)
    listed = json.loads(
        ok(a.cwd, "rate", "status", "--json", env={"FASTMCP_GUARD_URL": a.url}).stdout
    )
    assert key["id"] in [k["key"] for k in listed["keys"]]
    assert not (await call(b, key["token"])).is_error
    assert refused(await call(a, key["token"]))
    reset = ok(a.cwd, "rate", "reset", key["id"], "--json", env={"FASTMCP_GUARD_URL": b.url})
    assert json.loads(reset.stdout) == {"reset": key["id"], "was_tracked": True}
    assert not (await call(a, key["token"])).is_error, "reset through B holds on A"
