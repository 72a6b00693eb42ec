//! The cache of verified tokens: a valid key costs microseconds after its first use.

use std::any::Any;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::digest::DigestBuildHasher;
use super::{Now, TokenDigest};

/// What the cache knows about a verified token: everything an access decision needs.
#[derive(Debug)]
pub struct CachedKey {
    /// The key id (`fmg_key_...`).
    pub key_id: String,
    /// The key's human name.
    pub name: String,
    /// Granted scopes.
    pub scopes: Arc<[String]>,
    /// Free-form metadata stored with the key.
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// The token stops being valid at this unix time in ms: `min(expires_at, grace_until)`.
    pub valid_until: Option<i64>,
    /// When the entry was cached (monotonic), for the TTL.
    pub inserted: Instant,
    /// When use of this token was last recorded (unix ms); lets the hot path record
    /// `last_used_at` at most once per second per token.
    pub last_touch_ms: AtomicI64,
    /// Store revision of the record this entry was built from (0: unknown, i.e. older
    /// than any change): a change notice for an older revision leaves it alone.
    pub revision: u64,
    /// Whether the key has credits, and if so whether they run in shadow (`Some(shadow)`);
    /// `None`: no credits.
    pub credits: Option<bool>,
    /// What the layer above built from this entry (the Python binding: the FastMCP
    /// `AccessToken`), so that it is built once per entry and goes with it.
    pub attachment: Attachment,
}

/// One object attached to a [`CachedKey`] by the layer above, built from the entry once
/// and reused while the entry is served.
///
/// It lives exactly as long as its entry: every way an entry leaves the cache (its key
/// revoked, rotated or changed in the store, the TTL, eviction, a clear) drops the
/// attachment with it, and a re-verified token gets a new entry with an empty attachment.
/// So nothing built from an entry can outlive it in the cache, and the attachments are
/// bounded by the cache's capacity.
///
/// Each entry is dropped after the cache's locks are released (see
/// [`VerifiedCache`]): dropping an attachment may run code of the layer above.
#[derive(Debug, Default)]
pub struct Attachment(OnceLock<Box<dyn Any + Send + Sync>>);

impl Attachment {
    /// The attached object, if one of type `T` is attached.
    #[must_use]
    pub fn get<T: Any>(&self) -> Option<&T> {
        self.0.get()?.downcast_ref()
    }

    /// Attaches `value` unless an object is attached already (the first attach wins; a
    /// later `value` is dropped). Returns the attached object, `None` if it is not a `T`.
    pub fn get_or_attach<T: Any + Send + Sync>(&self, value: T) -> Option<&T> {
        // `set` fails when another attach came first: `value` is dropped, theirs is kept.
        drop(self.0.set(Box::new(value)));
        self.get()
    }
}

impl CachedKey {
    /// A fresh entry, cached at `inserted`.
    #[must_use]
    pub fn new(
        key_id: String,
        name: String,
        scopes: Arc<[String]>,
        metadata: serde_json::Map<String, serde_json::Value>,
        valid_until: Option<i64>,
        inserted: Instant,
    ) -> Self {
        Self {
            key_id,
            name,
            scopes,
            metadata,
            valid_until,
            inserted,
            last_touch_ms: AtomicI64::new(i64::MIN),
            revision: 0,
            credits: None,
            attachment: Attachment::default(),
        }
    }

    /// The entry, noting the store revision of the record it was built from.
    #[must_use]
    pub fn with_revision(mut self, revision: u64) -> Self {
        self.revision = revision;
        self
    }

    /// The entry, noting the key's credits (see [`CachedKey::credits`]).
    #[must_use]
    pub fn with_credits(mut self, credits: Option<bool>) -> Self {
        self.credits = credits;
        self
    }

    /// Whether the entry may still be served at `now` under `ttl`.
    #[must_use]
    pub fn is_fresh(&self, now: Now, ttl: Duration) -> bool {
        now.instant.saturating_duration_since(self.inserted) < ttl
            && self.valid_until.is_none_or(|v| now.unix_ms < v)
    }
}

/// How many keys' latest invalidations a [`VerifiedCache`] remembers (under 100 bytes
/// each). Past this, the older half is forgotten: a verification in flight since before
/// the last `CHANGES_KEPT / 2` invalidations does not cache its result, whichever key it
/// is for.
pub const CHANGES_KEPT: usize = 4096;

/// Default number of cached tokens.
pub const DEFAULT_CACHE_CAPACITY: usize = 10_000;
/// Default time an entry is served before the key is re-read from the store.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(60);

/// A bounded TTL cache `TokenDigest -> Arc<CachedKey>` with a key-id index for invalidation.
///
/// * Reads (`get`) take one shard read lock of a [`DashMap`]; there is no global lock.
/// * Every mutation for a key id happens under that key id's slot in the index (lock order:
///   index, then map), so `invalidate_key` never misses an entry.
/// * Every invalidation gets a sequence number, remembered per key. A verifier reads the
///   current number (the epoch) before it reads the store, and its result is not cached if
///   its key was invalidated (or the cache cleared) since: no revoked key is served from
///   the cache, and changes to other keys do not cost it an argon2 run. See
///   [`VerifiedCache::insert_if_epoch`].
/// * Eviction when full: first drop entries past their TTL, then drop arbitrary entries.
///   Because entries are placed by a keyed random digest, "arbitrary" is effectively random
///   (random eviction; no LRU bookkeeping on the read path).
/// * Capacity 0 disables caching.
/// * An entry's [`Attachment`] goes with it, however it leaves. Removed entries are dropped
///   after the locks are released, so dropping an attachment (the binding's Python object)
///   may use the cache again.
#[derive(Debug)]
pub struct VerifiedCache {
    map: DashMap<TokenDigest, Arc<CachedKey>, DigestBuildHasher>,
    index: DashMap<String, Vec<TokenDigest>>,
    capacity: usize,
    ttl: Duration,
    /// Sequence number of the latest invalidation (of one key, or a clear); an epoch is a
    /// reading of it.
    seq: AtomicU64,
    /// Key id -> sequence number of its latest invalidation. Bounded: see
    /// [`VerifiedCache::forget_old_changes`].
    changed: DashMap<String, u64>,
    /// Every key counts as invalidated at this sequence number: raised by a clear, and when
    /// old entries of `changed` are forgotten.
    floor: AtomicU64,
    /// `changed` is trimmed when it holds more than this many keys.
    changes_kept: usize,
}

impl Default for VerifiedCache {
    fn default() -> Self {
        Self::new(DEFAULT_CACHE_CAPACITY, DEFAULT_CACHE_TTL)
    }
}

impl VerifiedCache {
    /// A cache holding at most `capacity` tokens for at most `ttl` each.
    #[must_use]
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            map: DashMap::with_hasher(DigestBuildHasher::default()),
            index: DashMap::new(),
            capacity,
            ttl,
            seq: AtomicU64::new(0),
            changed: DashMap::new(),
            floor: AtomicU64::new(0),
            changes_kept: CHANGES_KEPT,
        }
    }

    /// A cache remembering the invalidations of at most `changes_kept` keys (tests: the
    /// trimming of that memory).
    #[cfg(test)]
    fn with_changes_kept(capacity: usize, ttl: Duration, changes_kept: usize) -> Self {
        Self {
            changes_kept,
            ..Self::new(capacity, ttl)
        }
    }

    /// Maximum number of entries.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Time-to-live of an entry.
    #[must_use]
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The entry for `digest` if present, within its TTL and before its `valid_until`.
    #[must_use]
    pub fn get(&self, digest: &TokenDigest, now: Now) -> Option<Arc<CachedKey>> {
        let entry = self.map.get(digest)?;
        if entry.is_fresh(now, self.ttl) {
            Some(Arc::clone(entry.value()))
        } else {
            None
        }
    }

    /// The current invalidation epoch; read it before reading the store. It does not name a
    /// key: [`VerifiedCache::insert_if_epoch`] checks it against the entry's key, so a
    /// verifier need not know the key id before the store read.
    #[must_use]
    pub fn epoch(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    /// Caches `entry` unconditionally (see [`VerifiedCache::insert_if_epoch`] for the
    /// race-free variant). Returns whether it was stored.
    pub fn insert(&self, digest: TokenDigest, entry: Arc<CachedKey>) -> bool {
        self.insert_if_epoch(digest, entry, self.epoch())
    }

    /// Caches `entry` unless, since `epoch` was read, its key was invalidated
    /// ([`invalidate_key`](Self::invalidate_key),
    /// [`invalidate_key_before`](Self::invalidate_key_before)) or the cache was
    /// [`clear`](Self::clear)ed. Invalidations of other keys do not stop it (unless so many
    /// came since `epoch` that the oldest were forgotten: see [`CHANGES_KEPT`]).
    ///
    /// Returns whether it was stored.
    pub fn insert_if_epoch(&self, digest: TokenDigest, entry: Arc<CachedKey>, epoch: u64) -> bool {
        if self.capacity == 0 {
            return false;
        }
        if self.map.len() >= self.capacity && !self.map.contains_key(&digest) {
            self.make_room(entry.inserted);
        }
        let mut slot = self.index.entry(entry.key_id.clone()).or_default();
        // Checked under the slot lock: an invalidation of this key either recorded itself
        // before this check (we refuse), or waits for the slot and then removes what we
        // insert.
        if self.changed_after(&entry.key_id, epoch) {
            let empty = slot.is_empty();
            drop(slot);
            if empty {
                self.index.remove_if(&entry.key_id, |_, v| v.is_empty());
            }
            return false;
        }
        let replaced = self.map.insert(digest, entry);
        if !slot.contains(&digest) {
            slot.push(digest);
        }
        drop(slot);
        drop(replaced);
        true
    }

    /// Removes every entry of `key_id`. Returns how many were removed.
    ///
    /// Like every invalidation, it stops the verifications of `key_id` in flight (those that
    /// read the [`epoch`](Self::epoch) before) from caching their result.
    pub fn invalidate_key(&self, key_id: &str) -> usize {
        self.record_change(key_id);
        let mut removed = Vec::new();
        if let Some(mut slot) = self.index.get_mut(key_id) {
            for digest in slot.drain(..) {
                removed.extend(self.map.remove(&digest).map(|(_, entry)| entry));
            }
        }
        self.index.remove_if(key_id, |_, v| v.is_empty());
        // The entries (and their attachments) are dropped here, with no lock held.
        removed.len()
    }

    /// Applies a change notice: removes the entries of `key_id` built from a record
    /// older than `revision` (an entry cached after the change stays). Like
    /// [`invalidate_key`](Self::invalidate_key) it records a change of the key, so a
    /// verification of that key that read the store before the change cannot cache its
    /// result. Returns how many were removed.
    pub fn invalidate_key_before(&self, key_id: &str, revision: u64) -> usize {
        self.record_change(key_id);
        let mut removed = Vec::new();
        if let Some(mut slot) = self.index.get_mut(key_id) {
            slot.retain(|digest| {
                let stale = self
                    .map
                    .get(digest)
                    .is_none_or(|entry| entry.revision < revision);
                if stale {
                    removed.extend(self.map.remove(digest).map(|(_, entry)| entry));
                }
                !stale
            });
        }
        self.index.remove_if(key_id, |_, v| v.is_empty());
        // The entries (and their attachments) are dropped here, with no lock held.
        removed.len()
    }

    /// Removes everything, and stops every verification in flight (of any key) from caching
    /// its result.
    pub fn clear(&self) {
        let n = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        self.floor.fetch_max(n, Ordering::SeqCst);
        // The floor now covers these; a concurrent invalidation's later number stays.
        self.changed.retain(|_, at| *at > n);
        // Inserts hold an index shard lock while touching the map, so clearing the index
        // first waits for them; the map is emptied after (an insert that comes later was
        // refused, or read its epoch after this clear). The entries are removed one by
        // one and dropped after, with no lock held.
        self.index.clear();
        let digests: Vec<TokenDigest> = self.map.iter().map(|e| *e.key()).collect();
        let removed: Vec<Arc<CachedKey>> = digests
            .iter()
            .filter_map(|digest| self.map.remove(digest).map(|(_, entry)| entry))
            .collect();
        drop(removed);
    }

    /// Number of cached entries (including expired ones not yet evicted).
    #[must_use]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the cache is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Records an invalidation of `key_id` under a new sequence number.
    fn record_change(&self, key_id: &str) {
        let n = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(mut at) = self.changed.get_mut(key_id) {
            *at = (*at).max(n);
        } else {
            self.changed
                .entry(key_id.to_owned())
                .and_modify(|at| *at = (*at).max(n))
                .or_insert(n);
        }
        if self.changed.len() > self.changes_kept {
            self.forget_old_changes();
        }
    }

    /// Whether `key_id` was invalidated (or the cache cleared) after `epoch` was read.
    fn changed_after(&self, key_id: &str, epoch: u64) -> bool {
        // The map first, then the floor: `forget_old_changes` raises the floor before it
        // removes entries, so a reading that misses a removed entry sees the raised floor.
        let key = self.changed.get(key_id).map_or(0, |at| *at);
        key.max(self.floor.load(Ordering::SeqCst)) > epoch
    }

    /// Keeps the invalidations of the last `changes_kept / 2` sequence numbers and forgets
    /// the older ones, by counting every key as invalidated at the oldest number kept. Only
    /// a verification in flight since before then is affected: it does not cache.
    fn forget_old_changes(&self) {
        let kept = u64::try_from(self.changes_kept / 2).unwrap_or(u64::MAX);
        let cutoff = self.seq.load(Ordering::SeqCst).saturating_sub(kept);
        self.floor.fetch_max(cutoff, Ordering::SeqCst);
        self.changed.retain(|_, at| *at > cutoff);
    }

    /// Removes one entry, keeping the index consistent (index slot locked first). Returns
    /// it, for the caller to drop once no lock is held.
    #[must_use]
    fn remove_digest(&self, digest: &TokenDigest, key_id: &str) -> Option<Arc<CachedKey>> {
        let removed = if let Some(mut slot) = self.index.get_mut(key_id) {
            slot.retain(|d| d != digest);
            self.map.remove(digest)
        } else {
            self.map.remove(digest)
        };
        self.index.remove_if(key_id, |_, v| v.is_empty());
        removed.map(|(_, entry)| entry)
    }

    fn make_room(&self, now: Instant) {
        let mut evicted = Vec::new();
        let ttl = self.ttl;
        let expired: Vec<(TokenDigest, String)> = self
            .map
            .iter()
            .filter(|e| now.saturating_duration_since(e.inserted) >= ttl)
            .map(|e| (*e.key(), e.key_id.clone()))
            .collect();
        for (digest, key_id) in &expired {
            evicted.extend(self.remove_digest(digest, key_id));
        }
        while self.map.len() >= self.capacity {
            // The iterator (and its shard lock) is dropped at the end of this statement.
            let victim = self.map.iter().next().map(|e| (*e.key(), e.key_id.clone()));
            match victim {
                Some((digest, key_id)) => evicted.extend(self.remove_digest(&digest, &key_id)),
                None => break,
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::{mpsc, Weak};
    use std::thread;

    fn entry(key_id: &str, now: Now, valid_until: Option<i64>) -> Arc<CachedKey> {
        Arc::new(CachedKey::new(
            key_id.to_owned(),
            "name".to_owned(),
            Arc::from(vec!["read".to_owned()]),
            serde_json::Map::new(),
            valid_until,
            now.instant,
        ))
    }

    /// An attachment that notes when it is dropped, and then uses the cache (as a Python
    /// object's finaliser may): that would deadlock if it were dropped under a cache lock.
    struct Probe {
        dropped: Arc<AtomicBool>,
        cache: Weak<VerifiedCache>,
        digest: TokenDigest,
        key_id: String,
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            if let Some(cache) = self.cache.upgrade() {
                let _ = cache.get(&self.digest, Now::system());
                cache.invalidate_key(&self.key_id);
            }
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    /// Attaches a [`Probe`] to the entry of `d`; the flag it sets when dropped.
    fn probe(cache: &Arc<VerifiedCache>, d: TokenDigest, now: Now) -> Arc<AtomicBool> {
        let dropped = Arc::new(AtomicBool::new(false));
        let entry = cache.get(&d, now).unwrap();
        let p = Probe {
            dropped: Arc::clone(&dropped),
            cache: Arc::downgrade(cache),
            digest: d,
            key_id: entry.key_id.clone(),
        };
        assert!(entry.attachment.get_or_attach(p).is_some());
        dropped
    }

    #[test]
    fn the_first_attach_wins_and_is_shared_by_every_hit() {
        let cache = VerifiedCache::default();
        let now = Now::system();
        cache.insert(digest(1), entry("k", now, None));
        let hit = cache.get(&digest(1), now).unwrap();
        assert_eq!(hit.attachment.get::<u32>(), None);
        assert_eq!(hit.attachment.get_or_attach(7u32), Some(&7));
        assert_eq!(hit.attachment.get_or_attach(8u32), Some(&7));
        let again = cache.get(&digest(1), now).unwrap();
        assert_eq!(again.attachment.get::<u32>(), Some(&7));
        // Another type is neither served nor attached over it.
        assert_eq!(again.attachment.get::<String>(), None);
        assert_eq!(again.attachment.get_or_attach(String::from("x")), None);
        assert_eq!(again.attachment.get::<u32>(), Some(&7));
    }

    #[test]
    fn every_way_an_entry_leaves_the_cache_drops_its_attachment_with_no_lock_held() {
        type Leave = fn(&VerifiedCache, Now);
        let ways: [(&str, Leave); 6] = [
            ("invalidate_key", |c, _| {
                c.invalidate_key("k");
            }),
            ("invalidate_key_before", |c, _| {
                c.invalidate_key_before("k", 1);
            }),
            ("clear", |c, _| c.clear()),
            ("evicted when the cache is full", |c, now| {
                // Full, and past its TTL: evicted first (other evictions are random).
                for i in 10..13 {
                    c.insert(digest(i), entry("other", now, None));
                }
                let later = now.after(Duration::from_secs(61));
                c.insert(digest(20), entry("other", later, None));
                assert_eq!(c.len(), 1);
            }),
            ("replaced after its TTL by a new verification", |c, now| {
                let later = now.after(Duration::from_secs(61));
                assert!(c.get(&digest(1), later).is_none(), "served past its TTL");
                c.insert(digest(1), entry("k", later, None));
            }),
            ("the cache dropped", |_, _| {}),
        ];
        for (name, leave) in ways {
            let mut cache = Some(Arc::new(VerifiedCache::new(4, Duration::from_secs(60))));
            let c = Arc::clone(cache.as_ref().unwrap());
            let now = Now::system();
            c.insert(digest(1), entry("k", now, None));
            let dropped = probe(&c, digest(1), now);
            assert!(!dropped.load(Ordering::SeqCst), "{name}");
            // Run where a deadlock fails the test instead of hanging it.
            let (tx, rx) = mpsc::channel();
            let worker = {
                let c = Arc::clone(&c);
                thread::spawn(move || {
                    leave(&c, now);
                    tx.send(()).unwrap();
                })
            };
            rx.recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("{name}: deadlocked dropping the attachment"));
            worker.join().unwrap();
            drop(c);
            if name == "the cache dropped" {
                cache = None;
            }
            assert!(
                dropped.load(Ordering::SeqCst),
                "{name}: attachment outlived its entry"
            );
            if let Some(cache) = cache {
                assert!(
                    cache
                        .get(&digest(1), now)
                        .is_none_or(|e| e.attachment.get::<Probe>().is_none()),
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn a_change_notice_spares_entries_built_after_it() {
        let now = Now::system();
        let cache = VerifiedCache::new(10, Duration::from_secs(60));
        let old = Arc::new(
            Arc::try_unwrap(entry("k", now, None))
                .unwrap_or_else(|_| panic!("unique"))
                .with_revision(3),
        );
        let new = Arc::new(
            Arc::try_unwrap(entry("k", now, None))
                .unwrap_or_else(|_| panic!("unique"))
                .with_revision(7),
        );
        assert!(cache.insert(digest(1), old));
        assert!(cache.insert(digest(2), new));
        let epoch = cache.epoch();
        assert_eq!(cache.invalidate_key_before("k", 5), 1);
        assert!(cache.get(&digest(1), now).is_none());
        assert!(
            cache.get(&digest(2), now).is_some(),
            "cached after the change: kept"
        );
        assert_ne!(
            cache.epoch(),
            epoch,
            "in-flight verifications may not cache"
        );
        assert_eq!(cache.invalidate_key_before("k", 8), 1);
        assert!(cache.get(&digest(2), now).is_none());
    }

    fn digest(n: u32) -> TokenDigest {
        TokenDigest::of(&n.to_le_bytes()).unwrap()
    }

    #[test]
    fn get_respects_ttl_and_valid_until() {
        let cache = VerifiedCache::new(10, Duration::from_secs(60));
        let now = Now::system();
        assert!(cache.insert(digest(1), entry("k1", now, None)));
        assert!(cache.insert(digest(2), entry("k2", now, Some(now.unix_ms + 5_000))));
        assert_eq!(cache.get(&digest(1), now).unwrap().key_id, "k1");
        assert!(cache
            .get(&digest(1), now.after(Duration::from_secs(59)))
            .is_some());
        assert!(cache
            .get(&digest(1), now.after(Duration::from_secs(60)))
            .is_none());
        assert!(cache
            .get(&digest(2), now.after(Duration::from_secs(4)))
            .is_some());
        assert!(cache
            .get(&digest(2), now.after(Duration::from_secs(5)))
            .is_none());
        assert!(cache.get(&digest(3), now).is_none());
    }

    #[test]
    fn invalidate_key_removes_all_entries_of_that_key() {
        let cache = VerifiedCache::default();
        let now = Now::system();
        cache.insert(digest(1), entry("k1", now, None));
        cache.insert(digest(2), entry("k1", now, None));
        cache.insert(digest(3), entry("k2", now, None));
        assert_eq!(cache.invalidate_key("k1"), 2);
        assert!(cache.get(&digest(1), now).is_none());
        assert!(cache.get(&digest(2), now).is_none());
        assert!(cache.get(&digest(3), now).is_some());
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.invalidate_key("k1"), 0);
        assert_eq!(cache.invalidate_key("nope"), 0);
        cache.clear();
        assert!(cache.is_empty());
        assert!(cache.index.is_empty());
    }

    #[test]
    fn insert_after_invalidation_with_stale_epoch_is_refused() {
        let cache = VerifiedCache::default();
        let now = Now::system();
        let epoch = cache.epoch();
        cache.invalidate_key("k1");
        assert!(!cache.insert_if_epoch(digest(1), entry("k1", now, None), epoch));
        assert!(cache.get(&digest(1), now).is_none());
        assert!(cache.index.is_empty());
        assert!(cache.insert_if_epoch(digest(1), entry("k1", now, None), cache.epoch()));
    }

    #[test]
    fn cache_is_bounded_and_index_stays_consistent() {
        let cache = VerifiedCache::new(8, Duration::from_secs(60));
        let now = Now::system();
        for i in 0..100 {
            cache.insert(digest(i), entry(&format!("k{}", i % 13), now, None));
            assert!(cache.len() <= 8);
        }
        let indexed: usize = cache.index.iter().map(|e| e.value().len()).sum();
        assert_eq!(indexed, cache.len());
        for e in &cache.index {
            for d in e.value() {
                assert_eq!(cache.map.get(d).unwrap().key_id, *e.key());
            }
        }
        // The most recent insert always survives.
        assert!(cache.get(&digest(99), now).is_some());
    }

    #[test]
    fn full_cache_evicts_expired_entries_first() {
        let cache = VerifiedCache::new(4, Duration::from_secs(10));
        let now = Now::system();
        for i in 0..3 {
            cache.insert(digest(i), entry("old", now, None));
        }
        let later = now.after(Duration::from_secs(11));
        cache.insert(digest(10), entry("new", later, None));
        cache.insert(digest(11), entry("new", later, None));
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&digest(10), later).is_some());
        assert!(cache.get(&digest(11), later).is_some());
    }

    #[test]
    fn zero_capacity_disables_caching() {
        let cache = VerifiedCache::new(0, Duration::from_secs(10));
        assert!(!cache.insert(digest(1), entry("k", Now::system(), None)));
        assert!(cache.is_empty());
    }

    #[test]
    fn concurrent_insert_and_invalidate_leave_no_stale_entry() {
        // A verifier that read the epoch before an invalidation of its key, or a clear, must
        // never leave an entry.
        type Invalidation = fn(&VerifiedCache);
        let invalidations: [(&str, Invalidation); 3] = [
            ("invalidate_key", |c| {
                c.invalidate_key("k");
            }),
            ("invalidate_key_before", |c| {
                c.invalidate_key_before("k", u64::MAX);
            }),
            ("clear", VerifiedCache::clear),
        ];
        for (name, invalidate) in invalidations {
            for round in 0..200u32 {
                let cache = Arc::new(VerifiedCache::new(100, Duration::from_secs(60)));
                let now = Now::system();
                let epoch = cache.epoch();
                let c2 = Arc::clone(&cache);
                let t = thread::spawn(move || {
                    c2.insert_if_epoch(digest(round), entry("k", now, None), epoch);
                });
                invalidate(&cache);
                t.join().unwrap();
                assert!(
                    cache.get(&digest(round), now).is_none(),
                    "{name}, round {round}"
                );
                assert!(cache.index.is_empty(), "{name}, round {round}");
            }
        }
    }

    #[test]
    fn an_invalidation_of_another_key_does_not_stop_caching() {
        let cache = VerifiedCache::default();
        let now = Now::system();
        let epoch = cache.epoch();
        assert_eq!(cache.invalidate_key("b"), 0);
        assert_eq!(cache.invalidate_key_before("c", 9), 0);
        assert!(cache.insert_if_epoch(digest(1), entry("a", now, None), epoch));
        assert!(cache.get(&digest(1), now).is_some());
        // The keys that did change are refused, with the same epoch.
        assert!(!cache.insert_if_epoch(digest(2), entry("b", now, None), epoch));
        assert!(!cache.insert_if_epoch(digest(3), entry("c", now, None), epoch));
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.index.len(), 1);
    }

    #[test]
    fn an_invalidation_before_the_epoch_was_read_does_not_stop_caching() {
        let cache = VerifiedCache::default();
        let now = Now::system();
        cache.invalidate_key("a");
        let epoch = cache.epoch();
        assert!(cache.insert_if_epoch(digest(1), entry("a", now, None), epoch));
    }

    #[test]
    fn clear_refuses_every_insert_in_flight() {
        let cache = VerifiedCache::default();
        let now = Now::system();
        let epoch = cache.epoch();
        cache.invalidate_key("k7");
        cache.clear();
        cache.invalidate_key("k8");
        for i in 0..50 {
            let key = format!("k{i}");
            assert!(
                !cache.insert_if_epoch(digest(i), entry(&key, now, None), epoch),
                "{key}"
            );
        }
        assert!(cache.is_empty());
        assert!(cache.index.is_empty());
        // Epochs read after the clear are current again, except for a key changed since.
        let after = cache.epoch();
        assert!(cache.insert_if_epoch(digest(0), entry("k0", now, None), after));
        cache.invalidate_key("k1");
        assert!(!cache.insert_if_epoch(digest(1), entry("k1", now, None), after));
    }

    #[test]
    fn remembered_invalidations_are_bounded_and_forgetting_never_admits_a_stale_entry() {
        let cache = VerifiedCache::with_changes_kept(1000, Duration::from_secs(60), 8);
        let now = Now::system();
        let long_ago = cache.epoch();
        for i in 0..20 {
            cache.invalidate_key(&format!("k{i}"));
            assert!(cache.changed.len() <= 8, "{}", cache.changed.len());
        }
        // k0's invalidation is forgotten, yet a verification from before it is refused;
        // so is one of a key never invalidated (in flight since before the forgotten ones).
        assert!(!cache.changed.contains_key("k0"));
        assert!(!cache.insert_if_epoch(digest(1), entry("k0", now, None), long_ago));
        assert!(!cache.insert_if_epoch(digest(2), entry("never", now, None), long_ago));
        // A recent verification is judged exactly.
        let recent = cache.epoch();
        cache.invalidate_key("k20");
        cache.invalidate_key("k21");
        assert!(cache.insert_if_epoch(digest(3), entry("never", now, None), recent));
        assert!(cache.insert_if_epoch(digest(4), entry("k0", now, None), recent));
        assert!(!cache.insert_if_epoch(digest(5), entry("k21", now, None), recent));
    }

    #[test]
    fn churn_and_revocations_in_flight_never_leave_a_revoked_key_cached() {
        // Verifier threads do what the keystore's verify does: read the epoch, read the
        // "store" (a revoked flag), then cache unless revoked. Revoker threads change keys
        // 0..8 (invalidations), then revoke them: set the flag (the store write), then
        // invalidate, as the keystore does. Keys 8..16 never change. The cache remembers
        // few changes, so that forgetting them happens during the run too.
        const KEYS: usize = 16;
        const CHURNED: usize = 8;
        let keys: Arc<Vec<String>> = Arc::new((0..KEYS).map(|k| format!("k{k}")).collect());
        let revoked: Arc<Vec<AtomicBool>> =
            Arc::new((0..KEYS).map(|_| AtomicBool::new(false)).collect());
        let done = Arc::new(AtomicBool::new(false));
        let cache = Arc::new(VerifiedCache::with_changes_kept(
            100_000,
            Duration::from_secs(60),
            4,
        ));
        let now = Now::system();
        let verifiers: Vec<_> = (0..4u32)
            .map(|t| {
                let (cache, keys, revoked, done) = (
                    Arc::clone(&cache),
                    Arc::clone(&keys),
                    Arc::clone(&revoked),
                    Arc::clone(&done),
                );
                thread::spawn(move || {
                    // At least 2,000 verifications, and then a round over every key begun
                    // after the revokers finished (7 and 16 are coprime).
                    let mut rounds_after = 0;
                    for i in 0u32.. {
                        if done.load(Ordering::SeqCst) {
                            rounds_after += 1;
                        }
                        if i >= 2_000 && rounds_after > KEYS {
                            break;
                        }
                        let k = (i as usize * 7 + t as usize) % KEYS;
                        let epoch = cache.epoch();
                        if revoked[k].load(Ordering::SeqCst) {
                            continue;
                        }
                        let d = digest(t * 1_000_000 + i);
                        cache.insert_if_epoch(d, entry(&keys[k], now, None), epoch);
                    }
                })
            })
            .collect();
        let revokers: Vec<_> = (0..2)
            .map(|r| {
                let (cache, keys, revoked) =
                    (Arc::clone(&cache), Arc::clone(&keys), Arc::clone(&revoked));
                thread::spawn(move || {
                    for k in (r..CHURNED).step_by(2) {
                        for _ in 0..50 {
                            cache.invalidate_key_before(&keys[k], 1);
                            thread::yield_now();
                        }
                        revoked[k].store(true, Ordering::SeqCst);
                        cache.invalidate_key(&keys[k]);
                    }
                })
            })
            .collect();
        for r in revokers {
            r.join().unwrap();
        }
        done.store(true, Ordering::SeqCst);
        for v in verifiers {
            v.join().unwrap();
        }
        for (k, key) in keys.iter().enumerate() {
            let cached = cache.map.iter().filter(|e| e.key_id == *key).count();
            if k < CHURNED {
                assert_eq!(cached, 0, "revoked key {key} left {cached} entries");
            } else {
                assert!(cached > 0, "unchanged key {key} was never cached");
            }
        }
        let indexed: usize = cache.index.iter().map(|e| e.value().len()).sum();
        assert_eq!(indexed, cache.len());
    }

    #[test]
    fn without_forgetting_churn_on_other_keys_never_refuses_a_verification() {
        // The same churn with the default memory of changes: every verification of an
        // unchanged key caches, however the threads interleave.
        let cache = Arc::new(VerifiedCache::new(100_000, Duration::from_secs(60)));
        let now = Now::system();
        let churn = {
            let cache = Arc::clone(&cache);
            thread::spawn(move || {
                for i in 0..2_000 {
                    cache.invalidate_key(&format!("other{}", i % 100));
                    if i % 10 == 0 {
                        thread::yield_now();
                    }
                }
            })
        };
        let verifiers: Vec<_> = (0..2u32)
            .map(|t| {
                let cache = Arc::clone(&cache);
                thread::spawn(move || {
                    (0..2_000u32)
                        .filter(|&i| {
                            let epoch = cache.epoch();
                            thread::yield_now();
                            !cache.insert_if_epoch(
                                digest(t * 1_000_000 + i),
                                entry("stable", now, None),
                                epoch,
                            )
                        })
                        .count()
                })
            })
            .collect();
        churn.join().unwrap();
        let refused: usize = verifiers.into_iter().map(|v| v.join().unwrap()).sum();
        assert_eq!(refused, 0);
        assert_eq!(cache.len(), 4_000);
    }

    /// One step of [`insert_if_epoch_refuses_exactly_the_keys_changed_since`].
    #[derive(Debug, Clone)]
    enum Op {
        /// Verifier `v` reads the epoch.
        Read {
            v: usize,
        },
        /// Verifier `v` caches an entry for key `k` with the epoch it read last.
        Insert {
            v: usize,
            k: usize,
        },
        Invalidate {
            k: usize,
        },
        InvalidateBefore {
            k: usize,
        },
        Clear,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            2 => (0..3usize).prop_map(|v| Op::Read { v }),
            4 => (0..3usize, 0..6usize).prop_map(|(v, k)| Op::Insert { v, k }),
            3 => (0..6usize).prop_map(|k| Op::Invalidate { k }),
            1 => (0..6usize).prop_map(|k| Op::InvalidateBefore { k }),
            1 => Just(Op::Clear),
        ]
    }

    /// What a verifier saw since it read its epoch.
    #[derive(Debug, Default)]
    struct Since {
        changed: Vec<usize>,
        invalidations: usize,
        cleared: bool,
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// The model: an insert is refused if its key was invalidated or the cache cleared
        /// since the epoch was read (always), and accepted otherwise, as long as no more
        /// invalidations came since than the remembered half (2 of `changes_kept` 4 here,
        /// with 6 keys: forgetting happens).
        #[test]
        fn insert_if_epoch_refuses_exactly_the_keys_changed_since(
            ops in proptest::collection::vec(op(), 1..80)
        ) {
            let cache = VerifiedCache::with_changes_kept(1000, Duration::from_secs(60), 4);
            let now = Now::system();
            let mut read: Vec<Option<(u64, Since)>> = vec![None, None, None];
            for (n, op) in (0u32..).zip(ops) {
                match op {
                    Op::Read { v } => read[v] = Some((cache.epoch(), Since::default())),
                    Op::Insert { v, k } => {
                        let Some((epoch, since)) = &read[v] else { continue };
                        let key = format!("k{k}");
                        let stale = since.cleared || since.changed.contains(&k);
                        let got = cache.insert_if_epoch(digest(n), entry(&key, now, None), *epoch);
                        if stale {
                            proptest::prop_assert!(!got, "stale insert of {} accepted", key);
                        } else if since.invalidations <= 2 {
                            proptest::prop_assert!(got, "fresh insert of {} refused", key);
                        }
                        proptest::prop_assert_eq!(cache.get(&digest(n), now).is_some(), got);
                    }
                    Op::Invalidate { k } | Op::InvalidateBefore { k } => {
                        let key = format!("k{k}");
                        if matches!(op, Op::Invalidate { .. }) {
                            cache.invalidate_key(&key);
                        } else {
                            cache.invalidate_key_before(&key, 1);
                        }
                        for (_, since) in read.iter_mut().flatten() {
                            since.changed.push(k);
                            since.invalidations += 1;
                        }
                        proptest::prop_assert!(cache.map.iter().all(|e| e.key_id != key));
                        proptest::prop_assert!(cache.changed.len() <= 4);
                    }
                    Op::Clear => {
                        cache.clear();
                        for (_, since) in read.iter_mut().flatten() {
                            since.cleared = true;
                        }
                        proptest::prop_assert!(cache.is_empty());
                    }
                }
            }
        }
    }
}
