//! The negative cache: key ids (or 0.2 selectors) the store did not have, for a few seconds.
//!
//! A token naming an unknown key id costs one store read; repeating it within the TTL costs
//! none. Key ids are public, so this is not about secrecy: it bounds what a flood of one
//! made-up id costs the store. Entries are dropped when a key with that id appears: created
//! by this manager, imported from 0.2, or reported by the store's change feed (another
//! node's creation, seen within `watch_interval` or on its change notification). The TTL
//! bounds the delay in every other case.

use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Default time an unknown id is remembered.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Default number of unknown ids remembered.
pub const DEFAULT_NEGATIVE_CAPACITY: usize = 10_000;

/// A bounded TTL set of unknown key labels.
#[derive(Debug)]
pub(crate) struct NegativeCache {
    map: DashMap<String, Instant>,
    capacity: usize,
    ttl: Duration,
}

impl NegativeCache {
    /// At most `capacity` labels for `ttl` each (0 for either disables it).
    pub(crate) fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            map: DashMap::new(),
            capacity,
            ttl,
        }
    }

    /// Whether `label` was found unknown less than the TTL ago.
    pub(crate) fn contains(&self, label: &str, now: Instant) -> bool {
        self.map
            .get(label)
            .is_some_and(|at| now.saturating_duration_since(*at) < self.ttl)
    }

    /// Remembers that the store has no key `label`.
    pub(crate) fn insert(&self, label: &str, now: Instant) {
        if self.capacity == 0 || self.ttl.is_zero() {
            return;
        }
        if self.map.len() >= self.capacity && !self.map.contains_key(label) {
            let ttl = self.ttl;
            self.map
                .retain(|_, at| now.saturating_duration_since(*at) < ttl);
            while self.map.len() >= self.capacity {
                let victim = self.map.iter().next().map(|e| e.key().clone());
                match victim {
                    Some(v) => {
                        self.map.remove(&v);
                    }
                    None => break,
                }
            }
        }
        self.map.insert(label.to_owned(), now);
    }

    /// Forgets `label` (a key with that id or selector now exists).
    pub(crate) fn remove(&self, label: &str) {
        self.map.remove(label);
    }

    /// Forgets everything.
    pub(crate) fn clear(&self) {
        self.map.clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_the_set_stays_bounded() {
        let n = NegativeCache::new(4, Duration::from_secs(5));
        let now = Instant::now();
        n.insert("a", now);
        assert!(n.contains("a", now + Duration::from_secs(4)));
        assert!(!n.contains("a", now + Duration::from_secs(5)));
        assert!(!n.contains("b", now));
        for i in 0..50 {
            n.insert(&format!("k{i}"), now);
            assert!(n.len() <= 4);
        }
        assert!(n.contains("k49", now));
        // Expired ones make room first.
        let later = now + Duration::from_secs(6);
        n.insert("fresh", later);
        assert_eq!(n.len(), 1);
        n.remove("fresh");
        assert!(!n.contains("fresh", later));
        let off = NegativeCache::new(0, Duration::from_secs(5));
        off.insert("a", now);
        assert!(!off.contains("a", now));
    }
}
