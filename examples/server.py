"""An ordinary FastMCP server: no guard code but one optional ``@rate_limit``.

    fastmcp-guard run examples/server.py          # serve it guarded (see `make demo`)

`fastmcp-guard run` adds keys, limits, IP policy and the audit log from the
configuration. The only guard-specific line is the optional `@rate_limit` below, a
per-tool limit that `run` honours (and that is inert without a guard).
"""

from fastmcp import FastMCP
from fastmcp.server.auth import require_scopes

from fastmcp_guard import rate_limit

mcp = FastMCP("demo")


@mcp.tool
def get_data(query: str) -> str:
    """Look something up."""
    return f"Results for: {query}"


@mcp.tool(auth=require_scopes("write:data"))
def put_data(item: str) -> str:
    """Store something (needs the write:data scope)."""
    return f"stored {item!r}"


@mcp.tool
@rate_limit("5/minute")
def run_expensive_analysis(data: str) -> str:
    """An expensive tool with a tighter per-key limit."""
    return f"analysis of {len(data)} characters"
