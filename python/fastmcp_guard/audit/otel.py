"""The OpenTelemetry audit backend (extra ``[otel]``): decisions on the host's traces.

Written against the OpenTelemetry *API* only, so it joins whatever tracer provider the
host application configured (and does nothing, cheaply, when none is). For each
decision it:

- sets guard attributes on the span that is current when the guard decides, which is
  FastMCP 4's own span for the request (its per-request SERVER span): ``fastmcp_guard.key_id``,
  ``fastmcp_guard.key_name``, ``fastmcp_guard.scopes``, ``fastmcp_guard.decision``,
  and ``fastmcp_guard.retry_after`` for a rate-limited call;
- adds one span event ``fastmcp_guard.decision`` with the decision and the call's other
  audit fields (tool, duration, error, client address; inputs and outputs only when the
  audit log records them, redacted, as JSON text rendered by the core); the identity is
  on the span, not repeated in the event;
- for a decision made outside any recording span (an HTTP 401 answered before FastMCP
  opens one, a key lifecycle event), records a short span of its own,
  ``fastmcp_guard <status>``, so the event is not lost.

Tokens never reach it: the audit fields carry key ids and names only, and as a last
line of defence every string it sets goes through the core's token mask, as audit lines
do (``fmg_sk_<id>_***``; :func:`fastmcp_guard._core.mask_tokens`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastmcp_guard.errors import MissingExtraError

__all__ = ["ATTRIBUTE_PREFIX", "EVENT_NAME", "OTelBackend", "OTelEmitter"]

ATTRIBUTE_PREFIX = "fastmcp_guard."
EVENT_NAME = "fastmcp_guard.decision"


@dataclass(frozen=True)
class OTelBackend:
    """Send audit decisions to OpenTelemetry (the host's tracer provider).

    Args:
        tracer_name: instrumentation scope of the spans this backend starts itself.
        max_attribute_chars: longest string attribute (inputs, previews) before cutting.
    """

    tracer_name: str = "fastmcp_guard"
    max_attribute_chars: int = 1024


class OTelEmitter:
    """Turns audit events into span attributes and events (see the module docs)."""

    def __init__(self, backend: OTelBackend, redact: Sequence[str] = ()) -> None:
        try:
            from opentelemetry import trace
        except ImportError:
            raise MissingExtraError(
                "the otel audit backend needs the OpenTelemetry API: "
                "pip install 'fastmcp-guard[otel]'"
            ) from None
        self._trace = trace
        # Whether a tracer provider is set, read per call. `get_tracer_provider()` is the
        # public way but costs ~0.7 us (an os.environ lookup each time); the API keeps the
        # provider in this module global (None until set). If a future API renames it,
        # fall back to asking a span of our own (~0.4 us).
        self._provider_known = hasattr(trace, "_TRACER_PROVIDER")
        self.backend = backend
        self._tracer = trace.get_tracer(backend.tracer_name)
        from fastmcp_guard._core import JsonText

        self._json = JsonText(list(redact) or None)  # masks tokens, as audit lines do
        self._emitted = 0

    # -- the audit target interface (AuditLog fans out to it) ---------------------------

    def log(
        self, status: str, key_id: str, key_name: str, tool: str, scopes: Sequence[str],
        duration_ms: float, error: str | None = None, input_args: Any = None,
        output_preview: str | None = None, client_ip: str | None = None,
        metadata: Any = None, extra: dict[str, Any] | None = None,
    ) -> bool:  # fmt: skip
        """Record one decision on the current span (or a span of its own), in the
        positional order of ``AuditWriter.log``."""
        if self._provider_known and self._trace._TRACER_PROVIDER is None:
            return True  # no tracer provider in this host: no span records anything
        span = self._trace.get_current_span()
        own = None
        if not span.is_recording():
            if span.get_span_context().is_valid:
                return True  # inside a trace that is not sampled: neither is our span
            own = self._tracer.start_span(f"fastmcp_guard {status}")
            if not own.is_recording():
                return True  # not sampled: nothing to build
            span = own
        p = ATTRIBUTE_PREFIX
        span.set_attributes({f"{p}decision": status, f"{p}key_id": _masked(key_id),
                             f"{p}key_name": _masked(key_name),
                             f"{p}scopes": [_masked(s) for s in scopes]})  # fmt: skip
        event: dict[str, Any] = {
            f"{p}decision": status,
            f"{p}tool": _masked(tool),
            f"{p}duration_ms": float(duration_ms),
        }
        if error:
            event[f"{p}error"] = self._cut(_masked(error))
        if client_ip:
            event[f"{p}client_ip"] = _masked(client_ip)
        if input_args is not None:
            event[f"{p}input_args"] = self._cut(self._json(input_args))
        if output_preview is not None:
            event[f"{p}output_preview"] = self._cut(_masked(output_preview))
        if metadata:
            event[f"{p}metadata"] = self._cut(self._json(metadata))
        for k, v in (extra or {}).items():
            if isinstance(v, (str, bool, int, float)):
                event.setdefault(_masked(p + k), _masked(v) if isinstance(v, str) else v)
        if f"{p}retry_after" in event:
            span.set_attribute(f"{p}retry_after", event[f"{p}retry_after"])
        # The span's status is left to FastMCP: a refusal is the client's fault, and
        # OpenTelemetry's conventions keep SERVER spans unset for those.
        span.add_event(EVENT_NAME, event)
        if own is not None:
            own.end()
        self._emitted += 1
        return True

    def flush(self) -> None:
        """Nothing is buffered here (the host's span processor exports)."""

    def close(self) -> None:
        """Nothing to close (the host owns the tracer provider)."""

    def stats(self) -> dict[str, int]:
        return {"otel_events": self._emitted}

    def healthy(self) -> bool:
        return True

    def _cut(self, text: str) -> str:
        # Cut after masking: a cut through a token would leave part of its secret.
        limit = self.backend.max_attribute_chars
        return text if len(text) <= limit else text[:limit] + "..."


def _masked(text: str) -> str:
    """``text`` with tokens masked (one substring test when there are none)."""
    if "fmg_sk_" not in text:
        return text
    from fastmcp_guard._core import mask_tokens

    return mask_tokens(text)
