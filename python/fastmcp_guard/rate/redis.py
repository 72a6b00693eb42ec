"""The fleet rate limiter: GCRA buckets in Redis, one server-side script per call.

Every node of a fleet points its :class:`~fastmcp_guard.RateLimit` at the same Redis
(``backend="redis"``), and a limit then holds across all of them: a per-key limit of
L admits L calls in total, whichever nodes they reach.

Semantics are the in-process limiter's (``src/limiter.rs``), bucket for bucket: one
GCRA strategy, the core's :class:`~fastmcp_guard._core.Gcra` (emission interval
``T = ceil(period / N)`` and tolerance ``tau = (N - 1) * T`` in nanoseconds, and the
status and refusal a stored TAT gives); Redis is only its storage, and the script below
applies ``Gcra.admit``'s arithmetic to the constants the core gives it. A call touches the per-key, global and per-(key, tool) buckets, is
admitted only if all of them admit it, and a refused call consumes from none; the
refusal reported is the bucket with the largest ``retry_after``, with the same
``retry_after`` / ``reset_after`` to the nanosecond. Given the same times, the two
limiters take the same decisions (``tests/fleet`` checks this against the Rust core).

One round trip per call
    One Lua script (``EVALSHA``; loaded on first use, and again after ``NOSCRIPT`` when
    Redis restarted) reads, checks and writes every bucket of the call atomically. The
    time is Redis's own (``TIME`` inside the script), so nodes with skewed clocks agree.
    A bucket is the theoretical arrival time (TAT) as a decimal string of nanoseconds
    since the Unix epoch; the script does its arithmetic on (seconds, nanoseconds)
    pairs, so it is exact while a bucket's period stays below 2**53 ns (104 days).

Cost, shadow rules, the loop breaker (``call``)
    As in the core: a call of cost ``n`` conforms to a bucket when its TAT's lead over now
    is at most ``tau - (n - 1) * T`` and moves it by ``n * T``; a cost above a bucket's
    limit is refused with ``retry_after == reset_after``. A shadow bucket never refuses;
    on an admitted call it advances as an enforcing one would (consuming when it admits,
    not when it would refuse), and the script reports its would-be refusal. The loop
    breaker's bucket (per caller, tool and argument hash, charged 1 per call) is a key of
    its own with a TTL, so Redis drops it once idle: a caller holds at most as many as
    his calls admitted within one loop window. ``call`` returns the core's
    :class:`~fastmcp_guard._core.Verdict`, with the tightest enforced bucket's
    ``remaining`` computed by the core's ``Gcra`` from the leads the script returns.

Keys (Redis Cluster compatible)
    ``<prefix>{<tag>}:k:<key id>``: a hash per caller, field ``k`` for its per-key
    bucket and ``t:<tool>`` for each per-(key, tool) bucket; ``<prefix>{g}:global``: the
    global bucket; ``<prefix>{<tag>}:l:<key digest>:<tool>:<argument hash>``: a loop
    breaker bucket (the key digest is 24 hex digits of blake2b of the key id). Every key
    of one call must hash to one cluster slot, and the global bucket is in every call, so:

    - with a global limit, the tag is ``g`` for all keys: the whole limiter lives in
      one slot (one shard). One shard runs tens of thousands of these scripts a
      second; the alternative (per-key slots, and the global bucket in a second round
      trip) would double every call's latency and lose the all-or-nothing commit.
    - without a global limit, the tag is a digest of the key id: callers spread over
      the cluster's shards.

    Changing whether a global limit is set therefore starts every key afresh (once).
    Every key has a TTL: it expires when its bucket is full again (its TAT), which is
    exactly when it becomes indistinguishable from a missing one.

When Redis cannot be reached (``on_backend_error``)
    ``"allow"``: admit the call; ``"deny"``: refuse it (``retry_after`` 1 s, a message
    saying the limiter is unavailable); ``"local"``: decide with an in-process limiter
    of the same rates (limits then hold per node) until Redis answers again. A warning
    is logged at the first failure and then at most once per ``warn_interval``. Every
    command has a short socket timeout (50 ms by default), and after a failure Redis is
    tried again by one call per ``retry_interval`` (1 s by default), so a dead Redis
    never stalls calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

from fastmcp_guard._core import Gcra, Limiter, Refusal, Verdict, args_hash, check_cost
from fastmcp_guard._util import mask_url
from fastmcp_guard.errors import (
    ConfigError,
    MissingExtraError,
    RateBackendError,
)

if TYPE_CHECKING:
    import redis as redis_sync
    import redis.asyncio as redis_async

__all__ = [
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_URL",
    "AnyRefusal",
    "BackendErrorPolicy",
    "LimitRefusal",
    "RedisLimiter",
]

logger = logging.getLogger("fastmcp_guard.rate")

BackendErrorPolicy = Literal["allow", "deny", "local"]
DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_KEY_PREFIX = "fmg:rl:"
_POLICIES = ("allow", "deny", "local")
_NANOS = 1_000_000_000
_SCOPES = {1: "per_key", 2: "global", 3: "tool", 4: "loop"}

#: Checks and updates every bucket of one call. KEYS[1]: the caller's hash; then the
#: global bucket (only with a global limit); then the loop bucket (only when a loop breaker
#: applies). ARGV: now in ns ('' = Redis TIME), the cost, then for the per-key, global,
#: tool and loop buckets each T, tau, limit and shadow ('1') -- '' = no such bucket -- with
#: the tool's hash field before its four. The loop bucket charges 1 whatever the cost.
#: A bucket conforms when its TAT's lead over now is at most tau - (n - 1) * T (never if
#: n > limit: retry is then the lead itself); a shadow bucket never refuses and, when it
#: would, is not written. Returns {1, scope, retry_ns, reset_ns} (refused by an enforced
#: bucket, nothing written) or {0, shadow scope, retry_ns, reset_ns, then the new lead in
#: ns of the per-key, tool and global buckets, -1 when absent or not written} (admitted);
#: scopes 1 per key, 2 global, 3 tool, 4 loop (0 = no shadow hit).
LUA_CHECK = """
local now_s, now_ns
local function split(v)
  local n = #v
  if n <= 9 then return 0, tonumber(v) end
  return tonumber(string.sub(v, 1, n - 9)), tonumber(string.sub(v, n - 8))
end
if ARGV[1] ~= '' then
  now_s, now_ns = split(ARGV[1])
else
  local t = redis.call('TIME')
  now_s, now_ns = tonumber(t[1]), tonumber(t[2]) * 1000
end
local function ahead(v)
  if not v then return 0 end
  local s, ns = split(v)
  local d = (s - now_s) * 1e9 + (ns - now_ns)
  if d > 0 then return d end
  return 0
end
local function stamp(d)
  local x = now_ns + d
  local q = math.floor(x / 1e9)
  local r = x - q * 1e9
  if r < 0 then q = q - 1; r = r + 1e9 elseif r >= 1e9 then q = q + 1; r = r - 1e9 end
  return string.format('%d%09d', now_s + q, r)
end
local cost = tonumber(ARGV[2])
local worst, wretry, wreset = 0, -1, 0
local sworst, sretry, sreset = 0, -1, 0
local function rule(i)
  local T = tonumber(ARGV[i])
  if not T then return nil end
  return {T, tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), ARGV[i + 3] == '1'}
end
local function try(scope, cur, r, n)
  local retry
  if n > r[3] then
    retry = cur
  else
    local tol = r[2] - (n - 1) * r[1]
    if cur <= tol then return cur + n * r[1] end
    retry = cur - tol
  end
  if r[4] then
    if retry > sretry then sworst, sretry, sreset = scope, retry, cur end
  elseif retry > wretry then
    worst, wretry, wreset = scope, retry, cur
  end
  return nil
end
local hkey = KEYS[1]
local pk, g = rule(3), rule(7)
local field = ARGV[11]
local t, l = rule(12), rule(16)
local lkey = nil
if l then lkey = KEYS[#KEYS] end
local pk_new, t_new, l_new, g_new
if pk and t then
  local v = redis.call('HMGET', hkey, 'k', field)
  pk_new = try(1, ahead(v[1]), pk, cost)
  t_new = try(3, ahead(v[2]), t, cost)
elseif pk then
  pk_new = try(1, ahead(redis.call('HGET', hkey, 'k')), pk, cost)
elseif t then
  t_new = try(3, ahead(redis.call('HGET', hkey, field)), t, cost)
end
if l then l_new = try(4, ahead(redis.call('GET', lkey)), l, 1) end
if g then g_new = try(2, ahead(redis.call('GET', KEYS[2])), g, cost) end
if worst ~= 0 then return {1, worst, wretry, wreset} end
local ttl = 0
if pk_new and t_new then
  redis.call('HSET', hkey, 'k', stamp(pk_new), field, stamp(t_new))
  ttl = math.max(pk_new, t_new)
elseif pk_new then
  redis.call('HSET', hkey, 'k', stamp(pk_new))
  ttl = pk_new
elseif t_new then
  redis.call('HSET', hkey, field, stamp(t_new))
  ttl = t_new
end
if ttl > 0 then
  local ms = math.ceil(ttl / 1e6)
  if redis.call('PTTL', hkey) < ms then redis.call('PEXPIRE', hkey, string.format('%d', ms)) end
end
if l_new then
  redis.call('SET', lkey, stamp(l_new), 'PX', string.format('%d', math.ceil(l_new / 1e6)))
end
if g_new then
  redis.call('SET', KEYS[2], stamp(g_new), 'PX', string.format('%d', math.ceil(g_new / 1e6)))
end
return {0, sworst, sretry, sreset, pk_new or -1, t_new or -1, g_new or -1}
"""
LUA_CHECK_SHA = hashlib.sha1(LUA_CHECK.encode()).hexdigest()  # the script id Redis uses


#: What a check returns: ``None`` (admitted) or the core's ``Refusal`` (from Redis, from
#: the in-process limiter under the ``local`` policy while Redis is down, or scope
#: ``backend`` under ``deny``). Kept for code written against earlier releases.
AnyRefusal = Refusal | None

#: The Redis limiter's refusals are the core's :class:`~fastmcp_guard._core.Refusal`
#: (one refusal type); this name stays for code that imported it.
LimitRefusal = Refusal


def _import_redis() -> tuple[Any, Any]:
    try:
        import redis
        import redis.asyncio
    except ImportError:
        raise MissingExtraError(
            "RateLimit(backend='redis') needs the redis package: pip install 'fastmcp-guard[redis]'"
        ) from None
    return redis, redis.asyncio


class RedisLimiter:
    """Per-key, global and per-(key, tool) GCRA limits shared through Redis.

    Used through :class:`~fastmcp_guard.RateLimit` (``backend="redis"``), which owns
    ``local`` (the in-process :class:`~fastmcp_guard._core.Limiter` with the same rates,
    used when ``on_backend_error="local"`` and Redis is unreachable).

    Methods come in twins with the same semantics: ``acquire`` / ``check``,
    ``status_async`` / ``status``, ``reset_async`` / ``reset``, ``tracked_keys_async`` /
    ``tracked_keys``. The async ones (the middleware's) use ``redis.asyncio``; the sync
    ones a blocking client, for scripts and threads.

    Args:
        local: the in-process limiter of the same rates (fallback and tool-rate source).
        per_key: per-key rate string, or ``None``.
        global_limit: global rate string, or ``None``.
        per_key_shadow: the per-key rule runs in shadow (decides, never refuses).
        global_shadow: the global rule runs in shadow.
        url: ``redis://[[user]:password@]host:port/db``, ``rediss://...`` (TLS) or
            ``unix:///path.sock``.
        on_backend_error: ``"allow"``, ``"deny"`` or ``"local"`` (see the module notes).
        key_prefix: prefix of every key (no ``{`` or ``}``: the hash tag follows it).
        timeout: socket connect and read timeout, in seconds.
        max_connections: connections per client (one async client per event loop, one
            blocking client). Async checks are pipelined and need one; a blocking call
            beyond the limit waits for a free one (at most ``max(1 s, timeout)``).
        retry_interval: after a failure, seconds before one call tries Redis again.
        warn_interval: seconds between two warnings about the same outage.
    """

    def __init__(
        self,
        local: Limiter,
        per_key: str | None,
        global_limit: str | None,
        *,
        per_key_shadow: bool = False,
        global_shadow: bool = False,
        url: str = DEFAULT_URL,
        on_backend_error: BackendErrorPolicy = "allow",
        key_prefix: str = DEFAULT_KEY_PREFIX,
        timeout: float = 0.05,
        max_connections: int = 50,
        retry_interval: float = 1.0,
        warn_interval: float = 30.0,
    ) -> None:
        if on_backend_error not in _POLICIES:
            raise ConfigError(
                f"on_backend_error must be 'allow', 'deny' or 'local', got {on_backend_error!r}"
            )
        if not isinstance(key_prefix, str) or "{" in key_prefix or "}" in key_prefix:
            raise ConfigError(
                f"key_prefix {key_prefix!r} must be a string without '{{' or '}}' "
                "(the Redis Cluster hash tag follows it)"
            )
        if not timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {timeout!r}")
        if not (isinstance(max_connections, int) and max_connections >= 1):
            raise ConfigError(
                f"max_connections must be a whole number >= 1, got {max_connections!r}"
            )
        self._redis, self._redis_asyncio = _import_redis()
        self.local = local
        self.url = url
        self.on_backend_error: BackendErrorPolicy = on_backend_error
        self.key_prefix = key_prefix
        self.timeout = timeout
        self.max_connections = max_connections
        self.retry_interval = retry_interval
        self.warn_interval = warn_interval
        self._per_key = None if per_key is None else Gcra(per_key)
        self._global = None if global_limit is None else Gcra(global_limit)
        self._per_key_shadow = bool(per_key_shadow)
        self._global_shadow = bool(global_shadow)
        #: Tool rates: (strategy, shadow).
        self._tools: dict[str, tuple[Gcra, bool]] = {}
        #: The limiter-wide loop breaker, and the tools' own (``None``: off for the tool).
        self._loop: tuple[Gcra, bool] | None = None
        self._tool_loops: dict[str, tuple[Gcra, bool] | None] = {}
        self._pk_args = _rule_args(self._per_key, self._per_key_shadow)
        self._g_args = _rule_args(self._global, self._global_shadow)
        self._global_key = f"{key_prefix}{{g}}:global"
        exc = self._redis.exceptions
        self._noscript: type[Exception] = exc.NoScriptError
        self._errors: tuple[type[BaseException], ...] = (
            exc.RedisError, OSError, asyncio.TimeoutError)  # fmt: skip
        try:  # parse the URL now, so a bad one fails at start-up
            self._redis.connection.parse_url(url)
        except (ValueError, TypeError) as e:
            raise ConfigError(
                f"bad Redis URL {mask_url(url)!r}: {e}; expected "
                "redis://[[user]:password@]host:port/db, rediss://... or unix:///path.sock"
            ) from None
        self._sync: redis_sync.Redis | None = None
        self._async: redis_async.Redis | None = None
        self._async_loop: asyncio.AbstractEventLoop | None = None
        self._pipeliner: _Pipeliner | None = None
        # Outage state: monotonic time before which Redis is not tried (0: healthy).
        self._down_until = 0.0
        self._down_since = 0.0
        self._last_warning = -1e18
        self._failed_calls = 0

    # -- configuration -------------------------------------------------------------------

    def _client(self, module: Any) -> Any:
        """A client of ``module`` (``redis`` or ``redis.asyncio``) with our timeouts."""
        from redis.backoff import NoBackoff

        # Async checks are pipelined (one batch in flight), so the async client needs few
        # connections: a plain pool. Threads using the blocking client may burst: a blocking
        # pool, where a call beyond max_connections waits instead of failing.
        blocking = module is self._redis
        pool_class = module.BlockingConnectionPool if blocking else module.ConnectionPool
        pool_wait = {"timeout": max(1.0, self.timeout)} if blocking else {}
        pool = pool_class.from_url(
            self.url,
            max_connections=self.max_connections,
            **pool_wait,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            # One immediate retry on a connection error (a pooled connection Redis closed),
            # none on a timeout (the script may have run: it must not run twice), no sleeps.
            retry=module.retry.Retry(
                NoBackoff(), 1, supported_errors=(self._redis.exceptions.ConnectionError,)
            ),
        )
        return module.Redis.from_pool(pool)

    def set_tool_rate(self, tool: str, rate: str | None, shadow: bool = False) -> None:
        """Set (``rate``) or clear (``None``) the per-(key, tool) rate of ``tool``, enforced
        or in shadow; ``local`` follows (setting it there too is harmless)."""
        if rate is None:
            self._tools.pop(tool, None)
        else:
            self._tools[tool] = (Gcra(rate), bool(shadow))
        self.local.set_tool_rate(tool, rate, shadow)

    def set_loop_breaker(self, rate: str | None, shadow: bool = True) -> None:
        """The limiter-wide loop breaker (``None``: off; tools with their own keep it)."""
        self._loop = None if rate is None else (Gcra(rate), bool(shadow))
        self.local.set_loop_breaker(rate, shadow)

    def set_tool_loop_breaker(self, tool: str, rate: str | None, shadow: bool = True) -> None:
        """``tool``'s own loop breaker in place of the limiter-wide one (``None``: off)."""
        self._tool_loops[tool] = None if rate is None else (Gcra(rate), bool(shadow))
        self.local.set_tool_loop_breaker(tool, rate, shadow)

    def clear_tool_loop_breaker(self, tool: str) -> None:
        """Drops ``tool``'s own loop breaker: the limiter-wide one applies again."""
        self._tool_loops.pop(tool, None)
        self.local.clear_tool_loop_breaker(tool)

    def loop_breaker(self, tool: str) -> tuple[str, bool] | None:
        """The loop breaker that applies to ``tool``: ``(rate, shadow)``, or ``None``."""
        rule = self._loop_rule(tool)
        return None if rule is None else (rule[0].rate, rule[1])

    def _loop_rule(self, tool: str) -> tuple[Gcra, bool] | None:
        if tool in self._tool_loops:
            return self._tool_loops[tool]
        return self._loop

    # -- keys ----------------------------------------------------------------------------

    def hash_key(self, key: str) -> str:
        """The Redis key holding ``key``'s per-key and per-tool buckets."""
        if self._global is not None:
            return f"{self.key_prefix}{{g}}:k:{key}"
        tag = hashlib.blake2b(key.encode(), digest_size=6).hexdigest()
        return f"{self.key_prefix}{{{tag}}}:k:{key}"

    @property
    def global_key(self) -> str:
        """The Redis key of the global bucket."""
        return self._global_key

    def _loop_prefix(self, key: str) -> str:
        """The start of every loop-breaker key of ``key`` (same hash tag as its hash)."""
        head = self.hash_key(key)
        head = head[: head.index("}:k:") + 1]
        digest = hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
        return f"{head}:l:{digest}:"

    def loop_key(self, key: str, tool: str, hash_: str) -> str:
        """The Redis key of ``key``'s loop-breaker bucket for ``tool`` and an argument hash."""
        return f"{self._loop_prefix(key)}{tool}:{hash_}"

    def _script_call(
        self,
        key: str,
        tool: str | None,
        now_ns: int | None,
        cost: int = 1,
        loop: tuple[Gcra, bool, str] | None = None,
    ) -> list[Any]:
        """``EVALSHA`` arguments after the sha: numkeys, keys, args. ``loop``: the loop
        breaker's rule and the argument hash, when one applies."""
        tr = self._tools.get(tool) if tool is not None and self._tools else None
        keys = [self.hash_key(key)]
        if self._global is not None:
            keys.append(self._global_key)
        now = "" if now_ns is None else str(now_ns)
        tool_args = ("", *_NO_RULE) if tr is None else ("t:" + str(tool), *_rule_args(*tr))
        if loop is None:
            loop_args = _NO_RULE
        else:
            keys.append(self.loop_key(key, str(tool), loop[2]))
            loop_args = _rule_args(loop[0], loop[1])
        return [len(keys), *keys, now, str(cost), *self._pk_args, *self._g_args, *tool_args,
                *loop_args]  # fmt: skip

    def _gcra(self, scope: str, tool: str | None) -> Gcra | None:
        """The strategy of the bucket of ``scope`` (``None`` if its rate was cleared while
        the call was in flight)."""
        if scope == "per_key":
            return self._per_key
        if scope == "global":
            return self._global
        if scope == "tool":
            rule = self._tools.get(str(tool))
        else:
            rule = self._loop_rule(str(tool))
        return None if rule is None else rule[0]

    def _decide(self, reply: list[int], tool: str | None) -> Refusal | None:
        if not reply[0]:
            return None
        scope = _SCOPES[int(reply[1])]
        gcra = self._gcra(scope, tool)
        if gcra is None:
            return None
        return gcra.refusal(scope, int(reply[2]), int(reply[3]))

    def _verdict(self, reply: list[int], tool: str | None, hash_: str | None) -> Verdict:
        if reply[0]:
            refusal = self._decide(reply, tool)
            return Verdict(refusal=refusal, args_hash=hash_) if refusal else Verdict()
        shadow = None
        if reply[1]:
            scope = _SCOPES[int(reply[1])]
            gcra = self._gcra(scope, tool)
            if gcra is not None:
                shadow = gcra.refusal(scope, int(reply[2]), int(reply[3]))
        # The tightest enforced bucket of the caller's own: fewest remaining, then the
        # longest reset; in the order per key, tool (as the core). Not the global bucket:
        # it counts every caller's calls.
        best: tuple[int, int, Gcra] | None = None
        tr = self._tools.get(tool) if tool is not None else None
        for lead, gcra, shadowed in (
            (int(reply[4]), self._per_key, self._per_key_shadow),
            (int(reply[5]), None if tr is None else tr[0], tr is not None and tr[1]),
        ):
            if lead < 0 or gcra is None or shadowed:
                continue
            remaining = gcra.remaining(lead)
            if best is None or remaining < best[0] or (remaining == best[0] and lead > best[1]):
                best = (remaining, lead, gcra)
        if best is None:
            return Verdict(shadow=shadow, args_hash=hash_)
        return Verdict(shadow=shadow, remaining=best[0], reset_after=best[1] / 1e9,
                       limit=best[2].rate, args_hash=hash_)  # fmt: skip

    # -- clients -------------------------------------------------------------------------

    def _async_client(self) -> redis_async.Redis:
        loop = asyncio.get_running_loop()
        if self._async is None or self._async_loop is not loop:
            # redis.asyncio connections belong to one event loop: one client per loop.
            self._async = self._client(self._redis_asyncio)
            self._async_loop = loop
            self._pipeliner = _Pipeliner(self._async, self._noscript)
        return self._async

    def _sync_client(self) -> redis_sync.Redis:
        if self._sync is None:
            self._sync = self._client(self._redis)
        return self._sync

    # -- the outage policy -----------------------------------------------------------------

    def _skip_remote(self) -> bool:
        """True while Redis is considered down; lets one call through per retry interval."""
        if not self._down_until:
            return False
        now = time.monotonic()
        if now < self._down_until:
            return True
        self._down_until = now + self.retry_interval  # this call probes; the others skip
        return False

    def _failed(self, exc: BaseException | None, key: str, tool: str | None) -> AnyRefusal:
        """Decide a call Redis could not (``exc`` is ``None`` while the circuit is open)."""
        self._note_failure(exc)
        policy = self.on_backend_error
        if policy == "allow":
            return None
        if policy == "local":
            return self.local.check(key, tool)
        return Refusal.unavailable(1.0)

    def _note_failure(self, exc: BaseException | None) -> None:
        """Count a call decided without Redis; open the circuit and warn on a failure."""
        now = time.monotonic()
        self._failed_calls += 1
        if exc is not None:
            if not self._down_until:
                self._down_since = now
            self._down_until = now + self.retry_interval
            if now - self._last_warning >= self.warn_interval:
                self._last_warning = now
                logger.warning(
                    "rate limiter: Redis at %s unreachable (%s: %s); %s (on_backend_error=%r); "
                    "%d call(s) decided without Redis so far",
                    mask_url(self.url), type(exc).__name__, exc, _POLICY_WORDS[self.on_backend_error],
                    self.on_backend_error, self._failed_calls,
                )  # fmt: skip

    def _failed_call(
        self, exc: BaseException | None, key: str, tool: str | None, cost: int, args: object
    ) -> Verdict:
        """:meth:`_failed` for :meth:`call`: the same policies, as a :class:`Verdict`."""
        self._note_failure(exc)
        policy = self.on_backend_error
        if policy == "allow":
            return Verdict()
        if policy == "local":
            return self.local.call(key, tool, cost, args)
        return Verdict(refusal=Refusal.unavailable(1.0))

    def _recovered(self) -> None:
        if self._down_until:
            logger.warning(
                "rate limiter: Redis at %s answers again after %.1f s; shared limits apply",
                mask_url(self.url), time.monotonic() - self._down_since,
            )  # fmt: skip
            self._down_until = 0.0
            self._failed_calls = 0
            self._last_warning = -1e18

    @property
    def available(self) -> bool:
        """False while Redis is considered unreachable (after a failed call)."""
        return not self._down_until

    # -- checking calls ------------------------------------------------------------------

    async def acquire(
        self, key: str, tool: str | None = None, *, now_ns: int | None = None
    ) -> AnyRefusal:
        """Admit one call (``None``) or say why not: one ``EVALSHA``, one round trip.

        Concurrent calls on one event loop share round trips: while one batch of
        ``EVALSHA`` commands is in flight, the next calls queue and go out together as the
        next pipeline (each still one command, answered in order).

        ``now_ns`` replaces Redis's clock (nanoseconds since the Unix epoch), for tests.
        When Redis cannot be reached the ``on_backend_error`` policy decides.
        """
        if self._down_until and self._skip_remote():
            return self._failed(None, key, tool)
        call = self._script_call(key, tool, now_ns)
        try:
            if self._async_loop is not asyncio.get_running_loop():
                self._async_client()
            assert self._pipeliner is not None
            reply = await self._pipeliner.submit(call)
        except self._errors as exc:
            return self._failed(exc, key, tool)
        if self._down_until:
            self._recovered()
        return self._decide(reply, tool)

    def check(self, key: str, tool: str | None = None, *, now_ns: int | None = None) -> AnyRefusal:
        """:meth:`acquire` with a blocking client (do not call it on an event loop)."""
        if self._down_until and self._skip_remote():
            return self._failed(None, key, tool)
        call = self._script_call(key, tool, now_ns)
        try:
            reply = self._evalsha_sync(call)
        except self._errors as exc:
            return self._failed(exc, key, tool)
        if self._down_until:
            self._recovered()
        return self._decide(reply, tool)

    def _prepare(
        self, key: str, tool: str | None, cost: int, args: object, now_ns: int | None
    ) -> tuple[list[Any], str | None]:
        """The script call of :meth:`call` and the argument hash (when a loop breaker
        applies to the tool: only then are the arguments hashed)."""
        loop = None
        hash_ = None
        if tool is not None and args is not None:
            rule = self._loop_rule(tool)
            if rule is not None:
                hash_ = args_hash(args)
                loop = (rule[0], rule[1], hash_)
        return self._script_call(key, tool, now_ns, cost, loop), hash_

    async def call(
        self,
        key: str,
        tool: str | None = None,
        cost: int = 1,
        args: object | None = None,
        *,
        now_ns: int | None = None,
    ) -> Verdict:
        """Decide (and on admission consume) one call of ``cost`` by ``key`` to ``tool``,
        with ``args`` for the loop breaker: one ``EVALSHA``, one round trip (pipelined with
        concurrent calls as :meth:`acquire`). Same decisions as the core's
        :meth:`~fastmcp_guard._core.Limiter.call` given the same times; when Redis cannot
        be reached the ``on_backend_error`` policy decides (``local``: the core's ``call``).
        """
        cost = check_cost(cost)
        if self._down_until and self._skip_remote():
            return self._failed_call(None, key, tool, cost, args)
        call, hash_ = self._prepare(key, tool, cost, args, now_ns)
        try:
            if self._async_loop is not asyncio.get_running_loop():
                self._async_client()
            assert self._pipeliner is not None
            reply = await self._pipeliner.submit(call)
        except self._errors as exc:
            return self._failed_call(exc, key, tool, cost, args)
        if self._down_until:
            self._recovered()
        return self._verdict(reply, tool, hash_)

    def call_sync(
        self,
        key: str,
        tool: str | None = None,
        cost: int = 1,
        args: object | None = None,
        *,
        now_ns: int | None = None,
    ) -> Verdict:
        """:meth:`call` with a blocking client (do not call it on an event loop)."""
        cost = check_cost(cost)
        if self._down_until and self._skip_remote():
            return self._failed_call(None, key, tool, cost, args)
        call, hash_ = self._prepare(key, tool, cost, args, now_ns)
        try:
            reply = self._evalsha_sync(call)
        except self._errors as exc:
            return self._failed_call(exc, key, tool, cost, args)
        if self._down_until:
            self._recovered()
        return self._verdict(reply, tool, hash_)

    def _evalsha_sync(self, call: list[Any]) -> Any:
        client = self._sync_client()
        try:
            return client.evalsha(LUA_CHECK_SHA, *call)
        except self._noscript:
            client.script_load(LUA_CHECK)
            return client.evalsha(LUA_CHECK_SHA, *call)

    # -- status, reset, tracked keys -----------------------------------------------------

    @contextmanager
    def _admin_errors(self, what: str) -> Iterator[None]:
        """Driver errors of the admin operations as :class:`RateBackendError`."""
        try:
            yield
        except self._errors as exc:
            raise RateBackendError(
                f"cannot {what}: Redis at {mask_url(self.url)} failed ({type(exc).__name__}: "
                f"{exc}); check that it is running and reachable from this node"
            ) from exc

    def _status(self, hash_: dict[bytes, bytes], glob: bytes | None, now: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self._per_key is not None:
            out["per_key"] = self._per_key.status(int(hash_.get(b"k", 0)), now)
        if self._global is not None:
            out["global"] = self._global.status(int(glob or 0), now)
        if self._tools:
            out["tools"] = {
                name: g.status(int(hash_.get(b"t:" + name.encode(), 0)), now)
                for name, (g, _) in sorted(self._tools.items())
            }
        return out

    def _status_pipeline(self, pipe: Any, key: str, now_ns: int | None) -> None:
        if now_ns is None:
            pipe.time()
        pipe.hgetall(self.hash_key(key))
        pipe.get(self._global_key)

    @staticmethod
    def _now(replies: list[Any], now_ns: int | None) -> tuple[int, list[Any]]:
        if now_ns is not None:
            return now_ns, replies
        secs, micros = replies[0]
        return int(secs) * _NANOS + int(micros) * 1000, replies[1:]

    async def status_async(self, key: str, *, now_ns: int | None = None) -> dict[str, Any]:
        """Every bucket that applies to ``key`` (same shape as the core's ``status``);
        one round trip, consumes nothing. Raises :class:`RateBackendError` if Redis fails."""
        with self._admin_errors("read the rate limits"):
            pipe = self._async_client().pipeline(transaction=False)
            self._status_pipeline(pipe, key, now_ns)
            now, (hash_, glob) = self._now(await pipe.execute(), now_ns)
        return self._status(hash_, glob, now)

    def status(self, key: str, *, now_ns: int | None = None) -> dict[str, Any]:
        """:meth:`status_async` with a blocking client."""
        with self._admin_errors("read the rate limits"):
            pipe = self._sync_client().pipeline(transaction=False)
            self._status_pipeline(pipe, key, now_ns)
            now, (hash_, glob) = self._now(pipe.execute(), now_ns)
        return self._status(hash_, glob, now)

    def _loop_match(self, key: str) -> str:
        return _glob_escape(self._loop_prefix(key)) + "*"

    async def reset_async(self, key: str) -> bool:
        """Forget ``key``'s per-key, per-tool and loop-breaker buckets (not the global one),
        on every node; ``True`` if it had live state. The loop buckets are found with a
        ``SCAN`` (an admin operation)."""
        with self._admin_errors(f"reset {key!r}"):
            client = self._async_client()
            names = [self.hash_key(key)]
            names += [n async for n in client.scan_iter(match=self._loop_match(key), count=1000)]
            return bool(await client.delete(*names))

    def reset(self, key: str) -> bool:
        """:meth:`reset_async` with a blocking client."""
        with self._admin_errors(f"reset {key!r}"):
            client = self._sync_client()
            names = [self.hash_key(key)]
            names += list(client.scan_iter(match=self._loop_match(key), count=1000))
            return bool(client.delete(*names))

    def _match(self) -> str:
        return _glob_escape(self.key_prefix) + "{*}:k:*"

    def _key_of(self, name: bytes) -> str | None:
        text = name.decode("utf-8", "surrogateescape")
        _, sep, rest = text[len(self.key_prefix) :].partition("}:k:")
        return rest if sep else None

    async def tracked_keys_async(self) -> list[str]:
        """Keys with live buckets in Redis (from every node), sorted: a ``SCAN`` over the
        key prefix (cost grows with the database's size; for the admin routes)."""
        with self._admin_errors("list the tracked keys"):
            client = self._async_client()
            names = [n async for n in client.scan_iter(match=self._match(), count=1000)]
        return sorted({k for n in names if (k := self._key_of(n)) is not None})

    def tracked_keys(self) -> list[str]:
        """:meth:`tracked_keys_async` with a blocking client."""
        with self._admin_errors("list the tracked keys"):
            names = list(self._sync_client().scan_iter(match=self._match(), count=1000))
        return sorted({k for n in names if (k := self._key_of(n)) is not None})

    # -- lifecycle -----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close both clients' connections."""
        client, self._async, self._pipeliner = self._async, None, None
        if client is not None and self._async_loop is asyncio.get_running_loop():
            await client.aclose()
        self.close()

    def close(self) -> None:
        """Close the blocking client's connections (the async client's go with its loop)."""
        client, self._sync = self._sync, None
        if client is not None:
            client.close()

    def __repr__(self) -> str:
        return (
            f"RedisLimiter(url={mask_url(self.url)!r}, "
            f"on_backend_error={self.on_backend_error!r}, key_prefix={self.key_prefix!r})"
        )


_NO_RULE = ("", "", "", "")


def _rule_args(gcra: Gcra | None, shadow: bool) -> tuple[str, str, str, str]:
    """A bucket's script arguments: T, tau, limit, shadow ('' when absent)."""
    if gcra is None:
        return _NO_RULE
    return (str(gcra.emission_ns), str(gcra.tau_ns), str(gcra.limit), "1" if shadow else "0")


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis ``SCAN MATCH`` pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class _Pipeliner:
    """Sends the ``EVALSHA`` commands of concurrent calls as pipelines, one batch at a time.

    A call queues its command and awaits its reply. If no batch is in flight, a drain task
    starts; it sends everything queued as one pipeline, resolves each call with its own
    reply (or error), and repeats until the queue is empty, then ends (no task lingers).
    When a batch fails (Redis down or hung), the calls queued meanwhile fail with it at
    once rather than wait for another timeout. A script Redis lost (``NOSCRIPT``, after a
    restart) is loaded and the affected commands sent again.
    """

    MAX_BATCH = 512

    def __init__(self, client: Any, noscript: type[Exception]) -> None:
        self.client = client
        self.noscript = noscript
        self.pending: list[tuple[list[Any], asyncio.Future[Any]]] = []
        self.draining = False

    def submit(self, call: list[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.pending.append((call, future))
        if not self.draining:
            self.draining = True
            loop.create_task(self._drain())
        return future

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch = self.pending[: self.MAX_BATCH]
                del self.pending[: self.MAX_BATCH]
                try:
                    replies = await self._send([call for call, _ in batch])
                except Exception as exc:  # noqa: BLE001 - handed to each caller, who decides
                    batch += self.pending  # queued while it failed: fail them now too
                    self.pending = []
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                except BaseException:
                    for _, future in batch + self.pending:
                        future.cancel()  # the loop is shutting down
                    self.pending = []
                    raise
                for (_, future), reply in zip(batch, replies):
                    if future.done():  # its caller was cancelled
                        continue
                    if isinstance(reply, Exception):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        finally:
            self.draining = False

    async def _send(self, calls: list[list[Any]]) -> list[Any]:
        if len(calls) == 1:  # a lone call: a plain command costs less than a pipeline
            try:
                return [await self.client.evalsha(LUA_CHECK_SHA, *calls[0])]
            except self.noscript:
                await self.client.script_load(LUA_CHECK)
                return [await self.client.evalsha(LUA_CHECK_SHA, *calls[0])]
        replies = await self._pipeline(calls)
        lost = [i for i, reply in enumerate(replies) if isinstance(reply, self.noscript)]
        if lost:
            await self.client.script_load(LUA_CHECK)
            for i, reply in zip(lost, await self._pipeline([calls[i] for i in lost])):
                replies[i] = reply
        return replies

    async def _pipeline(self, calls: list[list[Any]]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for call in calls:
            pipe.evalsha(LUA_CHECK_SHA, *call)
        return list(await pipe.execute(raise_on_error=False))


_POLICY_WORDS = {
    "allow": "admitting calls unchecked",
    "deny": "refusing calls",
    "local": "limiting per node with the in-process limiter",
}
