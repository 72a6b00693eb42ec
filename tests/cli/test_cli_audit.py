"""`fastmcp-guard audit tail|query|export` against generated logs and a reference filter."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import selectors
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastmcp_guard._core import AuditWriter

from tests.cli.test_cli_keys import assert_user_error, cli, ok

BASE = datetime(2026, 3, 1, tzinfo=timezone.utc)
NAMES = ["alice", "bob", "carol", 'al"ice']
TOOLS = ["get_data", "put_data", "search"]
STATUSES = ["ok", "ok", "ok", "error", "rate_limited", "unauthorized"]


def ts(i: int) -> str:
    return (BASE + timedelta(minutes=7 * i)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def event(i: int, rng: random.Random) -> dict[str, Any]:
    name = rng.choice(NAMES)
    return {"ts": ts(i), "key_id": f"fmg_key_{NAMES.index(name):016d}", "key_name": name,
            "tool": rng.choice(TOOLS), "scopes": ["read:data"], "duration_ms": round(rng.random(), 3),
            "status": rng.choice(STATUSES), "error": None, "input_args": {"q": f"=x{i},\"y\""},
            "output_preview": "line1\nline2", "client_ip": "10.0.0.1", "metadata": {}}  # fmt: skip


@pytest.fixture
def log(tmp_path: Path) -> tuple[Path, list[str]]:
    rng = random.Random(7)
    lines = [json.dumps(event(i, rng), separators=(",", ":")) for i in range(3000)]
    # A 0.2-style line (spaces, +00:00 with microseconds) and a malformed one.
    old = event(3000, rng) | {"ts": "2026-03-15T12:00:00.123456+00:00", "key_name": "alice",
                              "tool": "get_data", "status": "ok"}  # fmt: skip
    lines.append(json.dumps(old))
    path = tmp_path / "fastmcp-guard-audit.jsonl"
    path.write_text("\n".join(lines[:1500]) + "\n{not json\n" + "\n".join(lines[1500:]) + "\n")
    return path, lines


def reference(lines: list[str], *, key: str | None = None, tool: str | None = None,
              status: str | None = None, since: datetime | None = None,
              until: datetime | None = None) -> list[str]:  # fmt: skip
    out = []
    for line in lines:
        e = json.loads(line)
        when = datetime.fromisoformat(e["ts"].replace("Z", "+00:00"))
        if key is not None and key not in (e["key_id"], e["key_name"]):
            continue
        if (tool and e["tool"] != tool) or (status and e["status"] != status):
            continue
        if (since and when < since) or (until and when >= until):
            continue
        out.append(line)
    return out


def test_query_json_matches_the_reference_filter(
    tmp_path: Path, log: tuple[Path, list[str]]
) -> None:
    _, lines = log
    cases: list[tuple[list[str], dict[str, Any]]] = [
        (["--key", "alice", "--tool", "get_data", "--status", "ok"],
         {"key": "alice", "tool": "get_data", "status": "ok"}),
        (["--key", 'al"ice'], {"key": 'al"ice'}),
        (["--key", "fmg_key_0000000000000001"], {"key": "fmg_key_0000000000000001"}),
        # A token's public part, or a whole token: the key id it names.
        (["--key", "fmg_sk_0000000000000001"], {"key": "fmg_key_0000000000000001"}),
        (["--key", "fmg_sk_0000000000000001_" + "s" * 32], {"key": "fmg_key_0000000000000001"}),
        (["--since", "2026-03-05T00:00:00Z", "--until", "2026-03-08"],
         {"since": datetime(2026, 3, 5, tzinfo=timezone.utc),
          "until": datetime(2026, 3, 8, tzinfo=timezone.utc)}),
        (["--status", "rate_limited", "--since", "2026-03-10T03:00:00+02:00"],
         {"status": "rate_limited", "since": datetime(2026, 3, 10, 1, tzinfo=timezone.utc)}),
    ]  # fmt: skip
    for argv, flt in cases:
        out = ok(tmp_path, "audit", "query", *argv, "--json").stdout.splitlines()
        assert out == reference(lines, **flt), argv
        assert out, argv  # every case matches something
    limited = ok(tmp_path, "audit", "query", "--key", "bob", "--limit", "5", "--json").stdout
    assert limited.splitlines() == reference(lines, key="bob")[:5]


def test_query_table_and_relative_times(tmp_path: Path, log: tuple[Path, list[str]]) -> None:
    out = ok(tmp_path, "audit", "query", "--key", "carol", "--limit", "3").stdout
    assert out.count("carol") == 3 and "more" in out
    # Everything in the generated log is older than an hour.
    assert "No matching events" in ok(tmp_path, "audit", "query", "--since", "1h").stdout


def test_export_csv_and_jsonl_match_the_reference(
    tmp_path: Path, log: tuple[Path, list[str]]
) -> None:
    _, lines = log
    ref = reference(lines, tool="search", status="ok")
    proc = ok(tmp_path, "audit", "export", "--format", "csv", "--out", "out.csv",
              "--tool", "search", "--status", "ok")  # fmt: skip
    assert f"Exported {len(ref)} events" in proc.stdout
    assert (tmp_path / "out.csv").stat().st_mode & 0o777 == 0o600
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out.csv").read_text())))
    assert len(rows) == len(ref)
    for row, line in zip(rows, ref, strict=True):
        e = json.loads(line)
        assert row["ts"] == e["ts"] and row["key_name"] == e["key_name"]
        assert row["output_preview"] == "line1\nline2"
        assert json.loads(row["input_args"]) == e["input_args"]
    ok(tmp_path, "audit", "export", "--format", "jsonl", "--out", "out.jsonl", "--key", "alice")
    assert (tmp_path / "out.jsonl").read_text().splitlines() == reference(lines, key="alice")
    whole = ok(tmp_path, "audit", "export", "--format", "jsonl", "--out", "-")
    assert whole.stdout.splitlines() == lines
    # Without a filter every line is parsed: the malformed one is counted and reported.
    assert "1 malformed lines" in whole.stderr


def test_sqlite_logs_are_queried_and_exported(tmp_path: Path) -> None:
    w = AuditWriter.sqlite(str(tmp_path / "audit.db"))
    for i in range(30):
        w.log("ok" if i % 3 else "error", f"fmg_key_{i % 2:016d}", ["alice", "bob"][i % 2],
              "get_data", ["read"], 1.5, None, {"i": i})  # fmt: skip
    w.close()
    recs = [json.loads(x) for x in ok(tmp_path, "--audit", "audit.db", "audit", "query",
                                      "--key", "bob", "--status", "ok", "--json").stdout.splitlines()]  # fmt: skip
    assert [r["input_args"]["i"] for r in recs] == [i for i in range(30) if i % 2 and i % 3]
    ok(tmp_path, "--audit", "audit.db", "audit", "export", "--out", "x.csv", "--key", "alice")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "x.csv").read_text())))
    assert [json.loads(r["input_args"])["i"] for r in rows] == list(range(0, 30, 2))
    tail = ok(tmp_path, "--audit", "audit.db", "audit", "tail", "-n", "2", "--json").stdout
    assert [json.loads(x)["input_args"]["i"] for x in tail.splitlines()] == [28, 29]


def test_bad_input_gives_exit_2_and_a_missing_log_exit_1(tmp_path: Path) -> None:
    assert_user_error(cli(tmp_path, "audit", "query"), 1, "no audit log here yet")
    (tmp_path / "fastmcp-guard-audit.jsonl").write_text("")
    assert_user_error(cli(tmp_path, "audit", "query", "--since", "3x"), 2, "--since", "3x")
    assert_user_error(cli(tmp_path, "audit", "query", "--status", "fine"), 2, "unknown status")
    assert_user_error(cli(tmp_path, "audit", "query", "--since", "1h", "--until", "2h"), 2,
                      "must be before")  # fmt: skip
    assert_user_error(cli(tmp_path, "audit", "export", "--format", "xml", "--out", "x"), 2, "xml")


def test_commands_read_the_first_file_target_of_several(
    tmp_path: Path, log: tuple[Path, list[str]]
) -> None:
    path, lines = log
    targets = f"otel,http://127.0.0.1:9/ingest,{path.name}"  # nothing listens: nothing sent
    env = {"FASTMCP_GUARD_AUDIT": targets}
    out = ok(tmp_path, "audit", "query", "--key", "alice", "--json", env=env).stdout
    assert out.splitlines() == reference(lines, key="alice")
    tail = ok(tmp_path, "audit", "tail", "-n", "2", "--json", env=env).stdout.splitlines()
    assert [json.loads(x)["ts"] for x in tail] == [json.loads(x)["ts"] for x in lines[-2:]]
    assert not (tmp_path / "fastmcp-guard-audit-spool").exists()  # reading opens no target


def test_commands_say_when_no_target_is_a_file(tmp_path: Path) -> None:
    proc = cli(tmp_path, "--audit", "https://u:pw-1@siem.example/in,otel", "audit", "query")
    assert_user_error(proc, 2, "include no JSONL or SQLite log", "name one with --audit PATH",
                      "(https://u:****@siem.example/in, otel, from argument --audit)")  # fmt: skip
    assert "pw-1" not in proc.stderr
    proc = cli(tmp_path, "audit", "verify", env={"FASTMCP_GUARD_AUDIT": "audit.db,otel"})
    assert_user_error(proc, 2, "include no JSONL log", "give the path of a .jsonl file",
                      "from env FASTMCP_GUARD_AUDIT")  # fmt: skip
    proc = cli(tmp_path, "--audit", "off", "audit", "tail")
    assert_user_error(proc, 2, "the audit log is off", "--audit PATH")


def test_tail_follows_across_rotation(tmp_path: Path) -> None:
    path = tmp_path / "fastmcp-guard-audit.jsonl"
    rng = random.Random(1)
    first = [json.dumps(event(i, rng)) for i in range(10)]
    path.write_text("\n".join(first) + "\n")
    assert ok(tmp_path, "audit", "tail", "-n", "3", "--json").stdout.splitlines() == [
        json.dumps(json.loads(x), ensure_ascii=False) for x in first[-3:]]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTMCP_GUARD_")}
    proc = subprocess.Popen([sys.executable, "-m", "fastmcp_guard.cli", "audit", "tail", "-f",
                             "-n", "0", "--json"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        printed = selectors.DefaultSelector()
        printed.register(proc.stdout, selectors.EVENT_READ)
        # It follows once it has opened the file and reached its end: append until a
        # line shows.
        n, deadline = 100, time.monotonic() + 30
        while not printed.select(timeout=0.05):
            assert time.monotonic() < deadline, "tail -f printed nothing in 30 s"
            with path.open("a") as f:
                f.write(json.dumps(event(n, rng)) + "\n")
            n += 1
        # A line appended right before the rotation is printed, then the new file's.
        with path.open("a") as f:
            f.write(json.dumps(event(n, rng)) + "\n")
        path.rename(tmp_path / "rotated.jsonl")
        path.write_text(json.dumps(event(200, rng)) + "\n")
        got: list[str] = []
        while ts(200) not in got:
            got.append(json.loads(proc.stdout.readline())["ts"])
        first = next(i for i in range(100, n + 1) if ts(i) == got[0])
        assert got == [ts(i) for i in range(first, n + 1)] + [ts(200)]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
