//! The keyed token digest: what the caches are keyed by instead of the token.

use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::OnceLock;

use super::{random_bytes, HashError};

static DIGEST_KEY: OnceLock<[u8; 32]> = OnceLock::new();

fn digest_key() -> Result<&'static [u8; 32], HashError> {
    if let Some(key) = DIGEST_KEY.get() {
        return Ok(key);
    }
    let fresh = random_bytes::<32>()?;
    // If another thread won the race, its key is kept and ours is dropped.
    Ok(DIGEST_KEY.get_or_init(|| fresh))
}

/// A keyed blake3 digest of a whole token; the verified-token cache is keyed by it.
///
/// The key is random per process, so digests cannot be precomputed or compared across
/// processes. `Debug` does not print the bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenDigest([u8; 32]);

impl TokenDigest {
    /// The digest of `token` under this process's key.
    ///
    /// # Errors
    /// [`HashError::Random`] if the process key cannot be drawn (first call only).
    pub fn of(token: &[u8]) -> Result<Self, HashError> {
        Ok(Self(*blake3::keyed_hash(digest_key()?, token).as_bytes()))
    }

    /// The raw digest bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenDigest(..)")
    }
}

impl Hash for TokenDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The digest is already a uniform keyed hash: 8 of its bytes are a fine hash value.
        let mut head = [0u8; 8];
        head.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(head));
    }
}

/// A pass-through hasher for [`TokenDigest`] keys (they are already random; no `SipHash` needed,
/// and an attacker cannot aim at buckets without the process key).
#[derive(Debug, Default, Clone, Copy)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

pub(crate) type DigestBuildHasher = BuildHasherDefault<DigestHasher>;

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn digest_is_keyed_and_stable_in_process() {
        let a = TokenDigest::of(b"fmg_sk_a").unwrap();
        assert_eq!(a, TokenDigest::of(b"fmg_sk_a").unwrap());
        assert_ne!(a, TokenDigest::of(b"fmg_sk_b").unwrap());
        // Not the unkeyed hash.
        assert_ne!(a.as_bytes(), blake3::hash(b"fmg_sk_a").as_bytes());
        assert_eq!(format!("{a:?}"), "TokenDigest(..)");
    }
}
