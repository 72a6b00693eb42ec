"""Rate limits: per key, global, and per (key, tool) with ``@rate_limit``.

Semantics are a token bucket (GCRA, exact under concurrency): ``"100/minute"``
admits a burst of 100 calls, then refills at 100 per minute. Accepted spellings:
``N/second|sec|s``, ``N/minute|min|m``, ``N/hour|hr|h``, ``N/day|d`` (plurals too),
``N per minute`` and multiples such as ``N/5 minutes``. One parser (in the Rust core)
serves :class:`RateLimit`, :func:`rate_limit` and the CLI.

A call is admitted only if every bucket it touches admits it; a refused call
consumes from none of them.

In-process limits are per process: with several workers they multiply. A shared
(Redis) limiter for multi-worker and multi-node deployments is a fleet backend.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from fastmcp.exceptions import ToolError
from mcp import MCPError

from fastmcp_guard._core import Limiter, Refusal, parse_rate
from fastmcp_guard.errors import ConfigError

__all__ = [
    "RATE_LIMIT_ATTR",
    "RateLimit",
    "RateLimitExceeded",
    "parse_rate",
    "rate_limit",
]

#: Attribute ``@rate_limit`` sets on the tool function (same name as fastmcp-guard 0.2).
RATE_LIMIT_ATTR = "__fastmcp_guard_rate_limit__"

F = TypeVar("F", bound=Callable[..., Any])


class RateLimitExceeded(ToolError):
    """A call was refused by a rate limit.

    Raised as a tool error so that the client (and the model) reads the message;
    the numbers are also on the exception and in the result's structured content.
    """

    def __init__(self, refusal: Refusal, tool: str | None = None) -> None:
        self.scope = refusal.scope
        self.limit = refusal.limit
        self.retry_after = refusal.retry_after
        self.reset_after = refusal.reset_after
        what = {"per_key": "per-key", "global": "global", "tool": f"tool {tool!r}"}.get(
            refusal.scope, refusal.scope
        )
        super().__init__(
            f"Rate limit exceeded ({what} limit {refusal.limit}); "
            f"retry after {refusal.retry_after:.2f} s"
        )

    def as_mcp_error(self) -> MCPError:
        """The same refusal as a protocol-level MCP error (``error.data`` holds the numbers)."""
        return MCPError(-32000, str(self), self.data)

    @property
    def data(self) -> dict[str, Any]:
        """Machine-readable refusal: ``retry_after``, ``limit``, ``remaining``, ``reset``."""
        return {
            "error": "rate_limited",
            "scope": self.scope,
            "limit": self.limit,
            "remaining": 0,
            "retry_after": round(self.retry_after, 3),
            "reset": round(self.reset_after, 3),
        }


class RateLimit:
    """Per-key and global limits for a :class:`~fastmcp_guard.Guard`.

    Args:
        per_key: limit for each identity (guard key, another verifier's client id,
            or, without one, the client address), e.g. ``"100/minute"``.
        global_limit: limit across all callers together.
        backend: ``"memory"`` (in-process). ``"redis"`` is a fleet backend not
            available in this release.
        refusal: how a refused tool call is answered. ``"tool"`` (default, as
            fastmcp-guard 0.2): a tool error result (``isError``) whose text names
            the limit and the wait and whose structured content carries
            ``retry_after``, ``limit``, ``remaining`` and ``reset``. ``"protocol"``:
            a JSON-RPC error (code -32000) with the same message and ``data``.
            Resource reads and prompts are always refused with the protocol error.

    Bad rate strings raise :class:`~fastmcp_guard.errors.InvalidRateError` (a
    ``ValueError``) here, at construction.
    """

    def __init__(
        self,
        per_key: str | None = None,
        global_limit: str | None = None,
        backend: Literal["memory", "redis"] | str = "memory",
        *,
        refusal: Literal["tool", "protocol"] = "tool",
    ) -> None:
        if refusal not in ("tool", "protocol"):
            raise ConfigError(f"refusal must be 'tool' or 'protocol', got {refusal!r}")
        if backend == "redis":
            raise ConfigError(
                "RateLimit(backend='redis') is not available in this release; "
                "use backend='memory' (limits are then per process)"
            )
        if backend != "memory":
            raise ConfigError(
                f"unknown rate limit backend {backend!r}; expected 'memory' or 'redis'"
            )
        self.per_key = per_key
        self.global_limit = global_limit
        self.backend = backend
        self.refusal = refusal
        self._core = Limiter(per_key=per_key, global_limit=global_limit)

    @property
    def core(self) -> Limiter:
        """The Rust limiter."""
        return self._core

    def hit(self, key_id: str, tool: str | None = None) -> Refusal | None:
        """Admit one call (``None``) or say why not; synchronous, sub-microsecond."""
        return self._core.check(key_id, tool)

    async def check(self, key_id: str, tool: str | None = None) -> bool:
        """fastmcp-guard 0.2 API: consume one call; ``True`` if admitted."""
        return self._core.check(key_id, tool) is None

    def status(self, key_id: str) -> dict[str, Any]:
        """``{"per_key": {"limit","used","remaining","window_seconds",...}, "global": {...}}``."""
        return self._core.status(key_id)

    def reset(self, key_id: str) -> None:
        """Forget a key's per-key and per-tool usage (not the global bucket)."""
        self._core.reset(key_id)

    def __repr__(self) -> str:
        return f"RateLimit(per_key={self.per_key!r}, global_limit={self.global_limit!r})"


def rate_limit(limit: str) -> Callable[[F], F]:
    """Limit one tool per caller, on top of the Guard-level limits.

    Works on sync and async tools and on either side of ``@mcp.tool``. The rate
    string is checked at once, so a bad one fails at import time.

    ```python
    @mcp.tool
    @rate_limit("10/minute")
    def run_expensive_analysis(data: str) -> str: ...
    ```
    """
    canonical = str(parse_rate(limit))

    def decorator(fn: F) -> F:
        # Below @mcp.tool we get the function; above it, FastMCP's Tool (its .fn).
        target = fn if inspect.isroutine(fn) else getattr(fn, "fn", fn)
        setattr(target, RATE_LIMIT_ATTR, canonical)
        return fn

    return decorator


def tool_rate_of(tool: Any) -> str | None:
    """The ``@rate_limit`` string attached to a FastMCP tool, if any."""
    marker = getattr(getattr(tool, "fn", None), RATE_LIMIT_ATTR, None)
    return marker if isinstance(marker, str) else None
