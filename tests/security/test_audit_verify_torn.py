"""Threat: a forged incomplete line inserted into a chained audit log (issue 10, finding 10).

Incomplete lines carry no chain, so ``audit verify`` used to skip any of them wherever
they were, even with a chain key. Now one is accepted only where a crash leaves it: at
the end of a file (cut short, no newline after it), or in the middle when the next line
is the restart record the writer puts after it when it next writes, which names its
length and BLAKE3 hash and is chained like any line (so with a chain key nobody else can
write one). Anything else fails with exit 1 at that line (``file:line``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fastmcp_guard._core import AuditWriter, audit_log_files
from fastmcp_guard.cli import main

from tests.cli.test_cli_keys import cli

KEY = "chain-key-for-the-torn-line-tests"


def write(path: Path, n: int, *, key: str | None = None, start: int = 0) -> None:
    """``n`` events, one batch each, by one writer run (open, log, close)."""
    w = AuditWriter(str(path), chain_key=key)
    for i in range(start, start + n):
        w.log("ok", "fmg_key_a", "alice", "echo", ["read"], 1.0, None, {"n": i})
        w.flush()
    w.close()


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def verify(path: Path, key: str | None, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    argv = ["audit", "verify", str(path)]
    if key is not None:
        os.environ["TORN_TEST_CHAIN_KEY"] = key
        argv += ["--chain-key-env", "TORN_TEST_CHAIN_KEY"]
    try:
        code = main(argv)
    finally:
        os.environ.pop("TORN_TEST_CHAIN_KEY", None)
    return code, capsys.readouterr().out


@pytest.mark.parametrize("key", [None, KEY], ids=["unkeyed", "keyed"])
@pytest.mark.parametrize("at", [0, 2, 4])
def test_a_forged_incomplete_line_in_the_middle_fails_at_that_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str | None, at: int
) -> None:
    path = tmp_path / "audit.jsonl"
    write(path, 6, key=key)
    assert verify(path, key, capsys)[0] == 0
    ls = lines(path)
    ls.insert(at, '{"ts":"2026-03-09T14:00:00.000Z","status":"ok","key_id":"fmg_key_evil\n')
    path.write_text("".join(ls), encoding="utf-8")
    code, out = verify(path, key, capsys)
    assert code == 1, out
    assert out.startswith(f"broken at {path}:{at + 1}: "), out
    assert "incomplete line in the middle" in out


def test_an_incomplete_line_at_the_end_ending_with_a_newline_is_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.jsonl"
    write(path, 3, key=KEY)
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"ts":"2026-03-09T14:00:00.000Z","status":"ok"\n')
    code, out = verify(path, KEY, capsys)
    assert code == 1 and out.startswith(f"broken at {path}:4: "), out


@pytest.mark.parametrize("key", [None, KEY], ids=["unkeyed", "keyed"])
def test_a_cut_write_then_a_restart_of_the_writer_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str | None
) -> None:
    path = tmp_path / "audit.jsonl"
    write(path, 4, key=key)
    data = path.read_bytes()
    path.write_bytes(data[:-37])  # the last write cut short, as by a crash
    code, out = verify(path, key, capsys)
    assert code == 0 and f"{path}:4 ends with an incomplete line" in out, out
    write(path, 3, key=key, start=4)  # the writer starts again
    code, out = verify(path, key, capsys)
    assert code == 0 and "1 incomplete lines" in out, out
    restart = json.loads(lines(path)[4])
    assert restart["record"] == "restart"
    assert restart["torn_bytes"] == len(lines(path)[3]) - 1  # its newline not counted
    assert "chain" in restart


def test_a_restart_record_with_the_wrong_length_or_hash_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.jsonl"
    write(path, 4, key=KEY)
    path.write_bytes(path.read_bytes()[:-37])
    write(path, 2, key=KEY, start=4)
    assert verify(path, KEY, capsys)[0] == 0
    good = lines(path)
    torn = good[3]
    cases = {
        # the incomplete line replaced by another of the same length: the hash differs
        "hash": torn[:10] + ("X" if torn[10] != "X" else "Y") + torn[11:],
        # one of another length
        "length": torn[:-3] + "\n",
    }
    for name, forged in cases.items():
        path.write_text("".join([*good[:3], forged, *good[4:]]), encoding="utf-8")
        code, out = verify(path, KEY, capsys)
        assert code == 1, (name, out)
        assert out.startswith(f"broken at {path}:4: "), (name, out)
        assert "does not acknowledge" in out, (name, out)
    # The incomplete line removed: the restart record acknowledges what is not there.
    path.write_text("".join([*good[:3], *good[4:]]), encoding="utf-8")
    code, out = verify(path, KEY, capsys)
    assert code == 1 and out.startswith(f"broken at {path}:4: "), out
    # A real (incomplete line, restart record) pair replayed elsewhere: the record
    # acknowledges the bytes, but its chain does not link there.
    path.write_text("".join([*good[:2], good[3], good[4], *good[2:]]), encoding="utf-8")
    code, out = verify(path, KEY, capsys)
    assert code == 1 and out.startswith(f"broken at {path}:4: "), out


_WRITER = textwrap.dedent(
    """
    import sys
    from fastmcp_guard._core import AuditWriter
    w = AuditWriter(sys.argv[1], chain_key=sys.argv[2], batch_max=64)
    big = "x" * 30000
    w.log("ok", "fmg_key_a", "alice", "echo", [], 1.0, None, {"pad": big})
    w.flush()
    print("writing", flush=True)
    i = 0
    while True:
        w.log("ok", "fmg_key_a", "alice", "echo", [], 1.0, None, {"n": i, "pad": big})
        i += 1
    """
)


def test_kill_9_of_a_writing_process_then_a_restart_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Real crashes: each process is killed (SIGKILL) while its writer thread appends
    1 MB batches of 30 KB lines, until a kill lands inside a write and leaves a torn line
    (Linux cuts a large write short on a fatal signal; at most 25 processes). Whatever
    each kill leaves verifies, and so does the log after the next process writes to it."""
    path = tmp_path / "audit.jsonl"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    torn_seen = False
    for n in range(25):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(path), KEY], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline() == "writing\n"
        time.sleep(0.1 + 0.03 * (n % 5))  # let it write a while, then kill it mid-stream
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        code, out = verify(path, KEY, capsys)
        assert code == 0, out
        if not path.read_bytes().endswith(b"\n"):
            torn_seen = True
            assert "ends with an incomplete line" in out, out
            break
    write(path, 2, key=KEY)
    code, out = verify(path, KEY, capsys)
    assert code == 0, out
    if torn_seen:  # the restart acknowledged the torn write (else no kill tore a line)
        assert "1 incomplete lines" in out, out
    assert audit_log_files(str(path)) == [str(path)]


def test_the_real_command_reports_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "fastmcp-guard-audit.jsonl"
    write(path, 3)
    ls = lines(path)
    ls.insert(1, "{\"ts\n")
    path.write_text("".join(ls), encoding="utf-8")
    proc = cli(tmp_path, "audit", "verify")
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"broken at {path}:2: "), proc.stdout
