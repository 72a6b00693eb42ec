"""Type stubs for the Rust core, ``fastmcp_guard._core``.

Everything here is implemented in ``src/py/`` (one file per facade); the domain logic
lives in the plain-Rust modules beside it (``tokens``, ``hashing``, ``keystore``,
``limiter``, ``ipmatch``, ``audit``).
"""

import builtins
import os
from collections.abc import Callable, Sequence
from typing import IO, Any, Literal, TypeAlias, final

__version__: str

# --- exceptions -----------------------------------------------------------------

class GuardError(Exception):
    """Root of every error fastmcp-guard raises."""

class InvalidRateError(GuardError, ValueError):
    """A rate string such as ``"10/minute"`` could not be parsed."""

class InvalidIPError(GuardError, ValueError):
    """An allow / deny / trusted-proxy entry is not an address or CIDR."""

class InvalidKeyInputError(GuardError, ValueError):
    """A key name, scope, expiry or metadata value was refused."""

class KeyNotFoundError(GuardError, KeyError):
    """No key has that id."""

class KeyRevokedError(GuardError, ValueError):
    """The operation needs a key that is not revoked."""

class StoreError(GuardError, OSError):
    """The key store could not be opened, read or written."""

class AuditWriteError(GuardError, OSError):
    """The audit sink could not be opened or written."""

class VerifyError(GuardError):
    """A token was refused. ``reason`` is one of ``malformed``, ``unknown_key``,
    ``bad_secret``, ``revoked``, ``expired``, ``throttled``, ``busy``, ``store``.

    ``key_id`` is the key id the token claims (public; for a 0.2 token its public part
    ``fmg_sk_<selector>`` unless the record was read), ``None`` for a malformed token.
    ``retry_after`` (seconds) is set when ``reason`` is ``throttled``: a failure budget is
    spent (never for a token already proven on this node); answer 429, not 401. ``scope``
    then names the budget: ``client`` (per address and key id), ``key`` (per key id),
    ``server`` or ``unknown_keys`` (per network, ids not in the store); else ``None``."""

    reason: str
    key_id: str | None
    retry_after: float | None
    scope: str | None

class InvalidArgumentError(GuardError, ValueError):
    """An argument or option was refused (out of range, unknown name, malformed value)."""

class ArgumentTypeError(GuardError, TypeError):
    """An argument has the wrong type (for example a scope that is not a str)."""

class AuditReadError(GuardError, OSError):
    """An audit log file could not be read (export, query, verify, the HTTP backend's
    spool); ``errno`` is set when the OS gave one."""

class AuditFileNotFoundError(AuditReadError, FileNotFoundError):
    """An audit log file does not exist (an AuditReadError and a FileNotFoundError)."""

class AuditPermissionError(AuditReadError, PermissionError):
    """An audit log file may not be read by this user (an AuditReadError and a
    PermissionError)."""

class AuditIsADirectoryError(AuditReadError, IsADirectoryError):
    """An audit log path names a directory (an AuditReadError and an IsADirectoryError)."""

# --- tokens -----------------------------------------------------------------------

def token_key_id(token_or_id: str) -> str | None:
    """The key id (``fmg_key_...``) named by a key id, a bare public id or a token."""

def looks_like_guard_token(token: str) -> bool:
    """True when ``token`` starts with the ``fmg_sk_`` prefix (no other check)."""

# --- rates ------------------------------------------------------------------------

@final
class Rate:
    """A parsed rate such as ``10/minute``: ``count`` calls per ``period_seconds``."""

    def __new__(cls, spec: str) -> Rate: ...
    @property
    def count(self) -> int: ...
    @property
    def period_seconds(self) -> float: ...

def parse_rate(spec: str) -> Rate:
    """Parse a rate string; raises :class:`InvalidRateError` naming the bad value."""

@final
class Refusal:
    """Why a limiter refused a call (returned, never raised): the in-process limiter's,
    the Redis limiter's, or (scope ``backend``) an unreachable shared limiter's."""

    @staticmethod
    def unavailable(retry_after: float) -> Refusal:
        """The refusal of a call while the shared limiter cannot be reached (policy
        ``deny``): scope ``backend``, limit ``unavailable``."""
    @property
    def scope(self) -> str: ...
    @property
    def limit(self) -> str: ...
    @property
    def count(self) -> int: ...
    @property
    def window_seconds(self) -> float: ...
    @property
    def retry_after(self) -> float: ...
    @property
    def reset_after(self) -> float: ...

@final
class Gcra:
    """The GCRA strategy of one rate: its constants (for a storage that keeps the TATs
    elsewhere, as the Redis limiter's script does) and what a stored TAT gives."""

    def __new__(cls, rate: str) -> Gcra: ...
    @property
    def rate(self) -> str: ...
    @property
    def limit(self) -> int: ...
    @property
    def window_seconds(self) -> float: ...
    @property
    def emission_ns(self) -> int: ...
    @property
    def tau_ns(self) -> int: ...
    def status(self, tat_ns: int, now_ns: int) -> dict[str, Any]:
        """The bucket whose TAT is ``tat_ns`` at ``now_ns``: ``limit``, ``used``,
        ``remaining``, ``window_seconds``, ``reset_after``."""
    def refusal(self, scope: str, retry_ns: int, reset_ns: int) -> Refusal:
        """The refusal by the bucket of ``scope`` (``per_key``, ``global``, ``tool``,
        ``loop``)."""
    def remaining(self, ahead_ns: int) -> int:
        """Calls of cost 1 a bucket admits when its TAT is ``ahead_ns`` ahead of now."""

@final
class Verdict:
    """The decision on one call (:meth:`Limiter.call`, or the Redis limiter's ``call``):
    refused (``refusal``), or admitted, perhaps with a shadow rule's would-be refusal
    (``shadow``), and the tightest enforced bucket's ``remaining`` / ``reset_after`` /
    ``limit`` for the agent's budget."""

    def __new__(
        cls,
        refusal: Refusal | None = None,
        shadow: Refusal | None = None,
        remaining: int | None = None,
        reset_after: float = 0.0,
        limit: str | None = None,
        args_hash: str | None = None,
    ) -> Verdict: ...
    @property
    def refusal(self) -> Refusal | None:
        """The enforced refusal: the call is refused (``None``: admitted)."""
    @property
    def shadow(self) -> Refusal | None:
        """On an admitted call, the shadow rule that would have refused it."""
    @property
    def remaining(self) -> int | None:
        """Calls of cost 1 the tightest enforced bucket still admits (``None``: no enforced
        bucket applies, or the call was refused)."""
    @property
    def reset_after(self) -> float:
        """Seconds until that bucket is full again (0.0 if none)."""
    @property
    def limit(self) -> str | None:
        """That bucket's rate, canonical (``"10/minute"``)."""
    @property
    def args_hash(self) -> str | None:
        """The arguments' hash (16 hex digits) when a loop breaker applied."""
    @property
    def settled(self) -> bool:
        """Always ``True``: the decision is final."""
    def budget(self) -> dict[str, Any]:
        """``{"remaining", "reset", "limit"}``: the agent's view of this decision (all
        ``None`` when no enforced bucket applies)."""

#: The most a call may cost (units).
MAX_COST: int

def check_cost(cost: object) -> int:
    """``cost`` as every limiter checks a call's cost (a whole number from 1 to
    :data:`MAX_COST`): the int, or :class:`InvalidArgumentError` /
    :class:`ArgumentTypeError` saying what a cost may be."""

def args_hash(obj: object) -> str:
    """The loop breaker's hash of a call's arguments: 16 lowercase hex digits, the first 8
    bytes of blake3 over the canonical JSON of ``obj`` (keys sorted, no whitespace, UTF-8).
    Never raises: deep nesting and huge values hash as far as the limits allow."""

@final
class Limiter:
    """GCRA token buckets: per key, global, per (key, tool), and the loop breaker's per
    (key, tool, arguments); each rule enforced or in shadow (decides, never refuses)."""

    def __new__(
        cls,
        *,
        per_key: str | None = None,
        global_limit: str | None = None,
        per_key_shadow: bool = False,
        global_shadow: bool = False,
    ) -> Limiter: ...
    def set_tool_rate(self, tool: str, rate: str | None, shadow: bool = False) -> None:
        """Set (``rate``) or clear (``None``) ``tool``'s per-(key, tool) rate."""
    def set_loop_breaker(self, rate: str | None, shadow: bool = True) -> None:
        """The limiter-wide loop breaker (``None``: off; tools with their own keep it)."""
    def set_tool_loop_breaker(self, tool: str, rate: str | None, shadow: bool = True) -> None:
        """``tool``'s own loop breaker in place of the limiter-wide one (``None``: off)."""
    def clear_tool_loop_breaker(self, tool: str) -> None:
        """Drops ``tool``'s own loop breaker: the limiter-wide one applies again."""
    def loop_breaker(self, tool: str) -> tuple[str, bool] | None:
        """The loop breaker that applies to ``tool``: ``(rate, shadow)``, or ``None``."""
    def call(
        self, key: str, tool: str | None = None, cost: int = 1, args: object | None = None
    ) -> Verdict:
        """Decide (and on admission consume) one call of ``cost`` (1 to 1,000,000;
        :class:`InvalidArgumentError` otherwise) by ``key`` to ``tool``; ``args`` feed the
        loop breaker (hashed only when one applies to the tool)."""
    def call_at(
        self, key: str, tool: str | None, cost: int | None, args: object | None, now_ns: int
    ) -> Verdict:
        """``call`` at an explicit time in nanoseconds (tests; one clock per limiter)."""
    def check(self, key: str, tool: str | None = None) -> Refusal | None:
        """Admit (``None``) or refuse (a :class:`Refusal`) one call; a refused call consumes nothing."""
    def set_decisions(self, admitted: object, decision: Callable[[Refusal], object]) -> None:
        """What :meth:`decide` answers: ``admitted`` for an admitted call,
        ``decision(refusal)`` for a refused one. Once per limiter
        (:class:`InvalidArgumentError` the second time)."""
    def decide(self, key_id: str, tool: str | None = None) -> object:
        """``check``, answered with the objects given to :meth:`set_decisions`
        (``RateLimit.check``'s ``ADMITTED`` / ``Decision``)."""
    def check_at(self, key: str, tool: str | None, now_ns: int) -> Refusal | None:
        """``check`` at an explicit time in nanoseconds (tests and simulations; one clock per limiter)."""
    def status(self, key: str) -> dict[str, Any]: ...
    def status_at(self, key: str, now_ns: int) -> dict[str, Any]:
        """``status`` at an explicit time in nanoseconds (see ``check_at``)."""
    def reset(self, key: str) -> None: ...
    def tracked_keys(self) -> list[str]:
        """Keys that have buckets now (seen and not yet evicted as idle), sorted."""

# --- IP policy --------------------------------------------------------------------

@final
class IPMatcher:
    """Allow / deny lists of addresses and CIDRs (deny wins) and trusted proxies."""

    def __new__(
        cls,
        *,
        allow: Sequence[str] | None = None,
        deny: Sequence[str] | None = None,
        trusted_proxies: Sequence[str] | None = None,
    ) -> IPMatcher: ...
    def is_allowed(self, ip: str) -> bool: ...
    def check(self, ip: str) -> str | None:
        """``None`` if allowed, else ``"deny_listed"``, ``"not_allow_listed"`` or ``"unparsable"``."""
    def client_ip(self, peer: str, x_forwarded_for: str | None = None) -> str:
        """The client: an address, or the unparsable peer / forwarded hop itself (cut to 64
        characters), which :meth:`check` refuses as ``"unparsable"``. ``x_forwarded_for``
        is every header line joined with commas, in order."""

# --- keys -------------------------------------------------------------------------

@final
class Identity:
    """A verified key, as the request path sees it."""

    @property
    def key_id(self) -> str: ...
    @property
    def key_name(self) -> str: ...
    @property
    def scopes(self) -> list[str]: ...
    @property
    def metadata(self) -> dict[str, Any]: ...
    @property
    def expires_at(self) -> float | None: ...
    @property
    def credits_shadow(self) -> bool | None:
        """``None``: the key has no credits; else whether they run in shadow."""
    @property
    def attached(self) -> Any:
        """The object attached to this verified token's cache entry (the verifier's
        ``AccessToken``), or ``None``. It leaves the cache with the entry."""
    def attach(self, obj: object) -> Any:
        """Attaches ``obj`` to this entry unless one is attached already; returns the
        attached object (the first attach wins). ``obj`` must not hold the Identity."""

@final
class KeyInfo:
    """A stored key record (never the token or its hash). Times are Unix seconds."""

    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def scopes(self) -> list[str]: ...
    @property
    def metadata(self) -> dict[str, Any]: ...
    @property
    def status(self) -> str: ...
    @property
    def created_at(self) -> float: ...
    @property
    def expires_at(self) -> float | None: ...
    @property
    def last_used_at(self) -> float | None: ...
    @property
    def last_used_ip(self) -> str | None: ...
    @property
    def grace_until(self) -> float | None: ...
    @property
    def rotated_from(self) -> str | None: ...
    @property
    def rotated_to(self) -> str | None: ...
    @property
    def revoked_at(self) -> float | None: ...
    @property
    def credits(self) -> int | None:
        """The store balance now (a top-up due now counted); ``None``: no credits."""
    @property
    def refill(self) -> str | None:
        """``"5000/month"``, ``"100/day"`` or ``None``."""
    @property
    def credits_shadow(self) -> bool: ...
    @property
    def credits_base(self) -> int | None:
        """What "below 10 %" is measured against."""
    @property
    def refilled_at(self) -> float | None:
        """The start of the current refill period (or when the credits were last set)."""
    @property
    def refill_at(self) -> float | None:
        """The next top-up; ``None`` without a refill."""

@final
class CreditLease:
    """A block of credits taken from the store (``KeyManager.lease_credits``)."""

    @property
    def granted(self) -> int: ...
    @property
    def balance_after(self) -> int: ...
    @property
    def refill_at(self) -> float | None:
        """The next top-up, Unix seconds; ``None`` without a refill."""
    @property
    def epoch(self) -> int:
        """The refill period (or ``set``) the lease belongs to."""
    @property
    def base(self) -> int: ...
    @property
    def shadow(self) -> bool: ...

def parse_refill(text: str) -> tuple[int, str]:
    """``"5000/month"`` -> ``(5000, "month")``; ``InvalidKeyInputError`` naming the accepted
    forms (``N/day``, ``N/month``, N from 1 to 2**53) otherwise."""

@final
class VerifyLimits:
    """What an unproven token may cost (a value of 0 disables that budget).

    Failed hash runs per ``failure_window_seconds``: ``max_failures`` per (client address,
    key id) (IPv6 counted per /64), ``key_failure_budget`` per key id across addresses
    (past it, only first tries from networks not failing for that key, at most as many
    again), ``global_failure_budget`` on this server (past it, only first tries from
    networks with no failure at all, at most as many again); a network is an IPv4 address
    or an IPv6 /48. ``unknown_key_budget`` store reads that found no key per client
    network: past it, ids not known to exist are refused before the store is read (ids
    that exist never are). Unknown key ids are remembered for ``unknown_key_ttl_seconds``.
    A verification waits ``verify_wait_seconds`` for a hashing thread before ``busy``.
    Tokens proven on this node are never throttled."""

    def __new__(
        cls,
        *,
        max_failures: int = 10,
        failure_window_seconds: float = 60.0,
        key_failure_budget: int = 100,
        global_failure_budget: int = 600,
        unknown_key_budget: int = 20,
        unknown_key_ttl_seconds: float = 5.0,
        verify_wait_seconds: float = 2.0,
    ) -> VerifyLimits: ...
    @property
    def max_failures(self) -> int: ...
    @property
    def failure_window_seconds(self) -> float: ...
    @property
    def key_failure_budget(self) -> int: ...
    @property
    def global_failure_budget(self) -> int: ...
    @property
    def unknown_key_budget(self) -> int: ...
    @property
    def unknown_key_ttl_seconds(self) -> float: ...
    @property
    def verify_wait_seconds(self) -> float: ...

@final
class KeyManager:
    """Key store + argon2id + verified-token cache. Blocking methods release the GIL.

    Hashing runs only on ``max_concurrent_verifications`` threads of its own (default: the
    number of CPUs), each reusing its argon2 memory."""

    @staticmethod
    def memory(
        *,
        cache_ttl_seconds: float = 60.0,
        cache_capacity: int = 10000,
        touch_interval_seconds: float = 5.0,
        watch_interval_seconds: float = 0.25,
        max_concurrent_verifications: int | None = None,
        limits: VerifyLimits | None = None,
    ) -> KeyManager: ...
    @staticmethod
    def sqlite(
        path: str,
        *,
        cache_ttl_seconds: float = 60.0,
        cache_capacity: int = 10000,
        touch_interval_seconds: float = 5.0,
        watch_interval_seconds: float = 0.25,
        max_concurrent_verifications: int | None = None,
        limits: VerifyLimits | None = None,
    ) -> KeyManager: ...
    @staticmethod
    def external(
        backend: Any,
        *,
        cache_ttl_seconds: float = 60.0,
        cache_capacity: int = 10000,
        touch_interval_seconds: float = 5.0,
        watch_interval_seconds: float = 0.25,
        max_concurrent_verifications: int | None = None,
        limits: VerifyLimits | None = None,
    ) -> KeyManager:
        """A manager over a store implemented in Python (PostgreSQL, Redis).

        ``backend`` has ``insert``, ``get``, ``list``, ``update``, ``rotate``,
        ``touch_many``, ``current_revision`` and ``changed_since`` (records are dicts,
        times Unix milliseconds; see ``fastmcp_guard.keys.backends.KeyBackend``)."""
    def create(
        self,
        name: str,
        *,
        scopes: Sequence[str] | None = None,
        expires_at: float | None = None,
        metadata: dict[str, Any] | None = None,
        allow_past_expiry: bool = False,
        credits: int | None = None,
        refill: str | None = None,
        credits_shadow: bool = False,
    ) -> tuple[KeyInfo, str]:
        """A new key and its token. ``expires_at`` must be in the future unless
        ``allow_past_expiry`` (then the key is created already expired, as 0.2 did)."""
    def set_credits(self, key_id: str, credits: int | None) -> KeyInfo:
        """Set the balance (``None``: remove the credits); a new revision."""
    def add_credits(self, key_id: str, n: int) -> KeyInfo:
        """Add ``n`` (may be negative; the balance stops at 0); a new revision."""
    def lease_credits(self, key_id: str, want: int, now: float) -> CreditLease | None:
        """Take ``min(want, balance)`` atomically after a top-up due at ``now`` (Unix
        seconds); ``None``: the key has no credits. Blocking."""
    def return_credits(self, key_id: str, n: int, epoch: int) -> bool:
        """Give back unspent credits of a lease of ``epoch``. Blocking."""
    def get(self, key_id: str) -> KeyInfo | None: ...
    def list(self, *, include_revoked: bool = False) -> list[KeyInfo]: ...
    def rotate(self, key_id: str, *, grace_seconds: float) -> tuple[KeyInfo, str]: ...
    def revoke(self, key_id: str) -> KeyInfo:
        """Revoke a key, and its predecessors still in their rotation grace period."""
    def revoke_lineage(self, key_id: str) -> tuple[KeyInfo, builtins.list[KeyInfo]]:
        """As :meth:`revoke`; also returns the predecessors revoked with it, nearest first."""
    def verify_cached(self, token: str, client: str | None = None) -> Identity | None:
        """Microsecond path: the cached identity, or ``None`` (not cached or malformed).

        ``client`` (the caller's address) is recorded as ``last_used_ip``."""
    def verify(self, token: str, client: str | None = None) -> Identity:
        """Full path (may run argon2id; releases the GIL). Raises :class:`VerifyError`."""
    def flush(self) -> None: ...
    def invalidate(self, key_id: str) -> None:
        """Drop the cached verifications of one key (a store's change notification)."""
    def clear_cache(self) -> None:
        """Drop every cached verification."""
    def sync_changes(self) -> int:
        """Read what other processes changed now; drop their keys from the cache."""
    def close(self) -> None: ...
    def stats(self) -> dict[str, int]: ...

# --- audit ------------------------------------------------------------------------

@final
class AuditWriter:
    """Bounded queue + one background thread writing batches to a list of
    :class:`AuditSink`: ``AuditWriter(path)`` is a writer over one JSONL file,
    ``AuditWriter.sqlite(path)`` over one SQLite database (one transaction per batch),
    ``AuditWriter.of_sinks([...])`` over several (each keeps its own counters; one failing
    sink does not stop the others) or none (only the observers see the events).

    JSONL options: ``rotate_bytes`` / ``rotate_daily`` rename the live file to
    ``<stem>-<UTC yyyymmddTHHMMSSmmm><ext>`` and start a new one (``retention``: rotated
    files kept); ``chain`` (default on) ends every line with ``"id"`` and the hash
    ``"chain"`` (keyed BLAKE3 with ``chain_key``). Both kinds: ``redact`` patterns over
    the key paths of ``input_args`` / ``metadata``; ``on_full="block"`` waits up to
    ``block_ms`` (GIL released) for queue room instead of dropping. Lost events are
    reported on the ``fastmcp_guard.audit`` logger at most once per
    ``loss_warning_interval_ms``, and once more at ``close``.
    """

    def __new__(
        cls,
        path: str | os.PathLike[str],
        *,
        queue_capacity: int = 65536,
        batch_max: int = 4096,
        flush_interval_ms: int = 100,
        rotate_bytes: int | None = None,
        rotate_daily: bool = False,
        retention: int | None = None,
        chain: bool = True,
        chain_key: bytes | str | None = None,
        redact: Sequence[str] | None = None,
        on_full: Literal["drop", "block"] = "drop",
        block_ms: int = 1000,
        loss_warning_interval_ms: int = 10000,
        log_inputs: bool = True,
        log_outputs: bool = True,
        output_preview_chars: int = ...,
        refusal_burst: int = 5,
        refusal_interval_ms: int = 60000,
        refusal_max_groups: int = 1024,
        refusal_max_lines: int = 1000,
    ) -> AuditWriter: ...
    @staticmethod
    def sqlite(
        path: str | os.PathLike[str],
        *,
        queue_capacity: int = 65536,
        batch_max: int = 4096,
        flush_interval_ms: int = 100,
        redact: Sequence[str] | None = None,
        on_full: Literal["drop", "block"] = "drop",
        block_ms: int = 1000,
        loss_warning_interval_ms: int = 10000,
        retention_days: float | None = None,
        log_inputs: bool = True,
        log_outputs: bool = True,
        output_preview_chars: int = ...,
        refusal_burst: int = 5,
        refusal_interval_ms: int = 60000,
        refusal_max_groups: int = 1024,
        refusal_max_lines: int = 1000,
    ) -> AuditWriter:
        """Open (create, migrate; a fastmcp-guard 0.2 file is taken over) the SQLite
        audit database at ``path``. Raises :class:`AuditWriteError` naming the path.
        ``retention_days``: delete older rows at open and about once a minute."""
    @staticmethod
    def of_sinks(
        sinks: Sequence[AuditSink],
        *,
        queue_capacity: int = 65536,
        batch_max: int = 4096,
        flush_interval_ms: int = 100,
        redact: Sequence[str] | None = None,
        on_full: Literal["drop", "block"] = "drop",
        block_ms: int = 1000,
        loss_warning_interval_ms: int = 10000,
        log_inputs: bool = True,
        log_outputs: bool = True,
        output_preview_chars: int = 200,
        refusal_burst: int = 5,
        refusal_interval_ms: int = 60000,
        refusal_max_groups: int = 1024,
        refusal_max_lines: int = 1000,
    ) -> AuditWriter:
        """A writer over ``sinks`` (each can belong to one writer only:
        :class:`InvalidArgumentError` otherwise), or over none."""
    @property
    def sinks(self) -> list[AuditSink]: ...
    @property
    def path(self) -> str:
        """The first sink's path (``""`` without a sink)."""
    @property
    def kind(self) -> str:
        """The first sink's kind: ``"jsonl"`` or ``"sqlite"`` (``"none"`` without one)."""
    def log(
        self,
        status: str,
        key_id: str | None = None,
        key_name: str | None = None,
        tool: str | None = None,
        scopes: list[str] | tuple[str, ...] | None = None,
        duration_ms: float = 0.0,
        error: str | None = None,
        input_args: Any = None,
        output_preview: str | None = None,
        client_ip: str | None = None,
        metadata: Any = None,
        extra: dict[str, Any] | None = None,
    ) -> bool:
        """Enqueue one event for every sink, then call the observers; ``False`` if it was
        dropped (queue full, closed or paused) or an observer returned false. Keyword or
        positional; ``log_inputs=False`` / ``log_outputs=False`` given at construction
        record ``input_args`` / ``output_preview`` as null, and the preview is cut to
        ``output_preview_chars`` characters.

        The call becomes one event here, filled into a reused queue entry: its strings
        copied, ``input_args`` / ``metadata`` / ``extra`` rendered as JSON straight from
        the objects (dict keys in insertion order; values JSON cannot hold recorded as
        their ``repr``). The writer thread renders the line for a JSONL sink and binds the
        fields to columns for a SQLite one. Raises :class:`ArgumentTypeError` for scopes
        that are not a list or tuple of ``str``, :class:`InvalidArgumentError` for an
        unknown status; a ``str`` Python cannot encode (a lone surrogate) is recorded
        with U+FFFD in its place, never raised.

        Every string of the line (values, keys, the error, the tool name) is searched
        for tokens: ``fmg_sk_<id>_<secret>`` is written ``fmg_sk_<id>_***`` (0.2's
        ``fmg_sk_<hex>.<secret>``: ``fmg_sk_<hex>.***``); see :func:`mask_tokens`.
        """
    def log_refusal(
        self,
        status: str,
        *,
        client_ip: str | None,
        reason: str,
        key_id: str | None = None,
        error: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> bool:
        """Log a refusal made before there is an identity, aggregated per (status,
        ``reason``, ``key_id``, client address; IPv6 per /64) and interval of
        ``refusal_interval_ms``: the first ``refusal_burst`` of a group are written as
        usual lines (``reason`` among the extra fields), at most ``refusal_max_lines``
        across all groups per interval; the others are counted, and one summary event per
        group is written when the interval ends, on ``flush`` and on ``close``: the
        group's status, key id and address (none for the overflow groups past
        ``refusal_max_groups``), the first counted refusal's error, and the extra fields
        ``reason``, ``summary`` (true), ``count`` (refusals it stands for), ``since``
        (when the interval started) and ``overflow`` (true, overflow groups only).

        Every string given (``client_ip``, ``reason``, ``key_id``, ``error``, the keys
        and values of ``extra``) is cut at 256 UTF-8 bytes (at a character boundary), in
        the lines, the summaries and what observers see; an ``extra`` value that is not a
        string and renders to more than 256 bytes of JSON is recorded as that JSON text,
        cut. Observers see every refusal. ``False`` only if it was lost (queue full,
        writer closed or paused)."""
    def add_observer(self, observer: Callable[..., object]) -> None:
        """Also call ``observer(*fields)`` for every event after it is queued: the fields
        as ``log`` takes them, positionally, after ``log_inputs`` / ``log_outputs`` / the
        preview length. ``log`` returns false if an observer returns false; an observer's
        exception propagates."""
    def pause(self, reason: str | None) -> None:
        """Refuse new events (counted in ``dropped`` and ``paused_dropped``; ``reason``
        is named in the loss warning) until called with ``None``. Queued events are
        still written; ``healthy()`` is false while paused."""
    def flush(self) -> None:
        """Block until everything logged so far is written to every sink; raises
        :class:`AuditWriteError` if writes failed since the last ``flush`` / ``close``
        (with several sinks, naming the first that failed)."""
    def close(self) -> None:
        """Write what is queued, sync every sink, stop (idempotent); raises as
        ``flush``."""
    def healthy(self) -> bool:
        """Whether an event logged now would be written: open, not paused, room in the
        queue, and every sink healthy (its last batch written, not paused)."""
    def stats(self) -> dict[str, int]:
        """``enqueued`` (summary events included), ``queue_depth``, ``write_errors`` (over
        all sinks), ``refusals_suppressed`` (refusals only counted) and
        ``refusal_summaries``; ``written``, ``failed`` and ``paused_dropped`` summed over
        the sinks (an event written to three sinks counts three times in ``written``);
        ``dropped``: refused by the queue or skipped by a paused sink."""
    def last_error(self) -> str | None: ...

@final
class AuditSink:
    """One backend of an :class:`AuditWriter`, opened at construction (a bad path fails
    here, naming it: :class:`AuditWriteError`). Once given to a writer it reports that
    backend's own counters; ``flush`` / ``close`` act on the whole writer."""

    @staticmethod
    def jsonl(
        path: str | os.PathLike[str],
        *,
        rotate_bytes: int | None = None,
        rotate_daily: bool = False,
        retention: int | None = None,
        chain: bool = True,
        chain_key: bytes | str | None = None,
    ) -> AuditSink: ...
    @staticmethod
    def sqlite(
        path: str | os.PathLike[str], *, retention_days: float | None = None
    ) -> AuditSink: ...
    @property
    def path(self) -> str: ...
    @property
    def kind(self) -> str:
        """``"jsonl"`` or ``"sqlite"``."""
    def stats(self) -> dict[str, int]:
        """``written``, ``failed``, ``write_errors``, ``paused_dropped`` of this backend."""
    def healthy(self) -> bool:
        """The writer's queue is open with room, this backend's last write succeeded
        and it is not paused."""
    def pause(self, reason: str | None) -> None:
        """Skip this backend (events count in ``paused_dropped``; ``reason`` is named in
        the loss warning) until called with ``None``. Applied as batches are written; the
        only sink of its writer pauses the writer too (``log`` then returns false)."""
    def last_error(self) -> str | None: ...
    def flush(self) -> None:
        """Flush the whole writer; raises :class:`AuditWriteError` if writes to this
        backend failed since the last ``flush`` / ``close``."""
    def close(self) -> None:
        """Close the whole writer (idempotent); raises as ``flush``."""

#: Every audit status name, in the core's order.
AUDIT_STATUSES: tuple[str, ...]

@final
class JsonText:
    """Renders a value as the audit line does: compact JSON text; values JSON cannot
    hold as their ``repr``; keys matched by the ``redact`` patterns as ``"[redacted]"``."""

    def __new__(cls, redact: Sequence[str] | None = None) -> JsonText: ...
    def __call__(self, value: Any) -> str: ...

def mask_tokens(text: str) -> str:
    """``text`` with every token-shaped string masked as audit lines are: what follows
    ``fmg_sk_`` (the run of ``[A-Za-z0-9_.-]``) becomes ``<16-character id>_***`` for a
    current token, ``<16 hex>.***`` for a 0.2 token, ``***`` otherwise. ``text`` itself
    when there is nothing to mask."""

def audit_spool_read(
    path: str | os.PathLike[str],
    ino: int,
    offset: int,
    lines: int,
    max_lines: int,
    size: int,
    max_bytes: int,
) -> tuple[bytes, int, str, str, int, int, int, int] | None:
    """One read of an HTTP audit spool file for a batch (the GIL released): the complete
    chained lines from ``offset`` that fit after ``lines`` lines / ``size`` body bytes of
    at most ``max_lines`` / ``max_bytes``. ``None`` if the file is gone or is no longer
    inode ``ino``. Else ``(body, lines, first_id, last_id, consumed, malformed,
    file_size, size)``: ``body`` the lines joined by ``,``."""

def audit_scan(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | IO[bytes] | Any,
    *,
    key: str | None = None,
    tool: str | None = None,
    status: str | None = None,
    since: float | None = None,
    until: float | None = None,
    limit: int | None = None,
    format: Literal["jsonl", "csv"] = "jsonl",
    header: bool = True,
    progress: Callable[[int], bool] | None = None,
) -> dict[str, int]:
    """Filter a JSONL audit log in one streaming pass (GIL released, constant memory).

    Matching lines go to ``out`` (a path, created mode 0600, or a binary stream) as
    JSONL (byte for byte) or CSV. A list of paths is read in order as one log. ``key`` matches ``key_id`` or ``key_name``;
    ``since`` inclusive, ``until`` exclusive (Unix seconds). ``progress(bytes_read)``
    is called about every 8 MiB; returning false stops (``KeyboardInterrupt``).
    Returns ``{"lines", "matched", "malformed", "bytes_read"}``. Raises
    :class:`AuditFileNotFoundError` / :class:`AuditPermissionError` /
    :class:`AuditIsADirectoryError` (:class:`AuditReadError`) for the log,
    :class:`AuditWriteError` when the output file cannot be created or written, what
    ``out.write`` raised (``BrokenPipeError`` when its reader went away),
    :class:`InvalidArgumentError` for a bad status or format or ``since >= until``.
    """

def audit_query(
    path: str,
    *,
    key_id: str | None = None,
    key_name: str | None = None,
    tool: str | None = None,
    status: str | None = None,
    since: float | None = None,
    until: float | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Records of the SQLite audit database at ``path``, newest first (blocking; releases
    the GIL). ``since`` (inclusive) and ``until`` (exclusive) are Unix seconds, compared at
    millisecond precision. Never creates or migrates the file."""

def audit_log_files(path: str | os.PathLike[str]) -> list[str]:
    """Every file of the JSONL audit log at ``path``, oldest first: its rotated files
    (``<stem>-<yyyymmddTHHMMSSmmm><ext>`` beside it), then ``path`` if it exists.
    Raises :class:`AuditReadError` if its directory cannot be listed."""

def audit_verify(
    path_or_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    key: bytes | str | None = None,
) -> dict[str, Any]:
    """Check the hash chain of a JSONL audit log (GIL released).

    ``path_or_paths``: the live file (its rotated files are read first) or a list of
    files in order. ``key``: the chain key the log was written with. Returns ``{"ok",
    "events", "files", "paths", "unchained", "torn", "torn_at_end", "continues_from",
    "last_chain", "broken"}``; ``broken`` is ``None`` or ``{"file", "line", "reason"}``
    for the first line that fails. An incomplete line (a torn write) passes only at the
    end of a file (listed in ``torn_at_end`` as ``"file:line"``) or right before the
    restart record acknowledging it. Raises :class:`AuditFileNotFoundError` /
    :class:`AuditPermissionError` (:class:`AuditReadError`) for a file.
    """

# --- usage ------------------------------------------------------------------------

#: A usage row: ``(day, key_id, tool, calls, errors, cost, duration_ms, refusals)``;
#: ``day`` in days since 1970-01-01 (UTC), ``refusals`` kind -> count.
_UsageRow: TypeAlias = tuple[int, str, str, int, int, int, float, dict[str, int]]

@final
class UsageBook:
    """Usage per key x tool x UTC day, aggregated in memory until drained (the hot path
    of ``Usage``). At most ``max_rows`` rows are held; records needing a new row beyond
    that are counted in the day's ``*other*`` / ``*other*`` row (see ``folded``). Key
    ids and tool names are cut to 128 bytes."""

    def __new__(cls, *, max_rows: int = 100000) -> UsageBook: ...
    def record(self, key_id: str, tool: str, kind: str, cost: int, duration_ms: float) -> None:
        """Record one call on the current UTC day: ``kind`` ``ok`` / ``error`` (counted in
        calls, with its cost and duration) or a refusal kind (``rate_limited``,
        ``would_refuse``...: 1-32 chars ``a-z0-9_``; counted in refusals, cost and duration
        ignored). Raises ``InvalidArgumentError`` for a bad kind or a negative cost."""
    def record_at(
        self, key_id: str, tool: str, kind: str, cost: int, duration_ms: float, day: int
    ) -> None:
        """:meth:`record` on ``day`` (days since 1970-01-01)."""
    def drain(self) -> list[_UsageRow]:
        """Every held row, removed from the book, sorted by (day, key, tool)."""
    def snapshot(self) -> list[_UsageRow]:
        """A copy of every held row, sorted by (day, key, tool)."""
    def restore(self, rows: Sequence[_UsageRow]) -> None:
        """Put drained rows back (a failed flush), merged with newer records."""
    def pending(self) -> int:
        """Rows held."""
    def today(self) -> int:
        """The current UTC day (or the one fixed by :meth:`set_day`)."""
    def set_day(self, day: int | None) -> None:
        """Fix the day :meth:`record` uses (tests); ``None``: the clock again."""
    @property
    def folded(self) -> int:
        """Records counted in an ``*other*`` row because the book was full."""
    @property
    def max_rows(self) -> int: ...
