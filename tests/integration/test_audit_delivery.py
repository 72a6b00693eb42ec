"""Delivery guarantees of the audit log, with real processes: a `fastmcp-guard run` server
under load from several clients is stopped with SIGTERM (nothing may be lost) or killed
with SIGKILL (only the last flush interval may be lost, and every earlier line parses).

Every call carries a unique id in its arguments, so the log is compared call by call with
what the clients saw. No assertion depends on speed: the kill -9 bound is computed from
client-side timestamps, with a generous margin for a loaded machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastmcp_guard._core import AuditWriter, audit_verify

from tests.cli.test_cli_keys import create
from tests.cli.test_cli_run import Server, start_server
from tests.conftest import http_client

pytestmark = [pytest.mark.http, pytest.mark.slow]

#: The default flush interval, and the slack allowed on top of it for a loaded machine
#: (the writer thread competes with the server and the clients for two cores).
FLUSH_INTERVAL = 0.100
SLACK = 1.0
CLIENTS = 6


@dataclass
class Load:
    """What the clients did: call id -> monotonic time its answer arrived."""

    answered: dict[str, float] = field(default_factory=dict)
    sent: set[str] = field(default_factory=set)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def client_loop(server: Server, token: str, n: int, load: Load) -> None:
    i = 0
    try:
        async with http_client(server.mcp_url, token) as client:
            while not load.stop.is_set():
                call_id = f"c{n}-{i}"
                i += 1
                load.sent.add(call_id)
                result = await client.call_tool("echo", {"text": call_id}, raise_on_error=False)
                if not result.is_error and result.data == call_id:
                    load.answered[call_id] = time.monotonic()
    except Exception:  # noqa: BLE001 - the server went away under us: that is the test
        return


async def run_load(server: Server, token: str, until: Any) -> Load:
    """Clients call in a loop; ``until(load)`` (a coroutine) stops the server meanwhile."""
    load = Load()
    tasks = [asyncio.create_task(client_loop(server, token, n, load)) for n in range(CLIENTS)]
    await until(load)
    load.stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    return load


async def warm(load: Load, count: int, then: float = 2.0) -> None:
    """Wait until the clients have had ``count`` answers (the server is really loaded),
    then keep the load on for ``then`` seconds."""
    deadline = time.monotonic() + 30
    while len(load.answered) < count:
        assert time.monotonic() < deadline, f"only {len(load.answered)} answers in 30 s"
        await asyncio.sleep(0.05)
    await asyncio.sleep(then)


def logged_calls(path: Path, *, allow_torn_last: bool = False) -> tuple[list[str], list[str]]:
    """(ids of echo calls in the log, every raw line); each line must parse, except
    possibly the very last when ``allow_torn_last``."""
    raw = path.read_text(encoding="utf-8").split("\n")
    assert raw[-1] == "" or allow_torn_last, f"the log ends mid-line: {raw[-1][:80]!r}"
    complete = raw[:-1]
    ids = []
    for n, line in enumerate(complete, 1):
        event = json.loads(line)  # raises on a damaged line: the test fails
        if event["tool"] == "echo":
            assert event["status"] == "ok", event
            ids.append(event["input_args"]["text"])
    return ids, complete


@pytest.mark.timeout(120)
async def test_sigterm_under_load_loses_no_event(tmp_path: Path) -> None:
    key = create(tmp_path, "--name", "loader", "--scopes", "read:data")
    server = start_server(tmp_path)

    async def stop(load: Load) -> None:
        await warm(load, 200)
        server.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(server.proc.wait, 30) == 0

    load = await run_load(server, key["token"], stop)
    ids, _ = logged_calls(tmp_path / "fastmcp-guard-audit.jsonl")
    assert len(ids) == len(set(ids)), "an event was written twice"
    missing = set(load.answered) - set(ids)
    assert not missing, f"{len(missing)} answered calls are not in the log: {sorted(missing)[:5]}"
    assert set(ids) <= load.sent, "the log holds a call no client made"
    assert len(load.answered) >= 200
    report = audit_verify(str(tmp_path / "fastmcp-guard-audit.jsonl"))
    assert report["ok"], report  # one chain: the CLI's `created` event and the server's


@pytest.mark.timeout(120)
async def test_kill_9_under_load_loses_at_most_the_last_flush_interval(tmp_path: Path) -> None:
    key = create(tmp_path, "--name", "loader", "--scopes", "read:data")
    server = start_server(tmp_path)
    killed_at = 0.0

    async def kill(load: Load) -> None:
        nonlocal killed_at
        await warm(load, 200)
        killed_at = time.monotonic()
        os.kill(server.proc.pid, signal.SIGKILL)
        await asyncio.to_thread(server.proc.wait, 30)

    load = await run_load(server, key["token"], kill)
    path = tmp_path / "fastmcp-guard-audit.jsonl"
    ids, lines = logged_calls(path, allow_torn_last=True)
    assert len(ids) == len(set(ids))
    assert set(ids) <= load.sent
    # An answered call may be missing only if its event was enqueued in the last flush
    # interval before the kill: the event is enqueued before the answer is sent, so its
    # answer came at most FLUSH_INTERVAL (+ slack) before the kill, or after it.
    missing = set(load.answered) - set(ids)
    too_old = {c for c in missing if load.answered[c] < killed_at - FLUSH_INTERVAL - SLACK}
    assert not too_old, (
        f"{len(too_old)} calls answered more than {FLUSH_INTERVAL + SLACK:.1f} s before the "
        f"kill are not in the log (of {len(missing)} missing, {len(load.answered)} answered)"
    )
    recent = [c for c in load.answered if load.answered[c] >= killed_at - FLUSH_INTERVAL - SLACK]
    assert len(missing) <= len(recent)
    assert len(load.answered) - len(recent) >= 100, "the load ran long enough to check"
    # The next writer ends a torn last line and chains past it: the log verifies again.
    w = AuditWriter(str(path))
    w.log("ok", "k", "n", "after-restart", [], 1.0)
    w.close()
    report = audit_verify(str(path))
    assert report["ok"], report
    assert report["events"] == len(lines) + 1 - report["torn"] - report["unchained"]
