"""The JSONL audit line rendered in the binding straight from Python objects.

``AuditWriter.log`` on a JSONL sink writes the line itself (no intermediate event);
on a SQLite sink it builds the event. Both must record the same values.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from fastmcp_guard._core import AuditWriter, JsonText, audit_query
from hypothesis import given, settings
from hypothesis import strategies as st

FIXED = ["ts", "key_id", "key_name", "tool", "scopes", "duration_ms", "status", "error",
         "input_args", "output_preview", "client_ip", "metadata"]  # fmt: skip


def _lines(path: Path) -> list[dict[str, Any]]:
    # split on "\n" only: str.splitlines() also splits on U+0085 / U+2028 inside strings.
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


class Odd:
    def __repr__(self) -> str:
        return '<Odd "thing"\n>'


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_values_json_cannot_hold_become_their_repr(tmp_path: Path) -> None:
    w = AuditWriter(str(tmp_path / "a.jsonl"))
    nested: Any = "leaf"
    for _ in range(70):
        nested = [nested]
    args = {
        "obj": Odd(),
        "bad": BadRepr(),
        "nan": math.nan,
        "inf": -math.inf,
        "big": 2**70,
        "neg": -(2**63),
        "u64": 2**64 - 1,
        "flag": True,
        "none": None,
        "tup": (1, "x", 2.5),
        3: "int key",
        "deep": nested,
        "lone": "a\ud800b",
    }
    w.log("ok", "k", "n", "t", ("s1",), 1.0, None, args, None, None, None,
          {"retry_after": 1.5, "status": "forged", "ts": 0})  # fmt: skip
    w.close()
    (line,) = _lines(tmp_path / "a.jsonl")
    got = line["input_args"]
    assert got["obj"] == '<Odd "thing"\n>'
    assert got["bad"] == "<unrepresentable>"
    assert got["nan"] is None and got["inf"] is None
    assert got["big"] == str(2**70)
    assert got["neg"] == -(2**63) and got["u64"] == 2**64 - 1
    assert got["flag"] is True and got["none"] is None
    assert got["tup"] == [1, "x", 2.5]
    assert got["3"] == "int key"
    # A lone surrogate cannot be UTF-8: replaced, not fatal.
    assert got["lone"][0] == "a" and got["lone"][-1] == "b" and "\ufffd" in got["lone"]
    depth, x = 0, got["deep"]
    while isinstance(x, list):
        depth, x = depth + 1, x[0]
    assert x == "<nested too deep>" and depth == 64
    # Extras never shadow fixed fields; the real status stays.
    assert line["status"] == "ok" and line["retry_after"] == 1.5
    assert line["ts"] != 0
    assert list(line)[: len(FIXED)] == FIXED
    assert line["scopes"] == ["s1"] and line["metadata"] == {}


def test_json_text_renders_values_as_the_line_does(tmp_path: Path) -> None:
    """JsonText (the OTel backend's attribute text) is the line's own renderer."""
    value = {"obj": Odd(), "nan": math.nan, 3: "k", "tup": (1, "x"), "password": "pw",
             "auth": {"token": "t"}, "é": "ü"}  # fmt: skip
    w = AuditWriter(str(tmp_path / "a.jsonl"), redact=["password", "*.token"])
    w.log("ok", input_args=value)
    w.close()
    (line,) = _lines(tmp_path / "a.jsonl")
    text = JsonText(["password", "*.token"])(value)
    assert json.loads(text) == line["input_args"]
    assert '"password":"[redacted]"' in text and "pw" not in text and '"t"' not in text
    assert JsonText()({"password": "pw"}) == '{"password":"pw"}'
    with pytest.raises(ValueError, match="redact"):
        JsonText(["a..b"])


def test_bad_scopes_are_refused_and_nothing_is_queued(tmp_path: Path) -> None:
    w = AuditWriter(str(tmp_path / "a.jsonl"))
    with pytest.raises(TypeError, match="scopes must be a list or tuple of str, got str"):
        w.log("ok", "k", "n", "t", "read", 1.0)
    with pytest.raises(TypeError, match="scopes must be str, got int"):
        w.log("ok", "k", "n", "t", ["read", 3], 1.0)
    with pytest.raises(ValueError, match="unknown audit status"):
        w.log("fine", "k", "n", "t", [], 1.0)
    w.close()
    assert w.stats()["enqueued"] == 0
    assert (tmp_path / "a.jsonl").read_text() == ""


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    args=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    meta=st.none() | st.dictionaries(st.text(max_size=10), json_values, max_size=3),
    text=st.text(max_size=30),
    scopes=st.lists(st.text(max_size=10), max_size=3),
)
def test_jsonl_and_sqlite_record_the_same_values(
    tmp_path_factory: pytest.TempPathFactory,
    args: dict[str, Any],
    meta: dict[str, Any] | None,
    text: str,
    scopes: list[str],
) -> None:
    d = tmp_path_factory.mktemp("same")
    jl = AuditWriter(str(d / "a.jsonl"))
    db = AuditWriter.sqlite(str(d / "a.db"))
    for w in (jl, db):
        w.log("error", text, text, text, scopes, 2.5, text, args, text, text, meta)
        w.close()
    (line,) = _lines(d / "a.jsonl")
    (row,) = audit_query(str(d / "a.db"))
    for field in ("key_id", "key_name", "tool", "scopes", "duration_ms", "status", "error",
                  "input_args", "output_preview", "client_ip", "metadata"):  # fmt: skip
        assert line[field] == row[field], field
    assert line["input_args"] == args
    assert line["metadata"] == (meta or {})
