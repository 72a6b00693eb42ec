"""One configuration model for ``Guard(...)``, the CLI and ``fastmcp-guard run``.

Each setting is looked up, first match wins, in:

1. explicit arguments (``Guard(keys=...)``, the CLI's ``--keys`` / ``--db`` / ``--audit``...);
2. the environment (``FASTMCP_GUARD_<NAME>``; an empty variable counts as unset);
3. a config file: the one named by ``--config`` or ``FASTMCP_GUARD_CONFIG``, else
   ``fastmcp-guard.toml`` in the current directory, else the ``[tool.fastmcp-guard]``
   table of ``./pyproject.toml`` (file keys are the lowercase names: ``keys``,
   ``rate``, ``allow``...). ``FASTMCP_GUARD_CONFIG=off`` reads no file;
4. the defaults of a profile: ``library`` (``Guard(mcp)`` in code: keys in memory,
   no audit log, as fastmcp-guard 0.2) or ``embedded`` (the CLI and ``fastmcp-guard
   run``: keys in ``fastmcp-guard-keys.db`` and the audit log in
   ``fastmcp-guard-audit.jsonl``, both in the current directory).

Every value remembers where it came from (:meth:`GuardConfig.source`), and bad values
fail at load with a :class:`InvalidSettingError` naming the setting and its source.
Relative paths from a config file resolve against that file's directory; from the
environment, arguments and defaults against the current directory.

Each setting is one row of the table ``_SETTINGS`` (after the parsers): its description,
parser, raw defaults per profile, and whether it is secret or concerns one kind of audit
target. Most rows share a generic parser (a choice of words, a bounded integer, a list, a
boolean); :meth:`GuardConfig.load` runs the same loop over every row.

```python
config = GuardConfig.load(profile="embedded")
config.source("keys")        # 'env FASTMCP_GUARD_KEYS'
store = config.key_store()   # the KeyStore the server reads
```

This module imports neither FastMCP nor the backends: the factories import them on
first use, so the CLI starts fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import SplitResult, urlsplit

from fastmcp_guard._util import DEFAULT_LOOP_BREAKER, MASK, mask_url
from fastmcp_guard.errors import ConfigError

# Why not pydantic-settings (2.16, installed with FastMCP)? Tried as a BaseSettings with
# env_prefix, a TOML source and extra="forbid": it records no source per value (only
# model_fields_set), resolves no path against its config file's directory, parses lists
# from the environment as JSON (`10.0.0.1, ::1` fails), keeps a blank variable as a value,
# ignores a misspelt FASTMCP_GUARD_* variable, takes "y"/"t" as booleans, and its errors
# name neither the variable nor the file and echo the input (secrets included). Keeping
# today's behaviour meant rewrapping every source and error: more code than it saves, and
# importing pydantic-settings adds ~0.4 s to every CLI start. So: a table of settings and
# generic parsers.

if TYPE_CHECKING:
    from fastmcp_guard.audit import AuditLog, Backend
    from fastmcp_guard.ip import IPPolicy
    from fastmcp_guard.keys import KeyStore
    from fastmcp_guard.rate import RateLimit

__all__ = [
    "CONFIG_ENV",
    "CONFIG_FILE_NAME",
    "ENV_PREFIX",
    "OTHER_ENV",
    "SETTINGS",
    "AuditTarget",
    "GuardConfig",
    "InvalidSettingError",
    "KeysTarget",
    "Profile",
    "SettingView",
    "known_env_names",
    "load_config",
]

#: Prefix of every environment variable.
ENV_PREFIX = "FASTMCP_GUARD_"
#: Environment variable naming a config file (``off`` / ``none``: read no file).
CONFIG_ENV = "FASTMCP_GUARD_CONFIG"
#: The config file looked for in the current directory.
CONFIG_FILE_NAME = "fastmcp-guard.toml"
#: The table read from ``./pyproject.toml`` when there is no ``fastmcp-guard.toml``.
PYPROJECT_TABLE = ("tool", "fastmcp-guard")

Profile = Literal["library", "embedded"]
Transport = Literal["http", "stdio"]

#: ``FASTMCP_GUARD_*`` variables that are not settings: name -> what it holds. With the
#: settings' variables (``ENV_PREFIX`` + the upper-case setting name) these are every
#: variable of the prefix the package reads; any other one fails :meth:`GuardConfig.load`
#: (a misspelling such as ``FASTMCP_GUARD_ALLOWED`` must not be ignored silently).
OTHER_ENV: dict[str, str] = {
    CONFIG_ENV: "the config file to read (off: none)",
    # fastmcp_guard.guard.ENV_KEY (not imported here: this module stays light).
    "FASTMCP_GUARD_KEY": "the API key that identifies stdio and in-process callers",
}


def known_env_names() -> frozenset[str]:
    """Every ``FASTMCP_GUARD_*`` variable the package reads."""
    return frozenset(ENV_PREFIX + name.upper() for name in SETTINGS) | frozenset(OTHER_ENV)


_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_FLEET_SCHEMES = {"postgresql": "postgres", "postgres": "postgres", "redis": "redis",
                  "rediss": "redis"}  # fmt: skip
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_OFF = frozenset({"off", "none"})

DEFAULT_KEYS_FILE = "fastmcp-guard-keys.db"
DEFAULT_AUDIT_FILE = "fastmcp-guard-audit.jsonl"
DEFAULT_AUDIT_SPOOL = "fastmcp-guard-audit-spool"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
#: The embedded profile's JSONL rotation: 100 MB per file, 10 rotated files kept.
DEFAULT_ROTATE_BYTES = 100 * 10**6
DEFAULT_RETENTION = 10

#: Bounds of the numeric settings (inclusive).
MAX_ROTATE_BYTES = 2**40  # 1 TiB
MAX_RETENTION = 100_000
MIN_FLUSH_INTERVAL_MS, MAX_FLUSH_INTERVAL_MS = 1, 60_000


class InvalidSettingError(ConfigError):
    """A setting's value was refused; ``setting`` and ``source`` say which and from where."""

    def __init__(self, setting: str, source: str, reason: str) -> None:
        self.setting = setting
        self.source = source
        self.reason = reason
        super().__init__(f"bad value for setting {setting!r} (from {source}): {reason}")


# -- value types -----------------------------------------------------------------------


@dataclass(frozen=True)
class KeysTarget:
    """Where API keys are kept: ``memory``, ``sqlite`` (``path`` absolute) or a fleet
    backend (``postgres`` / ``redis``, ``dsn`` the connection URL)."""

    backend: Literal["memory", "sqlite", "postgres", "redis"]
    path: str | None = None
    dsn: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The store as a URL (unmasked: may hold a password; print :meth:`masked`)."""
        if self.backend == "memory":
            return "memory://"
        if self.backend == "sqlite":
            return f"sqlite:///{self.path}"
        return self.dsn or f"{self.backend}://"

    def masked(self) -> str:
        """The URL with any password replaced by ``****``."""
        return mask_url(self.url)

    def __str__(self) -> str:
        return self.masked()


AuditKind = Literal["jsonl", "sqlite", "http", "otel"]


@dataclass(frozen=True)
class AuditTarget:
    """One place audit events go: ``jsonl`` or ``sqlite`` at ``path`` (absolute), ``http``
    to ``endpoint`` (an ``http://`` / ``https://`` URL, which may hold a password: print
    :meth:`masked`), or ``otel`` (the host's OpenTelemetry tracer provider).
    ``GuardConfig.audit`` is a tuple of them, at most one of each kind (empty: off)."""

    kind: AuditKind
    path: str | None = None
    endpoint: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """``jsonl:///<abs path>``, ``sqlite:///<abs path>``, the endpoint (unmasked) or
        ``otel``."""
        if self.kind == "http":
            return self.endpoint or ""
        if self.kind == "otel":
            return "otel"
        return f"{self.kind}:///{self.path}"

    def masked(self) -> str:
        """:attr:`url` with any password replaced by ``****``."""
        return mask_url(self.url)

    def __str__(self) -> str:
        return self.masked()

    def __repr__(self) -> str:
        return f"AuditTarget({self.kind!r}, {self.masked()!r})"


@dataclass(frozen=True)
class SettingView:
    """One setting as shown to people: masked display value and its source."""

    name: str
    env: str
    value: Any
    display: str
    source: str


# -- parsers: raw value -> typed value, or InvalidSettingError --------------------------


@dataclass(frozen=True)
class _Raw:
    """An unparsed value, where it came from, and the directory relative paths start at."""

    value: Any
    source: str
    base: Path


#: A parser takes the raw value and the setting's name (for its errors).
_Parser = Callable[[_Raw, str], Any]


def _str(item: _Raw, name: str) -> str:
    if not isinstance(item.value, str):
        raise InvalidSettingError(name, item.source, f"expected a string, got {item.value!r}")
    text = item.value.strip()
    if not text:
        raise InvalidSettingError(name, item.source, "empty value")
    return text


def _path(text: str, base: Path) -> str:
    """``text`` (``~`` expanded) as a normalised absolute path, relative ones from ``base``."""
    return os.path.abspath(os.path.join(base, os.path.expanduser(text)))


def _int_text(text: str) -> int | None:
    """The value of ``text`` if it is a plain decimal integer of ASCII digits (at most 30:
    larger ones are out of every bound anyway), else ``None``. ``str.isdigit`` would let
    through digits ``int`` refuses (``"²"``)."""
    text = text.strip()
    if not 0 < len(text) <= 30 or not text.isascii() or not text.isdigit():
        return None
    return int(text)


# Generic parsers: each call makes the parser of one kind of setting.


def _choice(*words: str, expected: str | None = None) -> _Parser:
    """One of ``words`` (any case); the error says ``expected <expected>``."""
    expected = expected or ", ".join(map(repr, words[:-1])) + f" or {words[-1]!r}"

    def parse(item: _Raw, name: str) -> str:
        text = _str(item, name).lower()
        if text not in words:
            raise InvalidSettingError(name, item.source,
                                      f"expected {expected}, got {item.value!r}")  # fmt: skip
        return text

    return parse


def _integer(
    low: int, high: int, error: str, *, off: bool = False, units: Mapping[str, int] | None = None
) -> _Parser:
    """An integer from ``low`` to ``high``: a TOML integer or a decimal string; ``off`` /
    ``none`` give ``None`` if ``off``; with ``units`` a string is a number and a unit
    (``100MB``; spaces and ``_`` ignored, ``off`` allowed). ``error`` is the message, with
    ``{value!r}`` for the value given."""

    def parse(item: _Raw, name: str) -> int | None:
        value = item.value
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif units is not None:
            text = _str(item, name).lower().replace(" ", "").replace("_", "")
            if text in _OFF:
                return None
            digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
            count, unit = _int_text(digits), text[len(digits) :]
            number = count * units[unit] if count is not None and unit in units else None
        elif isinstance(value, str):
            if off and value.strip().lower() in _OFF:
                return None
            number = _int_text(value)
        if number is None or not low <= number <= high:
            raise InvalidSettingError(name, item.source, error.format(value=value))
        return number

    return parse


def _list(what: str, check: Callable[[list[str], _Raw, str], None]) -> _Parser:
    """A list of strings: comma-separated (empty entries dropped) or a TOML array; each
    entry stripped, then the whole list passed to ``check``."""

    def parse(item: _Raw, name: str) -> tuple[str, ...]:
        value = item.value
        if isinstance(value, str):
            entries = [e.strip() for e in value.split(",") if e.strip()]
        elif isinstance(value, (list, tuple)) and all(isinstance(e, str) for e in value):
            entries = [e.strip() for e in value]
        else:
            raise InvalidSettingError(
                name, item.source, f"expected a list of {what}, got {value!r}"
            )
        check(entries, item, name)
        return tuple(entries)

    return parse


def _parse_bool(item: _Raw, name: str) -> bool:
    value = item.value
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise InvalidSettingError(
        name, item.source, f"expected a boolean (1/0, true/false, yes/no, on/off), got {value!r}"
    )


def _parse_secret(item: _Raw, name: str) -> str | None:
    if not isinstance(item.value, str):  # do not show it: it is a secret
        raise InvalidSettingError(name, item.source,
                                  f"expected a string, got {type(item.value).__name__}")  # fmt: skip
    return _str(item, name)


def _parse_dir(item: _Raw, name: str) -> str:
    return _path(_str(item, name), item.base)


def _parse_host(item: _Raw, name: str) -> str:
    text = _str(item, name)
    if any(c.isspace() for c in text):
        raise InvalidSettingError(name, item.source,
                                  f"expected a host name or address, got {text!r}")  # fmt: skip
    return text


# Parsers of one setting each: URLs, targets, rates, addresses, headers.


def _url_parts(text: str, item: _Raw, name: str, hint: str = "") -> SplitResult:
    """``urlsplit(text)`` with its port checked (the error masks the URL's secrets)."""
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError as exc:
        raise InvalidSettingError(name, item.source, f"{mask_url(text)!r}: {exc}{hint}") from None
    return parts


def _sqlite_path(url: str, item: _Raw, name: str) -> str:
    """The file of ``sqlite:///rel`` / ``sqlite:////abs`` (SQLAlchemy style)."""
    rest = url.split("://", 1)[1]
    if not rest.startswith("/"):
        raise InvalidSettingError(
            name, item.source,
            f"{url!r} has a host part; write sqlite:///relative/path.db or "
            "sqlite:////absolute/path.db",
        )  # fmt: skip
    if not rest[1:]:
        raise InvalidSettingError(name, item.source, f"{url!r} names no file")
    return _path(rest[1:], item.base)


def _parse_keys(item: _Raw, name: str) -> KeysTarget:
    text = _str(item, name)
    if "://" not in text:
        if text.lower() == "memory":
            return KeysTarget("memory")
        return KeysTarget("sqlite", path=_path(text, item.base))
    scheme = text.split("://", 1)[0].lower()
    if scheme == "memory":
        if text.split("://", 1)[1] not in ("", "/"):
            raise InvalidSettingError(name, item.source, f"{text!r}: memory:// takes no path")
        return KeysTarget("memory")
    if scheme == "sqlite":
        return KeysTarget("sqlite", path=_sqlite_path(text, item, name))
    if scheme in _FLEET_SCHEMES:
        if not urlsplit(text).hostname:
            raise InvalidSettingError(name, item.source, f"{mask_url(text)!r} names no host")
        backend: Literal["postgres", "redis"] = (
            "postgres" if _FLEET_SCHEMES[scheme] == "postgres" else "redis"
        )
        return KeysTarget(backend, dsn=text)
    raise InvalidSettingError(
        name, item.source,
        f"unknown key store URL scheme {scheme + '://'!r} in {mask_url(text)!r}; expected "
        "memory://, sqlite:///path.db, postgresql://..., redis://... or a file path",
    )  # fmt: skip


_AUDIT_EXAMPLE = "e.g. ./audit.jsonl,https://siem.example/ingest,otel"


def _parse_audit(item: _Raw, name: str) -> tuple[AuditTarget, ...]:
    """``off``, or one or more targets: comma-separated in a string, or a TOML array."""
    value = item.value
    if isinstance(value, str):
        if value.strip().lower() in _OFF:
            return ()
        elements = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(e, str) for e in value):
        elements = list(value)
        if not elements:
            raise InvalidSettingError(
                name, item.source,
                "an empty list; give at least one target, or write audit = \"off\"",
            )  # fmt: skip
    else:
        raise InvalidSettingError(
            name, item.source,
            "expected a target or a list of targets (strings: paths, jsonl:///..., "
            f"sqlite:///..., http(s)://..., otel), got {type(value).__name__}",
        )  # fmt: skip
    targets: list[AuditTarget] = []
    for position, element in enumerate(elements, 1):
        text = element.strip()
        if not text:
            raise InvalidSettingError(
                name, item.source,
                f"target {position} of {len(elements)} is empty (a doubled or trailing "
                f"comma?); separate targets with single commas, {_AUDIT_EXAMPLE}",
            )  # fmt: skip
        if text.lower() in _OFF:
            if len(elements) == 1:  # ["off"]
                return ()
            raise InvalidSettingError(
                name, item.source,
                f"{text!r} cannot be combined with other targets; write it alone to turn the "
                "audit log off, or drop it from the list",
            )  # fmt: skip
        target = _audit_target(text, item, name)
        same = next((t for t in targets if t.kind == target.kind), None)
        if same is not None:
            raise InvalidSettingError(
                name, item.source,
                f"two {target.kind} targets ({same.masked()!r} and {target.masked()!r}); "
                "give at most one of each kind (jsonl, sqlite, http, otel)",
            )  # fmt: skip
        targets.append(target)
    return tuple(targets)


def _audit_target(text: str, item: _Raw, name: str) -> AuditTarget:
    if text.lower() == "otel":
        return AuditTarget("otel")
    if "://" not in text:
        path = _path(text, item.base)
        kind: AuditKind = "sqlite" if path.lower().endswith(_SQLITE_SUFFIXES) else "jsonl"
        return AuditTarget(kind, path)
    scheme = text.split("://", 1)[0].lower()
    if scheme in ("jsonl", "sqlite"):
        return AuditTarget("sqlite" if scheme == "sqlite" else "jsonl",
                           _sqlite_path(text, item, name))  # fmt: skip
    if scheme in ("http", "https"):
        parts = _url_parts(text, item, name,
                           f"; write {scheme}://host[:port]/path with a port 1-65535")  # fmt: skip
        if not parts.hostname:
            raise InvalidSettingError(
                name, item.source,
                f"{mask_url(text)!r} names no host; write {scheme}://host[:port]/path",
            )  # fmt: skip
        return AuditTarget("http", endpoint=text)
    raise InvalidSettingError(
        name, item.source,
        f"unknown audit target scheme {scheme + '://'!r} in {mask_url(text)!r}; expected a "
        "path, jsonl:///path, sqlite:///path, http://host/path, https://host/path, otel "
        "(no URL) or off",
    )  # fmt: skip


#: A header name: an RFC 9110 token.
_HEADER_NAME = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
                         "ABCDEFGHIJKLMNOPQRSTUVWXYZ")  # fmt: skip
_HEADERS_EXAMPLE = "Authorization: Bearer <token>; X-Tenant: acme"


def _parse_headers(item: _Raw, name: str) -> tuple[tuple[str, str], ...]:
    """``Name: value`` pairs separated by ``;``, or a TOML table. Error messages never
    show a value (they are secrets)."""
    value = item.value
    if isinstance(value, str):
        pairs: list[tuple[str, Any]] = []
        parts = [part for part in value.split(";") if part.strip()]  # a trailing ';' is fine
        for position, part in enumerate(parts, 1):
            header, colon, text = part.partition(":")
            if not colon:
                raise InvalidSettingError(
                    name, item.source,
                    f"header {position} has no ':' between its name and value; write "
                    f"'Name: value' pairs separated by ';' ({_HEADERS_EXAMPLE})",
                )  # fmt: skip
            pairs.append((header.strip(), text))
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        raise InvalidSettingError(
            name, item.source,
            f"expected 'Name: value' pairs separated by ';' ({_HEADERS_EXAMPLE}) or a TOML "
            f"table, got {type(value).__name__}",
        )  # fmt: skip
    out: list[tuple[str, str]] = []
    for position, (header, text) in enumerate(pairs, 1):
        if not header or not set(header) <= _HEADER_NAME:  # not shown: it may hold a secret
            raise InvalidSettingError(
                name, item.source,
                f"the name of header {position} is not a header name (letters, digits and "
                f"!#$%&'*+-.^_`|~ only); write 'Name: value' pairs separated by ';' "
                f"({_HEADERS_EXAMPLE})",
            )  # fmt: skip
        if not isinstance(text, str) or not text.strip():
            raise InvalidSettingError(name, item.source,
                                      f"header {header!r} has no value (a string)")  # fmt: skip
        if any(c in text for c in "\r\n\0"):
            raise InvalidSettingError(
                name, item.source, f"the value of header {header!r} holds a line break"
            )
        if any(h.lower() == header.lower() for h, _ in out):
            raise InvalidSettingError(name, item.source, f"header {header!r} is given twice")
        out.append((header, text.strip()))
    return tuple(out)


def _parse_ca_file(item: _Raw, name: str) -> str | None:
    from fastmcp_guard._util import ca_file_problem

    path = _path(_str(item, name), item.base)
    problem = ca_file_problem(path)
    if problem is not None:
        raise InvalidSettingError(name, item.source, problem)
    return path


def _parse_rate(item: _Raw, name: str) -> str | None:
    text = _str(item, name)
    if text.lower() in _OFF:
        return None
    from fastmcp_guard._core import InvalidRateError, parse_rate

    try:
        parse_rate(text)
    except InvalidRateError as exc:
        raise InvalidSettingError(name, item.source, str(exc)) from None
    return text


_COSTS_EXAMPLE = "expensive=5,search=2"


def _parse_tool_costs(item: _Raw, name: str) -> tuple[tuple[str, int], ...]:
    """``name=units`` pairs separated by commas, or a TOML table ``{expensive = 5}``."""
    value = item.value
    pairs: list[tuple[Any, Any]]
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, str):
        pairs = []
        for entry in (e.strip() for e in value.split(",")):
            if not entry:
                continue
            tool, sep, units = entry.partition("=")
            if not sep:
                raise InvalidSettingError(
                    name, item.source,
                    f"{entry!r} is not a tool=units pair; write e.g. {_COSTS_EXAMPLE!r}",
                )  # fmt: skip
            number = _int_text(units)
            pairs.append((tool.strip(), units.strip() if number is None else number))
    else:
        raise InvalidSettingError(
            name, item.source,
            f"expected tool=units pairs ({_COSTS_EXAMPLE!r}) or a TOML table, got {value!r}",
        )  # fmt: skip
    out: dict[str, int] = {}
    for tool, units in pairs:
        if not isinstance(tool, str) or not tool:
            raise InvalidSettingError(name, item.source, f"{tool!r} is not a tool name")
        if tool in out:
            raise InvalidSettingError(name, item.source, f"tool {tool!r} is given twice")
        from fastmcp_guard._core import ArgumentTypeError, InvalidArgumentError, check_cost

        try:
            out[tool] = check_cost(units)  # the limiters' own check
        except (InvalidArgumentError, ArgumentTypeError) as exc:
            raise InvalidSettingError(name, item.source, f"the cost of {tool!r}: {exc}") from None
    return tuple(out.items())


def _parse_rate_url(item: _Raw, name: str) -> str | None:
    text = _str(item, name)
    if urlsplit(text).scheme not in ("redis", "rediss", "unix"):
        raise InvalidSettingError(
            name, item.source,
            f"{mask_url(text)!r} is not a Redis URL; expected redis://[[user]:password@]"
            "host:port/db, rediss://... (TLS) or unix:///path/redis.sock",
        )  # fmt: skip
    parts = _url_parts(text, item, name)
    if parts.scheme != "unix" and not parts.hostname:
        raise InvalidSettingError(name, item.source, f"{mask_url(text)!r} names no host")
    return text


def _parse_url(item: _Raw, name: str) -> str:
    text = _str(item, name)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidSettingError(
            name, item.source,
            f"{mask_url(text)!r} is not an http(s) URL; expected e.g. http://127.0.0.1:8000",
        )  # fmt: skip
    _url_parts(text, item, name)
    return text.rstrip("/")


def _check_addresses(entries: list[str], item: _Raw, name: str) -> None:
    from fastmcp_guard._core import InvalidIPError, IPMatcher

    try:
        IPMatcher(**{name: entries})
    except InvalidIPError as exc:
        raise InvalidSettingError(name, item.source, str(exc)) from None


def _check_key_paths(entries: list[str], item: _Raw, name: str) -> None:
    for entry in entries:
        segments = entry.split(".")
        if not entry or any(not s or ("*" in s and s != "*") for s in segments):
            raise InvalidSettingError(
                name, item.source,
                f"{entry!r} is not a key path; write names separated by dots, with * for any "
                "one key (password, *.token, headers.authorization)",
            )  # fmt: skip


# -- the settings: one row each ---------------------------------------------------------

#: ``_Setting.embedded`` when the embedded profile's default is the library one.
_LIKE_LIBRARY: Any = object()


@dataclass(frozen=True)
class _Setting:
    """One setting: what it is, its parser, its raw defaults, and how it is shown."""

    doc: str
    parse: _Parser
    #: The raw default (parsed like any other value) of the ``library`` profile...
    default: Any
    #: ...and of the ``embedded`` one.
    embedded: Any = _LIKE_LIBRARY
    #: Shown as ``****`` only.
    secret: bool = False
    #: How ``None`` is shown.
    unset: str = "off"
    #: The one kind of audit target the setting concerns: set while ``audit`` names none
    #: of that kind, it is refused (it would do nothing).
    only_for: AuditKind | None = None

    def default_for(self, profile: Profile) -> Any:
        if profile == "embedded" and self.embedded is not _LIKE_LIBRARY:
            return self.embedded
        return self.default


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
               "kib": 2**10, "mib": 2**20, "gib": 2**30}  # fmt: skip
_ADDRESSES = _list("addresses / CIDRs", _check_addresses)
_MODE = _choice("enforce", "shadow", expected="'enforce' (refuse) or 'shadow' (audit only)")

#: Every setting, in the order ``fastmcp-guard config`` shows them and they are checked.
#: The file key is the name; the environment variable ``FASTMCP_GUARD_`` + the name in
#: upper case. The embedded profile (the CLI, ``fastmcp-guard run``) keeps keys and the
#: audit log in files, and rotates the JSONL log at 100 MB keeping 10 files (a flood of
#: refusals must not fill the disk).
_SETTINGS: dict[str, _Setting] = {
    "keys": _Setting(
        "key store URL: memory://, sqlite:///rel.db, sqlite:////abs.db or a path",
        _parse_keys, "memory://", f"sqlite:///{DEFAULT_KEYS_FILE}"),
    "audit": _Setting(
        "audit targets, comma-separated (a list in TOML): a path (*.db|*.sqlite|"
        "*.sqlite3: SQLite, else JSONL), jsonl:///path, sqlite:///path, http(s)://host/path "
        "(an HTTP endpoint; password masked), otel; or off",
        _parse_audit, "off", DEFAULT_AUDIT_FILE),
    "rate": _Setting("per-key rate limit, e.g. 100/minute (off: none)", _parse_rate, "off"),
    "global_rate": _Setting("global rate limit across all callers (off: none)", _parse_rate,
                            "off"),
    "rate_backend": _Setting(
        "where rate limits live: memory (per process) or redis (shared by a fleet)",
        _choice("memory", "redis", expected="'memory' (limits per process) or 'redis' (shared)"),
        "memory"),
    "rate_url": _Setting(
        "Redis URL of the shared rate limiter, e.g. redis://:password@host:6379/0 "
        "(rate_backend redis; secret parts masked)", _parse_rate_url, None),
    "rate_on_backend_error": _Setting(
        "when Redis is unreachable: allow, deny or local (in-process limits until it answers)",
        _choice("allow", "deny", "local"), "allow"),
    "rate_mode": _Setting(
        "rate and global_rate: enforce, or shadow (never refuse; audit would_refuse)",
        _MODE, "enforce"),
    "loop_breaker": _Setting(
        "most identical calls (same caller, tool and arguments) in a window (off: none)",
        _parse_rate, DEFAULT_LOOP_BREAKER),
    "loop_breaker_mode": _Setting(
        "the loop breaker: shadow (audit would_refuse only) or enforce (refuse loops)",
        _MODE, "shadow"),
    "tool_costs": _Setting(
        f"units per call of named tools: {_COSTS_EXAMPLE} (a table in TOML; others cost 1)",
        _parse_tool_costs, ""),
    "credits_mode": _Setting(
        "keys with credits: enforce, or shadow (run out: audit would_refuse, admit)",
        _MODE, "enforce"),
    "budget_meta": _Setting(
        "put the caller's remaining budget in every result's _meta (fastmcp-guard/budget)",
        _parse_bool, True),
    "allow": _Setting("client addresses / CIDRs admitted (empty: everyone not denied)",
                      _ADDRESSES, ()),
    "deny": _Setting("client addresses / CIDRs refused", _ADDRESSES, ()),
    "trusted_proxies": _Setting("proxies whose X-Forwarded-For is honoured", _ADDRESSES, ()),
    "ip_mode": _Setting(
        "the IP policy: enforce, or shadow (never refuse; audit would_refuse)", _MODE,
        "enforce"),
    "log_inputs": _Setting("record tool arguments in the audit log", _parse_bool, True),
    "log_outputs": _Setting("record a preview of tool results in the audit log", _parse_bool,
                            True),
    "audit_redact": _Setting(
        "key paths of tool arguments recorded as [redacted] (password, *.token)",
        _list("key paths", _check_key_paths), ()),
    "audit_on_failure": _Setting(
        "when audit events cannot be recorded: drop, block or fail_closed",
        _choice("drop", "block", "fail_closed"), "drop"),
    "audit_flush_interval_ms": _Setting(
        "longest an audit event waits before it is written (ms)",
        _integer(MIN_FLUSH_INTERVAL_MS, MAX_FLUSH_INTERVAL_MS,
                 f"expected milliseconds from {MIN_FLUSH_INTERVAL_MS} to "
                 f"{MAX_FLUSH_INTERVAL_MS}, got {{value!r}}"), 100),
    "audit_rotate_bytes": _Setting(
        "rotate the JSONL audit log at this size (100MB, 1GiB, bytes; off)",
        _integer(1, MAX_ROTATE_BYTES, "expected a size from 1 byte to 1TiB such as 100MB, "
                 "1GiB or 1048576, or off; got {value!r}", units=_SIZE_UNITS),
        "off", DEFAULT_ROTATE_BYTES, only_for="jsonl"),
    "audit_rotate_daily": _Setting("rotate the JSONL audit log every UTC day", _parse_bool,
                                   False, only_for="jsonl"),
    "audit_retention": _Setting(
        "rotated JSONL audit files kept (off: all)",
        _integer(0, MAX_RETENTION, f"expected a number of files from 0 to {MAX_RETENTION:,} "
                 "or off, got {value!r}", off=True),
        "off", DEFAULT_RETENTION, only_for="jsonl"),
    "audit_chain_key": _Setting(
        "key of the JSONL audit log's hash chain (secret)", _parse_secret, None,
        secret=True, unset="(not set)", only_for="jsonl"),
    "audit_http_secret": _Setting(
        "HMAC-SHA256 key signing the batches POSTed to an http(s) audit target (secret)",
        _parse_secret, None, secret=True, unset="(not set)", only_for="http"),
    "audit_http_spool": _Setting(
        "spool directory of an http(s) audit target (unsent events wait there)", _parse_dir,
        DEFAULT_AUDIT_SPOOL, only_for="http"),
    "audit_http_headers": _Setting(
        "extra request headers of an http(s) audit target: 'Name: value' pairs separated "
        "by ';' (a table in TOML; values secret)", _parse_headers, {}, only_for="http"),
    "audit_http_ca_file": _Setting(
        "PEM file of the CAs trusted for an https:// audit target (default: the system "
        "trust store)", _parse_ca_file, None, unset="(system trust store)", only_for="http"),
    "url": _Setting("base URL of the running server (for the CLI's rate commands)",
                    _parse_url, DEFAULT_URL),
    "admin_key": _Setting("admin key the CLI presents to the running server (secret)",
                          _parse_secret, None, secret=True, unset="(not set)"),
    "host": _Setting("address fastmcp-guard run listens on", _parse_host, DEFAULT_HOST),
    "port": _Setting("port fastmcp-guard run listens on",
                     _integer(1, 65535, "expected a port 1-65535, got {value!r}"), DEFAULT_PORT),
    "transport": _Setting("transport of fastmcp-guard run: http or stdio",
                          _choice("http", "stdio"), "http"),
}  # fmt: skip

#: Every setting: file key -> one-line description. The env name is ``FASTMCP_GUARD_`` + upper.
SETTINGS: dict[str, str] = {name: setting.doc for name, setting in _SETTINGS.items()}


# -- the model -------------------------------------------------------------------------


@dataclass(frozen=True)
class GuardConfig:
    """The effective configuration: one typed value per setting, plus where each came from.

    Build it with :meth:`load`; turn it into objects with :meth:`key_store`,
    :meth:`audit_log`, :meth:`rate_limit` and :meth:`ip_policy`.
    """

    keys: KeysTarget
    #: Every audit target, at most one of each kind; empty when the audit log is off.
    audit: tuple[AuditTarget, ...]
    rate: str | None
    global_rate: str | None
    rate_backend: Literal["memory", "redis"]
    rate_url: str | None = field(repr=False)
    rate_on_backend_error: Literal["allow", "deny", "local"]
    rate_mode: Literal["enforce", "shadow"]
    loop_breaker: str | None
    loop_breaker_mode: Literal["enforce", "shadow"]
    #: ``(tool, units)`` pairs.
    tool_costs: tuple[tuple[str, int], ...]
    credits_mode: Literal["enforce", "shadow"]
    budget_meta: bool
    allow: tuple[str, ...]
    deny: tuple[str, ...]
    trusted_proxies: tuple[str, ...]
    ip_mode: Literal["enforce", "shadow"]
    log_inputs: bool
    log_outputs: bool
    audit_redact: tuple[str, ...]
    audit_on_failure: Literal["drop", "block", "fail_closed"]
    audit_flush_interval_ms: int
    audit_rotate_bytes: int | None
    audit_rotate_daily: bool
    audit_retention: int | None
    audit_chain_key: str | None = field(repr=False)
    audit_http_secret: str | None = field(repr=False)
    audit_http_spool: str
    #: ``(name, value)`` pairs, in the order given.
    audit_http_headers: tuple[tuple[str, str], ...] = field(repr=False)
    audit_http_ca_file: str | None
    url: str
    admin_key: str | None = field(repr=False)
    host: str
    port: int
    transport: Transport
    profile: Profile = "library"
    #: The config file read (absolute path), if any.
    config_file: str | None = None
    #: How the config file was chosen (``argument --config``, ``env FASTMCP_GUARD_CONFIG``,
    #: ``found in the current directory``).
    config_file_source: str | None = None
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    # -- loading -----------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        arguments: Mapping[str, Any] | None = None,
        *,
        profile: Profile = "library",
        labels: Mapping[str, str] | None = None,
        config_file: str | os.PathLike[str] | None = None,
        config_file_label: str = "argument --config",
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> GuardConfig:
        """Resolve every setting: ``arguments`` > ``env`` > config file > ``profile`` defaults.

        Args:
            arguments: explicit values by setting name (``None`` values are ignored),
                in the same forms as the environment or a TOML file.
            profile: ``"library"`` or ``"embedded"`` defaults.
            labels: how to name each argument's source (default ``argument <name>``),
                e.g. ``{"keys": "argument --db"}``.
            config_file: a config file to read instead of looking for one (it must
                exist); overrides ``FASTMCP_GUARD_CONFIG``.
            config_file_label: how to name where ``config_file`` came from.
            env: the environment (default ``os.environ``).
            cwd: the current directory (default ``os.getcwd()``).

        Raises:
            InvalidSettingError: a value was refused (names the setting and source).
            ConfigError: the config file is missing, not TOML, or has an unknown key.
        """
        if profile not in ("library", "embedded"):
            raise ConfigError(f"unknown profile {profile!r}; expected 'library' or 'embedded'")
        env = os.environ if env is None else env
        base = Path(os.getcwd() if cwd is None else cwd).absolute()
        labels = labels or {}

        _check_env_names(env)
        raw: dict[str, _Raw] = {}
        for name, setting in _SETTINGS.items():
            raw[name] = _Raw(setting.default_for(profile), "default", base)

        file_path, file_source = _choose_config_file(config_file, config_file_label, env, base)
        if file_path is not None:
            values, label = _read_config_file(file_path, base)
            for name, value in values.items():
                raw[name] = _Raw(value, label, file_path.parent)

        for name in SETTINGS:
            value = env.get(ENV_PREFIX + name.upper())
            if value is not None and value.strip() != "":
                raw[name] = _Raw(value, f"env {ENV_PREFIX}{name.upper()}", base)

        for name, value in (arguments or {}).items():
            if name not in SETTINGS:
                raise ConfigError(f"unknown setting {name!r}{_did_you_mean(name)}")
            if value is not None:
                raw[name] = _Raw(value, labels.get(name, f"argument {name}"), base)

        # None is only ever a default ("not set"): arguments drop theirs, TOML has none.
        parsed: dict[str, Any] = {
            name: None if item.value is None else _SETTINGS[name].parse(item, name)
            for name, item in raw.items()
        }
        sources = {name: item.source for name, item in raw.items()}

        if parsed["rate_url"] is not None and parsed["rate_backend"] != "redis":
            raise InvalidSettingError(
                "rate_url", sources["rate_url"],
                "a Redis URL is set but rate_backend is 'memory'; set rate_backend to redis "
                f"({ENV_PREFIX}RATE_BACKEND=redis) to share the limits, or drop rate_url",
            )  # fmt: skip

        _check_audit_settings(parsed, sources)

        # The CLI's URL follows host / port when only those were set.
        if sources["url"] == "default" and (
            sources["host"] != "default" or sources["port"] != "default"
        ):
            host = parsed["host"]
            host = DEFAULT_HOST if host in ("0.0.0.0", "::") else host
            host = f"[{host}]" if ":" in host else host
            parsed["url"] = f"http://{host}:{parsed['port']}"
            sources["url"] = "default (from host and port)"

        return cls(
            **parsed,
            profile=profile,
            config_file=None if file_path is None else str(file_path),
            config_file_source=file_source,
            sources=sources,
        )

    # -- reporting ---------------------------------------------------------------------

    def source(self, name: str) -> str:
        """Where setting ``name`` came from: ``argument --db``, ``env FASTMCP_GUARD_KEYS``,
        ``fastmcp-guard.toml``, ``pyproject.toml [tool.fastmcp-guard]``, ``default``..."""
        if name not in SETTINGS:
            raise ConfigError(f"unknown setting {name!r}{_did_you_mean(name)}")
        return self.sources.get(name, "default")

    def views(self) -> list[SettingView]:
        """Every setting, in a stable order, with secrets masked."""
        out = []
        for name in SETTINGS:
            out.append(SettingView(name, ENV_PREFIX + name.upper(), self.public_value(name),
                                   self.display(name), self.source(name)))  # fmt: skip
        return out

    def display(self, name: str) -> str:
        """Setting ``name`` as one line for people, secrets masked (``fastmcp-guard config``)."""
        value = self.public_value(name)
        if name == "audit" and not value:
            return "off"
        if isinstance(value, (list, tuple)):
            return ", ".join(value) if value else "(none)"
        if isinstance(value, dict):
            return "; ".join(f"{k}: {v}" for k, v in value.items()) if value else "(none)"
        if value is None:
            return _SETTINGS[name].unset
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    def public_value(self, name: str) -> Any:
        """A JSON-friendly value of setting ``name`` with secrets masked (the values of
        ``audit_http_headers`` too; passwords in URLs)."""
        if name not in SETTINGS:
            raise ConfigError(f"unknown setting {name!r}{_did_you_mean(name)}")
        value = getattr(self, name)
        if _SETTINGS[name].secret:
            return None if value is None else MASK
        if name == "audit_http_headers":
            return {header: MASK for header, _ in value}
        if name == "tool_costs":
            return dict(value)
        if isinstance(value, KeysTarget):
            return value.masked()
        if name == "audit":
            return [target.masked() for target in value]
        if isinstance(value, tuple):
            return list(value)
        if name in ("url", "rate_url") and value is not None:
            return mask_url(value)
        return value

    def to_dict(self) -> dict[str, Any]:
        """The configuration for ``--json`` output, secrets masked."""
        return {
            "profile": self.profile,
            "config_file": self.config_file,
            "config_file_source": self.config_file_source,
            "settings": {
                v.name: {"value": v.value, "source": v.source, "env": v.env} for v in self.views()
            },
        }

    def __repr__(self) -> str:
        shown = ", ".join(f"{v.name}={v.display!r}" for v in self.views())
        return f"GuardConfig(profile={self.profile!r}, {shown})"

    # -- factories: the one place that turns configuration into objects -----------------

    def key_store(self, **options: Any) -> KeyStore:
        """The :class:`~fastmcp_guard.keys.KeyStore` named by ``keys`` (``options`` go to
        its constructor). Fleet backends raise :class:`ConfigError` in this release."""
        from fastmcp_guard.keys import KeyStore

        target = self.keys
        if target.backend == "memory":
            return KeyStore(backend="memory", **options)
        if target.backend == "sqlite":
            return KeyStore(backend="sqlite", path=target.path, **options)
        return KeyStore(backend=target.backend, dsn=target.dsn, **options)

    def audit_file(self, kinds: tuple[AuditKind, ...] = ("jsonl", "sqlite")) -> AuditTarget | None:
        """The first audit target of one of ``kinds`` (by default the first JSONL or SQLite
        log: what the CLI's audit commands read), or ``None``."""
        return next((t for t in self.audit if t.kind in kinds), None)

    def audit_log(self, *, http_spool: str | None = None) -> AuditLog | None:
        """The :class:`~fastmcp_guard.audit.AuditLog` with every ``audit`` target (``None``
        when off), with ``log_inputs`` / ``log_outputs``, ``audit_redact``,
        ``audit_on_failure`` and ``audit_flush_interval_ms`` applied to all of them;
        rotation, retention and the chain key concern JSONL logs only, the ``audit_http_*``
        settings the HTTP target (``http_spool`` replaces ``audit_http_spool``). Opens
        (creates) the files and the spool."""
        if not self.audit:
            return None
        from fastmcp_guard.audit import AuditLog

        return AuditLog(
            backend=[self._audit_backend(t, http_spool) for t in self.audit],
            log_inputs=self.log_inputs,
            log_outputs=self.log_outputs,
            redact=self.audit_redact,
            on_failure=self.audit_on_failure,
        )

    def _audit_backend(self, target: AuditTarget, http_spool: str | None) -> Backend:
        from fastmcp_guard.audit import FileBackend, HttpBackend, OTelBackend, SQLiteBackend

        if target.kind == "otel":
            return OTelBackend()
        if target.kind == "http":
            return HttpBackend(
                target.url,
                headers=dict(self.audit_http_headers) or None,
                secret=self.audit_http_secret,
                spool_dir=http_spool or self.audit_http_spool,
                ca_file=self.audit_http_ca_file,
                flush_interval_ms=self.audit_flush_interval_ms,
            )
        if target.kind == "sqlite":
            return SQLiteBackend(target.path or "", flush_interval_ms=self.audit_flush_interval_ms)
        return FileBackend(
            target.path or "",
            flush_interval_ms=self.audit_flush_interval_ms,
            rotate_bytes=self.audit_rotate_bytes,
            rotate_daily=self.audit_rotate_daily,
            retention=self.audit_retention,
            chain_key=self.audit_chain_key,
        )

    def rate_limit(self) -> RateLimit:
        """The :class:`~fastmcp_guard.rate.RateLimit` from ``rate`` and ``global_rate``, in
        ``rate_backend`` (``rate_url``, ``rate_on_backend_error`` for Redis)."""
        from fastmcp_guard.rate import RateLimit

        budget: dict[str, Any] = {
            "mode": self.rate_mode, "loop_breaker": self.loop_breaker,
            "loop_breaker_mode": self.loop_breaker_mode, "tool_costs": dict(self.tool_costs),
        }  # fmt: skip
        if self.rate_backend == "redis":
            return RateLimit(
                per_key=self.rate, global_limit=self.global_rate, backend="redis",
                url=self.rate_url, on_backend_error=self.rate_on_backend_error, **budget,
            )  # fmt: skip
        return RateLimit(per_key=self.rate, global_limit=self.global_rate, **budget)

    def ip_policy(self) -> IPPolicy | None:
        """The :class:`~fastmcp_guard.ip.IPPolicy` from ``allow`` / ``deny`` /
        ``trusted_proxies``; ``None`` when all three are empty (everyone admitted)."""
        if not (self.allow or self.deny or self.trusted_proxies):
            return None
        from fastmcp_guard.ip import IPPolicy

        return IPPolicy(allow=self.allow, deny=self.deny, trusted_proxies=self.trusted_proxies,
                        mode=self.ip_mode)  # fmt: skip


def _check_audit_settings(parsed: dict[str, Any], sources: dict[str, str]) -> None:
    """A setting given for a kind of audit target that ``audit`` does not name would do
    nothing: refuse it rather than let it pass silently (``audit = off`` keeps them all:
    turning the log off need not mean deleting its tuning)."""
    targets: tuple[AuditTarget, ...] = parsed["audit"]
    if not targets:
        return
    kinds = {t.kind for t in targets}
    for name, setting in _SETTINGS.items():
        kind = setting.only_for
        if kind is None or kind in kinds or sources.get(name, "default").startswith("default"):
            continue
        what = "a JSONL file" if kind == "jsonl" else "an http(s):// endpoint"
        raise InvalidSettingError(
            name, sources[name],
            f"is set, but no audit target is {what} (audit: "
            f"{', '.join(t.masked() for t in targets)}); add one to audit or drop {name}",
        )  # fmt: skip
    http = next((t for t in targets if t.kind == "http"), None)
    ca = "audit_http_ca_file"
    if http is not None and parsed[ca] and not (http.endpoint or "").lower().startswith("https:"):
        raise InvalidSettingError(
            ca, sources[ca],
            f"only applies to https:// audit targets, and {http.masked()} is plain http; "
            "use https:// or drop the CA file",
        )  # fmt: skip


def load_config(arguments: Mapping[str, Any] | None = None, **kwargs: Any) -> GuardConfig:
    """Shorthand for :meth:`GuardConfig.load`."""
    return GuardConfig.load(arguments, **kwargs)


# -- config files ----------------------------------------------------------------------


def _choose_config_file(
    explicit: str | os.PathLike[str] | None, explicit_label: str, env: Mapping[str, str], cwd: Path
) -> tuple[Path | None, str | None]:
    """The config file to read and how it was chosen, or ``(None, None)``."""
    named: str | None = None
    label = explicit_label
    if explicit is not None:
        named = os.fspath(explicit)
    else:
        from_env = env.get(CONFIG_ENV, "").strip()
        if from_env.lower() in _OFF:
            return None, None
        if from_env:
            named, label = from_env, f"env {CONFIG_ENV}"
    if named is not None:
        path = (cwd / Path(named).expanduser()).absolute()
        if not path.is_file():
            raise ConfigError(f"config file {named} (from {label}) not found")
        return path, label
    for candidate in (cwd / CONFIG_FILE_NAME, cwd / "pyproject.toml"):
        if candidate.is_file() and (
            candidate.name != "pyproject.toml" or _pyproject_table(candidate) is not None
        ):
            return candidate, "found in the current directory"
    return None, None


def _load_toml(path: Path) -> dict[str, Any]:
    if _toml_loads is None:  # pragma: no cover - Python 3.10 without tomli
        raise ConfigError("reading a config file on Python 3.10 needs tomli (pip install tomli)")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        return _toml_loads(text)
    except ValueError as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _pyproject_table(path: Path) -> dict[str, Any] | None:
    """The ``[tool.fastmcp-guard]`` table of a pyproject file, if it has one."""
    data: Any = _load_toml(path)
    for part in PYPROJECT_TABLE:
        data = data.get(part) if isinstance(data, dict) else None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"[tool.fastmcp-guard] in {path} must be a table")
    return data


def _read_config_file(path: Path, cwd: Path) -> tuple[dict[str, Any], str]:
    """The settings of a config file and the label its values carry."""
    if path.name == "pyproject.toml":
        values = _pyproject_table(path) or {}
        label = "pyproject.toml [tool.fastmcp-guard]"
    else:
        values = _load_toml(path)
        label = path.name
    if path.parent != cwd:  # a file elsewhere: say which
        label = str(path) + (" [tool.fastmcp-guard]" if path.name == "pyproject.toml" else "")
    for key in values:
        if key not in SETTINGS:
            raise ConfigError(f"unknown setting {key!r} in config file {path}{_did_you_mean(key)}")
    return values, label


def _check_env_names(env: Mapping[str, str]) -> None:
    """Refuse a ``FASTMCP_GUARD_*`` variable the package does not read, naming the closest
    known one: a misspelt variable would otherwise leave its setting at its default."""
    known = known_env_names()
    unknown = sorted(n for n in env if n.startswith(ENV_PREFIX) and n not in known)
    if not unknown:
        return
    import difflib

    name = unknown[0]
    suffixes = {n[len(ENV_PREFIX) :]: n for n in known}
    close = difflib.get_close_matches(name[len(ENV_PREFIX) :], suffixes, n=1)
    hint = (
        f"did you mean {suffixes[close[0]]}?"
        if close
        else f"known variables: {', '.join(sorted(known))}"
    )
    more = f" (and {len(unknown) - 1} more: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""
    raise ConfigError(
        f"unknown environment variable {name}{more}: no setting reads it; {hint} "
        "(see `fastmcp-guard config` for every setting and its variable)"
    )


def _did_you_mean(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name.lower(), SETTINGS, n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; known settings: {', '.join(SETTINGS)}"


if sys.version_info >= (3, 11):
    from tomllib import loads as _tomllib_loads

    _toml_loads: Callable[[str], dict[str, Any]] | None = _tomllib_loads
else:  # pragma: no cover - Python 3.10: the tomli backport (a dependency there)
    try:
        from tomli import loads as _toml_loads
    except ImportError:
        _toml_loads = None
