"""The guard's admin routes: what ``fastmcp-guard rate status|reset`` talks to.

The in-process limiter lives in the server's memory, so the CLI reaches it the way
Kong's Admin API or Envoy's admin port are reached: over HTTP, on the server itself.
Two routes are added to the FastMCP app (HTTP transports only):

- ``GET  /_guard/rate[?key=<key id>]``: the live buckets (global, per key, per tool)
  of one key, or of every key the limiter tracks now;
- ``POST /_guard/rate/reset`` with ``{"key": "<key id>"}``: forget a key's usage.

Both require a guard key holding the admin scope (``guard:admin`` by default) in
``Authorization: Bearer`` or ``X-API-Key``. They sit behind the same ASGI layer as
MCP requests, so the IP policy applies and a refusal (401 without a valid key, 403
without the scope) is audited like any other; an admin action is audited as
``tool="admin:rate.status"`` / ``"admin:rate.reset"`` under the admin key's identity.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from fastmcp_guard._core import token_key_id
from fastmcp_guard.errors import RateBackendError

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from fastmcp_guard.guard import Guard

__all__ = ["ADMIN_SCOPE", "RATE_PATH", "RATE_RESET_PATH", "install_admin_routes"]

#: Scope a key needs to use the admin routes.
ADMIN_SCOPE = "guard:admin"
RATE_PATH = "/_guard/rate"
RATE_RESET_PATH = "/_guard/rate/reset"


def normalise_key(key: str) -> str:
    """A key id from a key id, a token's public part (``fmg_sk_<id>``) or a whole token."""
    return (token_key_id(key) if key.startswith("fmg_sk_") else None) or key


def install_admin_routes(guard: Guard, scope: str = ADMIN_SCOPE) -> None:
    """Add the admin routes to ``guard.mcp`` (used by :class:`~fastmcp_guard.Guard`)."""
    from starlette.responses import JSONResponse

    mcp = guard.mcp

    def refuse(request: Request) -> Response | None:
        user = request.user
        if not getattr(user, "is_authenticated", False):
            return JSONResponse(
                {"error": "unauthorized",
                 "error_description": f"a guard key with the {scope!r} scope is required"},
                status_code=401, headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip
        if scope not in request.auth.scopes:
            return JSONResponse(
                {"error": "forbidden", "error_description": f"the key lacks the {scope!r} scope"},
                status_code=403,
            )
        return None

    def unavailable(exc: RateBackendError) -> Response:
        return JSONResponse(
            {"error": "rate_backend_unavailable", "error_description": str(exc)},
            status_code=503,
        )

    def audit_ok(request: Request, tool: str, args: dict[str, Any]) -> None:
        token = getattr(request.user, "access_token", None)
        claims = getattr(token, "claims", None) or {}
        guard._audit_event(
            "ok", tool=tool, key_id=getattr(token, "client_id", "") or "",
            key_name=str(claims.get("key_name", "")), scopes=list(request.auth.scopes),
            input_args=args, client_ip=request.client.host if request.client else None,
        )  # fmt: skip

    async def describe(key: str) -> dict[str, Any]:
        info = (
            await anyio.to_thread.run_sync(guard.keys.get, key)
            if key.startswith("fmg_key_")
            else None
        )
        status = await guard.rate_limit.status_async(key)
        return {
            "key": key,
            "name": info.name if info is not None else None,
            "per_key": status.get("per_key"),
            "tools": status.get("tools", {}),
        }

    @mcp.custom_route(RATE_PATH, methods=["GET"], include_in_schema=False)
    async def rate_status(request: Request) -> Response:
        refused = refuse(request)
        if refused is not None:
            return refused
        wanted = request.query_params.get("key")
        rate = guard.rate_limit
        try:
            keys = [normalise_key(wanted)] if wanted else await rate.tracked_keys_async()
            body = {
                "per_key_rate": rate.per_key,
                "global_rate": rate.global_limit,
                "global": (await rate.status_async("")).get("global"),
                "keys": [await describe(k) for k in keys],
            }
        except RateBackendError as exc:
            return unavailable(exc)
        audit_ok(request, "admin:rate.status", {"key": wanted})
        return JSONResponse(body)

    @mcp.custom_route(RATE_RESET_PATH, methods=["POST"], include_in_schema=False)
    async def rate_reset(request: Request) -> Response:
        refused = refuse(request)
        if refused is not None:
            return refused
        try:
            payload = json.loads(await request.body() or b"{}")
            key = payload["key"]
            if not isinstance(key, str) or not key:
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return JSONResponse(
                {"error": "invalid_request", "error_description": 'send {"key": "<key id>"}'},
                status_code=400,
            )
        key = normalise_key(key)
        try:
            tracked = await guard.rate_limit.reset_async(key)
        except RateBackendError as exc:
            return unavailable(exc)
        audit_ok(request, "admin:rate.reset", {"key": key})
        return JSONResponse({"reset": key, "was_tracked": tracked})
