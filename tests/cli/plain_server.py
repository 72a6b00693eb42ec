"""An unmodified FastMCP server (no guard in it): what `fastmcp-guard run` protects."""

from fastmcp import FastMCP

mcp = FastMCP("plain")


@mcp.tool
def echo(text: str) -> str:
    """Return the text."""
    return text


@mcp.tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@mcp.tool
def fail(text: str) -> str:
    """Fail, echoing the text in the error (and so in the server's log)."""
    raise ValueError(f"cannot handle {text}")
