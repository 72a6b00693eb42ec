"""The HTTP audit backend: batched POSTs of JSON arrays, through a durable on-disk spool.

Events never go straight to the network. The core's JSONL writer appends them to files
in ``spool_dir`` (hash chain on, so every line carries a unique ``"id"``; rotated by
size), and a daemon *shipper* thread reads complete lines from those files in order and
POSTs them as a JSON array: the lines' bytes joined with ``,`` between ``[`` and ``]``
(no re-encoding). After a 2xx it advances a persisted cursor (``cursor.json``: file,
inode and byte offset, written to a temporary file, fsynced and renamed) and deletes
the rotated files it has fully shipped. So:

- an endpoint that is down only makes the spool grow (up to ``spool_max_bytes``); every
  event is sent once it is back;
- a new process with the same ``spool_dir`` resumes from the cursor: nothing is sent
  twice after a clean shutdown, nothing is lost after a crash (at most the batch in
  flight is sent again; receivers deduplicate by event id or by ``Idempotency-Key``).

Request headers:

- ``Content-Type: application/json``; ``Content-Encoding: gzip`` when ``gzip=True``;
- ``Idempotency-Key: <first id>..<last id>`` of the batch (ids are time-ordered);
- with ``secret``: ``X-Fastmcp-Guard-Timestamp: <unix seconds>`` and
  ``X-Fastmcp-Guard-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>``
  where ``body`` is the bytes as sent (gzipped when gzip is on). Receivers recompute the
  MAC over the raw request body, compare in constant time, and refuse timestamps older
  than a few minutes (replay). :func:`verify_signature` does exactly that.

Failures: a connection error, a timeout, 408, 429 or a 5xx is retried with exponential
backoff and full jitter (``backoff_base`` doubling up to ``backoff_cap``); a
``Retry-After`` header (seconds or an HTTP date) is honoured instead. Any other 4xx
means the endpoint refuses the batch (bad URL, credentials, payload): the response is
logged once on the ``fastmcp_guard.audit`` logger and the batch is retried every
``backoff_cap`` seconds, never dropped silently: fix the endpoint and it flows again.
"""

from __future__ import annotations

import atexit
import contextlib
import email.utils
import gzip as gzip_module
import hashlib
import hmac
import http.client
import json
import logging
import os
import random
import ssl
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from fastmcp_guard._core import AuditSink, AuditWriter, audit_log_files, audit_spool_read
from fastmcp_guard._util import ca_file_problem, mask_url
from fastmcp_guard.errors import ArgumentTypeError, ConfigError

__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "HttpBackend",
    "HttpShipper",
    "sign",
    "verify_signature",
]

SIGNATURE_HEADER = "X-Fastmcp-Guard-Signature"
TIMESTAMP_HEADER = "X-Fastmcp-Guard-Timestamp"
DEFAULT_SPOOL_DIR = "fastmcp-guard-audit-spool"
_SPOOL_FILE = "audit-spool.jsonl"
_CURSOR_FILE = "cursor.json"
_LOCK_FILE = ".lock"

log = logging.getLogger("fastmcp_guard.audit")


@dataclass(frozen=True)
class HttpBackend:
    """POST audit events in batches to ``url`` (a webhook or SIEM), through a spool.

    Args:
        url: ``http://`` or ``https://`` endpoint receiving JSON arrays of events.
        headers: extra request headers (e.g. ``{"Authorization": "Bearer ..."}``); never
            logged nor written to the spool.
        secret: HMAC-SHA256 key: adds ``X-Fastmcp-Guard-Timestamp`` and
            ``X-Fastmcp-Guard-Signature`` (see the module docs for the scheme).
        gzip: compress request bodies (``Content-Encoding: gzip``).
        gzip_level: zlib level 1 (fast, default) to 9 (small).
        spool_dir: directory of the spool (created, mode 0700). One process at a time.
        spool_max_bytes: when the unsent spool exceeds this, the log's ``on_failure``
            policy applies: ``"drop"`` (and ``"block"``) stop spooling new events and
            count them as ``dropped``; ``"fail_closed"`` makes ``healthy()`` false.
        spool_file_bytes: size at which spool files rotate (shipped ones are deleted).
        batch_max: most events per POST.
        batch_max_bytes: most body bytes (before gzip) per POST (one event always goes).
        timeout: seconds for connecting and for the response.
        backoff_base, backoff_cap: retry delays in seconds (exponential, full jitter).
        drain_timeout: seconds ``close()`` keeps shipping what is pending; the rest stays
            on disk for the next start.
        poll_interval: seconds the shipper sleeps when the spool has nothing new.
        flush_interval_ms, queue_capacity: of the spool writer (as for a file log).
        chain_key: key of the spool's hash chain (see ``FileBackend``).
        ca_file: PEM file of the CA certificates that verify an ``https://`` endpoint
            (a private CA, a self-signed certificate); default: the system trust store.
            Certificates and host names are always verified: an endpoint whose
            certificate is not trusted gets nothing (the events wait in the spool, and a
            warning naming the endpoint is logged once).
    """

    url: str
    headers: Mapping[str, str] | None = field(default=None, repr=False)
    secret: bytes | str | None = field(default=None, repr=False)
    gzip: bool = True
    gzip_level: int = 1
    spool_dir: str | os.PathLike[str] = DEFAULT_SPOOL_DIR
    spool_max_bytes: int = 1 << 30
    spool_file_bytes: int = 1 << 20
    batch_max: int = 1000
    batch_max_bytes: int = 4 << 20
    timeout: float = 5.0
    backoff_base: float = 0.1
    backoff_cap: float = 30.0
    drain_timeout: float = 5.0
    poll_interval: float = 0.05
    flush_interval_ms: int = 100
    queue_capacity: int = 65536
    chain_key: bytes | str | None = field(default=None, repr=False)
    ca_file: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"HttpBackend url must be http://host[:port]/path or https://..., "
                f"got {mask_url(self.url)!r}"
            )
        for name in ("spool_max_bytes", "spool_file_bytes", "batch_max", "batch_max_bytes"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"HttpBackend {name} must be >= 1, got {getattr(self, name)}")
        # Durations: finite and bounded (NaN fails every comparison, so it is refused too).
        for name, low, high in (("timeout", 0.0, 600.0), ("backoff_base", 0.0, 3600.0),
                                ("backoff_cap", 0.0, 3600.0), ("poll_interval", 0.0, 60.0),
                                ("drain_timeout", -1.0, 3600.0)):  # fmt: skip
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (ok and low < value <= high) or (name == "drain_timeout" and value < 0):
                least = ">= 0" if name == "drain_timeout" else "> 0"
                raise ConfigError(
                    f"HttpBackend {name} must be a number of seconds {least} and at most "
                    f"{high:g}, got {value!r}"
                )
        if not 0 <= self.gzip_level <= 9:
            raise ConfigError(f"HttpBackend gzip_level must be 0..9, got {self.gzip_level}")
        if self.ca_file is not None:
            ca_file = os.path.abspath(os.fspath(self.ca_file))
            problem = ca_file_problem(ca_file)
            if problem is not None:
                raise ConfigError(f"HttpBackend ca_file: {problem}")
            object.__setattr__(self, "ca_file", ca_file)  # frozen; read when connecting

    def __repr__(self) -> str:  # the URL may hold a password
        return (f"HttpBackend({mask_url(self.url)!r}, spool_dir={os.fspath(self.spool_dir)!r}, "
                f"ca_file={self.ca_file!r})")  # fmt: skip


def sign(secret: bytes | str, timestamp: str, body: bytes) -> str:
    """The signature header value: ``sha256=`` + hex HMAC-SHA256 over
    ``timestamp + "." + body`` (body as sent, i.e. after gzip)."""
    key = secret.encode() if isinstance(secret, str) else secret
    mac = hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secret: bytes | str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    max_age: float = 300.0,
    now: float | None = None,
) -> bool:
    """For receivers: whether ``body`` (the raw request body) carries a valid signature
    from ``secret`` made at most ``max_age`` seconds ago. ``headers`` is any mapping
    with case-insensitive lookup (``http.server`` and most frameworks give one)."""
    ts = headers.get(TIMESTAMP_HEADER)
    given = headers.get(SIGNATURE_HEADER)
    if not ts or not given:
        return False
    try:
        age = (time.time() if now is None else now) - float(ts)
    except ValueError:
        return False
    if abs(age) > max_age:
        return False
    return hmac.compare_digest(sign(secret, ts, body), given)


class _Refused(Exception):
    """A non-2xx answer (or no answer): whether and when to try again."""

    def __init__(self, message: str, *, retry_after: float | None, permanent: bool) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.permanent = permanent


@dataclass
class _Batch:
    #: The JSON array as sent before gzip.
    body: bytes
    count: int
    first_id: str
    last_id: str
    #: Where the cursor goes after this batch: file path, inode, offset.
    end: tuple[str, int, int]
    malformed: int


class HttpShipper:
    """The audit target of an :class:`HttpBackend`: spool writer plus shipper thread
    (``log`` / ``flush`` / ``close`` / ``stats`` / ``healthy``, as ``AuditWriter``).

    With ``shared=True`` the spool is an :class:`AuditSink` for the audit log's one
    :class:`AuditWriter` (one queue for every backend of the log): give :attr:`writer` to
    ``AuditWriter.of_sinks``, then call :meth:`start`. Otherwise the spool has its own :class:`AuditWriter` (built with
    ``writer_options``: ``redact``, ``log_inputs``...) and shipping starts at once."""

    def __init__(
        self,
        backend: HttpBackend,
        *,
        redact: Sequence[str] | None = (),
        on_failure: str = "drop",
        shared: bool = False,
        **writer_options: Any,
    ) -> None:
        self.backend = backend
        self._fail_closed = on_failure == "fail_closed"
        self._url = urlsplit(backend.url)
        self._shown_url = mask_url(backend.url)
        self._secret = (
            backend.secret.encode() if isinstance(backend.secret, str) else backend.secret
        )
        self._headers = dict(backend.headers or {})
        if self._url.username is not None and not any(
            k.lower() == "authorization" for k in self._headers
        ):  # https://user:password@host/...: HTTP basic authentication
            import base64
            from urllib.parse import unquote

            pair = f"{unquote(self._url.username)}:{unquote(self._url.password or '')}"
            self._headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        spool = os.path.abspath(os.fspath(backend.spool_dir))
        try:
            os.makedirs(spool, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the HTTP audit spool directory {spool!r}: {exc.strerror}; "
                "give HttpBackend(spool_dir=...) a writable directory"
            ) from None
        self.spool_dir = spool
        self._lock_fd = self._take_lock()
        self._live = os.path.join(spool, _SPOOL_FILE)
        self._cursor_path = os.path.join(spool, _CURSOR_FILE)
        self._shared = shared
        try:
            if shared:
                self._writer: AuditWriter | AuditSink = AuditSink.jsonl(
                    self._live, rotate_bytes=backend.spool_file_bytes, chain=True,
                    chain_key=backend.chain_key,
                )  # fmt: skip
            else:
                writer_options.setdefault("on_full", "block" if on_failure == "block" else "drop")
                self._writer = AuditWriter(
                    self._live,
                    queue_capacity=backend.queue_capacity,
                    flush_interval_ms=backend.flush_interval_ms,
                    rotate_bytes=backend.spool_file_bytes,
                    chain=True,
                    chain_key=backend.chain_key,
                    redact=list(redact or ()) or None,
                    **writer_options,
                )
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._cursor = self._load_cursor()
        self._conn: http.client.HTTPConnection | None = None
        self._tls: ssl.SSLContext | None = None
        self._over_limit = False
        self._spooled_bytes = 0
        self._counts = {"shipped": 0, "batches": 0, "retries": 0, "http_errors": 0,
                        "malformed": 0}  # fmt: skip
        #: What was last logged about refusals (an HTTP status, or "certificate"); reset
        #: by a delivered batch, so each new refusal is logged once.
        self._refusal_logged: int | str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._deadline: float | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name="fastmcp-guard-audit-http", daemon=True
        )
        if not shared:
            self.start()

    def start(self) -> None:
        """Start shipping (once the spool's writer runs: a shared sink belongs to the
        log's writer by now)."""
        self._refresh_size()
        self._thread.start()
        atexit.register(_close_at_exit, weakref.ref(self))

    # -- the audit target interface ------------------------------------------------------

    @property
    def path(self) -> str:
        """The live spool file."""
        return self._live

    @property
    def writer(self) -> AuditWriter | AuditSink:
        """The spool's writer, or its sink in the log's writer. It is paused while the spool is
        over ``spool_max_bytes``: events are then dropped and counted (``spool_dropped``),
        with a warning at most every 10 s."""
        return self._writer

    def log(self, *fields: Any) -> bool:
        """Spool one event (``AuditWriter.log``'s positional order); ``False`` if dropped.
        Standalone only: a shared spool is fed by the log's writer."""
        if isinstance(self._writer, AuditSink):
            raise ArgumentTypeError(
                "this spool is fed by its audit log's writer: log through the AuditLog"
            )
        return self._writer.log(*fields)

    def flush(self) -> None:
        """Block until every event logged so far is in the spool (not yet shipped)."""
        self._writer.flush()

    def close(self) -> None:
        """Flush the spool, ship what is pending for up to ``drain_timeout`` seconds, and
        stop; whatever is left stays in the spool for the next start. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        started = self._thread.ident is not None
        try:
            if started or not self._shared:  # an unstarted shared sink has no writer yet
                self._writer.close()
        finally:
            self._deadline = time.monotonic() + self.backend.drain_timeout
            self._stop.set()
            self._wake.set()
            if started:
                self._thread.join(self.backend.drain_timeout + self.backend.timeout + 1.0)
            if self._conn is not None and not self._thread.is_alive():
                self._conn.close()
            os.close(self._lock_fd)

    def stats(self) -> dict[str, int]:
        """The spool writer's counters plus ``spooled_bytes`` (unsent), ``shipped``
        (events acknowledged), ``batches``, ``retries``, ``http_errors``, ``malformed``
        (unparsable spool lines skipped) and ``dropped`` (including spool-limit drops)."""
        # Shared, the writer's counters are the log's: only the spool's own here.
        spool = dict(self._writer.stats())
        out = {} if self._shared else spool
        out["spool_dropped"] = spool.pop("paused_dropped", 0)
        out["spooled_bytes"] = self._spooled_bytes
        out.update(self._counts)
        return out

    def healthy(self) -> bool:
        """The spool writer is healthy and the spool is under ``spool_max_bytes``."""
        return self._writer.healthy()

    # -- spool and cursor ------------------------------------------------------------

    def _take_lock(self) -> int:
        path = os.path.join(self.spool_dir, _LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX: no lock
            pass
        except OSError:
            os.close(fd)
            raise ConfigError(
                f"the HTTP audit spool {self.spool_dir!r} is in use by another process or "
                "audit log; give each one its own HttpBackend(spool_dir=...)"
            ) from None
        return fd

    def _load_cursor(self) -> tuple[str, int, int]:
        try:
            with open(self._cursor_path, "rb") as f:
                data = json.loads(f.read())
            return (os.path.join(self.spool_dir, str(data["file"])), int(data["ino"]),
                    int(data["offset"]))  # fmt: skip
        except FileNotFoundError:
            return ("", 0, 0)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.warning("audit spool cursor %s unreadable (%s): shipping from the oldest "
                        "spool file", self._cursor_path, exc)  # fmt: skip
            return ("", 0, 0)

    def _save_cursor(self, cursor: tuple[str, int, int]) -> None:
        name, ino, offset = cursor
        tmp = self._cursor_path + ".tmp"
        data = json.dumps({"file": os.path.basename(name), "ino": ino, "offset": offset})
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._cursor_path)
        self._cursor = cursor

    def _files(self) -> list[tuple[str, int, int]]:
        """Spool files, oldest first, as ``(path, inode, size)`` (vanished ones left out)."""
        out = []
        for path in audit_log_files(self._live):
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(path)
                out.append((path, st.st_ino, st.st_size))
        return out

    def _position(self, files: list[tuple[str, int, int]]) -> tuple[int, int]:
        """Index into ``files`` and offset where unsent data starts."""
        name, ino, offset = self._cursor
        if name:
            for i, (path, f_ino, _) in enumerate(files):
                if f_ino == ino and (path == name or name == self._live):
                    # Same file, or the live file the cursor named was rotated since.
                    return i, offset
        return 0, 0

    def _refresh_size(self) -> None:
        files = self._files()
        i, offset = self._position(files)
        pending = sum(size for _, _, size in files[i:]) - offset
        self._spooled_bytes = max(pending, 0)
        over = self._spooled_bytes > self.backend.spool_max_bytes
        if over and not self._over_limit:
            log.warning(
                "audit spool %s holds %d unsent bytes, over spool_max_bytes=%d: %s until "
                "endpoint %s takes events again",
                self.spool_dir, self._spooled_bytes, self.backend.spool_max_bytes,
                "calls are refused (fail_closed)" if self._fail_closed
                else "new events are dropped", self._shown_url,
            )  # fmt: skip
        if over != self._over_limit:
            self._writer.pause(
                f"the spool {self.spool_dir} is over spool_max_bytes="
                f"{self.backend.spool_max_bytes} (endpoint {self._shown_url} unreachable?)"
                if over
                else None
            )
        self._over_limit = over

    def _delete_shipped(self, files: list[tuple[str, int, int]]) -> None:
        """Remove rotated files before the cursor (fully shipped)."""
        i, _ = self._position(files)
        for path, _, _ in files[:i]:
            if path != self._live:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def _next_batch(self) -> _Batch | None:
        """The next batch from the cursor on: complete chained lines, in order, across
        spool files (the reading and scanning run in the core, without the GIL)."""
        files = self._files()
        self._delete_shipped(files)
        i, offset = self._position(files)
        parts: list[bytes] = []
        count, size, malformed = 0, 2, 0
        first_id = last_id = ""
        end = self._cursor
        b = self.backend
        while i < len(files) and count < b.batch_max and size < b.batch_max_bytes:
            path, ino, _ = files[i]
            read = audit_spool_read(path, ino, offset, count, b.batch_max, size,
                                    b.batch_max_bytes)  # fmt: skip
            if read is None:
                break  # gone, or rotated between listing and opening: list again
            body, n, first, last, consumed, bad, file_size, size = read
            if n:
                parts.append(body)
                first_id = first_id or first
                last_id = last
                count += n
            malformed += bad
            offset += consumed
            end = (path, ino, offset)
            if path == self._live or offset < file_size:
                break  # the live file may grow; or the batch is full
            i += 1
            offset = 0
            if i < len(files):
                end = (files[i][0], files[i][1], 0)
        if not count:
            if end != self._cursor:  # past torn lines, or into the next file
                self._counts["malformed"] += malformed
                self._save_cursor(end)
            return None
        return _Batch(b"[" + b",".join(parts) + b"]", count, first_id, last_id, end, malformed)

    # -- shipping ------------------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        while True:
            if self._stop.is_set() and (
                self._deadline is None or time.monotonic() >= self._deadline
            ):
                return
            stopping = self._stop.is_set()  # before reading: close flushed the spool
            try:
                batch = self._next_batch()
            except OSError as exc:
                log.warning("audit spool %s unreadable: %s", self.spool_dir, exc)
                batch = None
            if batch is None:
                self._refresh_size()
                if stopping:
                    return  # drained
                self._wake.wait(self.backend.poll_interval)
                self._wake.clear()
                continue
            try:
                self._post(batch)
            except _Refused as exc:
                self._counts["retries"] += 1
                self._counts["http_errors"] += 1
                delay = self._delay(exc, attempt)
                attempt += 1
                self._sleep(delay)
                continue
            attempt = 0
            self._refusal_logged = None
            self._counts["shipped"] += batch.count
            self._counts["batches"] += 1
            self._counts["malformed"] += batch.malformed
            self._save_cursor(batch.end)
            self._refresh_size()

    def _delay(self, exc: _Refused, attempt: int) -> float:
        b = self.backend
        if exc.retry_after is not None:
            return min(max(exc.retry_after, 0.0), max(b.backoff_cap, 300.0))
        if exc.permanent:
            return b.backoff_cap
        return random.uniform(0, min(b.backoff_cap, b.backoff_base * 2.0 ** min(attempt, 30)))

    def _sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (cut short by close's deadline), refreshing the spool size."""
        until = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            if self._deadline is not None:
                until = min(until, self._deadline)
            if now >= until:
                return
            self._stop.wait(min(until - now, 0.2))
            self._refresh_size()

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            host = self._url.hostname or ""
            port = self._url.port
            if self._url.scheme == "https":
                if self._tls is None:
                    # Verifies the chain and the host name (never turned off); a ca_file
                    # replaces the system trust store.
                    ca_file = self.backend.ca_file
                    self._tls = ssl.create_default_context(
                        cafile=None if ca_file is None else os.fspath(ca_file)
                    )
                self._conn = http.client.HTTPSConnection(
                    host, port, timeout=self.backend.timeout, context=self._tls
                )
            else:
                self._conn = http.client.HTTPConnection(host, port, timeout=self.backend.timeout)
        return self._conn

    def _post(self, batch: _Batch) -> None:
        body = batch.body
        headers = {"Content-Type": "application/json", "User-Agent": "fastmcp-guard-audit"}
        headers.update(self._headers)
        if self.backend.gzip:
            body = gzip_module.compress(body, compresslevel=self.backend.gzip_level, mtime=0)
            headers["Content-Encoding"] = "gzip"
        headers["Idempotency-Key"] = f"{batch.first_id}..{batch.last_id}"
        if self._secret is not None:
            ts = str(int(time.time()))
            headers[TIMESTAMP_HEADER] = ts
            headers[SIGNATURE_HEADER] = sign(self._secret, ts, body)
        path = self._url.path or "/"
        if self._url.query:
            path += "?" + self._url.query
        try:
            conn = self._connection()
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            text = resp.read(2048)
            if resp.will_close:
                self._drop_connection()
        except ssl.SSLCertVerificationError as exc:
            self._drop_connection()
            if self._refusal_logged != "certificate":
                self._refusal_logged = "certificate"
                fix = (  # OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
                    "use a URL naming a host the certificate covers, or fix the certificate"
                    if exc.verify_code in (62, 64)
                    else "give HttpBackend(ca_file=...) / audit_http_ca_file the CA that "
                    "signed it, or fix the endpoint's certificate"
                )
                log.warning(
                    "audit endpoint %s presented a certificate that is not trusted (%s): "
                    "nothing is sent to it, the events wait in the spool %s and are retried "
                    "every %g s (%s)",
                    self._shown_url, exc.verify_message or exc.reason, self.spool_dir,
                    self.backend.backoff_cap, fix,
                )  # fmt: skip
            raise _Refused(f"certificate not trusted: {exc.verify_message}", retry_after=None,
                           permanent=True) from None  # fmt: skip
        except (OSError, http.client.HTTPException) as exc:
            self._drop_connection()
            raise _Refused(f"{type(exc).__name__}: {exc}", retry_after=None,
                           permanent=False) from None  # fmt: skip
        status = resp.status
        if 200 <= status < 300:
            return
        retry_after = _retry_after(resp.getheader("Retry-After"))
        permanent = 400 <= status < 500 and status not in (408, 429)
        if permanent and self._refusal_logged != status:
            self._refusal_logged = status
            log.error(
                "audit endpoint %s refused a batch of %d event(s) with HTTP %d %s: %r; the "
                "batch stays in the spool %s and is retried every %.0f s (fix the URL, "
                "headers or receiver)",
                self._shown_url, batch.count, status, resp.reason,
                text[:300], self.spool_dir, self.backend.backoff_cap,
            )  # fmt: skip
        raise _Refused(f"HTTP {status}", retry_after=retry_after, permanent=permanent)

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __repr__(self) -> str:
        return f"HttpShipper(url={self._shown_url!r}, spool_dir={self.spool_dir!r})"


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _close_at_exit(ref: weakref.ReferenceType[HttpShipper]) -> None:
    shipper = ref()
    if shipper is not None:
        try:
            shipper.close()
        except Exception as exc:  # noqa: BLE001 - at exit, say it: nobody can catch it
            import sys

            sys.stderr.write(f"fastmcp-guard: audit spool {shipper.spool_dir} not closed "
                             f"cleanly: {exc}\n")  # fmt: skip
