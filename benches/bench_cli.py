"""The ops CLI end to end (issue 3's figures): the real ``.venv/bin/fastmcp-guard``
command, each figure beside its baseline, measured in the same run.

    .venv/bin/python benches/bench_cli.py            # full run: 1,000,000-line log (about 2 min)
    .venv/bin/python benches/bench_cli.py --quick    # 200,000 lines, fewer rounds (about 20 s)

Every command runs as its own process, started from a small wrapper (GNU
``time -f %M``) that reports the child's own peak RSS (``ru_maxrss``); the
seconds are spawn to reaped, so they include process start (and the wrapper's
~1 ms, printed in the header). Stdout goes to a file. Runs are interleaved
(A B A B ...) and the figures are medians. The tables (see benches/README.md):

  (1) audit query: ``fastmcp-guard --audit LOG audit query --key alice --tool
      get_data --status ok --json`` against ``jq -c 'select(...)'`` with the same
      filter, over the same generated JSONL log. Seconds, peak RSS, matched lines;
      the speed-up is jq / guard, the median of the per-round ratios. Both outputs
      are checked to hold the same records (count, ts values, every field) and the
      count the generator knows.
  (2) audit export: ``fastmcp-guard --audit LOG audit export --format csv --out
      OUT`` against a pure-Python export (``json.loads`` per line + ``csv.writer``,
      the same columns) run as ``python -c``. Lines/s = log lines / seconds; the
      two CSV files are compared byte for byte.
  (3) keys create: ``fastmcp-guard keys create --name bench --scopes a,b --db DB``
      in a fresh directory per run, beside the floor: ``python -c pass`` (the
      interpreter the console script runs on) and ``fastmcp-guard --version``.
  (4) audit verify: ``fastmcp-guard audit verify LOG`` over the same chained log (every
      line's BLAKE3 link recomputed), beside ``wc -l LOG`` (reading the file: the floor).

The log is written by the real audit writer (``fastmcp_guard._core.AuditWriter``),
about 345 bytes a line: 50 key names, 20 tools, statuses mostly ``ok``.
The summary lists each target of issue 3 with the figure measured in this run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import fastmcp_guard._core as core
from bench_guard import cpu_model, loadavg, section, so_build, table, verdict

BIN = ROOT / ".venv" / "bin"
GUARD = BIN / "fastmcp-guard"
PY = BIN / "python"  # the console script's interpreter (its shebang)

KEY, TOOL, STATUS = "alice", "get_data", "ok"
JQ_FILTER = (
    f'select((.key_id=="{KEY}" or .key_name=="{KEY}") and .tool=="{TOOL}" and .status=="{STATUS}")'
)

#: The pure-Python export baseline, run as ``python -c PY_EXPORT LOG OUT``: the CSV
#: columns and cell rules of the core's exporter (src/audit/scan.rs), done with the
#: standard library (json.loads per line, csv.writer).
PY_EXPORT = """
import csv, json, sys
FIXED = ("ts", "key_id", "key_name", "tool", "scopes", "duration_ms", "status", "error",
         "input_args", "output_preview", "client_ip", "metadata")
def cell(v):
    if v is None:
        return ""
    if isinstance(v, str):
        return "'" + v if v[:1] in ("=", "+", "-", "@", "\\t", "\\r") else v
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False)
with open(sys.argv[1], encoding="utf-8") as src, \\
        open(sys.argv[2], "w", encoding="utf-8", newline="") as dst:
    w = csv.writer(dst)
    w.writerow([*FIXED, "extra"])
    for line in src:
        if not line.strip():
            continue
        d = json.loads(line)
        scopes = d.pop("scopes", None)
        row = [cell(d.pop(f, None)) for f in FIXED]
        row[4] = cell(" ".join(scopes)) if scopes else ""
        row.append(json.dumps(d, separators=(",", ":"), ensure_ascii=False) if d else "")
        w.writerow(row)
"""

SUMMARY: list[tuple[str, str, str, str]] = []  # (figure, target, measured, verdict)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One child process: wall seconds (spawned to reaped) and its own peak RSS."""

    seconds: float
    maxrss_mb: float


def child_env() -> dict[str, str]:
    """The environment without FASTMCP_GUARD_* (no stray configuration)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FASTMCP_GUARD_")}


ENV = child_env()

#: The fallback RSS wrapper (when GNU time is missing): spawn argv[2:], write the
#: child's ru_maxrss (KiB) to argv[1], exit with its code. Its own RSS is the floor.
WRAP = (
    "import os,sys\n"
    "pid=os.posix_spawn(sys.argv[2],sys.argv[2:],os.environ)\n"
    "_,st,ru=os.wait4(pid,0)\n"
    "open(sys.argv[1],'w').write(str(ru.ru_maxrss))\n"
    "sys.exit(os.waitstatus_to_exitcode(st))\n"
)


def rss_wrapper() -> list[str]:
    """The prefix that runs a command and writes its peak RSS (KiB) to the next argument.

    A child's ru_maxrss also counts the memory of the process it was forked from (Linux
    keeps the pre-exec high-water mark), so the measured command is started from a small
    process: GNU time (about 1 MB) if present, else ``python -I -S`` (about 8 MB).
    """
    gnu = Path("/usr/bin/time")
    if gnu.exists():
        probe = [str(gnu), "-f", "%M", "-o", os.devnull, "/bin/true"]
        if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
            return [str(gnu), "-f", "%M", "-o"]
    return [str(PY), "-I", "-S", "-c", WRAP]


WRAPPER = rss_wrapper()


def spawn(argv: list[str], stdout: Path, cwd: Path | None = None, *, wrap: bool = True) -> Run:
    """Run ``argv`` (through :data:`WRAPPER`) with stdout to ``stdout``; raise if it fails.

    ``wrap=False`` runs it directly (only to measure the wrapper: no RSS then)."""
    err = stdout.with_suffix(stdout.suffix + ".err")
    rss = stdout.with_suffix(stdout.suffix + ".rss")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(stdout), flags, 0o600),
        (os.POSIX_SPAWN_OPEN, 2, str(err), flags, 0o600),
    ]
    full = [*WRAPPER, str(rss), *argv] if wrap else argv
    with contextlib.chdir(cwd) if cwd else contextlib.nullcontext():
        t = time.perf_counter()
        pid = os.posix_spawn(full[0], full, ENV, file_actions=actions)
        _, status, _ = os.wait4(pid, 0)
        seconds = time.perf_counter() - t
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise RuntimeError(f"{argv!r} exited {rc}: {err.read_text()[-2000:]}")
    if not wrap:
        return Run(seconds, float("nan"))
    return Run(seconds, int(rss.read_text().split()[-1]) / 1024)  # Linux: KiB


def wrapper_cost(tmp: Path) -> str:
    """The wrapper's floor: RSS it reports for /bin/true, and the time it adds."""
    true = ["/bin/true"]
    runs = [(spawn(true, tmp / "true.out"), spawn(true, tmp / "true.out", wrap=False))
            for _ in range(21)]  # fmt: skip
    added = med([w.seconds - d.seconds for w, d in runs])
    return (
        f"{' '.join(WRAPPER[:3])}: reads {med([w.maxrss_mb for w, _ in runs]):.1f} MB for "
        f"/bin/true (the floor), adds {added * 1000:.1f} ms to each time"
    )


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def secs(s: float) -> str:
    return f"{s * 1000:,.0f} ms" if s < 1 else f"{s:,.2f} s"


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def first_difference(a: Path, b: Path) -> str:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for i, (la, lb) in enumerate(zip(fa, fb, strict=False), 1):
            if la != lb:
                return f"line {i}: {la[:120]!r} vs {lb[:120]!r}"
    return "one file is a prefix of the other"


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False, env=ENV)
    except OSError:
        return "-"
    return (out.stdout or out.stderr).strip().splitlines()[0] if out.returncode == 0 else "-"


def ensure_jq() -> str:
    """The jq binary, installed with apt-get if missing (apt-get update only on failure)."""
    found = shutil.which("jq")
    if found:
        return found
    print("jq not found: apt-get install -y jq")

    def apt(*cmd: str) -> int:
        return subprocess.run(["apt-get", *cmd], stdout=subprocess.DEVNULL, check=False).returncode

    if apt("install", "-y", "jq") != 0:
        apt("update")
        apt("install", "-y", "jq")
    found = shutil.which("jq")
    if not found:
        raise SystemExit("jq is needed for the baseline of (1) and could not be installed")
    return found


# ---------------------------------------------------------------------------------------
# the log
# ---------------------------------------------------------------------------------------

NAMES = (
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
    "mallory", "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter",
    "xena", "yann", "zoe", "ci-bot", "deploy-bot", "etl", "nightly", "reporting", "grafana",
    "airflow", "backup", "search-api", "billing-svc", "crm-sync", "data-team", "ml-train",
    "ml-serve", "notebook", "support", "sales", "ops-oncall", "security", "audit-ro",
    "partner-acme", "partner-globex", "mobile-app", "web-app", "batch-01", "batch-02",
    "staging-smoke", "kiosk",
)  # fmt: skip
TOOLS = (
    "get_data", "search_docs", "list_files", "read_file", "write_file", "run_query",
    "summarize", "translate", "get_weather", "send_email", "create_ticket", "update_ticket",
    "list_users", "get_user", "fetch_url", "embed_text", "classify", "resize_image",
    "get_metrics", "deploy",
)  # fmt: skip
STATUSES = ("ok", "error", "rate_limited", "forbidden", "unauthorized")
STATUS_WEIGHTS = (92, 4, 2, 1, 1)
ERRORS = {
    "error": "ToolError: upstream returned 503 Service Unavailable",
    "rate_limited": "rate limit exceeded: per-key 600/minute",
    "forbidden": "missing scope write:data",
    "unauthorized": "invalid token",
}


def generate_log(path: Path, n: int, seed: int = 3) -> int:
    """Write ``n`` events with the real writer; return how many match KEY/TOOL/STATUS."""
    assert len(NAMES) == 50 and len(TOOLS) == 20
    rng = random.Random(seed)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    ids = ["fmg_key_" + "".join(rng.choices(alphabet, k=16)) for _ in NAMES]
    teams = ["data", "platform", "growth", "infra", "research"]
    metas = [{"team": teams[i % len(teams)], "env": "prod"} for i in range(len(NAMES))]
    scopes = ["read:data", "write:data"]
    key_ix = rng.choices(range(len(NAMES)), k=n)
    tool_ix = rng.choices(range(len(TOOLS)), k=n)
    status_ix = rng.choices(range(len(STATUSES)), weights=STATUS_WEIGHTS, k=n)
    matches = 0
    w = core.AuditWriter(str(path))
    log = w.log
    for i in range(n):
        k, t, s = key_ix[i], tool_ix[i], STATUSES[status_ix[i]]
        name, tool = NAMES[k], TOOLS[t]
        if name == KEY and tool == TOOL and s == STATUS:
            matches += 1
        ok = s == "ok"
        args = (
            s, ids[k], name, tool, scopes, (i % 997) * 0.037 + 0.2, None if ok else ERRORS[s],
            {"query": f"q{i}"},
            f"Results for: q{i} (50 rows)" if ok else None,
            f"10.{k}.{i % 256}.{(i * 7) % 256}", metas[k],
        )  # fmt: skip
        while not log(*args):  # queue full: the writer is behind; wait, never drop
            time.sleep(0.0005)
    w.close()
    stats = w.stats()
    if count_lines(path) != n:
        raise RuntimeError(f"generated log has {count_lines(path)} lines, wanted {n}: {stats}")
    return matches


# ---------------------------------------------------------------------------------------
# (1) audit query vs jq
# ---------------------------------------------------------------------------------------


def records(path: Path) -> list[str]:
    """The lines of ``path`` as canonical JSON (sorted keys), sorted."""
    with open(path, encoding="utf-8") as f:
        return sorted(json.dumps(json.loads(line), sort_keys=True) for line in f if line.strip())


def bench_query(args: argparse.Namespace, tmp: Path, log: Path, n: int, expected: int) -> None:
    section(
        f"(1) audit query --key {KEY} --tool {TOOL} --status {STATUS} --json over {n:,} lines: "
        "fastmcp-guard vs jq, same filter, same file"
    )
    jq = args.jq_path
    cmds = {
        "guard": [str(GUARD), "--audit", str(log), "audit", "query", "--key", KEY,
                  "--tool", TOOL, "--status", STATUS, "--json"],
        "jq": [jq, "-c", JQ_FILTER, str(log)],
    }  # fmt: skip
    outs = {k: tmp / f"query-{k}.jsonl" for k in cmds}
    # warm-up: binaries, .pyc files and the log into the page cache
    spawn(cmds["guard"], outs["guard"])
    spawn([jq, "-c", JQ_FILTER, str(args.small_log)], outs["jq"])

    runs: dict[str, list[Run]] = {k: [] for k in cmds}
    counts: dict[str, set[int]] = {k: set() for k in cmds}
    for _ in range(args.rounds):
        for k, argv in cmds.items():
            runs[k].append(spawn(argv, outs[k]))
            counts[k].add(count_lines(outs[k]))
    # outputs of the last round: same records in both (and every round gave that count)
    rec = {k: records(outs[k]) for k in cmds}
    ts = {k: sorted(json.loads(r)["ts"] for r in rec[k]) for k in cmds}
    same = rec["guard"] == rec["jq"]
    checks = [
        f"lines guard {sorted(counts['guard'])} / jq {sorted(counts['jq'])} / generator {expected}",
        f"ts values {'equal' if ts['guard'] == ts['jq'] else 'DIFFER'}",
        f"records {'identical' if same else 'DIFFER'}",
    ]
    ok = counts["guard"] == counts["jq"] == {expected} and same

    s = {k: [r.seconds for r in v] for k, v in runs.items()}
    rss = {k: max(r.maxrss_mb for r in v) for k, v in runs.items()}
    ratios = [j / g for j, g in zip(s["jq"], s["guard"], strict=True)]
    speedup = med(ratios)
    g = med(s["guard"])
    size_mb = log.stat().st_size / 1e6
    print(
        f"log {size_mb:,.0f} MB ({log.stat().st_size / n:.0f} bytes/line); {args.rounds} interleaved "
        f"rounds (guard, jq), process start included; peak RSS = max over rounds.\n"
        f"FILTER = '{JQ_FILTER}'"
    )
    table(
        ["command", "median", "min", "max", "peak RSS", "lines out"],
        [
            ["fastmcp-guard audit query --json", secs(g), secs(min(s["guard"])),
             secs(max(s["guard"])), f"{rss['guard']:.1f} MB", f"{expected:,}"],
            ["jq -c FILTER", secs(med(s["jq"])), secs(min(s["jq"])),
             secs(max(s["jq"])), f"{rss['jq']:.1f} MB", f"{len(rec['jq']):,}"],
        ],
        "lrrrrr",
    )  # fmt: skip
    print(
        f"speed-up jq / guard: {speedup:.1f}x (median of per-round ratios "
        f"{', '.join(f'{r:.1f}' for r in ratios)}; ratio of medians {med(s['jq']) / g:.1f}x); "
        f"guard {size_mb / g:,.0f} MB/s, {n / g / 1e6:.2f} M lines/s"
    )
    print("check: " + "; ".join(checks) + (": ok" if ok else ": MISMATCH"))
    SUMMARY.append((f"(1) audit query, {n:,} lines", "<= 2 s", secs(g), verdict(g <= 2.0)))
    SUMMARY.append(
        ("(1) audit query vs jq", ">= 5x faster", f"{speedup:.1f}x", verdict(speedup >= 5))
    )
    SUMMARY.append(
        (
            "(1) audit query peak RSS",
            "< 100 MB",
            f"{rss['guard']:.1f} MB",
            verdict(rss["guard"] < 100),
        )
    )
    if not ok:
        SUMMARY.append(("(1) outputs agree", "same records", "; ".join(checks), "NOT met"))


# ---------------------------------------------------------------------------------------
# (2) audit export vs pure Python
# ---------------------------------------------------------------------------------------


def bench_export(args: argparse.Namespace, tmp: Path, log: Path, n: int) -> None:
    section(f"(2) audit export --format csv of the same {n:,} lines: fastmcp-guard vs pure Python")
    outs = {"guard": tmp / "export-guard.csv", "python": tmp / "export-python.csv"}
    cmds = {
        "guard": [str(GUARD), "--audit", str(log), "audit", "export", "--format", "csv",
                  "--out", str(outs["guard"])],
        "python": [str(PY), "-c", PY_EXPORT, str(log), str(outs["python"])],
    }  # fmt: skip
    spawn([*cmds["guard"][:2], str(args.small_log), *cmds["guard"][3:]], tmp / "warm.out")
    spawn([*cmds["python"][:3], str(args.small_log), str(tmp / "warm.csv")], tmp / "warm.out")

    runs: dict[str, list[Run]] = {k: [] for k in cmds}
    for _ in range(args.rounds):
        for k, argv in cmds.items():
            runs[k].append(spawn(argv, tmp / f"export-{k}.stdout"))
    rows_out = {k: count_lines(p) - 1 for k, p in outs.items()}
    identical = sha256(outs["guard"]) == sha256(outs["python"])
    s = {k: [r.seconds for r in v] for k, v in runs.items()}
    rss = {k: max(r.maxrss_mb for r in v) for k, v in runs.items()}
    ratios = [p / g for p, g in zip(s["python"], s["guard"], strict=True)]
    lps = {k: n / med(v) for k, v in s.items()}
    print(
        f"{args.rounds} interleaved rounds (guard, python), process start included; lines/s = "
        f"{n:,} log lines / median seconds."
    )
    table(
        ["command", "median", "min", "max", "lines/s", "peak RSS", "rows out"],
        [
            ["fastmcp-guard audit export --format csv", secs(med(s["guard"])),
             secs(min(s["guard"])), secs(max(s["guard"])), f"{lps['guard']:,.0f}",
             f"{rss['guard']:.1f} MB", f"{rows_out['guard']:,}"],
            ["python: json.loads + csv.writer", secs(med(s["python"])), secs(min(s["python"])),
             secs(max(s["python"])), f"{lps['python']:,.0f}", f"{rss['python']:.1f} MB",
             f"{rows_out['python']:,}"],
        ],
        "lrrrrrr",
    )  # fmt: skip
    print(
        f"speed-up python / guard: {med(ratios):.1f}x (median of per-round ratios "
        f"{', '.join(f'{r:.1f}' for r in ratios)})"
    )
    same = "identical" if identical else "DIFFER (" + first_difference(*outs.values()) + ")"
    print(
        f"check: rows guard {rows_out['guard']:,} / python {rows_out['python']:,}; CSV files {same}"
    )
    g = lps["guard"]
    SUMMARY.append(
        (f"(2) audit export csv, {n:,} lines", ">= 500,000 lines/s", f"{g:,.0f} lines/s",
         verdict(g >= 500_000))
    )  # fmt: skip
    if rows_out["guard"] != n or rows_out["python"] != n:
        SUMMARY.append(("(2) rows exported", f"{n:,}", str(rows_out), "NOT met"))


# ---------------------------------------------------------------------------------------
# (3) keys create
# ---------------------------------------------------------------------------------------


def bench_keys_create(args: argparse.Namespace, tmp: Path) -> None:
    section("(3) keys create end to end (process start included), beside the start-up floor")
    base = tmp / "keys"
    base.mkdir()
    seq = iter(range(1_000_000))

    def create() -> Run:
        d = base / f"run{next(seq)}"
        d.mkdir()
        argv = [str(GUARD), "keys", "create", "--name", "bench", "--scopes", "a,b",
                "--db", str(d / "keys.db")]  # fmt: skip
        r = spawn(argv, d / "stdout", cwd=d)  # cwd: the lifecycle event's default audit file
        if "fmg_sk_" not in (d / "stdout").read_text() or not (d / "keys.db").exists():
            raise RuntimeError(f"keys create printed no token: {(d / 'stdout').read_text()}")
        return r

    cases = {
        "python -c pass": lambda: spawn([str(PY), "-c", "pass"], tmp / "pass.out"),
        "fastmcp-guard --version": lambda: spawn([str(GUARD), "--version"], tmp / "ver.out"),
        "fastmcp-guard keys create --name bench --scopes a,b --db DB": create,
    }
    for fn in cases.values():  # warm-up
        fn()
    runs: dict[str, list[Run]] = {k: [] for k in cases}
    for _ in range(args.runs):
        for k, fn in cases.items():
            runs[k].append(fn())
    s = {k: [r.seconds for r in v] for k, v in runs.items()}
    floor = med(s["python -c pass"])
    print(
        f"{args.runs} interleaved rounds; a fresh directory (key store, audit file) per keys "
        f"create; the 0.2 CLI is not installed, so it is not measured."
    )
    rows = []
    for k, v in s.items():
        q = statistics.quantiles(v, n=10)
        rows.append(
            [k, secs(med(v)), secs(q[0]), secs(q[-1]), f"+{secs(med(v) - floor)}",
             f"{max(r.maxrss_mb for r in runs[k]):.1f} MB"]
        )  # fmt: skip
    table(["command", "median", "p10", "p90", "vs python -c pass", "peak RSS"], rows, "lrrrrr")
    c = med(s["fastmcp-guard keys create --name bench --scopes a,b --db DB"])
    SUMMARY.append(("(3) keys create end to end", "<= 300 ms", secs(c), verdict(c <= 0.300)))


# ---------------------------------------------------------------------------------------
# (4) audit verify
# ---------------------------------------------------------------------------------------


def bench_verify(args: argparse.Namespace, tmp: Path, log: Path, n: int) -> None:
    section(f"(4) audit verify of the same {n:,} chained lines, beside reading the file")
    cmds = {
        "fastmcp-guard audit verify LOG": [str(GUARD), "audit", "verify", str(log)],
        "wc -l LOG (reading it: the floor)": ["wc", "-l", str(log)],
    }
    for argv in cmds.values():  # warm-up: the file in the page cache
        spawn(argv, tmp / "verify-warm.out")
    runs: dict[str, list[Run]] = {k: [] for k in cmds}
    for _ in range(args.rounds):
        for k, argv in cmds.items():
            runs[k].append(spawn(argv, tmp / "verify.out"))
    spawn(cmds["fastmcp-guard audit verify LOG"], tmp / "verify-check.out")
    text = (tmp / "verify-check.out").read_text()
    if not text.startswith(f"OK: {n} events"):
        raise RuntimeError(f"audit verify did not verify the log: {text[:300]}")
    s = {k: [r.seconds for r in v] for k, v in runs.items()}
    print(f"{args.rounds} interleaved rounds, process start included.")
    table(
        ["command", "median", "min", "max", "lines/s", "peak RSS"],
        [[k, secs(med(v)), secs(min(v)), secs(max(v)), f"{n / med(v):,.0f}",
          f"{max(r.maxrss_mb for r in runs[k]):.1f} MB"] for k, v in s.items()],
        "lrrrrr",
    )  # fmt: skip
    g = n / med(s["fastmcp-guard audit verify LOG"])
    SUMMARY.append((f"(4) audit verify, {n:,} lines", "(no target: kept)", f"{g:,.0f} lines/s",
                    "-"))  # fmt: skip


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="200,000 lines, fewer rounds")
    ap.add_argument("--sections", default="1234", help="which sections to run (default: 1234)")
    ap.add_argument("--lines", type=int, help="log lines (default 1,000,000; quick 200,000)")
    ap.add_argument("--rounds", type=int, help="rounds for (1) and (2) (default 5; quick 3)")
    ap.add_argument("--runs", type=int, help="rounds for (3) (default 30; quick 20)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    q = args.quick
    n = args.lines or (200_000 if q else 1_000_000)
    args.rounds = args.rounds or (3 if q else 5)
    args.runs = args.runs or (20 if q else 30)
    if args.runs < 2:
        ap.error("--runs must be at least 2")

    started = time.perf_counter()
    print("fastmcp-guard CLI benchmarks -- benches/bench_cli.py" + (" (--quick)" if q else ""))
    print(
        f"machine : {cpu_model()} x{os.cpu_count()} | {platform.system()} {platform.release()} | "
        f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB RAM"
    )
    print(f"python  : {platform.python_implementation()} {platform.python_version()} ({PY})")
    print(
        f"guard   : {tool_version([str(GUARD), '--version'])} ({GUARD}; Rust core "
        f"{Path(core.__file__).name}, {so_build(core.__file__)})"
    )
    need_jq = "1" in args.sections
    args.jq_path = ensure_jq() if need_jq else ""
    if need_jq:
        print(f"jq      : {tool_version([args.jq_path, '--version'])} ({args.jq_path})")
    print(f"load    : {loadavg()} (1/5/15 min load average at start)")

    tmp = Path(tempfile.mkdtemp(prefix="fmg-bench-cli-"))
    try:
        print(f"rss     : {wrapper_cost(tmp)}")
        if any(c in args.sections for c in "124"):
            log = tmp / "audit.jsonl"
            t = time.perf_counter()
            expected = generate_log(log, n)
            args.small_log = tmp / "small.jsonl"
            with open(log, "rb") as src, open(args.small_log, "wb") as dst:
                dst.writelines(line for _, line in zip(range(1000), src, strict=False))
            print(
                f"\ngenerated {n:,} lines ({log.stat().st_size / 1e6:,.0f} MB, "
                f"{log.stat().st_size / n:.0f} bytes/line, {expected:,} matching the query) "
                f"with AuditWriter in {time.perf_counter() - t:.1f} s"
            )
            if "1" in args.sections:
                bench_query(args, tmp, log, n, expected)
            if "2" in args.sections:
                bench_export(args, tmp, log, n)
            if "4" in args.sections:
                bench_verify(args, tmp, log, n)
        if "3" in args.sections:
            bench_keys_create(args, tmp)

        section("Summary: targets (issue 3)")
        table(["figure", "target", "measured", "verdict"], [list(s) for s in SUMMARY], "llrl")
        print(
            f"\ntotal run time {time.perf_counter() - started:.0f} s; "
            f"load average at the end {loadavg()}"
        )
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
