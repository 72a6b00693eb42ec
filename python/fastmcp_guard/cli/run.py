"""``fastmcp-guard run server.py[:object]``: serve an unmodified FastMCP server, guarded.

Loads the server object the way ``fastmcp run`` does (``file.py:object``, or the first
of ``mcp`` / ``server`` / ``app``; a function returning a server is called), applies a
:class:`~fastmcp_guard.Guard` built from the configuration (options > environment >
config file > embedded defaults: keys in ``./fastmcp-guard-keys.db``, audit log in
``./fastmcp-guard-audit.jsonl``), and serves it over HTTP (default) or stdio. The
tools are not touched. On exit (Ctrl-C, SIGTERM) the audit log is flushed and closed.

Over HTTP the server also answers the guard's admin routes (``/_guard/rate``), which
``fastmcp-guard rate status|reset`` use; they need a key with the ``guard:admin`` scope.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from fastmcp_guard.cli._common import UsageError, add_command, cli_config

__all__ = ["load_server", "register"]

_EPILOG = """\
examples:
  fastmcp-guard run server.py                       # HTTP on 127.0.0.1:8000, embedded defaults
  fastmcp-guard run server.py:mcp --port 9000 --rate 100/minute
  fastmcp-guard run server.py --allow 10.0.0.0/8 --deny 10.99.0.0/16
  fastmcp-guard run server.py --transport stdio     # key from FASTMCP_GUARD_KEY
  FASTMCP_GUARD_KEYS=sqlite:///keys.db fastmcp-guard run server.py

Keys are created with `fastmcp-guard keys create` against the same store; every
call is attributed, limited and audited. See `fastmcp-guard config` for the
effective settings and where each came from.
"""


def register(subparsers: Any) -> None:
    """Add the ``run`` command."""
    p = add_command(subparsers, "run", epilog=_EPILOG,
                    help="serve an existing FastMCP server file under the guard")  # fmt: skip
    p.add_argument("server", metavar="FILE[:OBJECT]",
                   help="the server file, optionally with the server object's name")  # fmt: skip
    p.add_argument("--transport", choices=("http", "stdio"),
                   help="http (default) or stdio (env FASTMCP_GUARD_TRANSPORT)")  # fmt: skip
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", help="port to listen on (default 8000)")
    p.add_argument("--rate", metavar="RATE", help="per-key rate limit, e.g. 100/minute")
    p.add_argument("--global-rate", metavar="RATE", help="rate limit across all callers")
    p.add_argument("--allow", metavar="CIDR", action="append",
                   help="admit only these addresses / networks (repeat or comma-separate)")  # fmt: skip
    p.add_argument("--deny", metavar="CIDR", action="append",
                   help="refuse these addresses / networks (deny wins)")  # fmt: skip
    p.add_argument("--trusted-proxy", metavar="CIDR", action="append",
                   help="proxies whose X-Forwarded-For is honoured")  # fmt: skip
    p.set_defaults(func=_run)


def _joined(values: list[str] | None) -> str | None:
    return None if values is None else ",".join(values)


def _run(args: argparse.Namespace) -> int:
    config = cli_config(
        args,
        transport=args.transport,
        host=args.host,
        port=args.port,
        rate=args.rate,
        global_rate=args.global_rate,
        allow=_joined(args.allow),
        deny=_joined(args.deny),
        trusted_proxies=_joined(args.trusted_proxy),
    )
    mcp = load_server(args.server)

    from fastmcp_guard.guard import Guard

    guard = Guard(mcp, config=config)
    # SIGTERM (systemd, Kubernetes, `kill`) ends the server like Ctrl-C: uvicorn shuts
    # down gracefully, then re-raises the signal to the handler found at start, which is
    # this one, so the `finally` below still flushes and closes the audit log.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        if config.transport == "stdio":
            # stdout carries the protocol: say nothing there.
            mcp.run(transport="stdio", show_banner=False)
        else:
            url = f"http://{config.host}:{config.port}/mcp"
            shared = "" if config.rate_backend == "memory" else (
                f", rate limits: {config.public_value('rate_url') or 'redis (default URL)'}")  # fmt: skip
            sys.stderr.write(
                f"fastmcp-guard: serving {mcp.name!r} on {url} "
                f"(keys: {config.keys.masked()}, audit: {config.display('audit')}{shared})\n"
            )
            _serve_http(mcp, guard, config)
    finally:
        guard.close()
    return 0


def _serve_http(mcp: Any, guard: Any, config: Any) -> None:
    """Serve over HTTP on the configured address, and the admin routes on the local admin
    socket (see :mod:`fastmcp_guard.admin`) when it can be made."""
    import socket

    try:
        family, _, _, _, address = socket.getaddrinfo(
            config.host, config.port, type=socket.SOCK_STREAM
        )[0]
        sockets = [socket.create_server(address[:2], family=family)]
    except OSError as exc:
        raise OSError(
            f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
        ) from None
    admin = _admin_socket(config, guard)
    if admin is not None:
        sockets.append(admin)
    try:
        # The guard reads X-Forwarded-For itself, only from trusted proxies: uvicorn
        # must not rewrite the client address from it (it trusts 127.0.0.1 by default).
        # The guard's HTTP layer is passed as app middleware too, so it is in front
        # whatever auth provider the server has (it runs once if the provider put it
        # there already).
        mcp.run(transport="http", show_banner=False, host=config.host, port=config.port,
                sockets=sockets, middleware=guard.http_middleware(),
                uvicorn_config={"proxy_headers": False})  # fmt: skip
    finally:
        for sock in sockets:
            sock.close()
        if guard.admin_socket is not None:
            Path(guard.admin_socket).unlink(missing_ok=True)


def _admin_socket(config: Any, guard: Any) -> Any:
    """A listening Unix socket (mode 0600) for the admin routes, or ``None`` (with a note
    on stderr) when another live server holds the path or it cannot be made."""
    import os
    import socket

    from fastmcp_guard.admin import admin_socket_path, socket_dir_problem

    path = admin_socket_path(config, config.port)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        problem = socket_dir_problem(path.parent, os.getuid())
        if problem is not None:
            raise OSError(f"another user could swap it: {problem}")
        if path.exists() or path.is_symlink():
            if not path.is_socket():
                raise OSError(f"{path} exists and is not a socket")
            if path.lstat().st_uid != os.getuid():
                raise OSError(f"{path} belongs to uid {path.lstat().st_uid}")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # left by a server that did not stop cleanly
            else:
                raise OSError(f"another server is serving {path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is created 0600: its mode is the credential
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(16)
    except OSError as exc:
        sys.stderr.write(
            f"fastmcp-guard: no local admin socket ({exc}); `fastmcp-guard rate` needs "
            "--admin-key for this server\n"
        )
        return None
    guard.admin_socket = str(path)
    return sock


def load_server(spec: str) -> Any:
    """The FastMCP server named by ``file.py[:object]`` (a factory function is called).

    Raises :class:`UsageError` for a missing file or object, or an object that is not a
    FastMCP server; an exception raised by the file itself propagates (with its traceback:
    that is the server's bug, not a usage error).
    """
    import importlib.util
    import inspect

    from fastmcp import FastMCP

    path_text, _, name = spec.partition(":") if not _is_drive(spec) else (spec, "", "")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise UsageError(f"server file not found: {path_text}")
    path = path.resolve()
    module_name = f"fastmcp_guard_server_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise UsageError(f"cannot load {path_text} as Python (is it a .py file?)")
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # so the server's own imports resolve
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    module_spec.loader.exec_module(module)

    candidates = [name] if name else ["mcp", "server", "app"]
    for candidate in candidates:
        obj = getattr(module, candidate, None)
        if obj is None:
            continue
        if inspect.isfunction(obj) and _is_factory(obj):
            if inspect.iscoroutinefunction(obj):
                import anyio

                obj = anyio.run(obj)
            else:
                obj = obj()
        if isinstance(obj, FastMCP):
            return obj
        if name:
            raise UsageError(
                f"{path_text}:{name} is a {type(obj).__name__}, not a FastMCP server "
                "(or a function returning one)"
            )
    if name:
        raise UsageError(f"{path_text} has no object named {name!r}")
    raise UsageError(
        f"no FastMCP server found in {path_text}: name it mcp, server or app, "
        "or give its name as FILE:OBJECT"
    )


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _is_factory(fn: Any) -> bool:
    """A function callable with no arguments (a server factory), not a tool."""
    import inspect

    params = inspect.signature(fn).parameters.values()
    return all(
        p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params
    )


def _is_drive(spec: str) -> bool:
    """``C:\\...``: a Windows drive, not ``file:object``."""
    return len(spec) > 2 and spec[1] == ":" and spec[2] in "\\/"
