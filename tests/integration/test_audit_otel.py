"""The OpenTelemetry audit backend with the SDK's in-memory exporter: guard attributes
land on FastMCP 4's own span for the call, plus one event per decision; decisions made
outside any span get a span of their own; fan-out with the JSONL file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastmcp import Client, FastMCP
from fastmcp_guard import AuditLog, FileBackend, Guard, KeyStore, RateLimit
from fastmcp_guard.audit import OTelBackend
from fastmcp_guard.audit.otel import EVENT_NAME
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import http_client, read_audit, serve_http

_EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))
# The global provider can be set once per process; every test here shares it.
trace.set_tracer_provider(_PROVIDER)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    _EXPORTER.clear()
    yield _EXPORTER


def decisions(exporter: InMemorySpanExporter) -> list[tuple[Any, dict[str, Any]]]:
    out = []
    for span in exporter.get_finished_spans():
        for ev in span.events:
            if ev.name == EVENT_NAME:
                out.append((span, dict(ev.attributes or {})))
    return out


def make(audit: AuditLog, **kwargs: Any) -> tuple[FastMCP[Any], Guard]:
    mcp = FastMCP("otel")

    @mcp.tool
    def echo(text: str) -> str:
        return text

    return mcp, Guard(mcp, keys=KeyStore(), audit=audit, **kwargs)


async def test_attributes_on_fastmcps_span_and_one_event_per_decision(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    audit = AuditLog(backend=[FileBackend(tmp_path / "a.jsonl"), OTelBackend()])
    mcp, guard = make(audit, rate_limit=RateLimit(per_key="2/minute"))
    key = guard.keys.create("alice", scopes=["read:data"])
    async with serve_http(mcp) as url, http_client(url, str(key.token)) as client:
        for _ in range(3):
            await client.call_tool("echo", {"text": "hi"}, raise_on_error=False)
    got = [(s, a) for s, a in decisions(spans) if a["fastmcp_guard.tool"] == "echo"]
    assert [a["fastmcp_guard.decision"] for _, a in got] == ["ok", "ok", "rate_limited"]
    for span, attrs in got:
        # The event sits on FastMCP's own span for the request, which carries the guard's
        # attributes too.
        assert span.attributes.get("fastmcp_guard.key_id") == key.id
        assert span.attributes.get("fastmcp_guard.key_name") == "alice"
        assert tuple(span.attributes.get("fastmcp_guard.scopes")) == ("read:data",)
        assert any(k.startswith(("mcp.", "fastmcp.", "rpc.")) for k in span.attributes), span.name
        assert attrs["fastmcp_guard.tool"] == "echo"
        assert str(key.token) not in repr(span.attributes) + repr(attrs)
    assert got[2][0].attributes.get("fastmcp_guard.retry_after", 0) > 0
    audit.flush()
    per_backend = audit.backend_stats()
    assert per_backend["otel"]["otel_events"] >= 3 and per_backend["jsonl"]["written"] >= 3
    guard.close()
    # The same decisions are in the file (fan-out).
    file_events = [e["status"] for e in read_audit(tmp_path / "a.jsonl") if e["tool"] == "echo"]
    assert file_events == ["ok", "ok", "rate_limited"]
    # The key's creation went to both too (outside any request: a span of its own).
    assert any(a["fastmcp_guard.decision"] == "created" for _, a in decisions(spans))


async def test_redaction_applies_to_otel_events(spans: InMemorySpanExporter) -> None:
    audit = AuditLog(backend="otel", redact=["password", "*.token"])
    audit.log("ok", key_id="k", tool="t", input_args={"user": "a", "password": "pw",
                                                        "auth": {"token": "s3cr3t"}})  # fmt: skip
    ((_, attrs),) = decisions(spans)
    assert "pw" not in attrs["fastmcp_guard.input_args"]
    assert "s3cr3t" not in attrs["fastmcp_guard.input_args"]
    assert "[redacted]" in attrs["fastmcp_guard.input_args"]
    assert audit.path == "" and audit.healthy()


async def test_a_decision_outside_any_span_gets_its_own(spans: InMemorySpanExporter) -> None:
    audit = AuditLog(backend=OTelBackend())
    audit.log("unauthorized", error="missing or invalid token", client_ip="10.0.0.9")
    (span,) = spans.get_finished_spans()
    assert span.name == "fastmcp_guard unauthorized"
    assert span.attributes["fastmcp_guard.decision"] == "unauthorized"


async def test_in_process_calls_are_annotated_too(spans: InMemorySpanExporter) -> None:
    mcp, _guard = make(AuditLog(backend="otel"))
    async with Client(mcp) as client:
        await client.call_tool("echo", {"text": "x"})
    ((span, attrs),) = decisions(spans)
    assert attrs["fastmcp_guard.decision"] == "ok"
    assert span.attributes["fastmcp_guard.key_name"].startswith("local:")


def test_backend_list_rules() -> None:
    from fastmcp_guard.errors import ConfigError

    with pytest.raises(ConfigError, match="at most once"):
        AuditLog(backend=[OTelBackend(), "otel"])
    with pytest.raises(ConfigError, match="at least one"):
        AuditLog(backend=[])
