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
