"""One process spending a key's credits through its own CreditBook, for the fleet tests.

    python tests/fleet/credit_node.py BACKEND WHERE KEY_ID CALLS LEASE_MAX MODE

BACKEND is sqlite / postgres / redis and WHERE the file, DSN or URL. The node opens the
store, prints ``ready``, waits for a line on stdin (the test's start signal, sent to
every node at once), then fires CALLS concurrent calls of cost 1 (``asyncio.gather``),
each paid from the local lease (``spend``) or after taking a lease (``acquire``).

MODE ``close``: closes the book (unspent units go back) and prints
``{"paid": n, "refused": n}``. MODE ``hold``: prints the same plus ``"held"`` (the
unspent units of its lease), then sleeps until it is killed: the crash case.
"""

from __future__ import annotations

import asyncio
import json
import sys

from fastmcp_guard.keys import KeyStore
from fastmcp_guard.keys.credits import CreditBook


async def call(book: CreditBook, key_id: str) -> bool:
    if book.spend(key_id, 1) is None:
        return True
    return (await book.acquire(key_id, 1)).paid


async def main(backend: str, where: str, key_id: str, calls: int, lease_max: int,
               mode: str) -> None:  # fmt: skip
    if backend == "sqlite":
        store = KeyStore(backend="sqlite", path=where)
    else:
        store = KeyStore(backend=backend, dsn=where)
    book = CreditBook(store, lease_max=lease_max)
    print("ready", flush=True)
    sys.stdin.readline()
    paid = sum(await asyncio.gather(*(call(book, key_id) for _ in range(calls))))
    result = {"paid": paid, "refused": calls - paid}
    if mode == "hold":
        acct = book._accounts.get(key_id)  # the unspent lease this process holds
        result["held"] = 0 if acct is None else acct.lease
        print(json.dumps(result), flush=True)
        await asyncio.sleep(600)  # killed by the test (kill -9): never closes
        return
    await book.aclose()
    store.close()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    b, w, k, n, m, mode = sys.argv[1:7]
    asyncio.run(main(b, w, k, int(n), int(m), mode))
