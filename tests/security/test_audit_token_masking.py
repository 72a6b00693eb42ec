"""Threat: a token reaches the audit log (issue 10, finding 1, last line of defence).

Whatever a caller or a tool puts in an audit field (a tool argument, a key of one, an
error message, metadata, the output preview, extra fields, even the tool name), the core's
renderer masks anything token-shaped, in every backend: the JSONL file, the SQLite
database, the HTTP spool and what the endpoint receives, and OpenTelemetry attributes.
The secret never reaches the disk or the wire; the public part stays useful
(``fmg_sk_<id>_***``). The files are grepped byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastmcp import Client, FastMCP
from fastmcp.exceptions import ToolError
from fastmcp_guard import AuditLog, FileBackend, Guard, KeyStore, SQLiteBackend
from fastmcp_guard._core import JsonText, mask_tokens
from fastmcp_guard.audit import HttpBackend, OTelBackend

from tests.integration.audit_receiver import Receiver
from tests.integration.test_audit_otel import decisions, spans  # noqa: F401 - a fixture

#: A fastmcp-guard 0.2 token: ``fmg_sk_<16 hex>.<token_urlsafe(32)>``.
LEGACY = "fmg_sk_0123456789abcdef.Zq-3_kT9xY2mW7vB1nL4pR8sD6fH0jK5cG3aE9uI2oQ"
LEGACY_SECRET = LEGACY.split(".", 1)[1]


def new_token() -> tuple[str, str, str]:
    """(token, its secret part, the masked form the log must show)."""
    key = KeyStore().create("victim")
    token = str(key.token)
    kid = key.id.removeprefix("fmg_key_")
    prefix = f"fmg_sk_{kid}_"
    assert token.startswith(prefix)
    return token, token[len(prefix) :], prefix + "***"


def leaky_fields(token: str) -> dict[str, Any]:
    """An event with the tokens in every field, in every shape the issue lists."""
    nested_json = json.dumps({"auth": {"header": f"Bearer {token}"}})
    return {
        "key_id": "fmg_key_x",
        "key_name": f"named {token}",
        "tool": f"tool_{token}",
        "scopes": [f"scope:{token}"],
        "error": f'upstream said "invalid token {token}"\n\t({LEGACY})',
        "input_args": {
            "token": token,  # a value
            token: "as a key",  # a key
            "deep": [{"x": [f"x{token}y", f"{token}{token}", f"={token}&next=1"]}],
            # JSON text inside a string: the token sits among escaped quotes.
            "payload": nested_json,
            "twice_encoded": json.dumps(nested_json),
            # Escapes right before and after it, control characters, a backslash.
            "escapes": f'\\"{token}\\"\n\x00{token}\x1f\\{token}',
            "legacy": [LEGACY, f"[{LEGACY}]", f"{LEGACY}-more"],
            "unicode": f"é{token}é",
        },
        "output_preview": f"result: {token} and {LEGACY}",
        "client_ip": "10.0.0.1",
        "metadata": {"m": token, "legacy": LEGACY},
        "extra": {"header": f"Authorization: Bearer {token}", f"k{token}": 1},
    }


def all_bytes(directory: Path) -> bytes:
    """Every file under ``directory`` (log, database, WAL, spool), concatenated."""
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


def test_tokens_in_every_field_never_reach_the_jsonl_sqlite_or_http_backends(
    tmp_path: Path,
) -> None:
    token, secret, masked = new_token()
    receiver = Receiver().start()
    try:
        (tmp_path / "logs").mkdir()
        audit = AuditLog(backend=[
            FileBackend(tmp_path / "logs" / "audit.jsonl"),
            SQLiteBackend(tmp_path / "logs" / "audit.db"),
            HttpBackend(receiver.url, spool_dir=tmp_path / "logs" / "spool"),
        ])  # fmt: skip
        fields = leaky_fields(token)
        assert audit.log("error", **fields)
        # The preview is cut through the token (30 characters): a truncated token too.
        audit_cut = AuditLog(
            backend=FileBackend(tmp_path / "logs" / "cut.jsonl"), output_preview_chars=30
        )
        assert audit_cut.log("ok", tool="t", output_preview=f"0123456789{token}")
        audit_cut.close()
        audit.close()
        receiver.wait_for(1)
        received = json.dumps(receiver.accepted())
    finally:
        receiver.stop()
    on_disk = all_bytes(tmp_path / "logs")
    for where, data in (("disk", on_disk), ("HTTP endpoint", received.encode())):
        assert secret.encode() not in data, where
        assert LEGACY_SECRET.encode() not in data, where
        assert secret[:20].encode() not in data, f"part of the secret on the {where}"
    assert masked.encode() in on_disk and masked in received
    assert b"fmg_sk_0123456789abcdef.***" in on_disk
    # Every line is still valid JSON, and the fields are where they were.
    line = json.loads((tmp_path / "logs" / "audit.jsonl").read_text().splitlines()[0])
    assert line["tool"] == f"tool_{masked}"
    assert line["input_args"]["token"] == masked
    assert masked in line["input_args"]
    assert line["input_args"]["deep"][0]["x"] == [f"x{masked}", masked, f"={masked}&next=1"]
    assert json.loads(line["input_args"]["payload"]) == {"auth": {"header": f"Bearer {masked}"}}
    assert line["error"].startswith(f'upstream said "invalid token {masked}"\n\t(')
    # Cut 20 characters into the token: too short to be sure of its id, masked whole.
    cut = json.loads((tmp_path / "logs" / "cut.jsonl").read_text())
    assert cut["output_preview"] == "0123456789fmg_sk_***"


async def test_a_token_in_a_tool_call_through_a_guarded_server_is_masked(tmp_path: Path) -> None:
    mcp: FastMCP[Any] = FastMCP("leaky")

    @mcp.tool
    def echo(text: str) -> str:
        return f"you said {text}"

    @mcp.tool
    def login(token: str) -> str:
        raise ValueError(f"token {token} was refused upstream")

    audit = AuditLog(backend=[FileBackend(tmp_path / "a.jsonl"), SQLiteBackend(tmp_path / "a.db")])
    guard = Guard(mcp, keys=KeyStore(), audit=audit)
    token, secret, masked = new_token()
    async with Client(mcp) as client:
        assert (await client.call_tool("echo", {"text": token})).data == f"you said {token}"
        with pytest.raises(ToolError, match="was refused upstream"):
            await client.call_tool("login", {"token": token})
    guard.close()
    data = all_bytes(tmp_path)
    assert secret.encode() not in data
    events = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    echoed = next(e for e in events if e["tool"] == "echo")
    assert echoed["input_args"] == {"text": masked}
    assert echoed["output_preview"] == f"you said {masked}"
    refused = next(e for e in events if e["tool"] == "login")
    assert refused["status"] == "error" and masked in refused["error"]
    rows = await audit.query(tool="login")
    assert rows and masked in rows[0]["error"] and secret not in json.dumps(rows)


def test_otel_attributes_are_masked(spans: Any) -> None:  # noqa: F811 - the fixture
    token, secret, masked = new_token()
    audit = AuditLog(backend=OTelBackend())
    assert audit.log("unauthorized", **leaky_fields(token))
    got = [attrs for _, attrs in decisions(spans) if attrs.get("fastmcp_guard.error")]
    assert got
    text = repr([(s.attributes, [e.attributes for e in s.events]) for s in spans.get_finished_spans()])
    assert secret not in text and LEGACY_SECRET not in text
    assert masked in text


def test_the_mask_is_one_function_and_costs_nothing_without_a_token() -> None:
    token, _secret, masked = new_token()
    plain = "nothing secret here: fmg_key_abc, fmg_sk_ alone, fmg_sk"
    assert mask_tokens(plain) is plain  # the same object: no copy when there is no token
    assert mask_tokens(f"a {token} b") == f"a {masked} b"
    assert mask_tokens(LEGACY) == "fmg_sk_0123456789abcdef.***"
    assert mask_tokens("fmg_sk_truncated") == "fmg_sk_***"
    # JsonText (what the OTel backend renders values with) masks too.
    assert JsonText()({"t": token}) == json.dumps({"t": masked}, separators=(",", ":"))
