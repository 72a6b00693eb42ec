"""``fastmcp-guard rate status [KEY]`` and ``rate reset KEY``: the live limiter of a server.

The in-process limiter lives in the server, so these commands ask the server, over
its admin routes (:mod:`fastmcp_guard.admin`): ``GET /_guard/rate`` and
``POST /_guard/rate/reset`` at the configured URL (``--url``, ``FASTMCP_GUARD_URL``,
config ``url``; default ``http://127.0.0.1:8000``). The answer is the limiter's own
state: the calls actually made.

The routes need a key with the ``guard:admin`` scope: ``--admin-key`` /
``FASTMCP_GUARD_ADMIN_KEY`` / config ``admin_key``. Without one, the CLI asks over the
server's local admin socket when there is one (``fastmcp-guard run`` serves it beside its
SQLite key store: no key is issued at all). Failing that, and when the CLI can write the
server's key store (SQLite) and the server answers, it issues an admin key that expires
in a minute, uses it for this one command and revokes it; both steps are in the audit
log with the actor, like any key management.

A key is named by its id. A token given instead is turned into its key id here, before
any request: a token never leaves the CLI (the server answers a token with 400).
"""

from __future__ import annotations

import argparse
import json
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from fastmcp_guard.cli._common import (
    UsageError,
    add_command,
    add_group,
    attach_audit,
    cli_config,
    store_exists,
    want_json,
)
from fastmcp_guard.cli._output import print_json, print_table, say, warn

if TYPE_CHECKING:
    from fastmcp_guard.config import GuardConfig

__all__ = ["register"]

_EPILOG = """\
examples:
  fastmcp-guard rate status                      # every key the server's limiter tracks
  fastmcp-guard rate status fmg_key_3kQ... --json
  fastmcp-guard rate reset fmg_key_3kQ...
  fastmcp-guard rate status --url http://10.0.0.5:8000 --admin-key "$ADMIN_KEY"

The server must be running over HTTP (fastmcp-guard run, or Guard(mcp) in code).
"""

#: How long an admin key issued for one command lives, at most.
_EPHEMERAL = timedelta(minutes=1)
#: Host names that are this machine (the local admin socket only serves those).
_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


class ServerError(OSError):
    """The server could not be reached or refused the request (exit code 1)."""


def register(subparsers: Any) -> None:
    """Add the ``rate`` command group."""
    _, commands = add_group(subparsers, "rate", epilog=_EPILOG,
                            help="see and reset the live rate limits of a running server")  # fmt: skip
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--url", help="the server's base URL (env FASTMCP_GUARD_URL)")
    server.add_argument("--admin-key", metavar="TOKEN",
                        help="a key with the guard:admin scope (env FASTMCP_GUARD_ADMIN_KEY)")  # fmt: skip
    server.add_argument("--actor", metavar="NAME",
                        help="who is acting, for the audit log (default: the OS user)")  # fmt: skip
    status = add_command(commands, "status", parents=[server], epilog=_EPILOG,
                         help="calls used and remaining per key (and globally)")  # fmt: skip
    status.add_argument("key", nargs="?", help="one key (id or token's public part)")
    status.set_defaults(func=_status)
    reset = add_command(commands, "reset", parents=[server], epilog=_EPILOG,
                        help="forget a key's usage so it is admitted again")  # fmt: skip
    reset.add_argument("key", help="the key (id or token's public part)")
    reset.set_defaults(func=_reset)


def _status(args: argparse.Namespace) -> int:
    config = cli_config(args, url=args.url, admin_key=args.admin_key)
    from urllib.parse import urlencode

    key = _key_id(config, args.key) if args.key else None
    query = "" if key is None else "?" + urlencode({"key": key})
    body = _call(config, args, "GET", f"/_guard/rate{query}")
    if want_json(args):
        print_json(body)
        return 0
    glob = body.get("global")
    say(f"Server {config.url}: per-key rate {body.get('per_key_rate') or 'none'}, "
        f"global rate {body.get('global_rate') or 'none'}"
        + (f" ({_usage(glob)})" if glob else ""))  # fmt: skip
    keys = body.get("keys") or []
    if not keys:
        say("No key has made a call yet (or all were idle long enough to be forgotten).")
        return 0
    rows = []
    for k in keys:
        tools = ", ".join(f"{t}: {_usage(b)}" for t, b in sorted((k.get("tools") or {}).items()))
        per_key = k.get("per_key")
        rows.append([k["key"], k.get("name") or "-", _usage(per_key) if per_key else "no limit",
                     f"{per_key['reset_after']:.1f}s" if per_key else "-", tools or "-"])  # fmt: skip
    print_table(["Key", "Name", "Used / limit", "Full again in", "Per tool"], rows,
                title="Live rate limits", no_wrap=("Key",))  # fmt: skip
    return 0


def _reset(args: argparse.Namespace) -> int:
    config = cli_config(args, url=args.url, admin_key=args.admin_key)
    body = _call(config, args, "POST", "/_guard/rate/reset", {"key": _key_id(config, args.key)})
    if want_json(args):
        print_json(body)
    elif body.get("was_tracked"):
        say(f"Reset the rate limits of {body['reset']}: its next call is admitted.")
    else:
        say(f"{body['reset']} had no live rate-limit state (nothing to reset).")
    return 0


def _usage(bucket: dict[str, Any]) -> str:
    window = bucket["window_seconds"]
    per = {1.0: "s", 60.0: "min", 3600.0: "h", 86400.0: "day"}.get(window, f"{window:g}s")
    return f"{bucket['used']}/{bucket['limit']} per {per}"


def _key_id(config: GuardConfig, given: str) -> str:
    """The key id (or other limiter key) that ``given`` names. A token, or a token's
    public part, is turned into its key id here, so that no token is ever sent."""
    from fastmcp_guard._core import looks_like_guard_token, token_key_id

    given = given.strip()
    if not looks_like_guard_token(given):
        return given
    key_id = token_key_id(given)
    if key_id is not None:
        return key_id
    # A fastmcp-guard 0.2 token (fmg_sk_<hex>.<secret>): its id is in the key store.
    public = given.split(".", 1)[0]
    if store_exists(config):
        store = config.key_store()
        try:
            found = store.get(public)
        finally:
            store.close()
        if found is not None:
            return str(found.id)
    raise UsageError(f"cannot tell the key id of {public}...; pass the key id (fmg_key_...)")


def _call(
    config: GuardConfig, args: argparse.Namespace, method: str, path: str,
    payload: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    if config.admin_key:
        return _request(config.url, method, path, config.admin_key, payload)
    socket_path = _local_admin_socket(config)
    if socket_path is not None:
        return _request(config.url, method, path, None, payload, unix=socket_path)
    _reachable(config.url)
    with ExitStack() as stack:
        token = _ephemeral_admin_key(config, args, stack)
        return _request(config.url, method, path, token, payload)


def _local_admin_socket(config: GuardConfig) -> str | None:
    """The admin socket of the server at ``config.url`` when it is on this machine."""
    from urllib.parse import urlsplit

    from fastmcp_guard.admin import admin_socket_path, socket_problem, store_owner

    url = urlsplit(config.url)
    if url.hostname not in _LOCAL_HOSTS or url.port is None:
        return None
    path = admin_socket_path(config, url.port)
    if not path.is_socket():
        return None
    problem = socket_problem(path, store_owner(config))
    if problem is not None:
        # Someone else's socket (a squatter in a shared directory): never talk to it.
        warn(f"ignoring the admin socket: {problem}")
        return None
    return str(path)


def _reachable(base: str) -> None:
    """Raise :class:`ServerError` unless a guarded server answers at ``base`` (asked
    without credentials: a guard answers 401), before any key is issued for it."""
    try:
        _request(base, "GET", "/_guard/rate", None, None)
    except ServerError as exc:
        if "HTTP 401" not in str(exc):
            raise


def _request(
    base: str, method: str, path: str, token: str | None, payload: dict[str, Any] | None,
    *, unix: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    # Imported here: http.client pulls in ssl and email (16 ms) that other commands skip.
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(base.rstrip("/") + path)
    shown = f"{method} {base.rstrip('/')}{path}" + (f" (over {unix})" if unix else "")
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if payload is None else json.dumps(payload).encode()
    if unix is not None:
        conn: http.client.HTTPConnection = _unix_connection(unix, timeout=10)
    elif url.scheme == "https":
        conn = http.client.HTTPSConnection(url.hostname or "", url.port, timeout=10)
    else:
        conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    target = url.path + (f"?{url.query}" if url.query else "")
    try:
        conn.request(method, target, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        if unix is not None:
            raise ServerError(f"cannot reach the server's admin socket {unix} ({exc})") from None
        raise ServerError(
            f"cannot reach the server at {base} ({exc}); is it running? "
            "Name it with --url or FASTMCP_GUARD_URL"
        ) from None
    finally:
        conn.close()
    body: Any = None
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        body = None
    if 200 <= resp.status < 300 and isinstance(body, dict):
        return body
    detail = body.get("error_description", "") if isinstance(body, dict) else ""
    code = body.get("error") if isinstance(body, dict) else None
    if resp.status == 404 and code == "unknown_key":
        raise ServerError(f"unknown key: {detail}")
    if resp.status == 404:
        detail = "no admin routes here: is this a guarded server, served over HTTP?"
    raise ServerError(f"{shown}: HTTP {resp.status} {detail}".rstrip())


def _unix_connection(path: str, timeout: float) -> Any:
    """An ``http.client.HTTPConnection`` over the Unix socket at ``path``."""
    import http.client
    import socket

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(path)
            self.sock = sock

    return UnixConnection("localhost", timeout=timeout)


def _ephemeral_admin_key(config: GuardConfig, args: argparse.Namespace, stack: ExitStack) -> str:
    """Issue an admin key for this one command (revoked by ``stack``), or explain why not."""
    from fastmcp_guard.admin import ADMIN_SCOPE

    if config.keys.backend == "memory" or not store_exists(config):
        where = "in memory" if config.keys.backend == "memory" else f"at {config.keys.path}"
        raise ServerError(
            f"no admin key: the key store is {where}, so the CLI cannot issue one. Create a key "
            f"with the {ADMIN_SCOPE} scope in the server's store and pass it with --admin-key "
            "or FASTMCP_GUARD_ADMIN_KEY"
        )
    store = config.key_store()
    stack.callback(store.close)
    attach_audit(store, config, stack)
    actor = getattr(args, "actor", None)
    key = store.create(
        "fastmcp-guard-cli (one command)", scopes=[ADMIN_SCOPE],
        expires_at=datetime.now(timezone.utc) + _EPHEMERAL, actor=actor,
        metadata={"purpose": "ephemeral admin key for one `fastmcp-guard rate` command"},
    )  # fmt: skip
    stack.callback(store.revoke, key.id, actor=actor)
    return str(key.token)  # set on the object create returns
