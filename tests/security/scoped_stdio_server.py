"""A guarded stdio server with scoped components (test_stdio_scopes.py)."""

import os

from fastmcp import FastMCP
from fastmcp.server.auth import require_scopes, restrict_tag
from fastmcp.server.middleware.authorization import AuthMiddleware
from fastmcp_guard import AuditLog, FileBackend, Guard, KeyStore

# Tag-based auth (FastMCP's AuthMiddleware) and a mounted server's scoped tool too.
mcp = FastMCP(
    "stdio-scoped", middleware=[AuthMiddleware(auth=restrict_tag("admin", scopes=["write:data"]))]
)


@mcp.tool(tags={"admin"})
def drop_database() -> str:
    return "database dropped"


child = FastMCP("child")


@child.tool(auth=require_scopes("write:data"))
def child_admin() -> str:
    return "child admin ran"


mcp.mount(child, namespace="kid")


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
