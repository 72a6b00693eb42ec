"""fastmcp-guard benchmarks, each beside its baseline, measured in the same run.

    .venv/bin/python benches/bench_guard.py            # full run (about 4 minutes)
    .venv/bin/python benches/bench_guard.py --quick    # smaller counts (about 1.5 minutes)

Sections (see benches/README.md for what each table means):

  (a) core operations called from Python, ns per call: ours (Rust core) against a
      pure-Python twin doing the job the way fastmcp-guard 0.2 did;
  (b) audit log sustained events/s to JSONL: Rust writer (benches/core.rs, run
      through `cargo bench`) and from Python, against 0.2's json.dumps + write;
  (c) in process (``fastmcp.Client(mcp)``), us per tool call: bare FastMCP, the
      guard, and FastMCP's own RateLimitingMiddleware + StructuredLoggingMiddleware;
  (d) end to end over loopback HTTP, one client: calls/s, p50/p99 latency and server
      CPU per call for bare FastMCP, FastMCP + StaticTokenVerifier, and the guard,
      each server a separate process, runs interleaved;
  (e) where the time goes: server-side profiles of the Static and guard servers.

Every figure is a median over interleaved rounds (A B C A B C ...); ratios are
computed from numbers measured in this run.

    .venv/bin/python benches/bench_guard.py --against 2466e5b --against-path DIR

times (a), (c) and (d) on this checkout and on the guard built from commit 2466e5b
(built once, release, into DIR), in the same run, and prints this/2466e5b ratios. The
old build runs in worker processes (this file with ``--worker``) and its own server
process: two ``fastmcp_guard._core`` extensions cannot share a process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.metadata as md
import json
import logging
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import import_module
from itertools import repeat
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _twins import AuditRecord, IPPolicy02, RateLimit02, append_record, token_02

try:
    import fastmcp_guard._core as core

    GUARD_IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - report and skip the guard rows
    core = None  # type: ignore[assignment]
    GUARD_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

IP_ALLOW = ["127.0.0.0/8", "10.0.0.0/8", "192.168.0.0/16"]
IP_DENY = ["10.99.0.0/16"]
IP_PROBE = "192.168.1.100"  # in the third allow network: the 0.2 twin scans all lists
HIGH = "1000000000/minute"
TYPICAL: dict[str, Any] = {
    "status": "ok",
    "key_id": "fmg_key_3kQxY7bT0pLm9ZaW",
    "key_name": "alice",
    "tool": "get_data",
    "scopes": ["read:data", "write:data"],
    "duration_ms": 0.412,
    "input_args": {"query": "x"},
    "output_preview": "Results for: x",
    "client_ip": "10.0.0.7",
    "metadata": {"team": "data"},
}

#: TYPICAL as the positional arguments of ``AuditWriter.log`` (error=None).
TYPICAL_LOG_ARGS = (
    TYPICAL["status"], TYPICAL["key_id"], TYPICAL["key_name"], TYPICAL["tool"],
    TYPICAL["scopes"], TYPICAL["duration_ms"], None, TYPICAL["input_args"],
    TYPICAL["output_preview"], TYPICAL["client_ip"], TYPICAL["metadata"],
)  # fmt: skip


def typical_record() -> AuditRecord:
    """A fresh 0.2 audit record with the TYPICAL fields (0.2 builds one per call)."""
    t = TYPICAL
    return AuditRecord(
        key_id=t["key_id"], key_name=t["key_name"], tool=t["tool"], scopes=t["scopes"],
        duration_ms=t["duration_ms"], status="ok", input_args=t["input_args"],
        output_preview=t["output_preview"], client_ip=t["client_ip"], metadata=t["metadata"],
    )  # fmt: skip


SUMMARY: list[tuple[str, str, str, str]] = []  # (figure, target, measured, verdict)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    k = max(0, min(len(s) - 1, round(p / 100.0 * (len(s) - 1))))
    return s[k]


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def table(headers: list[str], rows: list[list[str]], align: str | None = None) -> None:
    """Print a plain text table; ``align`` is one char per column, 'l' or 'r'."""
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        cells = [
            str(c).ljust(w) if a == "l" else str(c).rjust(w)
            for c, w, a in zip(row, widths, align, strict=True)
        ]
        return "  ".join(cells).rstrip()

    print(fmt(headers))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(fmt(r))


def section(title: str) -> None:
    print()
    print("=" * 100)
    print(title)
    print("=" * 100)


def ns_fmt(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:,.1f} ms"
    if ns >= 1e4:
        return f"{ns / 1e3:,.1f} us"
    return f"{ns:,.0f} ns"


def ver(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "-"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def rustc_version() -> str:
    try:
        return subprocess.run(
            ["rustc", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return "-"


def so_build(path: str) -> str:
    """'release' when the extension has no DWARF debug info (dev builds carry it)."""
    try:
        out = subprocess.run(
            ["readelf", "-S", "-W", path], capture_output=True, text=True, check=False
        ).stdout
    except OSError:
        return "build unknown"
    return "debug build: numbers not representative" if ".debug_info" in out else "release build"


def loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "-"


def interleave(cases: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run every case once per round, in order, ``rounds`` times; each returns a value."""
    out: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            gc.collect()
            out[name].append(fn())
    return out


def timed_loop(fn: Callable[..., Any], args: tuple[Any, ...], n: int) -> Callable[[], float]:
    """A case measuring ns per call of ``fn(*args)`` over ``n`` calls."""

    def run() -> float:
        t = time.perf_counter_ns()
        for _ in repeat(None, n):
            fn(*args)
        return (time.perf_counter_ns() - t) / n

    return run


# ---------------------------------------------------------------------------------------
# --against: the same timed code on another build, in worker processes
# ---------------------------------------------------------------------------------------

#: The (a) cases timed on both builds, in the order of the comparison table.
COMPARED_OPS = ("empty", "verify", "verifier", "verify_token", "rate", "rate_mw", "ip", "audit",
                "auditlog")  # fmt: skip
#: (a) the cache TTL of the KeyManager whose cached verify is timed.
CACHE_TTL_S = 24 * 3600.0
#: The (c) servers run by each worker.
COMPARED_INPROC = ("bare", "guard", "guard+key", "guard+budgets")


class GuardOps:
    """The guard's side of (a): the core objects and one timed case per operation, using
    only calls that both this tree and the baseline commits have, or branching on what the
    loaded package has (a case it cannot make is left out and listed in ``missing``).

    ``drain``: flush the audit writers before each timed audit round (outside the timing)
    and size their queues for one round, so that every round measures the enqueue path
    (the workers of ``--against``: a faster writer must not make the drop path look cheap)."""

    def __init__(self, tmp: Path, n: int, drain: bool = False) -> None:
        from fastmcp_guard import RateLimit
        from fastmcp_guard.audit import AuditLog, FileBackend

        tmp.mkdir(parents=True, exist_ok=True)
        self.missing: dict[str, str] = {}
        cap = {"queue_capacity": n + 1} if drain else {}
        # A long cache TTL: a run outlasts the default 60 s, and a verify_cached of an
        # expired entry returns None at once (a miss would be timed as a hit).
        self.km = core.KeyManager.memory(cache_ttl_seconds=CACHE_TTL_S)
        _info, token = self.km.create("bench", scopes=["read:data"], metadata={"team": "data"})
        self.km.verify(token, None)
        assert self.km.verify_cached(token) is not None
        lim = core.Limiter(per_key=HIGH, global_limit=HIGH)
        assert lim.check("fmg_key_3kQxY7bT0pLm9ZaW") is None
        ipm = core.IPMatcher(allow=IP_ALLOW, deny=IP_DENY)
        assert ipm.is_allowed(IP_PROBE) and not ipm.is_allowed("10.99.0.1")
        self.alog = AuditLog(backend=FileBackend(str(tmp / "auditlog-ops.jsonl"), **cap))
        self.writer: Any = None
        self.vstore: Any = None
        try:  # the positional core writer of issues 1-10 (the audit rewrite may replace it)
            self.writer = core.AuditWriter(str(tmp / "audit-ops.jsonl"), **cap)
            self.writer.log(*TYPICAL_LOG_ARGS)
        except (AttributeError, TypeError, ValueError) as exc:
            self.writer = None
            self.missing["audit"] = f"core.AuditWriter(path).log(11 positional): {exc}"

        # The rate check as the middleware makes it: 0.3 before issue 11 called the core
        # limiter (``rate.core.check``) when ``rate.is_local``; issue 11 gives RateLimit a
        # synchronous ``check`` returning a decision (0.2's coroutine before that).
        rl = RateLimit(per_key=HIGH, global_limit=HIGH)
        rate_mw: Callable[..., Any]
        if asyncio.iscoroutinefunction(RateLimit.check):
            rate_mw = rl.core.check
        else:
            rate_mw = rl.check
        self.cases: dict[str, Callable[[], float]] = {
            "empty": timed_loop(lambda: None, (), n),
            "verify": self._still_cached(timed_loop(self.km.verify_cached, (token,), n), token),
            "rate": timed_loop(lim.check, ("fmg_key_3kQxY7bT0pLm9ZaW",), n),
            "rate_mw": timed_loop(rate_mw, ("fmg_key_3kQxY7bT0pLm9ZaW", "get_data"), n),
            "ip": timed_loop(ipm.is_allowed, (IP_PROBE,), n),
            "auditlog": self._drained(self._auditlog_case(n), self.alog) if drain
            else self._auditlog_case(n),
        }  # fmt: skip
        try:
            from fastmcp_guard.keys.verifier import access_token_for

            def verifier_hot_path(tok: str) -> Any:
                return access_token_for(tok, self.km.verify_cached(tok))

            self.cases["verifier"] = timed_loop(verifier_hot_path, (token,), n)
            try:
                self._verifier_rows(token, n, access_token_for)
            except Exception as exc:  # noqa: BLE001 - another build: leave the rows out
                self.missing["verify_token"] = f"GuardTokenVerifier.verify_token: {exc!r}"
        except ImportError as exc:
            self.missing["verifier"] = f"keys.verifier.access_token_for: {exc}"
        if self.writer is not None:
            audit = timed_loop(self.writer.log, TYPICAL_LOG_ARGS, n)
            self.cases["audit"] = self._drained(audit, self.writer) if drain else audit

    def _verifier_rows(self, token: str, n: int, access_token_for: Any) -> None:
        """The verifier's cache hit three ways: with the dict of AccessTokens keyed by the
        raw token it kept before issue 11, with the AccessToken attached to the core's
        cache entry (issue 11), and the real ``GuardTokenVerifier.verify_token``."""
        ident0 = self.km.verify_cached(token)
        dict_tokens = {token: (ident0.key_id, ident0.expires_at, access_token_for(token, ident0))}

        def verifier_dict_path(tok: str) -> Any:
            ident = self.km.verify_cached(tok)
            if ident is not None:
                hit = dict_tokens.get(tok)
                if hit is not None and hit[0] == ident.key_id and hit[1] == ident.expires_at:
                    return hit[2]
            return None

        assert verifier_dict_path(token) is not None
        self.cases["verifier_dict"] = timed_loop(verifier_dict_path, (token,), n)
        if not hasattr(ident0, "attach"):
            self.missing["verifier_attached"] = "Identity.attach: not in this build"
        else:
            ident0.attach(access_token_for(token, ident0))

            def verifier_attached_path(tok: str) -> Any:
                ident = self.km.verify_cached(tok)
                return None if ident is None else ident.attached

            assert verifier_attached_path(token) is verifier_attached_path(token) is not None
            self.cases["verifier_attached"] = timed_loop(verifier_attached_path, (token,), n)
        del ident0
        # The verifier itself: its coroutine completes without suspending on a cache hit.
        from fastmcp import FastMCP
        from fastmcp_guard import Guard, KeyStore

        self.vstore = KeyStore(backend="memory", cache_ttl_seconds=CACHE_TTL_S)
        vguard = Guard(FastMCP("bench"), keys=self.vstore)
        vtoken = str(self.vstore.create("bench", scopes=["read:data"]).token)
        assert vguard.verifier is not None
        verify_token = vguard.verifier.verify_token

        def real_verifier(tok: str) -> Any:
            coro = verify_token(tok)
            try:
                coro.send(None)
            except StopIteration as done:
                return done.value
            coro.close()
            raise AssertionError("verify_token suspended on a cache hit")

        asyncio.run(verify_token(vtoken))  # first use: argon2 on a thread
        assert real_verifier(vtoken) is not None
        self.cases["verify_token"] = timed_loop(real_verifier, (vtoken,), n)

    def _still_cached(self, case: Callable[[], float], token: str) -> Callable[[], float]:
        def run() -> float:
            ns = case()
            if self.km.verify_cached(token) is None:
                raise RuntimeError("the verified token left the cache: the round timed misses")
            return ns

        return run

    @staticmethod
    def _drained(case: Callable[[], float], writer: Any) -> Callable[[], float]:
        def run() -> float:
            writer.flush()
            return case()

        return run

    def _auditlog_case(self, n: int) -> Callable[[], float]:
        T = TYPICAL

        def run() -> float:
            log = self.alog.log
            t = time.perf_counter_ns()
            for _ in repeat(None, n):
                log(
                    "ok",
                    key_id=T["key_id"],
                    key_name=T["key_name"],
                    tool=T["tool"],
                    scopes=T["scopes"],
                    duration_ms=T["duration_ms"],
                    error=None,
                    input_args=T["input_args"],
                    output_preview=T["output_preview"],
                    client_ip=T["client_ip"],
                    metadata=T["metadata"],
                )
            return (time.perf_counter_ns() - t) / n

        return run

    def close(self) -> dict[str, int]:
        """Close everything; the core writer's counters (the AuditLog's without it)."""
        stats = dict(self.alog.stats())
        if self.writer is not None:
            stats = dict(self.writer.stats())
            self.writer.close()
        self.alog.close()
        self.km.close()
        if self.vstore is not None:
            self.vstore.close()
        return stats


class Worker:
    """This file run again as ``--worker SECTION`` in its own process, with ``package``
    (a baseline build) first on its path, or none (this checkout's build, from .venv).
    It sets up the same cases as this process and runs one when asked: the parent runs
    them inside its own interleaved rounds, so both builds see the same moments of the
    machine. Two ``fastmcp_guard._core`` extensions cannot share one process."""

    def __init__(self, section: str, tag: str, label: str, package: Path | None,
                 args: argparse.Namespace, tmp: Path) -> None:  # fmt: skip
        self.tag, self.label = tag, label
        self.dir = tmp / f"worker-{section}-{tag}"
        self.dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [*([str(package)] if package else []), str(HERE)])}  # fmt: skip
        env.pop("FASTMCP_GUARD_KEY", None)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", section,
               "--worker-dir", str(self.dir), "--ops-calls", str(args.ops_calls),
               "--inproc-calls", str(args.inproc_calls)]  # fmt: skip
        self.stderr = open(self.dir / "stderr.txt", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, bufsize=1, cwd=self.dir,
                                     env=env)  # fmt: skip
        hello = self._read()
        self.core_file: str = hello["core"]
        self.build: str = hello["build"]
        self.cases: list[str] = hello["cases"]
        self.missing: dict[str, str] = hello["missing"]

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"worker {self.label} exited:\n"
                               f"{(self.dir / 'stderr.txt').read_text()[-3000:]}")  # fmt: skip
        return json.loads(line)

    def run(self, case: str) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(case + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> Any:
        """Ask the worker to close its objects; what it reports (its audit counters)."""
        if self.proc.poll() is None:
            try:
                return self.run("quit")
            finally:
                self.proc.wait(30)
                self.stderr.close()
        return None


def against_package(args: argparse.Namespace) -> Path:
    """The baseline directory of ``--against`` / ``--against-path`` (built once)."""
    from _baseline import baseline_package

    if args.against_path and not args.against:
        path = Path(args.against_path)
        if not (path / "fastmcp_guard").is_dir():
            raise SystemExit(f"--against-path {path}: no fastmcp_guard package there "
                             "(give --against REF as well to build it there)")  # fmt: skip
        return path
    return baseline_package(args.against, Path(args.against_path) if args.against_path else None)


def start_workers(section: str, args: argparse.Namespace, tmp: Path) -> list[Worker]:
    """With ``--against``: a worker of this checkout's build and one of the baseline's."""
    if args.against_dir is None or core is None:
        return []
    return [Worker(section, "this", "this checkout", None, args, tmp),
            Worker(section, "ref", f"@{args.against_label}", args.against_dir, args, tmp)]  # fmt: skip


def run_pair(workers: list[Worker], name: str, out: dict[str, list[Any]]) -> Callable[[], float]:
    """A case of ``interleave``: run ``name`` in both workers, one right after the other,
    the first one first in even rounds and second in odd ones (so that neither build is
    always the one that runs just after the other); their figures go to ``out``."""
    turn = [0]

    def run() -> float:
        order = workers if turn[0] % 2 == 0 else workers[::-1]
        turn[0] += 1
        for w in order:
            out.setdefault(f"{w.tag}:{name}", []).append(
                w.run(name) if name in w.cases else float("nan")
            )
        return 0.0

    return run


def paired(a: list[float], b: list[float]) -> tuple[float, str]:
    """Median of the per-round ratios a/b, and the ratios themselves."""
    rs = [x / y for x, y in zip(a, b, strict=True) if y and not (math.isnan(x) or math.isnan(y))]
    if not rs:
        return float("nan"), "-"
    return med(rs), " ".join(f"{x:.2f}" for x in rs)


def compare_header(what: str, workers: list[Worker]) -> None:
    print()
    print(f"Against {workers[1].label}: {what}, each build in its own worker process "
          f"(identical but for the package on its path), its rounds interleaved with the ones "
          f"above; load average now {loadavg()}.")  # fmt: skip
    for w in workers:
        print(f"  {w.tag:>4}: {w.label}: {w.core_file} ({w.build})")
    for w in workers:
        for k, why in w.missing.items():
            print(f"  {w.label} has no case {k!r}: {why}")


def worker_main(args: argparse.Namespace) -> int:
    """``--worker a|c``: set up that section's guard cases, say which, then run each case
    named on stdin and answer with its figure as one JSON line; ``quit`` closes."""
    logging.getLogger("fastmcp_guard.audit").setLevel(logging.ERROR)
    tmp = Path(args.worker_dir)
    hello: dict[str, Any] = {"core": core.__file__, "build": so_build(core.__file__)}
    if args.worker == "a":
        ops = GuardOps(tmp, args.ops_calls, drain=True)
        cases = ops.cases
        hello.update(cases=list(cases), missing=ops.missing)
        print(json.dumps(hello), flush=True)
        for line in sys.stdin:
            name = line.strip()
            if name == "quit":
                print(json.dumps(ops.close()), flush=True)
                return 0
            gc.collect()
            print(json.dumps(cases[name]()), flush=True)
        return 0
    from fastmcp import Client

    servers, guards = inproc_servers(tmp, COMPARED_INPROC)
    n = args.inproc_calls

    async def serve() -> int:
        loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            clients = {k: await stack.enter_async_context(Client(s)) for k, s in servers.items()}
            for c in clients.values():
                for _ in range(50):
                    await c.call_tool("echo", {"text": "hi"})
            hello.update(cases=list(clients), missing={})
            print(json.dumps(hello), flush=True)
            while True:
                name = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
                if name in ("quit", ""):
                    break
                gc.collect()
                call = clients[name].call_tool
                c0 = time.process_time()
                t = time.perf_counter()
                for _ in repeat(None, n):
                    await call("echo", {"text": "hi"})
                wall = (time.perf_counter() - t) / n * 1e6
                print(json.dumps([wall, (time.process_time() - c0) / n * 1e6]), flush=True)
        stats = {}
        for kind, g in guards.items():
            g.close()
            if g.audit is not None:
                stats[kind] = dict(g.audit.stats())
        print(json.dumps(stats), flush=True)
        return 0

    return asyncio.run(serve())


# ---------------------------------------------------------------------------------------
# (a) core operations from Python
# ---------------------------------------------------------------------------------------


def bench_core_ops(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    section(
        "(a) core operations from Python: ours (Rust core) vs the fastmcp-guard 0.2 way (pure Python)"
    )
    import bcrypt

    n, rounds = args.ops_calls, args.rounds_ops
    res: dict[str, float] = {}
    rows: list[list[str]] = []

    loop_overhead = med(interleave({"empty": timed_loop(lambda: None, (), n)}, rounds)["empty"])

    # -- cached verify vs bcrypt ---------------------------------------------------------
    tok02 = token_02().encode()
    hashed = bcrypt.hashpw(tok02, bcrypt.gensalt())  # default cost (12), as 0.2
    bc_runs = []
    for _ in range(args.bcrypt_runs):
        t = time.perf_counter_ns()
        assert bcrypt.checkpw(tok02, hashed)
        bc_runs.append(time.perf_counter_ns() - t)
    bcrypt_ns = med(bc_runs)

    loop = asyncio.new_event_loop()
    twin_rl = RateLimit02((10**9, 60), (10**9, 60))

    def twin_rate_case() -> float:
        async def go() -> float:
            check = twin_rl.check
            t = time.perf_counter_ns()
            for _ in repeat(None, n):
                await check("fmg_key_3kQxY7bT0pLm9ZaW")
            return (time.perf_counter_ns() - t) / n

        return loop.run_until_complete(go())

    twin_ip = IPPolicy02(IP_ALLOW, IP_DENY)
    assert twin_ip.is_allowed(IP_PROBE) and not twin_ip.is_allowed("10.99.0.1")

    audit02 = open(tmp / "audit02-ops.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def twin_audit_case() -> float:
        t = time.perf_counter_ns()
        for _ in repeat(None, n):
            append_record(
                audit02,
                typical_record(),
            )
        return (time.perf_counter_ns() - t) / n

    cases: dict[str, Callable[[], float]] = {
        "twin_rate": twin_rate_case,
        "twin_ip": timed_loop(twin_ip.is_allowed, (IP_PROBE,), n),
        "twin_audit": twin_audit_case,
    }

    ops = GuardOps(tmp / "ops", n) if core is not None else None
    if ops is not None:
        cases.update({f"ours_{k}": fn for k, fn in ops.cases.items()})
    workers = start_workers("a", args, tmp)
    against: dict[str, list[float]] = {}
    for name in COMPARED_OPS:
        if workers:
            cases[f"against:{name}"] = run_pair(workers, name, against)
    r = interleave(cases, rounds)
    loop.close()
    audit02.close()
    m = {k: med(v) for k, v in r.items()}
    res.update(m)
    res["bcrypt_ns"] = bcrypt_ns

    def row(
        job: str, ours_key: str | None, twin: float, target_ns: float | None, twin_name: str
    ) -> None:
        ours = m.get(ours_key) if ours_key else None
        rows.append(
            [
                job,
                ns_fmt(ours) if ours is not None else "n/a",
                twin_name,
                ns_fmt(twin),
                f"{twin / ours:,.0f}x" if ours else "-",
                (
                    f"<= {ns_fmt(target_ns)}: {verdict(ours <= target_ns)}"
                    if ours is not None and target_ns
                    else "-"
                ),
            ]
        )
        if target_ns and ours is not None:
            SUMMARY.append(
                (f"(a) {job}", f"<= {ns_fmt(target_ns)}", ns_fmt(ours), verdict(ours <= target_ns))
            )

    row(
        "cached verify: KeyManager.verify_cached",
        "ours_verify",
        bcrypt_ns,
        1000,
        "bcrypt.checkpw (cost 12)",
    )
    row(
        "rate check: Limiter.check (per-key+global)",
        "ours_rate",
        m["twin_rate"],
        300,
        "deque window + asyncio.Lock",
    )
    row(
        f"IP check: IPMatcher.is_allowed({IP_PROBE})",
        "ours_ip",
        m["twin_ip"],
        300,
        "ipaddress loop",
    )
    row(
        "audit enqueue: AuditWriter.log (back to back)",
        "ours_audit",
        m["twin_audit"],
        1000,
        "json.dumps + write",
    )
    print(
        f"{n:,} calls per round, median of {rounds} interleaved rounds; bcrypt: median of "
        f"{args.bcrypt_runs} calls. Loop overhead (included in every figure): {loop_overhead:.0f} ns."
    )
    table(
        ["job", "ours", "0.2 way", "0.2 ns/call", "speed-up", "target"],
        rows,
        "lrlrrl",
    )
    if ops is not None:
        print()
        print(
            "Hot-path wrappers around the same calls (what the middleware/verifier actually run):"
        )

        def wrapper(label: str, key: str, under: str) -> list[str]:
            if key not in m:
                return [label, "n/a", ops.missing.get(key.removeprefix("ours_"), "-")]
            extra = f"+{m[key] - m[under]:,.0f} ns" if under in m else "-"
            return [label, ns_fmt(m[key]), extra]

        table(
            ["call", "ns/call", "vs core call"],
            [
                wrapper("verify_cached + access_token_for (AccessToken built every time)",
                        "ours_verifier", "ours_verify"),
                wrapper("verify_cached + dict of AccessTokens by raw token (before issue 11)",
                        "ours_verifier_dict", "ours_verify"),
                wrapper("verify_cached + Identity.attached (the verifier now)",
                        "ours_verifier_attached", "ours_verify"),
                wrapper("GuardTokenVerifier.verify_token, cache hit (coroutine driven inline)",
                        "ours_verify_token", "ours_verify"),
                wrapper("RateLimit check as the middleware makes it (in process)",
                        "ours_rate_mw", "ours_rate"),
                wrapper("AuditLog.log (Python wrapper, keyword args)", "ours_auditlog",
                        "ours_audit"),
            ],
            "lrr",
        )  # fmt: skip
        st = ops.close()
        print(
            f"(AuditWriter during these rounds: enqueued {st['enqueued']:,}, dropped {st['dropped']:,})"
        )
    else:
        print(f"ours: skipped ({GUARD_IMPORT_ERROR})")
    if workers:
        compare_ops(workers, against, n, rounds)

    # -- audit at a request-like rate -------------------------------------------------------
    if core is not None:
        print()
        trickle_audit(args, tmp)

    # -- exactness across threads ------------------------------------------------------------
    print()
    n_thr, per_thr, limit = 4, args.thread_checks, args.thread_limit
    rows = []

    def hammer(check: Callable[[], bool]) -> tuple[int, str]:
        admitted = [0] * n_thr
        errors: list[str] = []
        barrier = threading.Barrier(n_thr)

        def worker(i: int) -> None:
            barrier.wait()
            c = 0
            try:
                for _ in range(per_thr):
                    if check():
                        c += 1
            except Exception as exc:  # noqa: BLE001 - reported
                errors.append(f"{type(exc).__name__}: {exc}")
            admitted[i] = c

        ts = [threading.Thread(target=worker, args=(i,)) for i in range(n_thr)]
        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads as often as CPython allows: expose races
        try:
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        finally:
            sys.setswitchinterval(old)
        return sum(admitted), (errors[0][:60] if errors else "")

    if core is not None:
        for _ in range(args.thread_runs):
            lim1 = core.Limiter(per_key=f"{limit}/hour")
            got, err = hammer(lambda lim1=lim1: lim1.check("k") is None)
            rows.append(
                [
                    "ours: Limiter.check",
                    str(limit),
                    f"{got:,}",
                    "yes" if got == limit and not err else "NO",
                    err or "-",
                ]
            )
    for _ in range(args.thread_runs):
        try:
            p = subprocess.run(
                [sys.executable, str(HERE / "_twins.py"), str(n_thr), str(per_thr), str(limit)],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            r02 = json.loads(p.stdout)
            err = r02["errors"][0][:60] if r02["errors"] else "-"
            got = r02["admitted"]
            rows.append(
                [
                    "0.2 twin: each thread its own event loop",
                    str(limit),
                    f"{got:,}",
                    "yes" if got == limit and err == "-" else "no",
                    err,
                ]
            )
        except subprocess.TimeoutExpired:
            rows.append(
                [
                    "0.2 twin: each thread its own event loop",
                    str(limit),
                    "-",
                    "no",
                    "hung > 10 s, killed (lost wake-up)",
                ]
            )
    print(
        f"Exact across threads: {n_thr} threads x {per_thr:,} checks on one key, limit {limit} per hour "
        f"(sys.setswitchinterval(1e-6) during the run)"
    )
    table(["limiter", "limit", "admitted", "exact", "error"], rows, "lrrll")
    print(
        "Ours is exact by construction (atomic GCRA state, no GIL needed). The 0.2 twin is exact only"
    )
    print(
        "within one event loop: its asyncio.Lock does not serialise threads. An exact count from it above"
    )
    print(
        "means the GIL did not interrupt its short critical section in that run, which nothing guarantees;"
    )
    print(
        "a contended lock shared by two loops either raises RuntimeError or, as in a hung run, loses the"
    )
    print("waiter's wake-up (it is scheduled on the other thread's loop).")
    return res


def compare_ops(workers: list[Worker], r: dict[str, list[float]], n: int, rounds: int) -> None:
    """(a) --against: each operation on the two builds, and this/ref per round."""
    closing = {w.tag: w.close() or {} for w in workers}
    this, ref = workers
    compare_header(f"(a) the same calls, {n:,} per round, {rounds} rounds", workers)
    labels = {
        "empty": "empty loop (no guard: the workers' noise floor)",
        "verify": "cached verify: KeyManager.verify_cached",
        "verifier": "verify_cached + access_token_for (built every time)",
        "verify_token": "GuardTokenVerifier.verify_token, cache hit",
        "rate": "rate check: Limiter.check (per-key+global)",
        "rate_mw": "rate check as the middleware makes it",
        "ip": f"IP check: IPMatcher.is_allowed({IP_PROBE})",
        "audit": "audit enqueue: AuditWriter.log (11 positional)",
        "auditlog": "audit: AuditLog.log (keyword args)",
    }
    rows = []
    for k in COMPARED_OPS:
        a, b = r[f"this:{k}"], r[f"ref:{k}"]
        if k not in this.cases or k not in ref.cases:
            rows.append([labels[k], ns_fmt(med(a)) if k in this.cases else "n/a",
                         ns_fmt(med(b)) if k in ref.cases else "n/a", "not comparable", "-"])  # fmt: skip
            continue
        ratio, per_round = paired(a, b)
        rows.append([labels[k], ns_fmt(med(a)), ns_fmt(med(b)), f"{ratio:.3f}x", per_round])
    table(["call", "this", ref.label, "this/ref", "per round"], rows, "lrrrl")
    print(
        "ns per call, loop overhead included; this/ref: median of the per-round ratios. The audit"
    )
    print("rows flush the writer before each round (outside the timing) and queue a round without")
    print("dropping: they measure the enqueue path on both builds.")
    for tag, st in closing.items():
        print(f"  audit counters of the {tag} worker: enqueued {st.get('enqueued', '-')}, "
              f"dropped {st.get('dropped', '-')}")  # fmt: skip


def trickle_audit(args: argparse.Namespace, tmp: Path) -> None:
    """Audit enqueue when events arrive one at a time, as requests do (a gap between events).

    Back to back, the writer thread never sleeps, so an enqueue is a bare queue push.
    At request rates it sleeps between events; this measures the call as the request
    path sees it then, and the whole process's CPU per event (all threads: the writer's
    wake-up, write and flush included), net of the same loop with the logging left out.
    """
    gap, n, rounds = args.trickle_gap, args.trickle_events, args.rounds_trickle
    w = core.AuditWriter(str(tmp / "audit-trickle.jsonl"))
    f = open(tmp / "audit02-trickle.jsonl", "a", encoding="utf-8")  # noqa: SIM115
    wargs = TYPICAL_LOG_ARGS

    def ours() -> None:
        w.log(*wargs)

    def twin() -> None:
        append_record(
            f,
            typical_record(),
        )
        f.flush()

    def case(fn: Callable[[], None] | None) -> Callable[[], tuple[float, float]]:
        def run() -> tuple[float, float]:
            lat = 0.0
            c0 = time.process_time()
            for _ in repeat(None, n):
                if fn is not None:
                    s0 = time.perf_counter()
                    fn()
                    lat += time.perf_counter() - s0
                time.sleep(gap)
            w.flush()
            return lat / n * 1e9, (time.process_time() - c0) / n * 1e9

        return run

    r = interleave({"sleep": case(None), "ours": case(ours), "twin": case(twin)}, rounds)  # type: ignore[arg-type]
    w.close()
    f.close()
    base_cpu = med([x[1] for x in r["sleep"]])  # type: ignore[index]
    rows = []
    for k, label in (
        ("ours", "ours: AuditWriter.log"),
        ("twin", "0.2 way: json.dumps + write + flush"),
    ):
        lat = med([x[0] for x in r[k]])  # type: ignore[index]
        cpu = med([x[1] for x in r[k]]) - base_cpu  # type: ignore[index]
        rows.append([label, ns_fmt(lat), ns_fmt(cpu)])
    print(
        f"Audit at a request-like rate: one event, then time.sleep({gap * 1e3:g} ms); {n} events per round, "
        f"median of {rounds} interleaved rounds. Process CPU = all threads (time.process_time), minus the "
        f"same loop without logging ({ns_fmt(base_cpu)} per iteration)."
    )
    table(["writer", "call (request path)", "process CPU per event"], rows, "lrr")
    # An open writer with no events: what its thread costs the process per second.
    c0 = time.process_time()
    time.sleep(1.0)
    no_writer = time.process_time() - c0
    w2 = core.AuditWriter(str(tmp / "audit-idle.jsonl"))
    time.sleep(0.2)
    c0 = time.process_time()
    time.sleep(1.0)
    idle = time.process_time() - c0
    w2.close()
    print(
        f"An idle AuditWriter (open, no events) costs the process {(idle - no_writer) * 1e3:.2f} ms of CPU per second."
    )


# ---------------------------------------------------------------------------------------
# (b) audit throughput
# ---------------------------------------------------------------------------------------


def run_cargo_core(args: argparse.Namespace, tmp: Path) -> dict[str, Any] | None:
    if args.cargo_json:
        return json.loads(Path(args.cargo_json).read_text())
    if args.no_cargo:
        return None
    out = tmp / "core.json"
    cmd = ["cargo", "bench", "--bench", "core", "--", "--json", str(out)]
    if args.quick:
        cmd.append("--quick")
    print(f"$ {' '.join(cmd)}")
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        print("cargo bench failed:\n" + p.stderr[-3000:])
        return None
    print(p.stdout.rstrip())
    return json.loads(out.read_text())


def bench_audit(args: argparse.Namespace, tmp: Path, cargo: dict[str, Any] | None) -> None:
    section("(b) audit log, sustained events/s to JSONL (n / time including the final flush)")
    n, rounds = args.audit_events, args.rounds_audit

    def py_baseline() -> float:
        path = tmp / "audit02-bulk.jsonl"
        path.unlink(missing_ok=True)
        t = time.perf_counter()
        with open(path, "a", encoding="utf-8") as f:
            for _ in repeat(None, n):
                append_record(
                    f,
                    typical_record(),
                )
            f.flush()
            os.fsync(f.fileno())
        return n / (time.perf_counter() - t)

    drops: list[int] = []

    def py_ours() -> float:
        path = tmp / "audit-bulk.jsonl"
        path.unlink(missing_ok=True)
        w = core.AuditWriter(str(path))
        a = TYPICAL_LOG_ARGS
        log = w.log
        t = time.perf_counter()
        for _ in repeat(None, n):
            log(*a)
        w.close()
        dt = time.perf_counter() - t
        st = w.stats()
        drops.append(st["dropped"])
        return st["written"] / dt

    cases: dict[str, Callable[[], float]] = {"py02": py_baseline}
    if core is not None:
        cases["ours_py"] = py_ours
    r = interleave(cases, rounds)
    m = {k: med(v) for k, v in r.items()}
    lines_02 = count_lines(tmp / "audit02-bulk.jsonl")
    size_02 = (tmp / "audit02-bulk.jsonl").stat().st_size

    rows = []
    if cargo:
        eps = cargo["audit_events_per_s"]
        eps_off = cargo.get("audit_events_per_s_chain_off", eps)
        rows.append(
            [
                "ours, Rust producer -> AuditWriter, chain on (core.rs)",
                f"{eps:,.0f}",
                f"{eps / m['py02']:.1f}x",
                (
                    f"{cargo['audit_events_per_run']:,} ev/run; "
                    f"{cargo['audit_file_bytes'] / 1e6:.1f} MB; "
                    f"lines == events: {'yes' if cargo['audit_lines_ok'] else 'NO'}; "
                    f"chain off: {eps_off:,.0f} ev/s"
                ),
            ]
        )
        SUMMARY.append(
            (
                "(b) audit writer sustained (Rust, chain off)",
                ">= 1,000,000 ev/s",
                f"{eps_off:,.0f} ev/s",
                verdict(eps_off >= 1e6),
            )
        )
        SUMMARY.append(
            (
                "(b) audit writer sustained (Rust, hash chain on)",
                ">= 500,000 ev/s",
                f"{eps:,.0f} ev/s",
                verdict(eps >= 5e5),
            )
        )
    else:
        rows.append(["ours, Rust producer (core.rs)", "skipped", "-", "run with cargo available"])
    if "ours_py" in m:
        lines = count_lines(tmp / "audit-bulk.jsonl")
        rows.append(
            [
                "ours, from Python: AuditWriter.log loop",
                f"{m['ours_py']:,.0f}",
                f"{m['ours_py'] / m['py02']:.1f}x",
                f"written/s; dropped per run: {', '.join(str(d) for d in drops)}; last file {lines:,} lines",
            ]
        )
    rows.append(
        [
            "0.2 way: json.dumps + write (+ fsync at end)",
            f"{m['py02']:,.0f}",
            "1.0x",
            f"{n:,} ev/run; {size_02 / 1e6:.1f} MB; {lines_02:,} lines",
        ]
    )
    print(
        f"Python rows: {n:,} events per run, median of {rounds} interleaved runs. Typical event: {TYPICAL}"
    )
    table(["writer", "events/s", "vs 0.2", "notes"], rows, "lrrl")


# ---------------------------------------------------------------------------------------
# (f) audit backends: SQLite sustained, and the request path with every backend on
# ---------------------------------------------------------------------------------------


def bench_audit_backends(args: argparse.Namespace, tmp: Path) -> None:
    section("(f) audit backends: SQLite sustained; AuditLog.log with every backend on")

    n_ours = 50_000 if args.quick else 200_000
    n_02 = 300 if args.quick else 1_000
    rounds = 3

    def sqlite_ours() -> float:
        path = tmp / "audit-bulk.db"
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        w = core.AuditWriter.sqlite(str(path), queue_capacity=n_ours + 1)
        a = TYPICAL_LOG_ARGS
        log = w.log
        t = time.perf_counter()
        for _ in repeat(None, n_ours):
            log(*a)
        w.close()
        dt = time.perf_counter() - t
        return w.stats()["written"] / dt

    def sqlite_02() -> float:
        # fastmcp-guard 0.2's SQLite backend: connect, INSERT, commit per event.
        import sqlite3
        from contextlib import closing

        path = tmp / "audit02-bulk.db"
        path.unlink(missing_ok=True)
        with closing(sqlite3.connect(path)) as conn:
            conn.execute(
                "CREATE TABLE audit_log (id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT, "
                "key_id TEXT, key_name TEXT, tool TEXT, scopes TEXT, duration_ms REAL, "
                "status TEXT, error TEXT, input_args TEXT, output_preview TEXT, "
                "client_ip TEXT, metadata TEXT)"
            )
            for idx in ("ts", "key_id", "tool"):
                conn.execute(f"CREATE INDEX idx_{idx} ON audit_log({idx})")
            conn.commit()
        d = TYPICAL
        t = time.perf_counter()
        for _ in repeat(None, n_02):
            with closing(sqlite3.connect(path)) as conn:
                conn.execute(
                    "INSERT INTO audit_log (ts, key_id, key_name, tool, scopes, duration_ms, "
                    "status, error, input_args, output_preview, client_ip, metadata) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (datetime.now(timezone.utc).isoformat(), d["key_id"], d["key_name"],
                     d["tool"], json.dumps(d["scopes"]), d["duration_ms"], d["status"], None,
                     json.dumps(d["input_args"]), d["output_preview"], d["client_ip"],
                     json.dumps(d["metadata"])),
                )  # fmt: skip
                conn.commit()
        return n_02 / (time.perf_counter() - t)

    r = interleave({"ours": sqlite_ours, "py02": sqlite_02}, rounds)
    m = {k: med(v) for k, v in r.items()}
    print(f"SQLite: ours {n_ours:,} events per run (one transaction per batch, WAL); "
          f"0.2 way {n_02:,} events per run (connect + INSERT + commit each); "
          f"median of {rounds} interleaved runs")  # fmt: skip
    table(
        ["writer", "events/s", "vs 0.2"],
        [["ours: AuditWriter.sqlite from Python", f"{m['ours']:,.0f}",
          f"{m['ours'] / m['py02']:,.0f}x"],
         ["0.2 way: sqlite3 insert + commit per event", f"{m['py02']:,.0f}", "1x"]],
        "lrr",
    )  # fmt: skip
    SUMMARY.append(("(f) SQLite audit sustained (from Python)", ">= 100,000 ev/s",
                    f"{m['ours']:,.0f} ev/s", verdict(m["ours"] >= 1e5)))  # fmt: skip

    # The request path: AuditLog.log with one backend, and with every backend on.
    bench_every_backend(args, tmp)


def bench_every_backend(args: argparse.Namespace, tmp: Path) -> None:
    """AuditLog.log back to back with one backend and with every backend on, beside the
    foundation's figure (AuditWriter.log) and the pure-Python way, in one interleaved run.
    Queues are sized so that nothing is dropped: every row measures the enqueue path.
    Each row gives the wall time per call and the calling thread's own CPU time per call
    (time.thread_time: what the request path pays, without the time the writer thread and
    the HTTP shipper take from it on a small machine)."""
    from bench_audit_http import Receiver
    from fastmcp_guard.audit import AuditLog, FileBackend, HttpBackend, OTelBackend, SQLiteBackend

    n = 50_000 if args.quick else 200_000
    rounds = 5
    cap = n * rounds + 1  # never full: no round measures the (cheaper) drop path
    T = TYPICAL
    kwargs = {k: T[k] for k in ("key_id", "key_name", "tool", "scopes", "duration_ms",
                                "input_args", "output_preview", "client_ip", "metadata")}  # fmt: skip
    positional = (T["key_id"], T["key_name"], T["tool"], T["scopes"], T["duration_ms"], None,
                  T["input_args"], T["output_preview"], T["client_ip"], T["metadata"])  # fmt: skip
    receiver = Receiver()
    spools = iter(range(100))

    def http() -> HttpBackend:
        return HttpBackend(receiver.url, spool_dir=tmp / f"spool{next(spools)}",
                           queue_capacity=cap, spool_max_bytes=1 << 34)  # fmt: skip

    def file(name: str) -> FileBackend:
        return FileBackend(tmp / f"{name}.jsonl", queue_capacity=cap)

    def sqlite(name: str) -> SQLiteBackend:
        return SQLiteBackend(tmp / f"{name}.db", queue_capacity=cap)

    foundation = core.AuditWriter(str(tmp / "f0.jsonl"), queue_capacity=cap)
    every = AuditLog(backend=[file("f3"), sqlite("f3"), http()])
    otel = AuditLog(backend=[file("f4"), sqlite("f4"), http(), OTelBackend()])
    logs: dict[str, tuple[Any, bool]] = {
        "AuditLog.log: file": (AuditLog(backend=file("f1")), False),
        "AuditLog.log: file+sqlite": (AuditLog(backend=[file("f2"), sqlite("f2")]), False),
        "AuditLog.log: file+sqlite+http": (every, False),
        "  same, positional (as the middleware calls)": (every, True),
        "AuditLog.log: file+sqlite+http+otel": (otel, False),
        "  same, positional (as the middleware calls) ": (otel, True),
    }  # fmt: skip
    py_path = tmp / "py.jsonl"
    cpu: dict[str, list[float]] = {}

    def python_way() -> float:
        # What a pure-Python fan-out does per event: json.dumps per target (the file, the
        # SQLite row's JSON columns, the HTTP spool), written by the caller.
        with open(py_path, "a") as f1, open(str(py_path) + ".spool", "a") as f2:
            m = n // 10
            c, t = time.thread_time_ns(), time.perf_counter_ns()
            for _ in repeat(None, m):
                rec = {"ts": datetime.now(timezone.utc).isoformat(), "status": "ok", **kwargs}
                f1.write(json.dumps(rec) + "\n")
                json.dumps(rec["scopes"]), json.dumps(rec["input_args"])
                json.dumps(rec["metadata"])
                f2.write(json.dumps(rec) + "\n")
            wall = (time.perf_counter_ns() - t) / m
            cpu.setdefault("pure Python (json.dumps per target)", []).append(
                (time.thread_time_ns() - c) / m
            )
            return wall

    def timed(name: str, fn: Callable[..., Any], a: tuple[Any, ...], kw: dict[str, Any],
              flush: Callable[[], None]) -> Callable[[], float]:  # fmt: skip
        def run() -> float:
            c, t = time.thread_time_ns(), time.perf_counter_ns()
            for _ in repeat(None, n):
                fn(*a, **kw)
            wall = (time.perf_counter_ns() - t) / n
            cpu.setdefault(name, []).append((time.thread_time_ns() - c) / n)
            flush()
            return wall

        return run

    cases: dict[str, Callable[[], float]] = {
        "AuditWriter.log (foundation, positional)": timed(
            "AuditWriter.log (foundation, positional)", foundation.log, TYPICAL_LOG_ARGS, {},
            foundation.flush),
    }  # fmt: skip
    for name, (log, pos) in logs.items():
        cases[name] = timed(name, log.log, ("ok", *positional) if pos else ("ok",),
                            {} if pos else kwargs, log.flush)  # fmt: skip
    cases["pure Python (json.dumps per target)"] = python_way
    try:
        rr = interleave(cases, rounds)
        mm = {k: med(v) for k, v in rr.items()}
        cc = {k: med(v) for k, v in cpu.items()}
        dropped = {k: v.stats().get("dropped", 0) for k, (v, _) in logs.items()}
        dropped["AuditWriter.log (foundation, positional)"] = foundation.stats()["dropped"]
        for v, _ in logs.values():
            v.close()
        foundation.close()
        # With an OpenTelemetry SDK provider: the guard's part is what it adds to a call
        # that already has FastMCP's recording span (set_attributes + one span event).
        otel_sdk = otel_with_sdk(n // 10, kwargs, tmp)
    finally:
        receiver.close()
    print(f"back to back, {n:,} calls per round, median of {rounds} interleaved rounds; "
          "keyword args unless said; queues sized so nothing drops; file, SQLite and the "
          "HTTP spool share one queue and one writer thread (one AuditWriter over their sinks); OTel through "
          "the API with no tracer provider set (a host without tracing)")  # fmt: skip
    base = mm["AuditWriter.log (foundation, positional)"]
    table(
        ["what", "wall ns/call", "vs foundation", "caller CPU ns/call", "dropped"],
        [[k, f"{v:,.0f}", f"{v / base:.2f}x", f"{cc[k]:,.0f}", f"{dropped.get(k, 0):,}"]
         for k, v in mm.items()],
        "lrrrr",
    )  # fmt: skip
    if otel_sdk is not None:
        table(
            ["OTel with the SDK (in-memory exporter)", "ns/call"],
            [[k, f"{v:,.0f}"] for k, v in otel_sdk.items()],
            "lr",
        )
    for label, key in (
        ("(f) request path: file+sqlite+http, as the middleware calls", "  same, positional (as the middleware calls)"),
        ("(f) request path: + otel (no tracer provider), as the middleware calls", "  same, positional (as the middleware calls) "),
        ("(f) AuditLog.log(**kwargs): file+sqlite+http", "AuditLog.log: file+sqlite+http"),
        ("(f) AuditLog.log(**kwargs): + otel (no tracer provider)", "AuditLog.log: file+sqlite+http+otel"),
    ):  # fmt: skip
        SUMMARY.append((label, "<= 1,000 ns (foundation's target)", f"{mm[key]:,.0f} ns",
                        verdict(mm[key] <= 1000)))  # fmt: skip


def otel_with_sdk(n: int, kwargs: dict[str, Any], tmp: Path) -> dict[str, float] | None:
    """ns per call of: a recording span alone (what FastMCP pays anyway), and the same
    span plus AuditLog.log to the OTel backend; last in the run (sets the global provider)."""
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError:
        print("(OpenTelemetry SDK not installed: the SDK rows are not measured)")
        return None
    from fastmcp_guard.audit import AuditLog, OTelBackend

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("bench")
    audit = AuditLog(backend=OTelBackend())

    def span_only() -> float:
        t = time.perf_counter_ns()
        for _ in repeat(None, n):
            with tracer.start_as_current_span("tools/call"):
                pass
        ns = (time.perf_counter_ns() - t) / n
        exporter.clear()
        return ns

    def span_and_guard() -> float:
        fn = audit.log
        t = time.perf_counter_ns()
        for _ in repeat(None, n):
            with tracer.start_as_current_span("tools/call"):
                fn("ok", **kwargs)
        ns = (time.perf_counter_ns() - t) / n
        exporter.clear()
        return ns

    r = interleave({"span": span_only, "span+guard": span_and_guard}, 5)
    span, both = med(r["span"]), med(r["span+guard"])
    return {"a recording span per call (FastMCP's own cost)": span,
            "the same + AuditLog.log to OTel": both,
            "the guard's part (difference)": both - span}  # fmt: skip


# ---------------------------------------------------------------------------------------
# (c) in process
# ---------------------------------------------------------------------------------------


def _echo_server(name: str) -> Any:
    from fastmcp import FastMCP

    mcp = FastMCP(name)

    @mcp.tool
    def echo(text: str) -> str:
        return text

    return mcp


def inproc_servers(tmp: Path, kinds: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (c) servers named in ``kinds``, in that order, and the guards among them. Only
    public API that fastmcp-guard has had since 0.3 (the ``--against`` workers use it)."""
    servers: dict[str, Any] = {}
    guards: dict[str, Any] = {}
    for kind in kinds:
        mcp = servers[kind] = _echo_server(kind)
        if kind == "fastmcp-own":
            from fastmcp.server.middleware.logging import StructuredLoggingMiddleware
            from fastmcp.server.middleware.rate_limiting import RateLimitingMiddleware

            lg = logging.getLogger("bench.structured")
            lg.propagate = False
            lg.setLevel(logging.INFO)
            lg.addHandler(logging.FileHandler(tmp / "structured.log"))
            mcp.add_middleware(RateLimitingMiddleware(max_requests_per_second=1e9,
                                                      burst_capacity=10**9))  # fmt: skip
            mcp.add_middleware(StructuredLoggingMiddleware(logger=lg))
        elif kind == "empty-mw":
            from fastmcp.server.middleware import Middleware

            class EmptyMiddleware(Middleware):
                async def on_call_tool(self, context: Any, call_next: Any) -> Any:
                    return await call_next(context)

                async def on_read_resource(self, context: Any, call_next: Any) -> Any:
                    return await call_next(context)

                async def on_get_prompt(self, context: Any, call_next: Any) -> Any:
                    return await call_next(context)

            mcp.add_middleware(EmptyMiddleware())
        elif kind != "bare":
            guards[kind] = _inproc_guard(kind, mcp, tmp)
    return servers, guards


def _inproc_guard(kind: str, mcp: Any, tmp: Path) -> Any:
    from fastmcp_guard import AuditLog, FileBackend, Guard, IPPolicy, KeyStore, RateLimit

    def audit(name: str) -> Any:
        return AuditLog(backend=FileBackend(str(tmp / f"{name}.jsonl")))

    budgets = hasattr(import_module("fastmcp_guard.rate"), "cost")  # issue 12 on

    def limits(**more: Any) -> dict[str, Any]:
        # The benchmark repeats one call: a loop breaker (issue 12: on by default, in
        # shadow) would audit every call past the 20th as would_refuse. A high one keeps
        # the common path timed: the arguments are still hashed on every call.
        if budgets:
            more.setdefault("loop_breaker", HIGH)
        return {"rate_limit": RateLimit(per_key=HIGH, global_limit=HIGH, **more),
                "ip": IPPolicy(allow=IP_ALLOW, deny=IP_DENY)}  # fmt: skip

    if kind == "guard":
        return Guard(mcp, **limits(), audit=audit("inproc-audit"))
    if kind == "guard+budgets" and budgets:
        # Issue 12 on: the tool costs 2 (configured), the key has credits (in-process
        # store: leases from memory), the loop breaker enforces, results carry _meta.
        ks = KeyStore(backend="memory")
        key = ks.create(name="alice", scopes=["read:data"], credits=10**15)
        os.environ["FASTMCP_GUARD_KEY"] = key.token or ""
        try:
            return Guard(mcp, keys=ks, **limits(loop_breaker_mode="enforce",
                                                tool_costs={"echo": 2}),
                         audit=audit("inproc-audit-budgets"), budget_meta=True)  # fmt: skip
        finally:
            del os.environ["FASTMCP_GUARD_KEY"]
    if kind in ("guard+key", "guard+budgets"):  # a build before issue 12: guard+key
        ks = KeyStore(backend="memory")
        key = ks.create(name="alice", scopes=["read:data"])
        os.environ["FASTMCP_GUARD_KEY"] = key.token or ""
        try:
            return Guard(mcp, keys=ks, **limits(), audit=audit("inproc-audit-key"))
        finally:
            del os.environ["FASTMCP_GUARD_KEY"]
    if kind == "guard-noaudit":
        return Guard(mcp, **limits())
    if kind == "guard-auditonly":
        return Guard(mcp, audit=audit("inproc-audit-only"))
    raise ValueError(f"unknown in-process server {kind!r}")


def bench_inprocess(args: argparse.Namespace, tmp: Path) -> None:
    section("(c) in process: fastmcp.Client(mcp), one-line tool, us per call")
    from fastmcp import Client

    n, rounds = args.inproc_calls, args.rounds_inproc
    kinds: tuple[str, ...] = ("bare", "fastmcp-own")
    if core is not None:
        kinds += ("guard", "guard+key", "guard+budgets")
        if args.breakdown:
            kinds += ("empty-mw", "guard-noaudit", "guard-auditonly")
    servers, guard_of = inproc_servers(tmp, kinds)
    guards = list(guard_of.values())
    workers = start_workers("c", args, tmp)

    async def main() -> dict[str, list[float]]:
        async with contextlib.AsyncExitStack() as stack:
            clients = {k: await stack.enter_async_context(Client(s)) for k, s in servers.items()}
            for c in clients.values():
                for _ in range(50):
                    await c.call_tool("echo", {"text": "hi"})
            out: dict[str, list[float]] = {k: [] for k in clients}
            for _ in range(rounds):
                for k, c in clients.items():
                    gc.collect()
                    call = c.call_tool
                    c0 = time.process_time()
                    t = time.perf_counter()
                    for _ in repeat(None, n):
                        await call("echo", {"text": "hi"})
                    out[k].append((time.perf_counter() - t) / n * 1e6)
                    cpu[k].append((time.process_time() - c0) / n * 1e6)
                for k in COMPARED_INPROC:  # --against: the two builds, side by side
                    pairs[k]()
            return out

    cpu: dict[str, list[float]] = {k: [] for k in servers}
    against: dict[str, list[tuple[float, float]]] = {}
    pairs = {k: run_pair(workers, k, against) for k in COMPARED_INPROC}
    r = asyncio.run(main())
    for g in guards:
        g.close()
    m = {k: med(v) for k, v in r.items()}
    bare = m["bare"]
    # Per-round paired differences against bare (same round, adjacent runs): cancels slow drifts.
    dw = {k: med([a - b for a, b in zip(r[k], r["bare"], strict=True)]) for k in r}
    dc = {k: med([a - b for a, b in zip(cpu[k], cpu["bare"], strict=True)]) for k in r}
    labels = {
        "bare": "bare FastMCP",
        "empty-mw": "FastMCP + an empty Middleware (the 3 hooks the guard overrides)",
        "guard": "Guard: limits + IP + audit (local caller)",
        "guard+key": "Guard: same + FASTMCP_GUARD_KEY (cached verify per call)",
        "guard+budgets": "Guard: same + cost 2, credits, loop breaker enforced, _meta",
        "fastmcp-own": "FastMCP RateLimiting + StructuredLogging (to file)",
        "guard-noaudit": "Guard: limits + IP, no audit",
        "guard-auditonly": "Guard: audit only (no limits, no IP)",
    }
    rows = []
    for k in [
        "bare",
        "guard",
        "guard+key",
        "guard+budgets",
        "fastmcp-own",
        "guard-noaudit",
        "guard-auditonly",
        "empty-mw",
    ]:
        if k not in m and k in ("guard-noaudit", "guard-auditonly", "empty-mw"):
            continue
        if k not in m:
            rows.append([labels[k], "skipped", "-", "-", "-", "-", "-"])
            continue
        spread = f"{min(r[k]):.0f}-{max(r[k]):.0f}"
        rows.append(
            [
                labels[k],
                f"{m[k]:.1f}",
                f"{dw[k]:+.1f}",
                f"{m[k] / bare:.2f}x",
                spread,
                f"{med(cpu[k]):.1f}",
                f"{dc[k]:+.1f}",
            ]
        )
    print(
        f"{n:,} calls per round, median of {rounds} interleaved rounds. us/call is wall time per call;"
    )
    print(
        "CPU is the whole process (client + server + the guard's threads) per call. 'vs bare' columns"
    )
    print(
        "are medians of per-round paired differences. The IP policy does not apply in process (no client"
    )
    print("address): its cost here is zero by construction.")
    table(
        ["server", "us/call", "vs bare", "ratio", "rounds min-max", "CPU us/call", "CPU vs bare"],
        rows,
        "lrrrrrr",
    )
    if workers:
        compare_inproc(workers, against, n, rounds)
    if "guard" in m:
        added = dw["guard"]
        SUMMARY.append(
            (
                "(c) in-process Guard over bare (wall, paired)",
                "<= +50 us",
                f"{added:+.1f} us",
                verdict(added <= 50),
            )
        )


def compare_inproc(workers: list[Worker], figures: dict[str, list[tuple[float, float]]],
                   n: int, rounds: int) -> None:  # fmt: skip
    """(c) --against: each server of the two workers, and this/ref per round."""
    wall = {k: [f[0] for f in v] for k, v in figures.items()}
    cpu = {k: [f[1] for f in v] for k, v in figures.items()}
    closing = {w.tag: w.close() or {} for w in workers}
    ref = workers[1]
    compare_header(f"(c) the same servers, {n:,} calls per round, {rounds} rounds", workers)
    labels = {"bare": "bare FastMCP (no guard: the workers' noise floor)",
              "guard": "Guard: limits + IP + audit (local caller)",
              "guard+key": "Guard: same + FASTMCP_GUARD_KEY (cached verify per call)",
              "guard+budgets": "this: guard+key + cost, credits, loop breaker enforced, _meta; "
                               "ref: guard+key"}  # fmt: skip
    rows = []
    for k in COMPARED_INPROC:
        a, b = wall[f"this:{k}"], wall[f"ref:{k}"]
        ca, cb = cpu[f"this:{k}"], cpu[f"ref:{k}"]
        ratio, per_round = paired(a, b)
        cratio, _ = paired(ca, cb)
        rows.append([labels[k], f"{med(a):.1f}", f"{med(b):.1f}", f"{ratio:.3f}x",
                     f"{med(ca):.1f}", f"{med(cb):.1f}", f"{cratio:.3f}x", per_round])  # fmt: skip
        if k == "guard+budgets":
            # Issue 12: every budget on costs at most +3 us per call over the guard before it.
            added = med([x - y for x, y in zip(a, b, strict=True)])
            SUMMARY.append((f"(c) budgets on: this - {ref.label} guard+key (wall, paired)",
                            "<= +3 us", f"{added:+.2f} us", verdict(added <= 3.0)))  # fmt: skip
        elif k != "bare":
            SUMMARY.append((f"(c) {k}: this / {ref.label} (wall, paired)", "<= 1.05x",
                            f"{ratio:.3f}x", verdict(ratio <= 1.05)))  # fmt: skip
    table(["server", "this us/call", f"{ref.label} us/call", "this/ref",
           "this CPU us", f"{ref.label} CPU us", "CPU this/ref", "wall this/ref per round"],
          rows, "lrrrrrrl")  # fmt: skip
    print("this/ref: median of the per-round ratios (both builds in the same round, one after the")
    print("other); CPU is the worker's whole process (client + server + the guard's threads).")
    for tag, st in closing.items():
        dropped = {k: v.get("dropped", 0) for k, v in st.items()}
        print(f"  audit events dropped in the {tag} worker: {dropped}")


# ---------------------------------------------------------------------------------------
# (d) over loopback HTTP
# ---------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: (d) with --against: the guard server on the baseline build.
REF = "guard@ref"


def proc_cpu_s(pid: int) -> float:
    """utime + stime of the whole process (all threads, live and exited), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One ``_server.py`` process; ``package`` (a baseline build) goes first on its path."""

    def __init__(self, kind: str, base: Path, profile: str | None = None,
                 package: Path | None = None, name: str | None = None) -> None:  # fmt: skip
        self.kind = kind
        self.dir = base / f"{name or kind}{'-' + profile if profile else ''}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        cmd = [
            sys.executable,
            str(HERE / "_server.py"),
            kind,
            "--port",
            str(self.port),
            "--dir",
            str(self.dir),
        ]
        if profile:
            cmd += ["--profile", profile]
        self.stderr = open(self.dir / "stderr.txt", "w")  # noqa: SIM115
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [*([str(package)] if package else []), str(HERE)])}  # fmt: skip
        env.pop("FASTMCP_GUARD_KEY", None)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.stderr, env=env)
        self.token = ""
        self.calls = 0

    def wait_ready(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.kind} server exited: {(self.dir / 'stderr.txt').read_text()[-2000:]}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                self.token = (self.dir / "token").read_text()
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.kind} server did not start in {timeout} s")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        return (self.dir / "stderr.txt").read_text()


async def http_round(srv: Server, n: int, warm: int) -> dict[str, float]:
    from fastmcp import Client
    from fastmcp.client.transports import StreamableHttpTransport

    transport = StreamableHttpTransport(srv.url, auth=srv.token or None)
    async with Client(transport) as c:
        call = c.call_tool
        for _ in range(warm):
            await call("echo", {"text": "hi"})
        lat = []
        gc.collect()
        cpu0 = proc_cpu_s(srv.pid)
        t0 = time.perf_counter()
        for _ in repeat(None, n):
            s = time.perf_counter()
            await call("echo", {"text": "hi"})
            lat.append(time.perf_counter() - s)
        wall = time.perf_counter() - t0
        cpu1 = proc_cpu_s(srv.pid)
    srv.calls += warm + n
    return {
        "calls_s": n / wall,
        "p50_ms": pct(lat, 50) * 1e3,
        "p99_ms": pct(lat, 99) * 1e3,
        "cpu_us": (cpu1 - cpu0) / n * 1e6,
    }


def bench_http(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    section("(d) end to end over loopback HTTP (streamable HTTP, one client, one-line tool)")
    kinds = ["bare", "static"]
    if core is not None:
        kinds.append("guard")
        if args.against_dir is not None:
            kinds.append(REF)
        if args.breakdown:
            kinds += ["guard-keys", "guard-noaudit"]
    servers = {k: Server(k, tmp / "http") for k in kinds if k != REF}
    if REF in kinds:  # the same guard server, on the baseline build
        servers[REF] = Server("guard", tmp / "http", package=args.against_dir, name="guard-ref")
    servers = {k: servers[k] for k in kinds}
    try:
        for s in servers.values():
            s.wait_ready()
        results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}

        async def main() -> None:
            for s in servers.values():  # first call per server: session set-up, argon2 once
                await http_round(s, 10, 20)
            for _ in range(args.rounds):
                for k, s in servers.items():
                    results[k].append(await http_round(s, args.http_calls, args.http_warm))

        asyncio.run(main())
        stats_text = {k: s.stop() for k, s in servers.items()}
    finally:
        for s in servers.values():
            if s.proc.poll() is None:
                s.proc.kill()

    def m(k: str, f: str) -> float:
        return med([r[f] for r in results[k]])

    labels = {
        "bare": "bare FastMCP (no auth)",
        "static": "FastMCP + StaticTokenVerifier (baseline)",
        "guard": "Guard: keys(SQLite) + limits + IP + audit",
        "guard-keys": "Guard: keys(SQLite) only",
        "guard-noaudit": "Guard: keys(SQLite) + limits + IP, no audit",
        REF: f"Guard @{args.against_label}: the same server, baseline build",
    }
    rows = []
    for k in kinds:
        rows.append(
            [
                labels[k],
                f"{m(k, 'calls_s'):,.0f}",
                f"{m(k, 'p50_ms'):.3f}",
                f"{m(k, 'p99_ms'):.3f}",
                f"{m(k, 'cpu_us'):,.0f}",
                f"{min(r['calls_s'] for r in results[k]):,.0f}-{max(r['calls_s'] for r in results[k]):,.0f}",
            ]
        )
    print(
        f"{args.http_calls:,} calls per round after {args.http_warm} warm-up calls, median of {args.rounds} "
        f"interleaved rounds ({' '.join(kinds)} ...); one server process each; server CPU = utime+stime "
        f"from /proc/<pid>/stat ({CLK_TCK} Hz ticks) over the measured calls."
    )
    table(
        ["server", "calls/s", "p50 ms", "p99 ms", "server CPU us/call", "calls/s min-max"],
        rows,
        "lrrrrr",
    )

    out: dict[str, Any] = {"results": results}
    if "guard" in kinds:
        mm_thr = m("guard", "calls_s") / m("static", "calls_s")
        mm_cpu = m("guard", "cpu_us") / m("static", "cpu_us")
        mm_p50 = m("guard", "p50_ms") - m("static", "p50_ms")
        # Per-round paired ratios (same round, adjacent runs): they cancel slow drifts of the machine.
        pairs = list(zip(results["guard"], results["static"], strict=True))
        pr_thr = [g["calls_s"] / s["calls_s"] for g, s in pairs]
        pr_cpu = [g["cpu_us"] / s["cpu_us"] for g, s in pairs]
        pr_p50 = [g["p50_ms"] - s["p50_ms"] for g, s in pairs]
        thr, cpu, p50 = med(pr_thr), med(pr_cpu), med(pr_p50)
        print()
        table(
            [
                "Guard vs Static",
                "median of paired",
                "median of medians",
                "per round",
                "target",
                "verdict",
            ],
            [
                [
                    "throughput",
                    f"{thr:.3f}x",
                    f"{mm_thr:.3f}x",
                    " ".join(f"{x:.2f}" for x in pr_thr),
                    ">= 0.95x",
                    verdict(thr >= 0.95),
                ],
                [
                    "server CPU per call",
                    f"{cpu:.3f}x",
                    f"{mm_cpu:.3f}x",
                    " ".join(f"{x:.2f}" for x in pr_cpu),
                    "<= 1.05x",
                    verdict(cpu <= 1.05),
                ],
                [
                    "p50 added (ms)",
                    f"{p50:+.3f}",
                    f"{mm_p50:+.3f}",
                    " ".join(f"{x:+.2f}" for x in pr_p50),
                    "<= 0.1 ms",
                    verdict(p50 <= 0.1),
                ],
            ],
            "lrrlll",
        )
        SUMMARY.append(
            ("(d) HTTP throughput Guard/Static", ">= 0.95x", f"{thr:.3f}x", verdict(thr >= 0.95))
        )
        SUMMARY.append(
            (
                "(d) HTTP server CPU/call Guard/Static",
                "<= 1.05x",
                f"{cpu:.3f}x",
                verdict(cpu <= 1.05),
            )
        )
        SUMMARY.append(
            (
                "(d) HTTP p50 added (Guard - Static)",
                "<= 0.1 ms",
                f"{p50:+.3f} ms",
                verdict(p50 <= 0.1),
            )
        )
        bare_cpu = m("bare", "cpu_us")
        print()
        print(
            f"Server CPU per call above bare FastMCP: Static {m('static', 'cpu_us') - bare_cpu:+,.0f} us, "
            f"Guard {m('guard', 'cpu_us') - bare_cpu:+,.0f} us"
            + (
                f", Guard keys only {m('guard-keys', 'cpu_us') - bare_cpu:+,.0f} us, Guard without audit "
                f"{m('guard-noaudit', 'cpu_us') - bare_cpu:+,.0f} us"
                if "guard-keys" in kinds
                else ""
            )
        )
        for k in ("guard", REF):
            if k not in servers:
                continue
            g, who = servers[k], "Guard" if k == "guard" else f"Guard @{args.against_label}"
            audit = g.dir / "audit.jsonl"
            if audit.exists():
                recs = [json.loads(x) for x in audit.read_text(encoding="utf-8").splitlines()]
                calls = sum(1 for x in recs if x.get("tool") == "echo" and x.get("status") == "ok")
                print(
                    f"{who} audit log: {len(recs):,} lines, {calls:,} of them 'ok' calls of echo, for "
                    f"{g.calls:,} tool calls made ({'every call recorded' if calls == g.calls else 'MISMATCH'}; "
                    f"other lines: {sorted({x.get('status') for x in recs if x.get('tool') != 'echo'})})"
                )
            for line in stats_text.get(k, "").splitlines():
                if line.startswith("GUARD_STATS "):
                    print(f"{who} counters at shutdown: " + line.removeprefix("GUARD_STATS "))
        if REF in kinds:
            compare_http(args, results)
    return out


def compare_http(args: argparse.Namespace, results: dict[str, list[dict[str, float]]]) -> None:
    """(d) --against: the guard server on this build and on the baseline's, per round."""
    label = args.against_label
    print()
    print(f"Against @{label}: the guard server (_server.py guard) on this build and on the baseline's "
          f"({args.against_dir}), adjacent in every round above; load average now {loadavg()}.")  # fmt: skip
    pairs = list(zip(results["guard"], results[REF], strict=True))
    rows = []
    for field, name, better in (("calls_s", "calls/s", "higher"), ("p50_ms", "p50 ms", "lower"),
                                ("p99_ms", "p99 ms", "lower"),
                                ("cpu_us", "server CPU us/call", "lower")):  # fmt: skip
        this = med([g[field] for g, _ in pairs])
        ref = med([b[field] for _, b in pairs])
        ratio, per_round = paired([g[field] for g, _ in pairs], [b[field] for _, b in pairs])
        rows.append([name, f"{this:,.3f}" if field.endswith("ms") else f"{this:,.0f}",
                     f"{ref:,.3f}" if field.endswith("ms") else f"{ref:,.0f}",
                     f"{ratio:.3f}x", better, per_round])  # fmt: skip
        if field == "calls_s":
            SUMMARY.append((f"(d) HTTP throughput this / @{label} (paired)", ">= 0.95x",
                            f"{ratio:.3f}x", verdict(ratio >= 0.95)))  # fmt: skip
        elif field == "cpu_us":
            SUMMARY.append((f"(d) HTTP server CPU/call this / @{label} (paired)", "<= 1.05x",
                            f"{ratio:.3f}x", verdict(ratio <= 1.05)))  # fmt: skip
    table(["guard server", "this", f"@{label}", "this/ref", "better", "this/ref per round"],
          rows, "lrrrll")  # fmt: skip
    print("this/ref: median of the per-round ratios; medians of the rounds in the other columns.")


# ---------------------------------------------------------------------------------------
# (e) profiles
# ---------------------------------------------------------------------------------------

AUTH_MARKERS = (
    "/auth/",
    "bearer_auth",
    "authentication.py",
    "auth_context",
    "fastmcp_guard",
    "dependencies.py",
)


def _short(path: str) -> str:
    for marker in ("site-packages/", "/work/main/python/", "lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def profile_server(kind: str, tool: str, args: argparse.Namespace, tmp: Path) -> Path | None:
    srv = Server(kind, tmp / "profile", profile=tool)
    try:
        srv.wait_ready()

        async def drive() -> None:
            from fastmcp import Client
            from fastmcp.client.transports import StreamableHttpTransport

            async with Client(StreamableHttpTransport(srv.url, auth=srv.token or None)) as c:
                for _ in range(100):
                    await c.call_tool("echo", {"text": "hi"})
                srv.proc.send_signal(signal.SIGUSR1)
                await asyncio.sleep(0.2)
                for _ in range(args.profile_calls):
                    await c.call_tool("echo", {"text": "hi"})
                srv.proc.send_signal(signal.SIGUSR2)
                for _ in range(100):
                    if (srv.dir / "profile.done").exists():
                        break
                    await asyncio.sleep(0.1)

        asyncio.run(drive())
    finally:
        srv.stop()
    return srv.dir if (srv.dir / "profile.done").exists() else None


IDLE = ("poll' of 'select.epoll", "select  ")


def report_cprofile(kind: str, d: Path, n: int) -> dict[str, float]:
    import pstats

    st = pstats.Stats(str(d / "profile.cprof"))
    entries = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        name = f"{func}  {_short(file)}:{line}"
        if any(i in name for i in IDLE):
            continue
        entries.append((name, nc, tt, ct, file))
    total = sum(e[2] for e in entries)
    print(
        f"\n[{kind}] cProfile, {n:,} calls: {total / n * 1e6:,.0f} us/call of own time outside the "
        f"idle epoll wait (cProfile inflates small functions: read counts and ranking, not absolutes)"
    )
    top = sorted(entries, key=lambda e: e[2], reverse=True)[:12]
    table(
        ["own us/call", "share", "calls/req", "function"],
        [
            [f"{e[2] / n * 1e6:.1f}", f"{e[2] / total * 100:.1f}%", f"{e[1] / n:.1f}", e[0]]
            for e in top
        ],
        "rrrl",
    )
    auth = [e for e in entries if any(mk in e[4] for mk in AUTH_MARKERS)]
    auth = sorted(auth, key=lambda e: e[2], reverse=True)[:14]
    own_auth = sum(e[2] for e in entries if any(mk in e[4] for mk in AUTH_MARKERS))
    print(
        f"[{kind}] auth / dependency / guard functions (own time; {own_auth / n * 1e6:.0f} us/call in all, "
        f"{own_auth / total * 100:.1f}% of the request's own time):"
    )
    table(
        ["own us/call", "calls/req", "function"],
        [[f"{e[2] / n * 1e6:.1f}", f"{e[1] / n:.1f}", e[0]] for e in auth],
        "rrl",
    )
    return {"total_us": total / n * 1e6, "auth_us": own_auth / n * 1e6}


def report_pyinstrument(kind: str, d: Path, n: int) -> None:
    """Top self time (sampled, wall clock on the event-loop thread), idle wait excluded."""
    data = json.loads((d / "profile.json").read_text())
    root = data.get("root_frame") or data
    selfs: dict[str, float] = {}

    def walk(fr: dict[str, Any]) -> None:
        k = f"{fr.get('function')}  {_short(fr.get('file_path') or fr.get('file_path_short') or '')}:{fr.get('line_no')}"
        child_time = sum(c.get("time", 0.0) for c in fr.get("children", []))
        selfs[k] = selfs.get(k, 0.0) + max(0.0, fr.get("time", 0.0) - child_time)
        for c in fr.get("children", []):
            walk(c)

    walk(root)
    idle = sum(
        v for k, v in selfs.items() if "epoll.poll" in k or k.startswith("poll ") or "[await]" in k
    )
    busy = sum(selfs.values()) - idle
    print(
        f"\n[{kind}] pyinstrument, {n:,} calls: {busy / n * 1e6:,.0f} us/call busy on the event-loop "
        f"thread (sampling overhead included), idle wait excluded; top self time:"
    )
    top = sorted(
        ((k, v) for k, v in selfs.items() if "epoll.poll" not in k),
        key=lambda kv: kv[1],
        reverse=True,
    )[:12]
    table(
        ["us/call", "share of busy", "frame"],
        [[f"{v / n * 1e6:,.1f}", f"{v / busy * 100:.1f}%", k] for k, v in top],
        "rrl",
    )


def _request_scope(token: str) -> dict[str, Any]:
    """An ASGI scope shaped like a fastmcp.Client tools/call POST (10 headers)."""
    headers = [
        (b"host", b"127.0.0.1:8765"),
        (b"accept", b"application/json, text/event-stream"),
        (b"accept-encoding", b"gzip, deflate"),
        (b"connection", b"keep-alive"),
        (b"user-agent", b"python-httpx/2.16.2"),
        (b"mcp-protocol-version", b"2025-11-25"),
        (b"mcp-session-id", b"0f3c2a9b8d7e4f1a9c6b5d4e3f2a1b0c"),
        (b"content-type", b"application/json"),
        (b"authorization", b"Bearer " + token.encode()),
        (b"content-length", b"93"),
    ]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/mcp",
        "raw_path": b"/mcp",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50123),
        "server": ("127.0.0.1", 8765),
    }


def _auth_stack(auth: Any, inner: Any) -> Any:
    """FastMCP's HTTP auth wiring around ``inner``: provider middleware + RequireAuthMiddleware."""
    from fastmcp.server.auth.middleware import RequireAuthMiddleware

    app = RequireAuthMiddleware(inner, auth.required_scopes, None, auth.challenge_scopes)
    for m in reversed(auth.get_middleware()):
        cls, a, kw = m
        app = cls(app, *a, **kw)
    return app


def bench_auth_isolated(args: argparse.Namespace, tmp: Path) -> None:
    """The HTTP auth path alone: the ASGI layers each provider installs, around a no-op app."""
    print("The auth path in isolation: the ASGI layers FastMCP installs for each provider (its")
    print(
        "get_middleware() + RequireAuthMiddleware on /mcp), driven in process around a no-op app with a"
    )
    print(
        "typical tools/call request (10 headers); and the verifier / backend calls alone. No network,"
    )
    print("no MCP, no profiler: these are the absolute costs the profiles below can only rank.")
    from fastmcp.server.auth.auth import AccessToken
    from fastmcp.server.auth.providers.jwt import StaticTokenVerifier
    from mcp.server.auth.middleware.bearer_auth import BearerAuthBackend
    from starlette.requests import HTTPConnection

    n, rounds = args.auth_calls, args.rounds_ops
    static_token = "static-bench-token-6f1d0c3b9a8e4f27b5c1d2e3f4a5b6c7"
    static = StaticTokenVerifier(
        tokens={static_token: {"client_id": "alice", "scopes": ["read:data"]}}
    )
    providers: dict[str, tuple[Any, str]] = {"static": (static, static_token)}
    guard = None
    if core is not None:
        from fastmcp_guard import AuditLog, FileBackend, Guard, IPPolicy, KeyStore, RateLimit

        g_mcp = _echo_server("guard-auth")
        guard = Guard(
            g_mcp,
            keys=KeyStore(backend="memory"),
            rate_limit=RateLimit(per_key=HIGH, global_limit=HIGH),
            ip=IPPolicy(allow=IP_ALLOW, deny=IP_DENY),
            audit=AuditLog(backend=FileBackend(str(tmp / "auth-iso-audit.jsonl"))),
        )
        key = guard.keys.create(name="alice", scopes=["read:data"], metadata={"team": "data"})
        guard.keys.core.verify(key.token or "", None)
        providers["guard"] = (guard.verifier, key.token or "")

    reached = [0]

    async def noop(scope: Any, receive: Any, send: Any) -> None:
        reached[0] += 1

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        return None

    def stack_case(app: Any, scope: dict[str, Any]) -> Callable[[], float]:
        async def go() -> float:
            t = time.perf_counter_ns()
            for _ in repeat(None, n):
                await app(dict(scope), receive, send)
            return (time.perf_counter_ns() - t) / n

        return lambda: loop.run_until_complete(go())

    def await_case(fn: Callable[..., Any], *a: Any) -> Callable[[], float]:
        async def go() -> float:
            t = time.perf_counter_ns()
            for _ in repeat(None, n):
                await fn(*a)
            return (time.perf_counter_ns() - t) / n

        return lambda: loop.run_until_complete(go())

    loop = asyncio.new_event_loop()
    cases: dict[str, Callable[[], float]] = {"noop": stack_case(noop, _request_scope("x"))}
    for name, (prov, tok) in providers.items():
        scope = _request_scope(tok)
        cases[f"{name}:stack"] = stack_case(_auth_stack(prov, noop), scope)
        cases[f"{name}:authenticate"] = await_case(
            BearerAuthBackend(prov).authenticate, HTTPConnection(scope)
        )
        cases[f"{name}:verify_token"] = await_case(prov.verify_token, tok)
    cases["AccessToken(...) validated"] = timed_loop(
        lambda: AccessToken(
            token=static_token,
            client_id="alice",
            scopes=["read:data"],
            expires_at=None,
            subject=None,
            claims={"client_id": "alice", "scopes": ["read:data"]},
        ),
        (),
        n,
    )
    cases["AccessToken.model_construct"] = timed_loop(
        lambda: AccessToken.model_construct(
            token=static_token,
            client_id="alice",
            scopes=["read:data"],
            expires_at=None,
            resource=None,
            subject=None,
            claims={"key_id": "k", "key_name": "alice"},
            original_client_id=None,
        ),
        (),
        n,
    )
    reached[0] = 0
    r = interleave(cases, rounds)
    loop.close()
    expected = n * rounds * (1 + len(providers))
    m = {k: med(v) for k, v in r.items()}
    base = m["noop"]
    rows = [["no-op app alone (scope copy + await)", f"{base / 1e3:.2f}", "", ""]]
    for name in providers:
        rows.append(
            [
                f"{name}: full auth stack per request",
                f"{(m[name + ':stack'] - base) / 1e3:.2f}",
                f"{m[name + ':authenticate'] / 1e3:.2f}",
                f"{m[name + ':verify_token'] / 1e3:.2f}",
            ]
        )
    print(
        f"{n:,} requests per round, median of {rounds} interleaved rounds; stack figures have the no-op "
        f"baseline subtracted; every request reached the app: {reached[0] == expected}"
    )
    table(
        ["path", "stack us/req", "BearerAuthBackend.authenticate us", "verify_token us"],
        rows,
        "lrrr",
    )
    print(
        f"AccessToken(...) with pydantic validation (StaticTokenVerifier builds one per request): "
        f"{m['AccessToken(...) validated'] / 1e3:.2f} us; AccessToken.model_construct: "
        f"{m['AccessToken.model_construct'] / 1e3:.2f} us (the guard builds one per key, "
        "validated, and reuses it while the key stays cached)"
    )
    if guard is not None:
        added = m["guard:stack"] - m["static:stack"]
        print(
            f"Guard's HTTP auth layer over Static's: {added / 1e3:+.2f} us per request "
            f"(IP check, X-API-Key mapping, request state, audit send-wrapper, cached verify)."
        )
        guard.close()


def bench_profiles(args: argparse.Namespace, tmp: Path) -> None:
    section(
        "(e) where the time goes: server-side profiles over HTTP (Static baseline, then the guard)"
    )
    bench_auth_isolated(args, tmp)
    kinds = ["static"] + (["guard"] if core is not None else [])
    have_pyi = True
    try:
        import pyinstrument  # noqa: F401
    except ImportError:
        have_pyi = False
        print("pyinstrument is not installed (pip install pyinstrument): cProfile only")
    for kind in kinds:
        d = profile_server(kind, "cprofile", args, tmp)
        if d:
            report_cprofile(kind, d, args.profile_calls)
        if have_pyi:
            d = profile_server(kind, "pyinstrument", args, tmp)
            if d and (d / "profile.json").exists():
                report_pyinstrument(kind, d, args.profile_calls)
                shutil.copy(d / "profile.txt", tmp / f"profile-{kind}.txt")
    if args.keep:
        print(f"\nprofiles kept under {tmp}")


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    # The back-to-back rounds fill the audit queue on purpose: its drops are counted in
    # the tables, so the lost-event warnings of the drop policy would only be noise here.
    logging.getLogger("fastmcp_guard.audit").setLevel(logging.ERROR)
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="smaller counts (about 1.5 minutes)")
    ap.add_argument(
        "--sections", help="which sections to run (default: abcdef; acd with --against)"
    )
    ap.add_argument(
        "--against",
        metavar="REF",
        help="(a), (c), (d): also time the guard built from commit REF, in the same run, and print "
        "this/REF ratios (REF is built once, release, into .cache/bench-baseline/<commit>, or "
        "into --against-path)",
    )
    ap.add_argument(
        "--against-path",
        metavar="DIR",
        help="the baseline build's directory (a built fastmcp_guard package, as --against leaves "
        "it); alone: use it as it is; with --against: build REF there if it is not there yet",
    )
    ap.add_argument("--worker", choices=["a", "c"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-dir", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, help="interleaved rounds for (d) (default 8; quick 3)")
    ap.add_argument(
        "--rounds-inproc", type=int, help="interleaved rounds for (c) (default 12; quick 5)"
    )
    ap.add_argument(
        "--http-calls",
        type=int,
        help="measured HTTP calls per server per round (default 800; quick 400)",
    )
    ap.add_argument(
        "--http-warm", type=int, default=20, help="warm-up calls per round (default 20)"
    )
    ap.add_argument(
        "--inproc-calls",
        type=int,
        help="in-process calls per server per round (default 700; quick 300)",
    )
    ap.add_argument(
        "--ops-calls", type=int, help="calls per round for (a) (default 100000; quick 30000)"
    )
    ap.add_argument(
        "--audit-events",
        type=int,
        help="events per run for (b) Python rows (default 200000; quick 50000)",
    )
    ap.add_argument(
        "--profile-calls",
        type=int,
        help="calls profiled per server in (e) (default 1000; quick 300)",
    )
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="(c), (d): also run partial guards (keys only, no audit, audit only, an empty middleware)",
    )
    ap.add_argument("--no-cargo", action="store_true", help="(b): do not run cargo bench")
    ap.add_argument(
        "--cargo-json", help="(b): use this core.rs JSON output instead of running cargo"
    )
    ap.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (profiles, logs)"
    )
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args)
    against = args.against or args.against_path
    args.sections = args.sections or ("acd" if against else "abcdef")
    q = args.quick
    args.rounds = args.rounds or (3 if q else 8)
    args.rounds_inproc = args.rounds_inproc or (5 if q else 12)
    args.rounds_ops = 3 if q else 7
    args.rounds_audit = 3 if q else 5
    args.http_calls = args.http_calls or (400 if q else 800)
    args.inproc_calls = args.inproc_calls or (300 if q else 700)
    args.ops_calls = args.ops_calls or (30_000 if q else 100_000)
    args.audit_events = args.audit_events or (50_000 if q else 200_000)
    args.profile_calls = args.profile_calls or (300 if q else 1000)
    args.auth_calls = 10_000 if q else 30_000
    args.bcrypt_runs = 3
    args.thread_checks = 5_000
    args.thread_limit = 1_000
    args.thread_runs = 3
    args.trickle_gap = 0.001
    args.trickle_events = 200 if q else 500
    args.rounds_trickle = 3 if q else 5

    import fastmcp

    started = time.perf_counter()
    print("fastmcp-guard benchmarks -- benches/bench_guard.py" + (" (--quick)" if q else ""))
    print(
        f"machine : {cpu_model()} x{os.cpu_count()} | {platform.system()} {platform.release()} | "
        f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB RAM"
    )
    print(
        f"python  : {platform.python_implementation()} {platform.python_version()} ({sys.executable})"
    )
    print(
        f"versions: fastmcp {fastmcp.__version__}, mcp {ver('mcp')}, starlette {ver('starlette')}, "
        f"uvicorn {ver('uvicorn')}, httpx2 {ver('httpx2')}, pydantic {ver('pydantic')}, bcrypt {ver('bcrypt')}, "
        f"pyinstrument {ver('pyinstrument')}"
    )
    print(
        f"guard   : fastmcp-guard {getattr(core, '__version__', '-')} "
        f"({'Rust core ' + Path(core.__file__).name + ', ' + so_build(core.__file__) if core else 'NOT importable: ' + str(GUARD_IMPORT_ERROR)}); "
        f"{rustc_version()}"
    )
    print(
        f"load    : {loadavg()} (1/5/15 min load average at start; other work on the machine skews absolutes, "
        f"interleaving protects the ratios)"
    )

    args.against_dir = against_package(args) if against else None
    if args.against_dir is not None:
        from _baseline import describe

        args.against_label = describe(args.against_dir)
        print(
            f"against : fastmcp-guard @{args.against_label} from {args.against_dir} "
            f"(rows marked @{args.against_label} / ref: its build, in worker and server processes)"
        )

    tmp = Path(tempfile.mkdtemp(prefix="fmg-bench-"))
    try:
        cargo = None
        if "a" in args.sections:
            bench_core_ops(args, tmp)
        if "b" in args.sections:
            section("(b0) cargo bench --bench core (pure Rust)")
            cargo = run_cargo_core(args, tmp)
            bench_audit(args, tmp, cargo)
        if "c" in args.sections:
            bench_inprocess(args, tmp)
        if "d" in args.sections:
            bench_http(args, tmp)
        if "e" in args.sections:
            bench_profiles(args, tmp)
        if "f" in args.sections:
            bench_audit_backends(args, tmp)

        section("Summary: targets")
        table(["figure", "target", "measured", "verdict"], [list(s) for s in SUMMARY], "llrl")
        print(
            f"\ntotal run time {time.perf_counter() - started:.0f} s; load average at the end {loadavg()}"
        )
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
