//! The key ids known to exist: what lets the unknown-id budget stop store reads for ids
//! that do not exist without ever refusing one that does.
//!
//! Filled from the store when the [`super::KeyManager`] starts (ids and 0.2 labels only, no
//! record decoded), and added to on every create, rotate and 0.2 import of this manager,
//! every store read that found a record, and every change the watcher or a change
//! notification ([`super::KeyManager::invalidate`]) reports. Keys are never deleted, so the
//! set only grows.
//!
//! It holds keyed 64-bit hashes of the labels (SipHash with a key drawn per process), about
//! 16 bytes per id, not the ids: a made-up id that collides with a known one (a chance of
//! about n / 2^64 per guess, and the key cannot be aimed at) is merely read from the store.
//! Past its capacity it stops growing and answers "may exist" for every id: the unknown-id
//! budget then no longer applies (reads are still bounded by the negative cache), rather
//! than refusing a key that exists.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};

use parking_lot::RwLock;

/// Default most ids held (about 16 MB at most).
pub const DEFAULT_KNOWN_IDS_CAPACITY: usize = 1_000_000;

/// A grow-only set of key labels (key ids, 0.2 public parts), bounded.
#[derive(Debug)]
pub(crate) struct KnownIds {
    hasher: RandomState,
    set: RwLock<HashSet<u64>>,
    capacity: usize,
}

impl KnownIds {
    /// At most `capacity` labels (0 keeps none: every id then "may exist").
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            hasher: RandomState::new(),
            set: RwLock::new(HashSet::new()),
            capacity,
        }
    }

    fn hash(&self, label: &str) -> u64 {
        self.hasher.hash_one(label)
    }

    /// Remembers that a key `label` exists (unless the set is full).
    pub(crate) fn insert(&self, label: &str) {
        let h = self.hash(label);
        if self.set.read().contains(&h) {
            return;
        }
        let mut set = self.set.write();
        if set.len() < self.capacity {
            set.insert(h);
        }
    }

    /// Remembers many labels under one lock (the manager's start).
    pub(crate) fn extend_with<E>(
        &self,
        fill: impl FnOnce(&mut dyn FnMut(&str)) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut set = self.set.write();
        let cap = self.capacity;
        fill(&mut |label: &str| {
            if set.len() < cap {
                set.insert(self.hasher.hash_one(label));
            }
        })
    }

    /// Whether a key `label` may exist: known, or the set is full (then nothing is known
    /// not to exist).
    pub(crate) fn may_exist(&self, label: &str) -> bool {
        let h = self.hash(label);
        let set = self.set.read();
        set.len() >= self.capacity || set.contains(&h)
    }

    /// Labels held.
    pub(crate) fn len(&self) -> usize {
        self.set.read().len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn labels_are_known_once_inserted_and_a_full_set_knows_nothing_missing() {
        let k = KnownIds::new(3);
        assert!(!k.may_exist("a"));
        k.insert("a");
        k.insert("a");
        assert!(k.may_exist("a") && !k.may_exist("b"));
        assert_eq!(k.len(), 1);
        let filled: Result<(), ()> = k.extend_with(|each| {
            for l in ["b", "c", "d", "e"] {
                each(l);
            }
            Ok(())
        });
        filled.unwrap();
        assert_eq!(k.len(), 3, "capped");
        // Full: every id may exist (the unknown-id budget no longer refuses).
        assert!(k.may_exist("never seen"));
        let none = KnownIds::new(0);
        none.insert("a");
        assert_eq!(none.len(), 0);
        assert!(none.may_exist("anything"));
    }
}
