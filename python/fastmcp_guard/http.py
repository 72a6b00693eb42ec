"""The guard's ASGI layer, placed in front of FastMCP's bearer-auth middleware.

For every HTTP request it:

1. works out the client address (the TCP peer, or ``X-Forwarded-For`` when the
   peer is a trusted proxy) and refuses a denied address with 403 *before any
   token work*, so a denied address costs no hashing;
2. maps ``X-API-Key: <token>`` to ``Authorization: Bearer <token>`` when no
   ``Authorization`` header is present (for clients that cannot set it);
3. records one audit event for each refusal FastMCP answers with 401 / 403;
4. answers 503 with ``Retry-After`` when the key store cannot be read (a token not
   yet in the verified cache cannot be judged; cached ones keep working).

It is pure ASGI (no Starlette request objects) to keep the per-request cost low.
"""

from __future__ import annotations

import json
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastmcp.server.auth import TokenVerificationError

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from fastmcp_guard.guard import Guard

__all__ = ["GuardASGIMiddleware", "RequestState", "current_request_state"]

#: Key under ``scope["state"]`` holding the resolved client address.
CLIENT_IP_STATE = "fastmcp_guard_client_ip"


@dataclass
class RequestState:
    """What the ASGI layer learned about a request, shared with the verifier."""

    client_ip: str | None
    refusal: str | None = None


_request_state: ContextVar[RequestState | None] = ContextVar("fastmcp_guard_request", default=None)


def current_request_state() -> RequestState | None:
    """The state of the HTTP request being authenticated (``None`` outside one)."""
    return _request_state.get()


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key == name:  # ASGI servers send lower-case names
            return value
    return None


class GuardASGIMiddleware:
    """IP policy, ``X-API-Key`` mapping and refusal audit for HTTP transports."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guard = self.guard
        client = scope.get("client")
        peer = client[0] if client else None
        ip_policy = guard.ip
        client_ip = peer
        if ip_policy is not None:
            if peer is not None and ip_policy.trusted_proxies:
                xff = _header(scope, b"x-forwarded-for")
                client_ip = ip_policy.core.client_ip(peer, xff.decode("latin-1") if xff else None)
            reason = ip_policy.core.check(client_ip) if client_ip is not None else "unparsable"
            if reason is not None:
                guard._audit_event(
                    "ip_denied", client_ip=client_ip, error=f"client address refused ({reason})",
                    extra={"path": scope.get("path")},
                )  # fmt: skip
                await _send_json(send, 403, {"error": "forbidden",
                                             "error_description": "client address not allowed"})  # fmt: skip
                return
        state = scope.get("state")
        if state is None:
            scope["state"] = state = {}
        state[CLIENT_IP_STATE] = client_ip

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
                        guard._audit_event(
                            status, client_ip=client_ip,
                            error=req.refusal or "missing or invalid token",
                            extra={"path": scope.get("path")},
                        )  # fmt: skip
                await send(message)

            try:
                await self.app(scope, receive, send_and_audit)
            except TokenVerificationError as exc:
                # The key store is down (or every hashing slot busy): a documented 503,
                # not a crash and not a 401 (the token may be valid).
                guard._audit_event("unauthorized", client_ip=client_ip,
                                   error=f"key store unavailable: {exc}",
                                   extra={"path": scope.get("path")})  # fmt: skip
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
