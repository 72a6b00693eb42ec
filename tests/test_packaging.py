"""What the installed package carries, whether it came from the wheel (`make test`) or from
the development build (`scripts/bootstrap.sh`)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import fastmcp_guard
import fastmcp_guard._core as core


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)


def test_python_dash_m_is_the_console_script() -> None:
    script = Path(sys.executable).with_name("fastmcp-guard")
    by_module = _run(sys.executable, "-m", "fastmcp_guard", "--help")
    by_script = _run(str(script), "--help")
    assert by_module.returncode == 0, by_module.stderr
    assert by_script.returncode == 0, by_script.stderr
    assert by_module.stdout == by_script.stdout
    assert "usage: fastmcp-guard" in by_module.stdout


def test_python_dash_m_passes_the_exit_code_through() -> None:
    proc = _run(sys.executable, "-m", "fastmcp_guard", "no-such-command")
    assert proc.returncode == 2
    assert "no-such-command" in proc.stderr


def test_the_stubs_and_the_typed_marker_sit_beside_the_extension() -> None:
    package = Path(fastmcp_guard.__file__).parent
    assert Path(core.__file__).parent == package
    assert Path(core.__file__).name.endswith(".abi3.so")  # one build for CPython >= 3.10
    assert (package / "_core.pyi").is_file()
    assert (package / "py.typed").is_file()


def test_the_metadata_offers_the_extras_the_readme_names() -> None:
    meta = importlib.metadata.metadata("fastmcp-guard")
    assert meta["Version"] == fastmcp_guard.__version__
    assert {"postgres", "redis", "otel", "test"} <= set(meta.get_all("Provides-Extra") or [])
