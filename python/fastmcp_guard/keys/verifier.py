"""FastMCP ``TokenVerifier`` for guard keys (``Authorization: Bearer fmg_sk_...``).

A token the verified-token cache knows costs about a microsecond, inline. Anything
else (first sight of a key, or a token that will be refused) goes to a worker
thread: argon2id and SQLite never run on the event loop.

The ``AccessToken`` of a verified key is built once per cache entry and attached to
it (``Identity.attach``): it lives in the core's cache and leaves it with the entry
(revocation, rotation, expiry, a change in the store, the cache TTL), so a token is
never served an object built from an older state of its key.

If the server already had an auth provider, tokens without the ``fmg_sk_`` prefix
are passed to it unchanged, so both kinds of identity reach the guard middleware.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio.to_thread
from fastmcp.server.auth import AccessToken, AuthProvider, TokenVerificationError, TokenVerifier

from fastmcp_guard._core import Identity, VerifyError
from fastmcp_guard.http import GuardASGIMiddleware, TokenThrottled, current_request_state

if TYPE_CHECKING:
    from starlette.middleware import Middleware as ASGIMiddleware
    from starlette.routing import BaseRoute

    from fastmcp_guard.guard import Guard

__all__ = ["GuardTokenVerifier", "access_token_for"]

_PREFIX = "fmg_sk_"
#: Refusal reasons that mean "cannot decide now", not "invalid token".
_UNAVAILABLE = frozenset({"store", "busy"})


def access_token_for(token: str, ident: Identity) -> AccessToken:
    """The FastMCP ``AccessToken`` of a verified guard key (scopes feed ``require_scopes``).

    A key with credits carries ``claims["credits"] = {"shadow": bool}``; no other key has
    a ``credits`` claim (a metadata entry of that name is left out, as ``key_id`` and
    ``key_name`` override theirs).
    """
    claims: dict[str, Any] = ident.metadata
    claims["key_id"] = ident.key_id
    claims["key_name"] = ident.key_name
    shadow = ident.credits_shadow
    if shadow is not None:
        # The key has credits: the middleware spends them (no store read to know it).
        claims["credits"] = {"shadow": shadow}
    else:
        # The claim is the guard's (like key_id): a metadata entry never poses as credits.
        claims.pop("credits", None)
    exp = ident.expires_at
    return AccessToken(
        token=token,
        client_id=ident.key_id,
        scopes=ident.scopes,
        expires_at=None if exp is None else int(exp),
        claims=claims,
    )


class GuardTokenVerifier(TokenVerifier):
    """Verifies guard keys; delegates other tokens to the server's previous provider.

    Installed by :class:`~fastmcp_guard.Guard` as ``mcp.auth``. Its
    :meth:`get_middleware` puts the guard's ASGI layer (IP policy before any token
    work, ``X-API-Key`` mapping, audit of 401s) in front of FastMCP's own. With
    ``own_keys=False`` (``Guard(manage_auth=False)``) it verifies nothing itself: every
    token, and the auth middleware, are the wrapped provider's.
    """

    def __init__(
        self, guard: Guard, fallback: AuthProvider | None = None, *, own_keys: bool = True
    ) -> None:
        super().__init__(
            base_url=getattr(fallback, "base_url", None),
            required_scopes=list(getattr(fallback, "required_scopes", None) or []),
            resource_base_url=getattr(fallback, "resource_base_url", None),
        )
        self._guard = guard
        self._core = guard.keys.core
        self.fallback = fallback
        #: False (``manage_auth=False``): every token goes to ``fallback``; this verifier
        #: only puts the guard's HTTP layer in front of it.
        self.own_keys = own_keys or fallback is None

    async def verify_token(self, token: str) -> AccessToken | None:
        """An ``AccessToken`` for a valid key; ``None`` otherwise (never raises for bad input).

        Raises ``TokenVerificationError`` only when the key store or the hashing pool
        cannot answer (keys already in the verified cache keep working).
        """
        if not self.own_keys or not token.startswith(_PREFIX):
            if self.fallback is not None:
                return await self.fallback.verify_token(token)
            state = current_request_state()
            if state is not None:
                state.refusal = state.reason = "malformed"
            return None
        state = current_request_state()
        client = state.client_ip if state is not None else None
        ident = self._core.verify_cached(token, client)
        if ident is not None:
            access = ident.attached
            if access is not None:
                return access
        else:
            try:
                handed = await anyio.to_thread.run_sync(self._verify_on_thread, token, client)
                ident = handed.pop()
            except VerifyError as exc:
                if state is not None:
                    state.refusal = str(exc)
                    state.reason = exc.reason
                    state.key_id = exc.key_id or ""
                if exc.reason == "throttled":
                    # The token may be valid: 429 with Retry-After, never a 401 that
                    # would tell its owner the key is bad.
                    raise TokenThrottled(str(exc), exc.retry_after or 1.0, exc.scope) from None
                if exc.reason in _UNAVAILABLE:
                    # Not a verdict on the token: the store or the hashing pool is
                    # unavailable. FastMCP's contract for this is TokenVerificationError;
                    # the guard's ASGI layer answers 503 with Retry-After.
                    raise TokenVerificationError(str(exc)) from None
                return None
        # Built once per cache entry; the first of concurrent builds is kept.
        return ident.attach(access_token_for(token, ident))

    def _verify_on_thread(self, token: str, client: str | None) -> list[Identity]:
        # The Identity comes back in a list emptied on the loop: anyio's worker keeps its
        # last result until its next job, and must not keep the cache entry (and the
        # AccessToken attached to it) alive once the entry leaves the cache.
        return [self._core.verify(token, client)]

    # -- delegate what a previous provider contributes over HTTP ------------------------

    def get_middleware(self) -> list[ASGIMiddleware]:
        from starlette.middleware import Middleware

        # FastMCP's own bearer middleware, with this verifier (which delegates) as backend;
        # or, when every token is the server's provider's, that provider's own middleware.
        if self.own_keys or self.fallback is None:
            inner = super().get_middleware()
        else:
            inner = self.fallback.get_middleware()
        return [Middleware(GuardASGIMiddleware, guard=self._guard), *inner]  # type: ignore[arg-type]

    def get_routes(self, mcp_path: str | None = None) -> list[BaseRoute]:
        if self.fallback is not None:
            return self.fallback.get_routes(mcp_path)
        return super().get_routes(mcp_path)

    def set_mcp_path(self, mcp_path: str | None) -> None:
        super().set_mcp_path(mcp_path)
        if self.fallback is not None:
            self.fallback.set_mcp_path(mcp_path)

    @property
    def scopes_supported(self) -> list[str]:
        return self.fallback.scopes_supported if self.fallback is not None else self.required_scopes

    def get_challenge_scopes(self, required_scopes: list[str] | None = None) -> list[str]:
        if self.fallback is not None:
            return self.fallback.get_challenge_scopes(required_scopes)
        return super().get_challenge_scopes(required_scopes)
