"""The guard's HTTP layer: pure ASGI, in front of FastMCP's own auth middleware.

For every HTTP request it:

1. works out the client (the TCP peer, or, when the peer is a trusted proxy, the
   right-most untrusted hop of every ``X-Forwarded-For`` line) and refuses a denied
   address with 403 *before any token work*, so a denied address costs no hashing;
2. maps ``X-API-Key: <token>`` to ``Authorization: Bearer <token>`` when no
   ``Authorization`` header is present (for clients that cannot set it);
3. records one audit event for each refusal FastMCP answers with 401 / 403, with the
   key id the token claimed and the reason (``bad_secret``, ``unknown_key``...);
4. answers 429 with ``Retry-After`` and the ``RateLimit`` / ``RateLimit-Policy`` fields
   of the IETF draft (:func:`rate_limit_headers`) when the failure throttle stops a token
   (the token may be valid: a 401 would tell its owner otherwise), and 503 with
   ``Retry-After`` when the key store cannot be read (cached keys keep working).

It is installed whatever the auth provider is (see :class:`~fastmcp_guard.Guard`): by
the guard's token verifier when the guard owns ``mcp.auth`` or wraps the server's
provider, and by ``fastmcp-guard run`` / :meth:`~fastmcp_guard.Guard.http_middleware`
for an app built by hand. Installed twice, it runs once. Where it cannot be installed (no
auth provider at all and an app the guard does not build), the guard's FastMCP
middleware applies the same IP policy to every MCP request (:func:`admit`).

It is pure ASGI (no Starlette request objects) to keep the per-request cost low.
"""

from __future__ import annotations

import json
import logging
import math
import re
import traceback
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from fastmcp.server.auth import TokenVerificationError

from fastmcp_guard._core import mask_tokens

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from fastmcp.server.auth import AccessToken
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from fastmcp_guard.guard import Guard
    from fastmcp_guard.ip import IPPolicy

__all__ = [
    "GuardASGIMiddleware",
    "RequestState",
    "TokenThrottled",
    "add_route",
    "admit",
    "client_of",
    "current_request_state",
    "mask_server_logs",
    "rate_limit_headers",
    "verify_bearer",
]

_log = logging.getLogger("fastmcp_guard")

#: Key under ``scope["state"]`` holding the resolved client address (set once per request).
CLIENT_IP_STATE = "fastmcp_guard_client_ip"
#: Key under ``scope["state"]``: the request came over the server's local admin socket.
ADMIN_SOCKET_STATE = "fastmcp_guard_admin_socket"
#: The client address recorded for a request over the local admin socket.
ADMIN_SOCKET_CLIENT = "unix:admin-socket"


def _suspect(text: str) -> bool:
    """Could ``text`` hold a token, literally, in another case, or percent-encoded?"""
    folded = text.casefold()
    return "fmg_sk" in folded or ("%" in text and "fmg" in folded)


def _mask_text(text: str) -> str:
    """``text`` with every token masked. Percent-encoding (a token sent in a query string
    is logged as the client sent it, ``fmg_sk%5F...``) and case are undone first, so
    the mask sees the token; such a text is logged decoded."""
    if "%" in text:
        for _ in range(3):  # double encoding too
            decoded = unquote(text)
            if decoded == text:
                break
            text = decoded
    if "fmg_sk_" not in text:
        text = _ANY_CASE_PREFIX.sub("fmg_sk_", text)
    return mask_tokens(text)


_ANY_CASE_PREFIX = re.compile("fmg_sk_", re.IGNORECASE)


class _MaskTokens(logging.Filter):
    """Masks anything shaped like a token in a log record, its arguments and its
    traceback (the audit log's own masking, :func:`fastmcp_guard._core.mask_tokens`): a
    token sent where it does not belong (a URL's query string, a tool argument echoed by
    an exception) must not land in the server's log either."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and _suspect(record.msg):
            record.msg = _mask_text(record.msg)
        args = record.args
        if isinstance(args, tuple) and any(isinstance(a, str) and _suspect(a) for a in args):
            # Masked one by one: formatters such as uvicorn's unpack the tuple.
            record.args = tuple(_mask_text(a) if isinstance(a, str) and _suspect(a) else a
                                for a in args)  # fmt: skip
        elif isinstance(args, dict) or (isinstance(args, tuple) and args):
            message = record.getMessage()
            if _suspect(message):
                record.msg, record.args = _mask_text(message), ()
        if record.exc_info and record.exc_info[1] is not None:
            text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            if _suspect(text):
                # Rendered here, masked, and kept as text: the formatter appends it.
                record.exc_info, record.exc_text = None, _mask_text(text)
        elif record.exc_text and _suspect(record.exc_text):
            record.exc_text = _mask_text(record.exc_text)
        return True


#: Loggers whose records can echo what a client sent: the mask is put on them (records
#: created there) and on the handlers of FastMCP's and the root logger (records their
#: children propagate, such as FastMCP's "Error calling tool" with its traceback).
_SERVER_LOGGERS = ("uvicorn.access", "uvicorn.error", "uvicorn")
_HANDLER_LOGGERS = ("fastmcp", "")


def mask_server_logs() -> None:
    """Put the token mask on the HTTP server's and FastMCP's log output (idempotent)."""
    for name in _SERVER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _MaskTokens) for f in logger.filters):
            logger.addFilter(_MaskTokens())
    for name in _HANDLER_LOGGERS:
        for handler in logging.getLogger(name or None).handlers:
            if not any(isinstance(f, _MaskTokens) for f in handler.filters):
                handler.addFilter(_MaskTokens())


class TokenThrottled(TokenVerificationError):
    """The failure throttle refused a token before hashing it: answered 429, not 401.

    ``scope`` names the failure budget that refused (``client``, ``key``, ``server``,
    ``unknown_keys``: the core's ``VerifyError.scope``)."""

    def __init__(self, message: str, retry_after: float, scope: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.scope = scope


#: The failure budget of each throttle scope, in :class:`~fastmcp_guard.VerifyLimits`.
_BUDGET_OF_SCOPE = {
    "client": "max_failures",
    "key": "key_failure_budget",
    "server": "global_failure_budget",
    "unknown_keys": "unknown_key_budget",
}


def rate_limit_headers(
    policy: str, retry_after: float, limit: int | None = None, window: float | None = None
) -> list[tuple[bytes, bytes]]:
    """The headers of a 429: ``Retry-After`` (whole seconds, at least 1) and the fields of
    draft-ietf-httpapi-ratelimit-headers (its current form, -08 and later; the older
    ``RateLimit-Limit`` / ``-Remaining`` / ``-Reset`` triple was dropped by the draft):
    ``RateLimit: "<policy>";r=0;t=<seconds>`` (nothing remains until the reset), and, when
    the quota is known, ``RateLimit-Policy: "<policy>";q=<limit>;w=<window seconds>``."""
    wait = max(1, math.ceil(retry_after))
    name = policy.replace("\\", "").replace('"', "")
    headers = [
        (b"retry-after", str(wait).encode()),
        (b"ratelimit", f'"{name}";r=0;t={wait}'.encode()),
    ]
    if limit is not None and limit > 0:
        policy_field = f'"{name}";q={limit}'
        if window is not None and window > 0:
            policy_field += f";w={max(1, math.ceil(window))}"
        headers.append((b"ratelimit-policy", policy_field.encode()))
    return headers


def _throttle_headers(guard: Guard, exc: TokenThrottled) -> list[tuple[bytes, bytes]]:
    """``rate_limit_headers`` of a throttled token: the policy is the failure budget that
    refused (``failures-<scope>``), its quota and window from the key store's limits."""
    scope = exc.scope
    if scope not in _BUDGET_OF_SCOPE:
        return rate_limit_headers("failures", exc.retry_after)
    limits = getattr(guard.keys, "limits", None)
    limit = None if limits is None else getattr(limits, _BUDGET_OF_SCOPE[scope])
    window = None if limits is None else limits.failure_window_seconds
    return rate_limit_headers(f"failures-{scope}", exc.retry_after, limit, window)


@dataclass
class RequestState:
    """What the HTTP layer and the verifier learn about one request's token."""

    client_ip: str | None
    #: Why the token was refused (the verifier's message; names a key id, never a token).
    refusal: str | None = None
    #: The refusal's reason code: ``malformed``, ``unknown_key``, ``bad_secret``...
    reason: str | None = None
    #: The key id the refused token claimed (public), ``""`` if none.
    key_id: str = ""


_request_state: ContextVar[RequestState | None] = ContextVar("fastmcp_guard_request", default=None)


def current_request_state() -> RequestState | None:
    """The state of the HTTP request being authenticated (``None`` outside one)."""
    return _request_state.get()


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key == name:  # ASGI servers send lower-case names
            return value
    return None


def forwarded_for(scope: Scope) -> str | None:
    """Every ``X-Forwarded-For`` line of the request joined with commas, in order (HTTP
    list semantics: a proxy such as HAProxy adds a line of its own rather than appending
    to the client's)."""
    lines = [value for key, value in scope.get("headers") or () if key == b"x-forwarded-for"]
    if not lines:
        return None
    return b",".join(lines).decode("latin-1")


def client_of(ip: IPPolicy | None, scope: Scope) -> str | None:
    """The client of an HTTP request: the one the HTTP layer resolved, else the TCP peer,
    or the right-most untrusted ``X-Forwarded-For`` hop when the peer is a trusted proxy."""
    state = scope.get("state")
    if state is not None and CLIENT_IP_STATE in state:
        resolved: str | None = state[CLIENT_IP_STATE]
        return resolved
    client = scope.get("client")
    peer = client[0] if client else None
    if peer is None or ip is None or not ip.trusted_proxies:
        return peer
    return ip.core.client_ip(peer, forwarded_for(scope))


def admit(ip: IPPolicy | None, client_ip: str | None) -> str | None:
    """Why the IP policy refuses ``client_ip`` (``deny_listed``, ``not_allow_listed``,
    ``unparsable``), or ``None`` if it may proceed (always without a policy)."""
    if ip is None:
        return None
    if client_ip is None:
        return "unparsable"
    return ip.core.check(client_ip)


def refuse_address(guard: Guard, client_ip: str | None, path: str | None) -> str | None:
    """Apply the guard's IP policy to ``client_ip``: why it is refused (recorded as
    ``ip_denied``), or ``None`` if it may proceed. A policy in shadow mode refuses nobody:
    what it would refuse is recorded as ``would_refuse`` instead."""
    refused = admit(guard.ip, client_ip)
    if refused is None:
        return None
    if guard.ip is not None and guard.ip.mode == "shadow":
        guard.record_refusal("would_refuse", client_ip, refused, path=path, rule="ip",
                             error=f"the IP policy (shadow) would refuse this client "
                                   f"address ({refused})")  # fmt: skip
        return None
    guard.record_refusal("ip_denied", client_ip, refused,
                         error=f"client address refused ({refused})", path=path)  # fmt: skip
    return refused


async def verify_bearer(guard: Guard, scope: Scope) -> AccessToken | None:
    """The guard key in the request's ``Authorization: Bearer`` (or ``X-API-Key``), verified
    by the guard's own key verifier whatever ``mcp.auth`` is; ``None`` without a valid one.
    Raises what the verifier raises when it cannot decide (throttled: 429; store: 503)."""
    raw = _header(scope, b"authorization")
    if raw is None:
        raw = _header(scope, b"x-api-key")
        token = None if raw is None else raw.decode("latin-1").strip()
    else:
        text = raw.decode("latin-1")
        token = text[7:].strip() if text[:7].lower() == "bearer " else None
    if not token:
        return None
    return await guard.verify_key(token)


def add_route(
    guard: Guard, path: str, methods: list[str], handler: Callable[[Request], Awaitable[Response]]
) -> None:
    """Serve ``handler`` at ``path`` on the guarded server, behind the guard's HTTP layer
    whatever the server's auth provider is (the layer runs once if the provider's
    middleware put it in front already)."""
    from starlette.routing import request_response

    app: Any = GuardASGIMiddleware(request_response(handler), guard)
    guard.mcp.custom_route(path, methods=methods, include_in_schema=False)(app)


class GuardASGIMiddleware:
    """IP policy, ``X-API-Key`` mapping and refusal audit for HTTP transports."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard
        self._warned_proxy_headers = False

    def _check_server_proxy_headers(self, scope: Scope, client_ip: str | None) -> None:
        """Warn once when the HTTP server itself took the client address from
        ``X-Forwarded-For`` (uvicorn does for peers in ``FORWARDED_ALLOW_IPS``, 127.0.0.1
        by default): the address the guard judges is then whatever such a peer claims."""
        ip = self.guard.ip
        if ip is not None and ip.trusted_proxies:
            return  # the guard reads the header itself: the server should not
        xff = forwarded_for(scope)
        if xff is None or client_ip is None or xff.rsplit(",", 1)[-1].strip() != client_ip:
            return
        self._warned_proxy_headers = True
        _log.warning(
            "the HTTP server took the client address %s from X-Forwarded-For (uvicorn does "
            "for peers in FORWARDED_ALLOW_IPS, 127.0.0.1 by default): any such peer can "
            "choose the address the guard's IP policy and budgets see. Serve with "
            "uvicorn_config={'proxy_headers': False} and list real proxies in "
            "trusted_proxies (fastmcp-guard run does the first)", client_ip,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.get("state")
        if state is None:
            scope["state"] = state = {}
        elif CLIENT_IP_STATE in state:
            await self.app(scope, receive, send)  # an outer copy of this layer ran already
            return
        guard = self.guard
        path = scope.get("path")
        server = scope.get("server")
        if (
            guard.admin_socket is not None and server is not None
            and server[1] is None and server[0] == guard.admin_socket
        ):  # fmt: skip
            # The local admin socket (the listening socket's own address: no client can
            # claim it). It serves the admin routes and nothing else.
            if not (path or "").startswith("/_guard/"):
                await _send_json(send, 404, {"error": "not_found", "error_description":
                                             "the admin socket serves /_guard/ only"})  # fmt: skip
                return
            state[CLIENT_IP_STATE] = ADMIN_SOCKET_CLIENT
            state[ADMIN_SOCKET_STATE] = True
            await self.app(scope, receive, send)
            return
        client_ip = client_of(guard.ip, scope)
        state[CLIENT_IP_STATE] = client_ip
        if not self._warned_proxy_headers:
            self._check_server_proxy_headers(scope, client_ip)
        refused = refuse_address(guard, client_ip, path)
        if refused is not None:
            await _send_json(send, 403, {"error": "forbidden",
                                         "error_description": "client address not allowed"})  # fmt: skip
            return

        if _header(scope, b"authorization") is None:
            api_key = _header(scope, b"x-api-key")
            if api_key is not None:
                scope["headers"] = [
                    *scope["headers"],
                    (b"authorization", b"Bearer " + api_key.strip()),
                ]

        req = RequestState(client_ip)
        token = _request_state.set(req)
        try:
            started = False

            async def send_and_audit(message: Message) -> None:
                nonlocal started
                if message["type"] == "http.response.start":
                    started = True
                    if message["status"] in (401, 403):
                        status = "unauthorized" if message["status"] == 401 else "forbidden"
                        reason = req.reason or ("invalid_token" if status == "unauthorized"
                                                else "insufficient_scope")  # fmt: skip
                        guard.record_refusal(
                            status, client_ip, reason, key_id=req.key_id,
                            error=req.refusal or "missing or invalid token", path=path,
                        )  # fmt: skip
                await send(message)

            try:
                await self.app(scope, receive, send_and_audit)
            except TokenThrottled as exc:
                guard.record_refusal("rate_limited", client_ip, req.reason or "throttled",
                                     key_id=req.key_id, error=str(exc), path=path)  # fmt: skip
                if started:
                    raise
                await _send_json(send, 429, {"error": "too_many_attempts",
                                             "error_description": str(exc)},
                                 headers=_throttle_headers(guard, exc))  # fmt: skip
            except TokenVerificationError as exc:
                # The key store is down (or every hashing slot busy): a documented 503,
                # not a crash and not a 401 (the token may be valid).
                guard.record_refusal("unauthorized", client_ip, req.reason or "store",
                                     key_id=req.key_id, error=f"key store unavailable: {exc}",
                                     path=path)  # fmt: skip
                if started:
                    raise
                await _send_json(send, 503, {"error": "temporarily_unavailable",
                                             "error_description": "key store unavailable; retry"},
                                 headers=[(b"retry-after", b"1")])  # fmt: skip
        finally:
            _request_state.reset(token)


async def _send_json(
    send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
