"""What an agent sees of its own budget: the credits refusal, the ``_meta`` on every
guarded result, and the ``guard://usage`` resource.

Agents spend budgets in loops, and an agent that can read how much it has left can
slow down before it is refused. Every guarded result (tool, resource, prompt) carries, under
``_meta["fastmcp-guard/budget"]``::

    {"remaining": 7, "reset": 42.5, "limit": "10/minute",
     "credits": 4180, "refill_at": "2027-01-01T00:00:00Z"}

``remaining`` / ``reset`` / ``limit`` are those of the caller's tightest enforced rate
limit, per key or per tool (calls of cost 1 left, seconds until that bucket is full
again, its rate; ``null`` when no limit applies; never the global limit, which counts
everybody's calls); ``credits`` / ``refill_at`` appear when the key has credits (the best estimate of
this process: the store's balance plus what this process holds). ``Guard(budget_meta=False)``
(setting ``budget_meta``) turns it off.

The read-only resource ``guard://usage`` returns the caller's own limits, credits and
today's usage (per tool); it is listed for every authenticated caller, and only ever shows
the caller's own data.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from fastmcp.exceptions import ToolError
from mcp import MCPError

from fastmcp_guard.errors import GuardError

if TYPE_CHECKING:
    from fastmcp_guard._core import Verdict
    from fastmcp_guard.guard import Guard
    from fastmcp_guard.middleware import Caller

__all__ = ["ANONYMOUS", "BUDGET_META_KEY", "CREDITS_EXHAUSTED_CODE", "EXTERNAL_IDENTITY", "USAGE_URI", "CreditsExhausted"]

#: The metadata of a caller another verifier identified (its client id is the identity).
EXTERNAL_IDENTITY = {"auth": "external"}
#: The usage key of callers without an identity (known by their address only).
ANONYMOUS = "(anonymous)"
#: The ``_meta`` key of the budget on every guarded result.
BUDGET_META_KEY = "fastmcp-guard/budget"
#: The caller's own budget and usage, as a resource.
USAGE_URI = "guard://usage"
#: JSON-RPC error code of a credits refusal answered as a protocol error (HTTP's 402).
CREDITS_EXHAUSTED_CODE = 402


def iso(moment: datetime | None) -> str | None:
    """``moment`` as ``2027-01-01T00:00:00Z`` (UTC), or ``None``."""
    if moment is None:
        return None
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class CreditsExhausted(GuardError, ToolError):
    """A call was refused because the caller's key has no credits left.

    The message is written for the agent: how many credits are left and when they
    refill (or that no refill is scheduled). ``retry_after`` is the seconds until the
    refill (``None`` without one); ``data`` the same as structured content."""

    def __init__(self, text: str, balance: int, refill_at: datetime | None) -> None:
        super().__init__(text)
        self.balance = balance
        self.refill_at = refill_at
        self.retry_after: float | None = None
        if refill_at is not None:
            self.retry_after = max(0.0, (refill_at - datetime.now(timezone.utc)).total_seconds())

    @property
    def data(self) -> dict[str, Any]:
        """Machine-readable refusal: ``credits``, ``refill_at``, ``retry_after``."""
        return {
            "error": "credits_exhausted",
            "credits": self.balance,
            "refill_at": iso(self.refill_at),
            "retry_after": None if self.retry_after is None else round(self.retry_after, 3),
        }

    def as_mcp_error(self, code: int = CREDITS_EXHAUSTED_CODE) -> MCPError:
        """The same refusal as a protocol-level MCP error (``data`` holds the numbers)."""
        return MCPError(code, str(self), self.data)


def budget_meta(guard: Guard, caller: Caller, verdict: Verdict) -> dict[str, Any]:
    """The ``_meta["fastmcp-guard/budget"]`` of one admitted call."""
    meta = verdict.budget()
    book = guard.credits
    if book is not None and caller.credits is not None:
        known = book.balance(caller.key_id)
        if known is not None:
            meta["credits"], refill_at = known
            meta["refill_at"] = iso(refill_at)
    return meta


async def usage_document(guard: Guard, caller: Caller) -> dict[str, Any]:
    """What ``guard://usage`` shows ``caller``: its limits now, its credits, and its usage
    today (UTC), per tool. Only the caller's own data: no global limit (everybody's
    calls); a caller without an identity, or identified by another verifier, gets its
    limits and no usage."""
    rate = guard.rate_limit
    doc: dict[str, Any] = {
        "key_id": caller.key_id or None,
        "key_name": caller.key_name or None,
        "limits": await rate.status_async(caller.rate_key),
    }
    # The caller's own buckets only: the global one counts everybody's calls.
    doc["limits"].pop("global", None)
    book = guard.credits
    if book is not None and caller.credits is not None:
        known: tuple[int | None, datetime | None] | None = book.balance(caller.key_id)
        if known is None and caller.key_id:
            record = await anyio.to_thread.run_sync(guard.keys.get, caller.key_id)
            known = None if record is None else (record.credits, record.refill_at)
        if known is not None:
            doc["credits"] = {"balance": known[0], "refill_at": iso(known[1])}
    usage = guard.usage
    external = caller.metadata == EXTERNAL_IDENTITY
    if usage is not None and caller.usage_key != ANONYMOUS and not external:
        # Callers known by their address only share one usage key: that is everybody's
        # anonymous traffic, not the caller's own, so it is not shown. Nor for another
        # verifier's identity: its client id may name an application all its users share.
        doc["usage_today"] = await usage.today_async(caller.usage_key)
    return doc


def install_usage_resource(guard: Guard) -> None:
    """Serve ``guard://usage`` on the guarded server (read-only, JSON)."""
    from fastmcp.resources import FunctionResource

    async def read_usage() -> str:
        caller = await guard.middleware.current_caller()
        return json.dumps(await usage_document(guard, caller), separators=(",", ":"))

    guard.mcp.add_resource(
        FunctionResource.from_function(
            read_usage,
            uri=USAGE_URI,
            name="guard-usage",
            description="Your own rate limits, credits and today's usage (fastmcp-guard).",
            mime_type="application/json",
        )
    )
