"""HttpBackend over HTTPS against a real receiver on 127.0.0.1 whose certificate is signed
by a CA made in the test: ``ca_file`` trusts it, the system trust store does not, and
host names are checked. Refused events wait in the spool and arrive once when trusted."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastmcp_guard import AuditLog
from fastmcp_guard.audit import HttpBackend
from fastmcp_guard.config import GuardConfig
from fastmcp_guard.errors import ConfigError

from tests.integration.audit_receiver import Receiver
from tests.integration.test_audit_http import SECRET, _backend, _log, _wait
from tests.integration.tls import CA, make_ca


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return make_ca(tmp_path / "ca")


@pytest.fixture
def receiver(ca: CA) -> Iterator[Receiver]:
    r = Receiver(secret=SECRET, tls=ca.server_context(ips=("127.0.0.1",))).start()
    yield r
    r.stop()


def _spooled_ids(spool: Path) -> set[str]:
    """The ids of the events in the spool files (shipped or not)."""
    return {json.loads(line)["id"] for f in sorted(spool.glob("audit-spool*.jsonl"))
            for line in f.read_text().splitlines() if line}  # fmt: skip


def _trust_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "fastmcp_guard.audit" and "not trusted" in r.getMessage()]  # fmt: skip


def test_with_the_test_ca_every_event_arrives_signed(
    receiver: Receiver, ca: CA, tmp_path: Path
) -> None:
    assert receiver.url.startswith("https://127.0.0.1:")
    audit = AuditLog(backend=_backend(receiver, tmp_path / "spool", secret=SECRET,
                                      ca_file=ca.cert_path, batch_max=40))  # fmt: skip
    _log(audit, 200)
    audit.close()
    assert len(receiver.ids) == 200 and set(receiver.ids.values()) == {1}
    assert len(receiver.requests) >= 5 and all(r.signed_ok for r in receiver.requests)
    assert receiver.tls_failures == []


def test_untrusted_certificate_keeps_the_events_until_a_restart_with_the_ca(
    receiver: Receiver, ca: CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "spool"
    with caplog.at_level(logging.WARNING, logger="fastmcp_guard.audit"):
        # No ca_file: the system trust store, which does not know the test CA.
        audit = AuditLog(backend=_backend(receiver, spool, backoff_cap=0.1, drain_timeout=0.5))
        _log(audit, 50)
        audit.flush()
        _wait(lambda: len(receiver.tls_failures) >= 4)  # refused, retried, refused again
        assert audit.stats()["shipped"] == 0
        audit.close()
    assert receiver.requests == [] and receiver.ids == {}  # nothing got through
    assert all("unknown ca" in f.lower() for f in receiver.tls_failures), receiver.tls_failures
    (warning,) = _trust_warnings(caplog)  # once, for every refusal
    assert receiver.url in warning and "certificate that is not trusted" in warning
    assert "ca_file" in warning and str(spool) in warning
    spooled = _spooled_ids(spool)
    assert len(spooled) == 50  # nothing lost

    audit = AuditLog(backend=_backend(receiver, spool, ca_file=ca.cert_path))
    receiver.wait_for(50)
    audit.close()
    assert set(receiver.ids) == spooled and set(receiver.ids.values()) == {1}


def test_a_certificate_for_another_host_name_is_refused(
    ca: CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = Receiver(tls=ca.server_context(ips=(), dns=("receiver.test",))).start()
    try:
        with caplog.at_level(logging.WARNING, logger="fastmcp_guard.audit"):
            audit = AuditLog(backend=_backend(receiver, tmp_path / "spool", ca_file=ca.cert_path,
                                              backoff_cap=0.1, drain_timeout=0.3))  # fmt: skip
            _log(audit, 5)
            _wait(lambda: len(receiver.tls_failures) >= 2)
            audit.close()
    finally:
        receiver.stop()
    assert receiver.requests == []
    (warning,) = _trust_warnings(caplog)
    assert "mismatch" in warning and "127.0.0.1" in warning
    assert "a host the certificate covers" in warning


def test_config_settings_reach_an_https_target(receiver: Receiver, ca: CA, tmp_path: Path) -> None:
    env = {"FASTMCP_GUARD_AUDIT": f"audit.jsonl,{receiver.url}",
           "FASTMCP_GUARD_AUDIT_HTTP_CA_FILE": str(ca.cert_path),
           "FASTMCP_GUARD_AUDIT_HTTP_SECRET": SECRET.decode(),
           "FASTMCP_GUARD_AUDIT_HTTP_HEADERS": "Authorization: Bearer t0ken; X-Tenant: acme",
           "FASTMCP_GUARD_AUDIT_FLUSH_INTERVAL_MS": "20"}  # fmt: skip
    audit = GuardConfig.load(env=env, cwd=tmp_path).audit_log()
    assert audit is not None
    _log(audit, 30)
    receiver.wait_for(30)
    audit.close()
    assert all(r.signed_ok for r in receiver.requests)
    assert receiver.requests[0].headers["Authorization"] == "Bearer t0ken"
    assert receiver.requests[0].headers["X-Tenant"] == "acme"
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 30
    assert (tmp_path / "fastmcp-guard-audit-spool").is_dir()


@pytest.mark.parametrize("name", ["missing.pem", "junk.pem", "ca/server.key", "ca"])
def test_a_ca_file_that_is_no_pem_bundle_is_a_config_error(
    ca: CA, tmp_path: Path, name: str
) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    ca.server_context()  # writes ca/server.key: a PEM private key, not a certificate
    path = tmp_path / name
    with pytest.raises(ConfigError, match="HttpBackend ca_file") as info:
        HttpBackend("https://127.0.0.1:9/ingest", ca_file=path)
    assert str(path) in str(info.value) and "PEM file of CA certificates" in str(info.value)
