"""The ``fastmcp-guard`` CLI in a temporary directory, called through ``main(argv)`` (see :func:`cli`)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastmcp_guard import KeyStore
from fastmcp_guard._util import os_user

from tests.conftest import read_audit


def cli(cwd: Path, *args: str, env: dict[str, str] | None = None, stdin: str | None = None,
        process: bool = False) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run ``fastmcp-guard ARGS`` in ``cwd``; stdin is not a terminal (``/dev/null`` or text).

    In this process, through ``main(argv)``, with the environment, working directory and
    standard streams swapped for the call; ``process=True`` runs a real process instead
    (for what only a process shows: signals, start-up imports, the server)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FASTMCP_GUARD_")}
    clean.update(env or {})
    if not process:
        return _in_process(cwd, list(args), clean, stdin)
    return subprocess.run(
        [sys.executable, "-m", "fastmcp_guard.cli", *args],
        cwd=cwd, env=clean, capture_output=True, text=True, timeout=60, check=False,
        input=stdin, stdin=subprocess.DEVNULL if stdin is None else None,
    )  # fmt: skip


def _stream() -> io.TextIOWrapper:
    # Text over bytes: commands write rows to ``sys.stdout.buffer`` too.
    return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)


def _in_process(
    cwd: Path, args: list[str], env: dict[str, str], stdin: str | None
) -> subprocess.CompletedProcess[str]:
    from fastmcp_guard.cli import main

    out, err = _stream(), _stream()
    saved_env, saved_cwd, saved_stdin = dict(os.environ), os.getcwd(), sys.stdin
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.stdin = io.StringIO(stdin or "")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(args)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.stdin = saved_stdin
    text = [s.buffer.getvalue().decode() for s in (out, err)]  # type: ignore[attr-defined]
    return subprocess.CompletedProcess(["fastmcp-guard", *args], code, *text)


def ok(cwd: Path, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = cli(cwd, *args, **kwargs)
    assert proc.returncode == 0, proc.stderr
    return proc


def create(cwd: Path, *args: str, **kwargs: Any) -> dict[str, Any]:
    """``keys create ... --json``: the key, with its token."""
    data: dict[str, Any] = json.loads(ok(cwd, "keys", "create", *args, "--json", **kwargs).stdout)
    return data


def assert_user_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """Exit ``code``, one ``fastmcp-guard: error:`` line on stderr, no traceback."""
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastmcp-guard: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- the lifecycle ---------------------------------------------------------------------


def test_create_prints_the_token_once_with_a_warning(tmp_path: Path) -> None:
    proc = ok(tmp_path, "keys", "create", "--name", "alice", "--scopes", "read:data,write:data")
    lines = proc.stdout.splitlines()
    tokens = [line for line in lines if line.startswith("fmg_sk_")]
    assert len(tokens) == 1
    assert "will not be shown again" in proc.stdout
    assert lines[0].startswith("Created key fmg_key_") and "(alice)" in lines[0]
    assert "read:data, write:data" in proc.stdout
    listed = ok(tmp_path, "keys", "list").stdout
    assert "alice" in listed and tokens[0] not in listed


def test_create_list_inspect_rotate_revoke(tmp_path: Path) -> None:
    alice = create(tmp_path, "--name", "alice", "--scopes", "read:data,write:data",
                   "--meta", "team=data", "env=prod")  # fmt: skip
    assert alice["id"].startswith("fmg_key_") and alice["token"].startswith("fmg_sk_")
    assert alice["scopes"] == ["read:data", "write:data"] and alice["status"] == "active"
    assert alice["metadata"] == {"team": "data", "env": "prod"}
    warned = cli(tmp_path, "keys", "create", "--name", "carol", "--json")
    assert "will not be shown again" in warned.stderr  # stdout stays pure JSON
    assert json.loads(warned.stdout)["token"].startswith("fmg_sk_")
    bob = create(tmp_path, "-n", "bob")

    listed = json.loads(ok(tmp_path, "keys", "list", "--json").stdout)
    assert [k["name"] for k in listed] == ["alice", "carol", "bob"]
    assert all("token" not in k for k in listed)

    shown = json.loads(ok(tmp_path, "keys", "inspect", alice["id"], "--json").stdout)
    assert shown == {k: v for k, v in alice.items() if k != "token"}
    text = ok(tmp_path, "keys", "inspect", alice["id"]).stdout
    assert alice["id"] in text and "team=data" in text and alice["token"] not in text

    rotated = json.loads(ok(tmp_path, "keys", "rotate", alice["id"], "--json").stdout)
    assert rotated["rotated_from"] == alice["id"] and rotated["token"] != alice["token"]
    assert rotated["old"]["status"] == "rotating" and rotated["old"]["rotated_to"] == rotated["id"]
    grace = datetime.fromisoformat(rotated["old"]["grace_until"].replace("Z", "+00:00"))
    expected = datetime.now(timezone.utc) + timedelta(hours=24)  # default grace, as 0.2
    assert abs((grace - expected).total_seconds()) < 60

    revoked = ok(tmp_path, "keys", "revoke", bob["id"], "--force")
    assert "Revoked key " + bob["id"] in revoked.stdout
    active = json.loads(ok(tmp_path, "keys", "list", "--json").stdout)
    assert bob["id"] not in [k["id"] for k in active]
    everything = json.loads(ok(tmp_path, "keys", "list", "--all", "--json").stdout)
    assert {k["id"]: k["status"] for k in everything}[bob["id"]] == "revoked"
    again = ok(tmp_path, "keys", "revoke", bob["id"], "--force")
    assert "already revoked" in again.stdout


def test_table_output_keeps_ids_whole_when_piped(tmp_path: Path) -> None:
    keys = [create(tmp_path, "--name", f"key-{i}", "--scopes", "a,b,c")["id"] for i in range(2)]
    out = ok(tmp_path, "keys", "list").stdout
    for key_id in keys:
        assert key_id in out


def test_expires_bare_number_is_days_and_units_work(tmp_path: Path) -> None:
    now = datetime.now(timezone.utc)
    for flag, delta in (("90", timedelta(days=90)), ("12h", timedelta(hours=12)),
                        ("2w", timedelta(weeks=2))):  # fmt: skip
        key = create(tmp_path, "--name", "t", "--expires", flag)
        expires = datetime.fromisoformat(key["expires_at"].replace("Z", "+00:00"))
        assert abs((expires - (now + delta)).total_seconds()) < 60, flag


def test_rotate_grace_bare_number_is_hours_and_zero_revokes_now(tmp_path: Path) -> None:
    first = create(tmp_path, "--name", "a")
    rotated = json.loads(
        ok(tmp_path, "keys", "rotate", first["id"], "--grace", "2", "--json").stdout
    )
    grace = datetime.fromisoformat(rotated["old"]["grace_until"].replace("Z", "+00:00"))
    expected = datetime.now(timezone.utc) + timedelta(hours=2)
    assert abs((grace - expected).total_seconds()) < 60
    out = ok(tmp_path, "keys", "rotate", rotated["id"], "--grace", "0").stdout
    assert "revoked now" in out
    old = json.loads(ok(tmp_path, "keys", "inspect", rotated["id"], "--json").stdout)
    assert old["status"] == "revoked"


def test_a_key_is_named_by_its_token_public_part_or_whole_token(tmp_path: Path) -> None:
    key = create(tmp_path, "--name", "alice")
    token = key["token"]
    public = "_".join(token.split("_")[:3])  # fmg_sk_<public id>
    for ref in (public, token):
        proc = ok(tmp_path, "keys", "inspect", ref)
        assert key["id"] in proc.stdout and token not in proc.stdout + proc.stderr
    revoked = ok(tmp_path, "keys", "revoke", token, "--force")
    assert token not in revoked.stdout + revoked.stderr
    missing = cli(tmp_path, "keys", "rotate", token)  # revoked: refused, token not echoed
    assert_user_error(missing, 1, key["id"], "revoked")
    assert token not in missing.stderr


# -- secrets stay secret ---------------------------------------------------------------


def test_tokens_never_reach_the_key_file_or_the_audit_log(tmp_path: Path) -> None:
    first = create(tmp_path, "--name", "alice", "--scopes", "read")
    second = json.loads(ok(tmp_path, "keys", "rotate", first["id"], "--json").stdout)
    files = [p for p in tmp_path.iterdir() if p.is_file()]
    names = {p.name for p in files}
    assert {"fastmcp-guard-keys.db", "fastmcp-guard-audit.jsonl"} <= names
    for token in (first["token"], second["token"]):
        secret = token.split("_", 3)[3]
        for path in files:
            data = path.read_bytes()
            assert token.encode() not in data and secret.encode() not in data, path.name


def test_lifecycle_events_name_the_actor(tmp_path: Path) -> None:
    key = create(tmp_path, "--name", "alice")
    rotated = json.loads(
        ok(tmp_path, "keys", "rotate", key["id"], "--actor", "ops-bot", "--json").stdout
    )
    ok(tmp_path, "keys", "revoke", rotated["id"], "--force", "--actor", "carol")
    events = read_audit(tmp_path / "fastmcp-guard-audit.jsonl")
    assert [(e["status"], e["key_id"], e["actor"]) for e in events] == [
        ("created", key["id"], os_user()),
        ("rotated", rotated["id"], "ops-bot"),
        ("revoked", rotated["id"], "carol"),
        ("revoked", key["id"], "carol"),  # still in its grace period: revoked with it
    ]
    assert events[1]["rotated_from"] == key["id"]
    assert events[2]["revoked_predecessors"] == [key["id"]]
    assert events[3]["revoked_with"] == rotated["id"]
    assert all(e["key_name"] == "alice" for e in events)


def test_read_commands_write_no_audit_event(tmp_path: Path) -> None:
    key = create(tmp_path, "--name", "alice")
    ok(tmp_path, "keys", "list")
    ok(tmp_path, "keys", "inspect", key["id"])
    assert len(read_audit(tmp_path / "fastmcp-guard-audit.jsonl")) == 1


def test_audit_option_and_off(tmp_path: Path) -> None:
    ok(tmp_path, "keys", "create", "--name", "a", "--audit", "logs.jsonl")
    assert [e["status"] for e in read_audit(tmp_path / "logs.jsonl")] == ["created"]
    ok(tmp_path, "keys", "create", "--name", "b", env={"FASTMCP_GUARD_AUDIT": "off"})
    assert not (tmp_path / "fastmcp-guard-audit.jsonl").exists()


# -- configuration and 0.2 compatibility ----------------------------------------------


def test_db_flag_before_or_after_the_command(tmp_path: Path) -> None:
    key = create(tmp_path, "--name", "alice", "--db", "custom.db")
    assert (tmp_path / "custom.db").exists()
    assert not (tmp_path / "fastmcp-guard-keys.db").exists()
    before = json.loads(ok(tmp_path, "--db", "custom.db", "keys", "list", "--json").stdout)
    after = json.loads(ok(tmp_path, "keys", "list", "--db", "custom.db", "--json").stdout)
    assert [k["id"] for k in before] == [k["id"] for k in after] == [key["id"]]
    assert json.loads(ok(tmp_path, "--json", "keys", "list").stdout) == []  # the default file


def test_env_and_config_file_choose_the_store(tmp_path: Path) -> None:
    (tmp_path / "fastmcp-guard.toml").write_text('keys = "from-file.db"\n', encoding="utf-8")
    ok(tmp_path, "keys", "create", "--name", "a")
    assert (tmp_path / "from-file.db").exists()
    ok(tmp_path, "keys", "create", "--name", "b", env={"FASTMCP_GUARD_KEYS": "from-env.db"})
    assert (tmp_path / "from-env.db").exists()
    ok(tmp_path, "keys", "create", "--name", "c", "--keys", "sqlite:///from-arg.db",
       env={"FASTMCP_GUARD_KEYS": "from-env.db"})  # fmt: skip
    assert (tmp_path / "from-arg.db").exists()


def test_a_cli_key_verifies_in_a_keystore_on_the_same_file(tmp_path: Path) -> None:
    key = create(tmp_path, "--name", "alice", "--scopes", "read:data", "--db", "keys.db")
    store = KeyStore(backend="sqlite", path=tmp_path / "keys.db")
    try:
        verified = store.verify(key["token"])
        assert verified is not None and verified.id == key["id"]
        assert verified.scopes == ["read:data"]
        ok(tmp_path, "keys", "revoke", key["id"], "--force", "--db", "keys.db")
        deadline = time.monotonic() + 5  # another process's revocation: seen within 0.25 s
        while store.verify(key["token"]) is not None:
            assert time.monotonic() < deadline, "revocation by the CLI not seen by the store"
            time.sleep(0.05)
    finally:
        store.close()


def test_config_shows_each_source_and_masks_secrets(tmp_path: Path) -> None:
    (tmp_path / "fastmcp-guard.toml").write_text(
        'rate = "10/minute"\nallow = ["10.0.0.0/8"]\n', encoding="utf-8"
    )
    env = {"FASTMCP_GUARD_GLOBAL_RATE": "100/minute", "FASTMCP_GUARD_ADMIN_KEY": "topsecret-1",
           "FASTMCP_GUARD_KEYS": "postgresql://guard:dbpass-2@db/guard"}  # fmt: skip
    data = json.loads(ok(tmp_path, "config", "--json", "--db", "k.db", env=env).stdout)
    settings = data["settings"]
    assert settings["keys"] == {"value": f"sqlite:///{tmp_path / 'k.db'}",
                                "source": "argument --db", "env": "FASTMCP_GUARD_KEYS"}  # fmt: skip
    assert settings["rate"]["source"] == "fastmcp-guard.toml"
    assert settings["allow"] == {"value": ["10.0.0.0/8"], "source": "fastmcp-guard.toml",
                                 "env": "FASTMCP_GUARD_ALLOW"}  # fmt: skip
    assert settings["global_rate"]["source"] == "env FASTMCP_GUARD_GLOBAL_RATE"
    assert settings["audit"] == {"value": [f"jsonl:///{tmp_path / 'fastmcp-guard-audit.jsonl'}"],
                                 "source": "default", "env": "FASTMCP_GUARD_AUDIT"}  # fmt: skip
    assert settings["admin_key"]["value"] == "****"
    assert data["config_file"] == str(tmp_path / "fastmcp-guard.toml")

    table = ok(tmp_path, "config", env=env).stdout
    assert "env FASTMCP_GUARD_GLOBAL_RATE" in table and "fastmcp-guard.toml" in table
    assert "topsecret" not in table and "dbpass" not in table
    assert "postgresql://guard:****@db/guard" in table


# -- errors: exit codes and one-line messages -----------------------------------------


def test_bad_duration_is_a_usage_error(tmp_path: Path) -> None:
    assert_user_error(cli(tmp_path, "keys", "create", "--name", "a", "--expires", "3x"), 2,
                      "--expires", "'3x'")  # fmt: skip
    key = create(tmp_path, "--name", "a")
    assert_user_error(cli(tmp_path, "keys", "rotate", key["id"], "--grace", "-1"), 2, "--grace")


def test_unknown_key_is_exit_1(tmp_path: Path) -> None:
    for command in ("inspect", "rotate"):
        assert_user_error(cli(tmp_path, "keys", command, "fmg_key_doesnotexist0"), 1,
                          "no key", "fmg_key_doesnotexist0")  # fmt: skip
    assert_user_error(cli(tmp_path, "keys", "revoke", "fmg_key_doesnotexist0", "--force"), 1)


def test_revoke_without_a_terminal_needs_force(tmp_path: Path) -> None:
    key = create(tmp_path, "--name", "a")
    assert_user_error(cli(tmp_path, "keys", "revoke", key["id"]), 2, "--force", key["id"])
    assert_user_error(cli(tmp_path, "keys", "revoke", key["id"], stdin="y\n"), 2, "--force")
    status = json.loads(ok(tmp_path, "keys", "inspect", key["id"], "--json").stdout)["status"]
    assert status == "active"


def test_bad_inputs_name_what_to_fix(tmp_path: Path) -> None:
    assert_user_error(cli(tmp_path, "keys", "create", "--name", "a", "--meta", "novalue"), 2,
                      "--meta", "KEY=VALUE")  # fmt: skip
    assert_user_error(cli(tmp_path, "keys", "list", env={"FASTMCP_GUARD_RATE": "10/fortnight"}),
                      2, "'rate'", "env FASTMCP_GUARD_RATE", "fortnight")  # fmt: skip
    assert_user_error(cli(tmp_path, "keys", "list", "--keys", "ftp://x/y"), 2, "argument --keys")
    assert_user_error(cli(tmp_path, "--db", "a.db", "keys", "list", "--keys", "memory://"), 2,
                      "--db or --keys")  # fmt: skip
    assert_user_error(cli(tmp_path, "keys", "create"), 2, "--name")
    assert_user_error(cli(tmp_path, "keys", "frobnicate"), 2, "frobnicate")
    assert_user_error(cli(tmp_path, "keys", "create", "--name", ""), 2, "name")


def test_fleet_store_errors_do_not_leak_the_password(tmp_path: Path) -> None:
    from fastmcp.utilities.tests import find_available_port

    port = find_available_port()  # nothing listens there: unreachable store, exit 1
    for scheme in ("postgresql", "redis"):
        proc = cli(tmp_path, "keys", "list", "--keys", f"{scheme}://u:hunter2@127.0.0.1:{port}/1")
        assert_user_error(proc, 1, f"cannot connect to {scheme}://u:****@127.0.0.1")
        assert "hunter2" not in proc.stderr


def test_unreachable_store_is_one_line(tmp_path: Path) -> None:
    proc = cli(tmp_path, "keys", "create", "-n", "a", "--db", str(tmp_path / "no-dir" / "k.db"))
    assert_user_error(proc, 1, "no-dir")
    (tmp_path / "garbage.db").write_bytes(b"this is not a database" * 100)
    assert_user_error(cli(tmp_path, "keys", "list", "--db", "garbage.db"), 1, "garbage.db")


def test_unknown_key_in_the_config_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "fastmcp-guard.toml").write_text('rat = "1/minute"\n', encoding="utf-8")
    assert_user_error(cli(tmp_path, "config"), 2, "'rat'", "fastmcp-guard.toml")


def test_help_has_examples(tmp_path: Path) -> None:
    for args in ((), ("keys",), ("keys", "create"), ("keys", "revoke"), ("config",)):
        proc = ok(tmp_path, *args, "--help")
        assert "examples:" in proc.stdout, args
    for args in ((), ("keys",)):  # no command: the help, on stderr, and exit 2
        proc = cli(tmp_path, *args)
        assert proc.returncode == 2 and proc.stderr.startswith("usage: fastmcp-guard"), args


@pytest.mark.parametrize(
    "module", ["fastmcp_guard.cli", "fastmcp_guard.config", "fastmcp_guard.cli.rate"]
)
def test_cli_does_not_import_fastmcp(module: str) -> None:
    # Every command group's module is imported when the parser is built.
    build = "fastmcp_guard.cli.build_parser()\n" if module.startswith("fastmcp_guard.cli") else ""
    code = (f"import sys, fastmcp_guard.cli, {module}\n{build}"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('fastmcp', 'mcp', 'rich'))\n"
            "assert not bad, bad")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_read_commands_never_create_a_store(tmp_path: Path) -> None:
    assert ok(tmp_path, "keys", "list").stdout.startswith("No keys (no key store at")
    assert json.loads(ok(tmp_path, "keys", "list", "--all", "--json").stdout) == []
    assert_user_error(cli(tmp_path, "keys", "inspect", "fmg_key_doesnotexist0"), 1,
                      "fmg_key_doesnotexist0", "no key store at", "fastmcp-guard-keys.db")  # fmt: skip
    assert_user_error(cli(tmp_path, "keys", "rotate", "fmg_key_doesnotexist0"), 1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("answer", "code", "status"), [("y\n", 0, "revoked"),
                                                        ("n\n", 1, "active")])  # fmt: skip
def test_revoke_asks_on_a_terminal(tmp_path: Path, answer: str, code: int, status: str) -> None:
    import pty

    key = create(tmp_path, "--name", "a")
    controller, terminal = pty.openpty()
    try:
        os.write(controller, answer.encode())  # typed ahead: the tty buffers it
        clean = {k: v for k, v in os.environ.items() if not k.startswith("FASTMCP_GUARD_")}
        proc = subprocess.run(
            [sys.executable, "-m", "fastmcp_guard.cli", "keys", "revoke", key["id"]],
            cwd=tmp_path, env=clean, stdin=terminal, capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(terminal)
        os.close(controller)
    assert proc.returncode == code, proc.stderr
    assert f"Revoke key {key['id']} (a)?" in proc.stderr
    shown = json.loads(ok(tmp_path, "keys", "inspect", key["id"], "--json").stdout)
    assert shown["status"] == status
    statuses = [e["status"] for e in read_audit(tmp_path / "fastmcp-guard-audit.jsonl")]
    assert statuses == (["created", "revoked"] if status == "revoked" else ["created"])
