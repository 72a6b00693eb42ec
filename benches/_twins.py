"""Pure-Python twins: the same jobs done the way fastmcp-guard 0.2 did them.

Each class copies the logic of the 0.2 module named in its docstring (only what
the measured call runs), so the benchmark compares like with like.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TextIO

__all__ = [
    "AuditRecord",
    "IPPolicy02",
    "RateLimit02",
    "append_record",
    "token_02",
]


def token_02() -> str:
    """A 0.2-format token (``fmg_sk_<selector>.<secret>``, 67 bytes: within bcrypt's 72)."""
    return f"fmg_sk_{secrets.token_hex(8)}.{secrets.token_urlsafe(32)}"


# -- rate: 0.2 fastmcp_guard/rate/limiter.py (sliding window under asyncio.Lock) ------


@dataclass
class _Window:
    timestamps: deque[float] = field(default_factory=deque)


class RateLimit02:
    """0.2's ``RateLimit.check``: per-key + global sliding windows of timestamps.

    Exact only within one event loop (the ``asyncio.Lock`` does not serialise
    threads or processes).
    """

    def __init__(
        self, per_key: tuple[int, int] | None, global_limit: tuple[int, int] | None
    ) -> None:
        self._per_key_count, self._per_key_window = per_key or (None, None)
        self._global_count, self._global_window = global_limit or (None, None)
        self._key_windows: dict[str, _Window] = defaultdict(_Window)
        self._global_window_state = _Window()
        self._lock = asyncio.Lock()

    def _slide(self, window: _Window, window_seconds: int, now: float) -> int:
        cutoff = now - window_seconds
        while window.timestamps and window.timestamps[0] < cutoff:
            window.timestamps.popleft()
        return len(window.timestamps)

    async def check(self, key_id: str) -> bool:
        async with self._lock:
            now = time.monotonic()
            if self._per_key_count is not None and self._per_key_window is not None:
                w = self._key_windows[key_id]
                count = self._slide(w, self._per_key_window, now)
                if count >= self._per_key_count:
                    return False
            if self._global_count is not None and self._global_window is not None:
                gcount = self._slide(self._global_window_state, self._global_window, now)
                if gcount >= self._global_count:
                    return False
            if self._per_key_count is not None and self._per_key_window is not None:
                self._key_windows[key_id].timestamps.append(now)
            if self._global_count is not None and self._global_window is not None:
                self._global_window_state.timestamps.append(now)
            return True


# -- IP: 0.2 fastmcp_guard/ip/policy.py (ipaddress, linear scan) --------------------


class IPPolicy02:
    """0.2's ``IPPolicy.is_allowed``."""

    def __init__(self, allow: Sequence[str] = (), deny: Sequence[str] = ()) -> None:
        self._allow = [ipaddress.ip_network(ip, strict=False) for ip in allow]
        self._deny = [ipaddress.ip_network(ip, strict=False) for ip in deny]

    def is_allowed(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        for net in self._deny:
            if addr in net:
                return False
        if not self._allow:
            return True
        return any(addr in net for net in self._allow)


# -- audit: 0.2 fastmcp_guard/audit/log.py + backends/file.py -------------------------


@dataclass
class AuditRecord:
    """0.2's ``AuditRecord`` (``ts`` is taken at construction, as in 0.2)."""

    ts: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    key_id: str = ""
    key_name: str = ""
    tool: str = ""
    scopes: list[str] = field(default_factory=list)
    duration_ms: float = 0.0
    status: str = "ok"
    error: str | None = None
    input_args: dict[str, Any] | None = None
    output_preview: str | None = None
    client_ip: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ts": self.ts,
            "key_id": self.key_id,
            "key_name": self.key_name,
            "tool": self.tool,
            "scopes": self.scopes,
            "duration_ms": round(self.duration_ms, 2),
            "status": self.status,
            "error": self.error,
            "input_args": self.input_args,
            "output_preview": self.output_preview,
            "client_ip": self.client_ip,
            "metadata": self.metadata,
        }


def append_record(f: TextIO, record: AuditRecord) -> None:
    """The synchronous core of 0.2's ``FileBackend.write``: ``json.dumps`` + append.

    (0.2 also reopened the file and hopped to a thread per record; both are left
    out, which flatters the baseline.)
    """
    f.write(json.dumps(record.to_dict()) + "\n")


# -- a subprocess entry point: the 0.2 limiter hammered from threads ------------------


def hammer_02(threads: int, checks: int, limit: int) -> dict[str, Any]:
    """``threads`` threads, each with its own event loop, ``checks`` checks each on one key.

    Runs with ``sys.setswitchinterval(1e-6)`` to make thread switches inside the
    critical section likely. Run it in a subprocess: a contended ``asyncio.Lock``
    shared between loops can lose its wake-up and hang the waiting thread.
    """
    import sys
    import threading

    rl = RateLimit02((limit, 3600), None)
    admitted = [0] * threads
    errors: list[str] = []
    barrier = threading.Barrier(threads)

    def worker(i: int) -> None:
        loop = asyncio.new_event_loop()
        barrier.wait()
        c = 0
        try:
            for _ in range(checks):
                if loop.run_until_complete(rl.check("k")):
                    c += 1
        except Exception as exc:  # noqa: BLE001 - reported
            errors.append(f"{type(exc).__name__}: {exc}")
        admitted[i] = c

    sys.setswitchinterval(1e-6)
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return {"admitted": sum(admitted), "errors": errors}


if __name__ == "__main__":
    import sys

    t, n, lim = (int(a) for a in sys.argv[1:4])
    print(json.dumps(hammer_02(t, n, lim)), flush=True)
