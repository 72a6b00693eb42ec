//! Digests that argon2 (or bcrypt) has proven on this node, each tied to the stored hash it
//! was proven against.
//!
//! The verified-token cache forgets an entry when its TTL passes, and the refresh must
//! re-read the record (status, expiry, revision). It need not hash again: a digest proven
//! against a stored hash stays proven while that hash is unchanged. So the refresh of a
//! working token costs a store read, never argon2, and is never stopped by the failure
//! throttle or the budgets: nobody who merely knows the (public) key id can lock it out.
//!
//! A proof does not admit anything by itself: the record is always re-read and its status
//! and expiry decide, so revocation, rotation and invalidation keep taking effect at once.
//! A changed stored hash voids the proof ([`ProvenDigests::proves`] compares a fingerprint
//! of it). The set is bounded; past its capacity an arbitrary proof is forgotten (that token
//! is then hashed once more on its next refresh).

use dashmap::DashMap;

use super::digest::DigestBuildHasher;
use super::TokenDigest;

/// Default number of proofs kept (about 100 bytes each).
pub const DEFAULT_PROVEN_CAPACITY: usize = 100_000;

#[derive(Debug, Clone)]
struct Proof {
    key_id: String,
    hash_fingerprint: [u8; 32],
}

fn fingerprint(stored_hash: &str) -> [u8; 32] {
    *blake3::hash(stored_hash.as_bytes()).as_bytes()
}

/// A bounded map `TokenDigest -> (key id, fingerprint of the stored hash)`.
#[derive(Debug)]
pub struct ProvenDigests {
    map: DashMap<TokenDigest, Proof, DigestBuildHasher>,
    capacity: usize,
}

impl Default for ProvenDigests {
    fn default() -> Self {
        Self::new(DEFAULT_PROVEN_CAPACITY)
    }
}

impl ProvenDigests {
    /// At most `capacity` proofs (0 keeps none: every refresh hashes again).
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            map: DashMap::with_hasher(DigestBuildHasher::default()),
            capacity,
        }
    }

    /// Whether `digest` has a proof at all (before the record is read).
    #[must_use]
    pub fn contains(&self, digest: &TokenDigest) -> bool {
        self.map.contains_key(digest)
    }

    /// Whether `digest` was proven for key `key_id` against exactly `stored_hash`.
    #[must_use]
    pub fn proves(&self, digest: &TokenDigest, key_id: &str, stored_hash: &str) -> bool {
        self.map
            .get(digest)
            .is_some_and(|p| p.key_id == key_id && p.hash_fingerprint == fingerprint(stored_hash))
    }

    /// Records that `digest` matched `stored_hash` of key `key_id`.
    pub fn insert(&self, digest: TokenDigest, key_id: &str, stored_hash: &str) {
        if self.capacity == 0 {
            return;
        }
        if self.map.len() >= self.capacity && !self.map.contains_key(&digest) {
            // The iterator (and its shard lock) is dropped at the end of the statement.
            let victim = self.map.iter().next().map(|e| *e.key());
            if let Some(victim) = victim {
                self.map.remove(&victim);
            }
        }
        self.map.insert(
            digest,
            Proof {
                key_id: key_id.to_owned(),
                hash_fingerprint: fingerprint(stored_hash),
            },
        );
    }

    /// Forgets the proof of `digest` (its stored hash changed).
    pub fn remove(&self, digest: &TokenDigest) {
        self.map.remove(digest);
    }

    /// Number of proofs.
    #[must_use]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there is none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn digest(n: u32) -> TokenDigest {
        TokenDigest::of(&n.to_le_bytes()).unwrap()
    }

    #[test]
    fn a_proof_holds_for_its_key_and_stored_hash_only() {
        let p = ProvenDigests::default();
        p.insert(digest(1), "k", "$argon2id$one");
        assert!(p.contains(&digest(1)) && !p.contains(&digest(2)));
        assert!(p.proves(&digest(1), "k", "$argon2id$one"));
        assert!(
            !p.proves(&digest(1), "k", "$argon2id$two"),
            "a changed hash voids it"
        );
        assert!(!p.proves(&digest(1), "other", "$argon2id$one"));
        assert!(!p.proves(&digest(2), "k", "$argon2id$one"));
        p.remove(&digest(1));
        assert!(p.is_empty());
    }

    #[test]
    fn proofs_are_bounded() {
        let p = ProvenDigests::new(8);
        for i in 0..100 {
            p.insert(digest(i), "k", "h");
            assert!(p.len() <= 8);
        }
        assert!(p.proves(&digest(99), "k", "h"), "the latest survives");
        let none = ProvenDigests::new(0);
        none.insert(digest(1), "k", "h");
        assert!(none.is_empty());
    }
}
