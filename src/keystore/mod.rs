//! API keys: records and lifecycle, storage backends, and the [`KeyManager`] service that
//! verifies tokens.
//!
//! * [`KeyRecord`] is one key as stored (argon2id hash of the secret, never the token).
//! * [`KeyBackend`] is the small storage surface; [`MemoryBackend`] and [`SqliteBackend`]
//!   implement it.
//! * [`KeyManager`] owns a backend, the cache of verified tokens, the digests proven on this
//!   node, the negative cache of unknown ids, the failure budgets ([`throttle`]), the pool of
//!   hashing threads, and a background thread (`fmg-keys`) that writes `last_used_at` in
//!   batches and watches the store for changes made by other processes.
//!
//! Verification of a token not in the cache: a digest proven before (against the same
//! stored hash) re-reads the record only; an unknown id remembered by the negative cache
//! costs nothing; anything else reserves a place in the failure budgets, reads the record,
//! and hashes on the pool.
//!
//! Lifecycle: `active` → `rotating` (the old token stays valid until `grace_until`) →
//! `revoked`. Expiry (`expires_at`) is independent of the status.
//!
//! Keys imported from fastmcp-guard 0.2 ([`legacy`]) are ordinary records with a bcrypt hash
//! of their whole token and a [`KeyRecord::legacy_selector`]; their 0.2 tokens are verified
//! with bcrypt (once per process, then cached like any token). Everything else — status,
//! expiry, grace periods, the throttle, revoke and rotate — is the same. Rotating one issues
//! a current-format token.

mod backend;
mod error;
mod known;
pub mod legacy;
pub mod memory;
mod negative;
mod options;
mod record;
pub mod sqlite;
#[cfg(test)]
mod testing;
pub mod throttle;
mod validate;

pub use backend::KeyBackend;
pub use error::{KeyError, VerifyError};
pub use known::DEFAULT_KNOWN_IDS_CAPACITY;
pub use legacy::LegacyImport;
pub use memory::MemoryBackend;
pub use negative::{DEFAULT_NEGATIVE_CAPACITY, DEFAULT_NEGATIVE_TTL};
pub use options::ManagerOptions;
pub use record::{Change, KeyRecord, KeyStatus, Touch};
pub use sqlite::SqliteBackend;
pub use throttle::{client_bucket, client_network, FailThrottle, ThrottleScope};

use backend::legacy_label;
use record::{now_utc, truncate_ms, utc_from_ms};
use validate::{echo_id, resolve_id, validate_name, validate_scopes};

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use parking_lot::Mutex;
use serde_json::{Map, Value};

use crate::hashing::{
    CachedKey, HashError, HashPool, HashScheme, Now, PoolError, ProvenDigests, TokenDigest,
    VerifiedCache,
};
use crate::tokens::{self, AnyToken, TokenError};

/// What [`KeyManager::revoke_lineage`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Revocation {
    /// The key named (revoked now, or already before).
    pub key: KeyRecord,
    /// Its predecessors that were still in their rotation grace period, revoked with it,
    /// nearest first.
    pub predecessors: Vec<KeyRecord>,
}

/// Result of the cache-only lookup ([`KeyManager::verify_cached`]).
#[derive(Debug, Clone)]
pub enum CacheLookup {
    /// A verified, still valid token.
    Hit(Arc<CachedKey>),
    /// Not in the cache (or no longer valid there): call [`KeyManager::verify`].
    Miss,
    /// Refused without any lookup.
    Malformed(TokenError),
}

/// Counters of a [`KeyManager`] (since it was created).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ManagerStats {
    /// argon2 verifications run.
    pub argon2_runs: u64,
    /// bcrypt verifications run (0.2 tokens of imported keys; not counted in `argon2_runs`).
    pub bcrypt_runs: u64,
    /// Records read from the store by `verify`.
    pub store_reads: u64,
    /// `last_used_at` transactions written.
    pub touch_batches: u64,
    /// Key uses written in those transactions.
    pub touches_written: u64,
    /// Cache invalidations of a key id (local changes and changes seen in the store).
    pub invalidations: u64,
    /// Verifications refused by the failure throttle.
    pub throttled: u64,
    /// Verifications refused as [`VerifyError::Busy`].
    pub busy: u64,
    /// Refreshes of a proven token: the record re-read, no hash run.
    pub proof_refreshes: u64,
    /// Unknown key ids answered from the negative cache (no store read).
    pub negative_hits: u64,
    /// Digests remembered as proven.
    pub proven_len: usize,
    /// Key ids (and 0.2 labels) known to exist.
    pub known_ids: usize,
    /// Bytes of argon2 memory held by the hashing threads.
    pub hash_memory_bytes: usize,
    /// Errors in the background thread (see [`KeyManager::last_background_error`]).
    pub background_errors: u64,
    /// Entries in the verified-token cache.
    pub cache_len: usize,
    /// Key uses waiting to be written.
    pub pending_touches: usize,
}

#[derive(Debug, Default)]
struct Counters {
    argon2_runs: AtomicU64,
    bcrypt_runs: AtomicU64,
    store_reads: AtomicU64,
    touch_batches: AtomicU64,
    touches_written: AtomicU64,
    invalidations: AtomicU64,
    throttled: AtomicU64,
    busy: AtomicU64,
    proof_refreshes: AtomicU64,
    negative_hits: AtomicU64,
    background_errors: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(86_400 * 365)))
        .unwrap_or(now)
}

/// What a well-formed token names, before the store is read.
enum Claim<'a> {
    /// A current token: its key id and secret part (argon2id).
    Current { key_id: String, secret: &'a str },
    /// A 0.2 token: its selector and the whole token (bcrypt), and its public part
    /// `fmg_sk_<selector>` as the label.
    Legacy {
        selector: &'a str,
        token: &'a str,
        label: String,
    },
}

impl<'a> From<AnyToken<'a>> for Claim<'a> {
    fn from(t: AnyToken<'a>) -> Self {
        match t {
            AnyToken::Current(p) => Self::Current {
                key_id: p.key_id(),
                secret: p.secret,
            },
            AnyToken::Legacy(l) => Self::Legacy {
                selector: l.selector,
                token: l.token,
                label: l.public_part(),
            },
        }
    }
}

impl Claim<'_> {
    /// The public name of the key the token claims: the key id, or for a 0.2 token its
    /// public part. The failure throttle is keyed by it (one per key either way).
    fn label(&self) -> &str {
        match self {
            Self::Current { key_id, .. } => key_id,
            Self::Legacy { label, .. } => label,
        }
    }
}

#[derive(Debug, Clone)]
struct PendingTouch {
    at_ms: i64,
    ip: Option<String>,
}

/// How long `create` and `rotate` wait for a hashing thread, at least.
const MANAGEMENT_WAIT: Duration = Duration::from_secs(30);

/// Predecessors followed by `revoke`, at most (a rotation chain is never this long).
const MAX_LINEAGE: usize = 1_000;

/// A cached token records a use at most once per this many ms (keeps the hit path read-only).
const TOUCH_EVERY_MS: i64 = 1_000;

struct Inner {
    backend: Arc<dyn KeyBackend>,
    opts: ManagerOptions,
    cache: VerifiedCache,
    touches: DashMap<String, PendingTouch>,
    /// Digests argon2 (or bcrypt) proved here, with the stored hash they matched.
    proven: ProvenDigests,
    /// Key ids (0.2 selectors) the store did not have, for a few seconds.
    negative: negative::NegativeCache,
    /// Key ids (and 0.2 labels) known to exist: never refused by the unknown-id budget.
    known: known::KnownIds,
    throttle: throttle::Throttle,
    inflight: DashMap<TokenDigest, Arc<Mutex<()>>>,
    /// The only place argon2 and bcrypt run.
    pool: HashPool,
    /// Last store revision seen by the watcher; the lock also serialises polls.
    revision: Mutex<u64>,
    /// Revisions this manager wrote itself (key id -> revision), so the watcher does not
    /// drop cache entries for its own changes (they are invalidated when made).
    own_writes: Mutex<std::collections::HashMap<String, u64>>,
    /// Serialises flushes so re-queued touches never overtake newer ones.
    flush_lock: Mutex<()>,
    counters: Counters,
    last_error: Mutex<Option<String>>,
}

struct Worker {
    stop: crossbeam_channel::Sender<()>,
    handle: JoinHandle<()>,
}

/// The key service: lifecycle operations and token verification over a [`KeyBackend`].
///
/// `Send + Sync`; share it behind an `Arc` or a frozen pyclass. Dropping it calls
/// [`KeyManager::close`].
///
/// Verification has two entry points:
/// * [`KeyManager::verify_cached`] — parse, checksum, digest, cache lookup: microseconds, no
///   I/O, no argon2. Call it first, without releasing the GIL.
/// * [`KeyManager::verify`] — the full path (store read, argon2, caching). Blocking: call it
///   with the GIL released, from a worker thread.
pub struct KeyManager {
    inner: Arc<Inner>,
    worker: Mutex<Option<Worker>>,
}

impl std::fmt::Debug for KeyManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyManager")
            .field("options", &self.inner.opts)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl KeyManager {
    /// A manager over a fresh in-memory store (lost when dropped).
    ///
    /// # Errors
    /// [`KeyError::InvalidInput`] for bad options; [`KeyError::Thread`].
    pub fn memory(opts: ManagerOptions) -> Result<Self, KeyError> {
        Self::with_backend(Arc::new(MemoryBackend::new()), opts)
    }

    /// A manager over the `SQLite` file at `path` (created if missing; its directory must exist).
    ///
    /// # Errors
    /// See [`SqliteBackend::open`]; [`KeyError::InvalidInput`] for bad options.
    pub fn sqlite(path: impl AsRef<Path>, opts: ManagerOptions) -> Result<Self, KeyError> {
        opts.validate()?;
        Self::with_backend(Arc::new(SqliteBackend::open(path)?), opts)
    }

    /// A manager over any backend (several managers may share one).
    ///
    /// # Errors
    /// [`KeyError::InvalidInput`] for bad options; store errors; [`KeyError::Thread`].
    pub fn with_backend(
        backend: Arc<dyn KeyBackend>,
        opts: ManagerOptions,
    ) -> Result<Self, KeyError> {
        opts.validate()?;
        // The revision first: a key created after the ids are read is a change after it.
        let revision = backend.current_revision()?;
        let known = known::KnownIds::new(opts.known_ids_capacity);
        known.extend_with(|each| backend.for_each_label(each))?;
        let inner = Arc::new(Inner {
            backend,
            cache: VerifiedCache::new(opts.cache_capacity, opts.cache_ttl),
            touches: DashMap::new(),
            proven: ProvenDigests::new(opts.proven_capacity),
            negative: negative::NegativeCache::new(opts.negative_capacity, opts.negative_ttl),
            known,
            throttle: throttle::Throttle::new(opts.fail_throttle),
            inflight: DashMap::new(),
            pool: HashPool::new(opts.max_concurrent_verifications).map_err(|e| {
                KeyError::Thread {
                    reason: e.to_string(),
                }
            })?,
            revision: Mutex::new(revision),
            own_writes: Mutex::new(std::collections::HashMap::new()),
            flush_lock: Mutex::new(()),
            counters: Counters::default(),
            last_error: Mutex::new(None),
            opts,
        });
        if !inner.opts.background_thread {
            return Ok(Self {
                inner,
                worker: Mutex::new(None),
            });
        }
        let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
        let weak = Arc::downgrade(&inner);
        let (touch_every, watch_every) = (inner.opts.touch_interval, inner.opts.watch_interval);
        let handle = std::thread::Builder::new()
            .name("fmg-keys".to_owned())
            .spawn(move || run_worker(&weak, &stopped, touch_every, watch_every))
            .map_err(|e| KeyError::Thread {
                reason: e.to_string(),
            })?;
        Ok(Self {
            inner,
            worker: Mutex::new(Some(Worker { stop, handle })),
        })
    }

    /// The options this manager runs with.
    #[must_use]
    pub fn options(&self) -> &ManagerOptions {
        &self.inner.opts
    }

    /// Creates a key. Returns the record and the token — the only time the token exists
    /// outside the caller: show it once, never store it.
    ///
    /// `name`: non-empty (trimmed), at most 200 characters, no control characters.
    /// `scopes`: non-empty strings without whitespace (duplicates are dropped).
    /// `expires_at`: in the future, if given.
    ///
    /// # Errors
    /// [`KeyError::InvalidInput`] naming the argument; hashing and store errors.
    pub fn create(
        &self,
        name: &str,
        scopes: &[String],
        expires_at: Option<DateTime<Utc>>,
        metadata: Map<String, Value>,
    ) -> Result<(KeyRecord, String), KeyError> {
        self.create_key(name, scopes, expires_at, metadata, false)
    }

    /// Like [`KeyManager::create`], except that an `expires_at` not in the future makes a key
    /// that is already expired (its token is refused as `expired`) instead of an error: what
    /// fastmcp-guard 0.2's `create(expires_in_days=-1)` did, kept for code written for it.
    ///
    /// # Errors
    /// As [`KeyManager::create`], without the `expires_at` check.
    pub fn create_allowing_past_expiry(
        &self,
        name: &str,
        scopes: &[String],
        expires_at: Option<DateTime<Utc>>,
        metadata: Map<String, Value>,
    ) -> Result<(KeyRecord, String), KeyError> {
        self.create_key(name, scopes, expires_at, metadata, true)
    }

    fn create_key(
        &self,
        name: &str,
        scopes: &[String],
        expires_at: Option<DateTime<Utc>>,
        metadata: Map<String, Value>,
        allow_past_expiry: bool,
    ) -> Result<(KeyRecord, String), KeyError> {
        let name = validate_name(name)?;
        let scopes = validate_scopes(scopes)?;
        let now = now_utc();
        let expires_at = expires_at.map(truncate_ms);
        if let Some(e) = expires_at.filter(|_| !allow_past_expiry) {
            if e <= now {
                return Err(KeyError::InvalidInput {
                    field: "expires_at",
                    reason: format!(
                        "{} is not in the future; give a later time or no expiry",
                        e.to_rfc3339()
                    ),
                });
            }
        }
        let (token, id) = tokens::generate()?;
        let phc_hash = self.hash_token_secret(&token)?;
        let mut record = KeyRecord {
            id,
            name,
            phc_hash,
            scopes,
            metadata,
            status: KeyStatus::Active,
            created_at: now,
            expires_at,
            last_used_at: None,
            last_used_ip: None,
            grace_until: None,
            rotated_from: None,
            rotated_to: None,
            revoked_at: None,
            revision: 0,
            legacy_selector: None,
        };
        record.revision = self.inner.backend.insert(&record)?;
        self.inner.note_own_write(&record.id, record.revision);
        self.inner.known.insert(&record.id);
        self.inner.negative.remove(&record.id);
        Ok((record, token))
    }

    /// Hashes a new token's secret on the pool (management calls wait longer than
    /// verifications for a hashing thread: a flood must not stop key creation).
    fn hash_token_secret(&self, token: &str) -> Result<String, KeyError> {
        let parsed = tokens::parse(token)?;
        let wait = self.inner.opts.verify_wait.max(MANAGEMENT_WAIT);
        self.inner
            .pool
            .hash(parsed.secret, &self.inner.opts.hash_params, wait)
            .map_err(|e| match e {
                PoolError::Hash(e) => KeyError::Hash(e),
                PoolError::Busy => KeyError::Hash(HashError::Hashing {
                    reason: format!(
                        "every hashing thread stayed busy for {} s; retry",
                        wait.as_secs()
                    ),
                }),
            })
    }

    /// The key named by an id, a bare kid, or a token's public part — including a
    /// fastmcp-guard 0.2 token or its public part `fmg_sk_<selector>` (looked up by selector;
    /// where `fmg_sk_<16 hex>` is also a current key's public part, the key id wins).
    ///
    /// # Errors
    /// [`KeyError::NotFound`]; store errors.
    pub fn get(&self, id_or_public_part: &str) -> Result<KeyRecord, KeyError> {
        let by_id = tokens::key_id_from_public_part(id_or_public_part);
        if let Some(id) = &by_id {
            if let Some(record) = self.inner.backend.get(id)? {
                return Ok(record);
            }
        }
        if let Some(selector) = tokens::legacy_selector_from_public_part(id_or_public_part) {
            if let Some(record) = self.inner.backend.get_by_legacy_selector(selector)? {
                return Ok(record);
            }
        }
        Err(KeyError::NotFound {
            id: by_id.unwrap_or_else(|| echo_id(id_or_public_part)),
        })
    }

    /// The key id named by `input` for `rotate` and `revoke`: as [`resolve_id`], plus 0.2
    /// tokens and their public parts (one extra indexed read, only for those forms).
    fn resolve_key_id(&self, input: &str) -> Result<String, KeyError> {
        if let Some(selector) = tokens::legacy_selector_from_public_part(input) {
            if let Some(id) = tokens::key_id_from_public_part(input) {
                if self.inner.backend.get(&id)?.is_some() {
                    return Ok(id);
                }
            }
            if let Some(record) = self.inner.backend.get_by_legacy_selector(selector)? {
                return Ok(record.id);
            }
        }
        resolve_id(input)
    }

    /// All keys, oldest first. Without `include_revoked`, keys that are revoked (including
    /// rotating keys past their grace period) are left out; expired keys are listed.
    ///
    /// # Errors
    /// Store errors.
    pub fn list(&self, include_revoked: bool) -> Result<Vec<KeyRecord>, KeyError> {
        let mut keys = self.inner.backend.list(include_revoked)?;
        if !include_revoked {
            let now = now_utc();
            keys.retain(|k| k.effective_status_at(now) != KeyStatus::Revoked);
        }
        keys.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(keys)
    }

    /// Replaces a key by a new one with the same name, scopes, metadata and expiry.
    /// The new key always has a current-format token (also when the old one came from 0.2).
    ///
    /// With `grace` > 0 the old key becomes `rotating` and keeps working until
    /// `now + grace`; with `grace` = 0 it is revoked at once. Returns the new record and token.
    ///
    /// # Errors
    /// [`KeyError::NotFound`]; [`KeyError::Revoked`]; [`KeyError::AlreadyRotated`] if it is in
    /// a grace period already; [`KeyError::InvalidInput`] for a negative grace or an expired
    /// key; store errors.
    pub fn rotate(
        &self,
        id: &str,
        grace: chrono::Duration,
    ) -> Result<(KeyRecord, String), KeyError> {
        if grace < chrono::Duration::zero() {
            return Err(KeyError::InvalidInput {
                field: "grace",
                reason: "is negative; use 0 to revoke the old key at once".to_owned(),
            });
        }
        let id = self.resolve_key_id(id)?;
        // The new token is made (and hashed) once, after the first checks pass.
        let mut fresh: Option<(String, String, String)> = None;
        for _ in 0..3 {
            let old = self
                .inner
                .backend
                .get(&id)?
                .ok_or_else(|| KeyError::NotFound { id: id.clone() })?;
            let now = now_utc();
            match old.effective_status_at(now) {
                KeyStatus::Revoked => return Err(KeyError::Revoked { id }),
                KeyStatus::Rotating => {
                    return Err(KeyError::AlreadyRotated {
                        successor: old.rotated_to.clone().unwrap_or_default(),
                        id,
                    })
                }
                KeyStatus::Active => {}
            }
            if let Some(e) = old.expires_at.filter(|&e| e <= now) {
                return Err(KeyError::InvalidInput {
                    field: "id",
                    reason: format!(
                        "key `{id}` expired at {}; create a new key instead",
                        e.to_rfc3339()
                    ),
                });
            }
            if fresh.is_none() {
                let (token, new_id) = tokens::generate()?;
                let phc_hash = self.hash_token_secret(&token)?;
                fresh = Some((token, new_id, phc_hash));
            }
            let Some((token, new_id, phc_hash)) = &fresh else {
                continue;
            };
            let mut new = KeyRecord {
                id: new_id.clone(),
                name: old.name.clone(),
                phc_hash: phc_hash.clone(),
                scopes: old.scopes.clone(),
                metadata: old.metadata.clone(),
                status: KeyStatus::Active,
                created_at: now,
                expires_at: old.expires_at,
                last_used_at: None,
                last_used_ip: None,
                grace_until: None,
                rotated_from: Some(old.id.clone()),
                rotated_to: None,
                revoked_at: None,
                revision: 0,
                legacy_selector: None,
            };
            let mut updated = old;
            updated.rotated_to = Some(new_id.clone());
            if grace.is_zero() {
                updated.status = KeyStatus::Revoked;
                updated.revoked_at = Some(now);
                updated.grace_until = None;
            } else {
                let until = now
                    .checked_add_signed(grace)
                    .ok_or(KeyError::InvalidInput {
                        field: "grace",
                        reason: "is too long".to_owned(),
                    })?;
                updated.status = KeyStatus::Rotating;
                updated.grace_until = Some(truncate_ms(until));
            }
            match self.inner.backend.rotate(&updated, &new) {
                Ok((old_rev, new_rev)) => {
                    self.inner.invalidate(&id);
                    self.inner.note_own_write(&id, old_rev);
                    self.inner.note_own_write(new_id, new_rev);
                    self.inner.known.insert(new_id);
                    self.inner.negative.remove(new_id);
                    new.revision = new_rev;
                    return Ok((new, token.clone()));
                }
                Err(KeyError::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Err(KeyError::Conflict { id })
    }

    /// Revokes a key at once (also on cached and already-open connections of this process;
    /// other processes see it within their `watch_interval`), and with it its predecessors
    /// still in their rotation grace period (see [`KeyManager::revoke_lineage`]). Revoking a
    /// revoked key returns it unchanged.
    ///
    /// # Errors
    /// [`KeyError::NotFound`]; store errors.
    pub fn revoke(&self, id: &str) -> Result<KeyRecord, KeyError> {
        self.revoke_lineage(id).map(|r| r.key)
    }

    /// Revokes a key and every predecessor (following `rotated_from`) still in its rotation
    /// grace period: a rotation's old token must not outlive the revocation of the key that
    /// replaced it. The key is revoked first, then its predecessors, nearest first, each in
    /// its own write (if one fails, the ones before it stay revoked). Predecessors whose
    /// grace is over are passed (an older one may have a longer grace).
    ///
    /// # Errors
    /// [`KeyError::NotFound`]; store errors.
    pub fn revoke_lineage(&self, id: &str) -> Result<Revocation, KeyError> {
        let id = self.resolve_key_id(id)?;
        let key = self.revoke_one(&id)?;
        let mut predecessors = Vec::new();
        let mut seen = std::collections::HashSet::from([id]);
        let mut next = key.rotated_from.clone();
        while let Some(pid) = next.take() {
            if seen.len() > MAX_LINEAGE || !seen.insert(pid.clone()) {
                break;
            }
            let Some(record) = self.inner.backend.get(&pid)? else {
                break;
            };
            next.clone_from(&record.rotated_from);
            if record.effective_status_at(now_utc()) == KeyStatus::Rotating {
                predecessors.push(self.revoke_one(&pid)?);
            }
        }
        Ok(Revocation { key, predecessors })
    }

    /// Revokes one key (retrying on a concurrent write).
    fn revoke_one(&self, id: &str) -> Result<KeyRecord, KeyError> {
        for _ in 0..5 {
            let mut record = self
                .inner
                .backend
                .get(id)?
                .ok_or_else(|| KeyError::NotFound { id: id.to_owned() })?;
            if record.status == KeyStatus::Revoked {
                self.inner.invalidate(id);
                return Ok(record);
            }
            record.status = KeyStatus::Revoked;
            record.revoked_at = Some(now_utc());
            match self.inner.backend.update(&record) {
                Ok(rev) => {
                    self.inner.invalidate(id);
                    self.inner.note_own_write(id, rev);
                    record.revision = rev;
                    return Ok(record);
                }
                Err(KeyError::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Err(KeyError::Conflict { id: id.to_owned() })
    }

    /// Cache-only verification at `now`; records the use (without a client address).
    /// No store I/O, no argon2.
    #[must_use]
    pub fn verify_cached(&self, token: &str, now: Now) -> CacheLookup {
        self.verify_cached_from(token, None, now)
    }

    /// Like [`KeyManager::verify_cached`], recording `client` as the last-used address.
    /// Accepts current and fastmcp-guard 0.2 tokens alike.
    #[must_use]
    pub fn verify_cached_from(&self, token: &str, client: Option<&str>, now: Now) -> CacheLookup {
        let parsed = match tokens::parse_any(token) {
            Ok(p) => p,
            Err(e) => return CacheLookup::Malformed(e),
        };
        let Ok(digest) = TokenDigest::of(parsed.token().as_bytes()) else {
            return CacheLookup::Miss;
        };
        match self.inner.cache.get(&digest, now) {
            Some(hit) => {
                self.inner.record_use(&hit, client, now);
                CacheLookup::Hit(hit)
            }
            None => CacheLookup::Miss,
        }
    }

    /// Full verification now, from `client` (its address, for the throttle and
    /// `last_used_ip`). Blocking: may read the store and run argon2 (or, for the token of a
    /// key imported from fastmcp-guard 0.2, bcrypt).
    ///
    /// # Errors
    /// See [`VerifyError`].
    pub fn verify(&self, token: &str, client: Option<&str>) -> Result<Arc<CachedKey>, VerifyError> {
        self.verify_at(token, client, Now::system())
    }

    /// [`KeyManager::verify`] at an explicit time (tests and replays).
    ///
    /// # Errors
    /// See [`VerifyError`].
    pub fn verify_at(
        &self,
        token: &str,
        client: Option<&str>,
        now: Now,
    ) -> Result<Arc<CachedKey>, VerifyError> {
        let inner = &*self.inner;
        let parsed = tokens::parse_any(token).map_err(VerifyError::Malformed)?;
        let whole = parsed.token();
        let claim = Claim::from(parsed);
        let digest = TokenDigest::of(whole.as_bytes())
            .map_err(|e| VerifyError::store(claim.label(), KeyError::Hash(e)))?;
        if let Some(hit) = inner.cache.get(&digest, now) {
            inner.record_use(&hit, client, now);
            return Ok(hit);
        }

        // Single flight: concurrent first uses of one token run argon2 once.
        let flight = Arc::clone(
            inner
                .inflight
                .entry(digest)
                .or_insert_with(|| Arc::new(Mutex::new(())))
                .value(),
        );
        let result = match flight.try_lock_for(inner.opts.verify_wait) {
            None => {
                bump(&inner.counters.busy);
                Err(VerifyError::Busy {
                    key_id: Some(claim.label().to_owned()),
                })
            }
            Some(_guard) => {
                if let Some(hit) = inner.cache.get(&digest, now) {
                    inner.record_use(&hit, client, now);
                    Ok(hit)
                } else {
                    inner.verify_uncached(&claim, digest, client, now)
                }
            }
        };
        inner
            .inflight
            .remove_if(&digest, |_, f| Arc::ptr_eq(f, &flight));
        result
    }

    /// Imports fastmcp-guard 0.2 keys that a 0.2 process added to the store's file after it
    /// was taken over (opening the file imports everything once; see
    /// [`SqliteBackend::import_legacy`]). Nothing for a memory store.
    ///
    /// # Errors
    /// Store errors; [`KeyError::Corrupt`] naming a 0.2 row that cannot be read.
    pub fn import_legacy(&self) -> Result<LegacyImport, KeyError> {
        let imported = self.inner.backend.import_legacy()?;
        // Their selectors may have been remembered as unknown; they exist now.
        self.inner.negative.clear();
        if imported.imported > 0 {
            let known = &self.inner.known;
            // The import is committed: a failed read of the labels is a background error
            // (the imported keys are then read from the store like unknown ones), not a
            // failed import.
            if let Err(e) = self.inner.backend.for_each_label(&mut |l| known.insert(l)) {
                self.inner
                    .note_error("reading the imported keys' labels", &e);
            }
        }
        Ok(imported)
    }

    /// Writes pending `last_used_at` updates now (one transaction). Returns how many.
    ///
    /// # Errors
    /// Store errors (the updates stay pending).
    pub fn flush(&self) -> Result<usize, KeyError> {
        self.inner.flush_touches()
    }

    /// Polls the store for changes by other processes now and drops their cache entries.
    /// Returns how many key ids changed. (The background thread does this every
    /// `watch_interval`.)
    ///
    /// # Errors
    /// Store errors.
    pub fn sync_changes(&self) -> Result<usize, KeyError> {
        self.inner.poll_changes()
    }

    /// Drops every cached verification.
    pub fn clear_cache(&self) {
        self.inner.cache.clear();
    }

    /// Drops the cached verifications of one key, and notes that it exists: what a store's
    /// change notification (PostgreSQL `NOTIFY`, Redis pub/sub) triggers on every node.
    pub fn invalidate(&self, key_id: &str) {
        self.inner.invalidate(key_id);
    }

    /// Stops the background thread and writes pending updates. Idempotent; `Drop` calls it.
    /// The manager keeps working afterwards, but `last_used_at` is then only written by
    /// [`KeyManager::flush`] and other processes' changes only seen via
    /// [`KeyManager::sync_changes`] (or the cache TTL).
    ///
    /// # Errors
    /// Store errors from the final flush.
    pub fn close(&self) -> Result<(), KeyError> {
        let worker = self.worker.lock().take();
        if let Some(Worker { stop, handle }) = worker {
            drop(stop);
            if handle.join().is_err() {
                bump(&self.inner.counters.background_errors);
            }
        }
        self.inner.flush_touches().map(|_| ())
    }

    /// Counters since creation.
    #[must_use]
    pub fn stats(&self) -> ManagerStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ManagerStats {
            argon2_runs: get(&c.argon2_runs),
            bcrypt_runs: get(&c.bcrypt_runs),
            store_reads: get(&c.store_reads),
            touch_batches: get(&c.touch_batches),
            touches_written: get(&c.touches_written),
            invalidations: get(&c.invalidations),
            throttled: get(&c.throttled),
            busy: get(&c.busy),
            proof_refreshes: get(&c.proof_refreshes),
            negative_hits: get(&c.negative_hits),
            proven_len: self.inner.proven.len(),
            known_ids: self.inner.known.len(),
            hash_memory_bytes: self.inner.pool.memory_bytes(),
            background_errors: get(&c.background_errors),
            cache_len: self.inner.cache.len(),
            pending_touches: self.inner.touches.len(),
        }
    }

    /// The last error of the background thread (flush or change poll), if any.
    #[must_use]
    pub fn last_background_error(&self) -> Option<String> {
        self.inner.last_error.lock().clone()
    }
}

impl Drop for KeyManager {
    fn drop(&mut self) {
        // Errors cannot be reported from Drop; call `close` to see them.
        let _ = self.close();
    }
}

impl Inner {
    fn invalidate(&self, key_id: &str) {
        self.cache.invalidate_key(key_id);
        // The key may have just been created elsewhere (a change notification).
        self.known.insert(key_id);
        self.negative.remove(key_id);
        bump(&self.counters.invalidations);
    }

    /// Verification past the cache. A digest proven before re-reads the record and, if the
    /// stored hash is the one it was proven against, passes without hashing and without
    /// the budgets. Any other token: the negative cache, then a reservation in the failure
    /// budgets, then the store read, then a hash run on the pool.
    fn verify_uncached(
        &self,
        claim: &Claim<'_>,
        digest: TokenDigest,
        client: Option<&str>,
        now: Now,
    ) -> Result<Arc<CachedKey>, VerifyError> {
        let label = claim.label();
        let proven = self.proven.contains(&digest);
        let mut reservation = None;
        if !proven {
            if self.negative.contains(label, now.instant) {
                bump(&self.counters.negative_hits);
                return Err(VerifyError::UnknownKey {
                    key_id: label.to_owned(),
                });
            }
            let may_exist = self.known.may_exist(label);
            reservation = Some(self.reserve(client, label, may_exist, now)?);
        }
        // Read before the store: an invalidation of this key (or a clear) after this point
        // stops us caching. The epoch does not name the key, so it serves 0.2 tokens too,
        // whose key id is only known from the store.
        let epoch = self.cache.epoch();
        bump(&self.counters.store_reads);
        let found = match claim {
            Claim::Current { key_id, .. } => self.backend.get(key_id),
            Claim::Legacy { selector, .. } => self.backend.get_by_legacy_selector(selector),
        }
        .map_err(|e| VerifyError::store(label, e))?;
        let Some(record) = found else {
            self.negative.insert(label, now.instant);
            if let Some(r) = reservation {
                r.unknown_key(now.instant);
            }
            return Err(VerifyError::UnknownKey {
                key_id: label.to_owned(),
            });
        };
        let key_id = record.id.clone();
        self.known.insert(&key_id);
        if let Claim::Legacy { label, .. } = claim {
            self.known.insert(label);
        }
        let now_dt = utc_from_ms(now.unix_ms);
        if record.effective_status_at(now_dt) == KeyStatus::Revoked {
            return Err(VerifyError::Revoked { key_id });
        }
        if record.is_expired_at(now_dt) {
            return Err(VerifyError::Expired { key_id });
        }
        let matches = if proven && self.proven.proves(&digest, &record.id, &record.phc_hash) {
            bump(&self.counters.proof_refreshes);
            true
        } else {
            if proven {
                // The stored hash changed since: the proof is void.
                self.proven.remove(&digest);
                reservation = Some(self.reserve(client, label, true, now)?);
            }
            self.check_secret(claim, &record)?
        };
        if !matches {
            if let Some(r) = reservation {
                r.failed(now.instant);
            }
            return Err(VerifyError::BadSecret { key_id });
        }
        drop(reservation); // released: a match is no failure
        self.proven.insert(digest, &record.id, &record.phc_hash);
        let valid_until = record.valid_until().map(|t| t.timestamp_millis());
        let entry = Arc::new(
            CachedKey::new(
                record.id,
                record.name,
                Arc::from(record.scopes),
                record.metadata,
                valid_until,
                now.instant,
            )
            .with_revision(record.revision),
        );
        self.cache
            .insert_if_epoch(digest, Arc::clone(&entry), epoch);
        self.record_use(&entry, client, now);
        Ok(entry)
    }

    /// Whether the token's secret matches the record's hash: one hash run on the pool.
    fn check_secret(&self, claim: &Claim<'_>, record: &KeyRecord) -> Result<bool, VerifyError> {
        let (input, scheme) = match claim {
            Claim::Current { secret, .. } => (*secret, HashScheme::Argon2id),
            Claim::Legacy { token, .. } => (*token, HashScheme::Bcrypt),
        };
        // A token of one format never matches a hash of the other (a current-format token
        // naming an imported 0.2 key's id, say): refused without hashing. An unrecognised
        // hash still goes to the pool, which reports it as malformed.
        if HashScheme::of(&record.phc_hash).is_some_and(|s| s != scheme) {
            return Ok(false);
        }
        match self
            .pool
            .verify(input, &record.phc_hash, self.opts.verify_wait)
        {
            Ok(matches) => {
                bump(match scheme {
                    HashScheme::Argon2id => &self.counters.argon2_runs,
                    HashScheme::Bcrypt => &self.counters.bcrypt_runs,
                });
                Ok(matches)
            }
            Err(PoolError::Busy) => {
                bump(&self.counters.busy);
                Err(VerifyError::Busy {
                    key_id: Some(record.id.clone()),
                })
            }
            Err(PoolError::Hash(e)) => Err(VerifyError::store(&record.id, KeyError::Hash(e))),
        }
    }

    /// A place in the failure budgets for one hash run, or the refusal. `may_exist`: the
    /// key may exist (see [`known::KnownIds::may_exist`]).
    fn reserve(
        &self,
        client: Option<&str>,
        label: &str,
        may_exist: bool,
        now: Now,
    ) -> Result<throttle::Reservation<'_>, VerifyError> {
        self.throttle
            .reserve(client.unwrap_or(""), label, may_exist, now.instant)
            .map_err(|refused| {
                bump(&self.counters.throttled);
                let retry_after = match refused.scope {
                    // The id may be a key made on another node that this one has not seen
                    // yet: retry once the watcher has looked (refusing again costs nothing).
                    ThrottleScope::UnknownKeys => refused
                        .retry_after
                        .min(self.opts.watch_interval.max(Duration::from_secs(1))),
                    _ => refused.retry_after,
                };
                VerifyError::Throttled {
                    key_id: label.to_owned(),
                    retry_after,
                    scope: refused.scope,
                }
            })
    }

    /// Records a use in memory (written by the next flush). At most once per second per
    /// cached token, so the hit path stays read-mostly.
    fn record_use(&self, entry: &CachedKey, client: Option<&str>, now: Now) {
        let last = entry.last_touch_ms.load(Ordering::Relaxed);
        if now.unix_ms.saturating_sub(last) < TOUCH_EVERY_MS
            || entry
                .last_touch_ms
                .compare_exchange(last, now.unix_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        if let Some(mut pending) = self.touches.get_mut(&entry.key_id) {
            if now.unix_ms >= pending.at_ms {
                pending.at_ms = now.unix_ms;
                if let Some(c) = client {
                    if pending.ip.as_deref() != Some(c) {
                        pending.ip = Some(c.to_owned());
                    }
                }
            }
            return;
        }
        self.touches
            .entry(entry.key_id.clone())
            .and_modify(|p| {
                if now.unix_ms >= p.at_ms {
                    p.at_ms = now.unix_ms;
                    if client.is_some() {
                        p.ip = client.map(str::to_owned);
                    }
                }
            })
            .or_insert_with(|| PendingTouch {
                at_ms: now.unix_ms,
                ip: client.map(str::to_owned),
            });
    }

    fn flush_touches(&self) -> Result<usize, KeyError> {
        let _serial = self.flush_lock.lock();
        let ids: Vec<String> = self.touches.iter().map(|e| e.key().clone()).collect();
        let batch: Vec<Touch> = ids
            .into_iter()
            .filter_map(|id| self.touches.remove(&id))
            .map(|(id, p)| Touch {
                id,
                at: utc_from_ms(p.at_ms),
                ip: p.ip,
            })
            .collect();
        if batch.is_empty() {
            return Ok(0);
        }
        match self.backend.touch_many(&batch) {
            Ok(()) => {
                bump(&self.counters.touch_batches);
                self.counters
                    .touches_written
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                Ok(batch.len())
            }
            Err(e) => {
                // Keep them for the next flush unless a newer use was recorded meanwhile.
                for t in batch {
                    self.touches.entry(t.id).or_insert(PendingTouch {
                        at_ms: t.at.timestamp_millis(),
                        ip: t.ip,
                    });
                }
                Err(e)
            }
        }
    }

    fn note_own_write(&self, id: &str, revision: u64) {
        self.own_writes.lock().insert(id.to_owned(), revision);
    }

    /// Invalidates keys changed in the store since the last poll, except changes this
    /// manager made itself (already invalidated). Returns how many were invalidated.
    fn poll_changes(&self) -> Result<usize, KeyError> {
        let mut revision = self.revision.lock();
        let (next, changed) = self.backend.changed_since(*revision)?;
        let next = next.max(*revision);
        let mut invalidated = 0;
        let mut new_ids = Vec::new();
        {
            let mut own = self.own_writes.lock();
            for change in &changed {
                // A key created elsewhere is known from now on.
                if !self.known.may_exist(&change.id) {
                    self.known.insert(&change.id);
                    new_ids.push(change.id.as_str());
                }
                self.negative.remove(&change.id);
                if own.get(&change.id) != Some(&change.revision) {
                    // Entries built from this revision or a later one are current: a key
                    // created elsewhere and cached here since is not verified again.
                    self.cache
                        .invalidate_key_before(&change.id, change.revision);
                    bump(&self.counters.invalidations);
                    invalidated += 1;
                }
            }
            own.retain(|_, rev| *rev > next);
        }
        // Outside the lock of own writes: this reads the store.
        for id in new_ids {
            self.note_legacy_label(id);
        }
        *revision = next;
        Ok(invalidated)
    }

    /// Reads the record of a key first seen in a change, for the label of a key imported
    /// from 0.2 (`fmg_sk_<selector>`), which the change does not name. A failed read is
    /// reported as a background error (it never stops the watcher); the id is known anyway.
    fn note_legacy_label(&self, id: &str) {
        match self.backend.get(id) {
            Ok(Some(record)) => {
                if let Some(selector) = &record.legacy_selector {
                    let label = legacy_label(selector);
                    self.known.insert(&label);
                    self.negative.remove(&label);
                }
            }
            Ok(None) => {}
            Err(e) => self.note_error("reading a key created elsewhere", &e),
        }
    }

    fn note_error(&self, what: &str, e: &KeyError) {
        bump(&self.counters.background_errors);
        *self.last_error.lock() = Some(format!("{what}: {e}"));
    }
}

fn run_worker(
    weak: &Weak<Inner>,
    stop: &crossbeam_channel::Receiver<()>,
    touch_every: Duration,
    watch_every: Duration,
) {
    let start = Instant::now();
    let mut next_touch = later(start, touch_every);
    let mut next_watch = later(start, watch_every);
    loop {
        let wait = next_touch
            .min(next_watch)
            .saturating_duration_since(Instant::now());
        match stop.recv_timeout(wait) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            // Stop requested (sender dropped or signalled).
            _ => return,
        }
        let Some(inner) = weak.upgrade() else { return };
        let now = Instant::now();
        if now >= next_watch {
            if let Err(e) = inner.poll_changes() {
                inner.note_error("watching the key store", &e);
            }
            next_watch = later(now, watch_every);
        }
        if now >= next_touch {
            if let Err(e) = inner.flush_touches() {
                inner.note_error("writing last_used_at", &e);
            }
            next_touch = later(now, touch_every);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::hashing::{self, HashParams};
    use proptest::prelude::*;
    use std::time::Instant;

    #[test]
    fn without_the_background_thread_the_owner_flushes_and_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let quiet = ManagerOptions {
            background_thread: false,
            watch_interval: Duration::from_millis(1),
            touch_interval: Duration::from_millis(1),
            ..opts()
        };
        let a = KeyManager::sqlite(&path, opts()).unwrap();
        let b = KeyManager::sqlite(&path, quiet).unwrap();
        assert!(b.worker.lock().is_none(), "no fmg-keys thread");
        let (rec, token) = a.create("k", &[], None, Map::new()).unwrap();
        b.verify(&token, Some("10.0.0.1")).unwrap();
        a.revoke(&rec.id).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        // Nothing runs by itself: still cached, use not written.
        assert!(matches!(
            b.verify_cached(&token, Now::system()),
            CacheLookup::Hit(_)
        ));
        assert_eq!(b.stats().touch_batches, 0);
        assert!(b.sync_changes().unwrap() >= 1);
        assert!(matches!(
            b.verify_cached(&token, Now::system()),
            CacheLookup::Miss
        ));
        assert_eq!(b.flush().unwrap(), 1);
        b.close().unwrap();
    }

    #[test]
    fn a_key_created_elsewhere_and_cached_since_survives_the_change_notice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let quiet = ManagerOptions {
            background_thread: false,
            ..opts()
        };
        let a = KeyManager::sqlite(&path, opts()).unwrap();
        let b = KeyManager::sqlite(&path, quiet).unwrap();
        let (rec, token) = a.create("new", &[], None, Map::new()).unwrap();
        b.verify(&token, None).unwrap(); // cached after the creation
        b.sync_changes().unwrap(); // the creation is reported as a change
        assert!(
            matches!(b.verify_cached(&token, Now::system()), CacheLookup::Hit(_)),
            "not verified (argon2) again"
        );
        assert_eq!(b.stats().argon2_runs, 1);
        // A later change does invalidate it.
        a.revoke(&rec.id).unwrap();
        b.sync_changes().unwrap();
        assert!(matches!(
            b.verify_cached(&token, Now::system()),
            CacheLookup::Miss
        ));
        b.close().unwrap();
    }

    #[test]
    fn create_get_and_list() {
        for (backend, m, _dir) in managers() {
            let (rec, token) = m
                .create(
                    " ci bot ",
                    &scopes(&["read", "read", "tools:write"]),
                    None,
                    meta("team", "a"),
                )
                .unwrap();
            assert_eq!(rec.name, "ci bot", "{backend}");
            assert_eq!(rec.scopes, scopes(&["read", "tools:write"]));
            assert_eq!(rec.status, KeyStatus::Active);
            assert!(tokens::is_key_id(&rec.id));
            assert!(rec.phc_hash.starts_with("$argon2id$"));
            assert!(!rec.phc_hash.contains(tokens::parse(&token).unwrap().secret));
            let kid = &rec.id[tokens::KEY_ID_PREFIX.len()..];
            for name in [rec.id.as_str(), kid, token.as_str(), &token[..23]] {
                assert_eq!(m.get(name).unwrap(), rec, "{backend} {name}");
            }
            let unknown = m.get("fmg_key_AAAAAAAAAAAAAAAA").unwrap_err();
            assert!(matches!(unknown, KeyError::NotFound { .. }), "{unknown}");
            let garbage = m.get("nonsense").unwrap_err();
            assert!(garbage.to_string().contains("nonsense"), "{garbage}");
            // A malformed token is never echoed.
            let bad = format!("fmg_sk_{}", "!".repeat(40));
            assert!(!m.get(&bad).unwrap_err().to_string().contains("!!!!"));

            let (rec2, _) = m.create("two", &[], None, Map::new()).unwrap();
            let (rec3, _) = m.create("three", &[], None, Map::new()).unwrap();
            m.revoke(&rec2.id).unwrap();
            let active: Vec<String> = m.list(false).unwrap().into_iter().map(|r| r.id).collect();
            assert_eq!(active.len(), 2, "{backend}");
            assert!(active.contains(&rec.id) && active.contains(&rec3.id));
            let all = m.list(true).unwrap();
            assert_eq!(all.len(), 3);
            assert!(all
                .windows(2)
                .all(|w| (w[0].created_at, &w[0].id) <= (w[1].created_at, &w[1].id)));
        }
    }

    #[test]
    fn list_is_sorted_by_creation_time() {
        let backend = Arc::new(MemoryBackend::new());
        let m = KeyManager::with_backend(backend.clone(), opts()).unwrap();
        let base = now_utc();
        for (i, mins) in [(0u8, 30), (1, 10), (2, 20)] {
            let (_, id) = tokens::generate().unwrap();
            let (mut rec, _) = m.create(&format!("k{i}"), &[], None, Map::new()).unwrap();
            rec.id = id;
            rec.created_at = base - chrono::Duration::minutes(mins);
            backend.insert(&rec).unwrap();
        }
        let names: Vec<String> = m.list(true).unwrap().into_iter().map(|r| r.name).collect();
        // The three back-dated copies first (oldest first), then the three originals.
        assert_eq!(&names[..3], ["k0", "k2", "k1"]);
    }

    #[test]
    fn verify_then_cache_hit() {
        for (backend, m, _dir) in managers() {
            let (rec, token) = m
                .create("svc", &scopes(&["read"]), None, meta("owner", "ops"))
                .unwrap();
            let now = Now::system();
            assert!(
                matches!(m.verify_cached(&token, now), CacheLookup::Miss),
                "{backend}"
            );
            let key = m.verify_at(&token, Some("10.0.0.1"), now).unwrap();
            assert_eq!(key.key_id, rec.id);
            assert_eq!(key.name, "svc");
            assert_eq!(&*key.scopes, ["read"]);
            assert_eq!(key.metadata, meta("owner", "ops"));
            assert_eq!(key.valid_until, None);
            match m.verify_cached(&token, now) {
                CacheLookup::Hit(hit) => assert!(Arc::ptr_eq(&hit, &key)),
                other => panic!("{backend}: {other:?}"),
            }
            assert!(matches!(
                m.verify_cached("fmg_sk_short", now),
                CacheLookup::Malformed(TokenError::Length { .. })
            ));
            assert!(matches!(
                m.verify("Bearer xyz", None),
                Err(VerifyError::Malformed(TokenError::Prefix))
            ));
            let unknown = tokens::generate().unwrap().0;
            assert!(matches!(
                m.verify(&unknown, None),
                Err(VerifyError::UnknownKey { .. })
            ));
            assert!(matches!(
                m.verify(&wrong_secret(&rec.id), None),
                Err(VerifyError::BadSecret { .. })
            ));
        }
    }

    #[test]
    fn default_owasp_params_work_end_to_end() {
        let m = KeyManager::memory(ManagerOptions {
            touch_interval: Duration::from_secs(3600),
            ..ManagerOptions::default()
        })
        .unwrap();
        let (rec, token) = m.create("prod", &[], None, Map::new()).unwrap();
        assert!(rec.phc_hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert_eq!(m.verify(&token, None).unwrap().key_id, rec.id);
    }

    #[test]
    fn argon2_runs_once_per_key() {
        let m = KeyManager::memory(opts()).unwrap();
        let (_, a) = m.create("a", &[], None, Map::new()).unwrap();
        let (_, b) = m.create("b", &[], None, Map::new()).unwrap();
        for _ in 0..5 {
            m.verify(&a, Some("1.1.1.1")).unwrap();
            m.verify(&b, Some("1.1.1.1")).unwrap();
        }
        assert_eq!(m.stats().argon2_runs, 2);
        assert_eq!(m.stats().store_reads, 2);
    }

    #[test]
    fn own_changes_do_not_evict_the_cache_again() {
        for (backend, m, _dir) in managers() {
            let (old, old_token) = m.create("a", &[], None, Map::new()).unwrap();
            let (_, new_token) = m.rotate(&old.id, chrono::Duration::hours(1)).unwrap();
            let (other, other_token) = m.create("b", &[], None, Map::new()).unwrap();
            m.revoke(&other.id).unwrap();
            m.verify(&old_token, None).unwrap();
            m.verify(&new_token, None).unwrap();
            assert!(m.verify(&other_token, None).is_err());
            assert_eq!(m.sync_changes().unwrap(), 0, "{backend}");
            m.verify(&old_token, None).unwrap();
            m.verify(&new_token, None).unwrap();
            assert_eq!(m.stats().argon2_runs, 2, "{backend}");
            assert!(m.inner.own_writes.lock().is_empty(), "{backend}");
        }
    }

    #[test]
    fn concurrent_first_uses_run_argon2_once() {
        let m = Arc::new(KeyManager::memory(opts()).unwrap());
        let (_, token) = m.create("a", &[], None, Map::new()).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (m, token) = (Arc::clone(&m), token.clone());
                std::thread::spawn(move || m.verify(&token, None).map(|k| k.key_id.clone()))
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        assert_eq!(m.stats().argon2_runs, 1);
    }

    #[test]
    fn rotate_with_grace_keeps_both_tokens_until_grace_ends() {
        for (backend, m, _dir) in managers() {
            let expires = Utc::now() + chrono::Duration::days(30);
            let (old, old_token) = m
                .create("svc", &scopes(&["read"]), Some(expires), meta("k", "v"))
                .unwrap();
            let now = Now::system();
            m.verify_at(&old_token, None, now).unwrap();
            let (new, new_token) = m.rotate(&old.id, chrono::Duration::hours(1)).unwrap();
            assert_ne!(new.id, old.id);
            assert_eq!(
                (&new.name, &new.scopes, &new.metadata),
                (&old.name, &old.scopes, &old.metadata)
            );
            assert_eq!(new.expires_at, old.expires_at);
            assert_eq!(new.rotated_from.as_deref(), Some(old.id.as_str()));
            let old_now = m.get(&old.id).unwrap();
            assert_eq!(old_now.status, KeyStatus::Rotating, "{backend}");
            assert_eq!(old_now.rotated_to.as_deref(), Some(new.id.as_str()));
            let grace_until = old_now.grace_until.unwrap();
            assert!(grace_until > Utc::now() + chrono::Duration::minutes(59));

            // Both work now; the old one's cache entry carries the grace deadline.
            let old_key = m.verify_at(&old_token, None, now).unwrap();
            assert_eq!(old_key.valid_until, Some(grace_until.timestamp_millis()));
            m.verify_at(&new_token, None, now).unwrap();

            let after = now.after(hours(2));
            assert!(matches!(
                m.verify_cached(&old_token, after),
                CacheLookup::Miss
            ));
            assert!(matches!(
                m.verify_at(&old_token, None, after),
                Err(VerifyError::Revoked { .. })
            ));
            m.verify_at(&new_token, None, after).unwrap();

            // A key in its grace period cannot be rotated again.
            let again = m.rotate(&old.id, chrono::Duration::hours(1)).unwrap_err();
            assert!(
                matches!(again, KeyError::AlreadyRotated { ref successor, .. } if *successor == new.id),
                "{again}"
            );
        }
    }

    #[test]
    fn rotate_with_zero_grace_revokes_the_old_key_even_if_cached() {
        for (backend, m, _dir) in managers() {
            let (old, old_token) = m.create("svc", &[], None, Map::new()).unwrap();
            m.verify(&old_token, None).unwrap();
            let (_, new_token) = m.rotate(&old.id, chrono::Duration::zero()).unwrap();
            assert!(
                matches!(
                    m.verify_cached(&old_token, Now::system()),
                    CacheLookup::Miss
                ),
                "{backend}"
            );
            assert!(matches!(
                m.verify(&old_token, None),
                Err(VerifyError::Revoked { .. })
            ));
            m.verify(&new_token, None).unwrap();
            let old_now = m.get(&old.id).unwrap();
            assert_eq!(old_now.status, KeyStatus::Revoked);
            assert!(old_now.revoked_at.is_some());
            assert!(matches!(
                m.rotate(&old.id, chrono::Duration::hours(1)),
                Err(KeyError::Revoked { .. })
            ));
            assert!(matches!(
                m.rotate("fmg_key_AAAAAAAAAAAAAAAA", chrono::Duration::zero()),
                Err(KeyError::NotFound { .. })
            ));
            assert!(matches!(
                m.rotate(&old.id, chrono::Duration::seconds(-1)),
                Err(KeyError::InvalidInput { field: "grace", .. })
            ));
        }
    }

    #[test]
    fn revoke_refuses_at_once_even_when_cached() {
        for (backend, m, _dir) in managers() {
            let (rec, token) = m.create("svc", &[], None, Map::new()).unwrap();
            m.verify(&token, None).unwrap();
            assert!(matches!(
                m.verify_cached(&token, Now::system()),
                CacheLookup::Hit(_)
            ));
            let revoked = m.revoke(&rec.id).unwrap();
            assert_eq!(revoked.status, KeyStatus::Revoked, "{backend}");
            assert!(matches!(
                m.verify_cached(&token, Now::system()),
                CacheLookup::Miss
            ));
            assert!(matches!(
                m.verify(&token, None),
                Err(VerifyError::Revoked { .. })
            ));
            let twice = m.revoke(&token).unwrap();
            assert_eq!(twice.revoked_at, revoked.revoked_at);
            assert!(matches!(
                m.revoke("fmg_key_AAAAAAAAAAAAAAAA"),
                Err(KeyError::NotFound { .. })
            ));
        }
    }

    #[test]
    fn expired_keys_are_refused() {
        for (backend, m, _dir) in managers() {
            let expires = Utc::now() + chrono::Duration::hours(1);
            let (rec, token) = m.create("svc", &[], Some(expires), Map::new()).unwrap();
            let now = Now::system();
            let key = m.verify_at(&token, None, now).unwrap();
            assert_eq!(
                key.valid_until,
                Some(rec.expires_at.unwrap().timestamp_millis())
            );
            let later = now.after(hours(2));
            assert!(
                matches!(m.verify_cached(&token, later), CacheLookup::Miss),
                "{backend}"
            );
            assert!(matches!(
                m.verify_at(&token, None, later),
                Err(VerifyError::Expired { .. })
            ));
            assert!(m
                .get(&rec.id)
                .unwrap()
                .is_expired_at(Utc::now() + chrono::Duration::hours(2)));
        }
    }

    #[test]
    fn throttle_is_per_client_and_key() {
        let m = KeyManager::memory(ManagerOptions {
            fail_throttle: FailThrottle {
                max_failures: 3,
                window: Duration::from_secs(60),
                ..FailThrottle::default()
            },
            ..opts()
        })
        .unwrap();
        let (a, a_token) = m.create("a", &[], None, Map::new()).unwrap();
        let (_, b_token) = m.create("b", &[], None, Map::new()).unwrap();
        let bad = wrong_secret(&a.id);
        let now = Now::system();
        for _ in 0..3 {
            assert!(matches!(
                m.verify_at(&bad, Some("6.6.6.6"), now),
                Err(VerifyError::BadSecret { .. })
            ));
        }
        let runs = m.stats().argon2_runs;
        let t = m.verify_at(&bad, Some("6.6.6.6"), now).unwrap_err();
        assert!(
            matches!(t, VerifyError::Throttled { retry_after, .. } if retry_after <= Duration::from_secs(60)),
            "{t}"
        );
        // The throttled pair is refused without argon2, even with the right secret.
        assert!(matches!(
            m.verify_at(&a_token, Some("6.6.6.6"), now),
            Err(VerifyError::Throttled { .. })
        ));
        assert_eq!(m.stats().argon2_runs, runs);
        // Another key from the same address, and the same key from another address, work.
        m.verify_at(&b_token, Some("6.6.6.6"), now).unwrap();
        m.verify_at(&a_token, Some("7.7.7.7"), now).unwrap();
        // Once cached, the valid token is served before the throttle is consulted.
        m.verify_at(&a_token, Some("6.6.6.6"), now).unwrap();
        // Once proven, its refresh (after the TTL) reads the record without argon2 and
        // without the throttle, from the throttled address too.
        m.clear_cache();
        let runs = m.stats().argon2_runs;
        m.verify_at(&a_token, Some("6.6.6.6"), now).unwrap();
        assert_eq!(m.stats().argon2_runs, runs);
        assert_eq!(m.stats().proof_refreshes, 1);
        // The wrong secret is still throttled; after the window the pair may try again.
        assert!(matches!(
            m.verify_at(&bad, Some("6.6.6.6"), now),
            Err(VerifyError::Throttled { .. })
        ));
        let later = now.after(Duration::from_secs(61));
        assert!(matches!(
            m.verify_at(&bad, Some("6.6.6.6"), later),
            Err(VerifyError::BadSecret { .. })
        ));
        assert!(m.stats().throttled >= 3);
    }

    #[test]
    fn last_used_is_written_in_batches() {
        for (backend, m, _dir) in managers() {
            let (a, a_token) = m.create("a", &[], None, Map::new()).unwrap();
            let (b, b_token) = m.create("b", &[], None, Map::new()).unwrap();
            let now = Now::system();
            m.verify_at(&a_token, Some("10.0.0.1"), now).unwrap();
            m.verify_at(&b_token, None, now).unwrap();
            // Later use of `a` from another address (past the 1 s sampling).
            let later = now.after(Duration::from_secs(2));
            assert!(matches!(
                m.verify_cached_from(&a_token, Some("10.0.0.2"), later),
                CacheLookup::Hit(_)
            ));
            assert_eq!(
                m.get(&a.id).unwrap().last_used_at,
                None,
                "{backend}: written before flush"
            );
            assert_eq!(m.stats().touch_batches, 0);
            assert_eq!(m.stats().pending_touches, 2);
            assert_eq!(m.flush().unwrap(), 2);
            let stats = m.stats();
            assert_eq!((stats.touch_batches, stats.touches_written), (1, 2));
            let a_now = m.get(&a.id).unwrap();
            assert_eq!(
                a_now.last_used_at.unwrap().timestamp_millis(),
                later.unix_ms
            );
            assert_eq!(a_now.last_used_ip.as_deref(), Some("10.0.0.2"));
            let b_now = m.get(&b.id).unwrap();
            assert_eq!(b_now.last_used_at.unwrap().timestamp_millis(), now.unix_ms);
            assert_eq!(b_now.last_used_ip, None);
            // Nothing pending: no transaction.
            assert_eq!(m.flush().unwrap(), 0);
            assert_eq!(m.stats().touch_batches, 1);
        }
    }

    #[test]
    fn background_thread_flushes_and_close_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let m = KeyManager::sqlite(
            &path,
            ManagerOptions {
                touch_interval: Duration::from_millis(20),
                ..opts()
            },
        )
        .unwrap();
        let (rec, token) = m.create("a", &[], None, Map::new()).unwrap();
        m.verify(&token, Some("::1")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while m.get(&rec.id).unwrap().last_used_at.is_none() {
            assert!(Instant::now() < deadline, "background flush never happened");
            std::thread::sleep(Duration::from_millis(10));
        }
        m.close().unwrap();
        m.close().unwrap();
        // Still usable after close.
        m.verify(&token, None).unwrap();
    }

    #[test]
    fn drop_flushes_pending_uses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let (id, token) = {
            let m = KeyManager::sqlite(&path, opts()).unwrap();
            let (rec, token) = m.create("a", &[], None, Map::new()).unwrap();
            m.verify(&token, Some("192.0.2.7")).unwrap();
            (rec.id, token)
        };
        let m = KeyManager::sqlite(&path, opts()).unwrap();
        let rec = m.get(&id).unwrap();
        assert_eq!(rec.last_used_ip.as_deref(), Some("192.0.2.7"));
        m.verify(&token, None).unwrap();
    }

    #[test]
    fn revoke_in_one_process_is_seen_by_another() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let a = KeyManager::sqlite(&path, opts()).unwrap();
        let b = KeyManager::sqlite(&path, opts()).unwrap();
        let (rec, token) = a.create("shared", &[], None, Map::new()).unwrap();
        b.verify(&token, None).unwrap();
        assert!(matches!(
            b.verify_cached(&token, Now::system()),
            CacheLookup::Hit(_)
        ));
        let start = Instant::now();
        a.revoke(&rec.id).unwrap();
        let deadline = start + Duration::from_secs(10);
        while matches!(b.verify_cached(&token, Now::system()), CacheLookup::Hit(_)) {
            assert!(
                Instant::now() < deadline,
                "revocation not seen by the other manager"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("cross-process revoke seen after {:?}", start.elapsed());
        assert!(matches!(
            b.verify(&token, None),
            Err(VerifyError::Revoked { .. })
        ));
    }

    #[test]
    fn managers_sharing_a_memory_backend_see_each_others_changes() {
        let backend = Arc::new(MemoryBackend::new());
        let a = KeyManager::with_backend(backend.clone(), opts()).unwrap();
        let b = KeyManager::with_backend(backend, opts()).unwrap();
        let (rec, token) = a.create("shared", &[], None, Map::new()).unwrap();
        b.verify(&token, None).unwrap();
        a.revoke(&rec.id).unwrap();
        assert_eq!(b.sync_changes().unwrap(), 1);
        assert!(matches!(
            b.verify_cached(&token, Now::system()),
            CacheLookup::Miss
        ));
    }

    #[test]
    fn cache_is_bounded() {
        let m = KeyManager::memory(ManagerOptions {
            cache_capacity: 2,
            ..opts()
        })
        .unwrap();
        let tokens: Vec<String> = (0..5)
            .map(|i| m.create(&format!("k{i}"), &[], None, Map::new()).unwrap().1)
            .collect();
        for t in &tokens {
            m.verify(t, None).unwrap();
            assert!(m.stats().cache_len <= 2);
        }
        assert_eq!(m.stats().cache_len, 2);
        assert_eq!(m.stats().argon2_runs, 5);
    }

    #[test]
    fn malformed_stored_hash_is_a_store_error() {
        let backend = Arc::new(MemoryBackend::new());
        let m = KeyManager::with_backend(backend.clone(), opts()).unwrap();
        let (mut rec, token) = m.create("a", &[], None, Map::new()).unwrap();
        rec.phc_hash = "not a hash".to_owned();
        // Re-insert under a fresh backend so the bad hash is what `verify` reads.
        let broken = Arc::new(MemoryBackend::new());
        broken.insert(&rec).unwrap();
        let m2 = KeyManager::with_backend(broken, opts()).unwrap();
        let err = m2.verify(&token, None).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::Store {
                    source: KeyError::Hash(HashError::Malformed { .. }),
                    ..
                }
            ),
            "{err}"
        );
        assert!(!err.to_string().contains(&token));
    }

    #[test]
    fn busy_when_no_argon2_slot_frees_up() {
        let m = KeyManager::memory(ManagerOptions {
            max_concurrent_verifications: 1,
            verify_wait: Duration::from_millis(5),
            ..opts()
        })
        .unwrap();
        let (rec, token) = m.create("a", &[], None, Map::new()).unwrap();
        let held = m.inner.pool.hold_one();
        let err = m.verify(&token, None).unwrap_err();
        assert!(
            matches!(err, VerifyError::Busy { ref key_id } if key_id.as_deref() == Some(rec.id.as_str())),
            "{err}"
        );
        assert_eq!(m.stats().busy, 1);
        assert_eq!(m.stats().argon2_runs, 0, "withdrawn, never run");
        drop(held);
        m.verify(&token, None).unwrap();
        assert_eq!(m.stats().argon2_runs, 1);
    }

    #[test]
    fn parallel_wrong_secrets_get_no_more_hash_runs_than_sequential_ones() {
        for threads in [30usize, 50] {
            let m = Arc::new(
                KeyManager::memory(ManagerOptions {
                    max_concurrent_verifications: 2,
                    verify_wait: Duration::from_secs(30),
                    ..opts()
                })
                .unwrap(),
            );
            let (rec, _) = m.create("victim", &[], None, Map::new()).unwrap();
            let barrier = Arc::new(std::sync::Barrier::new(threads));
            let handles: Vec<_> = (0..threads)
                .map(|i| {
                    let (m, barrier, bad) = (
                        Arc::clone(&m),
                        Arc::clone(&barrier),
                        wrong_secret_n(&rec.id, i),
                    );
                    std::thread::spawn(move || {
                        barrier.wait();
                        reason(&m.verify(&bad, Some("6.6.6.6")))
                    })
                })
                .collect();
            let reasons: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let max = FailThrottle::default().max_failures;
            assert_eq!(m.stats().argon2_runs, u64::from(max), "{threads} threads");
            let bad = reasons.iter().filter(|r| **r == "bad_secret").count();
            let throttled = reasons.iter().filter(|r| **r == "throttled").count();
            assert_eq!((bad, throttled), (max as usize, threads - max as usize));
        }
    }

    #[test]
    fn a_proven_token_is_never_locked_out_and_never_hashed_again() {
        let m = budgeted(3, 5, 8);
        let (rec, token) = m.create("svc", &[], None, Map::new()).unwrap();
        let now = Now::system();
        m.verify_at(&token, Some("10.0.0.1"), now).unwrap();
        // Every budget spent on this key id, from its own address and from others.
        for i in 0..40 {
            let addr = format!("10.0.{}.{}", i / 3, i % 3);
            let _ = m.verify_at(&wrong_secret_n(&rec.id, i), Some(&addr), now);
        }
        for addr in ["10.0.0.1", "10.0.0.2", "10.9.9.9"] {
            let r = m.verify_at(&wrong_secret_n(&rec.id, 99), Some(addr), now);
            assert_eq!(reason(&r), "throttled", "{addr}");
        }
        let (runs, reads) = (m.stats().argon2_runs, m.stats().store_reads);
        // Refreshes (the cache TTL passed: simulated by clearing it) re-read the record and
        // pass, from any address, with no hash run.
        for addr in ["10.0.0.1", "10.0.0.2", "10.9.9.9"] {
            m.clear_cache();
            m.verify_at(&token, Some(addr), now).unwrap();
        }
        let later = now.after(Duration::from_secs(3600));
        m.clear_cache();
        m.verify_at(&token, Some("10.0.0.1"), later).unwrap();
        assert_eq!(m.stats().argon2_runs, runs);
        assert_eq!(m.stats().proof_refreshes, 4);
        assert_eq!(m.stats().store_reads, reads + 4);
        // A proof admits nothing by itself: revocation still takes effect at once.
        m.revoke(&rec.id).unwrap();
        // Its holder is told so (not "throttled", which would have it retry), from the
        // address where the budgets are spent too: the proof still spares it the budgets.
        for addr in ["10.0.0.1", "10.9.9.9"] {
            assert!(matches!(
                m.verify_at(&token, Some(addr), later),
                Err(VerifyError::Revoked { .. })
            ));
        }
    }

    #[test]
    fn a_changed_stored_hash_voids_the_proof() {
        let (backend, m) = gated();
        let (_, token) = m.create("svc", &[], None, Map::new()).unwrap();
        m.verify(&token, None).unwrap();
        m.clear_cache();
        m.verify(&token, None).unwrap();
        assert_eq!((m.stats().argon2_runs, m.stats().proof_refreshes), (1, 1));
        // The record now holds another hash: argon2 decides again, and refuses.
        *backend.hash.lock() =
            Some(hashing::hash_secret("other", &HashParams::insecure_fast()).unwrap());
        m.clear_cache();
        assert!(matches!(
            m.verify(&token, None),
            Err(VerifyError::BadSecret { .. })
        ));
        assert_eq!(m.stats().argon2_runs, 2);
        *backend.hash.lock() = None;
        m.verify(&token, None).unwrap();
        assert_eq!(
            m.stats().argon2_runs,
            3,
            "the old proof is gone; proven anew"
        );
    }

    #[test]
    fn a_key_attacked_from_many_addresses_costs_at_most_twice_its_budget() {
        let (budget, addrs) = (20u32, 100);
        let m = budgeted(10, budget, 0);
        let (rec, _) = m.create("victim", &[], None, Map::new()).unwrap();
        let now = Now::system();
        // Round after round from every address, in order (each address's first attempt
        // comes after the budget is spent for most of them).
        let mut n = 0;
        for _round in 0..10 {
            for a in 0..addrs {
                n += 1;
                let _ = m.verify_at(
                    &wrong_secret_n(&rec.id, n),
                    Some(&format!("10.1.0.{a}")),
                    now,
                );
            }
        }
        let runs = m.stats().argon2_runs;
        assert!(runs <= u64::from(2 * budget), "{runs} runs");
        assert!(runs >= u64::from(budget), "{runs} runs");
        // The (unproven) token of that key, from an address that has not been failing, is
        // still checked... as long as first tries are left; from a failing address it waits.
        let m = budgeted(10, budget, 0);
        let (rec, token) = m.create("victim", &[], None, Map::new()).unwrap();
        for i in 0..budget as usize {
            let addr = format!("10.2.1.{}", i % 2);
            let _ = m.verify_at(&wrong_secret_n(&rec.id, i), Some(&addr), now);
        }
        assert_eq!(m.stats().argon2_runs, u64::from(budget));
        let _ = m.verify_at(&wrong_secret_n(&rec.id, 1000), Some("10.2.0.2"), now);
        let r = m.verify_at(&token, Some("10.2.0.2"), now);
        assert!(matches!(
            r,
            Err(VerifyError::Throttled {
                scope: ThrottleScope::Key,
                ..
            })
        ));
        m.verify_at(&token, Some("192.168.7.7"), now).unwrap();
    }

    #[test]
    fn the_server_budget_caps_failed_hash_runs_across_keys() {
        let m = budgeted(0, 0, 6);
        let now = Now::system();
        let keys: Vec<_> = (0..4)
            .map(|i| m.create(&format!("k{i}"), &[], None, Map::new()).unwrap())
            .collect();
        // 20 clean addresses: 6 failures within the budget, then 6 first tries.
        for (i, (rec, _)) in keys.iter().cycle().take(20).enumerate() {
            let _ = m.verify_at(
                &wrong_secret_n(&rec.id, i),
                Some(&format!("10.3.0.{i}")),
                now,
            );
        }
        assert_eq!(m.stats().argon2_runs, 12, "2 x the server budget");
        let err = m.verify_at(&keys[0].1, Some("10.4.0.1"), now).unwrap_err();
        assert!(
            matches!(err, VerifyError::Throttled { scope: ThrottleScope::Server, retry_after, .. }
                if retry_after <= Duration::from_secs(60)),
            "{err}"
        );
        assert!(err.to_string().contains("on this server"), "{err}");
        // Successes never use it up: a proven token passes meanwhile.
        let m = budgeted(0, 0, 1);
        let (_, token) = m.create("ok", &[], None, Map::new()).unwrap();
        for _ in 0..5 {
            m.clear_cache();
            m.verify_at(&token, None, now).unwrap();
        }
    }

    #[test]
    fn failures_from_one_address_across_keys_never_refuse_another_networks_first_try() {
        // The default budgets: 10 per (address, key id), 600 per server.
        let m = KeyManager::memory(opts()).unwrap();
        let now = Now::system();
        let keys: Vec<_> = (0..60)
            .map(|i| m.create(&format!("k{i}"), &[], None, Map::new()).unwrap().0)
            .collect();
        let mut bad = 0;
        for (k, rec) in keys.iter().enumerate() {
            for i in 0..10 {
                let r = m.verify_at(&wrong_secret_n(&rec.id, k * 10 + i), Some("10.6.0.1"), now);
                bad += usize::from(reason(&r) == "bad_secret");
            }
        }
        assert_eq!(bad, 600, "the server budget is spent");
        let r = m.verify_at(&wrong_secret_n(&keys[0].id, 9999), Some("10.6.0.1"), now);
        assert_eq!(reason(&r), "throttled");
        // A brand-new key from another address verifies (a first try)...
        let (new, token) = m.create("new", &[], None, Map::new()).unwrap();
        assert_eq!(
            m.verify_at(&token, Some("10.7.0.1"), now).unwrap().key_id,
            new.id
        );
        // ...and so does an attacked key's own unproven token, from IPv6 too.
        let (_, victim) = m.create("victim", &[], None, Map::new()).unwrap();
        m.verify_at(&victim, Some("2001:db8:aa::1"), now).unwrap();
    }

    #[test]
    fn unknown_ids_are_remembered_briefly_and_forgotten_when_the_key_appears() {
        let backend = Arc::new(MemoryBackend::new());
        let quiet = ManagerOptions {
            background_thread: false,
            ..opts()
        };
        let a =
            KeyManager::with_backend(Arc::clone(&backend) as Arc<dyn KeyBackend>, opts()).unwrap();
        let b =
            KeyManager::with_backend(Arc::clone(&backend) as Arc<dyn KeyBackend>, quiet).unwrap();
        let (unknown, _) = tokens::generate().unwrap();
        let now = Now::system();
        for _ in 0..50 {
            assert!(matches!(
                b.verify_at(&unknown, Some("10.0.0.1"), now),
                Err(VerifyError::UnknownKey { .. })
            ));
        }
        assert_eq!(b.stats().store_reads, 1);
        assert_eq!(b.stats().negative_hits, 49);
        assert_eq!(b.stats().throttled, 0, "an unknown id is not a failure");
        // After the TTL, the store is asked again.
        let later = now.after(DEFAULT_NEGATIVE_TTL);
        let _ = b.verify_at(&unknown, None, later);
        assert_eq!(b.stats().store_reads, 2);
        // Another node creates the key: b sees the change and verifies it at once.
        let (rec, token) = a.create("k", &[], None, Map::new()).unwrap();
        let id_of = |t: &str| tokens::parse(t).unwrap().key_id();
        b.inner.negative.insert(&id_of(&token), later.instant);
        b.sync_changes().unwrap();
        assert_eq!(b.verify_at(&token, None, later).unwrap().key_id, rec.id);
        // So does a change notification (PostgreSQL NOTIFY, Redis pub/sub), and a creation
        // on this node.
        let (_, token2) = a.create("k2", &[], None, Map::new()).unwrap();
        b.inner.negative.insert(&id_of(&token2), later.instant);
        b.invalidate(&id_of(&token2));
        b.verify_at(&token2, None, later).unwrap();
        b.inner
            .negative
            .insert("fmg_key_AAAAAAAAAAAAAAAA", later.instant);
        let (mine, _) = b.create("mine", &[], None, Map::new()).unwrap();
        assert!(!b.inner.negative.contains(&mine.id, later.instant));
        assert!(b
            .inner
            .negative
            .contains("fmg_key_AAAAAAAAAAAAAAAA", later.instant));
    }

    #[test]
    fn a_network_naming_many_unknown_ids_is_refused_before_the_store_for_those_only() {
        let backend = Arc::new(MemoryBackend::new());
        let quiet = ManagerOptions {
            background_thread: false,
            ..opts()
        };
        let elsewhere =
            KeyManager::with_backend(Arc::clone(&backend) as Arc<dyn KeyBackend>, quiet.clone())
                .unwrap();
        let (colleague, colleague_token) = elsewhere
            .create("made before", &[], None, Map::new())
            .unwrap();
        // 20 unknown ids per network and minute.
        let m =
            KeyManager::with_backend(Arc::clone(&backend) as Arc<dyn KeyBackend>, quiet).unwrap();
        assert_eq!(m.stats().known_ids, 1, "loaded when it started");
        let (_, token) = m.create("k", &[], None, Map::new()).unwrap();
        let now = Now::system();
        for _ in 0..25 {
            let (unknown, _) = tokens::generate().unwrap();
            let _ = m.verify_at(&unknown, Some("10.5.0.1"), now);
        }
        assert_eq!(m.stats().store_reads, 20);
        let (unknown, _) = tokens::generate().unwrap();
        let err = m.verify_at(&unknown, Some("10.5.0.1"), now).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::Throttled {
                    scope: ThrottleScope::UnknownKeys,
                    retry_after,
                    ..
                } if retry_after <= Duration::from_secs(1)
            ),
            "{err}"
        );
        assert!(err.to_string().contains("unknown key ids"), "{err}");
        assert_eq!(m.stats().store_reads, 20);
        // Keys that exist are never refused by it: made here, or before this node started.
        m.verify_at(&token, Some("10.5.0.1"), now).unwrap();
        m.verify_at(&colleague_token, Some("10.5.0.1"), now)
            .unwrap();
        assert_eq!(
            colleague.id,
            m.verify_at(&colleague_token, None, now).unwrap().key_id
        );
        // Made on another node after the flood: refused until this node sees the change.
        let (later, later_token) = elsewhere
            .create("made after", &[], None, Map::new())
            .unwrap();
        let err = m
            .verify_at(&later_token, Some("10.5.0.1"), now)
            .unwrap_err();
        assert!(matches!(err, VerifyError::Throttled { .. }), "{err}");
        m.sync_changes().unwrap();
        assert_eq!(
            m.verify_at(&later_token, Some("10.5.0.1"), now)
                .unwrap()
                .key_id,
            later.id
        );
        // A change notification does the same.
        let (noted, noted_token) = elsewhere.create("notified", &[], None, Map::new()).unwrap();
        m.invalidate(&noted.id);
        m.verify_at(&noted_token, Some("10.5.0.1"), now).unwrap();
        assert_eq!(m.stats().known_ids, 4);
        // Past the capacity of known ids the budget no longer applies.
        let full = KeyManager::memory(ManagerOptions {
            known_ids_capacity: 0,
            ..opts()
        })
        .unwrap();
        for _ in 0..25 {
            let (unknown, _) = tokens::generate().unwrap();
            let r = full.verify_at(&unknown, Some("10.5.0.1"), now);
            assert!(matches!(r, Err(VerifyError::UnknownKey { .. })));
        }
    }

    #[test]
    fn revoking_a_key_revokes_its_predecessors_still_in_grace() {
        for (backend, m, _dir) in managers() {
            let (k0, t0) = m.create("svc", &[], None, Map::new()).unwrap();
            let (k1, t1) = m.rotate(&k0.id, chrono::Duration::hours(24)).unwrap();
            let (k2, t2) = m.rotate(&k1.id, chrono::Duration::hours(1)).unwrap();
            let (k3, t3) = m.rotate(&k2.id, chrono::Duration::hours(1)).unwrap();
            for t in [&t0, &t1, &t2, &t3] {
                m.verify(t, None).unwrap();
            }
            // k2's grace ends (revoked by time): the walk passes it and still reaches k1, k0.
            let mut k2_now = m.get(&k2.id).unwrap();
            k2_now.grace_until = Some(now_utc() - chrono::Duration::seconds(1));
            m.inner.backend.update(&k2_now).unwrap();
            m.invalidate(&k2.id);
            let done = m.revoke_lineage(&k3.id).unwrap();
            assert_eq!(done.key.status, KeyStatus::Revoked, "{backend}");
            let ids: Vec<_> = done.predecessors.iter().map(|r| r.id.as_str()).collect();
            assert_eq!(ids, [k1.id.as_str(), k0.id.as_str()], "{backend}");
            for t in [&t0, &t1, &t2, &t3] {
                assert!(m.verify(t, None).is_err(), "{backend}");
            }
            for id in [&k0.id, &k1.id, &k3.id] {
                assert_eq!(
                    m.get(id).unwrap().status,
                    KeyStatus::Revoked,
                    "{backend} {id}"
                );
            }
            assert_eq!(m.get(&k2.id).unwrap().status, KeyStatus::Rotating);
            // Revoking again: nothing more to do.
            let again = m.revoke_lineage(&k3.id).unwrap();
            assert!(again.predecessors.is_empty());
            assert_eq!(again.key.revoked_at, done.key.revoked_at);
            // A key revoked earlier (before this rule) still takes its predecessors along.
            let (a0, ta0) = m.create("old", &[], None, Map::new()).unwrap();
            let (a1, _) = m.rotate(&a0.id, chrono::Duration::hours(1)).unwrap();
            m.revoke_one(&a1.id).unwrap();
            m.verify(&ta0, None).unwrap();
            let done = m.revoke_lineage(&a1.id).unwrap();
            assert_eq!(done.predecessors.len(), 1);
            assert!(m.verify(&ta0, None).is_err());
            // A successor is never touched.
            let (b0, _) = m.create("b", &[], None, Map::new()).unwrap();
            let (_, tb1) = m.rotate(&b0.id, chrono::Duration::hours(1)).unwrap();
            assert!(m.revoke_lineage(&b0.id).unwrap().predecessors.is_empty());
            m.verify(&tb1, None).unwrap();
        }
    }

    #[test]
    fn a_key_can_be_created_already_expired_when_asked() {
        let m = KeyManager::memory(opts()).unwrap();
        let past = Utc::now() - chrono::Duration::days(1);
        assert!(matches!(
            m.create("k", &[], Some(past), Map::new()),
            Err(KeyError::InvalidInput {
                field: "expires_at",
                ..
            })
        ));
        let (rec, token) = m
            .create_allowing_past_expiry("k", &[], Some(past), Map::new())
            .unwrap();
        assert!(rec.is_expired_at(Utc::now()));
        assert!(matches!(
            m.verify(&token, None),
            Err(VerifyError::Expired { .. })
        ));
        assert_eq!(m.stats().argon2_runs, 0, "refused before hashing");
    }

    // -- verifications in flight while keys change ----------------------------------------

    /// A memory backend whose next read of one key (by id, or by 0.2 selector) stops after
    /// reading the record: it reports the read, then waits for the test to let it return.
    /// What the test does meanwhile happens while that verification is in flight.
    ///
    /// Its reads can also report another stored hash than the one written (`hash`), as a
    /// restore of another key's record under the same id would.
    #[derive(Default)]
    struct GatedBackend {
        inner: MemoryBackend,
        gate: Mutex<Option<Gate>>,
        hash: Mutex<Option<String>>,
    }

    struct Gate {
        key: String,
        read: crossbeam_channel::Sender<()>,
        release: crossbeam_channel::Receiver<()>,
    }

    impl GatedBackend {
        fn pass(&self, key: &str) {
            let gate = {
                let mut g = self.gate.lock();
                if g.as_ref().is_some_and(|g| g.key == key) {
                    g.take()
                } else {
                    None
                }
            };
            if let Some(g) = gate {
                g.read.send(()).unwrap();
                g.release.recv().unwrap();
            }
        }
    }

    impl KeyBackend for GatedBackend {
        fn insert(&self, record: &KeyRecord) -> Result<u64, KeyError> {
            self.inner.insert(record)
        }
        fn get(&self, id: &str) -> Result<Option<KeyRecord>, KeyError> {
            let mut found = self.inner.get(id);
            if let (Ok(Some(r)), Some(h)) = (found.as_mut(), self.hash.lock().as_ref()) {
                r.phc_hash.clone_from(h);
            }
            self.pass(id);
            found
        }
        fn get_by_legacy_selector(&self, selector: &str) -> Result<Option<KeyRecord>, KeyError> {
            let found = self.inner.get_by_legacy_selector(selector);
            self.pass(selector);
            found
        }
        fn list(&self, include_revoked: bool) -> Result<Vec<KeyRecord>, KeyError> {
            self.inner.list(include_revoked)
        }
        fn update(&self, record: &KeyRecord) -> Result<u64, KeyError> {
            self.inner.update(record)
        }
        fn rotate(&self, old: &KeyRecord, new: &KeyRecord) -> Result<(u64, u64), KeyError> {
            self.inner.rotate(old, new)
        }
        fn touch_many(&self, touches: &[Touch]) -> Result<(), KeyError> {
            self.inner.touch_many(touches)
        }
        fn current_revision(&self) -> Result<u64, KeyError> {
            self.inner.current_revision()
        }
        fn changed_since(&self, revision: u64) -> Result<(u64, Vec<Change>), KeyError> {
            self.inner.changed_since(revision)
        }
    }

    /// Verifies `token` on `m` while `during` runs: `m`'s store read for `key` (an id or a
    /// 0.2 selector) has returned the record and argon2 (or bcrypt) has not run yet.
    fn verify_while(
        m: &KeyManager,
        backend: &GatedBackend,
        token: &str,
        key: &str,
        during: impl FnOnce(),
    ) -> Result<Arc<CachedKey>, VerifyError> {
        let (read, read_rx) = crossbeam_channel::bounded(1);
        let (release_tx, release) = crossbeam_channel::bounded(1);
        *backend.gate.lock() = Some(Gate {
            key: key.to_owned(),
            read,
            release,
        });
        std::thread::scope(|s| {
            let verification = s.spawn(|| m.verify(token, None));
            read_rx.recv().unwrap();
            during();
            release_tx.send(()).unwrap();
            verification.join().unwrap()
        })
    }

    /// A manager over `backend` without the background thread (changes by other managers
    /// are read by `sync_changes`).
    fn manager_on(backend: &Arc<GatedBackend>) -> KeyManager {
        let quiet = ManagerOptions {
            background_thread: false,
            ..opts()
        };
        KeyManager::with_backend(Arc::clone(backend) as Arc<dyn KeyBackend>, quiet).unwrap()
    }

    fn gated() -> (Arc<GatedBackend>, KeyManager) {
        let backend = Arc::new(GatedBackend::default());
        let m = manager_on(&backend);
        (backend, m)
    }

    fn is_hit(m: &KeyManager, token: &str) -> bool {
        matches!(m.verify_cached(token, Now::system()), CacheLookup::Hit(_))
    }

    #[test]
    fn changes_to_other_keys_during_a_verification_do_not_stop_it_caching() {
        let (backend, m) = gated();
        let (a, token_a) = m.create("a", &[], None, Map::new()).unwrap();
        let (b, _) = m.create("b", &[], None, Map::new()).unwrap();
        let (c, _) = m.create("c", &[], None, Map::new()).unwrap();
        let (d, _) = m.create("d", &[], None, Map::new()).unwrap();
        let key = verify_while(&m, &backend, &token_a, &a.id, || {
            m.revoke(&b.id).unwrap();
            m.rotate(&c.id, chrono::Duration::zero()).unwrap();
            m.invalidate(&d.id); // a change notice from another node
        })
        .unwrap();
        assert_eq!(key.key_id, a.id);
        assert!(
            is_hit(&m, &token_a),
            "cached despite the other keys' changes"
        );
        m.verify(&token_a, None).unwrap();
        assert_eq!(m.stats().argon2_runs, 1);
    }

    #[test]
    fn another_nodes_change_to_another_key_during_a_verification_does_not_stop_it_caching() {
        let (backend, here) = gated();
        let there = manager_on(&backend);
        let (a, token_a) = there.create("a", &[], None, Map::new()).unwrap();
        let (b, _) = there.create("b", &[], None, Map::new()).unwrap();
        here.sync_changes().unwrap(); // the creations
        verify_while(&here, &backend, &token_a, &a.id, || {
            there.revoke(&b.id).unwrap();
            assert_eq!(here.sync_changes().unwrap(), 1);
        })
        .unwrap();
        assert!(is_hit(&here, &token_a));
        // The same change to the key being verified does stop it.
        here.clear_cache();
        verify_while(&here, &backend, &token_a, &a.id, || {
            there.revoke(&a.id).unwrap();
            assert_eq!(here.sync_changes().unwrap(), 1);
        })
        .unwrap();
        assert!(!is_hit(&here, &token_a));
        assert!(matches!(
            here.verify(&token_a, None),
            Err(VerifyError::Revoked { .. })
        ));
    }

    #[test]
    fn a_key_revoked_during_its_verification_is_not_cached() {
        let (backend, m) = gated();
        let (a, token_a) = m.create("a", &[], None, Map::new()).unwrap();
        // The verification read the record before the revocation: this request is admitted,
        // the next one is not.
        verify_while(&m, &backend, &token_a, &a.id, || {
            m.revoke(&a.id).unwrap();
        })
        .unwrap();
        assert!(!is_hit(&m, &token_a));
        assert!(matches!(
            m.verify(&token_a, None),
            Err(VerifyError::Revoked { .. })
        ));
        // A change notice (from another node) for the key in flight stops it as well.
        let (e, token_e) = m.create("e", &[], None, Map::new()).unwrap();
        verify_while(&m, &backend, &token_e, &e.id, || m.invalidate(&e.id)).unwrap();
        assert!(!is_hit(&m, &token_e));
    }

    #[test]
    fn clear_cache_during_a_verification_stops_it_caching() {
        let (backend, m) = gated();
        let (a, token_a) = m.create("a", &[], None, Map::new()).unwrap();
        verify_while(&m, &backend, &token_a, &a.id, || m.clear_cache()).unwrap();
        assert!(!is_hit(&m, &token_a));
        m.verify(&token_a, None).unwrap();
        assert!(is_hit(&m, &token_a));
        // The second verification re-read the record; the digest was proven already.
        assert_eq!(m.stats().argon2_runs, 1);
        assert_eq!(m.stats().proof_refreshes, 1);
    }

    #[test]
    fn legacy_verifications_in_flight_are_stopped_by_changes_to_their_key_only() {
        // A 0.2 token names its key by a selector: the key id is known only from the store.
        let (k, other) = (Key02::new("k"), Key02::new("other"));
        let (backend, m) = gated();
        for key in [&k, &other] {
            backend.inner.insert(&key.to_row_record()).unwrap();
        }
        verify_while(&m, &backend, &k.token, &k.selector, || {
            m.revoke(&other.id).unwrap();
        })
        .unwrap();
        assert!(is_hit(&m, &k.token));
        assert_eq!(m.stats().bcrypt_runs, 1);
        m.clear_cache();
        verify_while(&m, &backend, &k.token, &k.selector, || m.invalidate(&k.id)).unwrap();
        assert!(!is_hit(&m, &k.token));
        verify_while(&m, &backend, &k.token, &k.selector, || {
            m.revoke(&k.id).unwrap();
        })
        .unwrap();
        assert!(!is_hit(&m, &k.token));
        assert!(matches!(
            m.verify(&k.token, None),
            Err(VerifyError::Revoked { .. })
        ));
    }

    #[test]
    fn legacy_token_verifies_once_with_bcrypt_then_from_the_cache() {
        let k = Key02::new("alice");
        for (backend, m, _dir) in both_02(&[&k]) {
            let now = Now::system();
            assert!(
                matches!(m.verify_cached(&k.token, now), CacheLookup::Miss),
                "{backend}"
            );
            let key = m.verify_at(&k.token, Some("10.0.0.9"), now).unwrap();
            assert_eq!(key.key_id, k.id, "{backend}");
            assert_eq!(key.name, "alice");
            assert_eq!(&*key.scopes, ["read:data"]);
            assert_eq!(key.metadata["team"], "ops");
            assert_eq!(key.valid_until, None);
            match m.verify_cached(&k.token, now) {
                CacheLookup::Hit(hit) => assert!(Arc::ptr_eq(&hit, &key)),
                other => panic!("{backend}: {other:?}"),
            }
            m.verify_at(&k.token, None, now).unwrap();
            let stats = m.stats();
            assert_eq!((stats.bcrypt_runs, stats.argon2_runs), (1, 0), "{backend}");
            assert_eq!(stats.store_reads, 1);
            // The use is recorded like any other.
            m.flush().unwrap();
            let rec = m.get(&k.id).unwrap();
            assert_eq!(rec.last_used_ip.as_deref(), Some("10.0.0.9"), "{backend}");
        }
    }

    #[test]
    fn legacy_wrong_or_unknown_tokens_are_refused() {
        let k = Key02::new("alice");
        for (backend, m, _dir) in both_02(&[&k]) {
            // Same selector, another secret: bcrypt says no.
            let mut forged = k.token.clone();
            let last = if forged.ends_with('A') { "B" } else { "A" };
            forged.replace_range(66.., last);
            let err = m.verify(&forged, Some("1.2.3.4")).unwrap_err();
            assert!(
                matches!(err, VerifyError::BadSecret { ref key_id } if *key_id == k.id),
                "{backend}: {err}"
            );
            // Unknown selector: named by the token's public part, not the token.
            let (other, sel) = tokens::generate_legacy().unwrap();
            let err = m.verify(&other, None).unwrap_err();
            assert!(
                matches!(err, VerifyError::UnknownKey { ref key_id }
                    if *key_id == format!("fmg_sk_{sel}")),
                "{backend}: {err}"
            );
            assert!(!err.to_string().contains(&other[24..]), "{err}");
            // Malformed 0.2-looking tokens are refused before any lookup.
            assert!(matches!(
                m.verify(&k.token[..60], None),
                Err(VerifyError::Malformed(TokenError::Length {
                    expected: 67,
                    ..
                }))
            ));
            assert!(matches!(
                m.verify_cached(&k.token.replace('.', "_"), Now::system()),
                CacheLookup::Malformed(_)
            ));
            // A current-format token naming the imported key's id is refused without hashing.
            let kid = &k.id[tokens::KEY_ID_PREFIX.len()..];
            let current = tokens::from_parts(kid, &"q".repeat(tokens::SECRET_LEN)).unwrap();
            let err = m.verify(&current, None).unwrap_err();
            assert!(matches!(err, VerifyError::BadSecret { .. }), "{err}");
            let stats = m.stats();
            assert_eq!((stats.bcrypt_runs, stats.argon2_runs), (1, 0), "{backend}");
            assert_eq!(stats.store_reads, 3);
        }
    }

    #[test]
    fn legacy_lifecycle_rules_apply() {
        let now = Utc::now();
        let mut revoked = Key02::new("revoked");
        revoked.status = "revoked";
        let mut expired = Key02::new("expired");
        expired.expires_at = Some(iso(now - chrono::Duration::minutes(1)));
        let mut grace_over = Key02::new("grace over");
        grace_over.status = "rotating";
        grace_over.grace_until = Some(iso(now - chrono::Duration::seconds(1)));
        let mut in_grace = Key02::new("in grace");
        in_grace.status = "rotating";
        in_grace.grace_until = Some(iso(now + chrono::Duration::hours(1)));
        let keys = [&revoked, &expired, &grace_over, &in_grace];
        for (backend, m, _dir) in both_02(&keys) {
            assert!(
                matches!(
                    m.verify(&revoked.token, None),
                    Err(VerifyError::Revoked { .. })
                ),
                "{backend}"
            );
            assert!(matches!(
                m.verify(&expired.token, None),
                Err(VerifyError::Expired { .. })
            ));
            assert!(matches!(
                m.verify(&grace_over.token, None),
                Err(VerifyError::Revoked { .. })
            ));
            // Refused on status alone: bcrypt never ran for those three.
            assert_eq!(m.stats().bcrypt_runs, 0, "{backend}");
            let t = Now::system();
            let key = m.verify_at(&in_grace.token, None, t).unwrap();
            let grace_ms = legacy::parse_time(in_grace.grace_until.as_deref().unwrap())
                .unwrap()
                .timestamp_millis();
            assert_eq!(key.valid_until, Some(grace_ms));
            let after = t.after(hours(2));
            assert!(matches!(
                m.verify_cached(&in_grace.token, after),
                CacheLookup::Miss
            ));
            assert!(matches!(
                m.verify_at(&in_grace.token, None, after),
                Err(VerifyError::Revoked { .. })
            ));
        }
    }

    #[test]
    fn legacy_failures_are_throttled_per_client_and_key() {
        let k = Key02::new("alice");
        let backend = Arc::new(MemoryBackend::new());
        backend.insert(&k.to_row_record()).unwrap();
        let m = KeyManager::with_backend(
            backend,
            ManagerOptions {
                fail_throttle: FailThrottle {
                    max_failures: 2,
                    window: Duration::from_secs(60),
                    ..FailThrottle::default()
                },
                ..opts()
            },
        )
        .unwrap();
        let mut forged = k.token.clone();
        forged.replace_range(30..31, if &forged[30..31] == "x" { "y" } else { "x" });
        let now = Now::system();
        for _ in 0..2 {
            assert!(matches!(
                m.verify_at(&forged, Some("6.6.6.6"), now),
                Err(VerifyError::BadSecret { .. })
            ));
        }
        let runs = m.stats().bcrypt_runs;
        let err = m.verify_at(&k.token, Some("6.6.6.6"), now).unwrap_err();
        assert!(
            matches!(err, VerifyError::Throttled { ref key_id, .. }
                if key_id.starts_with("fmg_sk_")),
            "{err}"
        );
        assert_eq!(m.stats().bcrypt_runs, runs);
        m.verify_at(&k.token, Some("7.7.7.7"), now).unwrap();
    }

    #[test]
    fn legacy_keys_can_be_found_revoked_and_rotated() {
        let a = Key02::new("a");
        let b = Key02::new("b");
        for (backend, m, _dir) in both_02(&[&a, &b]) {
            // Found by id, by the 0.2 token, and by its public part.
            for name in [a.id.as_str(), &a.token, &a.token[..23], &a.token[..24]] {
                assert_eq!(m.get(name).unwrap().id, a.id, "{backend} {name}");
            }
            let unknown = m.get(&tokens::generate_legacy().unwrap().0).unwrap_err();
            assert!(matches!(unknown, KeyError::NotFound { .. }), "{unknown}");
            assert!(!unknown.to_string().contains("fmg_sk_"), "{unknown}");

            // Revoke by token: refused at once, even cached.
            m.verify(&a.token, None).unwrap();
            let rec = m.revoke(&a.token).unwrap();
            assert_eq!(
                (rec.id.as_str(), rec.status),
                (a.id.as_str(), KeyStatus::Revoked)
            );
            assert!(matches!(
                m.verify_cached(&a.token, Now::system()),
                CacheLookup::Miss
            ));
            assert!(matches!(
                m.verify(&a.token, None),
                Err(VerifyError::Revoked { .. })
            ));

            // Rotate: the new key is ours (current token, argon2id); the old token works
            // through the grace period.
            let (new, new_token) = m.rotate(&b.id, chrono::Duration::hours(1)).unwrap();
            assert!(tokens::parse(&new_token).is_ok(), "{backend}");
            assert!(new.phc_hash.starts_with("$argon2id$"));
            assert_eq!(new.legacy_selector, None);
            assert_eq!(new.rotated_from.as_deref(), Some(b.id.as_str()));
            assert_eq!(
                (&new.name, &new.scopes),
                (&"b".to_owned(), &scopes(&["read:data"]))
            );
            let old = m.get(&b.id).unwrap();
            assert_eq!(old.status, KeyStatus::Rotating);
            assert_eq!(old.phc_hash, b.hash);
            assert_eq!(old.legacy_selector.as_deref(), Some(b.selector.as_str()));
            assert_eq!(m.verify(&b.token, None).unwrap().key_id, b.id);
            assert_eq!(m.verify(&new_token, None).unwrap().key_id, new.id);
            let stats = m.stats();
            assert_eq!((stats.bcrypt_runs, stats.argon2_runs), (2, 1), "{backend}");
        }
    }

    #[test]
    fn legacy_tokens_are_never_stored() {
        let k = Key02::new("alice");
        let (m, dir) = manager_02(&[&k]);
        m.verify(&k.token, Some("10.1.1.1")).unwrap();
        let (_, new_token) = m.rotate(&k.id, chrono::Duration::hours(1)).unwrap();
        m.verify(&k.token, None).unwrap();
        m.flush().unwrap();
        m.close().unwrap();
        drop(m);
        let bytes = store_bytes(dir.path());
        // The 0.2 file itself held only the bcrypt hash; neither we nor the import add
        // the token or its secret anywhere.
        assert!(
            contains(&bytes, k.hash.as_bytes()),
            "the bcrypt hash is kept"
        );
        assert!(contains(&bytes, k.selector.as_bytes()));
        for secret in [&k.token[24..], &k.token[30..50], &new_token[23..66]] {
            assert!(!contains(&bytes, secret.as_bytes()), "a secret was stored");
        }
    }

    #[test]
    fn keys_added_by_0_2_after_the_switch_need_an_explicit_import() {
        let k = Key02::new("early");
        let (m, dir) = manager_02(&[&k]);
        let late = Key02::new("late");
        late.insert(&rusqlite::Connection::open(dir.path().join("keys.db")).unwrap());
        assert!(matches!(
            m.verify(&late.token, None),
            Err(VerifyError::UnknownKey { .. })
        ));
        let report = m.import_legacy().unwrap();
        assert_eq!(
            (report.found, report.imported, report.already_imported),
            (2, 1, 1)
        );
        assert_eq!(m.verify(&late.token, None).unwrap().key_id, late.id);
        assert_eq!(
            KeyManager::memory(opts()).unwrap().import_legacy().unwrap(),
            LegacyImport::default()
        );
    }

    #[test]
    fn legacy_labels_are_known_from_the_start_an_import_and_another_nodes_import() {
        let early = Key02::new("early");
        let (a, dir) = manager_02(&[&early]);
        let path = dir.path().join("keys.db");
        let quiet = ManagerOptions {
            background_thread: false,
            ..opts()
        };
        let b = KeyManager::sqlite(&path, quiet).unwrap();
        // An id and a 0.2 label per key, read when the manager starts.
        assert_eq!(b.stats().known_ids, 2);
        let label = |k: &Key02| format!("{}{}", tokens::TOKEN_PREFIX, k.selector);
        assert!(b.inner.known.may_exist(&label(&early)));
        assert!(b.inner.known.may_exist(&early.id));
        // Added to the 0.2 file later and imported by node a: a knows it at once, b when
        // its watcher sees the import (its record read once for the label).
        let late = Key02::new("late");
        late.insert(&rusqlite::Connection::open(&path).unwrap());
        a.import_legacy().unwrap();
        assert!(a.inner.known.may_exist(&label(&late)));
        assert!(!b.inner.known.may_exist(&label(&late)));
        let reads = b.stats().store_reads;
        b.sync_changes().unwrap();
        assert!(b.inner.known.may_exist(&late.id));
        assert!(b.inner.known.may_exist(&label(&late)));
        assert_eq!(b.stats().known_ids, 4);
        assert_eq!(
            b.stats().store_reads,
            reads,
            "the watcher's read is not a verification"
        );
        assert_eq!(b.last_background_error(), None);
    }

    #[test]
    fn a_legacy_key_revoked_by_another_process_is_refused_here() {
        let k = Key02::new("shared");
        let (a, dir) = manager_02(&[&k]);
        let b = KeyManager::sqlite(dir.path().join("keys.db"), opts()).unwrap();
        b.verify(&k.token, None).unwrap();
        a.revoke(&k.id).unwrap();
        assert_eq!(b.sync_changes().unwrap(), 1);
        assert!(matches!(
            b.verify(&k.token, None),
            Err(VerifyError::Revoked { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn legacy_shaped_garbage_never_panics(
            sel in "[0-9a-fA-F.]{0,20}",
            secret in "[A-Za-z0-9_+/=.é-]{0,50}",
        ) {
            thread_local! {
                static M: KeyManager = memory_02(&[&Key02::new("p")]);
            }
            M.with(|m| {
                let t = format!("fmg_sk_{sel}.{secret}");
                let _ = m.verify(&t, Some("fuzz"));
                let _ = m.verify_cached(&t, Now::system());
                let _ = m.get(&t);
                let _ = m.revoke(&format!("fmg_sk_{sel}"));
            });
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn verify_never_panics(s in ".*", prefixed in "[0-9A-Za-z_é]{50,80}") {
            thread_local! {
                static M: (KeyManager, String) = {
                    let m = KeyManager::memory(opts()).unwrap();
                    let (rec, _) = m.create("p", &[], None, Map::new()).unwrap();
                    (m, rec.id)
                };
            }
            M.with(|(m, id)| {
                prop_assert!(m.verify(&s, Some("fuzz")).is_err());
                let t = format!("fmg_sk_{prefixed}");
                prop_assert!(m.verify(&t, None).is_err());
                let _ = m.verify_cached(&t, Now::system());
                let _ = m.get(&s);
                let _ = m.revoke(&t);
                // A well-formed token for an existing key with a random secret is refused.
                let kid = &id[tokens::KEY_ID_PREFIX.len()..];
                let secret: String = prefixed.chars().filter(char::is_ascii_alphanumeric)
                    .chain(std::iter::repeat('a')).take(tokens::SECRET_LEN).collect();
                let forged = tokens::from_parts(kid, &secret).unwrap();
                prop_assert!(m.verify(&forged, Some("fuzz2")).is_err());
                Ok(())
            })?;
        }
    }
}
