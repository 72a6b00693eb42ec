"""Threat: a misspelt ``FASTMCP_GUARD_*`` variable is silently ignored (issue 10, finding 14).

``FASTMCP_GUARD_ALLOWED=10.0.0.0/8`` (for ``FASTMCP_GUARD_ALLOW``) left the server open to
everyone. Now an unknown name with the prefix fails start-up as an unknown TOML key does,
naming the variable and the closest known one: through ``Guard(...)``, through the CLI
and ``fastmcp-guard run``. The known names are one list in ``fastmcp_guard.config``; a
test greps the repository so that a new variable cannot be added without it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastmcp import FastMCP
from fastmcp_guard import Guard
from fastmcp_guard.config import OTHER_ENV, GuardConfig, known_env_names
from fastmcp_guard.errors import ConfigError
from fastmcp_guard.guard import ENV_KEY

from tests.cli.test_cli_keys import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("variable", "closest"),
    [
        ("FASTMCP_GUARD_ALLOWED", "FASTMCP_GUARD_ALLOW"),
        ("FASTMCP_GUARD_DENIED", "FASTMCP_GUARD_DENY"),
        ("FASTMCP_GUARD_GLOBALRATE", "FASTMCP_GUARD_GLOBAL_RATE"),
        ("FASTMCP_GUARD_TRUSTED_PROXY", "FASTMCP_GUARD_TRUSTED_PROXIES"),
        ("FASTMCP_GUARD_AUDIT_RETENSION", "FASTMCP_GUARD_AUDIT_RETENTION"),
        ("FASTMCP_GUARD_KEYY", "FASTMCP_GUARD_KEY"),
    ],
)
def test_a_misspelt_variable_fails_guard_construction_naming_the_closest(
    monkeypatch: pytest.MonkeyPatch, variable: str, closest: str
) -> None:
    monkeypatch.setenv(variable, "10.0.0.0/8")
    with pytest.raises(ConfigError, match=f"unknown environment variable {variable}: .*"
                       f"did you mean {closest}\\?"):  # fmt: skip
        Guard(FastMCP("typo"))


def test_an_empty_misspelt_variable_fails_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTMCP_GUARD_ALOW", "")
    with pytest.raises(ConfigError, match="FASTMCP_GUARD_ALOW"):
        GuardConfig.load()


def test_a_variable_like_no_other_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="known variables: .*FASTMCP_GUARD_ALLOW"):
        GuardConfig.load(env={"FASTMCP_GUARD_ZZZZZZZZZZ": "1"})


def test_known_variables_that_are_not_settings_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTMCP_GUARD_CONFIG", "off")
    monkeypatch.setenv("FASTMCP_GUARD_ALLOW", "10.0.0.0/8")
    config = GuardConfig.load()
    assert config.allow == ("10.0.0.0/8",)
    # The stdio key is one of them (Guard reads it itself).
    assert ENV_KEY in OTHER_ENV
    GuardConfig.load(env={ENV_KEY: "fmg_sk_whatever"})


def test_the_cli_and_run_fail_with_one_line_and_exit_2(tmp_path: Path) -> None:
    for args in (("config",), ("keys", "list"), ("run", "server.py")):
        proc = cli(tmp_path, *args, env={"FASTMCP_GUARD_ALLOWED": "10.0.0.0/8"})
        assert proc.returncode == 2, (args, proc.stderr)
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "FASTMCP_GUARD_ALLOWED" in err[0] and "did you mean FASTMCP_GUARD_ALLOW?" in err[0]


def test_every_variable_the_repository_names_is_known() -> None:
    """Any FASTMCP_GUARD_* name in the code, tests, benchmarks, scripts or README is in
    the list (or is only a prefix, as in ``FASTMCP_GUARD_*``)."""
    names: set[str] = set()
    for folder in ("python", "tests", "benches", "scripts", "examples"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".sh", ".md", ".toml", ".txt", ""):
                names |= set(re.findall(r"FASTMCP_GUARD_[A-Z0-9_]*[A-Z0-9]", path.read_text(
                    encoding="utf-8", errors="replace")))  # fmt: skip
    names |= set(re.findall(r"FASTMCP_GUARD_[A-Z0-9_]*[A-Z0-9]",
                            (ROOT / "README.md").read_text(encoding="utf-8")))  # fmt: skip
    # Names made up by these tests on purpose.
    made_up = {"FASTMCP_GUARD_ALLOWED", "FASTMCP_GUARD_DENIED", "FASTMCP_GUARD_GLOBALRATE",
               "FASTMCP_GUARD_TRUSTED_PROXY", "FASTMCP_GUARD_AUDIT_RETENSION", "FASTMCP_GUARD_KEYY",
               "FASTMCP_GUARD_ALOW", "FASTMCP_GUARD_ZZZZZZZZZZ", "FASTMCP_GUARD_XYZZY"}  # fmt: skip
    assert names - made_up - known_env_names() == set()
