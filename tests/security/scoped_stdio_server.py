"""A guarded stdio server with scoped components (test_stdio_scopes.py)."""

import os

from fastmcp import FastMCP
from fastmcp.server.auth import require_scopes
from fastmcp_guard import AuditLog, FileBackend, Guard, KeyStore

mcp = FastMCP("stdio-scoped")


@mcp.tool
def read_data() -> str:
    return "data"


@mcp.tool(auth=require_scopes("write:data"))
def write_data(item: str) -> str:
    return f"wrote {item}"


@mcp.resource("secret://vault", auth=require_scopes("write:data"))
def vault() -> str:
    return "the vault"


@mcp.resource("users://{user_id}/private", auth=require_scopes("write:data"))
def private(user_id: str) -> str:
    return f"private of {user_id}"


@mcp.prompt(auth=require_scopes("write:data"))
def admin_prompt() -> str:
    return "admin"


guard = Guard(
    mcp,
    keys=KeyStore(backend="sqlite", path=os.environ["TEST_KEYS_DB"]),
    audit=AuditLog(backend=FileBackend(os.environ["TEST_AUDIT"])),
)

if __name__ == "__main__":
    mcp.run(show_banner=False)
