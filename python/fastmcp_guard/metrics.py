"""Prometheus metrics of the guard (opt-in: ``Guard(mcp, metrics=True)``).

Served in the Prometheus text format at ``GET /metrics`` on the guarded HTTP server
(behind the guard's IP policy, so ``allow=`` can limit it to the scraper's network), or
read with :meth:`GuardMetrics.render`. No client library is needed.

- ``fastmcp_guard_decisions_total{status,tool}``: every decision, one per audit event:
  ``ok``, ``error``, ``rate_limited``, ``unauthorized`` (auth failures), ``forbidden``,
  ``ip_denied``, and the key lifecycle's ``created`` / ``rotated`` / ``revoked``;
- ``fastmcp_guard_rate_limited_total{tool}`` and ``fastmcp_guard_auth_failures_total``:
  the refusals operators alert on, broken out;
- ``fastmcp_guard_overhead_seconds``: a histogram of the time the guard adds to a call
  (identity, rate check, audit enqueue; not the tool's own time);
- ``fastmcp_guard_tool_duration_seconds``: a histogram of guarded calls' own duration;
- ``fastmcp_guard_audit_queue_depth``, ``fastmcp_guard_audit_dropped_total``,
  ``fastmcp_guard_audit_written_total``, ``fastmcp_guard_audit_write_errors_total``: the
  audit writer's state, read at scrape time;
- ``fastmcp_guard_key_cache_*``: the verified-token cache's argon2 runs and store reads.

Label values are tool names and statuses (bounded by the server's tools); never key ids
or client addresses (unbounded, and personal).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["CONTENT_TYPE", "GuardMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Histogram buckets in seconds: the guard's overhead is microseconds, tools milliseconds.
_OVERHEAD_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.01)
_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, running = [], 0
        sep = "," if labels else ""
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {running}')
        out.append(
            f"{name}_sum{{{labels}}} {self.total!r}" if labels else f"{name}_sum {self.total!r}"
        )
        out.append(f"{name}_count{{{labels}}} {running}" if labels else f"{name}_count {running}")
        return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class GuardMetrics:
    """Counters and histograms of one guard. It is also an audit target (every decision
    passes through it: see :class:`~fastmcp_guard.audit.AuditLog`), so decisions are
    counted exactly where they are audited."""

    def __init__(self, path: str = "/metrics") -> None:
        self.path = path
        self._lock = threading.Lock()
        self._decisions: dict[tuple[str, str], int] = {}
        self.overhead = _Histogram(_OVERHEAD_BUCKETS)
        self.duration = _Histogram(_DURATION_BUCKETS)
        #: Callables producing exposition lines at scrape time (writer and key counters).
        self._sources: list[Callable[[], list[str]]] = []

    # -- the audit target interface -----------------------------------------------------

    def log(self, status: str, key_id: str, key_name: str, tool: str, scopes: Any,
            duration_ms: float, *rest: Any) -> bool:  # fmt: skip
        key = (status, tool)
        with self._lock:
            self._decisions[key] = self._decisions.get(key, 0) + 1
            if status in ("ok", "error") and duration_ms:
                self.duration.observe(duration_ms / 1000.0)
        return True

    def flush(self) -> None:
        """Nothing buffered."""

    def close(self) -> None:
        """Nothing to close."""

    def stats(self) -> dict[str, int]:
        return {}

    def healthy(self) -> bool:
        return True

    # -- recording ----------------------------------------------------------------------

    def observe_overhead(self, seconds: float) -> None:
        """Time the guard added to one call."""
        with self._lock:
            self.overhead.observe(seconds)

    def add_source(self, lines: Callable[[], list[str]]) -> None:
        """Register a callable producing exposition lines at scrape time."""
        self._sources.append(lines)

    # -- exposition ---------------------------------------------------------------------

    def render(self) -> str:
        """All metrics in the Prometheus text format (version 0.0.4)."""
        with self._lock:
            decisions = dict(self._decisions)
            overhead = self.overhead.lines("fastmcp_guard_overhead_seconds")
            duration = self.duration.lines("fastmcp_guard_tool_duration_seconds")
        out = [
            "# HELP fastmcp_guard_decisions_total Guard decisions (one per audit event).",
            "# TYPE fastmcp_guard_decisions_total counter",
        ]
        for (status, tool), n in sorted(decisions.items()):
            out.append(f'fastmcp_guard_decisions_total{{status="{_label(status)}",'
                       f'tool="{_label(tool)}"}} {n}')  # fmt: skip
        out += ["# HELP fastmcp_guard_rate_limited_total Calls refused by a rate limit.",
                "# TYPE fastmcp_guard_rate_limited_total counter"]  # fmt: skip
        limited = {t: n for (s, t), n in decisions.items() if s == "rate_limited"}
        for tool, n in sorted(limited.items()):
            out.append(f'fastmcp_guard_rate_limited_total{{tool="{_label(tool)}"}} {n}')
        auth = sum(n for (s, _), n in decisions.items() if s == "unauthorized")
        out += ["# HELP fastmcp_guard_auth_failures_total Requests refused for a missing, "
                + "invalid, revoked or expired key.",
                "# TYPE fastmcp_guard_auth_failures_total counter",
                f"fastmcp_guard_auth_failures_total {auth}",
                "# HELP fastmcp_guard_overhead_seconds Time the guard adds to a call.",
                "# TYPE fastmcp_guard_overhead_seconds histogram", *overhead,
                "# HELP fastmcp_guard_tool_duration_seconds Duration of guarded calls.",
                "# TYPE fastmcp_guard_tool_duration_seconds histogram", *duration]  # fmt: skip
        for source in self._sources:
            out += source()
        return "\n".join(out) + "\n"


def audit_lines(stats: Callable[[], dict[str, int]]) -> Callable[[], list[str]]:
    """Exposition lines for an audit log's writer counters."""

    def lines() -> list[str]:
        s = stats()
        out = []
        for name, key, kind, text in (
            ("audit_queue_depth", "queue_depth", "gauge", "Audit events waiting to be written."),
            (
                "audit_written_total",
                "written",
                "counter",
                "Audit events written (each backend counts).",
            ),
            ("audit_dropped_total", "dropped", "counter", "Audit events dropped (queue full)."),
            ("audit_write_errors_total", "write_errors", "counter", "Failed audit batch writes."),
        ):
            if key in s:
                out += [f"# HELP fastmcp_guard_{name} {text}",
                        f"# TYPE fastmcp_guard_{name} {kind}",
                        f"fastmcp_guard_{name} {s[key]}"]  # fmt: skip
        return out

    return lines


def key_lines(stats: Callable[[], dict[str, int]]) -> Callable[[], list[str]]:
    """Exposition lines for the key manager's counters."""

    def lines() -> list[str]:
        s = stats()
        out = []
        for key, text in (("argon2_runs", "argon2id verifications (cache misses)."),
                          ("store_reads", "Key store reads."),
                          ("throttled", "Verifications refused by the failure throttle.")):  # fmt: skip
            if key in s:
                out += [f"# HELP fastmcp_guard_keys_{key}_total {text}",
                        f"# TYPE fastmcp_guard_keys_{key}_total counter",
                        f"fastmcp_guard_keys_{key}_total {s[key]}"]  # fmt: skip
        return out

    return lines
