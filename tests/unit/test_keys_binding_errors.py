"""The key manager's binding raises the guard's error tree, never a bare ``ValueError``:
options in seconds (``InvalidArgumentError``) and the rotation grace period, which the
key store itself checks (``InvalidKeyInputError``)."""

from __future__ import annotations

import math

import pytest
from fastmcp_guard import KeyStore
from fastmcp_guard._core import KeyManager, VerifyLimits
from fastmcp_guard.errors import GuardError, InvalidArgumentError, InvalidKeyInputError


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_an_option_in_seconds_that_is_no_duration_is_an_invalid_argument(bad: float) -> None:
    with pytest.raises(InvalidArgumentError, match="unknown_key_ttl_seconds must be a non-neg"):
        VerifyLimits(unknown_key_ttl_seconds=bad)
    with pytest.raises(InvalidArgumentError, match="cache_ttl_seconds must be a non-negative"):
        KeyManager.memory(cache_ttl_seconds=bad)


def test_a_zero_failure_window_is_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgumentError, match="failure_window_seconds must be greater") as e:
        VerifyLimits(failure_window_seconds=0)
    assert isinstance(e.value, GuardError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    ("grace", "says"),
    [
        (-1.0, r"invalid grace: must be a number of seconds >= 0 .*got -1"),
        (math.nan, r"invalid grace: must be a number of seconds >= 0 .*got NaN"),
        (math.inf, r"invalid grace: must be a number of seconds >= 0 .*got inf"),
        (1e300, r"invalid grace: is too long"),
        (9.2e15, r"invalid grace: is too long"),  # converts, but now + grace overflows
    ],
)
def test_a_grace_period_the_store_cannot_keep_is_refused(grace: float, says: str) -> None:
    km = KeyManager.memory()
    info, _ = km.create("a")
    with pytest.raises(InvalidKeyInputError, match=says):
        km.rotate(info.id, grace_seconds=grace)
    assert km.get(info.id).status == "active"  # type: ignore[union-attr]
    km.close()


def test_the_facade_passes_a_nan_grace_period_to_the_same_check() -> None:
    store = KeyStore()
    key = store.create("a")
    with pytest.raises(InvalidKeyInputError, match="invalid grace"):
        store.rotate(key.id, grace_period_hours=math.nan)
    store.close()
