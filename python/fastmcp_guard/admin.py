"""The guard's admin routes: what ``fastmcp-guard rate status|reset`` talks to.

The in-process limiter lives in the server's memory, so the CLI reaches it the way
Kong's Admin API or Envoy's admin port are reached: over HTTP, on the server itself.
Two routes are added to the FastMCP app (HTTP transports only):

- ``GET  /_guard/rate[?key=<key id>]``: the live buckets (global, per key, per tool)
  of one key, or of every key the limiter tracks now;
- ``POST /_guard/rate/reset`` with ``{"key": "<key id>"}``: forget a key's usage.

They take key ids (``fmg_key_...``, or the limiter key of a caller without one), never
tokens: a token in ``key`` is answered 400 ("pass the key id") and recorded nowhere.
The CLI turns a token into its key id locally, before any request. A key id the server
does not know and the limiter does not track is answered 404 (``unknown_key``).

Both require a guard key holding the admin scope (``guard:admin``) in
``Authorization: Bearer`` or ``X-API-Key``, verified by the routes themselves, so they
hold whatever auth provider the server has; or a request over the server's **local
admin socket**: ``fastmcp-guard run`` also serves these routes (and only these) on a
Unix socket beside its SQLite key store (:func:`admin_socket_path`, mode 0600, so only
the server's OS user and root can connect: whoever may write the key store may already
issue itself an admin key). The ``rate`` commands use that socket when it is there, so
they issue no key at all. They carry the guard's HTTP layer (IP
policy, refusal audit, 429 for a throttled token) whatever the provider is; an admin
action is audited as ``tool="admin:rate.status"`` / ``"admin:rate.reset"`` under the
admin key's identity and the resolved client address.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from fastmcp.server.auth import AccessToken

from fastmcp_guard._core import looks_like_guard_token
from fastmcp_guard.errors import RateBackendError
from fastmcp_guard.http import ADMIN_SOCKET_STATE, add_route, client_of, verify_bearer

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from fastmcp_guard.config import GuardConfig
    from fastmcp_guard.guard import Guard

__all__ = [
    "ADMIN_PREFIX",
    "ADMIN_SCOPE",
    "RATE_PATH",
    "RATE_RESET_PATH",
    "admin_socket_path",
    "install_admin_routes",
    "socket_dir_problem",
    "socket_problem",
    "store_owner",
]

#: Scope a key needs to use the admin routes.
ADMIN_SCOPE = "guard:admin"
#: Every admin route starts with this; the admin socket serves nothing else.
ADMIN_PREFIX = "/_guard/"
RATE_PATH = "/_guard/rate"
RATE_RESET_PATH = "/_guard/rate/reset"
#: Who acts over the admin socket, in the audit log.
SOCKET_ACTOR = "local-admin-socket"
#: Longest Unix socket path Linux takes (108 bytes with the terminator), with room.
_MAX_SOCKET_PATH = 100


def admin_socket_path(config: GuardConfig, port: int) -> Path:
    """Where a server on ``port`` with this configuration keeps its local admin socket:
    beside its SQLite key store (``.fastmcp-guard-admin-<port>.sock``), or for another
    store (or a path too long for a socket) in ``<tmp>/fastmcp-guard-<uid>/``."""
    if config.keys.backend == "sqlite" and config.keys.path:
        path = Path(config.keys.path).resolve().parent / f".fastmcp-guard-admin-{port}.sock"
        if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
            return path
    tag = hashlib.blake2b(str(config.keys.masked()).encode(), digest_size=6).hexdigest()
    return Path(tempfile.gettempdir()) / f"fastmcp-guard-{os.getuid()}" / f"admin-{tag}-{port}.sock"


def socket_dir_problem(directory: Path, owner: int) -> str | None:
    """Why a socket in ``directory`` could be swapped by someone else, or ``None``: the
    directory must not be a symlink, and must be writable by nobody but ``owner`` (or
    root) unless it is sticky (as ``/tmp``: others cannot rename what is not theirs)."""
    try:
        st = os.lstat(directory)
    except OSError as exc:
        return f"cannot read {directory} ({exc.strerror})"
    if not stat.S_ISDIR(st.st_mode):
        return f"{directory} is not a directory"
    if st.st_uid not in (owner, 0):
        return f"{directory} belongs to uid {st.st_uid}"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return f"{directory} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def socket_problem(path: Path, owner: int) -> str | None:
    """Why the socket at ``path`` must not be trusted as the server's admin socket, or
    ``None``: it must be a socket owned by ``owner`` (the key store's owner), closed to
    other users (0600), in a directory nobody else can swap it in."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot read {path} ({exc.strerror})"
    if not stat.S_ISSOCK(st.st_mode):
        return f"{path} is not a socket"
    if st.st_uid != owner:
        return f"{path} belongs to uid {st.st_uid}, not to the key store's owner (uid {owner})"
    if st.st_mode & 0o077:
        return f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):o})"
    return socket_dir_problem(path.parent, owner)


def store_owner(config: GuardConfig) -> int:
    """The OS user the admin socket must belong to: the SQLite key store file's owner
    (the server writes it), else this process's user."""
    if config.keys.backend == "sqlite" and config.keys.path:
        try:
            return os.stat(config.keys.path).st_uid
        except OSError:
            pass
    return os.getuid()


#: The answer to a token where a key id belongs (nothing of it is echoed or recorded).
_PASS_THE_KEY_ID = (
    "pass the key id (fmg_key_...), not a token: a token is a secret and must not travel "
    "in a request parameter; `fastmcp-guard rate` turns a token into its key id locally"
)


def install_admin_routes(guard: Guard, scope: str = ADMIN_SCOPE) -> None:
    """Add the admin routes to ``guard.mcp`` (used by :class:`~fastmcp_guard.Guard`)."""
    from starlette.responses import JSONResponse

    def error(status: int, code: str, description: str, **headers: str) -> Response:
        return JSONResponse({"error": code, "error_description": description},
                            status_code=status, headers=headers or None)  # fmt: skip

    async def admin(request: Request) -> AccessToken | Response:
        """The admin key's access token, or the refusal to send."""
        if (request.scope.get("state") or {}).get(ADMIN_SOCKET_STATE):
            # The local admin socket: its file mode is the credential.
            return AccessToken(token="", client_id="", scopes=[scope],
                               claims={"key_name": SOCKET_ACTOR})  # fmt: skip
        ident = await verify_bearer(guard, request.scope)
        if ident is None:
            return error(401, "unauthorized", f"a guard key with the {scope!r} scope is required",
                         **{"WWW-Authenticate": "Bearer"})  # fmt: skip
        if scope not in ident.scopes:
            return error(403, "forbidden", f"the key lacks the {scope!r} scope")
        return ident

    def audit_ok(request: Request, ident: AccessToken, tool: str, key: str | None) -> None:
        guard.record_event(
            "ok", tool=tool, key_id=ident.client_id,
            key_name=str((ident.claims or {}).get("key_name", "")),
            scopes=list(ident.scopes), input_args={"key": key},
            client_ip=client_of(guard.ip, request.scope),
        )  # fmt: skip

    async def known(key: str) -> tuple[bool, str | None]:
        """Whether the key store knows ``key`` (a key id), and the key's name."""
        if not key.startswith("fmg_key_"):
            return False, None
        info = await anyio.to_thread.run_sync(guard.keys.get, key)
        return (False, None) if info is None else (True, info.name)

    async def describe(key: str) -> dict[str, Any] | None:
        """The buckets of ``key``; ``None`` if no key has this id and it has no buckets."""
        rate = guard.rate_limit
        exists, name = await known(key)
        if not exists and key not in await rate.tracked_keys_async():
            return None
        status = await rate.status_async(key)
        return {"key": key, "name": name, "per_key": status.get("per_key"),
                "tools": status.get("tools", {})}  # fmt: skip

    async def rate_status(request: Request) -> Response:
        ident = await admin(request)
        if not isinstance(ident, AccessToken):
            return ident
        wanted = request.query_params.get("key")
        if wanted is not None and looks_like_guard_token(wanted):
            return error(400, "invalid_request", _PASS_THE_KEY_ID)
        rate = guard.rate_limit
        try:
            if wanted:
                one = await describe(wanted.strip())
                if one is None:
                    return error(404, "unknown_key",
                                 f"no key {wanted.strip()!r} in the key store or the limiter")  # fmt: skip
                described = [one]
            else:
                described = [d for k in await rate.tracked_keys_async()
                             if (d := await describe(k)) is not None]  # fmt: skip
            body = {
                "per_key_rate": rate.per_key,
                "global_rate": rate.global_limit,
                "global": (await rate.status_async("")).get("global"),
                "keys": described,
            }
        except RateBackendError as exc:
            return error(503, "rate_backend_unavailable", str(exc))
        audit_ok(request, ident, "admin:rate.status", wanted)
        return JSONResponse(body)

    async def rate_reset(request: Request) -> Response:
        ident = await admin(request)
        if not isinstance(ident, AccessToken):
            return ident
        try:
            payload = json.loads(await request.body() or b"{}")
            key = payload["key"]
            if not isinstance(key, str) or not key.strip():
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return error(400, "invalid_request", 'send {"key": "<key id>"}')
        key = key.strip()
        if looks_like_guard_token(key):
            return error(400, "invalid_request", _PASS_THE_KEY_ID)
        try:
            exists, _ = await known(key)
            tracked = await guard.rate_limit.reset_async(key)
        except RateBackendError as exc:
            return error(503, "rate_backend_unavailable", str(exc))
        if not exists and not tracked:
            return error(404, "unknown_key", f"no key {key!r} in the key store or the limiter")
        audit_ok(request, ident, "admin:rate.reset", key)
        return JSONResponse({"reset": key, "was_tracked": tracked})

    add_route(guard, RATE_PATH, ["GET"], rate_status)
    add_route(guard, RATE_RESET_PATH, ["POST"], rate_reset)
