"""``fastmcp-guard usage``: calls, cost units, refusals and time per key, tool or UTC day.

Reads the usage the server flushes into its key store (the ``fmg_usage`` table of the
SQLite / PostgreSQL store, the usage hashes of the Redis store; see
:mod:`fastmcp_guard.usage`). A server flushes every few seconds, so its last few seconds
may not show yet. A memory key store keeps usage inside the server process: nothing to
read here.
"""

from __future__ import annotations

import argparse
import csv
import sys
from typing import Any

from fastmcp_guard.cli._common import UsageError, add_command, cli_config, want_json
from fastmcp_guard.cli._output import print_json, print_table, say

__all__ = ["register"]

_EPILOG = """\
examples:
  fastmcp-guard usage                                # every day so far, all keys
  fastmcp-guard usage --since 7d --by tool           # the last 7 UTC days, per tool
  fastmcp-guard usage --key fmg_key_3kQ... --since 2026-12-01 --until 2026-12-31
  fastmcp-guard usage --by key --json
  fastmcp-guard usage --since today --csv > today.csv

--since / --until (UTC days, both included): 7d (today and the 6 days before), 2w,
today, yesterday, 2026-12-01, or an ISO time (its UTC day).
"""

_HEADINGS = {"day": "Day", "tool": "Tool", "key": "Key"}
_FIELDS = {"day": "day", "tool": "tool", "key": "key_id"}


def register(subparsers: Any) -> None:
    """Add the ``usage`` command."""
    cmd = add_command(subparsers, "usage", epilog=_EPILOG,
                      help="calls, cost units, refusals and time per day, tool or key")  # fmt: skip
    cmd.add_argument("--key", metavar="KEY", help="only this key (id or token's public part)")
    cmd.add_argument("--tool", metavar="TOOL", help="only this tool")
    cmd.add_argument("--since", metavar="WHEN", help="from this UTC day (7d, 2026-12-01...)")
    cmd.add_argument("--until", metavar="WHEN", help="up to this UTC day, included")
    cmd.add_argument("--by", choices=("day", "tool", "key"), default="day",
                     help="one row per day (default), tool or key")  # fmt: skip
    cmd.add_argument("--csv", action="store_true", help="print CSV (one row per group)")
    cmd.set_defaults(func=_usage)


def _usage(args: argparse.Namespace) -> int:
    from fastmcp_guard.usage import Usage

    if args.csv and want_json(args):
        raise UsageError("give --json or --csv, not both", "fastmcp-guard usage")
    config = cli_config(args)
    target = config.keys
    if target.backend == "memory":
        say("The memory key store keeps usage inside the server process only: nothing to "
            "read here (use an SQLite, PostgreSQL or Redis key store to keep usage).")  # fmt: skip
        return 1
    key_id = _key_id(args.key) if args.key else None
    usage = Usage.open(target.backend, path=target.path, dsn=target.dsn, flush_interval=0)
    try:
        report = usage.query(key_id=key_id, tool=args.tool, since=_option(args.since, "--since"),
                             until=_option(args.until, "--until"), by=args.by)  # fmt: skip
    finally:
        usage.close()
    if want_json(args):
        print_json(report.to_dict())
    elif args.csv:
        _print_csv(report.rows, args.by)
    else:
        _print_table(report, args.by, config.keys.masked())
    return 0


def _option(value: str | None, option: str) -> str | None:
    from fastmcp_guard.errors import ConfigError
    from fastmcp_guard.usage import parse_day

    if value is None:
        return None
    try:
        parse_day(value, today=0, option=f"argument {option}")
    except ConfigError as exc:
        raise UsageError(str(exc), "fastmcp-guard usage") from None
    return value


def _key_id(given: str) -> str:
    from fastmcp_guard._core import looks_like_guard_token, token_key_id

    given = given.strip()
    if looks_like_guard_token(given):
        return token_key_id(given) or given
    return given


def _kinds(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({k for r in rows for k in r["refusals"]})


def _print_csv(rows: list[dict[str, Any]], by: str) -> None:
    kinds = _kinds(rows)
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow([_FIELDS[by], "calls", "errors", "cost", "duration_ms", "avg_ms",
                  *(f"refused:{k}" for k in kinds)])  # fmt: skip
    for r in rows:
        out.writerow([r[_FIELDS[by]], r["calls"], r["errors"], r["cost"], r["duration_ms"],
                      r["avg_ms"], *(r["refusals"].get(k, 0) for k in kinds)])  # fmt: skip


def _refusals(refusals: dict[str, int]) -> str:
    return ", ".join(f"{k} {n:,}" for k, n in refusals.items()) or "-"


def _print_table(report: Any, by: str, store: str) -> None:
    span = " to ".join(d.isoformat() for d in (report.since, report.until) if d is not None)
    where = [f"key {report.key_id}" if report.key_id else "", f"tool {report.tool}" if report.tool
             else "", f"days {span}" if span else ""]  # fmt: skip
    title = f"Usage per {by} in {store}" + (f" ({', '.join(w for w in where if w)})"
                                            if any(where) else "")  # fmt: skip
    if not report.rows:
        say(f"{title}: no usage recorded.")
        return
    rows: list[list[str]] = []
    styles: list[list[str | None]] = []
    for r in [*report.rows, {_FIELDS[by]: "Total", **report.totals}]:
        rows.append([str(r[_FIELDS[by]]), f"{r['calls']:,}", f"{r['errors']:,}",
                     f"{r['cost']:,}", _refusals(r["refusals"]), f"{r['duration_ms']:,.1f}",
                     f"{r['avg_ms']:,.1f}"])  # fmt: skip
        styles.append([None] * 7)
    styles[-1] = ["bold"] * 7
    print_table([_HEADINGS[by], "Calls", "Errors", "Cost", "Refusals", "Total ms", "Avg ms"],
                rows, title=title, styles=styles, no_wrap=(_HEADINGS[by],))  # fmt: skip
