"""Call the demo server: python examples/call_server.py URL TOKEN"""

from __future__ import annotations

import asyncio
import sys

from fastmcp import Client


async def main(url: str, token: str) -> None:
    async with Client(url, auth=token) as client:
        tools = await client.list_tools()
        print("tools:", ", ".join(t.name for t in tools))
        result = await client.call_tool("get_data", {"query": "hello"})
        print("get_data ->", result.content[0].text)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1], sys.argv[2]))
