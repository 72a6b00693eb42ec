//! [`ManagerOptions`]: the settings of a [`KeyManager`](super::KeyManager), their defaults
//! and their checks.

use std::time::Duration;

use crate::hashing::{self, HashParams};

use super::{known, FailThrottle, KeyError, DEFAULT_NEGATIVE_CAPACITY, DEFAULT_NEGATIVE_TTL};

/// Options of a [`KeyManager`](super::KeyManager).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagerOptions {
    /// argon2id cost of new keys (default: OWASP; verification uses each hash's own cost).
    pub hash_params: HashParams,
    /// Maximum number of cached verified tokens (0 disables the cache).
    pub cache_capacity: usize,
    /// How long a verified token is served from the cache before the store is read again.
    pub cache_ttl: Duration,
    /// How often pending `last_used_at` updates are written (default 5 s).
    pub touch_interval: Duration,
    /// How often the store is polled for changes by other processes (default 250 ms).
    pub watch_interval: Duration,
    /// Number of hashing threads (argon2, and bcrypt for 0.2 keys), each holding its own
    /// argon2 memory (default: available parallelism). Hashing runs nowhere else.
    pub max_concurrent_verifications: usize,
    /// How long a verification waits for a hashing thread to start it before
    /// [`VerifyError::Busy`](super::VerifyError::Busy) (default 2 s).
    pub verify_wait: Duration,
    /// Failure budgets per (client address, key id), per key id and per server.
    pub fail_throttle: FailThrottle,
    /// How long an unknown key id is remembered (default 5 s; 0 disables the negative
    /// cache).
    pub negative_ttl: Duration,
    /// Maximum number of unknown key ids remembered.
    pub negative_capacity: usize,
    /// Maximum number of digests remembered as proven (a proven token's refresh reads the
    /// record but never hashes; 0 keeps none).
    pub proven_capacity: usize,
    /// Maximum number of key ids remembered as existing (default 1,000,000, about 16 MB):
    /// the unknown-id budget never refuses an id known to exist, and past this many (or
    /// with 0) it no longer applies at all rather than refuse a key that exists.
    pub known_ids_capacity: usize,
    /// Run the `fmg-keys` thread that writes `last_used_at` every `touch_interval` and
    /// polls for changes every `watch_interval` (default). Off for a store implemented in
    /// Python: its owner calls [`KeyManager::flush`](super::KeyManager::flush) and
    /// [`KeyManager::sync_changes`](super::KeyManager::sync_changes) from
    /// a Python thread, which the interpreter can stop at exit (a Rust thread blocked on
    /// the interpreter could not be joined then).
    pub background_thread: bool,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        Self {
            hash_params: HashParams::default(),
            cache_capacity: hashing::DEFAULT_CACHE_CAPACITY,
            cache_ttl: hashing::DEFAULT_CACHE_TTL,
            touch_interval: Duration::from_secs(5),
            watch_interval: Duration::from_millis(250),
            max_concurrent_verifications: std::thread::available_parallelism()
                .map_or(1, std::num::NonZero::get),
            verify_wait: Duration::from_secs(2),
            fail_throttle: FailThrottle::default(),
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            negative_capacity: DEFAULT_NEGATIVE_CAPACITY,
            proven_capacity: hashing::DEFAULT_PROVEN_CAPACITY,
            known_ids_capacity: known::DEFAULT_KNOWN_IDS_CAPACITY,
            background_thread: true,
        }
    }
}

impl ManagerOptions {
    pub(super) fn validate(&self) -> Result<(), KeyError> {
        let positive = [
            ("touch_interval", self.touch_interval),
            ("watch_interval", self.watch_interval),
            ("fail_throttle.window", self.fail_throttle.window),
        ];
        for (field, d) in positive {
            if d.is_zero() {
                return Err(KeyError::InvalidInput {
                    field,
                    reason: "must be greater than zero".to_owned(),
                });
            }
        }
        if self.max_concurrent_verifications == 0 {
            return Err(KeyError::InvalidInput {
                field: "max_concurrent_verifications",
                reason: "must be at least 1".to_owned(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::keystore::testing::*;
    use crate::keystore::KeyManager;

    #[test]
    fn bad_options_are_refused() {
        let err = KeyManager::memory(ManagerOptions {
            watch_interval: Duration::ZERO,
            ..opts()
        })
        .unwrap_err();
        assert!(
            matches!(
                err,
                KeyError::InvalidInput {
                    field: "watch_interval",
                    ..
                }
            ),
            "{err}"
        );
        let err = KeyManager::memory(ManagerOptions {
            max_concurrent_verifications: 0,
            ..opts()
        })
        .unwrap_err();
        assert!(matches!(err, KeyError::InvalidInput { .. }), "{err}");
    }
}
