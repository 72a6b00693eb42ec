"""The stubs are code: `_core.pyi` must match the compiled module (mypy.stubtest)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)  # mypy is slow on a loaded machine; its own timeout is 300 s
def test_core_stubs_match_the_extension() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "fastmcp_guard._core",
         "--allowlist", str(ROOT / ".mypy-stubtest-allowlist")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
