"""Rate limits: per key, global, and per (key, tool) with ``@rate_limit``.

Semantics are a token bucket (GCRA, exact under concurrency): ``"100/minute"``
admits a burst of 100 calls, then refills at 100 per minute. Accepted spellings:
``N/second|sec|s``, ``N/minute|min|m``, ``N/hour|hr|h``, ``N/day|d`` (plurals too),
``N per minute`` and multiples such as ``N/5 minutes``. One parser (in the Rust core)
serves :class:`RateLimit`, :func:`rate_limit` and the CLI.

A call is admitted only if every bucket it touches admits it; a refused call
consumes from none of them. A tool can cost more than one unit (``@cost(5)``, or the
``tool_costs`` setting): its calls then take that many units from every bucket.

Every rule can run in *shadow* (``mode="shadow"``): it decides as usual but never
refuses; what it would have refused is audited as ``would_refuse`` naming the rule, and
its bucket moves exactly as an enforcing one would. The *loop breaker* (on by default,
in shadow) watches one caller calling one tool with the same arguments over and over:
``RateLimit(loop_breaker="20/minute", loop_breaker_mode="enforce")`` refuses the 21st
identical call in a minute, with a message telling the agent to change its arguments or
wait.

In-process limits are per process: with several workers they multiply. For
multi-worker and multi-node deployments, ``backend="redis"`` shares the limits
through Redis (:mod:`fastmcp_guard.rate.redis`, the ``[redis]`` extra), with the
same semantics and one round trip per call.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

from fastmcp.exceptions import ToolError
from mcp import MCPError

from fastmcp_guard._core import (
    MAX_COST,
    ArgumentTypeError,
    InvalidArgumentError,
    Limiter,
    Refusal,
    Verdict,
    parse_rate,
)
from fastmcp_guard._core import check_cost as core_check_cost
from fastmcp_guard._util import DEFAULT_LOOP_BREAKER, mask_url
from fastmcp_guard.errors import ConfigError, GuardError

if TYPE_CHECKING:
    from fastmcp_guard.rate.redis import BackendErrorPolicy, RedisLimiter

__all__ = [
    "ADMITTED",
    "DEFAULT_LOOP_BREAKER",
    "MAX_COST",
    "RATE_LIMITED_CODE",
    "RATE_LIMIT_ATTR",
    "Decision",
    "Mode",
    "RateLimit",
    "RateLimitExceeded",
    "RefusalInfo",
    "ToolRule",
    "Verdict",
    "cost",
    "parse_rate",
    "rate_limit",
]

#: Attribute ``@rate_limit`` sets on the tool function (same name as fastmcp-guard 0.2):
#: the tool's rate string.
RATE_LIMIT_ATTR = "__fastmcp_guard_rate_limit__"
#: Attribute ``@rate_limit`` and ``@cost`` set on the tool function: its :class:`ToolRule`.
TOOL_RULE_ATTR = "__fastmcp_guard_tool_rule__"

#: How a rule acts: ``"enforce"`` refuses, ``"shadow"`` only records ``would_refuse``.
Mode = Literal["enforce", "shadow"]
_MODES: Final = ("enforce", "shadow")



class _Inherit:
    """``@rate_limit(loop_breaker=...)`` not given: the RateLimit's own loop breaker."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "INHERIT"


INHERIT: Final = _Inherit()

F = TypeVar("F", bound=Callable[..., Any])


#: What a refusal carries: the core's :class:`~fastmcp_guard._core.Refusal`, whichever
#: limiter (in-process or Redis) refused. The name stays for code that imported it.
RefusalInfo = Refusal


#: JSON-RPC error code of a rate refusal answered as a protocol error (as HTTP's 429). An
#: application code: JSON-RPC reserves -32768..-32000, and the MCP specification of
#: 2026-07-28 calls -32000..-32019 legacy. ``RateLimit(refusal_code=...)`` changes it.
RATE_LIMITED_CODE = 429


def loop_refusal_text(refusal: RefusalInfo, tool: str | None) -> str:
    """The loop breaker's refusal, written for the agent that made the call."""
    window = refusal.window_seconds
    if window == 60:
        span = "a minute"
    elif window == 1:
        span = "a second"
    elif window >= 120 and window % 60 == 0:
        span = f"{window / 60:g} minutes"
    else:
        span = f"{window:g} seconds"
    what = f"tool {tool!r}" if tool else "this tool"
    return (
        f"Loop detected: this exact call ({what} with the same arguments) was already "
        f"made {refusal.count} times within {span}, the most allowed. Repeating it will "
        "not give a different result: change the arguments, or wait "
        f"{refusal.retry_after:.2f} s before trying the same call again "
        f"(retry_after={refusal.retry_after:.2f})."
    )


class RateLimitExceeded(GuardError, ToolError):
    """A call was refused by a rate limit.

    Raised as a tool error (FastMCP's ``ToolError``) so that the client (and the model)
    reads the message; the numbers are also on the exception (``retry_after``,
    ``reset_after``, ``scope``, ``limit``) and in the result's structured content. Like
    every error of fastmcp-guard it is a :class:`~fastmcp_guard.errors.GuardError`.
    """

    def __init__(self, refusal: RefusalInfo, tool: str | None = None, cost: int = 1) -> None:
        self.scope = refusal.scope
        self.limit: str | None = refusal.limit
        self.retry_after = refusal.retry_after
        self.reset_after = refusal.reset_after
        if refusal.scope == "backend":
            # The shared limiter is unreachable and its policy is on_backend_error="deny".
            self.limit = None
            super().__init__(
                "Rate limiter unavailable: the shared limits cannot be checked right now "
                f"(on_backend_error='deny'); retry after {refusal.retry_after:.2f} s"
            )
            return
        if refusal.scope == "loop":
            super().__init__(loop_refusal_text(refusal, tool))
            return
        what = {"per_key": "per-key", "global": "global", "tool": f"tool {tool!r}"}.get(
            refusal.scope, refusal.scope
        )
        if cost > refusal.count:
            # No wait helps: the call costs more than the bucket ever holds.
            super().__init__(
                f"Rate limit exceeded: this call costs {cost} units and the {what} limit "
                f"{refusal.limit} never holds that many; the operator must raise the limit "
                "or lower the tool's cost"
            )
            return
        units = f" for a call costing {cost} units" if cost > 1 else ""
        super().__init__(
            f"Rate limit exceeded ({what} limit {refusal.limit}){units}; "
            f"retry after {refusal.retry_after:.2f} s"
        )

    def as_mcp_error(self, code: int = RATE_LIMITED_CODE) -> MCPError:
        """The same refusal as a protocol-level MCP error with JSON-RPC error ``code``
        (default :data:`RATE_LIMITED_CODE`); ``error.data`` holds the numbers."""
        return MCPError(code, str(self), self.data)

    @property
    def data(self) -> dict[str, Any]:
        """Machine-readable refusal: ``retry_after``, ``limit``, ``remaining``, ``reset``."""
        error = {"backend": "rate_limiter_unavailable", "loop": "loop_detected"}
        return {
            "error": error.get(self.scope, "rate_limited"),
            "scope": self.scope,
            "limit": self.limit,
            "remaining": 0,
            "retry_after": round(self.retry_after, 3),
            "reset": round(self.reset_after, 3),
        }


class Decision:
    """What :meth:`RateLimit.check` decided about one call.

    ``settled``: decided already (the in-process limiter); ``refusal`` is then ``None``
    (admitted) or the :class:`~fastmcp_guard._core.Refusal`. Otherwise (Redis) the
    decision is one round trip away: ``await decision.settle()``. Awaiting the decision
    itself gives ``True`` if the call was admitted (fastmcp-guard 0.2's
    ``await check(...)``)."""

    __slots__ = ("_pending", "refusal", "settled")

    def __init__(self, refusal: Refusal | None, pending: Awaitable[Refusal | None] | None = None):
        self.refusal = refusal
        #: True once the decision is made (always, in process). A plain attribute: the
        #: middleware reads it on every call.
        self.settled = pending is None
        self._pending = pending

    async def settle(self) -> Refusal | None:
        """The refusal, or ``None`` if the call was admitted (waits for Redis once)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.refusal = await pending
            self.settled = True
        return self.refusal

    def __await__(self) -> Generator[Any, None, bool]:
        return self._admitted().__await__()

    async def _admitted(self) -> bool:
        return await self.settle() is None

    def __repr__(self) -> str:
        if not self.settled:
            return "Decision(pending)"
        return "Decision(admitted)" if self.refusal is None else f"Decision({self.refusal!r})"


#: The decision of every admitted in-process call (one object: nothing allocated).
ADMITTED = Decision(None)


class RateLimit:
    """Per-key and global limits for a :class:`~fastmcp_guard.Guard`.

    Args:
        per_key: limit for each identity (guard key, another verifier's client id,
            or, without one, the client address), e.g. ``"100/minute"``.
        global_limit: limit across all callers together.
        backend: ``"memory"`` (in-process; limits are per process) or ``"redis"``
            (shared by every process and node using the same Redis; needs the
            ``[redis]`` extra). See :mod:`fastmcp_guard.rate.redis`.
        refusal: how a refused tool call is answered. ``"tool"`` (default, as
            fastmcp-guard 0.2): a tool error result (``isError``) whose text names
            the limit and the wait and whose structured content carries
            ``retry_after``, ``limit``, ``remaining`` and ``reset``. ``"protocol"``:
            a JSON-RPC error (code ``refusal_code``) with the same message and ``data``.
            Resource reads and prompts are always refused with the protocol error.
        refusal_code: the JSON-RPC error code of a protocol refusal (default
            :data:`RATE_LIMITED_CODE`, 429). An application code: JSON-RPC reserves
            -32768..-32000 (the MCP specification of 2026-07-28 calls -32000..-32019
            legacy and reserves -32020..-32099), so a code there, or one that does not fit a
            32-bit integer, is a ``ConfigError``.
        url: the Redis server (``backend="redis"`` only; default
            ``redis://127.0.0.1:6379/0``), e.g. ``redis://:password@redis:6379/0``,
            ``rediss://...`` for TLS.
        on_backend_error: what to do with a call when Redis cannot be reached:
            ``"allow"`` (default: admit it, and log a warning), ``"deny"`` (refuse it,
            retry after 1 s) or ``"local"`` (limit it with an in-process limiter of the
            same rates until Redis answers again).
        key_prefix: prefix of the limiter's Redis keys (default ``fmg:rl:``); give
            each guarded service sharing one Redis its own.
        timeout: Redis socket timeout in seconds (default 0.05): how long a call can
            wait for an unresponsive Redis before the policy decides.
        max_connections: Redis connections per client (default 50); more concurrent
            calls wait for a free connection.
        mode: ``"enforce"`` (default) or ``"shadow"`` for ``per_key`` and
            ``global_limit``: in shadow they never refuse; what they would refuse is
            audited as ``would_refuse`` and counted in the metrics.
        loop_breaker: the most identical calls (same caller, tool and arguments) in a
            window, e.g. ``"20/minute"`` (the default); ``None`` turns it off.
            ``@rate_limit(..., loop_breaker=...)`` overrides it per tool.
        loop_breaker_mode: ``"shadow"`` (default: loops are only audited, as
            ``would_refuse``, so upgrading refuses nothing 0.2 admitted) or
            ``"enforce"`` (the repeat is refused and audited as ``loop_detected``).
        tool_costs: units per call of named tools (``{"expensive": 5}``; the
            ``tool_costs`` setting); they override ``@cost``. Others cost 1.

    Bad rate strings raise :class:`~fastmcp_guard.errors.InvalidRateError` (a
    ``ValueError``) here, at construction; a bad backend option
    :class:`~fastmcp_guard.errors.ConfigError`; ``backend="redis"`` without the redis
    package :class:`~fastmcp_guard.errors.MissingExtraError`.
    """

    def __init__(
        self,
        per_key: str | None = None,
        global_limit: str | None = None,
        backend: Literal["memory", "redis"] | str = "memory",
        *,
        refusal: Literal["tool", "protocol"] = "tool",
        refusal_code: int = RATE_LIMITED_CODE,
        url: str | None = None,
        on_backend_error: BackendErrorPolicy | str = "allow",
        key_prefix: str | None = None,
        timeout: float | None = None,
        max_connections: int | None = None,
        mode: Mode = "enforce",
        loop_breaker: str | None = DEFAULT_LOOP_BREAKER,
        loop_breaker_mode: Mode = "shadow",
        tool_costs: Mapping[str, int] | None = None,
    ) -> None:
        self.mode = _check_mode(mode, "RateLimit(mode=...)")
        self.loop_breaker_mode = _check_mode(loop_breaker_mode, "RateLimit(loop_breaker_mode=...)")
        if loop_breaker is not None and not isinstance(loop_breaker, str):
            raise ConfigError(
                f"RateLimit(loop_breaker=...) takes a rate string or None, got {loop_breaker!r}"
            )
        #: The loop breaker's rate (canonical), ``None`` when off.
        self.loop_breaker = None if loop_breaker is None else str(parse_rate(loop_breaker))
        #: Costs set by configuration (``tool_costs``); they override ``@cost``.
        self.tool_costs: dict[str, int] = {}
        for name, units in (tool_costs or {}).items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"tool_costs: {name!r} is not a tool name")
            self.tool_costs[name] = check_cost(units, f"tool_costs[{name!r}]")
        #: The cost of each tool seen so far (``@cost`` or ``tool_costs``); others cost 1.
        self.costs: dict[str, int] = dict(self.tool_costs)
        if refusal not in ("tool", "protocol"):
            raise ConfigError(f"refusal must be 'tool' or 'protocol', got {refusal!r}")
        if isinstance(refusal_code, bool) or not isinstance(refusal_code, int):
            raise ConfigError(f"refusal_code must be an integer, got {refusal_code!r}")
        if not -(2**31) <= refusal_code < 2**31:
            # JSON-RPC clients read codes as 32-bit integers (JavaScript loses precision
            # past 2**53): a huge code would not reach them intact.
            raise ConfigError(
                f"refusal_code {refusal_code} does not fit a 32-bit integer; use an "
                f"application code such as {RATE_LIMITED_CODE}"
            )
        if -32768 <= refusal_code <= -32000:
            raise ConfigError(
                f"refusal_code {refusal_code} is in the range JSON-RPC reserves "
                f"(-32768..-32000); use an application code such as {RATE_LIMITED_CODE}"
            )
        if backend not in ("memory", "redis"):
            raise ConfigError(
                f"unknown rate limit backend {backend!r}; expected 'memory' or 'redis'"
            )
        if backend == "memory" and (url, key_prefix, timeout, max_connections) != (None,) * 4:
            raise ConfigError(
                "url, key_prefix, timeout and max_connections apply to "
                "RateLimit(backend='redis') only"
            )
        self.per_key = per_key
        self.global_limit = global_limit
        self.backend = backend
        self.refusal = refusal
        #: JSON-RPC error code of a protocol refusal.
        self.refusal_code = refusal_code
        shadow = self.mode == "shadow"
        self._core = Limiter(per_key=per_key, global_limit=global_limit,
                             per_key_shadow=shadow, global_shadow=shadow)  # fmt: skip
        self._core.set_loop_breaker(self.loop_breaker, self.loop_breaker_mode == "shadow")
        #: True for the in-process backend (limits are per process).
        self.is_local = backend == "memory"
        self._remote: RedisLimiter | None = None
        if backend == "redis":
            from fastmcp_guard.rate.redis import DEFAULT_KEY_PREFIX, DEFAULT_URL, RedisLimiter

            self._remote = RedisLimiter(
                self._core, per_key, global_limit,
                url=url or DEFAULT_URL,
                on_backend_error=on_backend_error,  # type: ignore[arg-type] # checked there
                key_prefix=DEFAULT_KEY_PREFIX if key_prefix is None else key_prefix,
                timeout=0.05 if timeout is None else timeout,
                max_connections=50 if max_connections is None else max_connections,
                per_key_shadow=shadow,
                global_shadow=shadow,
            )  # fmt: skip
            self._remote.set_loop_breaker(self.loop_breaker, self.loop_breaker_mode == "shadow")
        elif on_backend_error != "allow":
            raise ConfigError("on_backend_error applies to RateLimit(backend='redis') only")
        else:
            # In process, ``check`` is the core's own method: it answers with ADMITTED or a
            # Decision itself, so the request path pays no Python frame for the wrapper.
            self._core.set_decisions(ADMITTED, Decision)
            self.check = self._core.decide  # type: ignore[method-assign,assignment]
            # The middleware's decision, also the core's own method.
            self.call = self._core.call  # type: ignore[method-assign,assignment]

    @property
    def core(self) -> Limiter:
        """The Rust limiter: the limiter itself for ``backend="memory"``; for ``"redis"``,
        the in-process limiter of the same rates used by ``on_backend_error="local"``."""
        return self._core

    @property
    def remote(self) -> RedisLimiter | None:
        """The Redis limiter (``backend="redis"``), else ``None``."""
        return self._remote

    @property
    def url(self) -> str | None:
        """The Redis URL (``backend="redis"``; may hold a password), else ``None``."""
        return None if self._remote is None else self._remote.url

    def set_tool_rate(self, tool: str, rate: str | None, mode: Mode = "enforce") -> None:
        """Set (a rate string) or clear (``None``) the per-(key, tool) limit of ``tool``,
        enforced or in shadow; the middleware does this from each tool's ``@rate_limit``."""
        shadow = _check_mode(mode, "mode") == "shadow"
        if self._remote is None:
            self._core.set_tool_rate(tool, rate, shadow)
        else:  # it keeps its in-process twin (``core``) in step
            self._remote.set_tool_rate(tool, rate, shadow)

    def register_tool(self, tool: str, rule: ToolRule) -> None:
        """Apply a tool's :class:`ToolRule` (its ``@rate_limit`` and ``@cost``): its rate
        and mode, its own loop breaker if it has one, and its cost (``tool_costs`` wins)."""
        self.set_tool_rate(tool, rule.rate, rule.mode)
        # The Redis limiter keeps its in-process twin (``core``) in step itself.
        target: Any = self._core if self._remote is None else self._remote
        if rule.loop_breaker is INHERIT and rule.loop_breaker_mode is None:
            target.clear_tool_loop_breaker(tool)
        else:
            rate = self.loop_breaker if rule.loop_breaker is INHERIT else rule.loop_breaker
            mode = rule.loop_breaker_mode or self.loop_breaker_mode
            target.set_tool_loop_breaker(tool, rate, mode == "shadow")
        units = self.tool_costs.get(tool, rule.cost or 1)
        if units == 1:
            self.costs.pop(tool, None)
        else:
            self.costs[tool] = units

    def cost_of(self, tool: str | None) -> int:
        """The units one call of ``tool`` consumes (1 unless ``@cost`` / ``tool_costs``)."""
        return 1 if tool is None else self.costs.get(tool, 1)

    def call(
        self, key_id: str, tool: str | None = None, cost: int = 1, args: Any = None
    ) -> Verdict:
        """Decide one call in process: the :class:`~fastmcp_guard._core.Verdict` (its
        ``refusal``, a shadow rule's would-be refusal, and the tightest limit's
        ``remaining`` / ``reset_after`` for the agent). ``args`` are the tool's arguments
        (for the loop breaker). With Redis use :meth:`call_async`. In process, each
        instance's ``call`` is the core limiter's own method."""
        if self._remote is not None:
            raise GuardError("RateLimit(backend='redis').call() would block: use call_async()")
        return self._core.call(key_id, tool, cost, args)

    async def call_async(
        self, key_id: str, tool: str | None = None, cost: int = 1, args: Any = None
    ) -> Verdict:
        """:meth:`call` for either backend (Redis: one round trip)."""
        if self._remote is None:
            return self._core.call(key_id, tool, cost, args)
        return await self._remote.call(key_id, tool, cost, args)

    async def acquire(self, key_id: str, tool: str | None = None) -> RefusalInfo | None:
        """Admit one call (``None``) or say why not. In process: sub-microsecond;
        Redis: one round trip (and the ``on_backend_error`` policy if it fails)."""
        if self._remote is None:
            return self._core.check(key_id, tool)
        return await self._remote.acquire(key_id, tool)

    def hit(self, key_id: str, tool: str | None = None) -> RefusalInfo | None:
        """:meth:`acquire`, synchronous (for Redis a blocking round trip: not on an event loop)."""
        if self._remote is None:
            return self._core.check(key_id, tool)
        return self._remote.check(key_id, tool)

    def check(self, key_id: str, tool: str | None = None) -> Decision:
        """Decide one call by ``key_id`` to ``tool`` (consuming it if admitted), without
        blocking: in process the decision is made here (``decision.settled``, and
        ``decision.refusal`` is ``None`` or why not); with Redis it is one round trip
        away: ``await decision.settle()`` gives the refusal or ``None``.

        fastmcp-guard 0.2's ``await check(key_id=...)`` still works: awaiting the decision
        gives ``True`` if the call was admitted. In process, each instance's ``check`` is
        the core limiter's ``decide`` (the same answers, no Python frame)."""
        if self._remote is None:
            refusal = self._core.check(key_id, tool)
            return ADMITTED if refusal is None else Decision(refusal)
        return Decision(None, self._remote.acquire(key_id, tool))

    def status(self, key_id: str) -> dict[str, Any]:
        """``{"per_key": {"limit","used","remaining","window_seconds","reset_after"},
        "global": {...}, "tools": {name: {...}}}`` (only the limits that are set)."""
        if self._remote is None:
            return self._core.status(key_id)
        return self._remote.status(key_id)

    async def status_async(self, key_id: str) -> dict[str, Any]:
        """:meth:`status` without blocking the event loop (Redis: one round trip)."""
        if self._remote is None:
            return self._core.status(key_id)
        return await self._remote.status_async(key_id)

    def reset(self, key_id: str) -> bool:
        """Forget a key's per-key and per-tool usage (not the global bucket); ``True``
        if it had live state. With Redis this resets it on every node."""
        if self._remote is None:
            tracked = key_id in self._core.tracked_keys()
            self._core.reset(key_id)
            return tracked
        return self._remote.reset(key_id)

    async def reset_async(self, key_id: str) -> bool:
        """:meth:`reset` without blocking the event loop."""
        if self._remote is None:
            return self.reset(key_id)
        return await self._remote.reset_async(key_id)

    def tracked_keys(self) -> list[str]:
        """Keys with live buckets, sorted (Redis: from every node, by ``SCAN``)."""
        if self._remote is None:
            return self._core.tracked_keys()
        return self._remote.tracked_keys()

    async def tracked_keys_async(self) -> list[str]:
        """:meth:`tracked_keys` without blocking the event loop."""
        if self._remote is None:
            return self._core.tracked_keys()
        return await self._remote.tracked_keys_async()

    def close(self) -> None:
        """Close the Redis connections (nothing to do in process)."""
        if self._remote is not None:
            self._remote.close()

    async def aclose(self) -> None:
        """Close the Redis connections, the async client's included."""
        if self._remote is not None:
            await self._remote.aclose()

    def __repr__(self) -> str:
        args = f"per_key={self.per_key!r}, global_limit={self.global_limit!r}"
        if self.mode != "enforce":
            args += f", mode={self.mode!r}"
        if (self.loop_breaker, self.loop_breaker_mode) != (DEFAULT_LOOP_BREAKER, "shadow"):
            args += f", loop_breaker={self.loop_breaker!r}, "
            args += f"loop_breaker_mode={self.loop_breaker_mode!r}"
        if self._remote is None:
            return f"RateLimit({args})"
        return (
            f"RateLimit({args}, backend='redis', url={mask_url(self._remote.url)!r}, "
            f"on_backend_error={self._remote.on_backend_error!r})"
        )


@dataclass(frozen=True, slots=True)
class ToolRule:
    """What ``@rate_limit`` and ``@cost`` say about one tool.

    ``rate``: its per-(key, tool) limit (``None``: none) and ``mode``;
    ``loop_breaker``: its own loop breaker rate (``None``: off for this tool;
    :data:`INHERIT`: the RateLimit's) and ``loop_breaker_mode`` (``None``: the
    RateLimit's); ``cost``: the units each call consumes (``None``: not set here)."""

    rate: str | None = None
    mode: Mode = "enforce"
    loop_breaker: str | None | _Inherit = INHERIT
    loop_breaker_mode: Mode | None = None
    cost: int | None = None


def _check_mode(mode: object, what: str) -> Mode:
    if mode not in _MODES:
        raise ConfigError(f"{what} must be 'enforce' or 'shadow', got {mode!r}")
    return mode  # type: ignore[return-value]


def check_cost(value: object, what: str = "cost") -> int:
    """``value`` as a tool cost (a whole number from 1 to :data:`MAX_COST`), else a
    :class:`~fastmcp_guard.errors.ConfigError` saying so."""
    try:
        return core_check_cost(value)  # the limiters' own check
    except (InvalidArgumentError, ArgumentTypeError) as exc:
        raise ConfigError(f"{what}: {exc}") from None


def _with_rule(fn: F, **changes: Any) -> F:
    """Merge ``changes`` into the tool's :class:`ToolRule` (``@rate_limit`` and ``@cost``
    stack in either order, on either side of ``@mcp.tool``)."""
    # Below @mcp.tool we get the function; above it, FastMCP's Tool (its .fn).
    target = fn if inspect.isroutine(fn) else getattr(fn, "fn", fn)
    rule = getattr(target, TOOL_RULE_ATTR, None)
    rule = replace(rule if isinstance(rule, ToolRule) else ToolRule(), **changes)
    setattr(target, TOOL_RULE_ATTR, rule)
    if rule.rate is not None:
        setattr(target, RATE_LIMIT_ATTR, rule.rate)
    return fn


def rate_limit(
    limit: str | None,
    *,
    mode: Mode = "enforce",
    loop_breaker: str | None | _Inherit = INHERIT,
    loop_breaker_mode: Mode | None = None,
) -> Callable[[F], F]:
    """Limit one tool per caller, on top of the Guard-level limits.

    Works on sync and async tools and on either side of ``@mcp.tool``. The rate
    string is checked at once, so a bad one fails at import time.

    ```python
    @mcp.tool
    @rate_limit("10/minute")
    def run_expensive_analysis(data: str) -> str: ...
    ```

    Args:
        limit: the per-(key, tool) rate, or ``None`` for none (to set only the loop
            breaker).
        mode: ``"enforce"`` (default) or ``"shadow"`` (never refuses; audits
            ``would_refuse``).
        loop_breaker: this tool's loop breaker rate (``None``: off for this tool);
            default: the RateLimit's.
        loop_breaker_mode: this tool's loop breaker mode; default: the RateLimit's.
    """
    canonical = None if limit is None else str(parse_rate(limit))
    _check_mode(mode, "rate_limit(mode=...)")
    if loop_breaker_mode is not None:
        _check_mode(loop_breaker_mode, "rate_limit(loop_breaker_mode=...)")
    if isinstance(loop_breaker, str):
        loop_breaker = str(parse_rate(loop_breaker))
    elif loop_breaker is not None and loop_breaker is not INHERIT:
        raise ConfigError(
            f"rate_limit(loop_breaker=...) takes a rate string or None, got {loop_breaker!r}"
        )

    def decorator(fn: F) -> F:
        return _with_rule(fn, rate=canonical, mode=mode, loop_breaker=loop_breaker,
                          loop_breaker_mode=loop_breaker_mode)  # fmt: skip

    return decorator


def cost(units: int) -> Callable[[F], F]:
    """The units each call of a tool consumes from every bucket and budget it touches
    (rate limits and credits); the default is 1. A refused call consumes nothing.

    ```python
    @mcp.tool
    @cost(5)
    @rate_limit("10/minute")
    def expensive(query: str) -> str: ...
    ```

    The ``tool_costs`` setting (``FASTMCP_GUARD_TOOL_COSTS="expensive=5"``) overrides it,
    so operators can retune a cost without a release. ``cost(0)``, a negative or a
    non-integer cost raise :class:`~fastmcp_guard.errors.ConfigError` at once."""
    checked = check_cost(units, "cost(...)")

    def decorator(fn: F) -> F:
        return _with_rule(fn, cost=checked)

    return decorator


def tool_rule_of(tool: Any) -> ToolRule:
    """The :class:`ToolRule` of a FastMCP tool (a plain 0.2 ``@rate_limit`` string too)."""
    fn = getattr(tool, "fn", None)
    rule = getattr(fn, TOOL_RULE_ATTR, None)
    if isinstance(rule, ToolRule):
        return rule
    marker = getattr(fn, RATE_LIMIT_ATTR, None)
    return ToolRule(rate=marker) if isinstance(marker, str) else ToolRule()


def tool_rate_of(tool: Any) -> str | None:
    """The ``@rate_limit`` string attached to a FastMCP tool, if any."""
    return tool_rule_of(tool).rate
