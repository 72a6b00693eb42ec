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
