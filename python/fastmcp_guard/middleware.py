"""The guard's FastMCP middleware: rate limits and the audit event of every call.

It handles the three kinds of call a client makes (``tools/call``,
``resources/read``, ``prompts/get``). The handshake and the listings never
consume a caller's budget. One class covers limits and audit because both need
the caller's identity and the outcome of the same call, and every extra
middleware layer costs FastMCP a dispatch per call: the decisions themselves live
in separate places (the Rust limiter, ``RateLimit``, ``AuditLog``).

Callers are identified by, in order: the access token FastMCP verified (a guard
key, or another verifier's client id), then the client address; on transports
without HTTP (stdio, in-process) by the key in ``FASTMCP_GUARD_KEY`` if one was
given, else as the local user.

On stdio FastMCP applies no ``auth`` check (it trusts its environment). When
``FASTMCP_GUARD_KEY`` gives the caller an identity, every request runs as that key and
is not marked stdio while it runs, so FastMCP applies its own checks to it as over HTTP
(component ``auth``, ``AuthMiddleware`` such as ``restrict_tag``, mounted servers):
hidden from listings, refused when called, audited ``forbidden``. The guard's
middleware is first in the chain, so other middleware's refusals are audited too.

Over HTTP, when the guard's HTTP layer did not run for a request (the server has no
auth provider for it to ride on, see :class:`~fastmcp_guard.Guard`), every MCP request
gets the IP policy here instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from fastmcp import FastMCP
from fastmcp.exceptions import AuthorizationError, NotFoundError
from fastmcp.prompts.base import PromptResult
from fastmcp.resources.base import ResourceResult
from fastmcp.server.auth import AuthContext, run_auth_checks
from fastmcp.server.context import _current_transport, reset_transport, set_transport
from fastmcp.server.dependencies import get_access_token, get_http_request
from fastmcp.server.middleware import Middleware
from fastmcp.tools.base import ToolResult
from mcp import MCPError
from mcp.server.auth.middleware.auth_context import auth_context_var
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp_types import INTERNAL_ERROR, INVALID_REQUEST, TextContent

from fastmcp_guard.budget import (
    ANONYMOUS,
    BUDGET_META_KEY,
    EXTERNAL_IDENTITY,
    USAGE_URI,
    CreditsExhausted,
    budget_meta,
)
from fastmcp_guard.budget import iso as budget_iso
from fastmcp_guard.errors import StoreError
from fastmcp_guard.http import CLIENT_IP_STATE, client_of, refuse_address
from fastmcp_guard.keys.credits import CREDITS_CLAIM, credits_refusal_text
from fastmcp_guard.rate import RateLimitExceeded, loop_refusal_text, tool_rule_of
from fastmcp_guard.usage import OTHER as USAGE_OTHER

if TYPE_CHECKING:
    from fastmcp.server.auth import AccessToken
    from fastmcp.server.middleware import CallNext, MiddlewareContext

    from fastmcp_guard.guard import Guard

__all__ = ["ANONYMOUS", "AUDIT_UNAVAILABLE", "Caller", "GuardMiddleware"]

#: The refusal of a call by a key with credits while the key store cannot be reached.
CREDITS_UNAVAILABLE = "credits cannot be checked right now: the key store is unavailable"
#: Loop reports remembered before expired ones are dropped, and at most.
_LOOPS_PRUNE_AT = 4096
_LOOPS_MAX = 65536
#: Claims of a guard key's access token that are not its metadata.
_NOT_METADATA = frozenset({"key_id", "key_name", CREDITS_CLAIM})

#: The refusal of ``AuditLog(on_failure="fail_closed")`` while the log cannot record.
AUDIT_UNAVAILABLE = (
    "audit log unavailable: the call was refused because it could not be recorded "
    "(on_failure='fail_closed')"
)


@dataclass(slots=True)
class Caller:
    """Who is calling, as the audit log and the limiter see it."""

    rate_key: str
    key_id: str = ""
    key_name: str = ""
    scopes: list[str] = field(default_factory=list)
    metadata: dict[str, Any] | None = None
    client_ip: str | None = None
    #: stdio / in-process only: the FASTMCP_GUARD_KEY identity, exposed to tools
    #: through the SDK's auth context so ``get_access_token()`` sees it.
    sdk_user: AuthenticatedUser | None = None
    #: The key's credits claim (``{"shadow": bool}``) when it has credits, else ``None``.
    credits: dict[str, Any] | None = None

    @property
    def usage_key(self) -> str:
        """Whom usage is counted for: the key id, the local user, or ``(anonymous)`` for
        callers known by their address only (addresses are not usage keys: unbounded, and
        personal)."""
        if self.key_id:
            return self.key_id
        return ANONYMOUS if self.rate_key.startswith("ip:") else self.rate_key


class GuardMiddleware(Middleware):
    """Per-key / global / per-tool limits and one audit event per call."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self._tools_seen: set[str] = set()
        #: (caller, tool, argument hash) -> end of the window its loop was first reported in.
        self._loops_seen: dict[tuple[str, str, str], float] = {}

    # -- the IP policy where the HTTP layer did not run ---------------------------------

    async def on_request(
        self, context: MiddlewareContext[Any], call_next: CallNext[Any, Any]
    ) -> Any:
        guard = self.guard
        try:
            scope = get_http_request().scope
        except RuntimeError:
            # stdio / in-process: no address. With FASTMCP_GUARD_KEY, every request runs
            # as that key, and FastMCP's own checks (component auth, AuthMiddleware,
            # mounted servers, listings) apply to it as over HTTP: FastMCP skips them on
            # stdio, so the request is not marked stdio while it runs.
            if not guard.has_local_key:
                return await call_next(context)
            user = (await guard.local_caller()).sdk_user
            as_user = auth_context_var.set(user)
            on_stdio = _current_transport.get() == "stdio"
            transport = set_transport(cast("Any", None)) if on_stdio else None
            try:
                return await call_next(context)
            finally:
                if transport is not None:
                    reset_transport(transport)
                auth_context_var.reset(as_user)
        ip = guard.ip
        if ip is not None:
            # The IP policy, where the guard's HTTP layer did not run for this request.
            state = scope.get("state")
            if state is None or CLIENT_IP_STATE not in state:
                client_ip = client_of(ip, scope)
                refused = refuse_address(guard, client_ip, scope.get("path"))
                if refused is not None:
                    raise MCPError(INVALID_REQUEST, f"client address not allowed ({refused})")
        return await call_next(context)

    # -- identity ----------------------------------------------------------------------

    async def current_caller(self) -> Caller:
        """The caller of the request being handled (for the guard's own resources)."""
        return await self._caller()

    async def _caller(self) -> Caller:
        try:
            request = get_http_request()
        except RuntimeError:
            return await self.guard.local_caller()
        scope = request.scope
        client_ip = client_of(self.guard.ip, scope)
        user = scope.get("user")
        token = user.access_token if isinstance(user, AuthenticatedUser) else None
        if token is None:
            return Caller(rate_key=f"ip:{client_ip}", client_ip=client_ip)
        claims = getattr(token, "claims", None) or {}
        key_id = token.client_id
        if claims.get("key_id") == key_id:  # a guard key
            meta = {k: v for k, v in claims.items() if k not in _NOT_METADATA}
            return Caller(key_id, key_id, claims.get("key_name", ""), token.scopes, meta,
                          client_ip, None, claims.get(CREDITS_CLAIM))  # fmt: skip
        # Another verifier's identity: limited and audited under its client id.
        return Caller(key_id, key_id, "", token.scopes, dict(EXTERNAL_IDENTITY), client_ip)

    # -- the three guarded calls -------------------------------------------------------

    async def on_call_tool(
        self, context: MiddlewareContext[Any], call_next: CallNext[Any, Any]
    ) -> Any:
        msg = context.message
        name = msg.name
        if name not in self._tools_seen:
            await self._register_tool(context, name)
        return await self._guarded(context, call_next, "tool", name, msg.arguments)

    async def on_read_resource(
        self, context: MiddlewareContext[Any], call_next: CallNext[Any, Any]
    ) -> Any:
        return await self._guarded(context, call_next, "resource", str(context.message.uri), None)

    async def on_get_prompt(
        self, context: MiddlewareContext[Any], call_next: CallNext[Any, Any]
    ) -> Any:
        msg = context.message
        return await self._guarded(context, call_next, "prompt", msg.name, msg.arguments)

    async def _register_tool(self, context: MiddlewareContext[Any], name: str) -> None:
        """Read a tool's ``@rate_limit`` and ``@cost`` once and hand them to the limiter."""
        fctx = context.fastmcp_context
        if fctx is not None:
            try:
                tool = await fctx.fastmcp.get_tool(name)
            except Exception:  # noqa: BLE001 - unknown/hidden tool: FastMCP reports it
                return
            if tool is None:
                return  # not visible to this caller; try again on a later call
            self.guard.rate_limit.register_tool(name, tool_rule_of(tool))
        self._tools_seen.add(name)

    async def _guarded(
        self,
        context: MiddlewareContext[Any],
        call_next: CallNext[Any, Any],
        kind: str,
        target: str,
        arguments: Any,
    ) -> Any:
        guard = self.guard
        metrics = guard.metrics
        entered = time.perf_counter() if metrics is not None else 0.0
        tool = target if kind == "tool" else None
        caller = await self._caller()
        audit = guard.audit
        if metrics is not None and context.fastmcp_context is not None:
            await metrics.labels.learn(context.fastmcp_context.fastmcp, target)
        if audit is not None and audit.fail_closed and not audit.healthy():
            # Recorded if it can be: that attempt is also what notices a recovered sink.
            audit.log(
                "error", key_id=caller.key_id, key_name=caller.key_name, tool=target,
                scopes=caller.scopes, error=AUDIT_UNAVAILABLE, input_args=arguments,
                client_ip=caller.client_ip, metadata=caller.metadata,
            )  # fmt: skip
            raise MCPError(INTERNAL_ERROR, AUDIT_UNAVAILABLE)
        rate = guard.rate_limit  # always set: Guard supplies RateLimit() when none is given
        cost = rate.costs.get(target, 1) if tool is not None and rate.costs else 1
        usage = guard.usage
        # Credits first: if a limit then refuses, the units go back to this process's
        # lease (a refusal consumes nothing), which a rate bucket could not do.
        book = guard.credits
        paid = False
        epoch = 0  # the credits period the call was paid in (a refund must match it)
        if book is not None and caller.credits is not None and target != USAGE_URI:
            # (Reading one's own budget, guard://usage, costs no credits; limits apply.)
            if book.spend(caller.key_id, cost) is None:
                paid, epoch = True, book.epoch(caller.key_id)
            else:
                try:
                    outcome = await book.acquire(caller.key_id, cost)
                except StoreError as exc:
                    # Fail closed: a call that cannot be paid for is not run.
                    text = (f"{CREDITS_UNAVAILABLE} ({exc}); retry in a few seconds")
                    if audit is not None:
                        audit.log("error", key_id=caller.key_id, key_name=caller.key_name,
                                  tool=target, scopes=caller.scopes, error=text,
                                  input_args=arguments, client_ip=caller.client_ip,
                                  metadata=caller.metadata)  # fmt: skip
                    raise MCPError(INTERNAL_ERROR, text) from None
                if outcome.paid:
                    paid, epoch = True, book.epoch(caller.key_id)
                    if outcome.event is not None:  # fell below 10 %
                        self._budget_event(caller, target, outcome)
                else:
                    # The first refusal of a period carries the budget event's mark.
                    marks: dict[str, Any] = {"credits": outcome.balance,
                                             "refill_at": budget_iso(outcome.refill_at)}  # fmt: skip
                    if outcome.event is not None:
                        marks["budget_event"] = True
                    text = credits_refusal_text(outcome)
                    if outcome.shadow:
                        self._would_refuse(caller, kind, target, arguments, "credits", text,
                                           marks)  # fmt: skip
                    else:
                        spent = CreditsExhausted(text, outcome.balance or 0, outcome.refill_at)
                        return self._refuse(caller, kind, target, arguments,
                                            "credits_exhausted", spent, marks, cost)  # fmt: skip
        try:
            if rate.is_local:
                verdict = rate.call(caller.rate_key, tool, cost, arguments)
            else:
                verdict = await rate.call_async(caller.rate_key, tool, cost, arguments)
        except BaseException:  # cancelled (the client left) or failed: nothing was spent
            if paid:
                book.refund(caller.key_id, cost, epoch)  # type: ignore[union-attr]
            raise
        refusal = verdict.refusal
        if refusal is not None:
            if paid:
                book.refund(caller.key_id, cost, epoch)  # type: ignore[union-attr]
            limited = RateLimitExceeded(refusal, tool, cost)
            status = "loop_detected" if refusal.scope == "loop" else "rate_limited"
            extra: dict[str, Any] = {"retry_after": limited.data["retry_after"],
                                     "limit": limited.limit}  # fmt: skip
            if refusal.scope == "loop":
                extra["args_hash"] = verdict.args_hash
                if self._first_loop(caller, target, verdict.args_hash, refusal.window_seconds):
                    extra["budget_event"] = True
            return self._refuse(caller, kind, target, arguments, status, limited, extra, cost)
        if verdict.shadow is not None:
            shadow = verdict.shadow
            shown: dict[str, Any]
            if shadow.scope == "loop":
                text = loop_refusal_text(shadow, tool)
                shown = {"limit": shadow.limit, "args_hash": verdict.args_hash}
                if self._first_loop(caller, target, verdict.args_hash, shadow.window_seconds):
                    shown["budget_event"] = True
            else:
                text = str(RateLimitExceeded(shadow, tool, cost))
                shown = {"limit": shadow.limit, "retry_after": round(shadow.retry_after, 3)}
            self._would_refuse(caller, kind, target, arguments, shadow.scope, text, shown)
        if audit is None and usage is None:
            try:
                answer = await call_next(context)
            except (AuthorizationError, NotFoundError):
                if paid:  # refused further down the chain: the call never ran
                    book.refund(caller.key_id, cost, epoch)  # type: ignore[union-attr]
                raise
            if guard.budget_meta and isinstance(answer, _WITH_META):
                _set_meta(answer, budget_meta(guard, caller, verdict))
            return answer

        start = time.perf_counter()
        finished = 0.0
        status = "ok"
        error: str | None = None
        result: Any = None
        counted = target  # the name usage counts the call under
        try:
            result = await call_next(context)
            if getattr(result, "is_error", False):
                status, error = "error", _preview(result, 1000)
            if guard.budget_meta and isinstance(result, _WITH_META):
                _set_meta(result, budget_meta(guard, caller, verdict))
            return result
        except AuthorizationError as exc:
            status, error = "forbidden", str(exc)
            if paid:  # refused further down the chain: the call never ran
                book.refund(caller.key_id, cost, epoch)  # type: ignore[union-attr]
            raise
        except NotFoundError as exc:
            # FastMCP answers "Unknown tool / resource / prompt" for a component the
            # caller's scopes hide, so as not to reveal it; the audit log says what
            # really happened.
            hidden = await _hidden_by_auth(context, kind, target)
            status, error = ("forbidden" if hidden else "error"), str(exc)
            if paid:
                book.refund(caller.key_id, cost, epoch)  # type: ignore[union-attr]
            if not hidden:
                counted = USAGE_OTHER  # a name the server does not serve: not a usage row
            raise
        except Exception as exc:
            status, error = "error", str(exc) or type(exc).__name__
            raise
        finally:
            finished = time.perf_counter()
            duration_ms = (finished - start) * 1000.0
            if audit is not None:
                # Positional: AuditLog.log's order, the cheapest call into the core.
                audit.log(
                    status, caller.key_id, caller.key_name, target, caller.scopes,
                    duration_ms, error, arguments,
                    _preview(result, audit.output_preview_chars)
                    if audit.log_outputs and status == "ok" else None,
                    caller.client_ip, caller.metadata,
                )  # fmt: skip
            if usage is not None:
                usage.record(caller.usage_key, counted, status, cost, duration_ms)
            if metrics is not None:
                # Before the tool (identity, limits) plus after it (the audit enqueue).
                metrics.observe_overhead((start - entered) + (time.perf_counter() - finished))

    # -- refusals and budget events ----------------------------------------------------

    def _refuse(
        self,
        caller: Caller,
        kind: str,
        target: str,
        arguments: Any,
        status: str,
        exc: RateLimitExceeded | CreditsExhausted,
        extra: dict[str, Any],
        cost: int,
    ) -> ToolResult:
        """Record a refused call and answer it: a tool error result (``refusal="tool"``)
        or a protocol error (raised)."""
        guard = self.guard
        audit = guard.audit
        if audit is not None:
            audit.log(
                status, key_id=caller.key_id, key_name=caller.key_name, tool=target,
                scopes=caller.scopes, error=str(exc), input_args=arguments,
                client_ip=caller.client_ip, metadata=caller.metadata, extra=extra,
            )  # fmt: skip
        if guard.usage is not None:
            guard.usage.record(caller.usage_key, self._usage_name(kind, target), status, cost,
                               0.0)  # fmt: skip
        rate = guard.rate_limit
        if kind == "tool" and rate.refusal == "tool":
            return ToolResult(
                content=[TextContent(type="text", text=str(exc))],
                structured_content=exc.data,
                is_error=True,
            )
        if isinstance(exc, CreditsExhausted):
            raise exc.as_mcp_error()
        raise exc.as_mcp_error(rate.refusal_code)

    def _would_refuse(
        self, caller: Caller, kind: str, target: str, arguments: Any, rule: str, text: str,
        extra: dict[str, Any],
    ) -> None:  # fmt: skip
        """Record what a rule in shadow mode would have refused (the call goes on)."""
        guard = self.guard
        if guard.audit is not None:
            guard.audit.log(
                "would_refuse", key_id=caller.key_id, key_name=caller.key_name, tool=target,
                scopes=caller.scopes, error=text, input_args=arguments,
                client_ip=caller.client_ip, metadata=caller.metadata,
                extra={"rule": rule, **extra},
            )  # fmt: skip
        if guard.usage is not None:
            guard.usage.record(caller.usage_key, self._usage_name(kind, target),
                               "would_refuse", 1, 0.0)  # fmt: skip

    def _budget_event(self, caller: Caller, target: str, outcome: Any) -> None:
        """Record a key's budget event on a paid call (``credits_low``: its credits fell
        below 10 % of their base): once per process and period, marked ``budget_event``,
        delivered like every event (the HTTP backend signs it: the webhook). The first
        refusal of a period, ``credits_exhausted``, carries the mark itself."""
        audit = self.guard.audit
        if audit is None:
            return
        audit.log(
            outcome.event, key_id=caller.key_id, key_name=caller.key_name, tool=target,
            scopes=caller.scopes, client_ip=caller.client_ip, metadata=caller.metadata,
            extra={"credits": outcome.balance, "refill_at": budget_iso(outcome.refill_at),
                   "budget_event": True},
        )  # fmt: skip


    def _usage_name(self, kind: str, target: str) -> str:
        """The name a refused call is counted under: a tool the server serves (seen by
        ``_register_tool``), else ``*other*`` (a flood of made-up names must not become
        usage rows). Resources and prompts keep their names (tools only are checked)."""
        if kind != "tool" or target in self._tools_seen:
            return target
        return USAGE_OTHER

    def _first_loop(self, caller: Caller, target: str, args_hash: str | None,
                    window: float) -> bool:  # fmt: skip
        """True the first time in a window that ``caller`` trips the loop breaker on this
        call (the event that carries the ``budget_event`` mark). Bounded: expired entries
        go at 4,096; past 65,536 live ones (a flood of distinct loops) it starts afresh,
        which can only mark a loop twice."""
        seen = self._loops_seen
        now = time.monotonic()
        key = (caller.rate_key, target, args_hash or "")
        until = seen.get(key)
        if until is not None and until > now:
            return False
        if len(seen) >= _LOOPS_PRUNE_AT:
            for old in [k for k, v in seen.items() if v <= now]:
                del seen[old]
            if len(seen) >= _LOOPS_MAX:
                seen.clear()
        seen[key] = now + window
        return True


#: The results that carry ``_meta``: tools', resources' and prompts'.
_WITH_META = (ToolResult, ResourceResult, PromptResult)


def _set_meta(result: ToolResult | ResourceResult | PromptResult, budget: dict[str, Any]) -> None:
    """Put the caller's budget in a tool result's ``_meta`` (keeping the tool's own).

    Written to the model's ``__dict__`` (and its set fields) directly: pydantic's
    ``__setattr__`` costs three times as much on every call, for a field it does not
    validate on assignment anyway."""
    meta = result.meta
    result.__dict__["meta"] = (
        {BUDGET_META_KEY: budget} if meta is None else {**meta, BUDGET_META_KEY: budget}
    )
    result.__pydantic_fields_set__.add("meta")


async def _component(context: MiddlewareContext[Any], kind: str, target: str) -> Any:
    """The tool, prompt, resource or resource template a call names, found without any
    caller's auth filter (FastMCP's own lookups hide what the caller may not see)."""
    fctx = context.fastmcp_context
    if fctx is None:
        return None
    # The provider-level lists, with the server's transforms and without its auth filter
    # (FastMCP overrides the public list methods to filter them, and the get methods
    # reach its filtered lookups).
    base = super(FastMCP, fctx.fastmcp)
    if kind == "tool":
        return next((t for t in await base.list_tools() if t.name == target), None)
    if kind == "prompt":
        return next((p for p in await base.list_prompts() if p.name == target), None)
    for resource in await base.list_resources():
        if str(resource.uri) == target:
            return resource
    for template in await base.list_resource_templates():
        if template.matches(target) is not None:
            return template
    return None


async def _refused_by_auth(component: Any, token: AccessToken | None) -> bool:
    """True if ``component`` has ``auth`` checks and they refuse ``token``."""
    if getattr(component, "auth", None) is None:
        return False
    try:
        return not await run_auth_checks(
            component.auth, AuthContext(token=token, component=component)
        )
    except AuthorizationError:
        return True


async def _hidden_by_auth(context: MiddlewareContext[Any], kind: str, target: str) -> bool:
    """True if the component exists but its ``auth`` checks refuse the caller (error path
    only)."""
    try:
        component = await _component(context, kind, target)
        return component is not None and await _refused_by_auth(component, get_access_token())
    except Exception:  # noqa: BLE001 - classification only; the call already failed
        return False


def _preview(result: Any, limit: int) -> str | None:
    """The text of a result's content blocks, cut to ``limit`` characters."""
    content = getattr(result, "content", None)
    if content is None:
        content = getattr(result, "contents", None)
    if content is None:
        return None
    if isinstance(content, (list, tuple)):
        parts = [
            t for b in content if (t := getattr(b, "text", None) or getattr(b, "content", None))
        ]
        text = " ".join(p if isinstance(p, str) else str(p) for p in parts)
    else:
        text = str(content)
    return text[:limit]
