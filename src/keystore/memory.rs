//! In-memory key backend (tests, ephemeral servers). Lost when dropped.
//!
//! One `RwLock` over a `HashMap`: this backend is only read on the slow path
//! (cache misses and management calls), never on a cache hit.
//!
//! There is nothing to import from fastmcp-guard 0.2 here, but records inserted with a
//! `legacy_selector` are indexed by it, so the 0.2 verification path works (and is tested)
//! on both backends.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use parking_lot::RwLock;

use super::{Change, CreditLease, Credits, KeyBackend, KeyError, KeyRecord, Touch};

#[derive(Debug, Default)]
struct State {
    records: HashMap<String, KeyRecord>,
    /// 0.2 selector -> key id.
    legacy: HashMap<String, String>,
    revision: u64,
}

impl State {
    fn next_revision(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    fn check_update(&self, record: &KeyRecord) -> Result<(), KeyError> {
        match self.records.get(&record.id) {
            None => Err(KeyError::NotFound {
                id: record.id.clone(),
            }),
            Some(stored) if stored.revision != record.revision => Err(KeyError::Conflict {
                id: record.id.clone(),
            }),
            Some(_) => Ok(()),
        }
    }

    fn apply_update(&mut self, record: &KeyRecord, revision: u64) {
        if let Some(stored) = self.records.get_mut(&record.id) {
            stored.name.clone_from(&record.name);
            stored.scopes.clone_from(&record.scopes);
            stored.metadata.clone_from(&record.metadata);
            stored.status = record.status;
            stored.expires_at = record.expires_at;
            stored.grace_until = record.grace_until;
            stored.rotated_from.clone_from(&record.rotated_from);
            stored.rotated_to.clone_from(&record.rotated_to);
            stored.revoked_at = record.revoked_at;
            stored.revision = revision;
        }
    }

    fn check_insert(&self, record: &KeyRecord) -> Result<(), KeyError> {
        if self.records.contains_key(&record.id) {
            return Err(KeyError::InvalidInput {
                field: "id",
                reason: format!("a key with id `{}` already exists", record.id),
            });
        }
        if let Some(sel) = &record.legacy_selector {
            if self.legacy.contains_key(sel) {
                return Err(KeyError::InvalidInput {
                    field: "legacy_selector",
                    reason: format!("a key with 0.2 selector `{sel}` already exists"),
                });
            }
        }
        Ok(())
    }

    fn apply_insert(&mut self, record: &KeyRecord, revision: u64) {
        let mut stored = record.clone();
        stored.revision = revision;
        if let Some(sel) = &stored.legacy_selector {
            self.legacy.insert(sel.clone(), stored.id.clone());
        }
        self.records.insert(stored.id.clone(), stored);
    }
}

/// A [`KeyBackend`] held in process memory.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    state: RwLock<State>,
}

impl MemoryBackend {
    /// An empty store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }
}

impl KeyBackend for MemoryBackend {
    fn insert(&self, record: &KeyRecord) -> Result<u64, KeyError> {
        let mut state = self.state.write();
        state.check_insert(record)?;
        let rev = state.next_revision();
        state.apply_insert(record, rev);
        Ok(rev)
    }

    fn get(&self, id: &str) -> Result<Option<KeyRecord>, KeyError> {
        Ok(self.state.read().records.get(id).cloned())
    }

    fn get_by_legacy_selector(&self, selector: &str) -> Result<Option<KeyRecord>, KeyError> {
        let state = self.state.read();
        Ok(state
            .legacy
            .get(selector)
            .and_then(|id| state.records.get(id))
            .cloned())
    }

    fn list(&self, include_revoked: bool) -> Result<Vec<KeyRecord>, KeyError> {
        Ok(self
            .state
            .read()
            .records
            .values()
            .filter(|r| include_revoked || r.status != super::KeyStatus::Revoked)
            .cloned()
            .collect())
    }

    fn update(&self, record: &KeyRecord) -> Result<u64, KeyError> {
        let mut state = self.state.write();
        state.check_update(record)?;
        let rev = state.next_revision();
        state.apply_update(record, rev);
        Ok(rev)
    }

    fn rotate(&self, old: &KeyRecord, new: &KeyRecord) -> Result<(u64, u64), KeyError> {
        let mut state = self.state.write();
        state.check_update(old)?;
        state.check_insert(new)?;
        let old_rev = state.next_revision();
        state.apply_update(old, old_rev);
        let new_rev = state.next_revision();
        state.apply_insert(new, new_rev);
        Ok((old_rev, new_rev))
    }

    fn touch_many(&self, touches: &[Touch]) -> Result<(), KeyError> {
        let mut state = self.state.write();
        for t in touches {
            if let Some(r) = state.records.get_mut(&t.id) {
                if r.last_used_at.is_none_or(|prev| t.at >= prev) {
                    r.last_used_at = Some(t.at);
                    if t.ip.is_some() {
                        r.last_used_ip.clone_from(&t.ip);
                    }
                }
            }
        }
        Ok(())
    }

    fn lease_credits(
        &self,
        id: &str,
        want: u64,
        now: DateTime<Utc>,
    ) -> Result<Option<CreditLease>, KeyError> {
        let mut state = self.state.write();
        let record = state
            .records
            .get_mut(id)
            .ok_or_else(|| KeyError::NotFound { id: id.to_owned() })?;
        Ok(record.credits.as_mut().map(|c| c.lease(want, now)))
    }

    fn return_credits(&self, id: &str, n: u64, epoch: u64) -> Result<bool, KeyError> {
        let mut state = self.state.write();
        let record = state
            .records
            .get_mut(id)
            .ok_or_else(|| KeyError::NotFound { id: id.to_owned() })?;
        Ok(record
            .credits
            .as_mut()
            .is_some_and(|c| c.give_back(n, epoch)))
    }

    fn write_credits(
        &self,
        id: &str,
        expected: Option<&Credits>,
        new: Option<&Credits>,
    ) -> Result<Option<u64>, KeyError> {
        let mut state = self.state.write();
        let current = state
            .records
            .get(id)
            .ok_or_else(|| KeyError::NotFound { id: id.to_owned() })?;
        if !super::credits::same_state(current.credits.as_ref(), expected) {
            return Ok(None);
        }
        let rev = state.next_revision();
        if let Some(record) = state.records.get_mut(id) {
            record.credits = new.cloned();
            record.revision = rev;
        }
        Ok(Some(rev))
    }

    fn current_revision(&self) -> Result<u64, KeyError> {
        Ok(self.state.read().revision)
    }

    fn changed_since(&self, revision: u64) -> Result<(u64, Vec<Change>), KeyError> {
        let state = self.state.read();
        if state.revision <= revision {
            return Ok((revision, Vec::new()));
        }
        let changed = state
            .records
            .values()
            .filter(|r| r.revision > revision)
            .map(|r| Change {
                id: r.id.clone(),
                revision: r.revision,
            })
            .collect();
        Ok((state.revision, changed))
    }
}
