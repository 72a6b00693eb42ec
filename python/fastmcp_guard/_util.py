"""Small helpers shared by several modules.

A leaf: it imports nothing of the package, so any module may import it (see
``tests/unit/test_import_cycles.py``).
"""

from __future__ import annotations

import getpass
import os
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = [
    "DEFAULT_LOOP_BREAKER", "MASK", "ca_file_problem", "mask_url", "os_user",
]  # fmt: skip

#: What a secret is shown as (in URLs, ``fastmcp-guard config``, error messages).
MASK = "****"
#: Query parameters whose values :func:`mask_url` masks (case-insensitive).
_SECRET_QUERY_PARAMS = frozenset({"password", "pass", "pwd", "secret", "token", "sslpassword",
                                  "access_token", "api_key", "apikey", "key", "sig",
                                  "code"})  # fmt: skip


#: The loop breaker's rate when none is given: more than 20 identical calls (same caller,
#: tool and arguments) in a minute is a loop.
DEFAULT_LOOP_BREAKER = "20/minute"
def os_user() -> str:
    """The OS user name (the default actor and local identity)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def ca_file_problem(path: str) -> str | None:
    """Why ``path`` cannot serve as a PEM bundle of CA certificates (a sentence naming
    it), or ``None`` when it can."""
    import ssl

    fix = "give the path of a PEM file of CA certificates"
    if not os.path.isfile(path):
        what = "is not a file" if os.path.exists(path) else "does not exist"
        return f"CA file {path} {what}; {fix}"
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        return f"CA file {path} holds no PEM certificate ({exc.reason or exc}); {fix}"
    except OSError as exc:
        return f"cannot read CA file {path}: {exc.strerror or exc}"
    return None


def mask_url(url: str) -> str:
    """``url`` with its password (``user:pw@``) and secret query parameters masked."""
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            if ":" in userinfo:
                user = userinfo.split(":", 1)[0]
                netloc = f"{user}:{MASK}@{hostport}"
            elif parts.scheme in ("redis", "rediss", "http", "https"):
                # redis://pw@host: some clients read a password there; https://token@host:
                # HttpBackend sends it as basic authentication.
                netloc = f"{MASK}@{hostport}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(k.lower() in _SECRET_QUERY_PARAMS for k, _ in pairs):
                query = urlencode(
                    [(k, MASK if k.lower() in _SECRET_QUERY_PARAMS else v) for k, v in pairs],
                    safe="*",
                )
        if netloc == parts.netloc and query == parts.query:
            return url  # nothing secret (and urlunsplit would drop the slashes of sqlite:////)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return MASK  # unparsable: show nothing that might be a secret
