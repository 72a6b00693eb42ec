"""Issue 12: what budgets add to the guard's request path, against main before it.

    .venv/bin/python benches/bench_budgets.py --against-path DIR [--calls N] [--rounds R]

DIR holds a release build of the baseline (``benches/_baseline.py`` makes one:
``baseline_package("04186bc", Path(DIR))``). Each build runs in its own worker process
(this file with ``--worker``; two ``fastmcp_guard._core`` cannot share a process) and
times the same thing: the guard's FastMCP middleware (``GuardMiddleware.on_call_tool``)
deciding one tool call end to end, with the tool itself a no-op (``call_next`` returns
a ready ``ToolResult``). That is the guard's own request path without FastMCP's, whose
~2 ms in-process cost and its noise (+-20 % a round here) would hide a few microseconds.

Servers, both builds (the same public API since 0.3):

- ``guard+key``: a memory key store, ``FASTMCP_GUARD_KEY`` (a cached verify per call),
  per-key and global limits (set high), a JSONL audit log. On this build the issue-12
  defaults are on: the loop breaker (here high, so it hashes but never trips), usage
  counting, ``_meta``.

This build only:

- ``guard+off``: guard+key with what issue 12 turns on by default off (no loop breaker,
  no usage counting, no ``_meta``): the request path's own change;
- ``guard+budgets``: the same, plus the tool costing 2 (``tool_costs``), the key having
  credits (spent from a lease), the loop breaker enforced.

A last table times each part alone on this build (``timeit``): the core's decision with
and without the loop breaker's hashing, spending credits from a lease, counting usage,
building the ``_meta``.

Rounds interleave the four cases in rotating order; figures are medians of per-round paired differences.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HIGH = "1000000000/minute"


def med(values: list[float]) -> float:
    return statistics.median(values)


# -- the worker: one build, its guards, timed on request -----------------------------------


def build(kind: str, tmp: Path) -> Any:
    from fastmcp import FastMCP
    from fastmcp_guard import AuditLog, FileBackend, Guard, KeyStore, RateLimit

    budgets = kind == "guard+budgets"
    off = kind == "guard+off"
    mcp: Any = FastMCP(kind)
    ks = KeyStore(backend="memory")
    key = ks.create(name="alice", scopes=["read:data"],
                    **({"credits": 10**15} if budgets else {}))  # fmt: skip
    rate: dict[str, Any] = {"per_key": HIGH, "global_limit": HIGH}
    try:
        from fastmcp_guard.rate import cost  # noqa: F401 - issue 12 is in this build

        rate["loop_breaker"] = None if off else HIGH
        if budgets:
            rate.update(loop_breaker_mode="enforce", tool_costs={"echo": 2})
    except ImportError:
        if budgets:
            raise
    os.environ["FASTMCP_GUARD_KEY"] = key.token or ""
    try:
        audit = AuditLog(backend=FileBackend(str(tmp / f"{kind}.jsonl")))
        extra = {"budget_meta": False, "usage": False} if off else {}
        return Guard(mcp, keys=ks, rate_limit=RateLimit(**rate), audit=audit, **extra)
    finally:
        del os.environ["FASTMCP_GUARD_KEY"]


def worker(kinds: list[str], calls: int) -> int:
    from fastmcp.server.middleware import MiddlewareContext
    from fastmcp.tools.base import ToolResult
    from mcp.types import CallToolRequestParams, TextContent

    tmp = Path(tempfile.mkdtemp(prefix="fmg-bench-budgets-"))
    guards = {k: build(k, tmp) for k in kinds}

    async def main() -> None:
        contexts = {k: MiddlewareContext(message=CallToolRequestParams(
            name="echo", arguments={"text": "hi", "n": 3, "flag": True})) for k in guards}  # fmt: skip

        async def call_next(_: Any) -> ToolResult:
            return ToolResult(content=[TextContent(type="text", text="hi")])

        for k, g in guards.items():  # warm up; and check the path works
            for _ in range(200):
                result = await g.middleware.on_call_tool(contexts[k], call_next)
                assert not result.is_error, result
        print(json.dumps({"ready": kinds}), flush=True)
        loop = asyncio.get_running_loop()
        while True:
            name = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if name in ("", "quit"):
                break
            mw, ctx = guards[name].middleware, contexts[name]
            gc.collect()
            t = time.perf_counter()
            for _ in range(calls):
                await mw.on_call_tool(ctx, call_next)
            print(json.dumps((time.perf_counter() - t) / calls * 1e6), flush=True)

    asyncio.run(main())
    for g in guards.values():
        g.close()
    return 0


# -- the parts, this build only ---------------------------------------------------------------


def parts(calls: int) -> None:
    """What each budget adds on the request path, timed alone (``timeit``, best of 7):
    the operation the middleware runs, against the operation it replaces or nothing."""
    import timeit

    from fastmcp.tools.base import ToolResult
    from fastmcp_guard._core import Limiter
    from fastmcp_guard.budget import budget_meta
    from fastmcp_guard.middleware import Caller, _set_meta
    from mcp.types import TextContent

    tmp = Path(tempfile.mkdtemp(prefix="fmg-bench-budgets-"))
    guard = build("guard+budgets", tmp)
    key = guard.keys.list()[0].id
    plain = Limiter(per_key=HIGH, global_limit=HIGH)
    looped = Limiter(per_key=HIGH, global_limit=HIGH)
    looped.set_loop_breaker(HIGH, True)
    args = {"text": "hi", "n": 3, "flag": True}
    verdict = guard.rate_limit.call(key, "echo", 2, args)
    caller = Caller(key, key, "alice", [], {}, None, None, {"shadow": False})
    result = ToolResult(content=[TextContent(type="text", text="hi")])
    book, usage = guard.credits, guard.usage
    assert book is not None and usage is not None
    import asyncio

    asyncio.run(book.acquire(key, 2))  # a lease to spend from

    def ns(fn: Any) -> float:
        return min(timeit.repeat(fn, number=calls, repeat=7)) / calls * 1e9

    rows = [
        ("empty call (the loop's floor)", ns(lambda: None)),
        ("Limiter.check(key, tool): the 0.2-era decision", ns(lambda: plain.check(key, "echo"))),
        ("Limiter.call(key, tool, 1, args), no loop breaker",
         ns(lambda: plain.call(key, "echo", 1, args))),
        ("Limiter.call(key, tool, 1, args), loop breaker: hashes 3 arguments",
         ns(lambda: looped.call(key, "echo", 1, args))),
        ("CreditBook.spend(key, 2), paid from the lease", ns(lambda: book.spend(key, 2))),
        ("Usage.record(key, tool, 'ok', 2, ms)",
         ns(lambda: usage.record(key, "echo", "ok", 2, 1.5))),
        ("budget_meta() + _set_meta(): the _meta of one result",
         ns(lambda: _set_meta(result, budget_meta(guard, caller, verdict)))),
    ]  # fmt: skip
    guard.close()
    print(f"\nparts (this build, timeit best of 7 x {calls:,} calls, ns per call, the floor included)")
    for name, value in rows:
        print(f"  {name:70} {value:8.0f}")


# -- the parent ------------------------------------------------------------------------------


class Worker:
    def __init__(self, package: Path | None, kinds: list[str], calls: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASTMCP_GUARD_")}
        env["FASTMCP_GUARD_CONFIG"] = "off"
        if package is not None:
            env["PYTHONPATH"] = str(package)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", ",".join(kinds), "--calls", str(calls)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=HERE,
        )  # fmt: skip
        self.core = ""
        assert self.proc.stdout is not None
        json.loads(self.proc.stdout.readline())

    def run(self, kind: str) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(kind + "\n")
        self.proc.stdin.flush()
        return float(json.loads(self.proc.stdout.readline()))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against-path", help="the baseline build's directory")
    ap.add_argument("--calls", type=int, default=20_000, help="calls per case and round")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--parts-calls", type=int, default=100_000,
                    help="calls per timeit round of the parts table")  # fmt: skip
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker.split(","), args.calls)
    if not args.against_path:
        ap.error("--against-path DIR (a release build of the baseline) is required")
    ref_dir = Path(args.against_path)
    label = (ref_dir / "COMMIT").read_text().strip()[:7] if (ref_dir / "COMMIT").exists() else "ref"
    this = Worker(None, ["guard+off", "guard+key", "guard+budgets"], args.calls)
    ref = Worker(ref_dir, ["guard+key"], args.calls)
    cases = [("this", this, "guard+key"), ("ref", ref, "guard+key"),
             ("this", this, "guard+budgets"), ("this", this, "guard+off")]  # fmt: skip
    out: dict[str, list[float]] = {f"{w}:{k}": [] for w, _, k in cases}
    for r in range(args.rounds):
        order = cases[r % len(cases) :] + cases[: r % len(cases)]
        for w, worker_, kind in order:
            out[f"{w}:{kind}"].append(worker_.run(kind))
    this.close()
    ref.close()
    base = out["ref:guard+key"]
    print(f"fastmcp-guard issue 12: the guard's middleware deciding one tool call (the tool a "
          f"no-op), {args.calls:,} calls per case and round, {args.rounds} interleaved rounds; "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"{'case':64} {'us/call':>8} {'vs @' + label:>12} {'ratio':>7}")
    rows = [("ref:guard+key", f"@{label} guard+key (main before issue 12)"),
            ("this:guard+off", "this guard+key, issue 12 off (no loop breaker, usage, _meta)"),
            ("this:guard+key", "this guard+key (loop breaker hashing, usage, _meta on)"),
            ("this:guard+budgets", "this + cost 2, credits, loop breaker enforced")]  # fmt: skip
    added = {}
    for key, name in rows:
        diff = med([a - b for a, b in zip(out[key], base, strict=True)])
        ratio = med([a / b for a, b in zip(out[key], base, strict=True)])
        added[key] = diff
        print(f"{name:64} {med(out[key]):8.2f} {diff:+12.2f} {ratio:6.2f}x")
    verdict = "met" if added["this:guard+budgets"] <= 3.0 else "NOT met"
    print(f"\nbudgets on, added per call: {added['this:guard+budgets']:+.2f} us "
          f"(target <= +3 us): {verdict}")  # fmt: skip
    parts(args.parts_calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
