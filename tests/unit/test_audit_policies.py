"""Redaction, rotation options and the ``on_failure`` policies of :class:`AuditLog`.

Write failures are real: ``/dev/full`` opens fine and fails every write with ENOSPC, as a
full disk does.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
from fastmcp import Client, FastMCP
from fastmcp_guard import Guard
from fastmcp_guard._core import AuditWriter, audit_log_files, audit_query, audit_verify
from fastmcp_guard.audit import AuditLog, FileBackend, SQLiteBackend
from fastmcp_guard.errors import ConfigError
from mcp import MCPError

from tests.conftest import read_audit

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="/dev/full is Linux's")

NESTED = {
    "user": "alice",
    "password": "hunter2",
    "headers": {"Authorization": "Bearer abc", "accept": "json"},
    "items": [{"token": "t1", "name": "a"}, [{"token": "t2"}], "plain"],
    "db": {"token": "t3", "inner": {"token": "deep"}},
    "meta": {"password": {"nested": "whole subtree"}},
}
PATTERNS = ["password", "*.token", "headers.authorization"]
EXPECTED = {
    "user": "alice",
    "password": "[redacted]",
    "headers": {"Authorization": "[redacted]", "accept": "json"},
    "items": [{"token": "[redacted]", "name": "a"}, [{"token": "[redacted]"}], "plain"],
    "db": {"token": "[redacted]", "inner": {"token": "deep"}},
    "meta": {"password": "[redacted]"},
}


# -- redaction -------------------------------------------------------------------------


def test_redaction_of_nested_lists_of_dicts_is_the_same_for_jsonl_and_sqlite(
    tmp_path: Path,
) -> None:
    jl = AuditLog(backend=FileBackend(tmp_path / "a.jsonl"), redact=PATTERNS)
    db = AuditLog(backend=SQLiteBackend(tmp_path / "a.db"), redact=PATTERNS)
    for log in (jl, db):
        log.log("ok", tool="t", input_args=NESTED, metadata={"Password": "x", "team": "t"},
                extra={"password": "extras are not redacted"})  # fmt: skip
        log.close()
    (line,) = read_audit(tmp_path / "a.jsonl")
    (row,) = audit_query(str(tmp_path / "a.db"))
    for rec in (line, row):
        assert rec["input_args"] == EXPECTED
        assert rec["metadata"] == {"Password": "[redacted]", "team": "t"}
        assert rec["password"] == "extras are not redacted"
    assert NESTED["password"] == "hunter2", "the caller's objects are not touched"


def test_without_patterns_values_are_written_unchanged(tmp_path: Path) -> None:
    log = AuditLog(backend=FileBackend(tmp_path / "a.jsonl"), redact=[])
    log.log("ok", input_args=NESTED)
    log.close()
    assert read_audit(tmp_path / "a.jsonl")[0]["input_args"] == NESTED


@pytest.mark.parametrize("bad", [["a..b"], [""], ["tok*"], "password"])
def test_bad_redact_patterns_are_config_errors(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ConfigError, match="redact"):
        AuditLog(backend=FileBackend(tmp_path / "a.jsonl"), redact=bad)


# -- rotation and chain options --------------------------------------------------------


def test_file_backend_rotates_keeps_retention_and_chains(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(backend=FileBackend(path, rotate_bytes=1, retention=2, chain_key=b"k"))
    for i in range(5):
        log.log("ok", tool="t", input_args={"i": i})
        log.flush()  # one batch each: every batch after the first rotates
    log.close()
    files = audit_log_files(str(path))
    assert len(files) == 3 and files[-1] == str(path)
    assert [e["input_args"]["i"] for f in files for e in read_audit(f)] == [2, 3, 4]
    report = audit_verify(str(path), key=b"k")
    assert report["ok"] and report["events"] == 3, report
    assert report["continues_from"] == f"{files[0]}:1"  # older files went to retention
    assert "chain_key" not in repr(log.backend) and "'k'" not in repr(log.backend)


def test_chain_can_be_turned_off(tmp_path: Path) -> None:
    log = AuditLog(backend=FileBackend(tmp_path / "a.jsonl", chain=False))
    log.log("ok")
    log.close()
    (event,) = read_audit(tmp_path / "a.jsonl")
    assert "chain" not in event and "id" not in event


def test_extras_cannot_forge_the_chain_fields(tmp_path: Path) -> None:
    log = AuditLog(backend=FileBackend(tmp_path / "a.jsonl"))
    log.log("ok", extra={"id": "forged", "chain": "0" * 64, "prev": "x", "actor": "me"})
    log.close()
    text = (tmp_path / "a.jsonl").read_text()
    assert text.count('"chain"') == 1 and text.count('"id"') == 1 and '"prev"' in text
    assert "forged" not in text and json.loads(text)["actor"] == "me"
    assert audit_verify(str(tmp_path / "a.jsonl"))["ok"]


# -- on_failure ------------------------------------------------------------------------


def test_unknown_policy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="on_failure"):
        AuditLog(backend=FileBackend(tmp_path / "a.jsonl"), on_failure="ignore")  # type: ignore[arg-type]


@linux_only
def test_drop_counts_failed_writes_and_warns_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = AuditLog(backend=FileBackend("/dev/full"))
    assert log.on_failure == "drop" and log.healthy()
    with caplog.at_level(logging.WARNING, logger="fastmcp_guard.audit"):
        assert log.log("ok", tool="a")  # queued: the failure comes later
        with pytest.raises(OSError, match="No space left"):
            log.flush()
        assert not log.healthy()
        for _ in range(5):
            assert log.log("ok", tool="b")  # drop: the call is never refused
        with pytest.raises(OSError):
            log.flush()
        warnings = [r for r in caplog.records if r.name == "fastmcp_guard.audit"]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "1 event lost" in warnings[0].getMessage()
        assert "No space left" in warnings[0].getMessage()
        log.close()
    stats = log.stats()
    assert stats["failed"] == 6 and stats["written"] == 0 and stats["dropped"] == 0
    # close() reports what the interval held back.
    warnings = [r.getMessage() for r in caplog.records if r.name == "fastmcp_guard.audit"]
    assert len(warnings) == 2 and "5 events lost" in warnings[1], warnings


def test_drop_warns_about_a_full_queue(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w = AuditWriter(str(tmp_path / "a.jsonl"), queue_capacity=1)
    w.close()  # a closed writer drops everything, like a full queue
    with caplog.at_level(logging.WARNING, logger="fastmcp_guard.audit"):
        for _ in range(3):
            assert not w.log("ok", "k", "n", "t", [], 1.0)
    (record,) = caplog.records
    assert "1 event lost" in record.getMessage() and "dropped" in record.getMessage()


def test_block_waits_for_room_instead_of_dropping(tmp_path: Path) -> None:
    log = AuditLog(backend=FileBackend(tmp_path / "a.jsonl", queue_capacity=4), on_failure="block")
    for i in range(3000):
        assert log.log("ok", input_args={"i": i})
    log.close()
    stats = log.stats()
    assert stats["dropped"] == 0 and stats["written"] == 3000
    assert [e["input_args"]["i"] for e in read_audit(tmp_path / "a.jsonl")] == list(range(3000))


@linux_only
def test_block_still_accepts_when_the_disk_is_full() -> None:
    # Blocking is about queue room; failed writes are counted as under drop.
    log = AuditLog(backend=FileBackend("/dev/full", queue_capacity=1), on_failure="block")
    for _ in range(200):
        assert log.log("ok")
    with pytest.raises(OSError):
        log.close()
    stats = log.stats()
    assert stats["dropped"] == 0 and stats["failed"] == 200


def guarded(audit: AuditLog) -> tuple[FastMCP, list[int]]:
    mcp = FastMCP("t")
    ran: list[int] = []

    @mcp.tool
    def work(n: int) -> int:
        ran.append(n)
        return n

    Guard(mcp, audit=audit)
    return mcp, ran


@linux_only
async def test_fail_closed_refuses_calls_while_the_log_cannot_record() -> None:
    audit = AuditLog(backend=FileBackend("/dev/full"), on_failure="fail_closed")
    mcp, ran = guarded(audit)
    async with Client(mcp) as client:
        assert (await client.call_tool("work", {"n": 1})).data == 1  # healthy until a write fails
        with pytest.raises(OSError):
            audit.flush()
        assert not audit.healthy()
        with pytest.raises(MCPError, match="audit log unavailable"):
            await client.call_tool("work", {"n": 2})
        assert ran == [1], "the tool did not run"
    with pytest.raises(OSError):
        audit.close()


async def test_fail_closed_lets_calls_through_while_the_log_is_healthy(tmp_path: Path) -> None:
    audit = AuditLog(backend=FileBackend(tmp_path / "a.jsonl"), on_failure="fail_closed")
    mcp, ran = guarded(audit)
    async with Client(mcp) as client:
        for n in range(3):
            assert (await client.call_tool("work", {"n": n})).data == n
    audit.close()
    assert ran == [0, 1, 2]
    assert [e["status"] for e in read_audit(tmp_path / "a.jsonl")] == ["ok"] * 3


async def test_fail_closed_refuses_when_the_writer_is_closed(tmp_path: Path) -> None:
    audit = AuditLog(backend=FileBackend(tmp_path / "a.jsonl"), on_failure="fail_closed")
    mcp, ran = guarded(audit)
    audit.close()
    async with Client(mcp) as client:
        with pytest.raises(MCPError, match="audit log unavailable"):
            await client.call_tool("work", {"n": 1})
    assert ran == []


@pytest.mark.parametrize(
    ("log_inputs", "log_outputs", "chars"), [(True, True, 200), (False, True, 3), (True, False, 0)]
)
def test_the_rust_log_path_applies_the_same_choices_as_the_python_one(
    tmp_path: Path, log_inputs: bool, log_outputs: bool, chars: int
) -> None:
    """``AuditLog.log`` is the core writer's method whatever the backends (OTel alone too:
    a writer with no sink); observers are called by it. The file and an observer of a
    log with or without a written backend all see the same recorded fields."""
    opts: dict[str, Any] = {"log_inputs": log_inputs, "log_outputs": log_outputs,
                            "output_preview_chars": chars}  # fmt: skip

    class Collector:
        def __init__(self) -> None:
            self.seen: list[tuple[Any, ...]] = []

        def log(self, *fields: Any) -> bool:
            self.seen.append(fields)
            return True

        def flush(self) -> None: ...
        def close(self) -> None: ...
        def stats(self) -> dict[str, int]:
            return {}

        def healthy(self) -> bool:
            return True

    rust = AuditLog(backend=FileBackend(tmp_path / "a.jsonl"), **opts)
    python = AuditLog(backend="otel", **opts)
    tap, target = Collector(), Collector()
    rust.add_observer(tap)
    python.add_observer(target)
    for log in (rust, python):
        assert type(log.log).__name__ == "builtin_function_or_method"  # no Python frame
    for log in (rust, python):
        assert log.log("ok", key_id="k", tool="t", scopes=["s"], input_args={"a": 1},
                       output_preview="héllo wörld", metadata={"m": 2})  # fmt: skip
        assert log.log("error", error="boom")  # every other field defaulted
        log.close()

    def same(seen: list[tuple[Any, ...]]) -> list[list[Any]]:
        return [[list(x) if i == 4 else x for i, x in enumerate(f)] for f in seen]

    assert same(tap.seen) == same(target.seen)  # scopes: a tuple from the core
    (line, _) = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert line["input_args"] == ({"a": 1} if log_inputs else None) == tap.seen[0][7]
    want = "héllo wörld"[:chars] if log_outputs else None
    assert line["output_preview"] == want == tap.seen[0][8]
    assert tap.seen[1][:4] == ("error", "", "", "") and tap.seen[1][6] == "boom"
    with pytest.raises(AttributeError):
        rust.log_inputs = not log_inputs  # type: ignore[misc]  # fixed at construction


def test_an_observer_that_raises_or_refuses_is_not_hidden(tmp_path: Path) -> None:
    w = AuditWriter(str(tmp_path / "a.jsonl"))
    w.add_observer(lambda *f: False)
    assert w.log("ok") is False  # queued, but a target refused: not all recorded
    w2 = AuditWriter(str(tmp_path / "b.jsonl"))

    def boom(*fields: Any) -> bool:
        raise RuntimeError("observer failed")

    w2.add_observer(boom)
    with pytest.raises(RuntimeError, match="observer failed"):
        w2.log("ok")
    w.close()
    w2.close()
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 1  # queued first


def test_text_python_cannot_encode_is_recorded_lossily_never_refused(tmp_path: Path) -> None:
    """A lone surrogate (a str Python cannot encode as UTF-8) in the result, the error or
    the key fields: the event is recorded with U+FFFD in its place; with outputs off the
    result is not even read."""
    off = AuditLog(backend=FileBackend(tmp_path / "off.jsonl"), log_outputs=False)
    assert off.log("ok", key_id="k", output_preview="bad \ud800 text")
    off.close()
    (line,) = [json.loads(x) for x in (tmp_path / "off.jsonl").read_text().splitlines()]
    assert line["output_preview"] is None and line["key_id"] == "k"
    on = AuditLog(backend=FileBackend(tmp_path / "on.jsonl"))
    bad = "bad \ud800 text"
    assert on.log("error", key_id=bad, tool=bad, error=bad, output_preview=bad, client_ip=bad)
    on.close()
    (line,) = [json.loads(x) for x in (tmp_path / "on.jsonl").read_text().splitlines()]
    for field in ("key_id", "tool", "error", "output_preview", "client_ip"):
        # The surrogate became U+FFFD (one per byte of its invalid UTF-8 form).
        assert line[field].startswith("bad \ufffd") and line[field].endswith("\ufffd text")
        assert line[field].replace("\ufffd", "") == "bad  text", field
