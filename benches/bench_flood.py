"""Floods of failed verifications (issue 10, findings 5, 6, 8, 9): memory, CPU, hash runs.

    .venv/bin/python benches/bench_flood.py                       # about 10 minutes
    .venv/bin/python benches/bench_flood.py --sections flood --duration 10
    .venv/bin/python benches/bench_flood.py --sections rss --rss-verifications 2000

Section ``rss`` (finding 5): in a fresh process, one real key and ``--rss-threads`` (50)
threads calling ``KeyManager.verify`` with wrong secrets for its (real) key id,
``--rss-verifications`` (10,000) in all, each from its own client address so that no
throttle stops them (and, for this build, with the key and server budgets off): argon2id
really runs every time. VmRSS (``/proc/self/status``) is read before the key is created and
after the last verification. The bound is ``start + pool size x m_cost + 50 MB`` (pool
size: ``max_concurrent_verifications``, the CPU count; m_cost: 19 MiB, the default). The
same workload runs on the baseline: the extension built from commit ``--baseline-ref``
(today's ``main`` before this change: argon2 ran in whichever thread called verify),
built once (release) into ``.cache/bench-baseline/<commit>`` as ``bench_fleet_keys.py``
does, or taken from ``--baseline-path`` (a directory holding a built ``fastmcp_guard``).

Section ``flood`` (findings 6, 8, 9), over real HTTP: a FastMCP server with ``Guard`` (a
SQLite key store, ``--cache-ttl`` 5 s so that cached tokens are refreshed during the
flood, a JSONL audit log) runs in its own process on 127.0.0.1 (this file with
``--serve``), a fresh one per row. Attackers are asyncio tasks in this process, each with
its own HTTP client bound to a source address on the loopback network (127.0.0.2 ...
127.0.0.101: Linux routes all of 127/8 to ``lo``; the server sees them as the TCP peer,
uvicorn's proxy headers are off) posting MCP ``initialize`` as fast as they can:

(0) no flood (the same measurements alone, for comparison);
(a) wrong secrets for the victim's key id from one address (20 connections);
(b) wrong secrets for the victim's key id from ``--addresses`` (100) addresses;
(c) tokens naming made-up key ids (a new random id each request) from those addresses;
(d) wrong secrets for 60 other key ids from one address (20 connections): the server's
    budget of failed runs (600 a minute) is spent within seconds (probe finding 2);
(e) made-up key ids from the legitimate client's own address, 127.0.0.1 (20
    connections): a NAT or an office proxy shared with the attacker (probe finding 3).

The legitimate client is a real ``fastmcp.Client`` from 127.0.0.1 holding the *victim's*
token, calling a tool every 50 ms. It starts ``--legit-delay`` (5 s; in (d) at least 15 s,
once the server's budget is spent) into the flood, so its first call is a brand-new token
of a key under attack (past the key's budget in (b), past the server's in (d), from an
address past its unknown-id budget in (e)), and then keeps going: with the 5 s cache TTL
each refresh re-reads the record, which for a proven token costs no argon2 and passes
every budget. Per row: requests the attackers
made and the statuses they got, argon2 runs and store reads (the server's counters),
server CPU over the flood (utime + stime of the server process, % of one core), server
RSS at the start and end of the flood, and the legitimate client's calls, success rate and
p50 / p99 latency. Target: (b) costs at most 2 x the per-key budget (100) in argon2 runs,
and the legitimate client keeps 100% success in every row.

The attackers share the machine's CPUs with the server: their load is part of what the
server competes with, as it would be on a small host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))  # the tests' token helpers

from _baseline import baseline_package

from tests.integration.test_http_more import with_checksum
from tests.security._tokens import wrong_secret

M_COST_BYTES = 19_456 * 1024  # the default argon2id memory cost
KEY_BUDGET = 100  # the default failures per key id and minute
GLOBAL_BUDGET = 600  # the default failed runs per server and minute
BASELINE_REF = "63d67ff"  # main before issue 10: argon2 in the caller's thread
BASE62 = string.digits + string.ascii_letters
INIT = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {},
               "clientInfo": {"name": "flood", "version": "0"}},
}  # fmt: skip
HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


# ---------------------------------------------------------------------------------------
# tokens an attacker can make (and wrong_secret, from the security tests)
# ---------------------------------------------------------------------------------------


def unknown_id_token(rng: random.Random) -> str:
    """A well-formed token naming a random key id (no store has it)."""
    kid = "".join(rng.choice(BASE62) for _ in range(16))
    return with_checksum(f"fmg_sk_{kid}_" + "B" * 43)


# ---------------------------------------------------------------------------------------
# process figures
# ---------------------------------------------------------------------------------------


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


# ---------------------------------------------------------------------------------------
# section rss
# ---------------------------------------------------------------------------------------


def rss_worker(total: int, threads: int) -> int:
    """The rss workload in this (fresh) process; prints one JSON line."""
    import fastmcp_guard._core as core

    kwargs: dict[str, Any] = {}
    if hasattr(core, "VerifyLimits"):  # this build: the key and server budgets off
        kwargs["limits"] = core.VerifyLimits(key_failure_budget=0, global_failure_budget=0,
                                             verify_wait_seconds=60)  # fmt: skip
    manager = core.KeyManager.memory(**kwargs)
    start = rss_bytes()
    _, token = manager.create("victim")
    per = total // threads
    reasons: Counter[str] = Counter()
    lock = threading.Lock()

    def attacker(t: int) -> None:
        mine: Counter[str] = Counter()
        for i in range(per):
            n = t * per + i
            try:
                manager.verify(wrong_secret(token, n), f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
                mine["admitted"] += 1
            except core.VerifyError as exc:
                mine[exc.reason] += 1
        with lock:
            reasons.update(mine)

    began = time.monotonic()
    workers = [threading.Thread(target=attacker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stats = manager.stats()
    print(json.dumps({
        "start": start, "end": rss_bytes(), "reasons": dict(reasons), "seconds": time.monotonic() - began,
        "argon2_runs": stats["argon2_runs"],
        # The baseline's hashing slots: max_concurrent_verifications, the CPU count.
        "pool": stats.get("hash_threads", os.cpu_count()),
        "hash_memory": stats.get("hash_memory_bytes"), "core": core.__file__,
    }))  # fmt: skip
    manager.close()
    return 0


def run_rss(label: str, package: Path | None, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ)
    if package is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(package), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, __file__, "--rss-worker", str(args.rss_verifications), str(args.rss_threads)],
        capture_output=True, text=True, env=env, cwd=ROOT, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"rss worker ({label}) failed:\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["label"] = label
    return result


def section_rss(args: argparse.Namespace) -> list[list[str]]:
    from bench_guard import section, table

    section(f"(rss) RSS after {args.rss_verifications:,} failed verifications from "
            f"{args.rss_threads} threads (default argon2id cost, real key id, wrong secrets)")  # fmt: skip
    variants: list[tuple[str, Path | None]] = [("this build: fixed hashing pool", None)]
    if not args.no_baseline:
        base = Path(args.baseline_path) if args.baseline_path else baseline_package(args.baseline_ref)
        variants.append((f"baseline {args.baseline_ref}: argon2 in the calling thread", base))
    rows, summary = [], []
    for label, package in variants:
        r = run_rss(label, package, args)
        bound = r["start"] + r["pool"] * M_COST_BYTES + 50 * 2**20
        ok = r["end"] <= bound
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(r["reasons"].items()))
        rows.append([label, f"{r['argon2_runs']:,}", reasons, f"{r['seconds']:.0f} s",
                     mb(r["start"]), mb(r["end"]), f"+{mb(r['end'] - r['start'])}",
                     f"{mb(bound)} ({r['pool']} x 19 MiB + 50 MB)",
                     "within" if ok else "ABOVE"])  # fmt: skip
        if package is None:
            summary.append(["(rss) RSS after the flood <= start + pool x m_cost + 50 MB",
                            mb(bound), mb(r["end"]), "met" if ok else "NOT met"])  # fmt: skip
    table(["variant", "argon2 runs", "refusals", "time", "RSS before", "RSS after", "growth",
           "bound", "verdict"], rows, "lrlrrrrll")  # fmt: skip
    print("RSS before: after the manager is made, before the key is created (its hash runs on")
    print("the pool too). argon2 runs: verifications that really hashed (a 'busy' one did not).")
    return summary


# ---------------------------------------------------------------------------------------
# section flood: the server (this file with --serve)
# ---------------------------------------------------------------------------------------


def serve(directory: Path, port: int, cache_ttl: float, decoys: int) -> int:
    from fastmcp import FastMCP
    from fastmcp_guard import AuditLog, FileBackend, Guard, IPPolicy, KeyStore, RateLimit

    mcp: FastMCP[Any] = FastMCP("flood")

    @mcp.tool
    def echo(text: str) -> str:
        return text

    store = KeyStore(backend="sqlite", path=directory / "keys.db", cache_ttl_seconds=cache_ttl)
    guard = Guard(mcp, keys=store, rate_limit=RateLimit(), ip=IPPolicy(),
                  audit=AuditLog(backend=FileBackend(directory / "audit.jsonl")))  # fmt: skip
    victim = guard.keys.create(name="victim")
    others = [str(guard.keys.create(name=f"decoy {i}").token) for i in range(decoys)]
    (directory / "tokens.json").write_text(json.dumps({"victim": victim.token, "decoys": others}))

    def on_term(signum: int, frame: Any) -> None:
        stats = dict(guard.keys.core.stats())
        print("GUARD_STATS " + json.dumps(stats), file=sys.stderr, flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    mcp.run(transport="http", host="127.0.0.1", port=port, show_banner=False,
            log_level="warning", uvicorn_config={"access_log": False, "proxy_headers": False})  # fmt: skip
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    directory: Path
    cache_ttl: float
    decoys: int = 0
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def start(self) -> dict[str, Any]:
        """Starts the server; its tokens: ``victim`` and the ``decoys``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(self.directory), "--port", str(self.port),
             "--cache-ttl", str(self.cache_ttl), "--decoys", str(self.decoys)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=self.directory,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited:\n{self.proc.stderr.read() if self.proc.stderr else ''}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("server did not listen") from None
                time.sleep(0.05)
        tokens: dict[str, Any] = json.loads((self.directory / "tokens.json").read_text())
        return tokens

    def stop(self) -> dict[str, Any]:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        for line in err.splitlines():
            if line.startswith("GUARD_STATS "):
                stats: dict[str, Any] = json.loads(line.split(" ", 1)[1])
                return stats
        raise SystemExit(f"no stats from the server:\n{err}")


# ---------------------------------------------------------------------------------------
# section flood: attackers and the legitimate client
# ---------------------------------------------------------------------------------------


async def attacker(url: str, source: str, tokens: Any, until: float, statuses: Counter[int]) -> None:
    import httpx2

    transport = httpx2.AsyncHTTPTransport(local_address=source)
    async with httpx2.AsyncClient(transport=transport, timeout=30) as client:
        while time.monotonic() < until:
            try:
                resp = await client.post(url, json=INIT,
                                         headers={**HEADERS, "authorization": f"Bearer {next(tokens)}"})  # fmt: skip
                statuses[resp.status_code] += 1
            except Exception:  # noqa: BLE001 - counted as a failed request
                statuses[0] += 1


async def legit(url: str, token: str, start: float, until: float, out: list[tuple[bool, float]]) -> None:
    from fastmcp import Client

    await asyncio.sleep(max(0.0, start - time.monotonic()))
    while time.monotonic() < until:
        t = time.perf_counter()
        try:
            async with Client(url, auth=token) as client:
                while time.monotonic() < until:
                    t = time.perf_counter()
                    result = await client.call_tool("echo", {"text": "hello"})
                    out.append((result.data == "hello", time.perf_counter() - t))
                    await asyncio.sleep(0.05)
        except Exception:  # noqa: BLE001 - a refused call: counted, then a new session
            out.append((False, time.perf_counter() - t))
            await asyncio.sleep(0.05)


@dataclass
class Row:
    label: str
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    stats: dict[str, Any] = field(default_factory=dict)
    cpu_pct: float = 0.0
    rss_start: int = 0
    rss_end: int = 0
    calls: list[tuple[bool, float]] = field(default_factory=list)


async def flood(kind: str, server: Server, issued: dict[str, Any], args: argparse.Namespace) -> Row:
    assert server.proc is not None
    pid = server.proc.pid
    rng = random.Random(7)
    counter = iter(range(10**9))
    token = str(issued["victim"])
    decoys = [str(t) for t in issued["decoys"]]

    def wrong() -> Any:
        while True:
            yield wrong_secret(token, next(counter))

    def wrong_decoys() -> Any:
        # 10 wrong secrets per key id (its per-address budget), key after key.
        while True:
            n = next(counter)
            yield wrong_secret(decoys[n // 10 % len(decoys)], n)

    def unknown() -> Any:
        while True:
            yield unknown_id_token(rng)

    sources = {"a": ["127.0.0.2"] * 20,
               "b": [f"127.0.0.{2 + i}" for i in range(args.addresses)],
               "c": [f"127.0.0.{2 + i}" for i in range(args.addresses)],
               "d": ["127.0.0.2"] * 20,
               "e": ["127.0.0.1"] * 20}.get(kind, [])  # fmt: skip
    tokens = {"c": unknown, "d": wrong_decoys, "e": unknown}.get(kind, wrong)()
    legit_delay = max(args.legit_delay, 15.0) if kind == "d" else args.legit_delay
    row = Row(kind)
    start = time.monotonic()
    until = start + args.duration
    cpu0, row.rss_start = cpu_seconds(pid), rss_bytes(pid)
    await asyncio.gather(
        legit(server.url, token, start + legit_delay, until, row.calls),
        *(attacker(server.url, s, tokens, until, row.statuses) for s in sources),
    )
    row.cpu_pct = 100 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - start)
    row.rss_end = rss_bytes(pid)
    row.requests = sum(row.statuses.values())
    return row


def section_flood(args: argparse.Namespace, tmp: Path) -> list[list[str]]:
    from bench_guard import pct, section, table

    section(f"(flood) {args.duration:.0f} s floods over HTTP, a legitimate client beside them "
            f"(server: Guard, SQLite store, cache TTL {args.cache_ttl:g} s, JSONL audit)")  # fmt: skip
    labels = {"0": "(0) no flood",
              "a": "(a) wrong secrets, 1 address",
              "b": f"(b) wrong secrets, {args.addresses} addresses",
              "c": f"(c) unknown key ids, {args.addresses} addresses",
              "d": "(d) wrong secrets, 60 key ids, 1 address",
              "e": "(e) unknown key ids, the client's own address"}  # fmt: skip
    rows: list[Row] = []
    for kind in args.rows:
        server = Server(tmp / f"server-{kind}", args.cache_ttl, decoys=60 if kind == "d" else 0)
        issued = server.start()
        try:
            row = asyncio.run(flood(kind, server, issued, args))
        finally:
            stats = server.stop()
        row.stats, row.label = stats, labels[kind]
        rows.append(row)
    out, summary = [], []
    for r in rows:
        lat = [t * 1e3 for ok, t in r.calls if ok]
        good = sum(1 for ok, _ in r.calls if ok)
        success = 100.0 * good / len(r.calls) if r.calls else 0.0
        statuses = ", ".join(f"{code or 'error'}: {n:,}" for code, n in sorted(r.statuses.items()))
        out.append([r.label, f"{r.requests:,}", statuses or "-",
                    f"{r.stats['argon2_runs']:,}", f"{r.stats['store_reads']:,}",
                    f"{r.stats['throttled']:,}", f"{r.cpu_pct:.0f}%",
                    f"{mb(r.rss_start)} -> {mb(r.rss_end)}", f"{len(r.calls):,}",
                    f"{success:.1f}%",
                    f"{pct(lat, 50):.1f} ms" if lat else "-",
                    f"{pct(lat, 99):.1f} ms" if lat else "-"])  # fmt: skip
        summary.append([f"{r.label}: legitimate client success", "100%", f"{success:.1f}%",
                        "met" if r.calls and good == len(r.calls) else "NOT met"])  # fmt: skip
        if r.label.startswith("(b)"):
            runs = r.stats["argon2_runs"] - 1  # the legitimate token's first use
            summary.append([f"{r.label}: argon2 runs (attack)", f"<= {2 * KEY_BUDGET}",
                            f"{runs:,}", "met" if runs <= 2 * KEY_BUDGET else "NOT met"])  # fmt: skip
        if r.label.startswith("(d)"):
            runs = r.stats["argon2_runs"] - 1
            bound = 2 * GLOBAL_BUDGET * max(1, int(-(-args.duration // 60)))
            summary.append([f"{r.label}: argon2 runs (attack)", f"<= {bound:,}",
                            f"{runs:,}", "met" if runs <= bound else "NOT met"])  # fmt: skip
    table(["row", "attack requests", "statuses", "argon2 runs", "store reads", "throttled",
           "server CPU", "server RSS (flood start -> end)", "legit calls", "legit success",
           "legit p50", "legit p99"], out, "lrlrrrrlrrrr")  # fmt: skip
    print("argon2 runs and store reads include the legitimate client's (its token's first use")
    print("hashes once; each cache refresh reads the record). Server CPU: % of one core over")
    print("the flood. statuses: what the attackers got (401: a verdict on the token; 429:")
    print("throttled before hashing, with Retry-After). The attackers run on the same cores.")
    return summary


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sections", default="rss,flood", help="rss, flood or both (default)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per flood row")
    parser.add_argument("--rows", default="0abcde", help="flood rows to run (default 0abcde)")
    parser.add_argument("--addresses", type=int, default=100, help="source addresses in (b), (c)")
    parser.add_argument("--legit-delay", type=float, default=5.0,
                        help="seconds into the flood of the legitimate client's first call")  # fmt: skip
    parser.add_argument("--cache-ttl", type=float, default=5.0, help="the server's cache TTL")
    parser.add_argument("--rss-verifications", type=int, default=10_000)
    parser.add_argument("--rss-threads", type=int, default=50)
    parser.add_argument("--baseline-ref", default=BASELINE_REF,
                        help="commit of the rss baseline (built once into .cache/bench-baseline)")  # fmt: skip
    parser.add_argument("--baseline-path", help="a directory holding a built baseline fastmcp_guard")
    parser.add_argument("--no-baseline", action="store_true", help="skip the rss baseline")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--decoys", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--rss-worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        return serve(args.serve, args.port, args.cache_ttl, args.decoys)
    if args.rss_worker is not None:
        return rss_worker(*args.rss_worker)

    import fastmcp_guard._core as core
    from bench_guard import cpu_model, loadavg, section, so_build, table

    print("fastmcp-guard flood benchmarks -- benches/bench_flood.py")
    print(f"machine : {cpu_model()} x{os.cpu_count()} | {os.uname().sysname} {os.uname().release}")
    print(f"guard   : {core.__file__} ({so_build(core.__file__)})")
    print(f"load    : {loadavg()}")
    began = time.monotonic()
    summary: list[list[str]] = []
    tmp = Path(tempfile.mkdtemp(prefix="fmg-flood-"))
    try:
        if "rss" in args.sections:
            summary += section_rss(args)
        if "flood" in args.sections:
            summary += section_flood(args, tmp)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    section("Summary: targets")
    table(["figure", "target", "measured", "verdict"], summary, "llrl")
    print(f"\ntotal run time {time.monotonic() - began:.0f} s; load average at the end {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
