"""Threat: locking a working key out by failing on purpose (issue 10, finding 6).

Key ids are public. Ten wrong secrets for a key id from the address its real client uses
(a NAT, a shared proxy) locked the real token out for a minute, renewable forever, as
soon as its cache entry expired. Now a token proven on this node keeps working while its
record is unchanged: the refresh after the cache TTL re-reads the record but never runs
argon2 again and is never stopped by the throttle or the budgets. The attacker's own
attempts are refused as ``throttled`` with ``retry_after`` (the HTTP answer is 429), and
the refusal names the key id it claimed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastmcp import FastMCP
from fastmcp_guard import Guard, KeyStore
from fastmcp_guard._core import VerifyError

from tests.conftest import http_client
from tests.integration.test_http_auth import raw_post
from tests.security._tokens import wrong_secret

SHARED = "203.0.113.7"  # the address the attacker and the real client share


def refusal(store: KeyStore, token: str, client: str) -> VerifyError:
    with pytest.raises(VerifyError) as exc:
        store.core.verify(token, client)
    return exc.value


def test_a_proven_token_survives_a_flood_of_failures_from_its_own_address(key_db: Path) -> None:
    # A cache TTL of 0: every verification is a refresh (the TTL has always passed).
    store = KeyStore(backend="sqlite", path=key_db, cache_ttl_seconds=0.0)
    key = store.create("svc")
    token = str(key.token)
    store.core.verify(token, SHARED)
    runs = store.core.stats()["argon2_runs"]

    reasons = [refusal(store, wrong_secret(token, i), SHARED).reason for i in range(15)]
    assert reasons == ["bad_secret"] * 10 + ["throttled"] * 5

    for _ in range(5):
        assert store.core.verify(token, SHARED).key_id == key.id
    stats = store.core.stats()
    assert stats["argon2_runs"] == runs + 10, "only the attacker's 10 failures were hashed"
    assert stats["proof_refreshes"] == 5

    # The attacker is told to wait (429), about its claimed key id.
    throttled = refusal(store, wrong_secret(token, 99), SHARED)
    assert throttled.reason == "throttled" and throttled.key_id == key.id
    assert throttled.retry_after is not None and 0 < throttled.retry_after <= 60

    # The proof admits nothing by itself: revocation takes effect at once.
    store.revoke(key.id)
    assert refusal(store, token, SHARED).reason == "revoked"
    store.close()


def test_a_rotated_keys_new_token_is_proven_on_its_own(key_db: Path) -> None:
    store = KeyStore(backend="sqlite", path=key_db, cache_ttl_seconds=0.0)
    old = store.create("svc")
    store.core.verify(str(old.token), SHARED)
    new = store.rotate(old.id, grace_period_hours=1)
    for i in range(12):
        refusal(store, wrong_secret(str(new.token), i), SHARED)
    # The new key's token was never proven: its id is throttled from this address...
    assert refusal(store, str(new.token), SHARED).reason == "throttled"
    # ...while the old token, proven and in its grace period, still works from it.
    assert store.core.verify(str(old.token), SHARED).key_id == old.id
    # From another address the new token is checked (and proven) as usual.
    assert store.core.verify(str(new.token), "198.51.100.1").key_id == new.id
    assert store.core.verify(str(new.token), SHARED).key_id == new.id
    store.close()


@pytest.mark.http
async def test_over_http_the_real_client_keeps_working_beside_the_attacker(
    serve, key_db: Path
) -> None:
    mcp: FastMCP = FastMCP("victim")

    @mcp.tool
    def echo(text: str) -> str:
        return text

    guard = Guard(mcp, keys=KeyStore(backend="sqlite", path=key_db, cache_ttl_seconds=0.0))
    key = guard.keys.create(name="real client")
    token = str(key.token)
    async with serve(mcp) as url, http_client(url, token) as client:
        await client.call_tool("echo", {"text": "before"})
        # Same address (loopback), the key id is public, 20 wrong secrets.
        statuses = [
            (await raw_post(url, authorization=f"Bearer {wrong_secret(token, i)}")).status_code
            for i in range(20)
        ]
        assert 200 not in statuses
        for i in range(5):
            result = await client.call_tool("echo", {"text": f"after {i}"})
            assert result.data == f"after {i}"
    stats = guard.keys.core.stats()
    assert stats["throttled"] == 10
    assert stats["argon2_runs"] == 1 + 10
    guard.keys.close()
