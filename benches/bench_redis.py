"""The Redis rate limiter (issue 5) beside its baselines: same Redis server, same run.

    .venv/bin/python benches/bench_redis.py           # about 1 minute
    .venv/bin/python benches/bench_redis.py --quick   # about 20 s

Set-up: it starts its own ``redis-server`` (free loopback port, temporary directory, no
persistence; ``scripts/test.sh`` installs the Debian package) and installs the ``limits``
library into the running environment when it is missing (a baseline, not a dependency).

Every variant has the same limits: per key and global, both 10^9/minute so every call is
admitted and the numbers measure the limiter, not refusals. Variants:

- ``in-process``: ``RateLimit(...)`` (the Rust core), as the middleware calls it;
- ``ours (Redis)``: ``RateLimit(..., backend="redis")``, ``await acquire()``;
- ``limits moving``: ``limits.aio`` ``MovingWindowRateLimiter`` on ``RedisStorage``
  (redis-py, the same client library as ours), one ``hit`` per limit (per key, then global);
- ``limits fixed``: the same with ``FixedWindowRateLimiter``.

(limits checks each limit separately: a call refused by the global limit has already
consumed from the per-key one; ours checks both atomically and consumes nothing.)

Tables:

(1) Redis commands each call sends (``MONITOR``; commands a script runs inside Redis are
    not counted): ours must be exactly 1, one ``EVALSHA``, so one round trip;
(2) latency of one call, one caller at a time: p50 / p99, and ours' added p50 over the
    in-process limiter, at the limiter and end to end through FastMCP (a tool call on an
    in-memory ``Client`` of a guarded server, memory vs Redis limiter);
(3) throughput with C concurrent callers (asyncio tasks) in one process: calls/s, and
    ours against each ``limits`` strategy (the goal: at least 2x).

Every figure is a median over interleaved rounds (A B C D A B C D ...).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fastmcp_guard._core as core
from bench_guard import cpu_model, loadavg, med, pct, section, so_build, table, ver, verdict
from fastmcp_guard import RateLimit

HIGH = "1000000000/minute"
KEYS = [f"fmg_key_{i:04d}" for i in range(100)]


# ---------------------------------------------------------------------------------------
# set-up
# ---------------------------------------------------------------------------------------


def ensure_limits() -> Any:
    """Import ``limits``, installing it into this environment first if needed."""
    try:
        return importlib.import_module("limits")
    except ImportError:
        print("bench set-up: pip install limits (the baseline; not a fastmcp-guard dependency)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "limits"], check=True)
        return importlib.import_module("limits")


class RedisServer:
    """A throw-away redis-server on a free loopback port."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("redis-server not found: apt-get install redis-server (scripts/test.sh does)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir), "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("redis-server did not start")
            time.sleep(0.01)
        self.version = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                      check=False).stdout.split()[2].removeprefix("v=")  # fmt: skip

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------
# the variants: each an async "one call for key k"
# ---------------------------------------------------------------------------------------

Call = Callable[[str], Awaitable[Any]]


def variants(url: str) -> tuple[dict[str, Call], list[Callable[[], Awaitable[None]]]]:
    limits = ensure_limits()
    from limits.aio.storage import RedisStorage
    from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

    memory = RateLimit(HIGH, HIGH)
    ours = RateLimit(HIGH, HIGH, backend="redis", url=url, key_prefix="bench:")
    item = limits.parse(HIGH)
    moving = MovingWindowRateLimiter(
        RedisStorage("async+" + url, implementation="redispy", key_prefix="LIMITS-MW")
    )
    fixed = FixedWindowRateLimiter(
        RedisStorage("async+" + url, implementation="redispy", key_prefix="LIMITS-FW")
    )

    async def in_process(key: str) -> Any:
        return memory.core.check(key, None)  # what the middleware does in process

    async def redis_ours(key: str) -> Any:
        return await ours.acquire(key)

    async def limits_moving(key: str) -> bool:
        return await moving.hit(item, "key", key) and await moving.hit(item, "global")

    async def limits_fixed(key: str) -> bool:
        return await fixed.hit(item, "key", key) and await fixed.hit(item, "global")

    cases: dict[str, Call] = {"in-process": in_process, "ours (Redis)": redis_ours,
             "limits moving": limits_moving, "limits fixed": limits_fixed}  # fmt: skip
    return cases, [ours.aclose]


async def commands_per_call(
    url: str, cases: dict[str, Call], n: int
) -> dict[str, tuple[float, list[str]]]:
    """Client commands per call and their names, seen by MONITOR (script-internal excluded)."""
    import redis

    out: dict[str, tuple[float, list[str]]] = {}
    for name, fn in cases.items():
        if name == "in-process":
            continue
        for key in KEYS[:5]:
            await fn(key)  # connections open, scripts loaded
        client, marker = redis.Redis.from_url(url), redis.Redis.from_url(url)
        marker.ping()
        seen: list[str] = []
        with client.monitor() as monitor:  # type: ignore[no-untyped-call]
            for i in range(n):
                await fn(KEYS[i % len(KEYS)])
            marker.echo("bench-end")
            for event in monitor.listen():
                if event["command"] == "ECHO bench-end":
                    break
                if event["client_type"] != "lua":
                    seen.append(event["command"].split(" ", 1)[0].upper())
        client.close()
        marker.close()
        out[name] = (len(seen) / n, sorted(set(seen)))
    return out


async def latency(fn: Call, n: int) -> list[float]:
    """Per-call latency in ns, one caller."""
    samples: list[float] = []
    clock = time.perf_counter_ns
    for i in range(n):
        key = KEYS[i % len(KEYS)]
        t = clock()
        await fn(key)
        samples.append(clock() - t)
    return samples


async def throughput(fn: Call, concurrency: int, per_task: int) -> float:
    """Calls per second with ``concurrency`` tasks each making ``per_task`` calls."""

    async def worker(w: int) -> None:
        for i in range(per_task):
            await fn(KEYS[(w * 7 + i) % len(KEYS)])

    t = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return concurrency * per_task / (time.perf_counter() - t)


def guarded_servers(url: str) -> dict[str, Any]:
    """Two guarded FastMCP servers, same tool, in-process vs Redis limiter."""
    from fastmcp import FastMCP
    from fastmcp_guard import Guard, KeyStore

    servers = {}
    for name, limit in (
        ("in-process", RateLimit(HIGH, HIGH)),
        ("ours (Redis)", RateLimit(HIGH, HIGH, backend="redis", url=url, key_prefix="bench-e2e:")),
    ):
        mcp: Any = FastMCP("bench")

        @mcp.tool  # type: ignore[untyped-decorator]
        def echo(text: str) -> str:
            return text

        Guard(mcp, keys=KeyStore(backend="memory"), rate_limit=limit)
        servers[name] = mcp
    return servers


async def e2e_latency(mcp: Any, n: int) -> list[float]:
    from fastmcp import Client

    async with Client(mcp) as client:
        for _ in range(20):
            await client.call_tool("echo", {"text": "x"})
        samples: list[float] = []
        clock = time.perf_counter_ns
        for _ in range(n):
            t = clock()
            await client.call_tool("echo", {"text": "x"})
            samples.append(clock() - t)
    return samples


def us(ns: float) -> str:
    return f"{ns / 1e3:,.1f} us"


async def run(args: argparse.Namespace, url: str) -> None:
    cases, closers = variants(url)

    section("(1) Redis commands sent per call (MONITOR; script-internal commands excluded)")
    counted = await commands_per_call(url, cases, args.monitor_calls)
    rows = []
    for name in cases:
        if name == "in-process":
            rows.append([name, "0", "-", "-"])
            continue
        per, kinds = counted[name][0], ", ".join(counted[name][1])
        rows.append([name, f"{per:.2f}", kinds, "1 round trip" if name.startswith("ours") else
                     "one per command (not pipelined)"])  # fmt: skip
    table(["variant", "commands / call", "commands", "round trips / call"], rows, "lrll")
    ours_per = counted["ours (Redis)"][0]
    print(f"ours: exactly 1 command (EVALSHA) per call: {verdict(ours_per == 1.0)}")

    section(f"(2) latency per call, one caller ({args.rounds} rounds x {args.calls} calls, "
            "interleaved)")  # fmt: skip
    lat: dict[str, list[list[float]]] = {k: [] for k in cases}
    servers = guarded_servers(url)
    e2e: dict[str, list[list[float]]] = {k: [] for k in servers}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            gc.collect()
            lat[name].append(await latency(fn, args.calls))
        for name, mcp in servers.items():
            gc.collect()
            e2e[name].append(await e2e_latency(mcp, args.e2e_calls))
    p50 = {k: med([pct(r, 50) for r in v]) for k, v in lat.items()}
    p99 = {k: med([pct(r, 99) for r in v]) for k, v in lat.items()}
    rows = [[name, us(p50[name]), us(p99[name]), f"+{us(p50[name] - p50['in-process'])}"]
            for name in cases]  # fmt: skip
    table(["limiter call", "p50", "p99", "added p50 vs in-process"], rows)
    print()
    e50 = {k: med([pct(r, 50) for r in v]) for k, v in e2e.items()}
    e99 = {k: med([pct(r, 99) for r in v]) for k, v in e2e.items()}
    rows = [[f"guarded tool call, {name} limiter", us(e50[name]), us(e99[name]),
             f"+{us(e50[name] - e50['in-process'])}"] for name in servers]  # fmt: skip
    table(["FastMCP in-memory Client", "p50", "p99", "added p50 vs in-process"], rows)

    section(f"(3) throughput, {args.concurrency} concurrent callers in one process "
            f"({args.rounds} rounds, interleaved)")  # fmt: skip
    tput: dict[str, list[float]] = {k: [] for k in cases if k != "in-process"}
    for _ in range(args.rounds):
        for name, samples in tput.items():
            gc.collect()
            samples.append(await throughput(cases[name], args.concurrency, args.per_task))
    t = {k: med(v) for k, v in tput.items()}
    ours_t = t["ours (Redis)"]
    rows = [[name, f"{v:,.0f}", f"{ours_t / v:.2f}x" if name != "ours (Redis)" else "-"]
            for name, v in t.items()]  # fmt: skip
    table(["variant", "calls/s (median)", "ours / this"], rows)
    for name in ("limits moving", "limits fixed"):
        print(f"ours >= 2x {name}: {ours_t / t[name]:.2f}x, {verdict(ours_t >= 2 * t[name])}")
    for close in closers:
        await close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000, help="latency calls per round")
    parser.add_argument("--e2e-calls", type=int, default=500, help="tool calls per round")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--per-task", type=int, default=150, help="calls per concurrent caller")
    parser.add_argument("--monitor-calls", type=int, default=200)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.calls, args.e2e_calls, args.per_task = 3, 500, 200, 50

    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        server = RedisServer(Path(tmp))
        try:
            print("fastmcp-guard Redis limiter benchmark")
            print(f"  machine: {cpu_model()}, {os.cpu_count()} cores, load {loadavg()}")
            print(f"  redis-server {server.version} on 127.0.0.1:{server.port}; redis-py "
                  f"{ver('redis')}; limits {ver('limits')}; fastmcp {ver('fastmcp')}")  # fmt: skip
            print(f"  extension: {so_build(core.__file__)}; python {sys.version.split()[0]}")
            print(f"  limits per key and global: {HIGH} each (every call admitted)")
            asyncio.run(run(args, server.url))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
