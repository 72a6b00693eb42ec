"""fastmcp-guard: the production operations layer for FastMCP servers.

API keys, rate limits, IP policy and an audit log, wired into FastMCP through its
own hooks (``TokenVerifier``, ``Middleware``, ``require_scopes``), with the hot path
in a Rust core.

```python
from fastmcp import FastMCP
from fastmcp_guard import Guard

mcp = FastMCP("my-server")
guard = Guard(mcp)
key = guard.keys.create(name="alice", scopes=["read:data"])
print(key.token)  # fmg_sk_... (shown once)
```

The names below are imported on first use (PEP 562), so that importing a submodule
(for instance the CLI, ``fastmcp_guard.cli``) does not import FastMCP.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastmcp_guard._core import __version__
    from fastmcp_guard.audit import AuditLog, FileBackend, SQLiteBackend
    from fastmcp_guard.config import GuardConfig
    from fastmcp_guard.errors import (
        ConfigError,
        GuardError,
        InvalidIPError,
        InvalidRateError,
        KeyNotFoundError,
        KeyRevokedError,
    )
    from fastmcp_guard.guard import Guard
    from fastmcp_guard.ip import IPPolicy
    from fastmcp_guard.keys import APIKey, ApiKey, KeyStatus, KeyStore, VerifyLimits
    from fastmcp_guard.rate import RateLimit, RateLimitExceeded, rate_limit

#: Public name -> the module that defines it.
_LAZY: dict[str, str] = {
    "__version__": "fastmcp_guard._core",
    "AuditLog": "fastmcp_guard.audit",
    "FileBackend": "fastmcp_guard.audit",
    "SQLiteBackend": "fastmcp_guard.audit",
    "GuardConfig": "fastmcp_guard.config",
    "ConfigError": "fastmcp_guard.errors",
    "GuardError": "fastmcp_guard.errors",
    "InvalidIPError": "fastmcp_guard.errors",
    "InvalidRateError": "fastmcp_guard.errors",
    "KeyNotFoundError": "fastmcp_guard.errors",
    "KeyRevokedError": "fastmcp_guard.errors",
    "Guard": "fastmcp_guard.guard",
    "IPPolicy": "fastmcp_guard.ip",
    "APIKey": "fastmcp_guard.keys",
    "ApiKey": "fastmcp_guard.keys",
    "KeyStatus": "fastmcp_guard.keys",
    "KeyStore": "fastmcp_guard.keys",
    "VerifyLimits": "fastmcp_guard.keys",
    "RateLimit": "fastmcp_guard.rate",
    "RateLimitExceeded": "fastmcp_guard.rate",
    "rate_limit": "fastmcp_guard.rate",
}

__all__ = [
    "APIKey",
    "ApiKey",
    "AuditLog",
    "ConfigError",
    "FileBackend",
    "Guard",
    "GuardConfig",
    "GuardError",
    "IPPolicy",
    "InvalidIPError",
    "InvalidRateError",
    "KeyNotFoundError",
    "KeyRevokedError",
    "KeyStatus",
    "KeyStore",
    "RateLimit",
    "RateLimitExceeded",
    "SQLiteBackend",
    "VerifyLimits",
    "__version__",
    "rate_limit",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first access, then cache it here."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
