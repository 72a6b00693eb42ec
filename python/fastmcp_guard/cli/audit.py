"""``fastmcp-guard audit tail|query|export|verify``: read the audit log the server writes.

The log is the configured one (``--audit``, ``FASTMCP_GUARD_AUDIT``, config file, or
``./fastmcp-guard-audit.jsonl``). JSONL logs are scanned and filtered by the Rust core
in one streaming pass (constant memory; :func:`fastmcp_guard._core.audit_scan`), the
rotated files first, oldest first (:func:`fastmcp_guard._core.audit_log_files`);
SQLite logs are read through their indexes. ``verify`` checks the hash chain of a
JSONL log across its rotated files (:func:`fastmcp_guard._core.audit_verify`).

Filters (all optional, combined with AND): ``--key`` (a key id, a key name, or a
token's public part), ``--tool``, ``--status``, ``--since`` / ``--until`` (``1h``,
``7d``, ``30m`` ago, or an ISO 8601 time; naive times are UTC; ``since`` inclusive,
``until`` exclusive).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sqlite3
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from fastmcp_guard.cli._common import (
    UsageError,
    add_command,
    add_group,
    bounded_int,
    cli_config,
    parse_instant,
    want_json,
)
from fastmcp_guard.cli._output import print_json, print_table, say, warn

if TYPE_CHECKING:
    from fastmcp_guard.config import AuditKind, AuditTarget, GuardConfig

__all__ = ["register"]

_EPILOG = """\
examples:
  fastmcp-guard audit tail -f
  fastmcp-guard audit query --key alice --tool get_data --status ok --since 1h
  fastmcp-guard audit query --since 2026-03-09T00:00:00Z --until 2026-03-10 --json
  fastmcp-guard audit export --format csv --out audit.csv --since 7d
  fastmcp-guard --audit /var/log/mcp/audit.jsonl audit query --status rate_limited
  fastmcp-guard audit verify /var/log/mcp/audit.jsonl --chain-key-env AUDIT_CHAIN_KEY
"""

#: Rows shown by a human-readable ``query`` unless ``--limit`` says otherwise.
_TABLE_ROWS = 100
#: The most ``--limit`` / ``--lines`` take (more than any log holds).
_MAX_ROWS = 2**62
_STATUS_COLOURS = {"ok": "green", "error": "red", "rate_limited": "yellow",
                   "unauthorized": "red", "forbidden": "red", "ip_denied": "red",
                   "would_refuse": "cyan", "loop_detected": "yellow",
                   "credits_exhausted": "yellow", "credits_low": "cyan"}  # fmt: skip


def register(subparsers: Any) -> None:
    """Add the ``audit`` command group."""
    _, commands = add_group(subparsers, "audit", epilog=_EPILOG,
                            help="follow, search and export the audit log")  # fmt: skip
    filters = argparse.ArgumentParser(add_help=False)
    group = filters.add_argument_group("filters")
    group.add_argument("--key", help="key id, key name or token public part (fmg_sk_<id>)")
    group.add_argument("--tool", help="tool, resource or prompt name")
    group.add_argument("--status", help="ok, error, rate_limited, unauthorized, forbidden, "
                       "ip_denied, created, rotated, revoked, would_refuse, "
                       "loop_detected, credits_exhausted, credits_low")  # fmt: skip
    group.add_argument("--since", help="from this time on: 1h, 7d, 30m ago, or ISO 8601")
    group.add_argument("--until", help="before this time: 1h, 7d ago, or ISO 8601")

    tail = add_command(commands, "tail", epilog=_EPILOG, help="the latest events; -f follows")
    tail.add_argument("-n", "--lines", type=bounded_int(0, _MAX_ROWS), default=20,
                      help="events shown first (20)")  # fmt: skip
    tail.add_argument("-f", "--follow", action="store_true",
                      help="keep printing new events (survives log rotation)")  # fmt: skip
    tail.set_defaults(func=_tail)

    query = add_command(commands, "query", parents=[filters], epilog=_EPILOG,
                        help="events matching filters (oldest first for JSONL)")  # fmt: skip
    query.add_argument("--limit", type=bounded_int(0, _MAX_ROWS),
                       help=f"at most this many (table default {_TABLE_ROWS}; --json: all)")  # fmt: skip
    query.set_defaults(func=_query)

    export = add_command(commands, "export", parents=[filters], epilog=_EPILOG,
                         help="write matching events to a CSV or JSONL file")  # fmt: skip
    export.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    export.add_argument("--out", required=True, metavar="FILE",
                        help="output file (created mode 0600; '-' for stdout)")  # fmt: skip
    export.set_defaults(func=_export)

    verify = add_command(commands, "verify", epilog=_EPILOG,
                         help="check the hash chain of a JSONL log (exit 1 at the first "
                         "broken link)")  # fmt: skip
    verify.add_argument("path", nargs="?", metavar="PATH",
                        help="the live JSONL file (its rotated files are read too); "
                        "default: the configured audit log")  # fmt: skip
    verify.add_argument("--chain-key-env", metavar="VAR",
                        help="environment variable holding the chain key the log was "
                        "written with (default: the audit_chain_key setting)")  # fmt: skip
    verify.set_defaults(func=_verify)


# -- commands --------------------------------------------------------------------------


def _target(args: argparse.Namespace) -> AuditTarget:
    """The first JSONL / SQLite target of the configuration (what these commands read)."""
    config = cli_config(args)
    target = _readable(config, ("jsonl", "sqlite"), "JSONL or SQLite log",
                       "name one with --audit PATH")  # fmt: skip
    if not os.path.exists(target.path or ""):
        raise FileNotFoundError(2, "no audit log here yet (nothing was logged)", target.path)
    return target


def _readable(
    config: GuardConfig, kinds: tuple[AuditKind, ...], what: str, give: str
) -> AuditTarget:
    """The first configured target of ``kinds``; a :class:`UsageError` saying what is
    configured instead when there is none."""
    target = config.audit_file(kinds)
    if target is not None:
        return target
    if not config.audit:
        raise UsageError(f"the audit log is off in this configuration; {give}")
    raise UsageError(
        f"the configured audit targets ({config.display('audit')}, from "
        f"{config.source('audit')}) include no {what}; {give} (events sent to an HTTP "
        "endpoint or to OpenTelemetry are read there)"
    )


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    key = args.key.strip() if args.key else None
    if key and key.startswith("fmg_sk_"):
        from fastmcp_guard._core import token_key_id

        key = token_key_id(key) or key  # a token, or its public part: the key id it names
    since = _instant(args.since, "--since")
    until = _instant(args.until, "--until")
    if since is not None and until is not None and since >= until:
        raise UsageError(f"--since ({args.since}) must be before --until ({args.until})")
    if args.status:
        from fastmcp_guard._core import AUDIT_STATUSES as STATUSES

        if args.status not in STATUSES:
            raise UsageError(f"argument --status: unknown status {args.status!r}; expected one "
                             f"of {', '.join(STATUSES)}")  # fmt: skip
    return {"key": key or None, "tool": args.tool, "status": args.status,
            "since": since, "until": until}  # fmt: skip


def _query(args: argparse.Namespace) -> int:
    filters = _filters(args)  # bad input is a usage error (2), whether or not there is a log
    target = _target(args)
    if want_json(args):
        if target.kind == "sqlite":
            for rec in _sqlite_records(target.path or "", filters, args.limit):
                sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")
        else:
            from fastmcp_guard._core import audit_scan

            sys.stdout.flush()
            audit_scan(_files(target), sys.stdout.buffer, limit=args.limit, **filters)
            sys.stdout.buffer.flush()
        return 0
    limit = _TABLE_ROWS if args.limit is None else args.limit
    if target.kind == "sqlite":
        records = list(_sqlite_records(target.path or "", filters, limit))
        more = None
    else:
        records, more = _jsonl_head(_files(target), filters, limit)
    if not records:
        say("No matching events.")
        return 0
    _print_events(records, title=f"Audit events in {target.path}")
    if more:
        say(f"... and {more} more (raise --limit, or use --json or export)")
    return 0


def _export(args: argparse.Namespace) -> int:
    filters = _filters(args)
    target = _target(args)
    from fastmcp_guard._core import audit_scan

    out: Any = sys.stdout.buffer if args.out == "-" else args.out
    files = _files(target) if target.kind == "jsonl" else [target.path or ""]
    if args.out != "-" and Path(args.out).resolve() in {Path(f).resolve() for f in files}:
        raise UsageError("--out is the audit log itself; choose another file")
    with _progress(args.out != "-" and sys.stderr.isatty(), files) as progress:
        if target.kind == "sqlite":
            # Rows stream out of SQLite into a JSONL spool, which the core converts: one
            # CSV writer for both kinds, constant memory.
            with tempfile.NamedTemporaryFile("w", suffix=".jsonl", encoding="utf-8") as spool:
                for rec in _sqlite_records(target.path or "", filters, None):
                    rec.pop("id", None)
                    spool.write(json.dumps(rec, ensure_ascii=False) + "\n")
                spool.flush()
                stats = audit_scan(spool.name, out, format=args.format)
        else:
            stats = audit_scan(files, out, format=args.format, progress=progress,
                               **filters)  # fmt: skip
    if args.out != "-":
        say(f"Exported {stats['matched']} events to {args.out} ({args.format}).")
    if stats["malformed"]:
        warn(f"{stats['malformed']} malformed lines in {target.path} were skipped")
    return 0


def _tail(args: argparse.Namespace) -> int:
    target = _target(args)
    path = target.path or ""
    emit = _emitter(want_json(args))
    if target.kind == "sqlite":
        recs = list(_sqlite_records(path, {}, args.lines, newest_first=True))
        last_id = max((r["id"] for r in recs), default=0)
        for rec in reversed(recs):
            emit(rec)
        while args.follow:
            time.sleep(0.25)
            for rec in _sqlite_records(path, {}, None, after_id=last_id):
                emit(rec)
                last_id = rec["id"]
        return 0
    older = _files(target)[:-1]
    with open(path, "rb") as f:
        lines = _last_lines(f, args.lines)
        # Just after a rotation the live file is short: take the rest from rotated files.
        for rotated in reversed(older):
            if len(lines) >= args.lines:
                break
            with open(rotated, "rb") as r:
                lines = _last_lines(r, args.lines - len(lines)) + lines
        for line in lines:
            _emit_line(emit, line)
        if not args.follow:
            return 0
        _follow(f, path, emit)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from fastmcp_guard._core import audit_verify

    config = cli_config(args)
    if args.path is not None:
        path = args.path
    else:
        target = _readable(config, ("jsonl",), "JSONL log (verify checks JSONL hash chains)",
                           "give the path of a .jsonl file")  # fmt: skip
        path = target.path or ""
    key: str | None = config.audit_chain_key
    if args.chain_key_env:
        key = os.environ.get(args.chain_key_env)
        if not key:
            raise UsageError(
                f"argument --chain-key-env: environment variable {args.chain_key_env} is not set"
            )
    from fastmcp_guard._core import audit_log_files

    if not audit_log_files(path):
        raise FileNotFoundError(2, "no audit log here (nothing was logged)", path)
    report = audit_verify(path, key=key)
    if want_json(args):
        print_json(report)
        return 0 if report["ok"] else 1
    broken = report["broken"]
    if broken is not None:
        say(f"broken at {broken['file']}:{broken['line']}: {broken['reason']}")
        say(f"({report['events']} events verified before it)")
        return 1
    files = report["files"]
    say(f"OK: {report['events']} events in {files} file{'s' if files != 1 else ''}")
    if report["continues_from"]:
        say(f"  the chain starts at {report['continues_from']}, continuing from a file no "
            "longer present (removed by retention?)")  # fmt: skip
    if report["unchained"]:
        say(f"  {report['unchained']} earlier lines carry no chain (written before it was "
            "on) and were not checked")  # fmt: skip
    if report["torn"]:
        say(f"  {report['torn']} incomplete lines (writes cut short by a crash) were skipped: "
            "each acknowledged by the restart record after it, or at the end of a file")  # fmt: skip
    for place in report["torn_at_end"]:
        say(f"  {place} ends with an incomplete line (a crash while writing; the writer "
            "acknowledges it with a restart record when it next writes there)")  # fmt: skip
    if key is None:
        say("  no chain key: this detects accidental damage and naive edits, not an "
            "attacker who recomputes the chain")  # fmt: skip
    return 0


# -- JSONL -----------------------------------------------------------------------------


class _Head(io.RawIOBase):
    """A binary sink keeping the first ``limit`` lines and counting the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lines: list[bytes] = []
        self.extra = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        room = self.limit - len(self.lines)
        parts = data.split(b"\n")[:-1]
        self.lines.extend(parts[:room] if room > 0 else [])
        self.extra += max(0, len(parts) - max(room, 0))
        return len(data)


def _files(target: AuditTarget) -> list[str]:
    """The files of a JSONL log, oldest first (rotated ones, then the live file)."""
    from fastmcp_guard._core import audit_log_files

    return audit_log_files(target.path or "") or [target.path or ""]


def _jsonl_head(files: list[str], filters: dict[str, Any], limit: int) -> tuple[list[Any], int]:
    from fastmcp_guard._core import audit_scan

    head = _Head(limit)
    audit_scan(files, head, **filters)
    return [json.loads(line) for line in head.lines], head.extra


def _last_lines(f: IO[bytes], n: int) -> list[bytes]:
    """The last ``n`` complete lines of ``f`` (read backwards in blocks); leaves ``f`` at EOF."""
    if n == 0:
        f.seek(0, os.SEEK_END)
        return []
    end = f.seek(0, os.SEEK_END)
    pos, data = end, b""
    while pos > 0 and data.count(b"\n") <= n:
        step = min(64 * 1024, pos)
        pos -= step
        f.seek(pos)
        data = f.read(step) + data
    f.seek(end)
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines[-n:]


def _follow(f: IO[bytes], path: str, emit: Any) -> None:
    """Print lines appended to ``path`` until Ctrl-C; reopen it when it is rotated
    (a new file at the path) or truncated, like ``tail -F``."""
    inode = os.fstat(f.fileno()).st_ino
    partial = b""
    try:
        while True:
            chunk = f.read()
            if chunk:
                lines = (partial + chunk).split(b"\n")
                partial = lines.pop()
                for line in lines:
                    _emit_line(emit, line)
                continue
            time.sleep(0.2)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # between rotation's rename and the new file
            if st.st_ino != inode or st.st_size < f.tell():
                if st.st_ino != inode:
                    # Rotated: what was appended before the rename is printed first.
                    for line in (partial + f.read()).split(b"\n"):
                        _emit_line(emit, line)
                f.close()
                f = open(path, "rb")  # noqa: SIM115 - replaced on the next rotation
                inode, partial = os.fstat(f.fileno()).st_ino, b""
    except KeyboardInterrupt:
        pass
    finally:
        f.close()


def _emit_line(emit: Any, line: bytes) -> None:
    line = line.strip()
    if not line:
        return
    try:
        emit(json.loads(line))
    except ValueError:
        warn(f"skipped a malformed line ({len(line)} bytes)")


# -- SQLite ----------------------------------------------------------------------------

_COLUMNS = ("id", "ts", "key_id", "key_name", "tool", "scopes", "duration_ms", "status",
            "error", "input_args", "output_preview", "client_ip", "metadata", "extra")  # fmt: skip
_JSON_COLUMNS = ("scopes", "input_args", "metadata", "extra")


def _sqlite_records(
    path: str, filters: dict[str, Any], limit: int | None, *,
    newest_first: bool = False, after_id: int | None = None,
) -> Any:  # fmt: skip
    """Rows of the audit table as event dicts, streamed (read-only connection)."""
    where, params = [], []
    key = filters.get("key")
    if key:
        where.append("(key_id = ? OR key_name = ?)")
        params += [key, key]
    for column in ("tool", "status"):
        if filters.get(column):
            where.append(f"{column} = ?")
            params.append(filters[column])
    for column, op in (("since", ">="), ("until", "<")):
        if filters.get(column) is not None:
            where.append(f"ts {op} ?")
            params.append(_iso_ms(filters[column]))
    if after_id is not None:
        where.append("id > ?")
        params.append(after_id)
    sql = f"SELECT * FROM audit_log {'WHERE ' + ' AND '.join(where) if where else ''} " + (
        "ORDER BY id DESC" if newest_first else "ORDER BY id"
    )
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        cur = con.execute(sql, params)
        names = [d[0] for d in cur.description]
        for row in cur:
            rec = dict(zip(names, row, strict=True))
            for column in _JSON_COLUMNS:
                text = rec.pop(column, None) if column == "extra" else rec.get(column)
                try:
                    value = json.loads(text) if text else None
                except ValueError:
                    value = text
                if column == "extra":
                    rec.update(value if isinstance(value, dict) else {})
                else:
                    rec[column] = value if value is not None else ({} if column == "metadata"
                                                                   else [] if column == "scopes"
                                                                   else None)  # fmt: skip
            yield rec
    except sqlite3.DatabaseError as exc:
        raise OSError(f"cannot read the audit database {path}: {exc}") from None
    finally:
        con.close()


# -- helpers ---------------------------------------------------------------------------


def _instant(text: str | None, option: str) -> float | None:
    """Unix seconds of ``1h`` / ``7d`` (ago) or an ISO 8601 time (naive = UTC)."""
    return None if text is None else parse_instant(text, option=option)


def _iso_ms(seconds: float) -> str:
    """The stored timestamp form (``2026-03-09T14:00:00.123Z``) of Unix seconds."""
    dt = datetime.fromtimestamp(int(seconds * 1000) / 1000, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _emitter(as_json: bool) -> Any:
    def emit(rec: dict[str, Any]) -> None:
        if as_json:
            rec = {k: v for k, v in rec.items() if k != "id"}
            sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")
        else:
            dur = rec.get("duration_ms")
            dur_text = f"{dur:9.1f}ms" if isinstance(dur, (int, float)) else " " * 11
            sys.stdout.write(
                f"{str(rec.get('ts', ''))[:23]:23}  {rec.get('status', ''):12}  "
                f"{rec.get('key_name') or rec.get('key_id') or '-':20}  "
                f"{rec.get('tool') or '-':24}  {dur_text}  {rec.get('error') or ''}\n"
            )
        sys.stdout.flush()

    return emit


def _print_events(records: list[dict[str, Any]], *, title: str) -> None:
    rows, styles = [], []
    for r in records:
        dur = r.get("duration_ms")
        rows.append([str(r.get("ts", "")), str(r.get("status", "")),
                     str(r.get("key_name") or r.get("key_id") or "-"), str(r.get("tool") or "-"),
                     f"{dur:.1f}" if isinstance(dur, (int, float)) else "-",
                     str(r.get("client_ip") or "-"), str(r.get("error") or "")])  # fmt: skip
        styles.append([None, _STATUS_COLOURS.get(str(r.get("status"))), None, None, None, None,
                       None])  # fmt: skip
    print_table(["Time (UTC)", "Status", "Key", "Tool", "ms", "Client", "Error"], rows,
                title=title, styles=styles, no_wrap=("Time (UTC)",))  # fmt: skip


class _progress:
    """A rich progress bar over the bytes of the log on a terminal; else nothing."""

    def __init__(self, show: bool, files: list[str]) -> None:
        self.show, self.files = show, files
        self.bar: Any = None

    def __enter__(self) -> Any:
        if not self.show:
            return None
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

        bar = Progress("[progress.description]{task.description}", BarColumn(),
                       DownloadColumn(), TimeRemainingColumn(), transient=True)  # fmt: skip
        bar.start()
        self.bar = bar
        task = bar.add_task("exporting", total=sum(os.path.getsize(f) for f in self.files))

        def update(done: int) -> bool:
            bar.update(task, completed=done)
            return True

        return update

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
