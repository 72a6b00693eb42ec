"""A guarded FastMCP server on the embedded defaults: SQLite keys + JSONL audit.

    python examples/guarded_server.py [--port 8765] [--data DIR]

Creates a demo key on start (printed once), then serves MCP over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastmcp import FastMCP
from fastmcp.server.auth import require_scopes

from fastmcp_guard import AuditLog, FileBackend, Guard, KeyStore, RateLimit, rate_limit

mcp = FastMCP("guarded-demo")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--data", type=Path, default=Path("demo-data"), help="where keys.db and audit.jsonl go")
    args = parser.parse_args(argv)
    args.data.mkdir(parents=True, exist_ok=True)

    guard = Guard(
        mcp,
        keys=KeyStore(backend="sqlite", path=args.data / "keys.db"),
        rate_limit=RateLimit(per_key="100/minute", global_limit="1000/minute"),
        audit=AuditLog(backend=FileBackend(args.data / "audit.jsonl")),
    )
    key = guard.keys.create(name="demo", scopes=["read:data", "write:data"], expires_in_days=1)
    url = f"http://{args.host}:{args.port}/mcp"
    print(
        f"""
fastmcp-guard demo server: {url}
  keys:  {args.data / 'keys.db'}   audit: {args.data / 'audit.jsonl'}

  Demo key (shown once, valid 1 day): {key.token}

  Call it:
    .venv/bin/python examples/call_server.py {url} {key.token}
  or any MCP client with the header  Authorization: Bearer <token>
""",
        file=sys.stderr,
        flush=True,
    )
    mcp.run(transport="http", host=args.host, port=args.port, show_banner=False)
    guard.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
