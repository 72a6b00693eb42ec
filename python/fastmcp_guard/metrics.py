"""Prometheus metrics of the guard (opt-in: ``Guard(mcp, metrics=True)``).

Served in the Prometheus text format at ``GET /metrics`` on the guarded HTTP server, or
read with :meth:`GuardMetrics.render`. No client library is needed.

**Who may read them.** The route sits behind the guard's IP policy, and then needs
either a guard key with the ``guard:metrics`` (or ``guard:admin``) scope, sent as
``Authorization: Bearer`` (Prometheus: ``authorization: {credentials: ...}`` in the
scrape config), or a client address in ``GuardMetrics(allow=[...])`` (the scraper's
network). Anyone else gets 401 / 403: the figures describe the traffic of every caller.

- ``fastmcp_guard_decisions_total{status,tool}``: every decision, one per audit event:
  ``ok``, ``error``, ``rate_limited``, ``unauthorized`` (auth failures), ``forbidden``,
  ``ip_denied`` (a throttled token counts as ``rate_limited``), the budgets'
  ``would_refuse`` (a shadow rule's would-be refusal), ``loop_detected``,
  ``credits_exhausted`` and ``credits_low``, and the key lifecycle's ``created`` /
  ``rotated`` / ``revoked``;
- ``fastmcp_guard_rate_limited_total{tool}`` and ``fastmcp_guard_auth_failures_total``:
  the refusals operators alert on, broken out;
- ``fastmcp_guard_overhead_seconds``: a histogram of the time the guard adds to a call
  (identity, rate check, audit enqueue; not the tool's own time);
- ``fastmcp_guard_tool_duration_seconds``: a histogram of guarded calls' own duration;
- ``fastmcp_guard_audit_queue_depth``, ``fastmcp_guard_audit_dropped_total``,
  ``fastmcp_guard_audit_written_total``, ``fastmcp_guard_audit_write_errors_total``: the
  audit writer's state, read at scrape time;
- ``fastmcp_guard_key_cache_*``: the verified-token cache's argon2 runs and store reads.

**Labels are bounded by the server, not by callers.** The ``tool`` label is the name of
a registered tool or prompt, a resource's URI, or for a URI read through a resource
template the template itself (``users://{id}/profile``, never ``users://42/profile``);
anything else (an unknown name, a URI no resource serves) is ``other``. Never key ids or
client addresses (unbounded, and personal).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastmcp import FastMCP
    from fastmcp.resources import ResourceTemplate

__all__ = ["CONTENT_TYPE", "METRICS_SCOPES", "OTHER", "ComponentLabels", "GuardMetrics"]

#: Scopes that may read ``/metrics`` (any one of them).
METRICS_SCOPES = frozenset({"guard:metrics", "guard:admin"})

#: The label of anything the server does not serve.
OTHER = "other"

#: Labels of the guard's own audited actions (not components of the server).
_GUARD_LABELS = frozenset({"", "admin:rate.status", "admin:rate.reset"})

#: Reload the server's components at most this often when an unknown target is seen.
_RELOAD_EVERY_S = 1.0

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


class ComponentLabels:
    """The ``tool`` label of a call target, from the components the server registers.

    Names come from the server's tools, prompts and static resources, plus its resource
    templates (a URI read through one is labelled with the template), listed without
    any caller's auth filter. A target that is none of these is :data:`OTHER`, so callers
    cannot create series. The list is read on first use and again when a target is not
    in it, at most once a second (a tool added at run time gets its own label).
    """

    def __init__(self) -> None:
        self._names: frozenset[str] = _GUARD_LABELS
        self._templates: tuple[ResourceTemplate, ...] = ()
        self._loaded_at = float("-inf")
        self._lock = threading.Lock()

    def label(self, target: str) -> str:
        """The label of ``target`` (synchronous: what is known now)."""
        if target in self._names:
            return target
        if "://" in target:
            for template in self._templates:
                if template.matches(target) is not None:
                    return template.uri_template
        return OTHER

    async def learn(self, server: FastMCP[Any], target: str) -> None:
        """Reload the server's components if ``target`` is not known yet (throttled)."""
        if self.label(target) != OTHER or time.monotonic() - self._loaded_at < _RELOAD_EVERY_S:
            return
        self._loaded_at = time.monotonic()
        from fastmcp import FastMCP

        # The unfiltered lists (FastMCP's own overrides filter by the current caller's auth).
        base = super(FastMCP, server)
        names = set(_GUARD_LABELS)
        names.update(t.name for t in await base.list_tools())
        names.update(p.name for p in await base.list_prompts())
        names.update(str(r.uri) for r in await base.list_resources())
        templates = tuple(await base.list_resource_templates())
        with self._lock:
            self._names = frozenset(names)
            self._templates = templates


class GuardMetrics:
    """Counters and histograms of one guard. It is also an audit target (every decision
    passes through it: see :class:`~fastmcp_guard.audit.AuditLog`), so decisions are
    counted exactly where they are audited."""

    def __init__(self, path: str = "/metrics", *, allow: Sequence[str] | None = None) -> None:
        """``path``: where the route is served. ``allow``: addresses / CIDRs (the
        scraper's) that may read it without a key; everyone else needs a guard key with
        a scope in :data:`METRICS_SCOPES`."""
        from fastmcp_guard._core import ArgumentTypeError, IPMatcher

        if isinstance(allow, str):
            raise ArgumentTypeError(
                f"GuardMetrics(allow=...) takes a list of strings, not one string: "
                f"write allow=[{allow!r}]"
            )
        self.path = path
        self.allow = list(allow or [])
        self._allow = IPMatcher(allow=self.allow) if self.allow else None
        #: The ``tool`` label of each call target.
        self.labels = ComponentLabels()
        self._lock = threading.Lock()
        self._decisions: dict[tuple[str, str], int] = {}
        self.overhead = _Histogram(_OVERHEAD_BUCKETS)
        self.duration = _Histogram(_DURATION_BUCKETS)
        #: Callables producing exposition lines at scrape time (writer and key counters).
        self._sources: list[Callable[[], list[str]]] = []

    # -- the audit target interface -----------------------------------------------------

    def log(self, status: str, key_id: str, key_name: str, tool: str, scopes: Any,
            duration_ms: float, *rest: Any) -> bool:  # fmt: skip
        key = (status, self.labels.label(tool))
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

    def admits_address(self, client_ip: str | None) -> bool:
        """True if ``client_ip`` may read the metrics without a key (``allow=``)."""
        return (
            self._allow is not None and client_ip is not None
            and self._allow.check(client_ip) is None
        )  # fmt: skip

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
