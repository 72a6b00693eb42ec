"""What every command shares: the parser class, global options, configuration, durations.

User errors raise :class:`UsageError` (exit 2) or one of the package's errors, which
:func:`fastmcp_guard.cli.main` turns into one line on stderr and an exit code.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from contextlib import ExitStack

    from fastmcp_guard.config import GuardConfig
    from fastmcp_guard.keys import KeyStore

__all__ = [
    "COMMON",
    "GuardArgumentParser",
    "Handler",
    "UsageError",
    "add_command",
    "add_group",
    "attach_audit",
    "bounded_int",
    "cli_config",
    "parse_duration",
    "parse_instant",
    "store_exists",
    "want_json",
]

#: A command: takes the parsed arguments, returns the exit code.
Handler = Callable[[argparse.Namespace], int]

PROG = "fastmcp-guard"


class UsageError(Exception):
    """Bad command line or bad input: exit code 2. ``prog`` names the command for the hint."""

    def __init__(self, message: str, prog: str | None = None) -> None:
        super().__init__(message)
        self.prog = prog


class GuardArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`UsageError` instead of exiting,
    so that ``main`` prints one line and returns 2 (and tests can call it in-process)."""

    def error(self, message: str) -> Any:  # argparse declares NoReturn
        raise UsageError(message, self.prog)


def _global_options() -> argparse.ArgumentParser:
    """Options accepted before the command and after it (``--db`` as in fastmcp-guard 0.2).

    Their defaults are ``SUPPRESS``, so a value given before the command is not reset
    by the command's parser; read them with ``getattr(args, name, None)``.
    """
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("global options")
    group.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                       help="read this config file (default: ./fastmcp-guard.toml, else "
                       "[tool.fastmcp-guard] in ./pyproject.toml)")  # fmt: skip
    group.add_argument("--keys", metavar="URL", default=argparse.SUPPRESS,
                       help="key store: memory://, sqlite:///rel.db, sqlite:////abs.db or a path "
                       "(env FASTMCP_GUARD_KEYS)")  # fmt: skip
    group.add_argument(
        "--db",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="SQLite key store file (fastmcp-guard 0.2's flag; = --keys sqlite:///PATH)",
    )
    group.add_argument("--audit", metavar="TARGETS", default=argparse.SUPPRESS,
                       help="audit targets, comma-separated: a .jsonl / .db path, jsonl:///path, "
                       "sqlite:///path, http(s)://host/path, otel; or off "
                       "(env FASTMCP_GUARD_AUDIT)")  # fmt: skip
    group.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print JSON for scripts instead of text")  # fmt: skip
    return parent


#: The parent parser of every command (and of the top-level parser).
COMMON = _global_options()


def add_command(
    subparsers: Any,
    name: str,
    *,
    help: str,
    description: str | None = None,
    epilog: str | None = None,
    parents: list[argparse.ArgumentParser] | None = None,
) -> GuardArgumentParser:
    """Add a command (or a command group) that accepts the global options."""
    parser: GuardArgumentParser = subparsers.add_parser(
        name,
        help=help,
        description=description or help,
        epilog=epilog,
        parents=[COMMON, *(parents or [])],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def add_group(
    subparsers: Any, name: str, *, help: str, epilog: str | None = None
) -> tuple[GuardArgumentParser, Any]:
    """Add a command group (``keys``...): its parser and the subparsers for its commands.

    Given without a command, the group prints its help and exits with 2.
    """
    group = add_command(subparsers, name, help=help, epilog=epilog)
    commands = group.add_subparsers(dest=f"{name}_command", metavar="COMMAND")

    def show_help(args: argparse.Namespace) -> int:
        group.print_help(sys.stderr)
        return 2

    group.set_defaults(func=show_help)
    return group, commands


def want_json(args: argparse.Namespace) -> bool:
    """True when ``--json`` was given before or after the command."""
    return bool(getattr(args, "json", False))


def cli_config(args: argparse.Namespace, **settings: Any) -> GuardConfig:
    """The configuration the CLI runs with: options > env > config file > embedded defaults.

    ``settings`` are a command's own options by setting name (``rate=args.rate``...;
    ``None``: not given); their source reads ``argument --<name>``.
    """
    from fastmcp_guard.config import GuardConfig

    db = getattr(args, "db", None)
    keys = getattr(args, "keys", None)
    if db is not None and keys is not None:
        raise UsageError("give --db or --keys, not both (--db PATH means --keys sqlite:///PATH)")
    arguments: dict[str, Any] = {}
    labels: dict[str, str] = {}
    if db is not None:
        if not db.strip():
            raise UsageError("argument --db: empty path")
        arguments["keys"], labels["keys"] = f"sqlite:///{db}", "argument --db"
    elif keys is not None:
        arguments["keys"], labels["keys"] = keys, "argument --keys"
    audit = getattr(args, "audit", None)
    if audit is not None:
        arguments["audit"], labels["audit"] = audit, "argument --audit"
    for name, value in settings.items():
        if value is not None:
            arguments[name], labels[name] = value, f"argument --{name.replace('_', '-')}"
    config_file = getattr(args, "config", None)
    return GuardConfig.load(arguments, profile="embedded", labels=labels,
                            config_file=config_file)  # fmt: skip


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE | re.ASCII)
_UNITS = {
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
    "w": 604800.0, "week": 604800.0, "weeks": 604800.0,
}  # fmt: skip

#: The longest duration any option takes: 36500 days (100 years). Key expiries, grace
#: periods and ``--since 30d`` all fit; beyond it a date would leave what the store, the
#: audit scanner and Python's ``datetime`` can hold.
MAX_DURATION_DAYS = 36500
MAX_DURATION_SECONDS = MAX_DURATION_DAYS * 86400.0


def parse_duration(
    text: str,
    *,
    bare_unit: str,
    option: str,
    allow_zero: bool,
    maximum: float = MAX_DURATION_SECONDS,
) -> float:
    """Seconds in ``30d``, ``12h``, ``90m``, ``45s``, ``2w``; a bare number is in ``bare_unit``.

    The result is finite, at least 0 (more than 0 unless ``allow_zero``) and at most
    ``maximum`` seconds (default :data:`MAX_DURATION_SECONDS`). Raises :class:`UsageError`
    naming the option for anything else (``3x``, ``-1``, ``99999999d``...).
    """
    match = _DURATION.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or (unit and unit not in _UNITS):
        raise UsageError(
            f"argument {option}: bad duration {_shown(text)}; expected a number of {bare_unit}s "
            "or a number with a unit s, m, h, d or w (e.g. 30d, 12h, 90m)"
        )
    seconds = float(match.group(1)) * _UNITS[unit or bare_unit]
    if seconds == 0 and not allow_zero:
        raise UsageError(f"argument {option}: the duration must be more than 0, got {_shown(text)}")
    if not seconds <= maximum:  # also refuses inf (a number too long for a float)
        raise UsageError(
            f"argument {option}: the duration {_shown(text)} is too long; the most is "
            f"{_human_seconds(maximum)}"
        )
    return seconds


def _shown(text: str, limit: int = 40) -> str:
    """``text`` quoted for a message, cut to ``limit`` characters (one line, whatever the
    input)."""
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _human_seconds(seconds: float) -> str:
    days = seconds / 86400.0
    if days >= 1 and days == int(days):
        return f"{int(days)}d"
    return f"{seconds:g}s"


#: What ``--since`` / ``--until`` may name: UTC instants within years 1 to 9999 (the
#: audit scanner's range), a day kept clear of each end for time zone offsets.
_MIN_INSTANT = -62135510400.0  # 0001-01-02T00:00:00Z
_MAX_INSTANT = 253402128000.0  # 9999-12-30T00:00:00Z


def parse_instant(text: str, *, option: str, now: float | None = None) -> float:
    """Unix seconds of ``1h`` / ``7d`` (that long ago; a bare number is seconds) or of an
    ISO 8601 time (naive = UTC), within years 1 to 9999. Raises :class:`UsageError`
    naming the option for anything else."""
    from datetime import datetime, timezone

    text = text.strip()
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        seconds = parse_duration(text, bare_unit="second", option=option, allow_zero=True)
        return (time.time() if now is None else now) - seconds
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    try:
        stamp = when.timestamp()
    except (OverflowError, ValueError):
        stamp = float("nan")
    if not _MIN_INSTANT <= stamp <= _MAX_INSTANT:
        raise UsageError(
            f"argument {option}: {_shown(text)} is out of range; give a time between years 1 and "
            "9999, or a duration ago such as 7d"
        )
    return stamp


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type`` for an integer from ``low`` to ``high`` (ASCII digits)."""

    def parse(text: str) -> int:
        t = text.strip()
        digits = t.removeprefix("-")
        if not (0 < len(digits) <= 30 and digits.isascii() and digits.isdigit()):
            raise argparse.ArgumentTypeError(f"expected a whole number, got {_shown(text)}")
        value = int(t)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high:,}, got {_shown(text)}")
        return value

    parse.__name__ = "integer"  # how argparse names the type in messages
    return parse


def store_exists(config: GuardConfig) -> bool:
    """False for an SQLite store whose file does not exist yet."""
    return config.keys.backend != "sqlite" or os.path.exists(config.keys.path or "")


#: The spool of the CLI's own events under ``audit_http_spool`` (the server locks the
#: spool directory itself while it runs).
CLI_SPOOL = "cli"


def attach_audit(store: KeyStore, config: GuardConfig, stack: ExitStack) -> None:
    """Send the store's lifecycle events to the configured audit log (flushed and closed
    by ``stack``, before the process exits); nothing when the audit log is off.

    An HTTP target spools into ``<audit_http_spool>/cli``, not the server's spool, which
    the running server holds: closing ships the command's events (for up to the
    backend's ``drain_timeout``), and what the endpoint did not take by then is shipped
    by the next command that logs."""
    audit = config.audit_log(http_spool=os.path.join(config.audit_http_spool, CLI_SPOOL))
    if audit is not None:
        stack.callback(audit.close)
        store.audit = audit
