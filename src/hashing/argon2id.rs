//! argon2id into caller-provided memory: PHC strings in, PHC strings out.
//!
//! The argon2 crate's `PasswordHasher` / `PasswordVerifier` allocate `m_cost` KiB on every
//! call, in whichever thread calls; the allocator then keeps that memory per thread. Here the
//! caller passes the memory ([`Memory`]): a [`super::HashPool`] thread keeps one for its
//! lifetime. The stored hash is parsed and bounded first ([`StoredArgon2::parse`]), then the
//! raw output is computed with the stored parameters and compared in constant time.

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Version};

use super::{check_cost, random_bytes, verify_bcrypt, HashError, HashParams, HashScheme};

/// argon2 working memory, grown on demand to the largest job seen and then reused.
pub(crate) type Memory = Vec<Block>;

/// `memory` holding at least `blocks` blocks; the old buffer is freed before a larger one
/// is allocated, so a thread never holds two.
fn ensure(memory: &mut Memory, blocks: usize) -> &mut [Block] {
    if memory.len() < blocks {
        *memory = Vec::new();
        memory.resize(blocks, Block::default());
    }
    memory.as_mut_slice()
}

/// Bytes of argon2 memory `memory` holds.
pub(crate) fn memory_bytes(memory: &Memory) -> usize {
    memory.capacity() * Block::SIZE
}

/// A stored argon2id PHC string, parsed and checked against the cost bounds.
#[derive(Clone)]
pub(crate) struct StoredArgon2 {
    params: argon2::Params,
    version: Version,
    salt: Vec<u8>,
    expected: Output,
}

impl std::fmt::Debug for StoredArgon2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredArgon2")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl StoredArgon2 {
    /// Parses `phc` (`$argon2id$v=19$m=..,t=..,p=..$salt$hash`).
    ///
    /// # Errors
    /// [`HashError::Malformed`] if it is not a complete argon2id PHC string;
    /// [`HashError::TooCostly`] if its parameters exceed the bounds.
    pub(crate) fn parse(phc: &str) -> Result<Self, HashError> {
        let malformed = |reason: String| HashError::Malformed { reason };
        let parsed = PasswordHash::new(phc).map_err(|e| malformed(e.to_string()))?;
        if parsed.algorithm != argon2::ARGON2ID_IDENT {
            return Err(malformed(format!(
                "algorithm is `{}`, expected `argon2id`",
                parsed.algorithm
            )));
        }
        let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
            return Err(malformed(
                "the salt or the hash output is missing".to_owned(),
            ));
        };
        let params = argon2::Params::try_from(&parsed).map_err(|e| malformed(e.to_string()))?;
        check_cost(&params)?;
        let version = match parsed.version {
            None => Version::V0x13,
            Some(v) => Version::try_from(v).map_err(|e| malformed(e.to_string()))?,
        };
        let mut buf = [0u8; 64];
        let salt = salt
            .decode_b64(&mut buf)
            .map_err(|e| malformed(format!("salt: {e}")))?
            .to_vec();
        Ok(Self {
            params,
            version,
            salt,
            expected,
        })
    }

    /// argon2 memory blocks (KiB) a verification needs.
    pub(crate) fn block_count(&self) -> usize {
        self.params.block_count()
    }

    /// Whether `secret` hashes to the stored output (constant-time comparison).
    ///
    /// # Errors
    /// [`HashError::Malformed`] if argon2 refuses the stored inputs (a salt too short...).
    pub(crate) fn matches(&self, secret: &[u8], memory: &mut Memory) -> Result<bool, HashError> {
        let argon2 = Argon2::new(Algorithm::Argon2id, self.version, self.params.clone());
        let mut out = [0u8; Output::MAX_LENGTH];
        let out = &mut out[..self.expected.len()];
        argon2
            .hash_password_into_with_memory(
                secret,
                &self.salt,
                out,
                ensure(memory, self.block_count()),
            )
            .map_err(|e| HashError::Malformed {
                reason: e.to_string(),
            })?;
        let computed = Output::new(out).map_err(|e| HashError::Malformed {
            reason: e.to_string(),
        })?;
        // `Output`'s equality is constant-time.
        Ok(computed == self.expected)
    }
}

/// Hashes `secret` with `params` and a fresh 16-byte salt into `memory`; the PHC string.
///
/// # Errors
/// [`HashError::Params`], [`HashError::Random`] or [`HashError::Hashing`].
pub(crate) fn hash_into(
    secret: &[u8],
    params: &HashParams,
    memory: &mut Memory,
) -> Result<String, HashError> {
    let hashing = |e: &dyn std::fmt::Display| HashError::Hashing {
        reason: e.to_string(),
    };
    let argon2_params = params.argon2_params()?;
    let blocks = argon2_params.block_count();
    let salt_bytes = random_bytes::<16>()?;
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| hashing(&e))?;
    let mut out = [0u8; argon2::Params::DEFAULT_OUTPUT_LEN];
    let phc_params = ParamsString::try_from(&argon2_params).map_err(|e| hashing(&e))?;
    Argon2::new(Algorithm::Argon2id, Version::V0x13, argon2_params)
        .hash_password_into_with_memory(secret, &salt_bytes, &mut out, ensure(memory, blocks))
        .map_err(|e| hashing(&e))?;
    let phc = PasswordHash {
        algorithm: argon2::ARGON2ID_IDENT,
        version: Some(Version::V0x13.into()),
        params: phc_params,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out).map_err(|e| hashing(&e))?),
    };
    Ok(phc.to_string())
}

/// Hashes a token's secret part with argon2id and a 16-byte salt from the OS RNG.
///
/// Returns the PHC string (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`). Allocates
/// `m_cost` KiB for this call: a server hashes on its [`super::HashPool`] instead.
///
/// # Errors
/// [`HashError::Params`], [`HashError::Random`] or [`HashError::Hashing`].
pub fn hash_secret(secret: &str, params: &HashParams) -> Result<String, HashError> {
    hash_into(secret.as_bytes(), params, &mut Memory::new())
}

/// Checks a secret against a stored hash, using the hash's own parameters: an argon2id PHC
/// string, or a bcrypt hash of a key imported from fastmcp-guard 0.2 (see
/// [`verify_bcrypt`]; `secret` is then the whole 0.2 token).
///
/// Returns `Ok(false)` for a wrong secret. Allocates the hash's memory for this call: a
/// server verifies on its [`super::HashPool`] instead.
///
/// # Errors
/// [`HashError::Malformed`] if `phc` is neither an argon2id PHC string with a salt and a
/// hash nor a valid bcrypt hash; [`HashError::TooCostly`] past the cost bounds.
pub fn verify_secret(secret: &str, phc: &str) -> Result<bool, HashError> {
    if HashScheme::of(phc) == Some(HashScheme::Bcrypt) {
        return verify_bcrypt(secret, phc);
    }
    StoredArgon2::parse(phc)?.matches(secret.as_bytes(), &mut Memory::new())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::hashing::MAX_M_COST_KIB;
    use argon2::password_hash::{PasswordHasher, PasswordVerifier};

    #[test]
    fn hash_then_verify() {
        let p = HashParams::insecure_fast();
        let phc = hash_secret("s3cret", &p).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{phc}");
        assert!(verify_secret("s3cret", &phc).unwrap());
        assert!(!verify_secret("s3creT", &phc).unwrap());
        assert!(!phc.contains("s3cret"));
        // Salted: the same secret hashes differently.
        assert_ne!(phc, hash_secret("s3cret", &p).unwrap());
    }

    #[test]
    fn hashes_agree_with_the_argon2_crates_own_hasher_and_verifier() {
        // Ours verifies theirs (as every key made before the pool existed), and theirs ours.
        let params = argon2::Params::new(256, 2, 1, None).unwrap();
        let theirs = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(b"pw", &SaltString::encode_b64(b"0123456789abcdef").unwrap())
            .unwrap()
            .to_string();
        assert!(verify_secret("pw", &theirs).unwrap());
        assert!(!verify_secret("pW", &theirs).unwrap());
        let ours = hash_secret("pw", &HashParams::new(256, 2, 1).unwrap()).unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(Argon2::default().verify_password(b"pw", &parsed).is_ok());
        // Another version and a longer output, as another tool may have written them.
        let v10 = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x10,
            argon2::Params::new(64, 1, 2, Some(48)).unwrap(),
        )
        .hash_password(b"pw", &SaltString::encode_b64(b"saltsaltsalt").unwrap())
        .unwrap()
        .to_string();
        assert!(verify_secret("pw", &v10).unwrap(), "{v10}");
        assert!(!verify_secret("px", &v10).unwrap());
    }

    #[test]
    fn one_memory_serves_hashes_of_every_size_and_grows_to_the_largest() {
        let mut memory = Memory::new();
        let small = hash_secret("a", &HashParams::new(64, 1, 1).unwrap()).unwrap();
        let large = hash_secret("b", &HashParams::new(512, 1, 1).unwrap()).unwrap();
        let (small, large) = (
            StoredArgon2::parse(&small).unwrap(),
            StoredArgon2::parse(&large).unwrap(),
        );
        assert!(large.matches(b"b", &mut memory).unwrap());
        assert_eq!(memory_bytes(&memory), 512 * 1024);
        // A smaller job reuses the larger buffer (and a dirty one: no wrong answers).
        assert!(small.matches(b"a", &mut memory).unwrap());
        assert!(!small.matches(b"b", &mut memory).unwrap());
        assert!(large.matches(b"b", &mut memory).unwrap());
        assert_eq!(memory_bytes(&memory), 512 * 1024);
        let phc = hash_into(b"c", &HashParams::new(128, 1, 1).unwrap(), &mut memory).unwrap();
        assert!(verify_secret("c", &phc).unwrap());
        assert_eq!(memory_bytes(&memory), 512 * 1024);
    }

    #[test]
    fn malformed_hashes_are_errors_not_panics() {
        for phc in [
            "",
            "plain",
            "$argon2id$",
            "$argon2id$v=19$m=64,t=1,p=1$",
            "$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ",
            "$argon2id$v=19$m=1,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
            "$argon2id$v=18$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
            "$argon2id$v=19$m=64,t=1,p=1$c2FsdA$aGFzaGhhc2hoYXNo",
            "$argon2id$v=19$m=64,t=1,p=1,x=2$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
            "$2b$12$abcdefghijklmnopqrstuuABCDEFGHIJKLMNOPQRSTUVWXYZ01234",
            "$argon2i$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
        ] {
            assert!(
                matches!(verify_secret("x", phc), Err(HashError::Malformed { .. })),
                "{phc:?}: {:?}",
                verify_secret("x", phc)
            );
        }
    }

    #[test]
    fn hashes_above_the_cost_bounds_are_refused_without_allocating() {
        let huge = format!(
            "$argon2id$v=19$m={},t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
            4 * 1024 * 1024
        );
        let long = "$argon2id$v=19$m=64,t=1000000,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo";
        for phc in [huge.as_str(), long] {
            let err = StoredArgon2::parse(phc).unwrap_err();
            assert!(matches!(err, HashError::TooCostly { .. }), "{phc}: {err}");
            assert!(err.to_string().contains("re-create the key"), "{err}");
        }
        let at_bound =
            format!("$argon2id$v=19$m={MAX_M_COST_KIB},t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo");
        assert!(StoredArgon2::parse(&at_bound).is_ok());
    }
}
