//! The storage surface of the key service: the [`KeyBackend`] trait that
//! [`MemoryBackend`](super::MemoryBackend), [`SqliteBackend`](super::SqliteBackend) and the
//! Python-provided stores implement.

use chrono::{DateTime, Utc};

use crate::tokens;

use super::{Change, CreditLease, Credits, KeyError, KeyRecord, LegacyImport, Touch};

/// Storage for key records. Implementations are shared across threads.
///
/// Every status change gets a new store-wide `revision` (monotonic), which both guards
/// writes (optimistic concurrency) and lets other processes find what changed.
pub trait KeyBackend: Send + Sync {
    /// Stores a new record; returns the revision assigned to it.
    ///
    /// # Errors
    /// Store errors (including a duplicate id).
    fn insert(&self, record: &KeyRecord) -> Result<u64, KeyError>;

    /// The record with this id, if any.
    ///
    /// # Errors
    /// Store errors.
    fn get(&self, id: &str) -> Result<Option<KeyRecord>, KeyError>;

    /// The record imported from fastmcp-guard 0.2 whose token has this selector, if any
    /// (an indexed lookup). The default, for backends that never hold 0.2 keys, is `None`.
    ///
    /// # Errors
    /// Store errors.
    fn get_by_legacy_selector(&self, selector: &str) -> Result<Option<KeyRecord>, KeyError> {
        let _ = selector;
        Ok(None)
    }

    /// Imports fastmcp-guard 0.2 keys from the store that were not imported yet (see
    /// [`SqliteBackend::import_legacy`](super::SqliteBackend::import_legacy)). The default,
    /// for backends that cannot hold 0.2 keys, imports nothing.
    ///
    /// # Errors
    /// Store errors; a 0.2 row that cannot be read.
    fn import_legacy(&self) -> Result<LegacyImport, KeyError> {
        Ok(LegacyImport::default())
    }

    /// All records, optionally without those stored as revoked.
    ///
    /// # Errors
    /// Store errors.
    fn list(&self, include_revoked: bool) -> Result<Vec<KeyRecord>, KeyError>;

    /// Calls `each` with every key's id and, for a key imported from fastmcp-guard 0.2,
    /// its token's public part `fmg_sk_<selector>`: what a
    /// [`KeyManager`](super::KeyManager) loads when it starts, to know which ids exist.
    /// The default goes through
    /// [`list`](KeyBackend::list); a backend can read the ids alone.
    ///
    /// # Errors
    /// Store errors.
    fn for_each_label(&self, each: &mut dyn FnMut(&str)) -> Result<(), KeyError> {
        for record in self.list(true)? {
            each(&record.id);
            if let Some(selector) = &record.legacy_selector {
                each(&legacy_label(selector));
            }
        }
        Ok(())
    }

    /// Writes `record`'s management fields (`name`, `scopes`, `metadata`, `status`,
    /// `expires_at`, `grace_until`, `rotated_from`, `rotated_to`, `revoked_at`) if the stored
    /// revision still equals `record.revision`; returns the new revision.
    /// `phc_hash`, `legacy_selector`, `created_at` and `last_used_*` are never written by
    /// `update`.
    ///
    /// # Errors
    /// [`KeyError::NotFound`], [`KeyError::Conflict`], store errors.
    fn update(&self, record: &KeyRecord) -> Result<u64, KeyError>;

    /// Atomically [`update`](KeyBackend::update)s `old` and [`insert`](KeyBackend::insert)s
    /// `new`; returns their new revisions.
    ///
    /// # Errors
    /// As `update` and `insert`; on error nothing is written.
    fn rotate(&self, old: &KeyRecord, new: &KeyRecord) -> Result<(u64, u64), KeyError>;

    /// Records uses, in one transaction. A use never moves `last_used_at` backwards; unknown
    /// ids are ignored. Does not change revisions.
    ///
    /// # Errors
    /// Store errors.
    fn touch_many(&self, touches: &[Touch]) -> Result<(), KeyError>;

    /// Takes `min(want, balance)` credits of key `id` in one atomic step, after applying a
    /// top-up due at `now` (see [`Credits::lease`]). `None`: the key has no credits. Does
    /// not change the revision.
    ///
    /// # Errors
    /// [`KeyError::NotFound`]; store errors.
    fn lease_credits(
        &self,
        id: &str,
        want: u64,
        now: DateTime<Utc>,
    ) -> Result<Option<CreditLease>, KeyError>;

    /// Gives back `n` unspent credits of a lease of `epoch` (see [`Credits::give_back`]);
    /// whether they were taken back (false: the epoch moved on, or no credits any more).
    ///
    /// # Errors
    /// [`KeyError::NotFound`]; store errors.
    fn return_credits(&self, id: &str, n: u64, epoch: u64) -> Result<bool, KeyError>;

    /// Replaces the credits of key `id` by `new` if the stored ones are still `expected`
    /// (see [`same_state`](super::credits::same_state)), with a new revision; `None` if
    /// they changed since they were read.
    ///
    /// # Errors
    /// [`KeyError::NotFound`]; store errors.
    fn write_credits(
        &self,
        id: &str,
        expected: Option<&Credits>,
        new: Option<&Credits>,
    ) -> Result<Option<u64>, KeyError>;

    /// The current store revision.
    ///
    /// # Errors
    /// Store errors.
    fn current_revision(&self) -> Result<u64, KeyError>;

    /// Records changed after `revision` (with their current revision), and the revision to
    /// ask from next time.
    ///
    /// # Errors
    /// Store errors.
    fn changed_since(&self, revision: u64) -> Result<(u64, Vec<Change>), KeyError>;
}

/// The label a 0.2 token names its key by: its public part `fmg_sk_<selector>`.
pub(super) fn legacy_label(selector: &str) -> String {
    format!("{}{selector}", tokens::TOKEN_PREFIX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::hashing;
    use crate::keystore::record::now_utc;
    use crate::keystore::testing::*;
    use crate::keystore::{KeyStatus, MemoryBackend, SqliteBackend};
    use serde_json::Map;

    #[test]
    fn backends_detect_conflicts_and_missing_keys() {
        for (backend_name, m, _dir) in managers() {
            let backend = &m.inner.backend;
            let (rec, _) = m.create("a", &[], None, Map::new()).unwrap();
            let mut stale = rec.clone();
            m.revoke(&rec.id).unwrap();
            stale.name = "renamed".to_owned();
            assert!(
                matches!(backend.update(&stale), Err(KeyError::Conflict { .. })),
                "{backend_name}"
            );
            stale.id = "fmg_key_AAAAAAAAAAAAAAAA".to_owned();
            assert!(matches!(
                backend.update(&stale),
                Err(KeyError::NotFound { .. })
            ));
            assert!(matches!(
                backend.insert(&rec),
                Err(KeyError::InvalidInput { field: "id", .. })
            ));
            // A failed rotate writes nothing.
            let mut fresh = rec.clone();
            fresh.id = tokens::generate().unwrap().1;
            assert!(backend.rotate(&stale, &fresh).is_err());
            assert!(backend.get(&fresh.id).unwrap().is_none());
        }
    }

    #[test]
    fn changed_since_reports_changed_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let writer = SqliteBackend::open(&path).unwrap();
        let watcher = SqliteBackend::open(&path).unwrap();
        let mem = MemoryBackend::new();
        for (name, w, r) in [
            (
                "sqlite",
                &writer as &dyn KeyBackend,
                &watcher as &dyn KeyBackend,
            ),
            ("memory", &mem, &mem),
        ] {
            let m_opts = opts();
            let rev0 = r.current_revision().unwrap();
            let (_, id) = tokens::generate().unwrap();
            let mut rec = KeyRecord {
                id: id.clone(),
                name: "x".to_owned(),
                phc_hash: hashing::hash_secret("s", &m_opts.hash_params).unwrap(),
                scopes: vec![],
                metadata: Map::new(),
                status: KeyStatus::Active,
                created_at: now_utc(),
                expires_at: None,
                last_used_at: None,
                last_used_ip: None,
                grace_until: None,
                rotated_from: None,
                rotated_to: None,
                revoked_at: None,
                revision: 0,
                legacy_selector: None,
                credits: None,
            };
            rec.revision = w.insert(&rec).unwrap();
            let (rev1, changes) = r.changed_since(rev0).unwrap();
            assert_eq!(
                changes,
                vec![Change {
                    id: id.clone(),
                    revision: rec.revision
                }],
                "{name}"
            );
            assert!(rev1 > rev0);
            assert_eq!(r.changed_since(rev1).unwrap(), (rev1, vec![]), "{name}");
            // Touches do not count as changes.
            w.touch_many(&[Touch {
                id: id.clone(),
                at: now_utc(),
                ip: None,
            }])
            .unwrap();
            assert_eq!(r.changed_since(rev1).unwrap(), (rev1, vec![]), "{name}");
            rec.status = KeyStatus::Revoked;
            let rev_revoked = w.update(&rec).unwrap();
            let (rev2, changes) = r.changed_since(rev1).unwrap();
            assert_eq!(
                changes,
                vec![Change {
                    id,
                    revision: rev_revoked
                }],
                "{name}"
            );
            assert!(rev2 > rev1);
        }
    }

    #[test]
    fn touches_never_move_last_used_backwards() {
        for (name, m, _dir) in managers() {
            let (rec, _) = m.create("a", &[], None, Map::new()).unwrap();
            let t1 = now_utc();
            let t0 = t1 - chrono::Duration::seconds(10);
            let b = &m.inner.backend;
            b.touch_many(&[Touch {
                id: rec.id.clone(),
                at: t1,
                ip: Some("1.1.1.1".into()),
            }])
            .unwrap();
            b.touch_many(&[Touch {
                id: rec.id.clone(),
                at: t0,
                ip: Some("2.2.2.2".into()),
            }])
            .unwrap();
            let got = m.get(&rec.id).unwrap();
            assert_eq!(got.last_used_at, Some(t1), "{name}");
            assert_eq!(got.last_used_ip.as_deref(), Some("1.1.1.1"), "{name}");
            b.touch_many(&[Touch {
                id: "fmg_key_AAAAAAAAAAAAAAAA".into(),
                at: t1,
                ip: None,
            }])
            .unwrap();
        }
    }
}
