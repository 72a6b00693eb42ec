"""Audit log: one record per decision, written off the request path.

Every call the guard sees ends in exactly one event whose ``status`` is one of
``ok``, ``error``, ``rate_limited``, ``unauthorized``, ``forbidden`` or ``ip_denied``.
Key lifecycle actions add ``created``, ``rotated`` and ``revoked`` events. Fields:
``ts`` (RFC 3339, UTC), ``key_id``, ``key_name``, ``tool``, ``scopes``,
``duration_ms``, ``status``, ``error``, ``input_args``, ``output_preview``,
``client_ip``, ``metadata``. Tokens never appear: as a last line of defence the core
masks anything token-shaped in every field of every backend (``fmg_sk_<id>_***``; 0.2's
tokens ``fmg_sk_<hex>.***``).

Refusals made before there is an identity go through :meth:`AuditLog.log_refusal`,
which aggregates a flood into one summary event per client address (an IPv6 /64),
status and reason per minute, with a ``count``: a flood costs counts, not disk.

The request path turns the call into one event (the policy applied, tool arguments
rendered as JSON once) and enqueues it (about a microsecond); a Rust thread renders and
writes each batch to every backend (lines for a file, columns for SQLite) and flushes
at most ``flush_interval_ms`` later, on
:meth:`AuditLog.close`, and at interpreter exit. What happens when events cannot be
recorded (queue full, disk full, file unwritable) is the ``on_failure`` policy of
:class:`AuditLog`: ``drop`` (default: counted in ``stats()``, and a warning on the
``fastmcp_guard.audit`` logger at most every 10 s), ``block`` (wait up to 1 s for
queue room) or ``fail_closed`` (refuse calls while the log is unavailable).

Backends: :class:`FileBackend` appends JSON lines (rotation, retention, and a
hash chain that makes edits detectable: ``fastmcp-guard audit verify``);
:class:`SQLiteBackend` inserts rows into table ``audit_log`` (one transaction per
batch), which :meth:`AuditLog.query` searches. A fastmcp-guard 0.2 SQLite audit
database is taken over in place, and its rows stay queryable.
:class:`~fastmcp_guard.audit.http.HttpBackend` POSTs batches of events to a webhook or
SIEM through a durable on-disk spool; :class:`~fastmcp_guard.audit.otel.OTelBackend`
records decisions on the host's OpenTelemetry traces.
"""

from __future__ import annotations

import atexit
import os
import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import anyio.to_thread

from fastmcp_guard._core import AuditSink, AuditWriter, audit_query
from fastmcp_guard.audit.http import HttpBackend
from fastmcp_guard.audit.otel import OTelBackend
from fastmcp_guard.errors import (
    ArgumentTypeError,
    ConfigError,
    GuardError,
    InvalidArgumentError,
)

__all__ = ["AuditLog", "Backend", "FileBackend", "HttpBackend", "OTelBackend", "SQLiteBackend"]

_DEFAULT_PATH = "fastmcp-guard-audit.jsonl"
_DEFAULT_DB_PATH = "fastmcp-guard-audit.db"
#: ``on_failure="block"``: longest ``log`` waits for room in the queue.
_BLOCK_MS = 1000
_POLICIES = ("drop", "block", "fail_closed")

OnFailure = Literal["drop", "block", "fail_closed"]


@dataclass(frozen=True)
class FileBackend:
    """Append JSON lines to ``path`` (created with mode 0600; its directory must exist).

    Args:
        rotate_bytes: start a new file before a batch would take the live one past
            this size. The old file is renamed ``<stem>-<UTC yyyymmddTHHMMSSmmm>.jsonl``
            beside it (never copied or truncated: safe with ``tail -F`` and log
            shippers).
        rotate_daily: also start a new file at the first event of each UTC day.
        retention: keep at most this many rotated files (the oldest are deleted);
            ``None`` keeps them all.
        chain: end every line with ``"id"`` (a unique, time-ordered event id) and
            ``"chain"`` (a BLAKE3 hash linking it to the line before), so that
            ``fastmcp-guard audit verify`` finds edited, deleted, inserted or reordered
            lines. The chain continues across rotation and restarts. A line cut short
            by a crash is acknowledged, when the writer next appends, by a chained
            restart record (``"record": "restart"``, ``torn_bytes``, ``torn_blake3``);
            an incomplete line anywhere else fails verification.
        chain_key: a secret (bytes or str) keying the chain hash. Without a key the
            chain detects accidental damage and naive edits only: whoever can edit the
            file can recompute it. With a key they also need the key.
        flush_interval_ms: longest an event waits before it is written.
    """

    path: str | os.PathLike[str] = _DEFAULT_PATH
    queue_capacity: int = 65536
    flush_interval_ms: int = 100
    rotate_bytes: int | None = None
    rotate_daily: bool = False
    retention: int | None = None
    chain: bool = True
    chain_key: bytes | str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class SQLiteBackend:
    """Insert rows into table ``audit_log`` of the SQLite file ``path`` (created with
    mode 0600; its directory must exist), one transaction per batch; queryable with
    :meth:`AuditLog.query`. A fastmcp-guard 0.2 audit database is reused in place.
    Indexed by ``ts``, and by key id, tool and status with ``ts``.

    Args:
        retention_days: keep only this many days of events: older rows are deleted at
            open and then about once a minute (``None``: keep everything).
    """

    path: str | os.PathLike[str] = _DEFAULT_DB_PATH
    queue_capacity: int = 65536
    flush_interval_ms: int = 100
    retention_days: float | None = None


#: What ``AuditLog(backend=...)`` takes (one, or several in a list: one writer over them).
Backend = FileBackend | SQLiteBackend | HttpBackend | OTelBackend


class AuditLog:
    """Where and what to record.

    Args:
        backend: a :class:`FileBackend`, :class:`SQLiteBackend`,
            :class:`~fastmcp_guard.audit.http.HttpBackend` or
            :class:`~fastmcp_guard.audit.otel.OTelBackend` (or ``"file"`` / ``"sqlite"``
            with ``path=``, ``"http"`` with ``url=``, or ``"otel"``), or a list of several:
            every event goes to each (one queue and writer thread over them; at most one
            of each kind).
        path: the JSONL file for ``backend="file"``, the database for ``backend="sqlite"``,
            the spool directory for ``backend="http"``.
        url: the endpoint for ``backend="http"``.
        log_inputs: record tool arguments (turn off when they may hold PII).
        log_outputs: record the first ``output_preview_chars`` characters of results.
        output_preview_chars: length of ``output_preview``.
        redact: key paths in ``input_args`` and ``metadata`` whose values are recorded
            as ``"[redacted]"``: a bare name (``"password"``) at any depth, a dotted
            path (``"headers.authorization"``) from the top, ``*`` for any one key
            (``"*.token"``); lists are transparent; keys compare case-insensitively.
        refusal_burst, refusal_interval_s, refusal_max_groups: how
            :meth:`log_refusal` aggregates refusals made before there is an identity
            (defaults: the first 5 per group per 60 s written one by one, at most 1024
            groups per interval).
        on_failure: when an event cannot be recorded. ``"drop"`` (default): drop it,
            count it in :meth:`stats`, and log a warning on the ``fastmcp_guard.audit``
            logger at most every 10 s. ``"block"``: when the queue is full, wait up to
            1 s for room (the GIL released; the event loop waits too) before dropping.
            ``"fail_closed"``: the guard refuses calls (an MCP error "audit log
            unavailable") while :meth:`healthy` is false: the last batch failed to be
            written, or the queue is full.
        observers: objects whose ``log(*fields)`` is also called with every event, as
            recorded (after ``log_inputs`` / ``log_outputs``), in :meth:`log`'s
            positional order, and which :meth:`flush`, :meth:`close`, :meth:`stats` and
            :meth:`healthy` include (the guard's metrics). With observers, ``backend``
            may be ``[]``: then nothing is written.

    The file is opened here, so a missing directory, an unwritable path or (for SQLite)
    a file that is not an audit database fails at construction with
    :class:`~fastmcp_guard.errors.AuditWriteError` naming the path.
    """

    def __init__(
        self,
        backend: Backend | str | Sequence[Backend | str] | None = None,
        path: str | os.PathLike[str] | None = None,
        url: str | None = None,
        log_inputs: bool = True,
        log_outputs: bool = True,
        *,
        output_preview_chars: int = 200,
        redact: Sequence[str] | None = None,
        on_failure: OnFailure = "drop",
        refusal_burst: int = 5,
        refusal_interval_s: float = 60.0,
        refusal_max_groups: int = 1024,
        observers: Sequence[Any] = (),
    ) -> None:
        specs = list(backend) if isinstance(backend, (list, tuple)) else [backend]
        if not specs and not observers:
            raise ConfigError(
                "AuditLog(backend=[]) needs at least one backend (or observers=[...])"
            )
        resolved = [_resolve_backend(b, path, url) for b in specs]
        kinds = [type(b) for b in resolved]
        if len(set(kinds)) != len(kinds):
            raise ConfigError("AuditLog(backend=[...]) takes each kind of backend at most once")
        if output_preview_chars < 0:
            raise ConfigError("output_preview_chars must be >= 0")
        if on_failure not in _POLICIES:
            raise ConfigError(
                f"on_failure must be one of {', '.join(map(repr, _POLICIES))}, got {on_failure!r}"
            )
        if isinstance(redact, str):
            raise ConfigError(f"redact must be a list of patterns, got the string {redact!r}")
        refusals = _refusal_options(refusal_burst, refusal_interval_s, refusal_max_groups)
        for b in resolved:
            _check_backend(b)
        #: The first file / SQLite backend (what :attr:`path`, :meth:`query` and the CLI
        #: read), or the only backend.
        self.backend: Backend | tuple[()] = next(
            (b for b in resolved if isinstance(b, (FileBackend, SQLiteBackend))),
            resolved[0] if resolved else (),
        )
        self.backends: tuple[Backend, ...] = tuple(resolved)
        self._log_inputs = log_inputs
        self._log_outputs = log_outputs
        self._preview_chars = output_preview_chars
        self._redact: tuple[str, ...] = tuple(redact or ())
        self.on_failure: OnFailure = on_failure
        #: ``on_failure == "fail_closed"``: the middleware asks :meth:`healthy` first.
        self.fail_closed = on_failure == "fail_closed"
        #: The first file / SQLite backend's sink: :attr:`path` and :attr:`writer`.
        self._writer: AuditSink | None = None
        #: The SQLite backend's sink (what :meth:`query` reads), if there is one.
        self._sqlite: AuditSink | None = None
        #: Per backend kind, what reports its own counters (see :meth:`backend_stats`).
        self._backend_stats_from: dict[str, list[Any]] = {}
        #: What :meth:`flush`, :meth:`close`, :meth:`stats` and :meth:`healthy` visit: the
        #: core writer first, then the HTTP shipper, the OTel emitter and the observers.
        self._targets: list[Any] = []
        self._core = self._open(resolved, refusals)
        for observer in observers:
            self.add_observer(observer)
        # Flush at interpreter exit without keeping the log alive.
        atexit.register(_close_at_exit, weakref.ref(self._core))
        # ``log`` *is* the core's method: no Python frame per event.
        self.log = self._core.log  # type: ignore[method-assign]
        self.log_refusal = self._core.log_refusal  # type: ignore[method-assign]

    def _open(self, backends: list[Backend], refusals: dict[str, int]) -> AuditWriter:
        """Open every backend and the one core writer over them: file, SQLite and the HTTP
        spool are its sinks (one queue and one writer thread whatever their number); the
        OTel backend is an observer of it. Backends opened before a failure are closed."""
        written = [b for b in backends if not isinstance(b, OTelBackend)]
        opened: list[Any] = []  # closed again if a later one fails
        sinks: list[AuditSink] = []
        shippers: list[Any] = []
        try:
            for b in written:
                if isinstance(b, HttpBackend):
                    from fastmcp_guard.audit.http import HttpShipper

                    shipper = HttpShipper(b, on_failure=self.on_failure, shared=True)
                    opened.append(shipper)
                    shippers.append(shipper)
                    sinks.append(shipper.writer)
                    self._backend_stats_from["http"] = [shipper.writer, shipper]
                else:
                    sinks.append(_open_sink(b))
                    self._backend_stats_from[_kind(b)] = [sinks[-1]]
                    if isinstance(b, SQLiteBackend):
                        self._sqlite = sinks[-1]
                    self._writer = self._writer or sinks[-1]
            core = _options_error(lambda: AuditWriter.of_sinks(
                sinks,
                queue_capacity=max((b.queue_capacity for b in written), default=65536),
                flush_interval_ms=min((b.flush_interval_ms for b in written), default=100),
                redact=list(self.redact) or None,
                on_full="block" if self.on_failure == "block" else "drop",
                block_ms=_BLOCK_MS,
                log_inputs=self.log_inputs,
                log_outputs=self.log_outputs,
                output_preview_chars=self.output_preview_chars,
                **refusals,
            ))  # fmt: skip
            opened.insert(0, core)  # closed first: shippers then drain their spool
            for shipper in shippers:
                shipper.start()
            for b in backends:
                if isinstance(b, OTelBackend):
                    from fastmcp_guard.audit.otel import OTelEmitter

                    emitter = OTelEmitter(b, redact=self.redact)
                    opened.append(emitter)
                    self._backend_stats_from["otel"] = [emitter]
                    core.add_observer(emitter.log)  # called by the core after each enqueue
        except BaseException:
            for target in opened:
                target.close()
            raise
        self._targets = opened
        return core

    # Fixed at construction: the core writer applies them.
    @property
    def log_inputs(self) -> bool:
        """Whether tool arguments are recorded."""
        return self._log_inputs

    @property
    def log_outputs(self) -> bool:
        """Whether a preview of tool results is recorded."""
        return self._log_outputs

    @property
    def output_preview_chars(self) -> int:
        """Length of ``output_preview``."""
        return self._preview_chars

    @property
    def redact(self) -> tuple[str, ...]:
        """The ``redact=`` patterns."""
        return self._redact

    def add_observer(self, observer: Any) -> None:
        """Also call ``observer.log(*fields)`` with every event, as recorded (see
        ``observers=``); :meth:`flush`, :meth:`close`, :meth:`stats` and :meth:`healthy`
        include it."""
        self._targets.append(observer)
        self._core.add_observer(observer.log)  # called by the core after each enqueue

    @property
    def writer(self) -> AuditSink:
        """The (first) file / SQLite backend's :class:`AuditSink`: its own counters (the queue
        is the log's one writer's)."""
        if self._writer is None:
            raise ConfigError(f"this audit log writes no file ({self.backends!r})")
        return self._writer

    @property
    def path(self) -> str:
        """The JSONL file or the SQLite database (``""`` without a file backend)."""
        return "" if self._writer is None else self._writer.path

    def log(
        self,
        status: str,
        key_id: str = "",
        key_name: str = "",
        tool: str = "",
        scopes: Sequence[str] = (),
        duration_ms: float = 0.0,
        error: str | None = None,
        input_args: Any = None,
        output_preview: str | None = None,
        client_ip: str | None = None,
        metadata: Any = None,
        extra: dict[str, Any] | None = None,
    ) -> bool:
        """Enqueue one event for every backend (applies ``log_inputs`` / ``log_outputs``
        and the preview length) and give it to the observers; ``False`` if it was
        dropped. Keyword or positional (in this order: the middleware passes them
        positionally, the cheapest call). Each instance's ``log`` is the core writer's
        own method (:class:`~fastmcp_guard._core.AuditWriter`); this one only serves
        calls through the class."""
        return self._core.log(
            status, key_id, key_name, tool, scopes, duration_ms, error,
            input_args, output_preview, client_ip, metadata, extra,
        )  # fmt: skip

    def log_refusal(
        self,
        status: str,
        *,
        client_ip: str | None,
        reason: str,
        key_id: str = "",
        error: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> bool:
        """Record a refusal made before there is an identity (``unauthorized``,
        ``ip_denied``, a throttled attempt), so that a flood of them costs counts, not
        disk.

        Refusals are grouped per (``status``, ``reason``, ``key_id``, client address; an
        IPv6 address counts as its /64) and interval (``refusal_interval_s``). The first
        ``refusal_burst`` of a group in an interval are written as usual events, with
        ``reason`` as an extra field; the rest are counted, and when the interval ends
        (also on :meth:`flush` and :meth:`close`) each group that had some is written as
        one summary event: the group's ``status``, ``key_id`` and ``client_ip`` (the /64
        for IPv6), the first counted refusal's ``error``, and the extra fields
        ``reason``, ``summary: true``, ``count`` (the refusals it stands for) and
        ``since`` (when the interval started). Past ``refusal_max_groups`` groups in an
        interval, new addresses join one overflow group per (status, reason), written
        with no address and ``overflow: true``. Written events plus the ``count`` of the
        summaries equal the refusals logged. Targets that count (the guard's metrics)
        see every refusal. ``key_id`` is the key id the token claimed (a real key's).

        ``False`` only if the refusal was lost (queue full, log closed). Each instance's
        ``log_refusal`` is the core writer's own method.
        """
        return self._core.log_refusal(
            status, client_ip=client_ip, reason=reason, key_id=key_id, error=error, extra=extra
        )

    async def write(self, record: Any) -> None:
        """fastmcp-guard 0.2 API: write a record object or dict with the event fields."""
        data = record if isinstance(record, dict) else dict(vars(record))
        data.pop("ts", None)
        status = data.pop("status", "ok")
        known = {
            k: data.pop(k)
            for k in list(data)
            if k in ("key_id", "key_name", "tool", "scopes", "duration_ms", "error",
                     "input_args", "output_preview", "client_ip", "metadata")
        }  # fmt: skip
        self.log(status, extra=data or None, **known)

    async def query(
        self,
        key_id: str | None = None,
        key_name: str | None = None,
        tool: str | None = None,
        since: datetime | float | None = None,
        limit: int = 100,
        *,
        status: str | None = None,
        until: datetime | float | None = None,
    ) -> list[dict[str, Any]]:
        """Search the SQLite audit log: records (dicts with the audit fields, as in the
        JSONL log) matching every given filter, newest first, at most ``limit``.

        The positional order is 0.2's (``key_id, key_name, tool, since, limit``);
        ``status`` and ``until`` are keyword-only.

        ``since`` is inclusive and ``until`` exclusive, compared at millisecond precision;
        each is a ``datetime`` (a naive one is taken as UTC, as 0.2 did) or Unix seconds.
        Everything logged before the call is included (the log is flushed first). Runs in
        a worker thread, never on the event loop. ``status`` must be a known status name.

        With several backends, the :class:`SQLiteBackend` among them is searched. Raises
        :class:`~fastmcp_guard.errors.ConfigError` for a log without one (querying needs
        the SQLite backend), and
        :class:`~fastmcp_guard.errors.AuditWriteError` if the database cannot be read or
        a batch failed to be written since the last flush (as :meth:`flush` does).
        """
        if self._sqlite is None:
            raise ConfigError(
                "querying the audit log needs the sqlite backend; this log has "
                f"[{', '.join(_kind(b) for b in self.backends)}] (add SQLiteBackend(path) to "
                "its backends, or use AuditLog(backend='sqlite', path=...))"
            )
        args = {
            "key_id": key_id,
            "key_name": key_name,
            "tool": tool,
            "status": status,
            "since": _unix_seconds(since, "since"),
            "until": _unix_seconds(until, "until"),
            "limit": limit,
        }
        return await anyio.to_thread.run_sync(self._query_now, args)

    def _query_now(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        assert self._sqlite is not None  # checked by query()
        self._sqlite.flush()
        # A bad status name or limit: InvalidArgumentError from the core.
        return audit_query(self._sqlite.path, **args)

    def flush(self) -> None:
        """Block until everything enqueued so far is written (by every backend)."""
        for target in self._targets:
            target.flush()

    def close(self) -> None:
        """Flush, sync and stop every backend. Idempotent."""
        errors = []
        for target in self._targets:
            try:
                target.close()
            except Exception as exc:  # noqa: BLE001 - close them all, then report
                errors.append(exc)
        if errors:
            raise errors[0]

    def stats(self) -> dict[str, int]:
        """Counters of the file / SQLite writer: ``enqueued``, ``written``, ``dropped``,
        ``write_errors``, ``failed``, ``queue_depth`` (summed over backends that count)."""
        total: dict[str, int] = {}
        for target in self._targets:
            for k, v in target.stats().items():
                total[k] = total.get(k, 0) + v
        return total

    def backend_stats(self) -> dict[str, dict[str, int]]:
        """Each backend's own counters, by kind (``jsonl``, ``sqlite``, ``http``, ``otel``):
        ``written``, ``failed``, ``write_errors``, ``paused_dropped`` of what the core
        writes; the HTTP shipper's ``shipped``, ``retries``, ``spooled_bytes``...; the
        OTel backend's ``otel_events``."""
        out: dict[str, dict[str, int]] = {}
        for kind, parts in self._backend_stats_from.items():
            merged: dict[str, int] = {}
            for part in parts:
                merged.update(part.stats())
            out[kind] = merged
        return out

    def healthy(self) -> bool:
        """Whether an event logged now would be recorded by every backend: for a file,
        the writer is open, its queue has room, and the last batch was written (false
        from a failed write to the next successful one). A few atomic loads;
        ``fail_closed`` asks it before every call."""
        return all(target.healthy() for target in self._targets)

    def __repr__(self) -> str:
        kinds = ", ".join(_kind(b) for b in self.backends)
        return (
            f"AuditLog(backend=[{kinds}], path={self.path!r}, "
            f"log_inputs={self.log_inputs}, log_outputs={self.log_outputs}, "
            f"on_failure={self.on_failure!r})"
        )


def _kind(backend: Backend) -> str:
    return {
        "FileBackend": "jsonl",
        "SQLiteBackend": "sqlite",
        "HttpBackend": "http",
        "OTelBackend": "otel",
    }.get(type(backend).__name__, type(backend).__name__)


def _resolve_backend(
    backend: Any, path: str | os.PathLike[str] | None, url: str | None = None
) -> Backend:
    """A backend object from an object or a name (``"file"``, ``"sqlite"``, ``"http"``,
    ``"otel"``)."""
    if backend is None or backend == "file":
        return FileBackend(path or _DEFAULT_PATH)
    if backend == "sqlite":
        return SQLiteBackend(path or _DEFAULT_DB_PATH)
    if backend == "otel":
        return OTelBackend()
    if backend == "http":
        if not url:
            raise ConfigError(
                "AuditLog(backend='http') needs url='https://...' (the endpoint receiving "
                "the events); or pass HttpBackend(url, ...)"
            )
        if path is None:
            return HttpBackend(url)
        return HttpBackend(url, spool_dir=path)
    if isinstance(backend, str):
        raise ConfigError(
            f"unknown audit backend {backend!r}; expected a FileBackend, an SQLiteBackend, "
            "an HttpBackend, an OTelBackend or one of 'file', 'sqlite', 'http', 'otel'"
        )
    if not isinstance(backend, (FileBackend, SQLiteBackend, HttpBackend, OTelBackend)):
        raise ConfigError(
            "audit backend must be a FileBackend, an SQLiteBackend, an HttpBackend, an "
            f"OTelBackend or a name, got {backend!r}"
        )
    return backend


def _refusal_options(burst: Any, interval_s: Any, max_groups: Any) -> dict[str, int]:
    """The core writers' ``refusal_*`` options, checked."""
    if not _is_int(burst) or not 0 <= burst <= 1_000_000:
        raise ConfigError(f"refusal_burst must be a whole number from 0 to 1000000, got {burst!r}")
    if not _is_number(interval_s) or not 0.001 <= interval_s <= 3600:
        raise ConfigError(
            f"refusal_interval_s must be a number of seconds from 0.001 to 3600, got {interval_s!r}"
        )
    if not _is_int(max_groups) or not 1 <= max_groups <= 1_000_000:
        raise ConfigError(
            f"refusal_max_groups must be a whole number from 1 to 1000000, got {max_groups!r}"
        )
    return {"refusal_burst": burst, "refusal_interval_ms": max(1, round(interval_s * 1000)),
            "refusal_max_groups": max_groups}  # fmt: skip


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: Bounds of the numeric options of the file and SQLite backends: name -> (low, high).
#: Bounds of the whole-number options of the written backends: name -> (low, high).
#: (``SQLiteBackend.retention_days`` is checked by the core: > 0 and at most 365,000.)
_BACKEND_BOUNDS: dict[str, tuple[int, int]] = {
    "queue_capacity": (1, 2**26),
    "flush_interval_ms": (1, 60_000),
    "rotate_bytes": (1, 2**40),
    "retention": (0, 100_000),
}


def _check_backend(backend: Backend) -> None:
    """Refuse a numeric backend option out of its bounds, naming it (the core would
    refuse some with a bare overflow, and accept absurd others: a queue of 2**40 slots
    is allocated up front)."""
    if isinstance(backend, OTelBackend):
        return
    kind = type(backend).__name__
    for name, (low, high) in _BACKEND_BOUNDS.items():
        value = getattr(backend, name, None)
        if value is None and name in ("rotate_bytes", "retention"):
            continue
        if not hasattr(backend, name):
            continue
        if not _is_int(value) or not low <= value <= high:
            raise ConfigError(
                f"{kind}({name}=...) must be a whole number from {low} to {high:,}, "
                f"got {value!r}"
            )


def _options_error(make: Any) -> Any:
    """``make()``, with the core's option errors (``ValueError``...) as ``ConfigError``."""
    try:
        return make()
    except (ValueError, TypeError, OverflowError) as exc:
        if isinstance(exc, GuardError) and not isinstance(
            exc, (InvalidArgumentError, ArgumentTypeError)
        ):
            raise
        raise ConfigError(f"audit log options: {exc}") from None


def _open_sink(backend: FileBackend | SQLiteBackend) -> AuditSink:
    """A file or SQLite backend's sink (opened now: a bad path fails here)."""
    if isinstance(backend, SQLiteBackend):
        return _options_error(lambda: AuditSink.sqlite(
            os.fspath(backend.path), retention_days=backend.retention_days))  # fmt: skip
    return _options_error(lambda: AuditSink.jsonl(
        os.fspath(backend.path), rotate_bytes=backend.rotate_bytes,
        rotate_daily=backend.rotate_daily, retention=backend.retention, chain=backend.chain,
        chain_key=backend.chain_key))  # fmt: skip


def _unix_seconds(when: datetime | float | None, what: str) -> float | None:
    """``when`` as Unix seconds; a naive ``datetime`` is UTC."""
    if when is None:
        return None
    if isinstance(when, datetime):
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return when.timestamp()
    if isinstance(when, (int, float)) and not isinstance(when, bool):
        return float(when)
    raise ConfigError(f"{what} must be a datetime or Unix seconds, got {when!r}")


def _close_at_exit(ref: weakref.ReferenceType[Any]) -> None:
    writer = ref()
    if writer is not None:
        try:
            writer.close()
        except Exception as exc:  # noqa: BLE001 - at exit, say it: nobody can catch it
            where = getattr(writer, "path", None) or ", ".join(s.path for s in writer.sinks)
            sys.stderr.write(f"fastmcp-guard: audit log {where} not closed cleanly: {exc}\n")
