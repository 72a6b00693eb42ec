"""Audit log: one JSON line per decision, written off the request path.

Every call the guard sees ends in exactly one event whose ``status`` is one of
``ok``, ``error``, ``rate_limited``, ``unauthorized``, ``forbidden`` or ``ip_denied``.
Key lifecycle actions add ``created``, ``rotated`` and ``revoked`` events. Fields:
``ts`` (RFC 3339, UTC), ``key_id``, ``key_name``, ``tool``, ``scopes``,
``duration_ms``, ``status``, ``error``, ``input_args``, ``output_preview``,
``client_ip``, ``metadata``. Tokens never appear.

The request path only enqueues (about a microsecond); a Rust thread batches the
events into the file and flushes at most ``flush_interval_ms`` later, on
:meth:`AuditLog.close`, and at interpreter exit. When the queue is full, events
are dropped and counted (``stats()["dropped"]``), never blocking a call.
"""

from __future__ import annotations

import atexit
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastmcp_guard._core import AuditWriter
from fastmcp_guard.errors import ConfigError

__all__ = ["AuditLog", "FileBackend"]

_DEFAULT_PATH = "fastmcp-guard-audit.jsonl"


@dataclass(frozen=True)
class FileBackend:
    """Append JSON lines to ``path`` (created with mode 0600; its directory must exist)."""

    path: str | os.PathLike[str] = _DEFAULT_PATH
    queue_capacity: int = 65536
    flush_interval_ms: int = 100


class AuditLog:
    """Where and what to record.

    Args:
        backend: a :class:`FileBackend`, or ``"file"`` with ``path=``.
        path: the JSONL file for ``backend="file"``.
        log_inputs: record tool arguments (turn off when they may hold PII).
        log_outputs: record the first ``output_preview_chars`` characters of results.
        output_preview_chars: length of ``output_preview``.

    The file is opened here, so a missing directory or an unwritable path fails at
    construction with :class:`~fastmcp_guard.errors.AuditWriteError` naming the path.
    """

    def __init__(
        self,
        backend: FileBackend | str | None = None,
        path: str | os.PathLike[str] | None = None,
        url: str | None = None,
        log_inputs: bool = True,
        log_outputs: bool = True,
        *,
        output_preview_chars: int = 200,
    ) -> None:
        if backend is None or backend == "file":
            backend = FileBackend(path or _DEFAULT_PATH)
        elif isinstance(backend, str):
            if backend in ("sqlite", "http", "otel"):
                raise ConfigError(
                    f"audit backend {backend!r} is not available in this release; "
                    "use FileBackend(path) / backend='file'"
                )
            raise ConfigError(
                f"unknown audit backend {backend!r}; expected a FileBackend or one of "
                "'file', 'sqlite', 'http', 'otel'"
            )
        if not isinstance(backend, FileBackend):
            raise ConfigError(f"audit backend must be a FileBackend or a name, got {backend!r}")
        if output_preview_chars < 0:
            raise ConfigError("output_preview_chars must be >= 0")
        self.backend = backend
        self.log_inputs = log_inputs
        self.log_outputs = log_outputs
        self.output_preview_chars = output_preview_chars
        self._writer = AuditWriter(
            os.fspath(backend.path),
            queue_capacity=backend.queue_capacity,
            flush_interval_ms=backend.flush_interval_ms,
        )
        # Flush at interpreter exit without keeping the log alive.
        atexit.register(_close_quietly, weakref.ref(self._writer))

    @property
    def writer(self) -> AuditWriter:
        """The Rust writer."""
        return self._writer

    @property
    def path(self) -> str:
        """The JSONL file."""
        return self._writer.path

    def log(
        self,
        status: str,
        *,
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
        """Enqueue one event (applies ``log_inputs`` / ``log_outputs``); ``False`` if dropped."""
        if not self.log_inputs:
            input_args = None
        if not self.log_outputs:
            output_preview = None
        elif output_preview is not None:
            output_preview = output_preview[: self.output_preview_chars]
        return self._writer.log(
            status, key_id, key_name, tool, scopes, duration_ms, error,
            input_args, output_preview, client_ip, metadata, extra,
        )  # fmt: skip

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

    def flush(self) -> None:
        """Block until everything enqueued so far is in the file."""
        self._writer.flush()

    def close(self) -> None:
        """Flush, sync and stop the writer thread. Idempotent."""
        self._writer.close()

    def stats(self) -> dict[str, int]:
        """Counters: ``enqueued``, ``written``, ``dropped``, ``write_errors``, ``queue_depth``."""
        return self._writer.stats()

    def __repr__(self) -> str:
        return f"AuditLog(path={self.path!r}, log_inputs={self.log_inputs}, log_outputs={self.log_outputs})"


def _close_quietly(ref: weakref.ReferenceType[AuditWriter]) -> None:
    writer = ref()
    if writer is not None:
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - best effort at exit; errors are counted in stats
            pass
