"""Usage (issue 12): the recording hot path and ``usage`` over 1,000,000 recorded calls.

    .venv/bin/python benches/bench_usage.py            # about 1 min
    .venv/bin/python benches/bench_usage.py --quick    # 200,000 calls, fewer rounds

(1) ``record``: ns per call of ``Usage.record`` (the Rust ``UsageBook.record``, a bound
    method) beside a pure-Python dict aggregator doing the same counting (per key x tool x
    UTC day: calls, errors, cost, duration, refusals by kind; without the Rust book's lock
    and bounds), and beside the loop's floor (a no-op method of the same arity). Rounds
    interleaved (A B C A B C ...); medians; the ratio is Rust / Python of the medians,
    floor included and floor subtracted.
(2) ``usage`` over N recorded calls (default 1,000,000) in two shapes, each recorded through
    the book over 30 UTC days ending today, flushed into a real SQLite key store file (one
    transaction per flush; "spread" flushes once a day so the book never folds), then
    ``Usage.query`` by day / tool / key / with filters (median of the rounds, in process) and
    the ``fastmcp-guard usage`` CLI as a real process (process start included), median of
    the rounds:
      dense:  20 keys x 10 tools x 30 days   =   6,000 stored rows;
      spread: 500 keys x 20 tools x 30 days  = 300,000 stored rows.
    Every query's total is checked against the number of calls recorded.
The target ("usage over 1,000,000 recorded calls answers in under 1 s") is checked on the
slowest query and the slowest CLI run.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import fastmcp_guard._core as core
from bench_guard import cpu_model, loadavg, section, so_build, table, verdict
from fastmcp_guard import KeyStore
from fastmcp_guard.usage import Usage

GUARD = ROOT / ".venv" / "bin" / "fastmcp-guard"
KINDS = ["ok"] * 18 + ["error", "rate_limited"]  # 90% ok, 5% error, 5% refused


class PyBook:
    """The pure-Python baseline: the same aggregation in a dict."""

    def __init__(self) -> None:
        self.rows: dict[tuple[int, str, str], list[Any]] = {}

    def record(self, key_id: str, tool: str, kind: str, cost: int, duration_ms: float) -> None:
        k = (int(time.time()) // 86400, key_id, tool)
        r = self.rows.get(k)
        if r is None:
            r = self.rows[k] = [0, 0, 0, 0.0, {}]
        if kind == "ok" or kind == "error":
            r[0] += 1
            if kind == "error":
                r[1] += 1
            r[2] += cost
            r[3] += duration_ms
        else:
            r[4][kind] = r[4].get(kind, 0) + 1


class Floor:
    def record(self, key_id: str, tool: str, kind: str, cost: int, duration_ms: float) -> None:
        pass


def time_records(record: Any, n: int) -> float:
    """ns per call of ``record`` over ``n`` calls on 20 keys x 10 tools (rows exist)."""
    keys = [f"fmg_key_{i:02d}" for i in range(20)]
    tools = [f"tool_{i}" for i in range(10)]
    args = [(keys[i % 20], tools[i % 10], KINDS[i % 20]) for i in range(1000)]
    for k, t, kind in args:
        record(k, t, kind, 1, 0.5)  # rows exist before timing
    reps = n // 1000
    gc.collect()
    start = time.perf_counter_ns()
    for _ in range(reps):
        for k, t, kind in args:
            record(k, t, kind, 1, 0.5)
    return (time.perf_counter_ns() - start) / (reps * 1000)


def bench_record(n: int, rounds: int) -> None:
    section(f"(1) record: ns per call, {n:,} calls a round, median of {rounds} rounds")
    usage = Usage(flush_interval=0)
    cases = {"Usage.record (Rust book)": usage.record, "pure-Python dict aggregator":
             PyBook().record, "floor (no-op method)": Floor().record}  # fmt: skip
    out: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            out[name].append(time_records(fn, n))
    med = {k: statistics.median(v) for k, v in out.items()}
    floor = med["floor (no-op method)"]
    rows = [[k, f"{m:,.0f}", f"{min(out[k]):,.0f}", f"{max(out[k]):,.0f}",
             "-" if k.startswith("floor") else f"{m - floor:,.0f}"] for k, m in med.items()]  # fmt: skip
    table(["case", "median ns", "min ns", "max ns", "minus floor ns"], rows)
    rust, py = med["Usage.record (Rust book)"], med["pure-Python dict aggregator"]
    print()
    print(f"ratio Rust / Python: {rust / py:.2f} (floor included), "
          f"{(rust - floor) / max(py - floor, 1e-9):.2f} (floor subtracted)")  # fmt: skip
    usage.close()


def fill(usage: Usage, n: int, n_keys: int, n_tools: int, days: int) -> tuple[float, float, int]:
    """Record ``n`` calls over the last ``days`` days; flush after each day. Returns
    (seconds recording, seconds flushing, flushes)."""
    today = int(usage.book.today())
    keys = [f"fmg_key_{i:04d}" for i in range(n_keys)]
    tools = [f"tool_{i:02d}" for i in range(n_tools)]
    per_day = n // days
    rec = usage.record_at
    t_rec = t_flush = 0.0
    flushes = 0
    for d in range(days):
        day = today - days + 1 + d
        count = per_day if d < days - 1 else n - per_day * (days - 1)
        t0 = time.perf_counter()
        for i in range(count):
            rec(keys[i % n_keys], tools[(i // n_keys) % n_tools], KINDS[i % 20], 2, 1.5, day)
        t1 = time.perf_counter()
        usage.flush()
        t_flush += time.perf_counter() - t1
        t_rec += t1 - t0
        flushes += 1
    return t_rec, t_flush, flushes


def _stdout(argv: list[str], env: dict[str, str], cwd: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, env=env,
                          cwd=cwd).stdout  # fmt: skip


def med_time(fn: Any, rounds: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(rounds):
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def bench_usage(n: int, rounds: int) -> list[float]:
    worst: list[float] = []
    for shape, n_keys, n_tools in (("dense", 20, 10), ("spread", 500, 20)):
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "keys.db"
            store = KeyStore(backend="sqlite", path=db)
            usage = Usage.for_store(store, flush_interval=0)
            t_rec, t_flush, flushes = fill(usage, n, n_keys, n_tools, 30)
            stored_rows = n_keys * n_tools * 30
            section(f"(2) usage over {n:,} calls, shape {shape}: {n_keys} keys x {n_tools} "
                    f"tools x 30 days = {stored_rows:,} stored rows, SQLite {db.stat().st_size:,} "
                    "bytes")  # fmt: skip
            print(f"recorded through the book: {t_rec:.2f} s ({t_rec / n * 1e9:,.0f} ns/call with "
                  f"the loop); {flushes} flushes: {t_flush:.2f} s in all")  # fmt: skip
            queries = {
                "query(by='day')": {"by": "day"},
                "query(by='tool')": {"by": "tool"},
                "query(by='key')": {"by": "key"},
                "query(by='day', since='7d')": {"by": "day", "since": "7d"},
                "query(key_id=one, by='tool')": {"key_id": "fmg_key_0001", "by": "tool"},
            }
            rows = []
            for name, kwargs in queries.items():
                secs, report = med_time(functools.partial(usage.query, **kwargs), rounds)
                if "key_id" not in name and "since" not in name:
                    assert report.totals["calls"] + report.totals["refusals"].get(
                        "rate_limited", 0) == n, report.totals  # fmt: skip
                worst.append(secs)
                rows.append([name, f"{secs * 1000:,.1f}", f"{len(report.rows):,}",
                             f"{report.totals['calls']:,}"])  # fmt: skip
            env = {k: v for k, v in os.environ.items() if not k.startswith("FASTMCP_GUARD_")}
            for by in ("day", "tool", "key"):
                argv = [str(GUARD), "--db", str(db), "usage", "--by", by]

                run = functools.partial(_stdout, argv, env, tmp)
                secs, out = med_time(run, rounds)
                worst.append(secs)
                rows.append([f"CLI: fastmcp-guard usage --by {by}", f"{secs * 1000:,.1f}",
                             f"{out.count(chr(10)):,} lines", "-"])  # fmt: skip
            secs, _ = med_time(lambda: subprocess.run([str(GUARD), "--version"],
                                                      capture_output=True, check=True), rounds)  # fmt: skip
            rows.append(["floor: fastmcp-guard --version", f"{secs * 1000:,.1f}", "-", "-"])
            table(["what", "median ms", "rows out", "calls"], rows)
            usage.close()
            store.close()
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200,000 calls, fewer rounds")
    ap.add_argument("--calls", type=int, help="calls recorded in (2) (default 1,000,000)")
    ap.add_argument("--rounds", type=int, help="rounds per figure (default 7; quick 3)")
    args = ap.parse_args()
    n = args.calls or (200_000 if args.quick else 1_000_000)
    rounds = args.rounds or (3 if args.quick else 7)
    print(f"fastmcp-guard {core.__version__} ({so_build(core.__file__)}), Python "
          f"{sys.version.split()[0]}, {cpu_model()}, {os.cpu_count()} cpus, load {loadavg()}")  # fmt: skip
    bench_record(200_000 if args.quick else 1_000_000, rounds)
    worst = bench_usage(n, rounds)
    section("summary")
    slowest = max(worst)
    print(f"usage over {n:,} recorded calls answers in under 1 s: {verdict(slowest < 1.0)} "
          f"(slowest query or CLI run: {slowest * 1000:,.0f} ms)")  # fmt: skip


if __name__ == "__main__":
    main()
