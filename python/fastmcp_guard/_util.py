"""Small helpers shared by several modules."""

from __future__ import annotations

import getpass
import os


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
