"""A guarded server on stdio, used by test_local.py (paths come from the environment)."""

import os

from fastmcp import FastMCP
from fastmcp.server.dependencies import get_access_token
from fastmcp_guard import AuditLog, FileBackend, Guard, KeyStore, RateLimit

mcp = FastMCP("stdio-guarded")


@mcp.tool
def whoami() -> str:
    token = get_access_token()
    return token.client_id if token is not None else "nobody"


guard = Guard(
    mcp,
    keys=KeyStore(backend="sqlite", path=os.environ["TEST_KEYS_DB"]),
    audit=AuditLog(backend=FileBackend(os.environ["TEST_AUDIT"])),
    rate_limit=RateLimit(per_key="2/minute"),
)

if __name__ == "__main__":
    mcp.run(show_banner=False)
