"""`fastmcp-guard audit verify` on real chained logs (rotated, restarted), then tampered with.

Each tampering is done to the files the writer produced and must be reported at the
file and line where it happened; `main(argv)` runs in-process, one test also runs the
real command.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fastmcp_guard._core import AuditWriter, audit_log_files
from fastmcp_guard.cli import main

from tests.cli.test_cli_keys import cli


def write_log(path: Path, runs: tuple[int, ...] = (7, 5), *, key: str | None = None) -> list[Path]:
    """Events in separate runs of a writer (a restart between runs), one batch per event,
    rotating every 3 lines; returns the files, oldest first."""
    n = 0
    for count in runs:
        w = AuditWriter(str(path), rotate_bytes=1100, chain_key=key)
        for _ in range(count):
            w.log("ok", "fmg_key_a", "alice", "echo", ["read"], 1.5, None, {"n": n})
            w.flush()
            n += 1
        w.close()
    return [Path(f) for f in audit_log_files(str(path))]


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def edit(path: Path, change: object) -> None:
    ls = lines(path)
    change(ls)  # type: ignore[operator]
    path.write_text("".join(ls), encoding="utf-8")


def verify(path: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["audit", "verify", str(path), *args])
    return code, capsys.readouterr().out


def test_a_clean_log_verifies_across_rotation_and_restarts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.jsonl"
    files = write_log(path)
    code, out = verify(path, capsys=capsys)
    assert code == 0, out
    assert out.startswith(f"OK: 12 events in {len(files)} files\n"), out
    # Every event is there once, in order, with a unique id.
    events = [json.loads(line) for f in files for line in lines(f)]
    assert [e["input_args"]["n"] for e in events] == list(range(12))
    assert len({e["id"] for e in events}) == 12 and all(len(e["id"]) == 26 for e in events)


def test_each_kind_of_tampering_is_found_where_it_happened(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def fresh(name: str) -> tuple[Path, list[Path]]:
        d = tmp_path / name
        d.mkdir()
        files = write_log(d / "audit.jsonl")
        assert len(files) == 4 and all(len(lines(f)) == 3 for f in files), files
        return d / "audit.jsonl", files

    def swap(ls: list[str]) -> None:
        ls[0], ls[1] = ls[1], ls[0]

    cases: dict[str, tuple[object, int, int]] = {
        # name: (change to the middle file, file index, line reported)
        "edit": (lambda ls: ls.__setitem__(1, ls[1].replace('"alice"', '"mallory"')), 1, 2),
        "delete": (lambda ls: ls.pop(1), 1, 2),
        "insert": (lambda ls: ls.insert(1, ls[0]), 1, 2),
        "reorder": (swap, 1, 1),
    }
    for name, (change, index, line) in cases.items():
        path, files = fresh(name)
        edit(files[index], change)
        code, out = verify(path, capsys=capsys)
        assert code == 1, (name, out)
        assert out.startswith(f"broken at {files[index]}:{line}: "), (name, out)

    # The last line cut short: what a crash mid-write leaves (the writer acknowledges it
    # with a restart record when it next writes); reported, not a break.
    path, files = fresh("truncate")
    data = files[-1].read_bytes()
    files[-1].write_bytes(data[:-40])
    code, out = verify(path, capsys=capsys)
    n = len(lines(files[-1]))
    assert code == 0 and f"{files[-1]}:{n} ends with an incomplete line" in out, out
    # Cut short but with its newline kept: no crash leaves that, so it is a break.
    files[-1].write_bytes(data[:-40] + b"\n")
    code, out = verify(path, capsys=capsys)
    assert code == 1 and out.startswith(f"broken at {files[-1]}:{n}: "), out
    assert "incomplete" in out

    # A whole rotated file removed from the middle.
    path, files = fresh("gone")
    files[1].unlink()
    code, out = verify(path, capsys=capsys)
    assert code == 1 and out.startswith(f"broken at {files[2]}:1: "), out
    assert "missing" in out


def test_a_keyed_chain_needs_the_key_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, key="s3cret-chain-key")
    code, out = verify(path, capsys=capsys)
    assert code == 1 and "chain key" in out
    monkeypatch.setenv("AUDIT_CHAIN_KEY", "s3cret-chain-key")
    code, out = verify(path, "--chain-key-env", "AUDIT_CHAIN_KEY", capsys=capsys)
    assert code == 0 and out.startswith("OK: 12 events"), out
    monkeypatch.setenv("AUDIT_CHAIN_KEY", "wrong")
    assert verify(path, "--chain-key-env", "AUDIT_CHAIN_KEY", capsys=capsys)[0] == 1
    # The configured key is used by default.
    monkeypatch.setenv("FASTMCP_GUARD_AUDIT_CHAIN_KEY", "s3cret-chain-key")
    assert verify(path, capsys=capsys)[0] == 0
    assert main(["audit", "verify", str(path), "--chain-key-env", "NOPE_NOT_SET"]) == 2
    assert "NOPE_NOT_SET is not set" in capsys.readouterr().err


def test_verify_json_and_the_real_command(tmp_path: Path) -> None:
    path = tmp_path / "fastmcp-guard-audit.jsonl"
    files = write_log(path, runs=(4,))
    proc = cli(tmp_path, "audit", "verify", "--json")  # the embedded default path
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["events"] == 4 and report["broken"] is None
    assert report["paths"] == [str(f) for f in files]
    edit(files[0], lambda ls: ls.__setitem__(0, ls[0].replace("echo", "ech0")))
    proc = cli(tmp_path, "audit", "verify")
    assert proc.returncode == 1 and proc.stdout.startswith(f"broken at {files[0]}:1: ")
    assert proc.stderr == ""


def test_query_and_export_read_rotated_files_oldest_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    assert main(["--audit", str(path), "audit", "query", "--json"]) == 0
    got = [json.loads(line)["input_args"]["n"] for line in capsys.readouterr().out.splitlines()]
    assert got == list(range(12))
    assert main(["--audit", str(path), "audit", "query", "--json", "--limit", "5"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5
    out = tmp_path / "all.csv"
    assert main(["--audit", str(path), "audit", "export", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 13  # header + 12
    capsys.readouterr()
    assert main(["--audit", str(path), "audit", "tail", "-n", "4", "--json"]) == 0
    tail = [json.loads(line)["input_args"]["n"] for line in capsys.readouterr().out.splitlines()]
    assert tail == [8, 9, 10, 11]


def test_verify_explains_what_it_cannot_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", "verify", str(tmp_path / "none.jsonl")]) == 1
    assert "no audit log here" in capsys.readouterr().err
    assert main(["--audit", str(tmp_path / "a.db"), "audit", "verify"]) == 2
    assert "JSONL" in capsys.readouterr().err
    # Lines written before the chain was on are reported, not checked.
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps({"ts": "2026-01-01T00:00:00.000Z", "status": "ok"}) + "\n")
    w = AuditWriter(str(path))
    w.log("ok", "k", "n", "t", [], 1.0)
    w.close()
    code, out = verify(path, capsys=capsys)
    assert code == 0 and "1 earlier lines carry no chain" in out, out
    assert os.path.exists(path)
