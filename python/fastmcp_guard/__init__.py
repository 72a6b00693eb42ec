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
"""

from fastmcp_guard._core import __version__
from fastmcp_guard.audit import AuditLog, FileBackend, SQLiteBackend
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
from fastmcp_guard.keys import APIKey, ApiKey, KeyStatus, KeyStore
from fastmcp_guard.rate import RateLimit, RateLimitExceeded, rate_limit

__all__ = [
    "APIKey",
    "ApiKey",
    "AuditLog",
    "ConfigError",
    "FileBackend",
    "Guard",
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
    "__version__",
    "rate_limit",
]
