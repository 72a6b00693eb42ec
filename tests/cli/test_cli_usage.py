"""``fastmcp-guard usage`` over a real SQLite key store: table with totals, JSON, CSV,
filters, and exit 2 (with the accepted forms) on bad input."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fastmcp_guard import KeyStore
from fastmcp_guard.usage import Usage

from tests.cli.test_cli_keys import cli


@pytest.fixture
def usage_db(tmp_path: Path) -> Path:
    """``keys.db`` in the working directory (``--db keys.db``), with usage on three days
    (today and the two before) for two keys."""
    path = tmp_path / "keys.db"
    store = KeyStore(backend="sqlite", path=path)
    u = Usage.for_store(store, flush_interval=0)
    today = u.book.today()
    for day in (today - 2, today - 1, today):
        u.record_at("fmg_key_alice", "search", "ok", 2, 10.0, day)
        u.record_at("fmg_key_alice", "search", "error", 2, 30.0, day)
        u.record_at("fmg_key_bob", "fetch", "ok", 5, 4.0, day)
        u.record_at("fmg_key_bob", "fetch", "rate_limited", 5, 0.0, day)
    u.close()
    store.close()
    return path


def days_ago(n: int) -> str:
    return (datetime.now(timezone.utc).date() - timedelta(days=n)).isoformat()


def test_table_by_day_with_a_totals_line(tmp_path: Path, usage_db: Path) -> None:
    r = cli(tmp_path, "--db", "keys.db", "usage")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "Usage per day" in lines[0]
    body = [ln for ln in lines if ln.startswith("│")]
    assert [ln.split("│")[1].strip() for ln in body] == [
        days_ago(2), days_ago(1), days_ago(0), "Total"]  # fmt: skip
    total = [c.strip() for c in body[-1].split("│")[1:-1]]
    assert total == ["Total", "9", "3", "27", "rate_limited 3", "132.0", "14.7"]


def test_table_by_tool_filtered_by_key_and_days(tmp_path: Path, usage_db: Path) -> None:
    r = cli(tmp_path, "--db", "keys.db", "usage", "--by", "tool", "--key", "fmg_key_bob",
            "--since", "2d")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "key fmg_key_bob" in r.stdout and f"days {days_ago(1)}" in r.stdout
    rows = [[c.strip() for c in ln.split("│")[1:-1]] for ln in r.stdout.splitlines()
            if ln.startswith("│")]  # fmt: skip
    assert rows == [["fetch", "2", "0", "10", "rate_limited 2", "8.0", "4.0"],
                        ["Total", "2", "0", "10", "rate_limited 2", "8.0", "4.0"]]  # fmt: skip


def test_json_by_key(tmp_path: Path, usage_db: Path) -> None:
    r = cli(tmp_path, "--db", "keys.db", "usage", "--by", "key", "--json")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["by"] == "key"
    assert [row["key_id"] for row in body["rows"]] == ["fmg_key_alice", "fmg_key_bob"]
    alice = body["rows"][0]
    assert (alice["calls"], alice["errors"], alice["cost"], alice["duration_ms"]) == (6, 3, 12, 120.0)
    assert body["rows"][1]["refusals"] == {"rate_limited": 3}
    assert body["totals"]["calls"] == 9 and body["totals"]["cost"] == 27


def test_csv_has_a_column_per_refusal_kind(tmp_path: Path, usage_db: Path) -> None:
    r = cli(tmp_path, "--db", "keys.db", "usage", "--by", "tool", "--csv", "--tool", "fetch")
    assert r.returncode == 0, r.stderr
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows == [
        ["tool", "calls", "errors", "cost", "duration_ms", "avg_ms", "refused:rate_limited"],
        ["fetch", "3", "0", "15", "12.0", "4.0", "3"],
    ]


def test_no_usage_says_so(tmp_path: Path) -> None:
    KeyStore(backend="sqlite", path=tmp_path / "keys.db").close()
    r = cli(tmp_path, "--db", "keys.db", "usage", "--since", "today")
    assert r.returncode == 0, r.stderr
    assert "no usage recorded" in r.stdout


def test_a_memory_store_has_nothing_to_read(tmp_path: Path) -> None:
    r = cli(tmp_path, "--keys", "memory://", "usage")
    assert r.returncode == 1
    assert "inside the server process only" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--since", "last week"], "argument --since: bad day 'last week'; give a number of days"),
     (["--until", "0d"], "argument --until: '0d' names no day"),
     (["--by", "week"], "argument --by: invalid choice: 'week' (choose from "),
     (["--json", "--csv"], "give --json or --csv, not both"),
     (["--since", "today", "--until", "yesterday"], "is after until")],
)  # fmt: skip
def test_bad_input_exits_2_saying_what_is_accepted(
    tmp_path: Path, usage_db: Path, args: list[str], message: str
) -> None:
    r = cli(tmp_path, "--db", "keys.db", "usage", *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert r.stdout == ""


def test_the_command_runs_as_a_process(tmp_path: Path, usage_db: Path) -> None:
    r = cli(tmp_path, "--db", "keys.db", "usage", "--by", "tool", "--json", process=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["totals"]["calls"] == 9
