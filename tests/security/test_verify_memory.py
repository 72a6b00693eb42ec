"""Threat: failed verifications pile up memory (issue 10, finding 5).

Each argon2id run needs ``m_cost`` (19 MiB by default). Run in whichever thread called
``verify``, that memory stayed with the thread's allocator arena: 24 threads x 12 wrong
secrets grew the process by 2.4 GB, and it never came back. Now hashing runs only on the
manager's fixed pool of threads, each reusing one buffer: RSS stays within
``start + pool size x m_cost + 50 MB`` however many callers fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# Runs in a fresh interpreter, so that RSS is this workload's alone.
SCRIPT = textwrap.dedent(
    """
    import json, sys, threading
    from fastmcp_guard._core import KeyManager, VerifyError, VerifyLimits
    from tests.security._tokens import wrong_secret

    def rss_bytes():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024

    threads, per_thread, pool = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    # Waits for a hashing thread as long as it takes: this measures memory, not latency
    # (96 runs queue on 2 threads; a loaded machine must not turn them into `busy`).
    manager = KeyManager.memory(max_concurrent_verifications=pool,
                                limits=VerifyLimits(verify_wait_seconds=120.0))
    start = rss_bytes()
    _, token = manager.create("victim")
    failures = []

    def attacker(t):
        for i in range(per_thread):
            # A real key id, a wrong secret, a fresh address each time: argon2 really
            # runs (no throttle or budget refuses these few).
            try:
                manager.verify(wrong_secret(token, t * 1000 + i), f"10.{t}.{i}.1")
            except VerifyError as exc:
                failures.append(exc.reason)

    workers = [threading.Thread(target=attacker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(json.dumps({"start": start, "end": rss_bytes(), "failures": failures,
                      "argon2_runs": manager.stats()["argon2_runs"]}))
    """
)

M_COST_BYTES = 19_456 * 1024  # the default argon2id cost (OWASP)
ROOT = Path(__file__).resolve().parents[2]


def test_many_threads_of_failed_verifications_keep_rss_within_the_pool_bound() -> None:
    threads, per_thread, pool = 24, 4, 2
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(threads), str(per_thread), str(pool)],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["failures"] == ["bad_secret"] * (threads * per_thread)
    assert got["argon2_runs"] == threads * per_thread  # every failure really hashed
    bound = got["start"] + pool * M_COST_BYTES + 50 * 1024 * 1024
    grew_mb = (got["end"] - got["start"]) / 2**20
    assert got["end"] <= bound, (
        f"RSS grew by {grew_mb:.0f} MB for {threads * per_thread} failed verifications from "
        f"{threads} threads; the bound is {pool} x 19 MiB + 50 MB"
    )
