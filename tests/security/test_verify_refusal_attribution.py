"""Threat: attacks on a key that its owner cannot see (issue 10, finding 12, core part).

A wrong secret for a real key id was refused without saying which key it claimed, so the
audit line had ``key_id: ""`` and ``audit query --key <id>`` did not show the attack.
Now every refusal carries the key id the token claims (public: it is in the token) and
a reason; a throttled one also carries when to retry. A malformed token claims nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastmcp_guard import KeyStore
from fastmcp_guard._core import VerifyError

from tests.security._tokens import unknown_key_token, wrong_secret


def refusal(store: KeyStore, token: str, client: str = "192.0.2.1") -> VerifyError:
    with pytest.raises(VerifyError) as exc:
        store.core.verify(token, client)
    return exc.value


def test_every_refusal_names_the_claimed_key_id_and_its_reason(key_db: Path) -> None:
    store = KeyStore(backend="sqlite", path=key_db)
    key = store.create("target", expires_in_days=30)
    token = str(key.token)
    forged = unknown_key_token(7)

    cases = [(wrong_secret(token, i), "bad_secret", key.id) for i in range(10)]
    cases.append((wrong_secret(token, 10), "throttled", key.id))
    cases.append((forged, "unknown_key", "fmg_key_" + forged[7:23]))
    for bad, reason, key_id in cases:
        err = refusal(store, bad)
        assert (err.reason, err.key_id) == (reason, key_id), str(err)
        assert (err.retry_after is not None) == (reason == "throttled")
        assert bad not in str(err), "the message never holds the token"
    rotated = store.rotate(key.id, grace_period_hours=0)
    err = refusal(store, token, "198.51.100.2")
    assert (err.reason, err.key_id) == ("revoked", key.id)
    expired = store.create("old", expires_in_days=-1)
    err = refusal(store, str(expired.token))
    assert (err.reason, err.key_id) == ("expired", expired.id)
    assert store.core.verify(str(rotated.token), "192.0.2.1").key_id == rotated.id
    store.close()


@pytest.mark.parametrize("garbage", ["Bearer x", "fmg_sk_short", "fmg_sk_" + "A" * 66])
def test_a_malformed_token_claims_no_key(key_db: Path, garbage: str) -> None:
    store = KeyStore(backend="sqlite", path=key_db)
    err = refusal(store, garbage)
    assert (err.reason, err.key_id, err.retry_after) == ("malformed", None, None)
    store.close()


def test_a_verify_error_raised_elsewhere_has_the_attributes_too() -> None:
    err = VerifyError("made by hand")
    assert (err.key_id, err.retry_after) == (None, None)
