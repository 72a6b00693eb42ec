"""One fleet node for the cross-process tests: fires concurrent calls at a shared limit.

    python tests/fleet/node.py URL PREFIX PER_KEY GLOBAL KEYS CALLS

It connects, prints ``ready``, waits for the test's start signal (a ``BLPOP`` on
``<PREFIX>go``, so that every node starts at once), fires CALLS concurrent calls spread
over KEYS keys (``asyncio.gather``) and prints ``{"admitted": n, "unavailable": n}``.
"""

from __future__ import annotations

import asyncio
import json
import sys

import redis.asyncio
from fastmcp_guard import RateLimit


async def main(
    url: str, prefix: str, per_key: str, global_limit: str, keys: int, calls: int
) -> None:
    # A generous timeout: this node measures exactness, not how fast a dead Redis is noticed.
    limit = RateLimit(per_key or None, global_limit or None, backend="redis", url=url,
                      key_prefix=prefix, on_backend_error="deny", timeout=5.0)  # fmt: skip
    await limit.status_async("warm-up")  # opens a connection, consumes nothing
    signal = redis.asyncio.Redis.from_url(url)
    print("ready", flush=True)
    await signal.blpop([prefix + "go"], timeout=30)
    results = await asyncio.gather(*(limit.acquire(f"k{i % keys}") for i in range(calls)))
    admitted = sum(r is None for r in results)
    unavailable = sum(r is not None and r.scope == "backend" for r in results)
    print(json.dumps({"admitted": admitted, "unavailable": unavailable}), flush=True)
    await signal.aclose()
    await limit.aclose()


if __name__ == "__main__":
    url, prefix, per_key, global_limit, keys, calls = sys.argv[1:7]
    asyncio.run(main(url, prefix, per_key, global_limit, int(keys), int(calls)))
