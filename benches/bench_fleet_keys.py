"""The fleet key stores (issue 5): revocation across two processes, and the verify cost.

    .venv/bin/python benches/bench_fleet_keys.py           # about 2.5 minutes
    .venv/bin/python benches/bench_fleet_keys.py --quick   # about 40 s

Set-up: a throw-away PostgreSQL cluster (``tests.fleet.postgres_server.PostgresServer``,
the Debian binaries) and ``redis-server`` (``tests.fleet.conftest.RedisServer``), both on
127.0.0.1, as the fleet tests start them (``scripts/test.sh`` installs the packages); a
SQLite file in a temporary directory. All are removed at the end (``--keep`` keeps the
directories, servers are always stopped). Node A is this process; each node B is this
file run again as a worker process (``--worker``), holding its own ``KeyStore``.

Tables:

(1) revocation propagation, two processes: A creates the keys (up front, then waits 1 s
    so that B's watcher has read those creations); for each key, B verifies it (now
    cached in B) and starts polling ``store.core.verify_cached(token)`` in a tight loop
    (``time.sleep(0)`` between calls), A calls ``revoke()``, and B reports the
    ``time.monotonic_ns()`` at which ``verify_cached`` first returned ``None``. The delay
    is measured from the instant A's ``revoke()`` returned. Both clocks are
    ``CLOCK_MONOTONIC``, one system-wide clock on Linux, so the two processes' readings
    are comparable. A negative delay means B stopped admitting before A's call returned.
    Also printed: the p99 measured from the instant A called ``revoke()``, A's
    ``revoke()`` duration, whether B's full verify then refuses the token, and "B cache
    retries": how often B's verify did not cache the token (the core does not cache a
    verify during which its key was invalidated; B verifies again).
    Rows: the PostgreSQL and Redis stores with the default options (change
    notifications, ``NOTIFY`` / pub/sub, plus the watcher reading changes every 0.25 s),
    the same with B's watcher off (``watch_interval_seconds=3600``: notifications alone),
    and the baseline, one SQLite file shared by two processes (its watcher polls every
    0.25 s). The revocations are interleaved (one per row in turn), each after a random
    pause of 0-250 ms, so that they land at random phases of the watchers. Target: p99
    <= 1 s for the PostgreSQL and Redis stores with the default options.
(2) cached verify: ``store.core.verify_cached(token)`` ns per call from Python, a loop of
    N calls, median over interleaved rounds, for the memory, SQLite, PostgreSQL and Redis
    stores (loop overhead included; the floor, a loop calling ``id(token)``, is printed).
    Target: PostgreSQL and Redis within noise of memory (<= 1.2x).
(3) uncached verify, for context: ``clear_cache()`` then ``store.core.verify(token)``
    (argon2id + one store read), median of interleaved runs; "store read" is the median
    minus memory's.
(4) argon2id runs under churn, before and after per-key cache epochs: node A (this
    process) churns other keys on the Redis store (each step creates a key and revokes
    it: a change every node hears of, by pub/sub and by its watcher) at a set rate, while
    two verifier processes verify the same fresh keys, ``--verifications`` times each,
    back to back: one runs the extension built from commit ``BASELINE_REF`` (one global
    invalidation epoch: an invalidation of any key stops every verification in flight
    from caching), the other this build (an invalidation stops only the verifications of
    its own key). The table gives the argon2id runs each needed. The baseline is built
    once (release) into ``.cache/bench-baseline/<commit>`` (a few minutes the first time).

Other work on the machine moves the absolute figures; the rounds are interleaved so
that a disturbance hits every row, and ratios are taken within the run.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))  # tests.fleet: the fixtures' server classes

import fastmcp_guard._core as core
from _baseline import baseline_package
from bench_guard import (
    cpu_model,
    interleave,
    loadavg,
    med,
    ns_fmt,
    pct,
    section,
    so_build,
    table,
    timed_loop,
    ver,
    verdict,
)
from fastmcp_guard import KeyStore

#: B gives up watching after this long (the cache TTL, 60 s, is the real bound).
WATCH_TIMEOUT_S = 10.0
#: B's watcher interval for the "notifications only" rows (the default is 0.25 s).
NOTIFY_ONLY_WATCH_S = 3600.0
#: The last commit whose verified-token cache had one global invalidation epoch: the
#: baseline of table (4).
BASELINE_REF = "40f06be"
BASE62 = string.digits + string.ascii_letters
SUMMARY: list[list[str]] = []


# ---------------------------------------------------------------------------------------
# node B: this file run with --worker
# ---------------------------------------------------------------------------------------


def open_store(backend: str, where: str, notify_only: bool = False) -> KeyStore:
    """A store with the default options, or with the watcher off (``notify_only``)."""
    if backend == "memory":
        return KeyStore(backend="memory")
    if backend == "sqlite":
        return KeyStore(backend="sqlite", path=where)
    if notify_only:
        return KeyStore(backend=backend, dsn=where, watch_interval_seconds=NOTIFY_ONLY_WATCH_S)
    return KeyStore(backend=backend, dsn=where)


def worker(backend: str, where: str, notify_only: bool) -> int:
    """Node B. Reads commands on stdin, one per line, answers one line each on stdout:

    ``cache TOKEN`` -> ``cached RETRIES`` (verified, and ``verify_cached`` now admits it);
    ``watch TOKEN`` -> ``watching``, then polls ``verify_cached`` until it returns
    ``None`` and answers ``refused T_NS CONFIRMED`` (``timeout`` after WATCH_TIMEOUT_S);
    ``build`` -> the path of the extension this process loaded;
    ``argon2 N TOKEN`` -> ``runs R``: R argon2id runs made by N verifies of TOKEN.
    """
    from fastmcp_guard._core import VerifyError

    store = open_store(backend, where, notify_only)
    if store._listener is not None and not store._listener.listening.wait(10):
        print("listener not listening", flush=True)
        return 1
    out: IO[str] = sys.stdout
    print("ready", flush=True)
    cached = store.core.verify_cached
    clock, nap = time.monotonic_ns, time.sleep
    for line in sys.stdin:
        cmd, _, token = line.strip().partition(" ")
        if cmd == "cache":
            # An invalidation of this key while its verify is in flight stops that verify
            # from caching (before per-key epochs, of any key): retry, and say how often.
            for attempt in range(5):
                store.core.verify(token, None)
                if cached(token) is not None:
                    out.write(f"cached {attempt}\n")
                    break
            else:
                out.write("not-cached\n")
        elif cmd == "watch":
            out.write("watching\n")
            out.flush()
            deadline = clock() + int(WATCH_TIMEOUT_S * 1e9)
            while cached(token) is not None:
                nap(0)
                if clock() > deadline:
                    break
            else:
                t = clock()
                try:
                    store.core.verify(token, None)
                    confirmed = 0
                except VerifyError:
                    confirmed = 1
                out.write(f"refused {t} {confirmed}\n")
                out.flush()
                continue
            out.write("timeout\n")
        elif cmd == "build":
            out.write(f"{core.__file__}\n")
        elif cmd == "argon2":
            n, _, token = token.partition(" ")
            before = store.core.stats()["argon2_runs"]
            for _ in range(int(n)):
                store.core.verify(token, None)
            out.write(f"runs {store.core.stats()['argon2_runs'] - before}\n")
        elif cmd == "quit":
            break
        out.flush()
    store.close()
    return 0


@dataclass
class NodeB:
    """A worker process and its pipes."""

    label: str
    backend: str
    where: str
    notify_only: bool
    log: Path
    #: Put first on the worker's ``sys.path`` (the baseline build of table (4)).
    package: Path | None = None
    proc: subprocess.Popen[str] = field(init=False)

    def start(self) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", self.backend,
               self.where] + (["--notify-only"] if self.notify_only else [])  # fmt: skip
        env = None if self.package is None else dict(os.environ, PYTHONPATH=str(self.package))
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, text=True, bufsize=1, cwd=ROOT,
                                         env=env)  # fmt: skip

    def wait_ready(self) -> None:
        self.expect("ready")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"node B ({self.label}) died:\n{self.log.read_text()}")
        return line

    def expect(self, want: str) -> None:
        got = self.read()
        if got != want:
            raise RuntimeError(f"node B ({self.label}): expected {want!r}, got {got!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------
# (1) revocation propagation
# ---------------------------------------------------------------------------------------


@dataclass
class Propagation:
    label: str
    a: KeyStore
    b: NodeB
    delays_ms: list[float] = field(default_factory=list)
    from_call_ms: list[float] = field(default_factory=list)
    revoke_ms: list[float] = field(default_factory=list)
    confirmed: int = 0
    timeouts: int = 0
    cache_retries: int = 0
    keys: list[tuple[str, str]] = field(default_factory=list)

    def prepare(self, n: int) -> None:
        """Create the keys up front (see ``bench_propagation``)."""
        for i in range(n):
            key = self.a.create(f"prop-{i}")
            self.keys.append((key.id, str(key.token)))

    def one(self, i: int, pause: float) -> None:
        key_id, token = self.keys[i]
        self.b.send(f"cache {token}")
        got = self.b.read().split()
        if got[0] != "cached":
            raise RuntimeError(f"node B ({self.label}) could not cache a token: {got}")
        self.cache_retries += int(got[1])
        time.sleep(pause)
        self.b.send(f"watch {token}")
        self.b.expect("watching")
        t0 = time.monotonic_ns()
        self.a.revoke(key_id)
        t1 = time.monotonic_ns()
        reply = self.b.read().split()
        self.revoke_ms.append((t1 - t0) / 1e6)
        if reply[0] == "timeout":
            self.timeouts += 1
            self.delays_ms.append(WATCH_TIMEOUT_S * 1e3)
            self.from_call_ms.append(WATCH_TIMEOUT_S * 1e3)
            return
        self.delays_ms.append((int(reply[1]) - t1) / 1e6)
        self.from_call_ms.append((int(reply[1]) - t0) / 1e6)
        self.confirmed += int(reply[2])


def bench_propagation(args: argparse.Namespace, rows: list[Propagation]) -> None:
    section(f"(1) revocation propagation, node A (this process) -> node B (another process): "
            f"{args.revocations} revocations per row, interleaved")  # fmt: skip
    # The keys are created first, then B's watchers get time to read those creations: a
    # watcher drops every key another node changed since its last read, a key B cached
    # after the change included, so a key created less than 0.25 s before B caches it
    # would leave B's cache again at B's next watcher tick.
    for r in rows:
        r.prepare(args.revocations)
        r.b.wait_ready()
    time.sleep(1.0)
    # A random pause (0-250 ms) before each revocation, so that revocations land at random
    # phases of the 0.25 s watchers (else the loop's period can lock onto theirs).
    rng = random.Random(5)
    for i in range(args.revocations):
        for r in rows:
            r.one(i, rng.uniform(0.0, 0.25))

    def ms(x: float) -> str:
        return f"{x:,.1f} ms" if abs(x) >= 1 else f"{x * 1e3:,.0f} us"

    base = next(r for r in rows if r.b.backend == "sqlite")
    base99 = pct(base.delays_ms, 99)
    out = []
    for r in rows:
        d = r.delays_ms
        out.append([r.label, ms(pct(d, 50)), ms(pct(d, 90)), ms(pct(d, 99)), ms(max(d)),
                    ms(min(d)), f"{pct(d, 99) / base99:.4f}x" if r is not base else "-",
                    ms(pct(r.from_call_ms, 99)), ms(med(r.revoke_ms)),
                    f"{r.confirmed}/{len(d)}", str(r.timeouts),
                    str(r.cache_retries)])  # fmt: skip
    table(["store (node B's options)", "p50", "p90", "p99", "max", "min", "p99 / SQLite's",
           "p99 from call", "A revoke() p50", "full verify refuses", "timeouts",
           "B cache retries"], out)  # fmt: skip
    print("delay = B's first verify_cached() -> None minus the instant A's revoke() returned "
          "(CLOCK_MONOTONIC, system-wide);\n'from call': minus the instant A called revoke(). "
          "Negative: B stopped admitting before A's revoke() returned.")  # fmt: skip
    for r in rows:
        if r.b.notify_only or r.b.backend == "sqlite":
            continue
        p99 = pct(r.delays_ms, 99)
        ok = p99 <= 1000.0 and r.timeouts == 0 and r.confirmed == len(r.delays_ms)
        print(f"{r.label}: p99 {ms(p99)} <= 1 s: {verdict(ok)}")
        SUMMARY.append([f"(1) revocation propagation p99, {r.b.backend}", "<= 1 s", ms(p99),
                        verdict(ok)])  # fmt: skip


# ---------------------------------------------------------------------------------------
# (2) cached verify, (3) uncached verify
# ---------------------------------------------------------------------------------------


def bench_cached(args: argparse.Namespace, stores: dict[str, KeyStore]) -> None:
    section(f"(2) cached verify, store.core.verify_cached(token) from Python: {args.rounds} "
            f"rounds x {args.calls:,} calls, interleaved, median")  # fmt: skip
    tokens: dict[str, str] = {}
    for name, store in stores.items():
        token = str(store.create(f"hot-{name}").token)
        store.core.verify(token, None)
        assert store.core.verify_cached(token) is not None, name
        tokens[name] = token
    cases: dict[str, Callable[[], float]] = {
        name: timed_loop(store.core.verify_cached, (tokens[name],), args.calls)
        for name, store in stores.items()
    }
    cases["floor"] = timed_loop(id, (tokens["memory"],), args.calls)
    res = interleave(cases, args.rounds)
    m = {k: med(v) for k, v in res.items()}
    mem = m["memory"]
    rows = [[name, ns_fmt(m[name]), ns_fmt(min(res[name])), ns_fmt(max(res[name])),
             f"{m[name] / mem:.2f}x"] for name in stores]  # fmt: skip
    rows.append(["floor: loop calling id(token)", ns_fmt(m["floor"]), ns_fmt(min(res["floor"])),
                 ns_fmt(max(res["floor"])), "-"])  # fmt: skip
    table(["store", "median ns/call", "best round", "worst round", "vs memory"], rows)
    for name in ("postgres", "redis"):
        ratio = m[name] / mem
        print(f"{name} cached verify within 1.2x of memory: {ratio:.2f}x, {verdict(ratio <= 1.2)}")
        measured = f"{ratio:.2f}x ({ns_fmt(m[name])} vs {ns_fmt(mem)})"
        SUMMARY.append([f"(2) cached verify, {name} / memory", "<= 1.2x", measured,
                        verdict(ratio <= 1.2)])  # fmt: skip


def bench_uncached(args: argparse.Namespace, stores: dict[str, KeyStore]) -> None:
    section(f"(3) uncached verify (argon2id + one store read), for context: {args.uncached} "
            f"runs per store, interleaved, median")  # fmt: skip
    tokens = {name: str(store.create(f"cold-{name}").token) for name, store in stores.items()}

    def case(store: KeyStore, token: str) -> Callable[[], float]:
        def run() -> float:
            store.core.clear_cache()
            t = time.perf_counter_ns()
            store.core.verify(token, None)
            return float(time.perf_counter_ns() - t)

        return run

    res = interleave({n: case(s, tokens[n]) for n, s in stores.items()}, args.uncached)
    m = {k: med(v) for k, v in res.items()}

    def signed(ns: float) -> str:
        return "-" + ns_fmt(-ns) if ns < 0 else ns_fmt(ns)

    rows = [[name, ns_fmt(m[name]), ns_fmt(pct(res[name], 90)),
             signed(m[name] - m["memory"]) if name != "memory" else "-",
             f"{m[name] / m['memory']:.2f}x"] for name in stores]  # fmt: skip
    table(["store", "median", "p90", "store read (median - memory's)", "vs memory"], rows)


# ---------------------------------------------------------------------------------------
# (4) argon2id runs under churn: one global epoch (baseline) vs per-key epochs
# ---------------------------------------------------------------------------------------


class Churn:
    """Node A's churn on other keys: each step creates a key (straight into the store,
    as a copy of ``template``'s record: no argon2id here) and revokes it through the
    ``KeyStore``, which announces the change. ``rate`` steps per second, in a thread."""

    def __init__(self, store: KeyStore, template: str, rate: float) -> None:
        self.store, self.rate = store, rate
        self.backend = store._fleet_backend
        self.record = self.backend.get(template)
        self.steps = 0
        self.elapsed = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="churn", daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            key_id = "fmg_key_" + "".join(secrets.choice(BASE62) for _ in range(16))
            self.backend.insert(dict(self.record, id=key_id, name=f"churn-{self.steps}",
                                     created_at=int(time.time() * 1000)))  # fmt: skip
            self.store.revoke(key_id)
            self.steps += 1
            self._stop.wait(max(0.0, start + self.steps / self.rate - time.monotonic()))
        self.elapsed = time.monotonic() - start

    def start(self) -> None:
        if self.rate > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def bench_churn(args: argparse.Namespace, store: KeyStore, before: NodeB,
                after: NodeB) -> None:  # fmt: skip
    keys, n = args.churn_keys, args.verifications
    section(f"(4) argon2id runs under churn on other keys (Redis store): {keys} fresh keys "
            f"per row, each verified {n} times back to back on each verifier node")  # fmt: skip
    for b in (before, after):
        b.send("build")
        print(f"  {b.label}: {b.read()}")
    template = store.create("churn-template").id
    rows, total = [], {before.label: 0, after.label: 0}
    for rate in args.churn_rates:
        tokens = [str(store.create(f"stable-{rate:g}-{i}").token) for i in range(keys)]
        time.sleep(1.0)  # the watchers read these creations before the first verify
        runs: dict[str, list[int]] = {before.label: [], after.label: []}
        churn = Churn(store, template, rate)
        churn.start()
        try:
            time.sleep(0.5 if rate > 0 else 0.0)
            for i, token in enumerate(tokens):
                for b in (before, after) if i % 2 == 0 else (after, before):
                    b.send(f"argon2 {n} {token}")
                    got = b.read().split()
                    if got[0] != "runs":
                        raise RuntimeError(f"{b.label}: {got}")
                    runs[b.label].append(int(got[1]))
        finally:
            churn.stop()
        achieved = churn.steps / churn.elapsed if churn.elapsed else 0.0
        cells = []
        for b in (before, after):
            r = runs[b.label]
            total[b.label] += sum(r)
            cells += [str(sum(r)), f"{sum(r) / len(r):.1f}", str(max(r)),
                      f"{sum(1 for x in r if x == 1)}/{len(r)}"]  # fmt: skip
        rows.append([f"{rate:g}/s ({achieved:.0f}/s)", f"{keys * n:,}", *cells,
                     f"{sum(runs[before.label]) / sum(runs[after.label]):.1f}x"])  # fmt: skip
    b_, a_ = "global epoch: ", "per-key: "
    table(["churn: target (achieved)", "verifies", b_ + "argon2 runs", "per key", "max",
           "cached by 1st", a_ + "argon2 runs", "per key", "max", "cached by 1st",
           "runs global / per-key"], rows)  # fmt: skip
    print("Each churn step creates a key and revokes it on node A; both verifier nodes hear "
          "of it (pub/sub, watcher every 0.25 s).\n'cached by 1st': keys whose first "
          "verify cached them (1 argon2 run for all the verifies). The two verifier nodes "
          "take turns per key.")  # fmt: skip
    SUMMARY.append(["(4) argon2id runs under churn, all rows: global epoch / per-key",
                    "fewer", f"{total[before.label]} / {total[after.label]}",
                    verdict(total[after.label] <= total[before.label])])  # fmt: skip


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def server_versions(pg_bindir: Path) -> str:
    def first(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return "-"

    pg = (first([str(pg_bindir / "postgres"), "--version"]).split() + ["-"] * 3)[2]
    redis = first(["redis-server", "--version"]).split()[2].removeprefix("v=")
    return f"PostgreSQL {pg}, redis-server {redis}"


def run(args: argparse.Namespace, tmp: Path) -> None:
    from tests.fleet.conftest import RedisServer
    from tests.fleet.postgres_server import PostgresServer

    pg = PostgresServer()
    (tmp / "redis").mkdir()
    redis_server = RedisServer(tmp / "redis")
    stores: dict[str, KeyStore] = {}
    nodes: list[NodeB] = []
    try:
        redis_server.start()
        print(f"  servers: {server_versions(pg.bindir)} (127.0.0.1 ports {pg.port}, "
              f"{redis_server.port}); psycopg {ver('psycopg')}, "
              f"redis-py {ver('redis')}")  # fmt: skip
        sqlite_path = str(tmp / "keys.db")
        where = {"memory": "", "sqlite": sqlite_path, "postgres": pg.dsn,
                 "redis": redis_server.url}  # fmt: skip
        stores = {name: open_store(name, w) for name, w in where.items()}
        for name in ("postgres", "redis"):
            listener = stores[name]._listener
            assert listener is not None and listener.listening.wait(10), name

        def node(label: str, backend: str, notify_only: bool = False,
                 package: Path | None = None) -> NodeB:  # fmt: skip
            log = tmp / f"node-b{len(nodes)}-{backend}{'-notify' if notify_only else ''}.log"
            b = NodeB(label, backend, where[backend], notify_only, log, package)
            b.start()
            nodes.append(b)
            return b

        prop: list[Propagation] = []
        if args.revocations:
            specs = [("PostgreSQL (defaults)", "postgres", False),
                     ("Redis (defaults)", "redis", False),
                     ("PostgreSQL, NOTIFY only", "postgres", True),
                     ("Redis, pub/sub only", "redis", True),
                     ("baseline: SQLite, 2 processes", "sqlite", False)]  # fmt: skip
            prop = [Propagation(lbl, stores[be], node(lbl, be, n)) for lbl, be, n in specs]
            bench_propagation(args, prop)
        bench_cached(args, stores)
        bench_uncached(args, stores)
        if args.churn_rates:
            baseline = baseline_package(args.baseline_ref)
            before = node(f"global epoch ({args.baseline_ref})", "redis", package=baseline)
            after = node("per-key epochs (this build)", "redis")
            for b in (before, after):
                b.wait_ready()
            bench_churn(args, stores["redis"], before, after)
    finally:
        for b in nodes:
            b.stop()
        for store in stores.values():
            store.close()
        redis_server.stop()
        if args.keep:
            pg.stop()
            print(f"kept {tmp} and {pg.dir} (servers stopped)")
        else:
            pg.remove()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts")
    parser.add_argument("--revocations", type=int, default=100, help="per row of table (1)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of table (2)")
    parser.add_argument("--calls", type=int, default=200_000, help="calls per round, table (2)")
    parser.add_argument("--uncached", type=int, default=20, help="runs per store, table (3)")
    parser.add_argument(
        "--churn-rates",
        type=float,
        nargs="*",
        default=[0, 10, 50, 200],
        help="churn steps per second, one row each, table (4) (none: skip)",
    )
    parser.add_argument("--churn-keys", type=int, default=10, help="keys per row, table (4)")
    parser.add_argument(
        "--verifications", type=int, default=20, help="verifies per key and node, table (4)"
    )
    parser.add_argument("--baseline-ref", default=BASELINE_REF,
                        help="the commit table (4) compares against")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    parser.add_argument("--worker", nargs=2, metavar=("BACKEND", "WHERE"), help=argparse.SUPPRESS)
    parser.add_argument("--notify-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker[0], args.worker[1], args.notify_only)
    if args.quick:
        args.revocations, args.rounds, args.calls, args.uncached = 30, 3, 50_000, 8
        args.churn_keys = 5

    started = time.perf_counter()
    print("fastmcp-guard fleet key stores benchmark -- benches/bench_fleet_keys.py"
          + (" (--quick)" if args.quick else ""))  # fmt: skip
    print(f"  machine: {cpu_model()}, {os.cpu_count()} cores, load {loadavg()} (1/5/15 min)")
    print(f"  extension: {Path(core.__file__).name}, {so_build(core.__file__)}; "
          f"fastmcp-guard {ver('fastmcp-guard')}; python {sys.version.split()[0]}")  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="fmg-bench-fleet-"))
    try:
        run(args, tmp)
        section("Summary: targets")
        table(["figure", "target", "measured", "verdict"], SUMMARY, "llrl")
        print(f"\ntotal run time {time.perf_counter() - started:.0f} s; "
              f"load average at the end {loadavg()}")  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
