"""Rate refusals over plain HTTP: 429 with ``Retry-After`` and the IETF ``RateLimit`` fields.

The failure throttle answers a token it stops with 429 (not 401: the token may be
valid), on the MCP endpoint and on the admin routes alike. The answer says how long to
wait in ``Retry-After`` and, in the fields of draft-ietf-httpapi-ratelimit-headers, which
budget refused, that nothing remains of it and when it resets (``RateLimit``), and its
quota and window (``RateLimit-Policy``).
"""

from __future__ import annotations

import re

import httpx2
import pytest
from fastmcp import FastMCP
from fastmcp_guard import Guard, KeyStore, VerifyLimits

from tests.conftest import serve_http
from tests.integration.test_http_auth import HEADERS, INIT
from tests.security._tokens import wrong_secret

pytestmark = pytest.mark.http

#: ``RateLimit: "<policy>";r=0;t=<seconds>``
_RATELIMIT = re.compile(r'^"(?P<policy>[a-z_-]+)";r=0;t=(?P<t>\d+)$')


def assert_rate_refusal(resp: httpx2.Response, policy: str, quota: int, window: int) -> None:
    assert resp.status_code == 429, resp.text
    assert resp.json()["error"] == "too_many_attempts"
    wait = int(resp.headers["retry-after"])
    assert 1 <= wait <= window
    m = _RATELIMIT.match(resp.headers["ratelimit"])
    assert m is not None, resp.headers["ratelimit"]
    assert m["policy"] == policy and int(m["t"]) == wait
    assert resp.headers["ratelimit-policy"] == f'"{policy}";q={quota};w={window}'


async def test_a_throttled_token_gets_429_with_retry_after_and_ratelimit_fields() -> None:
    mcp: FastMCP = FastMCP("throttled")

    @mcp.tool
    def echo(text: str) -> str:
        return text

    keys = KeyStore(limits=VerifyLimits(max_failures=3, failure_window_seconds=60))
    guard = Guard(mcp, keys=keys)
    admin = guard.keys.create("ops", scopes=["guard:admin"])
    assert admin.token is not None
    try:
        async with serve_http(mcp) as url, httpx2.AsyncClient() as h:
            base = url.rsplit("/mcp", 1)[0]
            real = {"Authorization": f"Bearer {admin.token}"}
            # The real token is proven on this node first: the throttle never stops it.
            assert (await h.get(base + "/_guard/rate", headers=real)).status_code == 200
            statuses = []
            for n in range(3):  # three wrong secrets for the admin key id: 401 each
                forged = {"Authorization": f"Bearer {wrong_secret(admin.token, n)}"}
                statuses.append((await h.post(url, json=INIT, headers={**HEADERS, **forged})).status_code)
            assert statuses == [401, 401, 401]
            forged = {"Authorization": f"Bearer {wrong_secret(admin.token, 3)}"}
            # The MCP endpoint: the per-(address, key id) budget is spent.
            mcp_resp = await h.post(url, json=INIT, headers={**HEADERS, **forged})
            # The admin routes answer the same refusal the same way.
            status_resp = await h.get(base + "/_guard/rate", headers=forged)
            reset_resp = await h.post(base + "/_guard/rate/reset", json={"key": admin.id},
                                      headers=forged)  # fmt: skip
            # The proven admin token is not throttled: no 429, no RateLimit fields.
            ok = await h.get(base + "/_guard/rate", headers=real)
    finally:
        guard.close()
    for resp in (mcp_resp, status_resp, reset_resp):
        assert_rate_refusal(resp, "failures-client", quota=3, window=60)
    assert ok.status_code == 200, ok.text
    assert "ratelimit" not in ok.headers
