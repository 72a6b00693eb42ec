//! The background side of a [`KeyManager`]: uses of keys waiting to be written
//! (`last_used_at`, in batches), the watch for changes made by other processes, and the
//! `fmg-keys` thread that runs both.

use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::hashing::{CachedKey, Now};

use super::backend::legacy_label;
use super::manager::{increment, Inner};
use super::record::utc_from_ms;
use super::{KeyError, KeyManager, Touch};

fn deadline_after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(86_400 * 365)))
        .unwrap_or(now)
}

#[derive(Debug, Clone)]
pub(super) struct PendingTouch {
    pub(super) at_ms: i64,
    pub(super) ip: Option<String>,
}

/// A cached token records a use at most once per this many ms (keeps the hit path read-only).
const TOUCH_EVERY_MS: i64 = 1_000;

pub(super) struct Worker {
    pub(super) stop: crossbeam_channel::Sender<()>,
    pub(super) handle: JoinHandle<()>,
}

impl KeyManager {
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
}

impl Inner {
    /// Records a use in memory (written by the next flush). At most once per second per
    /// cached token, so the hit path stays read-mostly.
    pub(super) fn record_use(&self, entry: &CachedKey, client: Option<&str>, now: Now) {
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

    pub(super) fn flush_touches(&self) -> Result<usize, KeyError> {
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
                increment(&self.counters.touch_batches);
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

    pub(super) fn note_own_write(&self, id: &str, revision: u64) {
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
                    increment(&self.counters.invalidations);
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

    pub(super) fn note_error(&self, what: &str, e: &KeyError) {
        increment(&self.counters.background_errors);
        *self.last_error.lock() = Some(format!("{what}: {e}"));
    }
}

pub(super) fn run_worker(
    weak: &Weak<Inner>,
    stop: &crossbeam_channel::Receiver<()>,
    touch_every: Duration,
    watch_every: Duration,
) {
    let start = Instant::now();
    let mut next_touch = deadline_after(start, touch_every);
    let mut next_watch = deadline_after(start, watch_every);
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
            next_watch = deadline_after(now, watch_every);
        }
        if now >= next_touch {
            if let Err(e) = inner.flush_touches() {
                inner.note_error("writing last_used_at", &e);
            }
            next_touch = deadline_after(now, touch_every);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::hashing::Now;
    use crate::keystore::testing::*;
    use crate::keystore::{CacheLookup, ManagerOptions, MemoryBackend, VerifyError};
    use crate::tokens;
    use serde_json::Map;
    use std::sync::Arc;
    use std::time::Duration;

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
}
