"""The Redis key store (extra ``[redis]``, redis-py).

``KeyStore(backend="redis", dsn="redis://host:6379/0")``. The records live in Redis;
argon2id, the verified-token cache, lifecycle rules and batched ``last_used_at`` stay
in the Rust core, exactly as for SQLite and PostgreSQL (see ``keys/backends.py``).

Layout (prefix ``fmg:{keys}:``; the hash tag puts every key in one Redis Cluster slot,
so each write is one atomic script):

- ``rec:<id>``: the record as JSON (without revision and last use);
- ``revs``: hash id -> revision; ``rev``: the store-wide revision counter;
- ``used``: hash id -> ``"<ms>|<ip>"`` (last use, written in batches, never a revision);
- ``created``: sorted set of ids by creation time (``list`` order);
- ``changes``: sorted set of ids by revision (``changed_since``);
- ``cred:<id>``: a key's credits, a hash (balance, refill, shadow, base, refilled_at,
  refill_at, epoch; absent: no credits). Leases are one Lua script each
  (``_LEASE``); they change no revision. ``write_credits`` does.

Fleet-wide revocation: every change publishes ``"<node id> <key id>"`` on the channel
``<prefix>events``; each node subscribes on its own connection and drops that key from
its cache (skipping its own writes). A lost subscription reconnects with backoff and
clears the cache; the core polls ``changed_since`` every ``watch_interval_seconds``; the
cache TTL bounds the rest. Redis restarting needs no node restart.
"""

from __future__ import annotations

import builtins
import json
import logging
import threading
import uuid
from typing import TYPE_CHECKING, Any

from fastmcp_guard._util import mask_url
from fastmcp_guard.errors import MissingExtraError

if TYPE_CHECKING:
    from fastmcp_guard._core import KeyManager

__all__ = ["DEFAULT_PREFIX", "RedisKeyBackend", "RedisListener"]

log = logging.getLogger("fastmcp_guard.keys")

DEFAULT_PREFIX = "fmg:{keys}:"
_USED = ("last_used_at", "last_used_ip")

# KEYS: rev, revs, rec, created, changes, cred; ARGV: id, record json, created_ms,
# then the credit hash's (field, value) pairs if the key has credits
_INSERT = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  return redis.error_reply('duplicate key id ' .. ARGV[1])
end
local rev = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[3], ARGV[2])
redis.call('DEL', KEYS[6])
if #ARGV > 3 then redis.call('HSET', KEYS[6], unpack(ARGV, 4)) end
redis.call('HSET', KEYS[2], ARGV[1], rev)
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[5], rev, ARGV[1])
return rev
"""

# KEYS: rev, revs, rec, changes; ARGV: id, expected revision, record json, channel, message
_UPDATE = """
local cur = redis.call('HGET', KEYS[2], ARGV[1])
if not cur or tonumber(cur) ~= tonumber(ARGV[2]) then return false end
local rev = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[3], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], rev)
redis.call('ZADD', KEYS[4], rev, ARGV[1])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return rev
"""

# KEYS: rev, revs, old rec, changes, new rec, created
# ARGV: old id, old expected rev, old json, channel, message, new id, new json, new created_ms
_ROTATE = """
local cur = redis.call('HGET', KEYS[2], ARGV[1])
if not cur or tonumber(cur) ~= tonumber(ARGV[2]) then return false end
if redis.call('HEXISTS', KEYS[2], ARGV[6]) == 1 then
  return redis.error_reply('duplicate key id ' .. ARGV[6])
end
local old_rev = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[3], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], old_rev)
redis.call('ZADD', KEYS[4], old_rev, ARGV[1])
local new_rev = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[5], ARGV[7])
redis.call('HSET', KEYS[2], ARGV[6], new_rev)
redis.call('ZADD', KEYS[6], ARGV[8], ARGV[6])
redis.call('ZADD', KEYS[4], new_rev, ARGV[6])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return {old_rev, new_rev}
"""

# KEYS: revs, used; ARGV: (id, at_ms, ip or '') repeated. Never moves last use backwards.
_TOUCH = """
for i = 1, #ARGV, 3 do
  local id, at, ip = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  if redis.call('HEXISTS', KEYS[1], id) == 1 then
    local cur = redis.call('HGET', KEYS[2], id)
    local cur_at, cur_ip = 0, ''
    if cur then
      local bar = string.find(cur, '|', 1, true)
      cur_at, cur_ip = tonumber(string.sub(cur, 1, bar - 1)), string.sub(cur, bar + 1)
    end
    if ip == '' then ip = cur_ip end
    if at >= cur_at then redis.call('HSET', KEYS[2], id, at .. '|' .. ip) end
  end
end
return 0
"""


# Numbers are written as the strings Python made, or with HINCRBY: never through Lua's
# number formatting (which prints large values in exponent form).
# KEYS: cred; ARGV: want, now_ms, day_start, day_next, month_start, month_next
_LEASE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local c = redis.call('HMGET', KEYS[1], 'refill', 'refill_at')
local refill, refill_at = c[1], c[2]
if refill and refill ~= '' and refill_at and refill_at ~= ''
   and tonumber(ARGV[2]) >= tonumber(refill_at) then
  local slash = string.find(refill, '/', 1, true)
  local amount = string.sub(refill, 1, slash - 1)
  local start, nxt = ARGV[3], ARGV[4]
  if string.sub(refill, slash + 1) ~= 'day' then start, nxt = ARGV[5], ARGV[6] end
  redis.call('HSET', KEYS[1], 'balance', amount, 'base', amount, 'refilled_at', start,
             'refill_at', nxt)
  redis.call('HINCRBY', KEYS[1], 'epoch', 1)
end
local balance = tonumber(redis.call('HGET', KEYS[1], 'balance'))
local granted = math.min(tonumber(ARGV[1]), balance)
if granted > 0 then
  redis.call('HINCRBY', KEYS[1], 'balance', -granted)
end
local s = redis.call('HMGET', KEYS[1], 'balance', 'refill_at', 'epoch', 'base', 'shadow')
return {granted, s[1], s[2] or '', s[3], s[4], s[5]}
"""

# KEYS: cred; ARGV: n, epoch, max. Adds n back if the epoch is still the lease's.
_RETURN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[2] then return 0 end
local b = redis.call('HINCRBY', KEYS[1], 'balance', ARGV[1])
if b > tonumber(ARGV[3]) then redis.call('HSET', KEYS[1], 'balance', ARGV[3]) end
return 1
"""

# KEYS: rev, revs, cred, changes
# ARGV: id, expected present ('0'/'1'), expected balance, expected epoch, channel, message,
# then the new credit hash's (field, value) pairs (none: remove the credits)
_WRITE_CREDITS = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return false end
local present = redis.call('EXISTS', KEYS[3])
if present ~= tonumber(ARGV[2]) then return false end
if present == 1 then
  local c = redis.call('HMGET', KEYS[3], 'balance', 'epoch')
  if c[1] ~= ARGV[3] or c[2] ~= ARGV[4] then return false end
end
redis.call('DEL', KEYS[3])
if #ARGV > 6 then redis.call('HSET', KEYS[3], unpack(ARGV, 7)) end
local rev = redis.call('INCR', KEYS[1])
redis.call('HSET', KEYS[2], ARGV[1], rev)
redis.call('ZADD', KEYS[4], rev, ARGV[1])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return rev
"""


def _credit_fields(c: dict[str, Any] | None) -> list[str]:
    """A credits dict as the hash's (field, value) pairs, every value a decimal string."""
    if c is None:
        return []
    out: list[str] = []
    for name, value in (("balance", c["balance"]), ("refill", c["refill"] or ""),
                        ("shadow", "1" if c["shadow"] else "0"), ("base", c["base"]),
                        ("refilled_at", c["refilled_at"]),
                        ("refill_at", "" if c["refill_at"] is None else c["refill_at"]),
                        ("epoch", c["epoch"])):  # fmt: skip
        out += [name, str(value)]
    return out


def _credits_from_hash(h: dict[str, str] | None) -> dict[str, Any] | None:
    if not h:
        return None
    return {
        "balance": int(h["balance"]),
        "refill": h.get("refill") or None,
        "shadow": h.get("shadow") == "1",
        "base": int(h.get("base") or h["balance"]),
        "refilled_at": int(h.get("refilled_at") or 0),
        "refill_at": int(h["refill_at"]) if h.get("refill_at") else None,
        "epoch": int(h.get("epoch") or 0),
    }


def _redis() -> Any:
    try:
        import redis
    except ImportError:
        raise MissingExtraError(
            "the redis key store needs redis-py: pip install 'fastmcp-guard[redis]'"
        ) from None
    return redis


class RedisKeyBackend:
    """The key records in Redis, as the core's ``KeyManager.external`` calls them."""

    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX, timeout: float = 2.0) -> None:
        self._redis = _redis()
        self.url = url
        #: The URL with its password masked (used in every message).
        self.name = mask_url(url)
        self.prefix = prefix
        self.channel = prefix + "events"
        #: This process's id in change messages (its own are skipped by its listener).
        self.node_id = uuid.uuid4().hex
        self.client = self._redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            health_check_interval=30, decode_responses=True,
        )  # fmt: skip
        try:
            self.client.ping()
        except self._redis.RedisError as exc:
            raise ConnectionError(
                f"cannot connect to {self.name}: {exc}; check that Redis is running and the "
                "URL is right"
            ) from None
        self._insert = self.client.register_script(_INSERT)
        self._update = self.client.register_script(_UPDATE)
        self._rotate = self.client.register_script(_ROTATE)
        self._touch = self.client.register_script(_TOUCH)
        self._lease = self.client.register_script(_LEASE)
        self._return = self.client.register_script(_RETURN)
        self._write_credits = self.client.register_script(_WRITE_CREDITS)

    def k(self, name: str) -> str:
        return self.prefix + name

    def _rec(self, key_id: str) -> str:
        return self.prefix + "rec:" + key_id

    def _cred(self, key_id: str) -> str:
        return self.prefix + "cred:" + key_id

    @staticmethod
    def _body(record: dict[str, Any]) -> str:
        skip = ("revision", "credits", *_USED)
        return json.dumps({k: v for k, v in record.items() if k not in skip})

    def _message(self, key_id: str) -> str:
        return f"{self.node_id} {key_id}"

    def close(self) -> None:
        self.client.close()

    # -- the protocol (see keys/backends.py) ---------------------------------------------

    def insert(self, record: dict[str, Any]) -> int:
        keys = [self.k("rev"), self.k("revs"), self._rec(record["id"]), self.k("created"),
                self.k("changes"), self._cred(record["id"])]  # fmt: skip
        args = [record["id"], self._body(record), record["created_at"],
                *_credit_fields(record.get("credits"))]  # fmt: skip
        return int(self._insert(keys, args))

    def get(self, key_id: str) -> dict[str, Any] | None:
        return self._many([key_id])[0]

    def _many(self, ids: builtins.list[str]) -> builtins.list[dict[str, Any] | None]:
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        pipe.mget([self._rec(i) for i in ids])
        pipe.hmget(self.k("revs"), ids)
        pipe.hmget(self.k("used"), ids)
        for i in ids:
            pipe.hgetall(self._cred(i))
        bodies, revs, used, *creds = pipe.execute()
        out: builtins.list[dict[str, Any] | None] = []
        for body, rev, use, cred in zip(bodies, revs, used, creds, strict=True):
            if body is None or rev is None:
                out.append(None)
                continue
            rec = json.loads(body)
            rec["revision"] = int(rev)
            at, _, ip = (use or "").partition("|")
            rec["last_used_at"] = int(at) if at else None
            rec["last_used_ip"] = ip or None
            rec["credits"] = _credits_from_hash(cred)
            out.append(rec)
        return out

    def list(self, include_revoked: bool) -> builtins.list[dict[str, Any]]:
        ids = self.client.zrange(self.k("created"), 0, -1)
        recs = [r for r in self._many(ids) if r is not None]
        return recs if include_revoked else [r for r in recs if r["status"] != "revoked"]

    def update(self, record: dict[str, Any]) -> int | None:
        key_id = record["id"]
        rev = self._update(
            [self.k("rev"), self.k("revs"), self._rec(key_id), self.k("changes")],
            [key_id, record["revision"], self._merged(record), self.channel,
             self._message(key_id)],
        )  # fmt: skip
        return None if rev is None else int(rev)

    def _merged(self, record: dict[str, Any]) -> str:
        """``record`` with the fields ``update`` never writes taken from the stored copy
        (the script writes only if the revision still matches, so the copy is current)."""
        stored = self.client.get(self._rec(record["id"]))
        if stored is None:
            return self._body(record)
        keep = json.loads(stored)
        merged = dict(record)
        for field in ("phc_hash", "created_at", "legacy_selector"):
            if field in keep:
                merged[field] = keep[field]
        return self._body(merged)

    def rotate(self, old: dict[str, Any], new: dict[str, Any]) -> tuple[int, int] | None:
        keys = [self.k("rev"), self.k("revs"), self._rec(old["id"]), self.k("changes"),
                self._rec(new["id"]), self.k("created")]  # fmt: skip
        args = [old["id"], old["revision"], self._merged(old), self.channel,
                self._message(old["id"]), new["id"], self._body(new), new["created_at"]]  # fmt: skip
        out = self._rotate(keys, args)
        return None if out is None else (int(out[0]), int(out[1]))

    def touch_many(self, touches: builtins.list[tuple[str, int, str | None]]) -> None:
        if not touches:
            return
        args: builtins.list[Any] = []
        for key_id, at, ip in touches:
            args += [key_id, at, ip or ""]
        self._touch([self.k("revs"), self.k("used")], args)

    # -- credits (see keys/backends.py) --------------------------------------------------

    def lease_credits(self, key_id: str, want: int, bounds: dict[str, int]) -> dict[str, Any] | None:
        out = self._lease([self._cred(key_id)], [
            want, bounds["now_ms"], bounds["day_start_ms"], bounds["day_next_ms"],
            bounds["month_start_ms"], bounds["month_next_ms"],
        ])  # fmt: skip
        if out is None:
            return None
        granted, balance, refill_at, epoch, base, shadow = out
        return {"granted": int(granted), "balance_after": int(balance),
                "refill_at": int(refill_at) if refill_at else None, "epoch": int(epoch),
                "base": int(base), "shadow": shadow == "1"}  # fmt: skip

    def return_credits(self, key_id: str, n: int, epoch: int) -> bool:
        if n <= 0:
            return False
        return bool(self._return([self._cred(key_id)], [n, epoch, 2**53]))

    def write_credits(
        self, key_id: str, expected: dict[str, Any] | None, new: dict[str, Any] | None
    ) -> int | None:
        keys = [self.k("rev"), self.k("revs"), self._cred(key_id), self.k("changes")]
        if expected is None:
            exp = ["0", "", ""]
        else:
            exp = ["1", str(expected["balance"]), str(expected["epoch"])]
        rev = self._write_credits(keys, [key_id, *exp, self.channel, self._message(key_id),
                                         *_credit_fields(new)])  # fmt: skip
        return None if rev is None else int(rev)

    def current_revision(self) -> int:
        return int(self.client.get(self.k("rev")) or 0)

    def changed_since(self, revision: int) -> tuple[int, builtins.list[tuple[str, int]]]:
        rows = self.client.zrangebyscore(self.k("changes"), f"({revision}", "+inf",
                                         withscores=True)  # fmt: skip
        changes = [(str(i), int(score)) for i, score in rows]
        return (changes[-1][1] if changes else revision), changes


class RedisListener:
    """Subscribes to the store's change channel on its own connection; each message from
    another node drops that key from ``manager``'s cache. Reconnects with backoff, then
    clears the whole cache (messages published while it was away are lost)."""

    def __init__(self, backend: RedisKeyBackend, manager: KeyManager) -> None:
        self.backend = backend
        self.manager = manager
        self._stop = threading.Event()
        self.listening = threading.Event()
        self.reconnects = 0
        self._pubsub: Any = None
        self._thread = threading.Thread(target=self._run, name="fmg-redis-listen", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        delay, first = 0.1, True
        while not self._stop.is_set():
            pubsub = self.backend.client.pubsub(ignore_subscribe_messages=True)
            self._pubsub = pubsub
            try:
                pubsub.subscribe(self.backend.channel)
                if not first:
                    self.reconnects += 1
                    self.manager.clear_cache()
                    log.warning("key store %s: change listener reconnected; cache cleared",
                                self.backend.name)  # fmt: skip
                first, delay = False, 0.1
                self.listening.set()
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg is None or msg.get("type") != "message":
                        continue
                    node, _, key_id = str(msg["data"]).partition(" ")
                    if node != self.backend.node_id and key_id:
                        self.manager.invalidate(key_id)
            except Exception as exc:  # noqa: BLE001 - any failure: a dropped connection, a restart
                self.listening.clear()
                if self._stop.is_set():
                    break
                log.warning("key store %s: change listener lost (%s); reconnecting in %.1fs",
                            self.backend.name, exc, delay)  # fmt: skip
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
            finally:
                try:
                    pubsub.close()
                except Exception:
                    log.debug("closing the pub/sub connection failed", exc_info=True)

    def kill_connection(self) -> None:
        """Close the subscription's socket under the listener (tests: a lost connection)."""
        pubsub = self._pubsub
        if pubsub is not None and pubsub.connection is not None:
            pubsub.connection.disconnect()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
