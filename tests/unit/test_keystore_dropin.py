"""``KeyStore`` keeps fastmcp-guard 0.2's documented behaviour (issue 10, drop-in for 0.2).

0.2's users switch by reinstalling, and their tests exercise 0.2's ``KeyStore``. Each case
runs 0.2's own ``KeyStore`` from the released wheel (in a subprocess, as
``tests/integration/test_legacy_keys.py`` does) beside ours:

* ``create(expires_in_days=-1)`` makes a key that is already expired: ``verify`` gives
  ``None`` (ours raised). ``expires_in_days=0`` is the same for us; 0.2 tested the value
  for truth, so its 0 meant *no expiry*: we refuse the token instead (fail closed, as the
  issue asks), and pin that one difference here.
* ``verify(token)`` returns the key with ``last_used_at`` set to now, although our store
  writes uses in batches.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fastmcp_guard import KeyStore

from tests.integration.test_legacy_keys import WHEEL

SCRIPT_02 = r"""
import json, sys, types
pkg = types.ModuleType("fastmcp_guard")
pkg.__path__ = [sys.argv[1] + "/fastmcp_guard"]
sys.modules["fastmcp_guard"] = pkg
from fastmcp_guard.keys.store import KeyStore

store = KeyStore(backend="memory")
out = {}
for days in (-1, 0, 30):
    key = store.create(name=f"k{days}", expires_in_days=days)
    got = store.verify(key.token)
    out[str(days)] = {
        "verified": got is not None,
        "last_used_at": got.last_used_at.isoformat() if got and got.last_used_at else None,
    }
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def behaviour_02() -> dict[str, dict[str, object]]:
    if WHEEL is None or not Path(WHEEL).exists():
        pytest.fail("the fastmcp-guard 0.2 wheel is missing: run scripts/bootstrap.sh (it "
                    "downloads it into .cache/legacy) or set FMG_LEGACY_WHEEL")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", SCRIPT_02, WHEEL],
                          capture_output=True, text=True, timeout=50, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, dict[str, object]] = json.loads(done.stdout)
    return result


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> KeyStore:
    s = KeyStore(backend=request.param, path=tmp_path / "keys.db")
    yield s
    s.close()


def test_a_negative_expiry_makes_a_key_that_is_already_expired(
    store: KeyStore, behaviour_02: dict[str, dict[str, object]]
) -> None:
    key = store.create("late", expires_in_days=-1)
    assert key.expires_at is not None and key.is_expired and not key.is_valid
    assert store.verify(str(key.token)) is None
    assert behaviour_02["-1"]["verified"] is False  # the same in 0.2
    assert store.inspect(key.id).expires_at == key.expires_at


def test_a_zero_expiry_is_expired_too_where_0_2_meant_no_expiry(
    store: KeyStore, behaviour_02: dict[str, dict[str, object]]
) -> None:
    key = store.create("now", expires_in_days=0)
    assert key.is_expired
    assert store.verify(str(key.token)) is None
    assert behaviour_02["0"]["verified"] is True  # 0.2: `if expires_in_days` was falsy


def test_an_explicit_expiry_in_the_past_is_still_refused(store: KeyStore) -> None:
    from fastmcp_guard.errors import InvalidKeyInputError

    with pytest.raises(InvalidKeyInputError, match="not in the future"):
        store.create("x", expires_at=datetime.now(timezone.utc) - timedelta(days=1))


def test_verify_returns_the_key_with_last_used_at_now(
    store: KeyStore, behaviour_02: dict[str, dict[str, object]]
) -> None:
    key = store.create("user", expires_in_days=30)
    assert key.last_used_at is None
    before = datetime.now(timezone.utc) - timedelta(milliseconds=1)
    got = store.verify(str(key.token), client_ip="192.0.2.4")
    after = datetime.now(timezone.utc)
    assert got is not None and got.last_used_at is not None
    assert before <= got.last_used_at <= after
    assert got.last_used_ip == "192.0.2.4"
    again = store.verify(str(key.token))
    assert again is not None and again.last_used_at is not None
    assert again.last_used_at >= got.last_used_at
    assert behaviour_02["30"]["last_used_at"] is not None  # 0.2 did the same
    # The store catches up at its next batch.
    store.flush()
    stored = store.inspect(key.id).last_used_at
    assert stored is not None and before <= stored <= after + timedelta(seconds=1)
