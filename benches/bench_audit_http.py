"""HTTP audit backend: sustained events/s to a local receiver, beside its baseline.

    .venv/bin/python benches/bench_audit_http.py            # N = 200,000 (about 2 minutes)
    .venv/bin/python benches/bench_audit_http.py -n 50000  # smaller

Issue 4's figure: HTTP to a local receiver >= 50,000 events/s sustained.

The receiver is a separate process (stdlib ``ThreadingHTTPServer`` on 127.0.0.1) that
gunzips each body, parses the JSON and records every event id; ``GET /count`` answers
the number of distinct ids. Each row logs N events and stops the clock when the
receiver holds all N (so the receiver's work is inside the figure):

- ``HttpBackend``: ``AuditLog(backend=HttpBackend(url))`` with the defaults (spool in a
  temporary directory, batches of 1,000, gzip level 1; ``on_failure="block"`` so a full
  queue waits instead of dropping), gzip on and off;
- baseline, one POST per event: what fastmcp-guard 0.2's ``HttpBackend`` did (one JSON
  object per request), here over a kept-alive ``http.client`` connection, which is
  *faster* than 0.2 (it opened a new ``httpx.AsyncClient`` per event). All N events are
  sent and measured; nothing is extrapolated.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_guard import TYPICAL, cpu_model, so_build, table, verdict

TARGET_EPS = 50_000

RECEIVER = textwrap.dedent(
    """
    import gzip, json, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    ids = set()
    lock = threading.Lock()

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes

        def log_message(self, *a):
            pass

        def _answer(self, body):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            with lock:
                n = len(ids)
            if self.path == "/reset":
                with lock:
                    ids.clear()
            self._answer(str(n).encode())

        def do_POST(self):
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                raw = gzip.decompress(raw)
            data = json.loads(raw)
            got = [e["id"] for e in data] if isinstance(data, list) else [data["id"]]
            with lock:
                ids.update(got)
            self._answer(b"{}")

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()
    """
)


class Receiver:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE,
                                     text=True)  # fmt: skip
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.url = f"http://127.0.0.1:{self.port}/ingest"
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def get(self, path: str) -> int:
        self.conn.request("GET", path)
        return int(self.conn.getresponse().read())

    def wait_for(self, n: int, timeout: float = 600.0) -> None:
        end = time.monotonic() + timeout
        while self.get("/count") < n:
            if time.monotonic() > end:
                raise SystemExit(f"receiver has {self.get('/count')} of {n} events")
            time.sleep(0.005)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def run_guard(receiver: Receiver, n: int, *, gzip_on: bool) -> tuple[float, float]:
    """Seconds to log ``n`` events and until the receiver has them; and to enqueue them."""
    from fastmcp_guard.audit import AuditLog, HttpBackend

    receiver.get("/reset")
    with tempfile.TemporaryDirectory() as tmp:
        audit = AuditLog(backend=HttpBackend(receiver.url, spool_dir=os.path.join(tmp, "spool"),
                                             gzip=gzip_on), on_failure="block")  # fmt: skip
        t = TYPICAL
        log = audit.log
        t0 = time.perf_counter()
        for i in range(n):
            log("ok", key_id=t["key_id"], key_name=t["key_name"], tool=t["tool"],
                scopes=t["scopes"], duration_ms=t["duration_ms"], input_args={"i": i},
                output_preview=t["output_preview"], client_ip=t["client_ip"],
                metadata=t["metadata"])  # fmt: skip
        enqueued = time.perf_counter() - t0
        receiver.wait_for(n)
        total = time.perf_counter() - t0
        stats = audit.stats()
        audit.close()
    assert stats["dropped"] == 0, stats
    return total, enqueued


def run_per_event(receiver: Receiver, n: int) -> float:
    """0.2's shape: one JSON object per POST, sent before the next event (keep-alive)."""
    receiver.get("/reset")
    conn = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=30)
    headers = {"Content-Type": "application/json"}
    t = TYPICAL
    t0 = time.perf_counter()
    for i in range(n):
        record = {"ts": time.time(), "key_id": t["key_id"], "key_name": t["key_name"],
                  "tool": t["tool"], "scopes": t["scopes"], "duration_ms": t["duration_ms"],
                  "status": "ok", "error": None, "input_args": {"i": i},
                  "output_preview": t["output_preview"], "client_ip": t["client_ip"],
                  "metadata": t["metadata"], "id": f"ev{i}"}  # fmt: skip
        conn.request("POST", "/ingest", body=json.dumps(record).encode(), headers=headers)
        conn.getresponse().read()
    receiver.wait_for(n)
    total = time.perf_counter() - t0
    conn.close()
    return total


def _core_path() -> str:
    import fastmcp_guard._core as core

    return str(core.__file__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200_000, help="events per row (200,000)")
    args = parser.parse_args(argv)
    n = args.n
    print(f"HTTP audit to a local receiver: {n:,} events per row; {cpu_model()}, "
          f"{os.cpu_count()} CPUs; {so_build(_core_path())}")  # fmt: skip
    receiver = Receiver()
    try:
        g_total, g_enq = run_guard(receiver, n, gzip_on=True)
        p_total, p_enq = run_guard(receiver, n, gzip_on=False)
        b_total = run_per_event(receiver, n)
    finally:
        receiver.close()
    eps = n / g_total
    rows = [
        ["HttpBackend, gzip (defaults)", f"{g_total:.2f}", f"{eps:,.0f}",
         f"{n / g_enq:,.0f}", f"{eps / (n / b_total):.1f}x"],
        ["HttpBackend, gzip off", f"{p_total:.2f}", f"{n / p_total:,.0f}",
         f"{n / p_enq:,.0f}", f"{(n / p_total) / (n / b_total):.1f}x"],
        ["baseline: one POST per event (0.2 shape)", f"{b_total:.2f}", f"{n / b_total:,.0f}",
         "-", "1.0x"],
    ]  # fmt: skip
    print()
    table(["sender", "s until all received", "events/s", "enqueue events/s", "vs baseline"],
          rows, "lrrrr")  # fmt: skip
    print()
    print(f"figure: HTTP to a local receiver >= {TARGET_EPS:,} events/s sustained: "
          f"{eps:,.0f} events/s, {verdict(eps >= TARGET_EPS)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
