//! Token verification by the [`KeyManager`]: the cache-only lookup ([`CacheLookup`]), and
//! the full path past the cache (proven digests, the negative cache, the failure budgets,
//! the store read, and a hash run on the pool).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::hashing::{CachedKey, HashScheme, Now, PoolError, TokenDigest};
use crate::tokens::{self, AnyToken, TokenError};

use super::manager::{increment, Inner};
use super::record::utc_from_ms;
use super::{throttle, KeyError, KeyManager, KeyRecord, KeyStatus, ThrottleScope, VerifyError};

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

/// What a well-formed token names, before the store is read.
enum TokenParts<'a> {
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

impl<'a> From<AnyToken<'a>> for TokenParts<'a> {
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

impl TokenParts<'_> {
    /// The public name of the key the token claims: the key id, or for a 0.2 token its
    /// public part. The failure throttle is keyed by it (one per key either way).
    fn label(&self) -> &str {
        match self {
            Self::Current { key_id, .. } => key_id,
            Self::Legacy { label, .. } => label,
        }
    }
}

impl KeyManager {
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
        let claim = TokenParts::from(parsed);
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
                increment(&inner.counters.busy);
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
}

impl Inner {
    /// Verification past the cache. A digest proven before re-reads the record and, if the
    /// stored hash is the one it was proven against, passes without hashing and without
    /// the budgets. Any other token: the negative cache, then a reservation in the failure
    /// budgets, then the store read, then a hash run on the pool.
    fn verify_uncached(
        &self,
        claim: &TokenParts<'_>,
        digest: TokenDigest,
        client: Option<&str>,
        now: Now,
    ) -> Result<Arc<CachedKey>, VerifyError> {
        let label = claim.label();
        let proven = self.proven.contains(&digest);
        let mut reservation = None;
        if !proven {
            if self.negative.contains(label, now.instant) {
                increment(&self.counters.negative_hits);
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
        increment(&self.counters.store_reads);
        let found = match claim {
            TokenParts::Current { key_id, .. } => self.backend.get(key_id),
            TokenParts::Legacy { selector, .. } => self.backend.get_by_legacy_selector(selector),
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
        if let TokenParts::Legacy { label, .. } = claim {
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
            increment(&self.counters.proof_refreshes);
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
            .with_revision(record.revision)
            .with_credits(record.credits.as_ref().map(|c| c.shadow)),
        );
        self.cache
            .insert_if_epoch(digest, Arc::clone(&entry), epoch);
        self.record_use(&entry, client, now);
        Ok(entry)
    }

    /// Whether the token's secret matches the record's hash: one hash run on the pool.
    fn check_secret(
        &self,
        claim: &TokenParts<'_>,
        record: &KeyRecord,
    ) -> Result<bool, VerifyError> {
        let (input, scheme) = match claim {
            TokenParts::Current { secret, .. } => (*secret, HashScheme::Argon2id),
            TokenParts::Legacy { token, .. } => (*token, HashScheme::Bcrypt),
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
                increment(match scheme {
                    HashScheme::Argon2id => &self.counters.argon2_runs,
                    HashScheme::Bcrypt => &self.counters.bcrypt_runs,
                });
                Ok(matches)
            }
            Err(PoolError::Busy) => {
                increment(&self.counters.busy);
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
                increment(&self.counters.throttled);
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
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::hashing::{self, CachedKey, HashError, HashParams, Now};
    use crate::keystore::testing::*;
    use crate::keystore::{
        Change, FailThrottle, KeyBackend, ManagerOptions, MemoryBackend, Touch,
        DEFAULT_NEGATIVE_TTL,
    };
    use crate::tokens;
    use chrono::Utc;
    use parking_lot::Mutex;
    use proptest::prelude::*;
    use serde_json::Map;
    use std::sync::Arc;
    use std::time::Duration;

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
    fn an_attachment_is_served_with_its_cache_entry_only() {
        for (backend, m, _dir) in managers() {
            let (rec, token) = m
                .create("svc", &scopes(&["read"]), None, Map::new())
                .unwrap();
            let now = Now::system();
            let key = m.verify_at(&token, None, now).unwrap();
            key.attachment.get_or_attach(String::from("built once"));
            let CacheLookup::Hit(hit) = m.verify_cached(&token, now) else {
                panic!("{backend}: not cached");
            };
            assert_eq!(
                hit.attachment.get::<String>().map(String::as_str),
                Some("built once"),
                "{backend}"
            );
            // Past the cache TTL the record is read again: a new entry, nothing attached.
            let later = now.after(m.options().cache_ttl + Duration::from_secs(1));
            assert!(
                matches!(m.verify_cached(&token, later), CacheLookup::Miss),
                "{backend}"
            );
            let fresh = m.verify_at(&token, None, later).unwrap();
            assert!(!Arc::ptr_eq(&fresh, &key), "{backend}");
            assert!(fresh.attachment.get::<String>().is_none(), "{backend}");
            fresh.attachment.get_or_attach(String::from("again"));
            // Revoked: the entry is gone, and with it what was attached.
            m.revoke(&rec.id).unwrap();
            assert!(
                matches!(m.verify_cached(&token, later), CacheLookup::Miss),
                "{backend}"
            );
            assert!(
                matches!(
                    m.verify_at(&token, None, later),
                    Err(VerifyError::Revoked { .. })
                ),
                "{backend}"
            );
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
        fn lease_credits(
            &self,
            id: &str,
            want: u64,
            now: chrono::DateTime<chrono::Utc>,
        ) -> Result<Option<crate::keystore::CreditLease>, KeyError> {
            self.inner.lease_credits(id, want, now)
        }
        fn return_credits(&self, id: &str, n: u64, epoch: u64) -> Result<bool, KeyError> {
            self.inner.return_credits(id, n, epoch)
        }
        fn write_credits(
            &self,
            id: &str,
            expected: Option<&crate::keystore::Credits>,
            new: Option<&crate::keystore::Credits>,
        ) -> Result<Option<u64>, KeyError> {
            self.inner.write_credits(id, expected, new)
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
