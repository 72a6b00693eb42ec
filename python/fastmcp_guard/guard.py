"""``Guard(mcp, ...)``: wires keys, limits, IP policy and the audit log into FastMCP."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal

import anyio.to_thread
from fastmcp.server.providers import Provider
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser

from fastmcp_guard._core import Identity, VerifyError
from fastmcp_guard._util import os_user
from fastmcp_guard.audit import AuditLog
from fastmcp_guard.budget import install_usage_resource
from fastmcp_guard.config import GuardConfig
from fastmcp_guard.errors import ConfigError, GuardError
from fastmcp_guard.http import mask_server_logs
from fastmcp_guard.ip import IPPolicy
from fastmcp_guard.keys import KeyStore
from fastmcp_guard.keys.credits import CREDITS_CLAIM, DEFAULT_LEASE_MAX, MAX_CREDITS, CreditBook
from fastmcp_guard.keys.verifier import GuardTokenVerifier, access_token_for
from fastmcp_guard.metrics import GuardMetrics
from fastmcp_guard.middleware import Caller, GuardMiddleware
from fastmcp_guard.rate import RateLimit
from fastmcp_guard.usage import Usage

if TYPE_CHECKING:
    from fastmcp import FastMCP
    from fastmcp.server.auth import AccessToken

__all__ = ["ENV_KEY", "Guard"]

_log = logging.getLogger("fastmcp_guard")

#: Refusal reasons where the claimed key id names no key (not recorded as the key id).
_NO_SUCH_KEY = frozenset({"unknown_key", "malformed"})

#: Environment variable holding the key that identifies stdio / in-process callers.
ENV_KEY = "FASTMCP_GUARD_KEY"


class Guard:
    """The production operations layer for one FastMCP server.

    Installs, through FastMCP's own hooks:

    - a ``TokenVerifier`` as ``mcp.auth`` (Bearer ``fmg_sk_...`` keys, or
      ``X-API-Key``), whose ASGI layer applies the IP policy before any token work;
    - a ``Middleware`` that applies rate limits and writes one audit event per call.

    Key scopes become ``AccessToken.scopes``, so FastMCP's
    ``require_scopes("...")`` works on tools unchanged.

    Each of ``keys``, ``rate_limit``, ``audit`` and ``ip`` given here is used as is;
    the others come from the configuration (:mod:`fastmcp_guard.config`): the
    ``FASTMCP_GUARD_*`` environment, then ``fastmcp-guard.toml`` or ``[tool.fastmcp-guard]``
    in ``./pyproject.toml``, then the library defaults below.

    Args:
        mcp: the server to protect.
        keys: key store (default: in memory; use ``KeyStore("sqlite", path=...)``).
        rate_limit: per-key and global limits (default: none; ``@rate_limit`` on a
            tool still applies).
        audit: audit log (default: none).
        ip: IP allow / deny policy (default: everyone).
        manage_auth: ``None`` (default): install the key verifier; if the server
            already has an auth provider, ``fmg_sk_`` tokens go to the guard and
            all other tokens to that provider. ``True``: the guard's verifier
            only, replacing any provider. ``False``: the guard verifies no token;
            every one goes to the server's provider, whose decisions stand, and
            limits and audit apply to the identity it gives. ``mcp.auth`` is then
            wrapped only to put the guard's HTTP layer (IP policy, refusal audit) in
            front of it; with no provider at all, the IP policy is applied to every
            MCP request by the guard's middleware instead.
        config: the configuration the missing objects are built from (default:
            ``GuardConfig.load(profile="library")``, read only if something is missing).
        metrics: count decisions, refusals and the guard's own overhead, served in the
            Prometheus format at ``GET /metrics`` over HTTP (``True``, or a
            :class:`~fastmcp_guard.metrics.GuardMetrics` to choose the path). Off by
            default. See :mod:`fastmcp_guard.metrics`.
        admin_routes: serve the admin routes ``/_guard/rate`` over HTTP (live
            limiter status and reset, for ``fastmcp-guard rate``); they require a key
            with the ``guard:admin`` scope. See :mod:`fastmcp_guard.admin`.
        budget_meta: put the caller's remaining budget (tightest limit, credits) in every
            result's ``_meta["fastmcp-guard/budget"]`` (default: the ``budget_meta``
            setting when the configuration is read, else on). See
            :mod:`fastmcp_guard.budget`.
        credits_mode: ``"enforce"`` or ``"shadow"`` (running out is audited
            ``would_refuse``, never refused) for every key with credits (default: the
            ``credits_mode`` setting when the configuration is read, else enforce).
        usage: count calls, cost units, refusals and duration per key, tool and UTC day
            in the key store's database (default on; ``guard.usage.query(...)``,
            ``fastmcp-guard usage``), and serve the caller's own as ``guard://usage``.

    On stdio there are no headers: the key in ``FASTMCP_GUARD_KEY`` (if set) is
    verified here, at start-up, and every call is attributed to it (and limited
    and audited as it). Without it, stdio calls are attributed to
    ``local:<os user>`` with no scopes. FastMCP itself does not apply
    ``require_scopes`` on stdio.
    """

    def __init__(
        self,
        mcp: FastMCP[Any],
        keys: KeyStore | None = None,
        rate_limit: RateLimit | None = None,
        audit: AuditLog | None = None,
        ip: IPPolicy | None = None,
        manage_auth: bool | None = None,
        *,
        config: GuardConfig | None = None,
        admin_routes: bool = True,
        metrics: bool | GuardMetrics = False,
        budget_meta: bool | None = None,
        usage: bool = True,
        credits_mode: Literal["enforce", "shadow"] | None = None,
    ) -> None:
        for name, value, cls in (
            ("keys", keys, KeyStore),
            ("rate_limit", rate_limit, RateLimit),
            ("audit", audit, AuditLog),
            ("ip", ip, IPPolicy),
        ):
            if value is not None and not isinstance(value, cls):
                raise ConfigError(
                    f"Guard({name}=...) takes a {cls.__name__}, got {type(value).__name__}"
                )
        if config is not None and not isinstance(config, GuardConfig):
            raise ConfigError(f"Guard(config=...) takes a GuardConfig, got {type(config).__name__}")
        if config is None and any(v is None for v in (keys, rate_limit, audit, ip)):
            config = GuardConfig.load(profile="library")
        #: The configuration missing objects were built from (``None`` if all were given).
        self.config = config
        if config is not None:
            rate_limit = rate_limit if rate_limit is not None else config.rate_limit()
            ip = ip if ip is not None else config.ip_policy()
            built_audit = audit is None
            if built_audit:
                audit = config.audit_log()
            if keys is None:
                try:
                    keys = config.key_store()
                except BaseException:
                    if built_audit and audit is not None:
                        audit.close()  # built here: do not leave its writer running
                    raise
        self.mcp = mcp
        self.keys = keys if keys is not None else KeyStore(backend="memory")
        self.rate_limit = rate_limit if rate_limit is not None else RateLimit()
        self.audit = audit
        #: The guard's metrics (``None`` unless ``metrics=`` was given).
        self.metrics: GuardMetrics | None = None
        if metrics:
            self.metrics = metrics if isinstance(metrics, GuardMetrics) else GuardMetrics()
            if audit is None:
                # Metrics without an audit log: events reach the metrics only, and tool
                # arguments and results are not collected.
                self.audit = audit = AuditLog(
                    backend=[], observers=[self.metrics], log_inputs=False, log_outputs=False
                )
            else:
                audit.add_observer(self.metrics)
        self.ip = ip
        self.keys.audit = audit
        #: Whether tool results carry the caller's budget in ``_meta``.
        self.budget_meta: bool = (
            budget_meta if budget_meta is not None else config is None or config.budget_meta
        )
        #: This process's credit leases (keys with credits spend from them).
        if credits_mode is None:
            credits_mode = config.credits_mode if config is not None else "enforce"
        elif credits_mode not in ("enforce", "shadow"):
            raise ConfigError(
                f"Guard(credits_mode=...) must be 'enforce' or 'shadow', got {credits_mode!r}"
            )
        self.credits: CreditBook | None = CreditBook(
            self.keys, shadow=credits_mode == "shadow",
            # A memory store lives and dies with this process: nothing to share, nothing a
            # crash could strand, so a lease may take any part of the balance (1/16 at a time).
            lease_max=MAX_CREDITS if self.keys.backend == "memory" else DEFAULT_LEASE_MAX,
        )
        #: Usage per key, tool and UTC day (``None`` with ``usage=False``).
        self.usage: Usage | None = Usage.for_store(self.keys) if usage else None
        self.verifier: GuardTokenVerifier | None = None
        #: The path of the local admin socket ``fastmcp-guard run`` serves the admin routes
        #: on (``None``: none). Requests over it are admitted to ``/_guard/`` without a key:
        #: the socket's file mode is the credential (see :mod:`fastmcp_guard.admin`).
        self.admin_socket: str | None = None

        self._local_token = os.environ.get(ENV_KEY) or None
        #: The local key's Caller and the AccessToken it was built from (the one attached to
        #: the core's cache entry: a new entry, after a change to the key, has another).
        self._local_cached: tuple[Any, Caller] | None = None
        self._local_name = f"local:{os_user()}"
        if self._local_token is not None:
            try:
                self.keys.core.verify(self._local_token, None)
            except VerifyError as exc:
                raise GuardError(
                    f"the key in {ENV_KEY} was refused ({exc.reason}); issue a valid key "
                    f"or unset {ENV_KEY}"
                ) from None

        # The guard's HTTP layer (IP policy, X-API-Key, refusal audit, 429 / 503) reaches
        # FastMCP's app through the auth provider's middleware, so the guard installs a
        # verifier in every case where there is a provider: its own (manage_auth None /
        # True) or a wrapper that leaves every token to the server's provider (False).
        # With no provider and manage_auth=False the guard's FastMCP middleware applies
        # the IP policy to every MCP request instead, and its own routes carry the layer.
        existing = mcp.auth
        #: Verifies guard keys for the guard's own routes (admin, metrics), whatever
        #: ``mcp.auth`` is.
        self._keys_verifier = GuardTokenVerifier(self)
        if manage_auth is False:
            if existing is not None:
                self.verifier = GuardTokenVerifier(self, fallback=existing, own_keys=False)
        elif existing is None or manage_auth:
            self.verifier = self._keys_verifier
        else:
            self.verifier = GuardTokenVerifier(self, fallback=existing)
        if self.verifier is not None:
            mcp.auth = self.verifier
        mask_server_logs()
        self.middleware = GuardMiddleware(self)
        if admin_routes:
            from fastmcp_guard.admin import install_admin_routes

            install_admin_routes(self)
        if self.metrics is not None:
            _install_metrics(self, self.metrics)
        if self.usage is not None:
            install_usage_resource(self)
        # First in the chain: limits and audit see every call, other middleware's
        # refusals included, and the stdio identity is in place before any check runs.
        mcp.middleware.insert(0, self.middleware)
        # Flushes the audit log when the server's lifespan ends: an in-process
        # ``Client(mcp)`` session closing (0.2 wrote each line before answering, and its
        # users read the file right after), or an HTTP server stopping. FastMCP asks
        # every provider on each call (two more tasks: about 2% of a call's CPU over
        # HTTP, by callgrind), so only a log that writes somewhere gets one.
        if (self.audit is not None and self.audit.backends) or self.keys.backend != "memory":
            mcp.add_provider(_LifespanFlush(self))

    # -- used by the middleware, the HTTP layer and the guard's routes -----------------

    @property
    def has_local_key(self) -> bool:
        """Whether stdio and in-process callers run as the key in ``FASTMCP_GUARD_KEY``
        (else as ``local:<os user>``, with no scopes)."""
        return self._local_token is not None

    async def local_caller(self) -> Caller:
        """The caller on a transport without HTTP (stdio, in-process): the key in
        ``FASTMCP_GUARD_KEY``, verified again (from the cache) on each call, or the local
        OS user. Raises ``ToolError`` (and records ``unauthorized``) once that key is no
        longer valid."""
        token = self._local_token
        if token is None:
            return Caller(rate_key=self._local_name, key_name=self._local_name)
        core = self.keys.core
        ident: Identity | None = core.verify_cached(token)
        if ident is None:
            try:
                ident = await anyio.to_thread.run_sync(core.verify, token, None)
            except VerifyError as exc:
                from fastmcp.exceptions import ToolError

                self.record_event("unauthorized", error=f"{ENV_KEY} refused ({exc.reason})")
                raise ToolError(f"the key in {ENV_KEY} is no longer valid ({exc.reason})") from None
        access = ident.attached or ident.attach(access_token_for(token, ident))
        cached = self._local_cached
        if cached is not None and cached[0] is access:
            return cached[1]  # the same cache entry: same key state (callers never mutate it)
        meta = {k: v for k, v in ident.metadata.items() if k != CREDITS_CLAIM}
        caller = Caller(ident.key_id, ident.key_id, ident.key_name, ident.scopes, meta, None,
                        AuthenticatedUser(access), access.claims.get(CREDITS_CLAIM))  # fmt: skip
        self._local_cached = (access, caller)
        return caller

    def record_event(self, status: str, **fields: Any) -> None:
        """Record one audit event (:meth:`AuditLog.log <fastmcp_guard.AuditLog.log>`'s
        ``status`` and keyword fields); nothing when the guard has no audit log."""
        if self.audit is not None:
            self.audit.log(status, **fields)

    def record_refusal(
        self,
        status: str,
        client_ip: str | None,
        reason: str,
        *,
        key_id: str = "",
        error: str | None = None,
        path: str | None = None,
        rule: str | None = None,
    ) -> None:
        """Record a refusal made before there is an identity (``unauthorized``,
        ``forbidden``, ``ip_denied``; a throttled token as ``rate_limited``, as its 429
        says), attributed to the key id the token claimed when that key exists, so that
        ``audit query --key <id>`` shows the attacks on it. Aggregated per address,
        status, reason and key id by the audit log: a flood costs counts, not disk.
        ``reason`` is the refusal's code (``bad_secret``, ``deny_listed``...), ``error``
        its message, ``rule`` the rule of a ``would_refuse`` (``ip``), ``path`` the request path (the audit core cuts every string of a refusal to 256
        bytes as written, so a 100 KB path costs no more than a short one); nothing is
        recorded when the guard has no audit log."""
        if self.audit is None:
            return
        if reason in _NO_SUCH_KEY:
            key_id = ""  # an id nobody holds: attacker-chosen, it must not split groups
        extra: dict[str, str] | None = None
        if path is not None or rule is not None:
            extra = {"path": path} if path is not None else {}
            if rule is not None:
                extra["rule"] = rule
        self.audit.log_refusal(status, client_ip=client_ip, reason=reason, key_id=key_id,
                               error=error, extra=extra)  # fmt: skip

    async def verify_key(self, token: str) -> AccessToken | None:
        """The access token of a valid guard key, verified by the guard's own verifier
        whatever ``mcp.auth`` is (the guard's routes: admin, metrics); ``None`` otherwise.
        Raises what the verifier raises when it cannot decide (a throttled token, an
        unavailable key store)."""
        return await self._keys_verifier.verify_token(token)

    def http_middleware(self) -> list[Any]:
        """The guard's HTTP layer as Starlette middleware, for an app built by hand
        (``mcp.http_app(middleware=guard.http_middleware())``). The guard's verifier
        already installs it wherever the server has an auth provider; installed twice,
        it runs once. ``fastmcp-guard run`` passes it."""
        from starlette.middleware import Middleware

        from fastmcp_guard.http import GuardASGIMiddleware

        return [Middleware(GuardASGIMiddleware, guard=self)]  # type: ignore[arg-type]

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Return unspent credit leases, flush usage, the audit log and pending key
        updates; stop background threads; close the rate limiter's Redis connections."""
        if self.credits is not None:
            self.credits.close()
        if self.usage is not None:
            self.usage.close()
        if self.audit is not None:
            self.audit.close()
        self.keys.close()
        self.rate_limit.close()

    def __repr__(self) -> str:
        return (
            f"Guard({self.mcp.name!r}, keys={self.keys!r}, rate_limit={self.rate_limit!r}, "
            f"audit={self.audit!r}, ip={self.ip!r})"
        )


class _LifespanFlush(Provider):
    """A provider of no components whose lifespan, when the server's lifespan ends,
    returns unspent credit leases, flushes usage and the audit log; the request path
    never waits on them. Installed only when one of them writes somewhere (FastMCP asks
    every provider on each call)."""

    def __init__(self, guard: Guard) -> None:
        super().__init__()
        self._guard = guard

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            guard = self._guard
            try:
                if guard.credits is not None:
                    await guard.credits.aclose()
                if guard.usage is not None:
                    await anyio.to_thread.run_sync(guard.usage.flush)
            except GuardError as exc:
                _log.warning("usage / credits flush at the end of the server's lifespan: %s", exc)
            audit = guard.audit
            # An unhealthy log reports its failed writes to whoever flushes or closes it
            # next: leave that to its owner rather than turn it into a warning here.
            if audit is not None and audit.healthy():
                try:
                    await anyio.to_thread.run_sync(audit.flush)
                except GuardError as exc:  # counted by the log's own stats as well
                    _log.warning("audit log flush at the end of the server's lifespan: %s", exc)


def _install_metrics(guard: Guard, metrics: GuardMetrics) -> None:
    """Serve ``metrics`` at its path (behind the guard's HTTP layer, to a key with a
    metrics scope or an allowed address) and feed it the audit writer's and key
    manager's counters at scrape time."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    from fastmcp_guard.http import add_route, client_of, verify_bearer
    from fastmcp_guard.metrics import CONTENT_TYPE, METRICS_SCOPES, audit_lines, key_lines

    audit = guard.audit
    if audit is not None and audit.backends:
        metrics.add_source(audit_lines(audit.stats))
    metrics.add_source(key_lines(guard.keys.core.stats))
    wanted = " or ".join(repr(s) for s in sorted(METRICS_SCOPES))

    async def serve_metrics(request: Request) -> Response:
        if not metrics.admits_address(client_of(guard.ip, request.scope)):
            token = await verify_bearer(guard, request.scope)
            if token is None:
                return JSONResponse(
                    {"error": "unauthorized",
                     "error_description": f"a guard key with the {wanted} scope is required"},
                    status_code=401, headers={"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
            if not METRICS_SCOPES.intersection(token.scopes):
                return JSONResponse(
                    {"error": "forbidden", "error_description": f"the key lacks the {wanted} scope"},
                    status_code=403,
                )  # fmt: skip
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    add_route(guard, metrics.path, ["GET"], serve_metrics)
