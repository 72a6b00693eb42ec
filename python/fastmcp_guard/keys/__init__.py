"""API keys: the :class:`KeyStore` facade and the :class:`ApiKey` record.

Tokens look like ``fmg_sk_<public id>_<secret><checksum>``. They are shown once (on
``create`` and ``rotate``), stored only as argon2id hashes, and never logged. The
public id part names the key (``fmg_key_<public id>``) in logs and the CLI.

The work happens in the Rust core (:class:`fastmcp_guard._core.KeyManager`): the
store (memory or SQLite), argon2id, and the verified-token cache that makes a
repeated verification cost about a microsecond.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal

import anyio.to_thread

from fastmcp_guard._core import CreditLease, KeyInfo, KeyManager, VerifyLimits
from fastmcp_guard._util import mask_url, os_user
from fastmcp_guard.errors import ConfigError

if TYPE_CHECKING:
    from fastmcp_guard.audit import AuditLog

__all__ = ["APIKey", "ApiKey", "CreditLease", "KeyStatus", "KeyStore", "VerifyLimits"]

BackendName = Literal["memory", "sqlite", "postgres", "redis"]
_FLEET_BACKENDS = {"postgres": "postgres", "postgresql": "postgres", "redis": "redis"}


class KeyStatus(str, Enum):
    """Lifecycle of a key: ``active`` -> ``rotating`` (grace period) -> ``revoked``."""

    ACTIVE = "active"
    ROTATING = "rotating"
    REVOKED = "revoked"


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


@dataclass(frozen=True)
class ApiKey:
    """One API key as the store reports it.

    Credits: ``credits`` is the store balance now (a top-up due now counted; units that
    server processes hold in leases are not in it), ``None`` for a key without credits
    (unlimited); ``refill`` is ``"5000/month"`` / ``"100/day"`` or ``None``;
    ``refill_at`` the next top-up; ``credits_shadow``: running out is audited as
    ``would_refuse`` instead of refusing; ``credits_base``: what "below 10 %" is measured
    against (the refill amount; without a refill, the balance right after the last
    create / ``set_credits`` / ``add_credits``).

    ``token`` is set only on the object returned by :meth:`KeyStore.create` and
    :meth:`KeyStore.rotate`; it cannot be recovered afterwards. ``revoked_predecessors``
    is set only on the object returned by :meth:`KeyStore.revoke`: the ids of the keys this
    one replaced that were still in their grace period and were revoked with it.
    """

    id: str
    name: str
    scopes: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    status: str = KeyStatus.ACTIVE.value
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    last_used_ip: str | None = None
    grace_until: datetime | None = None
    rotated_from: str | None = None
    rotated_to: str | None = None
    revoked_at: datetime | None = None
    credits: int | None = None
    refill: str | None = None
    credits_shadow: bool = False
    refill_at: datetime | None = None
    credits_base: int | None = None
    token: str | None = field(default=None, repr=False, compare=False)
    revoked_predecessors: list[str] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def _from_info(cls, info: KeyInfo, token: str | None = None) -> ApiKey:
        return cls(
            id=info.id,
            name=info.name,
            scopes=info.scopes,
            metadata=info.metadata,
            status=info.status,
            created_at=_dt(info.created_at) or datetime.now(timezone.utc),
            expires_at=_dt(info.expires_at),
            last_used_at=_dt(info.last_used_at),
            last_used_ip=info.last_used_ip,
            grace_until=_dt(info.grace_until),
            rotated_from=info.rotated_from,
            rotated_to=info.rotated_to,
            revoked_at=_dt(info.revoked_at),
            credits=info.credits,
            refill=info.refill,
            credits_shadow=info.credits_shadow,
            refill_at=_dt(info.refill_at),
            credits_base=info.credits_base,
            token=token,
        )

    @property
    def is_expired(self) -> bool:
        """True once ``expires_at`` has passed."""
        return self.expires_at is not None and datetime.now(timezone.utc) >= self.expires_at

    @property
    def is_valid(self) -> bool:
        """True if the key would be accepted now (status and expiry; not the grace end)."""
        usable = self.status in (KeyStatus.ACTIVE.value, KeyStatus.ROTATING.value)
        if self.status == KeyStatus.ROTATING.value and self.grace_until is not None:
            usable = datetime.now(timezone.utc) < self.grace_until
        return usable and not self.is_expired


#: The name fastmcp-guard 0.2 used.
APIKey = ApiKey


class KeyStore:
    """Issue, rotate, revoke, expire and inspect API keys.

    Args:
        backend: ``"memory"`` (dev/tests; lost on restart), ``"sqlite"`` (one
            server, persistent), ``"postgres"`` or ``"redis"`` (a fleet, extras
            ``[postgres]`` / ``[redis]``, with ``dsn=``; revocations reach every node
            through ``NOTIFY`` / pub/sub).
        path: SQLite file (default ``fastmcp-guard-keys.db``). Its directory must exist.
        dsn: connection string of a fleet backend.
        cache_ttl_seconds: how long a verified token is trusted without looking at
            the store again. Revocations made in this process apply at once; a
            revocation made by another process sharing the SQLite file is seen
            within ``watch_interval_seconds``. After the TTL the record is read again,
            but a token already verified on this node is not hashed again (nor stopped
            by the failure budgets) while its stored hash is unchanged.
        limits: the failure budgets for tokens not yet verified on this node and the
            negative cache of unknown key ids (:class:`VerifyLimits`; default: 10
            failures per minute per address and key id, 100 per key id, 600 in all,
            each then followed by as many first tries from networks not failing).

    Example:
        ```python
        store = KeyStore(backend="sqlite", path="keys.db")
        key = store.create(name="alice", scopes=["read:data"])
        print(key.token)  # shown once
        ```
    """

    def __init__(
        self,
        backend: BackendName | str = "memory",
        path: str | os.PathLike[str] | None = None,
        dsn: str | None = None,
        *,
        cache_ttl_seconds: float = 60.0,
        watch_interval_seconds: float = 0.25,
        touch_interval_seconds: float = 5.0,
        limits: VerifyLimits | None = None,
    ) -> None:
        self.backend = backend
        self._dsn = dsn
        #: The failure budgets in force (the HTTP layer names the one that refused in
        #: its 429's ``RateLimit-Policy``).
        self.limits = limits if limits is not None else VerifyLimits()
        #: Where lifecycle events (created / rotated / revoked) go; set by ``Guard``.
        self.audit: AuditLog | None = None
        opts: dict[str, Any] = {
            "cache_ttl_seconds": cache_ttl_seconds,
            "watch_interval_seconds": watch_interval_seconds,
            "touch_interval_seconds": touch_interval_seconds,
            "limits": limits,
        }
        if backend == "memory":
            self.path: str | None = None
            self._core = KeyManager.memory(**opts)
        elif backend == "sqlite":
            self.path = os.fspath(path or "fastmcp-guard-keys.db")
            self._core = KeyManager.sqlite(self.path, **opts)
        elif backend in _FLEET_BACKENDS:
            kind = _FLEET_BACKENDS[backend]
            if not dsn:
                example = ("postgresql://user:password@host/db" if kind == "postgres"
                           else "redis://host:6379/0")  # fmt: skip
                raise ConfigError(f"KeyStore(backend={backend!r}) needs dsn='{example}'")
            self.path = None
            self._core, self._listener = _open_fleet(kind, dsn, opts)
            self._fleet_backend = self._listener.backend
            self._housekeeper = _housekeeper(self._core, self._fleet_backend.name, opts)
        else:
            raise ConfigError(
                f"unknown key store backend {backend!r}; expected one of "
                "'memory', 'sqlite', 'postgres', 'redis'"
            )

    _listener: Any = None
    _housekeeper: Any = None

    @property
    def core(self) -> KeyManager:
        """The Rust key manager (used by the verifier and middleware)."""
        return self._core

    def create(
        self,
        name: str,
        scopes: Sequence[str] | None = None,
        expires_in_days: float | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        expires_at: datetime | None = None,
        actor: str | None = None,
        credits: int | None = None,
        refill: str | None = None,
        credits_shadow: bool = False,
    ) -> ApiKey:
        """Create a key. The returned object's ``token`` is the only copy of the secret.

        Args:
            name: a label such as ``"alice"`` or ``"ci-bot"``.
            scopes: scopes granted (they become ``AccessToken.scopes``).
            expires_in_days: expire this many days from now; 0 or less makes a key that
                is already expired (its token is refused), as a negative value did in
                fastmcp-guard 0.2 (0.2 read 0 as "no expiry"; here it fails closed).
            metadata: JSON-serialisable key/value pairs, shown in audit records.
            expires_at: an absolute expiry (timezone-aware); exclusive with ``expires_in_days``.
            actor: who did it, for the lifecycle audit event (default: the OS user).
            credits: a balance calls spend (a whole number from 0 to 2**53); ``None``:
                unlimited (or, with ``refill``, start full).
            refill: ``"N/day"`` (the balance becomes N at 00:00 UTC every day) or
                ``"N/month"`` (on the 1st at 00:00 UTC); what is left is not carried over.
            credits_shadow: running out is audited as ``would_refuse``, not refused.

        Bad credits raise :class:`~fastmcp_guard.errors.InvalidKeyInputError` (a
        ``ValueError``) saying what is accepted; nothing is created then.
        """
        _check_credits(credits, "credits", allow_none=True)
        if refill is not None and not isinstance(refill, str):
            raise _bad_input(f"invalid refill: expected a str such as '5000/month', got {refill!r}")
        if not isinstance(credits_shadow, bool):
            raise _bad_input(f"invalid credits_shadow: expected True or False, got {credits_shadow!r}")
        if expires_in_days is not None and expires_at is not None:
            raise ConfigError("give expires_in_days or expires_at, not both")
        exp: float | None = None
        already_expired = False
        if expires_in_days is not None:
            exp = (datetime.now(timezone.utc) + timedelta(days=expires_in_days)).timestamp()
            already_expired = expires_in_days <= 0
        elif expires_at is not None:
            if expires_at.tzinfo is None:
                raise ConfigError("expires_at must be timezone-aware (e.g. tzinfo=timezone.utc)")
            exp = expires_at.timestamp()
        info, token = self._core.create(
            name, scopes=list(scopes or []), expires_at=exp, metadata=metadata,
            allow_past_expiry=already_expired, credits=credits, refill=refill,
            credits_shadow=credits_shadow,
        )  # fmt: skip
        self._lifecycle("created", info, actor)
        return ApiKey._from_info(info, token)

    @property
    def dsn(self) -> str | None:
        """The connection string of a fleet backend (may hold a password), else ``None``."""
        return self._dsn

    def get(self, key_id: str) -> ApiKey | None:
        """The key with this id (or token public id), without its token; ``None`` if unknown."""
        info = self._core.get(key_id)
        return None if info is None else ApiKey._from_info(info)

    def inspect(self, key_id: str) -> ApiKey:
        """Like :meth:`get` but raises :class:`~fastmcp_guard.errors.KeyNotFoundError`."""
        from fastmcp_guard.errors import KeyNotFoundError

        key = self.get(key_id)
        if key is None:
            raise KeyNotFoundError(f"no key with id {key_id!r}")
        return key

    def list(self, include_revoked: bool = False) -> list[ApiKey]:
        """All keys, oldest first; revoked ones only with ``include_revoked=True``."""
        return [ApiKey._from_info(i) for i in self._core.list(include_revoked=include_revoked)]

    def rotate(
        self, key_id: str, grace_period_hours: float = 24, *, actor: str | None = None
    ) -> ApiKey:
        """Issue a replacement key; the old token keeps working for the grace period.

        ``grace_period_hours=0`` revokes the old token at once. Raises ``KeyError``
        (:class:`KeyNotFoundError`) for an unknown id and ``ValueError``
        (:class:`KeyRevokedError`) for a revoked key.
        """
        if grace_period_hours < 0:
            raise ConfigError(f"grace_period_hours must be >= 0, got {grace_period_hours!r}")
        info, token = self._core.rotate(key_id, grace_seconds=float(grace_period_hours) * 3600.0)
        self._lifecycle("rotated", info, actor, {"grace_period_hours": grace_period_hours})
        return ApiKey._from_info(info, token)

    def revoke(self, key_id: str, *, actor: str | None = None) -> ApiKey:
        """Revoke now: the token is refused from the next request on, in every process.

        The keys this one replaced by rotation that are still in their grace period are
        revoked with it (their ids are in the result's ``revoked_predecessors`` and in
        the lifecycle event; each also gets its own ``revoked`` event).
        """
        info, predecessors = self._core.revoke_lineage(key_id)
        revoked_with = [p.id for p in predecessors]
        self._lifecycle("revoked", info, actor,
                        {"revoked_predecessors": revoked_with} if revoked_with else None)  # fmt: skip
        for p in predecessors:
            self._lifecycle("revoked", p, actor, {"revoked_with": info.id})
        return dataclasses.replace(ApiKey._from_info(info), revoked_predecessors=revoked_with)

    # -- credits -------------------------------------------------------------------------

    def set_credits(self, key_id: str, credits: int | None) -> ApiKey:
        """Set the balance of a key's credits (a key without credits gets them, without
        refill); ``None`` removes them (the key is unlimited). A top-up due now is applied
        first. Units that server processes hold in leases are not recalled (each may still
        spend its lease, at most ``CreditBook.lease_max`` per key) and are not given back
        afterwards. Returns the key as stored now."""
        _check_credits(credits, "credits", allow_none=True)
        return ApiKey._from_info(self._core.set_credits(key_id, credits))

    def add_credits(self, key_id: str, credits: int) -> ApiKey:
        """Add ``credits`` (negative: take away; the balance stops at 0, never below) to a
        key's balance. A key without credits gets ``max(credits, 0)``. Returns the key as
        stored now."""
        _check_credits(credits, "credits", allow_negative=True)
        return ApiKey._from_info(self._core.add_credits(key_id, credits))

    async def set_credits_async(self, key_id: str, credits: int | None) -> ApiKey:
        """:meth:`set_credits`, run in a worker thread."""
        return await anyio.to_thread.run_sync(self.set_credits, key_id, credits)

    async def add_credits_async(self, key_id: str, credits: int) -> ApiKey:
        """:meth:`add_credits`, run in a worker thread."""
        return await anyio.to_thread.run_sync(self.add_credits, key_id, credits)

    def lease_credits(self, key_id: str, want: int, now: datetime) -> CreditLease | None:
        """Take ``min(want, balance)`` credits from the store in one atomic step, after
        applying a top-up due at ``now`` (aware UTC). ``None``: the key has no credits.
        Blocking (a store write): :class:`~fastmcp_guard.keys.credits.CreditBook` calls it
        in a worker thread."""
        return self._core.lease_credits(key_id, want, _ts(now))

    def return_credits(self, key_id: str, n: int, epoch: int) -> bool:
        """Give back ``n`` unspent credits of a lease of ``epoch``; ignored (False) if a
        top-up or ``set_credits`` started a new epoch since. Blocking."""
        return self._core.return_credits(key_id, n, epoch)

    def _lifecycle(
        self, status: str, info: KeyInfo, actor: str | None, extra: dict[str, Any] | None = None
    ) -> None:
        if self.audit is None:
            return
        fields: dict[str, Any] = {"actor": actor or os_user()}
        if info.rotated_from:
            fields["rotated_from"] = info.rotated_from
        fields.update(extra or {})
        self.audit.log(status, key_id=info.id, key_name=info.name, scopes=info.scopes,
                       metadata=info.metadata, extra=fields)  # fmt: skip

    def verify(self, token: str, client_ip: str | None = None) -> ApiKey | None:
        """Check a token; the key (without token) or ``None``. Blocking: may run argon2id.

        Records the use: the returned key's ``last_used_at`` is now (and its
        ``last_used_ip`` ``client_ip``, if given), as in fastmcp-guard 0.2, although the
        store is written in batches (within ``touch_interval_seconds``).
        """
        from fastmcp_guard.errors import VerifyError

        try:
            ident = self._core.verify(token, client_ip)
        except VerifyError:
            return None
        key = self.get(ident.key_id)
        if key is None:
            return None
        now = datetime.now(timezone.utc)
        used = now.replace(microsecond=now.microsecond // 1000 * 1000)  # the store's precision
        return dataclasses.replace(key, last_used_at=used,
                                   last_used_ip=client_ip or key.last_used_ip)  # fmt: skip

    # -- async twins: the same operations from async code, off the event loop -----------
    # (create / rotate hash with argon2id, tens of milliseconds; all touch the store)

    async def create_async(self, name: str, scopes: Sequence[str] | None = None,
                           expires_in_days: float | None = None,
                           metadata: dict[str, Any] | None = None, *,
                           expires_at: datetime | None = None,
                           actor: str | None = None, credits: int | None = None,
                           refill: str | None = None,
                           credits_shadow: bool = False) -> ApiKey:  # fmt: skip
        """:meth:`create`, run in a worker thread."""
        call = functools.partial(self.create, name, scopes, expires_in_days, metadata,
                                 expires_at=expires_at, actor=actor, credits=credits,
                                 refill=refill, credits_shadow=credits_shadow)  # fmt: skip
        return await anyio.to_thread.run_sync(call)

    async def rotate_async(
        self, key_id: str, grace_period_hours: float = 24, *, actor: str | None = None
    ) -> ApiKey:
        """:meth:`rotate`, run in a worker thread."""
        call = functools.partial(self.rotate, key_id, grace_period_hours, actor=actor)
        return await anyio.to_thread.run_sync(call)

    async def revoke_async(self, key_id: str, *, actor: str | None = None) -> ApiKey:
        """:meth:`revoke`, run in a worker thread."""
        return await anyio.to_thread.run_sync(functools.partial(self.revoke, key_id, actor=actor))

    async def verify_async(self, token: str, client_ip: str | None = None) -> ApiKey | None:
        """:meth:`verify`, run in a worker thread."""
        return await anyio.to_thread.run_sync(self.verify, token, client_ip)

    def flush(self) -> None:
        """Write pending ``last_used_at`` updates now."""
        self._core.flush()

    def close(self) -> None:
        """Flush and stop the background threads (and a fleet store's listener). Idempotent."""
        if self._listener is not None:
            self._listener.close()
        if self._housekeeper is not None:
            self._housekeeper.close()
        self._core.close()
        backend = getattr(self, "_fleet_backend", None)
        if backend is not None:
            backend.close()

    def __repr__(self) -> str:
        where = f", path={self.path!r}" if self.path else ""
        if self._dsn:
            where = f", dsn={mask_url(self._dsn)!r}"
        return f"KeyStore(backend={self.backend!r}{where})"


def _bad_input(message: str) -> Exception:
    from fastmcp_guard.errors import InvalidKeyInputError

    return InvalidKeyInputError(message)


def _check_credits(value: object, what: str, *, allow_none: bool = False,
                   allow_negative: bool = False) -> None:  # fmt: skip
    """Type and range of a credit amount given by a caller (the core checks the range
    too: this gives the message before anything reaches it)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad_input(f"invalid {what}: expected a whole number from 0 to 2**53, got {value!r}")
    if value < 0 and not allow_negative:
        raise _bad_input(f"invalid {what}: {value} is negative; give a whole number from 0 to 2**53")
    if abs(value) > 2**53:
        raise _bad_input(f"invalid {what}: {value} is above the largest balance, 2**53")


def _ts(now: datetime) -> float:
    if now.tzinfo is None:
        raise _bad_input("now must be timezone-aware (e.g. datetime.now(timezone.utc))")
    return now.timestamp()


def _open_fleet(kind: str, dsn: str, opts: dict[str, Any]) -> tuple[KeyManager, Any]:
    """The core manager over PostgreSQL or Redis, and the listener feeding its cache
    with the store's change notifications (NOTIFY, pub/sub)."""
    from fastmcp_guard._core import StoreError

    backend: Any
    listener: Any
    try:
        if kind == "postgres":
            from fastmcp_guard.keys.postgres import PostgresKeyBackend, PostgresListener

            backend, listener = PostgresKeyBackend(dsn), PostgresListener
        else:
            from fastmcp_guard.keys.redis_store import RedisKeyBackend, RedisListener

            backend, listener = RedisKeyBackend(dsn), RedisListener
    except (ConnectionError, RuntimeError) as exc:
        raise StoreError(str(exc)) from None
    except Exception as exc:
        if type(exc).__module__.split(".")[0] in ("psycopg", "redis"):
            raise StoreError(f"key store {mask_url(dsn)}: {str(exc).strip()}") from None
        raise
    manager = KeyManager.external(backend, **opts)
    return manager, listener(backend, manager)


def _housekeeper(manager: KeyManager, name: str, opts: dict[str, Any]) -> Any:
    from fastmcp_guard.keys.backends import Housekeeper

    return Housekeeper(manager, name, opts["touch_interval_seconds"],
                       opts["watch_interval_seconds"])  # fmt: skip
