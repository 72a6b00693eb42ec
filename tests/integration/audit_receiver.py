"""A real HTTP audit receiver for the tests: stdlib ``http.server`` on 127.0.0.1.

Records every request (headers and raw body), checks gzip, the HMAC signature and the
``Idempotency-Key`` header, and deduplicates events by id. ``plan`` picks the answer
per request: ``(status, headers)`` or ``None`` for 200. With ``tls`` (a server-side
``ssl.SSLContext``) it serves HTTPS and records the TLS handshakes that failed (a client
refusing its certificate) in ``tls_failures``. Also runnable as a script
(``python audit_receiver.py PORT``) that prints ``ready`` and serves until killed; it
then answers ``GET /ids`` with the distinct ids received so far.
"""

from __future__ import annotations

import gzip
import json
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fastmcp_guard.audit.http import verify_signature

Plan = Callable[[int], "tuple[int, dict[str, str]] | None"]


@dataclass
class Request:
    at: float
    headers: dict[str, str]
    body: bytes
    events: list[dict[str, Any]]
    signed_ok: bool | None
    status: int


@dataclass
class Receiver:
    secret: bytes | None = None
    plan: Plan | None = None
    delay: float = 0.0
    requests: list[Request] = field(default_factory=list)
    ids: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None
    tls: ssl.SSLContext | None = None
    tls_failures: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.server is not None
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://127.0.0.1:{self.server.server_address[1]}/ingest"

    def start(self, port: int = 0) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are two writes

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                if isinstance(self.request, ssl.SSLSocket):
                    self.request.do_handshake()  # in this thread, not the accept loop
                super().setup()

            def do_GET(self) -> None:
                with receiver.lock:
                    body = json.dumps(sorted(receiver.ids)).encode()
                self._answer(200, {}, body)

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    n = len(receiver.requests)
                answer = receiver.plan(n) if receiver.plan else None
                status, extra = answer if answer else (200, {})
                if receiver.delay:
                    time.sleep(receiver.delay)
                body = (
                    gzip.decompress(raw) if self.headers.get("Content-Encoding") == "gzip" else raw
                )
                events = json.loads(body)
                signed = (
                    None if receiver.secret is None
                    else verify_signature(receiver.secret, self.headers, raw)
                )  # fmt: skip
                key = self.headers.get("Idempotency-Key", "")
                assert key == f"{events[0]['id']}..{events[-1]['id']}", key
                with receiver.lock:
                    receiver.requests.append(Request(time.monotonic(), dict(self.headers),
                                                     raw, events, signed, status))  # fmt: skip
                    if 200 <= status < 300:
                        for e in events:
                            receiver.ids[e["id"]] = receiver.ids.get(e["id"], 0) + 1
                self._answer(status, extra, b"{}")

            def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            def get_request(self) -> tuple[socket.socket, Any]:
                sock, addr = super().get_request()
                if receiver.tls is None:
                    return sock, addr
                sock.settimeout(10)
                return receiver.tls.wrap_socket(sock, server_side=True,
                                                do_handshake_on_connect=False), addr  # fmt: skip

            def handle_error(self, request: Any, client_address: Any) -> None:
                exc = sys.exc_info()[1]
                if not isinstance(exc, ssl.SSLError):
                    super().handle_error(request, client_address)
                    return
                with receiver.lock:
                    receiver.tls_failures.append(str(exc))

        self.server = Server(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def accepted(self) -> list[dict[str, Any]]:
        """Every event of every 2xx request, duplicates included."""
        with self.lock:
            return [e for r in self.requests if 200 <= r.status < 300 for e in r.events]

    def wait_for(self, n: int, timeout: float = 20.0) -> None:
        """Until ``n`` distinct ids arrived (``AssertionError`` after ``timeout``)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if len(self.ids) >= n:
                    return
            time.sleep(0.02)
        raise AssertionError(f"receiver has {len(self.ids)} of {n} events after {timeout} s")


if __name__ == "__main__":
    r = Receiver().start(int(sys.argv[1]))
    print("ready", flush=True)
    threading.Event().wait()
