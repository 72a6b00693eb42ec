//! Secret hashing (argon2id, PHC strings) on a fixed pool of threads, the keyed token
//! digest, and the caches that make a valid key cost microseconds.
//!
//! * At rest, only `hash_secret(secret)` is stored: argon2id with a random salt, as a PHC string.
//! * A server hashes on a [`HashPool`]: a fixed number of threads, each holding its argon2
//!   memory (one allocation, sized for the largest `m_cost` it has seen, at most
//!   [`MAX_M_COST_KIB`]) and reusing it for every job. Memory use is therefore bounded by
//!   `threads × m_cost` however many verifications fail, instead of growing with the number
//!   of threads that ever called argon2 (the allocator keeps freed memory per thread).
//! * In memory, verified tokens are cached under a [`TokenDigest`]: a blake3 keyed hash of the
//!   whole token with a key drawn from the OS RNG once per process. The cache never holds the
//!   token or the secret, and a digest is useless outside the process that made it.
//!   [`ProvenDigests`] remembers which digests argon2 proved against which stored hash, so a
//!   refresh after the cache TTL re-reads the record but never hashes again.
//! * Keys imported from fastmcp-guard 0.2 carry a bcrypt hash (`$2b$12$...`) of their whole
//!   token instead. [`verify_secret`] recognises them ([`HashScheme::of`]) and checks them
//!   with bcrypt; this crate never makes new bcrypt hashes.

mod argon2id;
mod bcrypt;
mod cache;
mod digest;
mod pool;
mod proven;

use std::time::{Duration, Instant};

pub use self::argon2id::{hash_secret, verify_secret};
pub use self::bcrypt::{verify_bcrypt, MAX_BCRYPT_COST, MIN_BCRYPT_COST};
pub use self::cache::{
    Attachment, CachedKey, VerifiedCache, CHANGES_KEPT, DEFAULT_CACHE_CAPACITY, DEFAULT_CACHE_TTL,
};
pub use self::digest::{DigestHasher, TokenDigest};
pub use self::pool::{HashPool, PoolError};
pub use self::proven::{ProvenDigests, DEFAULT_PROVEN_CAPACITY};

/// Errors from hashing and verifying secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    /// Argon2 parameters out of range.
    #[error(
        "invalid argon2id parameters (m_cost={m_cost} KiB, t_cost={t_cost}, p_cost={p_cost}): \
         {reason}"
    )]
    Params {
        /// Memory cost in KiB.
        m_cost: u32,
        /// Iterations.
        t_cost: u32,
        /// Parallelism.
        p_cost: u32,
        /// What argon2 objected to.
        reason: String,
    },
    /// A stored hash is not a valid argon2id PHC string (or, for keys imported from
    /// fastmcp-guard 0.2, not a valid bcrypt hash).
    #[error(
        "stored key hash is not a valid argon2id PHC string or bcrypt hash: {reason}; \
         re-create the key"
    )]
    Malformed {
        /// What is wrong with it (never includes the hash itself).
        reason: String,
    },
    /// A stored hash asks for more memory or time than this build spends on one
    /// verification (see [`MAX_M_COST_KIB`], [`MAX_T_COST`], [`MAX_P_COST`]).
    #[error(
        "stored key hash asks for {reason}; this server verifies at most m_cost={max_m} KiB, \
         t_cost={max_t}, p_cost={max_p}: re-create the key with the default parameters",
        max_m = MAX_M_COST_KIB, max_t = MAX_T_COST, max_p = MAX_P_COST
    )]
    TooCostly {
        /// The parameter out of bounds, e.g. `m_cost=1048576 KiB`.
        reason: String,
    },
    /// Hashing failed.
    #[error("argon2id hashing failed: {reason}")]
    Hashing {
        /// The argon2 error.
        reason: String,
    },
    /// The OS random number generator failed.
    #[error("the OS random number generator failed: {reason}")]
    Random {
        /// The OS error.
        reason: String,
    },
}

/// Largest argon2 memory cost (KiB) a stored hash may ask for: 64 MiB, RFC 9106's second
/// recommended setting. Each hashing thread holds this much at most, so a pool of `n`
/// threads holds at most `n × 64 MiB`; a stored hash asking for more is refused as a store
/// error ([`HashError::TooCostly`]) instead of being allocated.
pub const MAX_M_COST_KIB: u32 = 65_536;
/// Largest argon2 iteration count a stored hash may ask for (bounds the time one failed
/// verification holds a hashing thread).
pub const MAX_T_COST: u32 = 16;
/// Largest argon2 lane count a stored hash may ask for.
pub const MAX_P_COST: u32 = 16;

/// Argon2id cost parameters.
///
/// Production uses [`HashParams::default`] (the OWASP recommendation: m=19456 KiB, t=2, p=1).
/// [`HashParams::insecure_fast`] exists for tests only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(
    clippy::struct_field_names,
    reason = "argon2's own names for its three costs"
)]
pub struct HashParams {
    m_cost: u32,
    t_cost: u32,
    p_cost: u32,
}

impl Default for HashParams {
    /// OWASP argon2id: 19 MiB, 2 iterations, 1 lane.
    fn default() -> Self {
        Self {
            m_cost: 19_456,
            t_cost: 2,
            p_cost: 1,
        }
    }
}

impl HashParams {
    /// Custom parameters (memory in KiB, iterations, lanes), validated by argon2 and
    /// bounded by [`MAX_M_COST_KIB`], [`MAX_T_COST`] and [`MAX_P_COST`] (so every key made
    /// with them can be verified).
    ///
    /// # Errors
    /// [`HashError::Params`] if argon2 refuses them (e.g. `m_cost < 8 * p_cost`) or they
    /// exceed the bounds.
    pub fn new(m_cost: u32, t_cost: u32, p_cost: u32) -> Result<Self, HashError> {
        let p = Self {
            m_cost,
            t_cost,
            p_cost,
        };
        let params = p.argon2_params()?;
        check_cost(&params).map_err(|e| HashError::Params {
            m_cost,
            t_cost,
            p_cost,
            reason: e.to_string(),
        })?;
        Ok(p)
    }

    /// Very cheap parameters (64 KiB, 1 iteration) — **for tests only**: hashes made with them
    /// can be brute-forced. Production uses [`HashParams::default`].
    #[must_use]
    pub fn insecure_fast() -> Self {
        Self {
            m_cost: 64,
            t_cost: 1,
            p_cost: 1,
        }
    }

    /// Memory cost in KiB.
    #[must_use]
    pub fn m_cost(&self) -> u32 {
        self.m_cost
    }

    /// Number of iterations.
    #[must_use]
    pub fn t_cost(&self) -> u32 {
        self.t_cost
    }

    /// Degree of parallelism.
    #[must_use]
    pub fn p_cost(&self) -> u32 {
        self.p_cost
    }

    fn argon2_params(&self) -> Result<argon2::Params, HashError> {
        argon2::Params::new(self.m_cost, self.t_cost, self.p_cost, None).map_err(|e| {
            HashError::Params {
                m_cost: self.m_cost,
                t_cost: self.t_cost,
                p_cost: self.p_cost,
                reason: e.to_string(),
            }
        })
    }
}

/// Refuses parameters above the bounds ([`HashError::TooCostly`]).
fn check_cost(p: &argon2::Params) -> Result<(), HashError> {
    let too = |reason: String| Err(HashError::TooCostly { reason });
    if p.m_cost() > MAX_M_COST_KIB {
        return too(format!("m_cost={} KiB", p.m_cost()));
    }
    if p.t_cost() > MAX_T_COST {
        return too(format!("t_cost={}", p.t_cost()));
    }
    if p.p_cost() > MAX_P_COST {
        return too(format!("p_cost={}", p.p_cost()));
    }
    Ok(())
}

fn random_bytes<const N: usize>() -> Result<[u8; N], HashError> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(|e| HashError::Random {
        reason: e.to_string(),
    })?;
    Ok(buf)
}

/// The algorithm of a stored hash, told by its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashScheme {
    /// `$argon2id$...`: keys made by this version (hash of the token's secret part).
    Argon2id,
    /// `$2a$`, `$2b$` or `$2y$`: keys imported from fastmcp-guard 0.2 (hash of the whole
    /// token).
    Bcrypt,
}

impl HashScheme {
    /// The scheme of `hash` by its prefix alone (not a validation), or `None`.
    #[must_use]
    pub fn of(hash: &str) -> Option<Self> {
        if hash.starts_with("$argon2id$") {
            Some(Self::Argon2id)
        } else if ["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p)) {
            Some(Self::Bcrypt)
        } else {
            None
        }
    }
}

/// A reading of both clocks: monotonic for cache TTLs and throttle windows, wall clock
/// (unix milliseconds) for key expiry and grace periods. Injectable for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time.
    pub instant: Instant,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub unix_ms: i64,
}

impl Now {
    /// The current time from the system clocks.
    #[must_use]
    pub fn system() -> Self {
        Self {
            instant: Instant::now(),
            unix_ms: chrono::Utc::now().timestamp_millis(),
        }
    }

    /// This reading moved `d` into the future on both clocks (saturating).
    #[must_use]
    pub fn after(self, d: Duration) -> Self {
        Self {
            instant: self.instant.checked_add(d).unwrap_or(self.instant),
            unix_ms: self
                .unix_ms
                .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn default_params_are_owasp() {
        let p = HashParams::default();
        assert_eq!((p.m_cost(), p.t_cost(), p.p_cost()), (19_456, 2, 1));
        let phc = hash_secret("x", &p).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(verify_secret("x", &phc).unwrap());
    }

    #[test]
    fn bad_params_are_refused() {
        let err = HashParams::new(1, 1, 1).unwrap_err();
        assert!(matches!(err, HashError::Params { m_cost: 1, .. }), "{err}");
        assert!(HashParams::new(4096, 3, 1).is_ok());
        // Above the bounds a verifier would refuse: refused when made, too.
        for (m, t, p) in [(MAX_M_COST_KIB + 1, 2, 1), (19_456, MAX_T_COST + 1, 1)] {
            let err = HashParams::new(m, t, p).unwrap_err();
            assert!(matches!(err, HashError::Params { .. }), "{err}");
        }
        assert!(HashParams::new(MAX_M_COST_KIB, MAX_T_COST, 1).is_ok());
    }
}
