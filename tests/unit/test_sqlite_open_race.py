"""Several processes opening one fresh SQLite key store or audit database at the same
moment: each must succeed (turning a new file to WAL used to fail with "database is
locked" in some of them)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

CHILD = """
import sys, time
start, kind, path = float(sys.argv[1]), sys.argv[2], sys.argv[3]
if kind == "keys":
    from fastmcp_guard import KeyStore
    open_it = lambda: KeyStore(backend="sqlite", path=path)
else:
    from fastmcp_guard._core import AuditWriter
    open_it = lambda: AuditWriter.sqlite(path)
while time.time() < start:
    pass
store = open_it()
print("ok")
"""


@pytest.mark.parametrize("kind", ["keys", "audit"])
def test_processes_opening_a_fresh_database_at_once_all_succeed(tmp_path: Path, kind: str) -> None:
    failures = []
    for round_ in range(4):
        path = tmp_path / f"fresh{round_}.db"
        start = time.time() + 1.5  # every child has imported the package by then
        children = [
            subprocess.Popen([sys.executable, "-c", CHILD, str(start), kind, str(path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(6)
        ]  # fmt: skip
        for child in children:
            out, err = child.communicate(timeout=60)
            if child.returncode != 0 or out.strip() != "ok":
                failures.append(err.strip().splitlines()[-1:] or [f"exit {child.returncode}"])
    assert failures == []
