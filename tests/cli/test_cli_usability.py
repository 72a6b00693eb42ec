"""What a new user meets first (issue 10, "also found by a new user"): the top-level help
says what the CLI covers, and a broken installation is one line saying how to fix it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fastmcp_guard.cli import GROUPS, main

#: Installed by ``sitecustomize`` in the child: ``fastmcp_guard._core`` fails to load the
#: way a broken or half-rebuilt extension does (the real install is not touched).
_BROKEN_CORE = textwrap.dedent(
    """
    import sys

    class BrokenCore:
        def find_spec(self, name, path=None, target=None):
            if name == "fastmcp_guard._core":
                raise ImportError(
                    "/site-packages/fastmcp_guard/_core.abi3.so: file too short")
            return None

    sys.meta_path.insert(0, BrokenCore())
    """
)


def test_the_help_names_every_command_group(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]
    for group in ("keys", "audit", "rate", "usage", "run", "config"):
        assert f"({group})" in description, description
    assert {g.removesuffix("_cmd") for g in GROUPS} == {"keys", "audit", "rate", "usage", "run",
                                                        "config"}  # fmt: skip


@pytest.mark.parametrize("args", [("keys", "list"), ("audit", "verify"), ("--help",), ()])
def test_an_extension_that_cannot_load_is_one_line_and_exit_1(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    (tmp_path / "sitecustomize.py").write_text(_BROKEN_CORE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTMCP_GUARD_")}
    env["PYTHONPATH"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "fastmcp_guard.cli", *args], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fastmcp-guard: error: the fastmcp-guard extension module")
    assert "file too short" in lines[0]
    assert "pip install --force-reinstall fastmcp-guard" in lines[0]
    assert "make build-dev" in lines[0]
