"""The PostgreSQL key store (extra ``[postgres]``, psycopg 3).

``KeyStore(backend="postgres", dsn="postgresql://user:pw@host/db")``. The table lives in
PostgreSQL; everything else stays in the Rust core, exactly as for SQLite: argon2id,
the verified-token cache (so a cached verification never touches the database), the
failure throttle, lifecycle rules, batched ``last_used_at``.

Fleet-wide revocation: every change to a key (revoke, rotate, update) sends
``NOTIFY fmg_keys, '<key id>'`` in its transaction; each node keeps one extra connection that ``LISTEN``s and drops that key
from its cache the moment the notification arrives. If the listening connection is
lost, the node reconnects with backoff and then clears its whole cache (what it missed
while deaf cannot have been cached since); the core's watcher also polls the store's
revision every ``watch_interval_seconds`` (catches everything but a commit that lands
out of revision order while the listener is down), and the cache TTL
(``cache_ttl_seconds``) bounds the staleness in every case.

If PostgreSQL restarts, the next call reconnects (the listener too): no node restart.
Errors reach callers as :class:`~fastmcp_guard.errors.StoreError` with the DSN's
password masked; a request whose token is not cached gets a 503 (see the README).
"""

from __future__ import annotations

import builtins
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from fastmcp_guard._util import mask_url
from fastmcp_guard.errors import MissingExtraError

if TYPE_CHECKING:
    import psycopg

    from fastmcp_guard._core import KeyManager

__all__ = ["CHANNEL", "SCHEMA_VERSION", "PostgresKeyBackend", "PostgresListener"]

log = logging.getLogger("fastmcp_guard.keys")

#: The NOTIFY channel every write announces its key id on.
CHANNEL = "fmg_keys"
#: Version of the tables below; newer versions migrate forward, never back.
SCHEMA_VERSION = 2

_MIGRATIONS = {
    1: """
    CREATE SEQUENCE IF NOT EXISTS fmg_key_revision;
    CREATE TABLE IF NOT EXISTS fmg_api_keys (
        id              TEXT PRIMARY KEY,
        name            TEXT NOT NULL,
        phc_hash        TEXT NOT NULL,
        scopes          JSONB NOT NULL,
        metadata        JSONB NOT NULL,
        status          TEXT NOT NULL,
        created_at      TIMESTAMPTZ NOT NULL,
        expires_at      TIMESTAMPTZ,
        last_used_at    TIMESTAMPTZ,
        last_used_ip    TEXT,
        grace_until     TIMESTAMPTZ,
        rotated_from    TEXT,
        rotated_to      TEXT,
        revoked_at      TIMESTAMPTZ,
        revision        BIGINT NOT NULL,
        legacy_selector TEXT
    );
    CREATE INDEX IF NOT EXISTS fmg_api_keys_revision ON fmg_api_keys (revision);
    """,
    # Credits (NULL: none, as every key had before).
    2: """
    ALTER TABLE fmg_api_keys ADD COLUMN IF NOT EXISTS credits BIGINT;
    ALTER TABLE fmg_api_keys ADD COLUMN IF NOT EXISTS refill TEXT;
    ALTER TABLE fmg_api_keys ADD COLUMN IF NOT EXISTS credits_shadow BOOLEAN NOT NULL DEFAULT false;
    ALTER TABLE fmg_api_keys ADD COLUMN IF NOT EXISTS credits_base BIGINT;
    ALTER TABLE fmg_api_keys ADD COLUMN IF NOT EXISTS refilled_at TIMESTAMPTZ;
    ALTER TABLE fmg_api_keys ADD COLUMN IF NOT EXISTS refill_at TIMESTAMPTZ;
    ALTER TABLE fmg_api_keys ADD COLUMN IF NOT EXISTS credits_epoch BIGINT NOT NULL DEFAULT 0;
    """,
}

_TIMES = ("created_at", "expires_at", "last_used_at", "grace_until", "revoked_at")
_COLUMNS = ("id", "name", "phc_hash", "scopes", "metadata", "status", *_TIMES[:2],
            "last_used_at", "last_used_ip", "grace_until", "rotated_from", "rotated_to",
            "revoked_at", "revision", "legacy_selector")  # fmt: skip
_MANAGED = ("name", "scopes", "metadata", "status", "expires_at", "grace_until",
            "rotated_from", "rotated_to", "revoked_at")  # fmt: skip
#: The credit columns, after _COLUMNS in every read (a record's "credits" dict).
_CREDIT_COLUMNS = ("credits", "refill", "credits_shadow", "credits_base", "refilled_at",
                   "refill_at", "credits_epoch")  # fmt: skip
_CREDIT_SETS = ", ".join(f"{c} = %s" for c in _CREDIT_COLUMNS)
_SELECT = "SELECT " + ", ".join(_COLUMNS + _CREDIT_COLUMNS) + " FROM fmg_api_keys"


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise MissingExtraError(
            "the postgres key store needs psycopg: pip install 'fastmcp-guard[postgres]'"
        ) from None
    return psycopg


def _to_dt(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def _to_ms(dt: datetime | None) -> int | None:
    # Whole milliseconds, as the core stores them (exact: timestamptz keeps microseconds).
    return None if dt is None else round(dt.timestamp() * 1000)


class PostgresKeyBackend:
    """The key table in PostgreSQL, as the core's ``KeyManager.external`` calls it.

    One connection, used under a lock (the core calls on a cache miss, on management
    actions, from the batched ``last_used_at`` writer and from the watcher: low volume);
    re-opened on the next call after it breaks.
    """

    def __init__(self, dsn: str, *, connect_timeout: float = 5.0) -> None:
        self._pg = _psycopg()
        self.dsn = dsn
        #: The DSN with its password masked (used in every message).
        self.name = mask_url(dsn)
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        with self._cursor() as cur:
            self._migrate(cur)

    # -- connection ------------------------------------------------------------------

    def connect(self, *, autocommit: bool = False) -> psycopg.Connection[Any]:
        """A new connection (``StoreError``-style message on failure, password masked)."""
        try:
            conn: psycopg.Connection[Any] = self._pg.connect(
                self.dsn, connect_timeout=max(1, int(self.connect_timeout)), autocommit=autocommit
            )
        except self._pg.Error as exc:
            raise ConnectionError(
                f"cannot connect to {self.name}: {str(exc).strip()}; check that PostgreSQL "
                "is running and the DSN is right"
            ) from None
        return conn

    @contextmanager
    def _cursor(self) -> Iterator[psycopg.Cursor[Any]]:
        """A cursor in one transaction (committed on success, rolled back on error)."""
        with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = self.connect()
            conn = self._conn
            try:
                with conn.transaction(), conn.cursor() as cur:
                    yield cur
            except self._pg.OperationalError:
                # The server went away (restart, network): reconnect on the next call.
                conn.close()
                self._conn = None
                raise

    def _migrate(self, cur: psycopg.Cursor[Any]) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('fmg_keys_schema'))")
        cur.execute("CREATE TABLE IF NOT EXISTS fmg_schema_version (version INTEGER NOT NULL)")
        cur.execute("SELECT max(version) FROM fmg_schema_version")
        row = cur.fetchone()
        current = (row[0] if row else None) or 0
        if current > SCHEMA_VERSION:
            raise RuntimeError(
                f"key store {self.name} has schema version {current}, newer than this "
                f"fastmcp-guard supports ({SCHEMA_VERSION}); upgrade fastmcp-guard"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            cur.execute(_MIGRATIONS[version])
            cur.execute("INSERT INTO fmg_schema_version (version) VALUES (%s)", (version,))

    def own_pid(self) -> int | None:
        """Server process id of this backend's connection: the listener skips the
        notifications of our own writes (the core already updated its cache for them)."""
        conn = self._conn
        if conn is None or conn.closed:
            return None
        return int(conn.info.backend_pid)

    def close(self) -> None:
        """Close the connection (the next call would reopen it)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- the protocol (see src/pystore.rs) --------------------------------------------

    def _row(self, row: tuple[Any, ...] | None) -> dict[str, Any] | None:
        if row is None:
            return None
        n = len(_COLUMNS)
        rec = dict(zip(_COLUMNS, row[:n], strict=True))
        for t in _TIMES:
            rec[t] = _to_ms(rec[t])
        rec["metadata"] = json.dumps(rec["metadata"])
        rec["credits"] = _credits_from_row(row[n:])
        return rec

    def _values(self, rec: dict[str, Any], columns: tuple[str, ...]) -> list[Any]:
        from psycopg.types.json import Jsonb

        out: list[Any] = []
        for c in columns:
            v = rec[c]
            if c in _TIMES:
                v = _to_dt(v)
            elif c == "scopes":
                v = Jsonb(v)
            elif c == "metadata":
                v = Jsonb(json.loads(v))
            out.append(v)
        return out

    def _insert(self, cur: psycopg.Cursor[Any], rec: dict[str, Any]) -> int:
        cols = [c for c in _COLUMNS if c != "revision"]
        names = cols + list(_CREDIT_COLUMNS)
        cur.execute(
            f"INSERT INTO fmg_api_keys ({', '.join(names)}, revision) VALUES "
            f"({', '.join(['%s'] * len(names))}, nextval('fmg_key_revision')) RETURNING revision",
            self._values(rec, tuple(cols)) + _credit_values(rec.get("credits")),
        )
        row = cur.fetchone()
        # No NOTIFY: a new key is in no node's cache (only changes need announcing).
        return int(row[0]) if row else 0

    def _update(self, cur: psycopg.Cursor[Any], rec: dict[str, Any]) -> int | None:
        sets = ", ".join(f"{c} = %s" for c in _MANAGED)
        cur.execute(
            f"UPDATE fmg_api_keys SET {sets}, revision = nextval('fmg_key_revision') "
            "WHERE id = %s AND revision = %s RETURNING revision",
            [*self._values(rec, _MANAGED), rec["id"], rec["revision"]],
        )
        row = cur.fetchone()
        if row is None:
            return None
        cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, rec["id"]))
        return int(row[0])

    def insert(self, record: dict[str, Any]) -> int:
        with self._cursor() as cur:
            return self._insert(cur, record)

    def get(self, key_id: str) -> dict[str, Any] | None:
        with self._cursor() as cur:
            cur.execute(_SELECT + " WHERE id = %s", (key_id,))
            return self._row(cur.fetchone())

    def list(self, include_revoked: bool) -> builtins.list[dict[str, Any]]:
        where = "" if include_revoked else " WHERE status <> 'revoked'"
        with self._cursor() as cur:
            cur.execute(_SELECT + where + " ORDER BY created_at, id")
            return [r for r in map(self._row, cur.fetchall()) if r is not None]

    def update(self, record: dict[str, Any]) -> int | None:
        with self._cursor() as cur:
            return self._update(cur, record)

    def rotate(self, old: dict[str, Any], new: dict[str, Any]) -> tuple[int, int] | None:
        with self._cursor() as cur:
            old_rev = self._update(cur, old)
            if old_rev is None:
                return None  # the transaction ends without writing anything
            return old_rev, self._insert(cur, new)

    def touch_many(self, touches: builtins.list[tuple[str, int, str | None]]) -> None:
        if not touches:
            return
        with self._cursor() as cur:
            cur.executemany(
                "UPDATE fmg_api_keys SET last_used_at = GREATEST(last_used_at, %s), "
                "last_used_ip = COALESCE(%s, last_used_ip) WHERE id = %s",
                [(_to_dt(at), ip, key_id) for key_id, at, ip in touches],
            )

    # -- credits (see src/pystore.rs) ----------------------------------------------------

    def lease_credits(self, key_id: str, want: int, bounds: dict[str, int]) -> dict[str, Any] | None:
        """Take ``min(want, balance)`` after a due top-up: one transaction holding the
        row lock (``SELECT ... FOR UPDATE``, then ``UPDATE``)."""
        from fastmcp_guard.keys.backends import apply_lease

        with self._cursor() as cur:
            cur.execute(
                "SELECT credits, refill, credits_shadow, credits_base, refilled_at, refill_at, "
                "credits_epoch FROM fmg_api_keys WHERE id = %s FOR UPDATE",
                (key_id,),
            )
            state = _credits_from_row(cur.fetchone())
            if state is None:
                return None
            lease, changed = apply_lease(state, want, bounds)
            if changed:
                cur.execute(
                    "UPDATE fmg_api_keys SET credits = %s, credits_base = %s, refilled_at = %s, "
                    "refill_at = %s, credits_epoch = %s WHERE id = %s",
                    (state["balance"], state["base"], _to_dt(state["refilled_at"]),
                     _to_dt(state["refill_at"]), state["epoch"], key_id),
                )  # fmt: skip
            return lease

    def return_credits(self, key_id: str, n: int, epoch: int) -> bool:
        with self._cursor() as cur:
            cur.execute(
                "UPDATE fmg_api_keys SET credits = LEAST(credits + %s, %s) "
                "WHERE id = %s AND credits IS NOT NULL AND credits_epoch = %s AND %s > 0 "
                "RETURNING 1",
                (n, 2**53, key_id, epoch, n),
            )
            return cur.fetchone() is not None

    def write_credits(
        self, key_id: str, expected: dict[str, Any] | None, new: dict[str, Any] | None
    ) -> int | None:
        with self._cursor() as cur:
            cur.execute(
                "SELECT credits, credits_epoch FROM fmg_api_keys WHERE id = %s FOR UPDATE",
                (key_id,),
            )
            row = cur.fetchone()
            if row is None:
                return None
            current = None if row[0] is None else (int(row[0]), int(row[1]))
            wanted = None if expected is None else (expected["balance"], expected["epoch"])
            if current != wanted:
                return None
            cur.execute(
                f"UPDATE fmg_api_keys SET {_CREDIT_SETS}, revision = nextval('fmg_key_revision') "
                "WHERE id = %s RETURNING revision",
                [*_credit_values(new), key_id],
            )
            out = cur.fetchone()
            cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, key_id))
            return int(out[0]) if out else None

    def current_revision(self) -> int:
        with self._cursor() as cur:
            cur.execute("SELECT coalesce(max(revision), 0) FROM fmg_api_keys")
            row = cur.fetchone()
            return int(row[0]) if row else 0

    def changed_since(self, revision: int) -> tuple[int, builtins.list[tuple[str, int]]]:
        with self._cursor() as cur:
            cur.execute(
                "SELECT id, revision FROM fmg_api_keys WHERE revision > %s ORDER BY revision",
                (revision,),
            )
            rows = [(str(i), int(r)) for i, r in cur.fetchall()]
        return (rows[-1][1] if rows else revision), rows


def _credits_from_row(row: tuple[Any, ...] | None) -> dict[str, Any] | None:
    """The credit columns (in ``_CREDIT_COLUMNS`` order) as the core's credits dict."""
    if row is None or row[0] is None:
        return None
    balance, refill, shadow, base, refilled_at, refill_at, epoch = row
    return {
        "balance": int(balance),
        "refill": refill,
        "shadow": bool(shadow),
        "base": int(balance if base is None else base),
        "refilled_at": _to_ms(refilled_at) or 0,
        "refill_at": _to_ms(refill_at),
        "epoch": int(epoch),
    }


def _credit_values(c: dict[str, Any] | None) -> list[Any]:
    """The credit columns' values (in ``_CREDIT_COLUMNS`` order) for a credits dict."""
    if c is None:
        return [None, None, False, None, None, None, 0]
    return [c["balance"], c["refill"], c["shadow"], c["base"], _to_dt(c["refilled_at"]),
            _to_dt(c["refill_at"]), c["epoch"]]  # fmt: skip


class PostgresListener:
    """``LISTEN fmg_keys`` on a dedicated connection; each notification drops that key
    from ``manager``'s cache. Reconnects with backoff; after a reconnect it clears the
    whole cache (notifications sent while it was deaf are lost)."""

    def __init__(self, backend: PostgresKeyBackend, manager: KeyManager) -> None:
        self.backend = backend
        self.manager = manager
        self._stop = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._conn_lock = threading.Lock()
        #: Set each time the listener is (re)connected and listening (for tests and health).
        self.listening = threading.Event()
        self.reconnects = 0
        self._thread = threading.Thread(target=self._run, name="fmg-pg-listen", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        delay = 0.1
        first = True
        while not self._stop.is_set():
            try:
                conn = self.backend.connect(autocommit=True)
                with self._conn_lock:
                    self._conn = conn
                conn.execute(f"LISTEN {CHANNEL}")
                if not first:
                    self.reconnects += 1
                    self.manager.clear_cache()
                    log.warning("key store %s: change listener reconnected; cache cleared",
                                self.backend.name)  # fmt: skip
                first = False
                delay = 0.1
                self.listening.set()
                while not self._stop.is_set():
                    for note in conn.notifies(timeout=0.5):
                        if note.pid != self.backend.own_pid():
                            self.manager.invalidate(note.payload)
            except Exception as exc:  # noqa: BLE001 - any failure: a dropped connection, a restart
                self.listening.clear()
                if self._stop.is_set():
                    break
                log.warning("key store %s: change listener lost (%s); reconnecting in %.1fs",
                            self.backend.name, str(exc).strip(), delay)  # fmt: skip
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
            finally:
                with self._conn_lock:
                    if self._conn is not None:
                        self._conn.close()
                        self._conn = None

    def backend_pid(self) -> int | None:
        """The listening connection's server process id (tests terminate it)."""
        with self._conn_lock:
            return None if self._conn is None else int(self._conn.info.backend_pid)

    def close(self) -> None:
        """Stop listening (joins the thread)."""
        self._stop.set()
        self._thread.join(timeout=5)
