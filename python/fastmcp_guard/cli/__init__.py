"""The ``fastmcp-guard`` command: ``main(argv) -> int``, testable in-process.

Each command group lives in its own module with a ``register(subparsers)`` function;
adding a group is one entry in :data:`GROUPS`. Modules import their heavy
dependencies (the key store, rich) inside the command, so ``fastmcp-guard keys
create`` starts without importing FastMCP.

Exit codes: 0 ok; 1 not found or refused (unknown key, revoked key, declined
confirmation, unreachable store), or a broken installation (the Rust extension
``fastmcp_guard._core`` cannot be loaded: reinstall, or ``make build-dev`` in a source
checkout); 2 usage or bad input (bad option, duration, rate, URL, config value, unknown
``FASTMCP_GUARD_*`` variable). Errors are one line on stderr: ``fastmcp-guard: error: ...``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from fastmcp_guard.cli._common import COMMON, PROG, GuardArgumentParser, UsageError
from fastmcp_guard.cli._output import error

__all__ = ["GROUPS", "build_parser", "main", "run_main"]

#: Command-group modules (``fastmcp_guard.cli.<name>``), each with ``register(subparsers)``.
GROUPS: tuple[str, ...] = ("keys", "audit", "rate", "usage", "run", "config_cmd")

_EPILOG = """\
examples:
  fastmcp-guard keys create --name alice --scopes read:data,write:data
  fastmcp-guard keys list
  fastmcp-guard keys rotate fmg_key_3kQ... --grace 24h
  fastmcp-guard keys revoke fmg_key_3kQ...
  fastmcp-guard config

Global options go before or after the command. Defaults: keys in
./fastmcp-guard-keys.db, audit log in ./fastmcp-guard-audit.jsonl (the files a server
started with `fastmcp-guard run` uses); see `fastmcp-guard config`.
"""


def build_parser() -> GuardArgumentParser:
    """The full parser: global options and every command group in :data:`GROUPS`."""
    from fastmcp_guard._core import __version__

    parser = GuardArgumentParser(
        prog=PROG,
        description="The operations CLI of fastmcp-guard: manage the API keys (keys),\n"
        "follow, search, export and verify the audit log (audit), see and reset live\n"
        "rate limits (rate), read the usage per key, tool and day (usage), serve a\n"
        "FastMCP server under the guard (run), and show the configuration (config).",
        epilog=_EPILOG,
        parents=[COMMON],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in GROUPS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    problem = _core_problem()
    if problem is not None:
        error(problem)
        return 1
    try:
        parser = build_parser()
        if not (sys.argv[1:] if argv is None else argv):
            parser.print_help(sys.stderr)
            return 2
        args = parser.parse_args(argv)
        return int(args.func(args))
    except UsageError as exc:
        hint = f" (see `{exc.prog} --help`)" if exc.prog else ""
        error(f"{exc}{hint}")
        return 2
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    except BrokenPipeError:  # e.g. `fastmcp-guard keys list | head -1`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as exc:
        code = _user_error_code(exc)
        if code is None:
            raise  # a bug: keep the traceback
        error(_message(exc))
        return code


def run_main() -> None:
    """Console-script entry point (``fastmcp-guard``)."""
    sys.exit(main())


def _core_problem() -> str | None:
    """Why the Rust extension cannot be loaded (one line saying what to do), or ``None``.

    Every command needs it, and so does the error handling (the exception classes live
    there): without this check a broken install or a rebuild in progress shows two
    tracebacks."""
    try:
        import fastmcp_guard._core  # noqa: F401 - loading it is the check
    except ImportError as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return (
            f"the fastmcp-guard extension module (fastmcp_guard._core) cannot be loaded: "
            f"{reason}; reinstall fastmcp-guard (pip install --force-reinstall "
            "fastmcp-guard), or in a source checkout rebuild it with `make build-dev` "
            "(wait for a rebuild in progress to finish)"
        )
    return None


def _user_error_code(exc: BaseException) -> int | None:
    """The exit code of a user error, or ``None`` for an unexpected exception."""
    from fastmcp_guard import errors

    if isinstance(exc, (errors.KeyNotFoundError, errors.KeyRevokedError)):
        return 1
    if isinstance(exc, errors.MissingExtraError):
        return 2
    if isinstance(exc, errors.GuardError) and isinstance(exc, ValueError):
        return 2  # ConfigError, InvalidRateError, InvalidIPError, InvalidKeyInputError
    if isinstance(exc, (errors.GuardError, OSError)):
        return 1  # StoreError, AuditWriteError, an unreachable store or file
    return None


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])  # str(KeyError) would add quotes
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc) or type(exc).__name__
