//! [`KeyManager`], the key service: its state ([`Inner`] shared with the background
//! thread), construction, and the lifecycle operations (create, get, list, rotate, revoke,
//! import), the cache controls, close and [`ManagerStats`].
//!
//! Verification is in [`verify`](super::verify); the batched writes of key uses and the
//! watch for other processes' changes in [`worker`](super::worker).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use parking_lot::Mutex;
use serde_json::{Map, Value};

use crate::hashing::{HashError, HashPool, PoolError, ProvenDigests, TokenDigest, VerifiedCache};
use crate::tokens;

use super::record::{now_utc, truncate_ms};
use super::validate::{echo_id, resolve_id, validate_name, validate_scopes};
use super::worker::{run_worker, PendingTouch, Worker};
use super::{
    known, negative, throttle, CreditChange, CreditLease, Credits, KeyBackend, KeyError, KeyRecord,
    KeyStatus, LegacyImport, ManagerOptions, MemoryBackend, Refill, SqliteBackend,
};

/// The credits a new key is created with (see [`Credits::initial`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CreditSpec {
    /// The starting balance (`None` with a refill: start full).
    pub credits: Option<u64>,
    /// The refill, if any.
    pub refill: Option<Refill>,
    /// Running out is audited as "would refuse" instead of refusing.
    pub shadow: bool,
}

/// Compare-and-set rounds of a credit change before giving up with a conflict (each lost
/// round means another process leased or changed the same key's credits meanwhile).
const CREDIT_CAS_ROUNDS: usize = 50;

/// What [`KeyManager::revoke_lineage`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Revocation {
    /// The key named (revoked now, or already before).
    pub key: KeyRecord,
    /// Its predecessors that were still in their rotation grace period, revoked with it,
    /// nearest first.
    pub predecessors: Vec<KeyRecord>,
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
    /// Verifications refused as [`VerifyError::Busy`](super::VerifyError::Busy).
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
pub(super) struct Counters {
    pub(super) argon2_runs: AtomicU64,
    pub(super) bcrypt_runs: AtomicU64,
    pub(super) store_reads: AtomicU64,
    pub(super) touch_batches: AtomicU64,
    pub(super) touches_written: AtomicU64,
    pub(super) invalidations: AtomicU64,
    pub(super) throttled: AtomicU64,
    pub(super) busy: AtomicU64,
    pub(super) proof_refreshes: AtomicU64,
    pub(super) negative_hits: AtomicU64,
    pub(super) background_errors: AtomicU64,
}

pub(super) fn increment(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// How long `create` and `rotate` wait for a hashing thread, at least.
const MANAGEMENT_WAIT: Duration = Duration::from_secs(30);

/// Predecessors followed by `revoke`, at most (a rotation chain is never this long).
const MAX_LINEAGE: usize = 1_000;

pub(super) struct Inner {
    pub(super) backend: Arc<dyn KeyBackend>,
    pub(super) opts: ManagerOptions,
    pub(super) cache: VerifiedCache,
    pub(super) touches: DashMap<String, PendingTouch>,
    /// Digests argon2 (or bcrypt) proved here, with the stored hash they matched.
    pub(super) proven: ProvenDigests,
    /// Key ids (0.2 selectors) the store did not have, for a few seconds.
    pub(super) negative: negative::NegativeCache,
    /// Key ids (and 0.2 labels) known to exist: never refused by the unknown-id budget.
    pub(super) known: known::KnownIds,
    pub(super) throttle: throttle::Throttle,
    pub(super) inflight: DashMap<TokenDigest, Arc<Mutex<()>>>,
    /// The only place argon2 and bcrypt run.
    pub(super) pool: HashPool,
    /// Last store revision seen by the watcher; the lock also serialises polls.
    pub(super) revision: Mutex<u64>,
    /// Revisions this manager wrote itself (key id -> revision), so the watcher does not
    /// drop cache entries for its own changes (they are invalidated when made).
    pub(super) own_writes: Mutex<std::collections::HashMap<String, u64>>,
    /// Serialises flushes so re-queued touches never overtake newer ones.
    pub(super) flush_lock: Mutex<()>,
    pub(super) counters: Counters,
    pub(super) last_error: Mutex<Option<String>>,
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
    pub(super) inner: Arc<Inner>,
    pub(super) worker: Mutex<Option<Worker>>,
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
        self.create_key(
            name,
            scopes,
            expires_at,
            metadata,
            false,
            &CreditSpec::default(),
        )
    }

    /// Like [`KeyManager::create`] (or, with `allow_past_expiry`,
    /// [`KeyManager::create_allowing_past_expiry`]), with credits.
    ///
    /// # Errors
    /// As [`KeyManager::create`]; [`KeyError::InvalidInput`] for bad credits.
    pub fn create_with_credits(
        &self,
        name: &str,
        scopes: &[String],
        expires_at: Option<DateTime<Utc>>,
        metadata: Map<String, Value>,
        allow_past_expiry: bool,
        credits: &CreditSpec,
    ) -> Result<(KeyRecord, String), KeyError> {
        self.create_key(
            name,
            scopes,
            expires_at,
            metadata,
            allow_past_expiry,
            credits,
        )
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
        self.create_key(
            name,
            scopes,
            expires_at,
            metadata,
            true,
            &CreditSpec::default(),
        )
    }

    fn create_key(
        &self,
        name: &str,
        scopes: &[String],
        expires_at: Option<DateTime<Utc>>,
        metadata: Map<String, Value>,
        allow_past_expiry: bool,
        spec: &CreditSpec,
    ) -> Result<(KeyRecord, String), KeyError> {
        let name = validate_name(name)?;
        let scopes = validate_scopes(scopes)?;
        let now = now_utc();
        let credits = Credits::initial(spec.credits, spec.refill, spec.shadow, now)?;
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
            credits,
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
                // Moved from the old key once the rotation is written (below).
                credits: None,
            };
            let had_credits = old.credits.is_some();
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
                    if had_credits {
                        // The token is not out yet: nobody spends from the new key before
                        // its credits are in place.
                        new = self.move_credits(&id, new_id)?;
                    }
                    return Ok((new, token.clone()));
                }
                Err(KeyError::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Err(KeyError::Conflict { id })
    }

    /// Moves the credits of `from` (a key just rotated) to `to`: `to` gets its balance,
    /// refill and shadow setting; `from` keeps a balance of 0 without refill (its token,
    /// valid during the grace period, spends nothing more than leases already taken).
    fn move_credits(&self, from: &str, to: &str) -> Result<KeyRecord, KeyError> {
        let backend = &self.inner.backend;
        for _ in 0..CREDIT_CAS_ROUNDS {
            let now = now_utc();
            let old = backend.get(from)?.ok_or_else(|| KeyError::NotFound {
                id: from.to_owned(),
            })?;
            let Some(stored) = old.credits else {
                break;
            };
            let current = stored.view_at(now);
            let emptied = Credits {
                balance: 0,
                refill: None,
                refill_at: None,
                refilled_at: now,
                epoch: current.epoch + 1,
                ..current.clone()
            };
            let Some(rev) = backend.write_credits(from, Some(&stored), Some(&emptied))? else {
                continue;
            };
            self.inner.invalidate(from);
            self.inner.note_own_write(from, rev);
            let moved = Credits {
                epoch: 0,
                ..current
            };
            if let Some(rev) = backend.write_credits(to, None, Some(&moved))? {
                self.inner.invalidate(to);
                self.inner.note_own_write(to, rev);
            }
            break;
        }
        backend
            .get(to)?
            .ok_or_else(|| KeyError::NotFound { id: to.to_owned() })
    }

    /// Changes the credits of a key (see [`CreditChange`]); returns the record after the
    /// change. A top-up due now is applied first. Leases other processes hold are not
    /// recalled: they may still spend them (at most their size each).
    ///
    /// # Errors
    /// [`KeyError::NotFound`]; [`KeyError::InvalidInput`] for a balance out of range;
    /// [`KeyError::Conflict`] if other processes kept changing the credits; store errors.
    pub fn change_credits(&self, id: &str, change: &CreditChange) -> Result<KeyRecord, KeyError> {
        let id = self.resolve_key_id(id)?;
        let backend = &self.inner.backend;
        for _ in 0..CREDIT_CAS_ROUNDS {
            let now = now_utc();
            let mut record = backend
                .get(&id)?
                .ok_or_else(|| KeyError::NotFound { id: id.clone() })?;
            let next = Credits::changed(record.credits.as_ref(), change, now)?;
            if let Some(rev) = backend.write_credits(&id, record.credits.as_ref(), next.as_ref())? {
                self.inner.invalidate(&id);
                self.inner.note_own_write(&id, rev);
                record.credits = next;
                record.revision = rev;
                return Ok(record);
            }
        }
        Err(KeyError::Conflict { id })
    }

    /// Takes up to `want` credits of key `key_id` from the store (see
    /// [`KeyBackend::lease_credits`]); `None` if the key has no credits.
    ///
    /// # Errors
    /// [`KeyError::NotFound`]; store errors.
    pub fn lease_credits(
        &self,
        key_id: &str,
        want: u64,
        now: DateTime<Utc>,
    ) -> Result<Option<CreditLease>, KeyError> {
        self.inner.backend.lease_credits(key_id, want, now)
    }

    /// Gives back unspent credits of a lease (see [`KeyBackend::return_credits`]).
    ///
    /// # Errors
    /// [`KeyError::NotFound`]; store errors.
    pub fn return_credits(&self, key_id: &str, n: u64, epoch: u64) -> Result<bool, KeyError> {
        self.inner.backend.return_credits(key_id, n, epoch)
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
                increment(&self.inner.counters.background_errors);
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
        increment(&self.counters.invalidations);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::hashing::Now;
    use crate::keystore::testing::*;
    use crate::keystore::{legacy, CacheLookup, VerifyError};
    use crate::tokens;
    use chrono::Utc;
    use serde_json::Map;
    use std::sync::Arc;

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
}
