"""Usage per key x tool x UTC day: calls, errors, cost units, refusals by kind, duration.

The guard records every guarded call (and every refusal) with :attr:`Usage.record`, the
bound method of the Rust :class:`~fastmcp_guard._core.UsageBook`: an in-memory aggregate,
about a hundred nanoseconds a call, no I/O. A daemon thread (``fmg-usage``) drains the
book every ``flush_interval`` seconds and adds the rows to the key store's database in
one batch (one transaction, or one Redis ``MULTI``): never one write per call.

Where usage is kept, by key store:

- **SQLite**: table ``fmg_usage`` in the key store's file (created on the first flush).
- **PostgreSQL**: table ``fmg_usage`` in the key store's database.
- **Redis**: hashes ``fmg:{usage}:d:<YYYY-MM-DD>:<key id>`` (fields ``<tool>|c`` calls,
  ``|e`` errors, ``|u`` cost units, ``|ms`` duration, ``|r:<kind>`` refusals), a set of the
  day's key ids and a sorted set of days; each expires :data:`REDIS_TTL_DAYS` days after
  its day.
- **memory**: in this process only (lost on exit, not shared with the CLI).

What counts: ``ok`` / ``error`` are calls that ran (``calls``, ``errors``, their cost in
``cost``, their duration in ``duration_ms``); any other kind is a refusal counted in
``refusals[kind]`` (it consumes nothing: no cost, no duration). ``would_refuse`` (a
shadow rule's would-be refusal) is recorded beside the call's own ``ok`` / ``error``, so
``refusals["would_refuse"]`` counts calls that are also in ``calls``.

Bounds: key ids and tool names are cut to 128 bytes; at most ``max_rows`` (key, tool,
day) rows wait between two flushes, and records beyond that are counted in the day's
``*other*`` / ``*other*`` row (:attr:`Usage.folded` counts them; a warning is logged):
many keys or tool names cannot grow memory without bound, and no count is dropped. A
failed flush puts the rows back (merged with newer ones, within the same bound), logs a
warning and is retried on the next round; :meth:`Usage.close` makes a last flush. A
write whose outcome is unknown (the connection dropped after the commit was sent) is
retried, so it may be counted twice.

Queries (:meth:`Usage.query`, the ``fastmcp-guard usage`` CLI) read the stored rows plus
this process's rows not yet flushed.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Literal

import anyio.to_thread

from fastmcp_guard._core import StoreError, UsageBook
from fastmcp_guard._util import mask_url
from fastmcp_guard.errors import ConfigError

if TYPE_CHECKING:
    from fastmcp_guard.keys import KeyStore

__all__ = ["OTHER", "REDIS_TTL_DAYS", "Usage", "UsageReport", "parse_day"]

log = logging.getLogger("fastmcp_guard.usage")

#: The key id and tool name of the row that takes records beyond ``max_rows``.
OTHER = "*other*"
#: How long Redis keeps a day's usage hashes (counted from the end of that day).
REDIS_TTL_DAYS = 400
#: The groupings :meth:`Usage.query` accepts.
GROUPINGS = ("day", "tool", "key")

By = Literal["day", "tool", "key"]
DayLike = date | datetime | str | None
#: A row as the book and the storages exchange it:
#: ``(day, key_id, tool, calls, errors, cost, duration_ms, refusals)``.
Row = tuple[int, str, str, int, int, int, float, dict[str, int]]

_EPOCH = date(1970, 1, 1)
_GROUP_COLUMN = {"day": "day", "tool": "tool", "key": "key_id"}
_GROUP_FIELD = {"day": "day", "tool": "tool", "key": "key_id"}
_SINCE_FORMS = (
    "a number of days or weeks back from today (7d: today and the 6 days before; 2w), "
    "today, yesterday, an ISO date (2026-12-01) or an ISO time (its UTC day)"
)


def _day_str(day: int) -> str:
    return (_EPOCH + timedelta(days=day)).isoformat()


def _day_num(d: date) -> int:
    return (d - _EPOCH).days


def parse_day(value: DayLike, *, today: int, option: str = "since") -> int | None:
    """The UTC day (days since 1970-01-01) that ``value`` names, or ``None`` for ``None``.

    Accepted: a ``date``; a ``datetime`` (naive = UTC; its UTC day); ``"today"``,
    ``"yesterday"``; ``"7d"`` (today and the 6 days before, so ``"1d"`` is today) or
    ``"2w"``; an ISO date ``"2026-12-01"`` or time ``"2026-12-01T10:00:00Z"``. Raises
    :class:`~fastmcp_guard.errors.ConfigError` naming ``option`` and the accepted forms.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(timezone.utc)
        return _day_num(value.date())
    if isinstance(value, date):
        return _day_num(value)
    if not isinstance(value, str):
        raise ConfigError(f"{option} must be a date, a datetime or a string ({_SINCE_FORMS}), "
                          f"got {type(value).__name__}")  # fmt: skip
    text = value.strip().lower()
    if text == "today":
        return today
    if text == "yesterday":
        return today - 1
    m = re.fullmatch(r"(\d{1,6})\s*(d|day|days|w|week|weeks)", text, re.ASCII)
    if m:
        n = int(m.group(1)) * (7 if m.group(2).startswith("w") else 1)
        if n < 1:
            raise ConfigError(f"{option}: {value.strip()!r} names no day; use 1d for today")
        if n > 36500:
            raise ConfigError(f"{option}: {value.strip()!r} is too far back; the most is 36500d")
        return today - n + 1
    try:
        when = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
    except ValueError:
        shown = value.strip()[:40]
        raise ConfigError(f"{option}: bad day {shown!r}; give {_SINCE_FORMS}") from None
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc)
    return _day_num(when.date())


# -- aggregation ------------------------------------------------------------------------


@dataclass
class _Agg:
    calls: int = 0
    errors: int = 0
    cost: int = 0
    duration_ms: float = 0.0
    refusals: dict[str, int] = field(default_factory=dict)

    def add(self, calls: int, errors: int, cost: int, duration_ms: float,
            refusals: dict[str, int]) -> None:  # fmt: skip
        self.calls += calls
        self.errors += errors
        self.cost += cost
        self.duration_ms += duration_ms
        for k, n in refusals.items():
            self.refusals[k] = self.refusals.get(k, 0) + n

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "errors": self.errors,
            "cost": self.cost,
            "refusals": dict(sorted(self.refusals.items())),
            "duration_ms": round(self.duration_ms, 3),
            "avg_ms": round(self.duration_ms / self.calls, 3) if self.calls else 0.0,
        }


def _group_of(row: Row, by: str) -> str:
    if by == "day":
        return _day_str(row[0])
    return row[2] if by == "tool" else row[1]


def _matches(row: Row, key_id: str | None, tool: str | None, since: int | None,
             until: int | None) -> bool:  # fmt: skip
    return ((key_id is None or row[1] == key_id) and (tool is None or row[2] == tool)
            and (since is None or row[0] >= since) and (until is None or row[0] <= until))  # fmt: skip


def _aggregate(rows: Iterable[Row], by: str, out: dict[str, _Agg]) -> dict[str, _Agg]:
    for row in rows:
        g = _group_of(row, by)
        agg = out.get(g)
        if agg is None:
            agg = out[g] = _Agg()
        agg.add(row[3], row[4], row[5], row[6], row[7])
    return out


@dataclass(frozen=True)
class UsageReport:
    """What :meth:`Usage.query` found.

    ``rows``: one dict per group, sorted by it: the group (``day`` as ``YYYY-MM-DD``,
    ``tool`` or ``key_id``), ``calls``, ``errors``, ``cost``, ``refusals`` (kind -> count),
    ``duration_ms`` and ``avg_ms`` (per call that ran). ``totals``: the same sums over all
    rows (without the group).
    """

    by: str
    rows: list[dict[str, Any]]
    totals: dict[str, Any]
    since: date | None = None
    until: date | None = None
    key_id: str | None = None
    tool: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "by": self.by,
            "since": None if self.since is None else self.since.isoformat(),
            "until": None if self.until is None else self.until.isoformat(),
            "key_id": self.key_id,
            "tool": self.tool,
            "rows": self.rows,
            "totals": self.totals,
        }


# -- storages ---------------------------------------------------------------------------


class _Storage:
    """Where flushed rows go. ``write`` adds rows (one batch, atomically);
    ``aggregate`` sums the stored rows per group. Calls are serialised by ``Usage``."""

    name = "memory"
    _conn: Any = None

    def write(self, rows: list[Row]) -> None:
        raise NotImplementedError

    def aggregate(self, by: str, key_id: str | None, tool: str | None, since: int | None,
                  until: int | None) -> dict[str, _Agg]:  # fmt: skip
        raise NotImplementedError

    def close(self) -> None:
        """Release the connection (a later call reopens it)."""
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


class MemoryUsageStorage(_Storage):
    """Usage kept in this process (the memory key store): lost on exit. At most
    ``max_rows`` rows; beyond that new rows are counted in the day's ``*other*`` row."""

    def __init__(self, max_rows: int = 1_000_000) -> None:
        self.max_rows = max_rows
        self._rows: dict[tuple[int, str, str], _Agg] = {}

    def write(self, rows: list[Row]) -> None:
        for row in rows:
            k = (row[0], row[1], row[2])
            agg = self._rows.get(k)
            if agg is None:
                if len(self._rows) >= self.max_rows:
                    k = (row[0], OTHER, OTHER)
                    agg = self._rows.get(k)
                if agg is None:
                    agg = self._rows[k] = _Agg()
            agg.add(row[3], row[4], row[5], row[6], row[7])

    def rows(self) -> Iterator[Row]:
        for (day, key, tool), a in self._rows.items():
            yield (day, key, tool, a.calls, a.errors, a.cost, a.duration_ms, a.refusals)

    def aggregate(self, by: str, key_id: str | None, tool: str | None, since: int | None,
                  until: int | None) -> dict[str, _Agg]:  # fmt: skip
        rows = (r for r in self.rows() if _matches(r, key_id, tool, since, until))
        return _aggregate(rows, by, {})


_TABLE_SQLITE = """
CREATE TABLE IF NOT EXISTS fmg_usage (
    day         TEXT NOT NULL,
    key_id      TEXT NOT NULL,
    tool        TEXT NOT NULL,
    calls       INTEGER NOT NULL DEFAULT 0,
    errors      INTEGER NOT NULL DEFAULT 0,
    cost        INTEGER NOT NULL DEFAULT 0,
    duration_ms REAL NOT NULL DEFAULT 0,
    refusals    TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (day, key_id, tool)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS fmg_usage_key_day ON fmg_usage (key_id, day);
"""

_UPSERT_SQLITE = """
INSERT INTO fmg_usage (day, key_id, tool, calls, errors, cost, duration_ms, refusals)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, key_id, tool) DO UPDATE SET
    calls = calls + excluded.calls,
    errors = errors + excluded.errors,
    cost = cost + excluded.cost,
    duration_ms = duration_ms + excluded.duration_ms,
    refusals = CASE
        WHEN excluded.refusals = '{}' THEN refusals
        WHEN refusals = '{}' THEN excluded.refusals
        ELSE (SELECT json_group_object(k, n) FROM (
            SELECT key AS k, sum(value) AS n FROM (
                SELECT key, value FROM json_each(fmg_usage.refusals)
                UNION ALL SELECT key, value FROM json_each(excluded.refusals)
            ) GROUP BY key))
    END
"""


def _refusals_json(refusals: dict[str, int]) -> str:
    return json.dumps(refusals, sort_keys=True, separators=(",", ":")) if refusals else "{}"


def _where(key_id: str | None, tool: str | None, since: Any, until: Any,
           mark: str) -> tuple[str, list[Any]]:  # fmt: skip
    clauses: list[str] = []
    params: list[Any] = []
    for column, op, value in (("day", ">=", since), ("day", "<=", until),
                              ("key_id", "=", key_id), ("tool", "=", tool)):  # fmt: skip
        if value is not None:
            clauses.append(f"{column} {op} {mark}")
            params.append(value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


class SqliteUsageStorage(_Storage):
    """Table ``fmg_usage`` in the SQLite file ``path`` (the key store's), created on the
    first write. One connection, reopened after an error; ``timeout`` seconds of busy wait
    (the key store writes the same file)."""

    def __init__(self, path: str, *, timeout: float = 5.0) -> None:
        self.path = path
        self.name = f"sqlite:///{path}"
        self.timeout = timeout
        self._table = False

    def _connect(self) -> Any:
        import sqlite3

        if self._conn is None:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)  # fmt: skip
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            self._conn = conn
        return self._conn

    def _fail(self, exc: Exception, what: str) -> StoreError:
        self.close()
        return StoreError(f"usage {what} {self.name}: {exc}")

    def write(self, rows: list[Row]) -> None:
        import sqlite3

        try:
            conn = self._connect()
            if not self._table:
                conn.executescript(_TABLE_SQLITE)
                self._table = True
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_UPSERT_SQLITE, [
                    (_day_str(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], _refusals_json(r[7]))
                    for r in rows
                ])  # fmt: skip
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise self._fail(exc, "write to") from None

    def aggregate(self, by: str, key_id: str | None, tool: str | None, since: int | None,
                  until: int | None) -> dict[str, _Agg]:  # fmt: skip
        import os
        import sqlite3

        out: dict[str, _Agg] = {}
        if not os.path.exists(self.path):
            return out  # reading never creates the file
        g = _GROUP_COLUMN[by]
        where, params = _where(key_id, tool, None if since is None else _day_str(since),
                               None if until is None else _day_str(until), "?")  # fmt: skip
        try:
            conn = self._connect()
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'fmg_usage'"
            ).fetchone()
            if found is None:
                return out
            # "+column": group with a scan and a sort, not by walking the (key_id, day)
            # index with a table lookup per row (several times slower on many rows); by
            # day the primary key's order serves.
            grouped = g if by == "day" else f"+{g}"
            for grp, calls, errors, cost, ms in conn.execute(
                f"SELECT {g}, sum(calls), sum(errors), sum(cost), sum(duration_ms) "
                f"FROM fmg_usage{where} GROUP BY {grouped}", params,
            ):  # fmt: skip
                out[grp] = _Agg(calls, errors, cost, ms)
            extra = " AND " if where else " WHERE "
            for grp, kind, n in conn.execute(
                f"SELECT {g}, j.key, sum(j.value) FROM fmg_usage, json_each(fmg_usage.refusals) "
                f"AS j{where}{extra}refusals != '{{}}' GROUP BY +{g}, j.key", params,
            ):  # fmt: skip
                out[grp].refusals[kind] = n
        except sqlite3.Error as exc:
            raise self._fail(exc, "read from") from None
        return out


_TABLE_PG = """
CREATE TABLE IF NOT EXISTS fmg_usage (
    day         DATE NOT NULL,
    key_id      TEXT NOT NULL,
    tool        TEXT NOT NULL,
    calls       BIGINT NOT NULL DEFAULT 0,
    errors      BIGINT NOT NULL DEFAULT 0,
    cost        BIGINT NOT NULL DEFAULT 0,
    duration_ms DOUBLE PRECISION NOT NULL DEFAULT 0,
    refusals    JSONB NOT NULL DEFAULT '{}',
    PRIMARY KEY (day, key_id, tool)
);
CREATE INDEX IF NOT EXISTS fmg_usage_key_day ON fmg_usage (key_id, day);
"""

_UPSERT_PG = """
INSERT INTO fmg_usage (day, key_id, tool, calls, errors, cost, duration_ms, refusals)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (day, key_id, tool) DO UPDATE SET
    calls = fmg_usage.calls + excluded.calls,
    errors = fmg_usage.errors + excluded.errors,
    cost = fmg_usage.cost + excluded.cost,
    duration_ms = fmg_usage.duration_ms + excluded.duration_ms,
    refusals = CASE
        WHEN excluded.refusals = '{}'::jsonb THEN fmg_usage.refusals
        ELSE (SELECT coalesce(jsonb_object_agg(k, n), '{}'::jsonb) FROM (
            SELECT k, sum(v::bigint) AS n FROM (
                SELECT key AS k, value AS v FROM jsonb_each_text(fmg_usage.refusals)
                UNION ALL SELECT key, value FROM jsonb_each_text(excluded.refusals)
            ) u GROUP BY k) g)
    END
"""


class PostgresUsageStorage(_Storage):
    """Table ``fmg_usage`` in the key store's PostgreSQL database (extra ``[postgres]``).
    Rows are written in (day, key, tool) order, so concurrent flushes of several nodes
    cannot deadlock; ``ON CONFLICT`` makes their sums add up."""

    def __init__(self, dsn: str, *, connect_timeout: float = 5.0) -> None:
        from fastmcp_guard.keys.postgres import _psycopg

        self._pg = _psycopg()
        self.dsn = dsn
        self.name = mask_url(dsn)
        self.connect_timeout = connect_timeout
        self._table = False

    def _connect(self) -> Any:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = self._pg.connect(self.dsn,
                                              connect_timeout=max(1, int(self.connect_timeout)))  # fmt: skip
            except self._pg.Error as exc:
                raise StoreError(f"usage: cannot connect to {self.name}: {str(exc).strip()}; "
                                 "check that PostgreSQL is running and the DSN is right") from None  # fmt: skip
        return self._conn

    def _ensure_table(self, conn: Any) -> None:
        if self._table:
            return
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('fmg_usage_schema'))")
            cur.execute(_TABLE_PG)
        self._table = True

    def _run(self, what: str, fn: Any) -> Any:
        conn = self._connect()
        try:
            return fn(conn)
        except self._pg.Error as exc:
            self.close()
            raise StoreError(f"usage {what} {self.name}: {str(exc).strip()}") from None

    def write(self, rows: list[Row]) -> None:
        from psycopg.types.json import Jsonb

        params = [(_EPOCH + timedelta(days=r[0]), r[1], r[2], r[3], r[4], r[5], r[6],
                   Jsonb(r[7])) for r in rows]  # fmt: skip

        def go(conn: Any) -> None:
            self._ensure_table(conn)
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(_UPSERT_PG, params)

        self._run("write to", go)

    def aggregate(self, by: str, key_id: str | None, tool: str | None, since: int | None,
                  until: int | None) -> dict[str, _Agg]:  # fmt: skip
        g = _GROUP_COLUMN[by]
        sel = "to_char(day, 'YYYY-MM-DD')" if by == "day" else g
        where, params = _where(
            key_id, tool, None if since is None else _EPOCH + timedelta(days=since),
            None if until is None else _EPOCH + timedelta(days=until), "%s",
        )  # fmt: skip

        def go(conn: Any) -> dict[str, _Agg]:
            out: dict[str, _Agg] = {}
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT to_regclass('fmg_usage')")
                row = cur.fetchone()
                if row is None or row[0] is None:
                    return out
                cur.execute(f"SELECT {sel}, sum(calls), sum(errors), sum(cost), "
                            f"sum(duration_ms) FROM fmg_usage{where} GROUP BY 1", params)  # fmt: skip
                for grp, calls, errors, cost, ms in cur.fetchall():
                    out[grp] = _Agg(int(calls), int(errors), int(cost), float(ms))
                extra = " AND " if where else " WHERE "
                cur.execute(
                    f"SELECT {sel}, j.key, sum(j.value::bigint) FROM fmg_usage, "
                    f"jsonb_each_text(refusals) AS j{where}{extra}refusals <> '{{}}'::jsonb "
                    "GROUP BY 1, 2", params,
                )  # fmt: skip
                for grp, kind, n in cur.fetchall():
                    out[grp].refusals[kind] = int(n)
            return out

        result: dict[str, _Agg] = self._run("read from", go)
        return result


class RedisUsageStorage(_Storage):
    """Hashes per (day, key) in the key store's Redis (extra ``[redis]``); see the module
    docs for the layout. One ``MULTI`` pipeline per flush (``HINCRBY`` /
    ``HINCRBYFLOAT``, so several nodes add up); each key expires
    :data:`REDIS_TTL_DAYS` days after the end of its day."""

    def __init__(self, url: str, *, prefix: str = "fmg:{usage}:", timeout: float = 2.0) -> None:
        from fastmcp_guard.keys.redis_store import _redis

        self._redis = _redis()
        self.url = url
        self.name = mask_url(url)
        self.prefix = prefix
        self.client = self._redis.Redis.from_url(url, socket_timeout=timeout,
                                                 socket_connect_timeout=timeout,
                                                 decode_responses=True)  # fmt: skip

    def _hash(self, day: str, key_id: str) -> str:
        return f"{self.prefix}d:{day}:{key_id}"

    def _run(self, what: str, fn: Any) -> Any:
        try:
            return fn()
        except self._redis.RedisError as exc:
            raise StoreError(f"usage {what} {self.name}: {exc}") from None

    def write(self, rows: list[Row]) -> None:
        def go() -> None:
            pipe = self.client.pipeline(transaction=True)
            days: dict[str, int] = {}
            for day, key_id, tool, calls, errors, cost, ms, refusals in rows:
                d = _day_str(day)
                days[d] = day
                h = self._hash(d, key_id)
                if calls:
                    pipe.hincrby(h, f"{tool}|c", calls)
                if errors:
                    pipe.hincrby(h, f"{tool}|e", errors)
                if cost:
                    pipe.hincrby(h, f"{tool}|u", cost)
                if ms:
                    pipe.hincrbyfloat(h, f"{tool}|ms", ms)
                for kind, n in refusals.items():
                    pipe.hincrby(h, f"{tool}|r:{kind}", n)
                pipe.sadd(f"{self.prefix}keys:{d}", key_id)
                pipe.expireat(h, (day + 1 + REDIS_TTL_DAYS) * 86400)
            for d, day in days.items():
                pipe.zadd(f"{self.prefix}days", {d: day})
                pipe.expireat(f"{self.prefix}keys:{d}", (day + 1 + REDIS_TTL_DAYS) * 86400)
            newest = max(days.values(), default=0)
            pipe.zremrangebyscore(f"{self.prefix}days", "-inf", newest - REDIS_TTL_DAYS - 1)
            pipe.execute()

        self._run("write to", go)

    def _rows(self, key_id: str | None, since: int | None, until: int | None) -> list[Row]:
        lo = "-inf" if since is None else since
        hi = "+inf" if until is None else until
        days = self.client.zrangebyscore(f"{self.prefix}days", lo, hi, withscores=True)
        pairs: list[tuple[int, str, str]] = []
        if key_id is not None:
            pairs = [(int(score), d, key_id) for d, score in days]
        else:
            pipe = self.client.pipeline(transaction=False)
            for d, _ in days:
                pipe.smembers(f"{self.prefix}keys:{d}")
            for (d, score), keys in zip(days, pipe.execute(), strict=True):
                pairs.extend((int(score), d, k) for k in sorted(keys))
        pipe = self.client.pipeline(transaction=False)
        for _, d, k in pairs:
            pipe.hgetall(self._hash(d, k))
        rows: list[Row] = []
        for (day, _, k), fields in zip(pairs, pipe.execute(), strict=True):
            per_tool: dict[str, list[Any]] = {}
            for name, value in fields.items():
                tool, _, what = name.rpartition("|")
                r = per_tool.setdefault(tool, [0, 0, 0, 0.0, {}])
                if what == "c":
                    r[0] = int(value)
                elif what == "e":
                    r[1] = int(value)
                elif what == "u":
                    r[2] = int(value)
                elif what == "ms":
                    r[3] = float(value)
                elif what.startswith("r:"):
                    r[4][what[2:]] = int(value)
            rows.extend((day, k, t, r[0], r[1], r[2], r[3], r[4]) for t, r in per_tool.items())
        return rows

    def aggregate(self, by: str, key_id: str | None, tool: str | None, since: int | None,
                  until: int | None) -> dict[str, _Agg]:  # fmt: skip
        rows = self._run("read from", lambda: self._rows(key_id, since, until))
        return _aggregate((r for r in rows if tool is None or r[2] == tool), by, {})

    def close(self) -> None:
        self.client.close()


# -- the facade -------------------------------------------------------------------------


class Usage:
    """Usage per key x tool x UTC day, recorded in memory and flushed in batches.

    Args:
        storage: where flushed rows go (see :meth:`for_store` and :meth:`open`).
        flush_interval: seconds between two flushes of the background thread; ``0``
            starts no thread (call :meth:`flush` yourself).
        max_rows: (key, tool, day) rows held between two flushes; beyond it records are
            counted in the day's ``*other*`` row.

    ``record(key_id, tool, kind, cost, duration_ms)`` is the book's bound method: call it
    once per guarded call (``kind`` ``ok`` / ``error`` / a refusal kind; see the module
    docs). ``record_at(..., day)`` records on a given day (days since 1970-01-01).
    """

    def __init__(self, storage: _Storage | None = None, *, flush_interval: float = 5.0,
                 max_rows: int = 100_000) -> None:  # fmt: skip
        if not flush_interval >= 0:
            raise ConfigError(f"flush_interval must be >= 0 seconds, got {flush_interval!r}")
        self.storage = storage if storage is not None else MemoryUsageStorage()
        self.flush_interval = flush_interval
        self.book = UsageBook(max_rows=max_rows)
        #: The hot path: ``record(key_id, tool, kind, cost, duration_ms) -> None``.
        self.record = self.book.record
        #: ``record_at(key_id, tool, kind, cost, duration_ms, day) -> None``.
        self.record_at = self.book.record_at
        self._lock = threading.Lock()
        self._failing = False
        self._folded_seen = 0
        self._closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if flush_interval > 0:
            self._thread = threading.Thread(target=self._run, name="fmg-usage", daemon=True)
            self._thread.start()

    # -- construction -------------------------------------------------------------------

    @classmethod
    def open(cls, backend: str, *, path: str | None = None, dsn: str | None = None,
             flush_interval: float = 5.0, max_rows: int = 100_000) -> Usage:  # fmt: skip
        """Usage kept where a key store of ``backend`` keeps its keys: ``memory``,
        ``sqlite`` (``path``), ``postgres`` / ``postgresql`` or ``redis`` (``dsn``)."""
        storage: _Storage
        if backend == "memory":
            storage = MemoryUsageStorage()
        elif backend == "sqlite":
            if not path:
                raise ConfigError("usage on an SQLite key store needs its path")
            storage = SqliteUsageStorage(path)
        elif backend in ("postgres", "postgresql", "redis"):
            if not dsn:
                raise ConfigError(f"usage on a {backend} key store needs its dsn")
            storage = (RedisUsageStorage(dsn) if backend == "redis"
                       else PostgresUsageStorage(dsn))  # fmt: skip
        else:
            raise ConfigError(f"unknown key store backend {backend!r}; expected one of "
                              "'memory', 'sqlite', 'postgres', 'redis'")  # fmt: skip
        return cls(storage, flush_interval=flush_interval, max_rows=max_rows)

    @classmethod
    def for_store(cls, keystore: KeyStore, *, flush_interval: float = 5.0,
                  max_rows: int = 100_000) -> Usage:  # fmt: skip
        """Usage kept in ``keystore``'s database (in process for a memory store)."""
        return cls.open(str(keystore.backend), path=keystore.path, dsn=keystore.dsn,
                        flush_interval=flush_interval, max_rows=max_rows)  # fmt: skip

    # -- state ----------------------------------------------------------------------------

    def pending(self) -> int:
        """(key, tool, day) rows recorded and not yet flushed."""
        return int(self.book.pending())

    @property
    def folded(self) -> int:
        """Records counted in an ``*other*`` row because ``max_rows`` was reached."""
        return int(self.book.folded)

    def today(self, key_id: str) -> dict[str, Any]:
        """This key's usage of the current UTC day: ``{"day", "tools": {tool: counts},
        "totals": counts}`` (counts as in :class:`UsageReport` rows). Blocking (reads the
        store): from async code use :meth:`today_async`."""
        day = int(self.book.today())
        report = self.query(key_id=key_id, since=_EPOCH + timedelta(days=day),
                            until=_EPOCH + timedelta(days=day), by="tool")  # fmt: skip
        tools = {r["tool"]: {k: v for k, v in r.items() if k != "tool"} for r in report.rows}
        return {"day": _day_str(day), "key_id": key_id, "tools": tools, "totals": report.totals}

    # -- flushing -------------------------------------------------------------------------

    def flush(self) -> int:
        """Write the pending rows now, in one batch; the number of rows written.

        On failure the rows are put back (to be retried) and
        :class:`~fastmcp_guard.errors.StoreError` is raised. Blocking."""
        with self._lock:
            folded = int(self.book.folded)
            if folded > self._folded_seen:
                log.warning(
                    "usage: %d records beyond max_rows=%d rows counted under key and tool "
                    "%r (raise max_rows or lower flush_interval)",
                    folded - self._folded_seen, self.book.max_rows, OTHER,
                )  # fmt: skip
                self._folded_seen = folded
            rows = self.book.drain()
            if not rows:
                return 0
            try:
                self.storage.write(rows)
            except Exception:
                self.book.restore(rows)
                raise
            return len(rows)

    def _flush_quietly(self) -> None:
        try:
            self.flush()
        except Exception as exc:  # noqa: BLE001 - logged; the rows wait for the next round
            if not self._failing:
                self._failing = True
                log.warning("usage: flush to %s failed (%s); the %d pending rows are kept and "
                            "retried", self.storage.name, exc, self.pending())  # fmt: skip
        else:
            if self._failing:
                self._failing = False
                log.warning("usage: flush to %s works again", self.storage.name)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval):
            self._flush_quietly()

    async def flush_async(self) -> int:
        """:meth:`flush`, in a worker thread."""
        return await anyio.to_thread.run_sync(self.flush)

    def close(self) -> None:
        """Stop the flusher and write what is pending (logged, not raised, if the store
        cannot be written: those counts are then lost). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            self.flush()
        except Exception as exc:  # noqa: BLE001 - close must not raise
            log.warning("usage: last flush to %s failed (%s); %d rows of usage not written",
                        self.storage.name, exc, self.pending())  # fmt: skip
        with self._lock:
            self.storage.close()

    async def aclose(self) -> None:
        """:meth:`close`, in a worker thread."""
        await anyio.to_thread.run_sync(self.close)

    # -- queries --------------------------------------------------------------------------

    def query(self, key_id: str | None = None, tool: str | None = None, since: DayLike = None,
              until: DayLike = None, by: By | str = "day") -> UsageReport:  # fmt: skip
        """Usage summed per ``by`` (``day``, ``tool`` or ``key``) over the stored rows and
        this process's pending ones, filtered by key, tool and UTC days ``since`` to
        ``until`` (both included; see :func:`parse_day` for the forms). Blocking (reads
        the store): from async code use :meth:`query_async`. Raises
        :class:`~fastmcp_guard.errors.ConfigError` for a bad ``by`` or day."""
        if by not in GROUPINGS:
            raise ConfigError(f"by must be one of 'day', 'tool', 'key', got {by!r}")
        today = int(self.book.today())
        lo = parse_day(since, today=today, option="since")
        hi = parse_day(until, today=today, option="until")
        if lo is not None and hi is not None and lo > hi:
            raise ConfigError(f"since ({_day_str(lo)}) is after until ({_day_str(hi)})")
        with self._lock:
            groups = self.storage.aggregate(by, key_id, tool, lo, hi)
            pending = self.book.snapshot()
        _aggregate((r for r in pending if _matches(r, key_id, tool, lo, hi)), by, groups)
        field_name = _GROUP_FIELD[by]
        total = _Agg()
        rows = []
        for g in sorted(groups):
            a = groups[g]
            total.add(a.calls, a.errors, a.cost, a.duration_ms, a.refusals)
            rows.append({field_name: g, **a.as_dict()})
        return UsageReport(
            by=by, rows=rows, totals=total.as_dict(), key_id=key_id, tool=tool,
            since=None if lo is None else _EPOCH + timedelta(days=lo),
            until=None if hi is None else _EPOCH + timedelta(days=hi),
        )  # fmt: skip

    async def query_async(self, key_id: str | None = None, tool: str | None = None,
                          since: DayLike = None, until: DayLike = None,
                          by: By | str = "day") -> UsageReport:  # fmt: skip
        """:meth:`query`, in a worker thread."""

        def go() -> UsageReport:
            return self.query(key_id=key_id, tool=tool, since=since, until=until, by=by)

        return await anyio.to_thread.run_sync(go)

    async def today_async(self, key_id: str) -> dict[str, Any]:
        """:meth:`today`, in a worker thread."""
        return await anyio.to_thread.run_sync(self.today, key_id)

    def __repr__(self) -> str:
        return f"Usage(storage={self.storage.name!r}, pending={self.pending()})"
