"""The exceptions fastmcp-guard raises. All derive from :class:`GuardError`.

They are defined in the Rust core (one conversion point, ``src/errors.rs``) and
re-exported here. Each also extends the built-in that fits, so existing code that
catches ``ValueError`` / ``TypeError`` / ``KeyError`` / ``OSError`` (and, for audit
files, ``FileNotFoundError`` / ``PermissionError`` / ``IsADirectoryError``) keeps
working. The rate refusal :class:`~fastmcp_guard.rate.RateLimitExceeded` (a FastMCP
``ToolError`` carrying ``retry_after``) is a ``GuardError`` too; it lives in
:mod:`fastmcp_guard.rate`.
"""

from fastmcp_guard._core import (
    ArgumentTypeError,
    AuditFileNotFoundError,
    AuditIsADirectoryError,
    AuditPermissionError,
    AuditReadError,
    AuditWriteError,
    GuardError,
    InvalidArgumentError,
    InvalidIPError,
    InvalidKeyInputError,
    InvalidRateError,
    KeyNotFoundError,
    KeyRevokedError,
    StoreError,
    VerifyError,
)


class ConfigError(GuardError, ValueError):
    """A Guard / backend option was refused (unknown backend name, missing path...)."""


class MissingExtraError(GuardError, ImportError):
    """A backend needs an optional extra (``pip install fastmcp-guard[...]``)."""


class RateBackendError(GuardError, ConnectionError):
    """The shared rate limiter's backend (Redis) could not be reached or answered an error.

    Raised by the status, reset and tracked-keys operations; rate checks never raise it
    (their ``on_backend_error`` policy decides instead).
    """


__all__ = [
    "ArgumentTypeError",
    "AuditFileNotFoundError",
    "AuditIsADirectoryError",
    "AuditPermissionError",
    "AuditReadError",
    "AuditWriteError",
    "ConfigError",
    "GuardError",
    "InvalidArgumentError",
    "InvalidIPError",
    "InvalidKeyInputError",
    "InvalidRateError",
    "KeyNotFoundError",
    "KeyRevokedError",
    "MissingExtraError",
    "RateBackendError",
    "StoreError",
    "VerifyError",
]
