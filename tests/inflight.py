"""Verifications in flight, made deterministic: a key store backend's read of one key is
held, after it returned the record and before argon2id runs, while the test acts.

Used by the unit tests over a Python store (``tests/unit/test_external_backend.py``) and
by the fleet tests over PostgreSQL and Redis (``tests/fleet/test_fleet_keys.py``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastmcp_guard._core import Identity, KeyManager

#: How long a step may wait for the other side before the test fails (never reached when
#: the code under test works: each wait ends on an event).
STEP_S = 10.0


def verify_while(
    manager: KeyManager, backend: Any, token: str, key_id: str, during: Callable[[], object]
) -> Identity:
    """``manager.verify(token)``, with ``during()`` run while it is in flight: ``backend``
    (the store object ``manager`` reads) has returned ``key_id``'s record, and the
    verification waits until ``during`` returns."""
    read, release = threading.Event(), threading.Event()
    real_get = backend.get

    def get(kid: str) -> Any:
        row = real_get(kid)
        if kid == key_id and not read.is_set():
            read.set()
            release.wait(STEP_S)
        return row

    backend.get = get
    try:
        with ThreadPoolExecutor(1) as pool:
            verifying = pool.submit(manager.verify, token, None)
            if not read.wait(STEP_S):
                pytest.fail(f"the verification never read {key_id}")
            try:
                during()
            finally:
                release.set()
            return verifying.result(timeout=STEP_S)
    finally:
        del backend.get


def wait_until(done: Callable[[], bool], what: str) -> None:
    """Returns once ``done()`` is true; fails the test naming ``what`` if it never is."""
    deadline = time.monotonic() + STEP_S
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {STEP_S:.0f} s")
        time.sleep(0.005)  # polling: the event happens in another thread or process
