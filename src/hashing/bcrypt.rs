//! Checking the bcrypt hashes of keys imported from fastmcp-guard 0.2 (never made here).

use super::{HashError, HashScheme};

/// the work, and cost 31 would hold a verification slot for days, so a larger cost in a
/// stored hash is treated as malformed rather than run.
pub const MAX_BCRYPT_COST: u32 = 16;
/// Lowest cost bcrypt defines.
pub const MIN_BCRYPT_COST: u32 = 4;
/// A bcrypt hash string is exactly this many ASCII bytes.
const BCRYPT_HASH_LEN: usize = 60;

/// Checks `input` against a bcrypt hash (`$2a$`, `$2b$` or `$2y$`, cost
/// [`MIN_BCRYPT_COST`]..=[`MAX_BCRYPT_COST`]), as fastmcp-guard 0.2's `bcrypt.checkpw` did.
///
/// Returns `Ok(false)` for a wrong input. Inputs longer than 72 bytes are compared on their
/// first 72 bytes, as bcrypt defines (0.2 tokens are 67 bytes).
///
/// # Errors
/// [`HashError::Malformed`] if `hash` is not such a hash (the message never contains it).
pub fn verify_bcrypt(input: &str, hash: &str) -> Result<bool, HashError> {
    let malformed = |reason: String| HashError::Malformed { reason };
    if hash.len() != BCRYPT_HASH_LEN || !hash.is_ascii() {
        return Err(malformed(format!(
            "a bcrypt hash is {BCRYPT_HASH_LEN} ASCII characters, this one has {} bytes",
            hash.len()
        )));
    }
    if HashScheme::of(hash) != Some(HashScheme::Bcrypt) {
        return Err(malformed(
            "bcrypt hash does not start with `$2a$`, `$2b$` or `$2y$`".to_owned(),
        ));
    }
    // ASCII and 60 bytes long, so these slices are in bounds and on char boundaries.
    let cost = hash
        .get(4..6)
        .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|c| c.parse::<u32>().ok())
        .ok_or_else(|| malformed("bcrypt cost is not two digits".to_owned()))?;
    if !(MIN_BCRYPT_COST..=MAX_BCRYPT_COST).contains(&cost) {
        return Err(malformed(format!(
            "bcrypt cost {cost} is outside {MIN_BCRYPT_COST}..={MAX_BCRYPT_COST}"
        )));
    }
    ::bcrypt::verify(input.as_bytes(), hash).map_err(|e| malformed(format!("bcrypt: {e}")))
}

/// Checks a secret against a stored hash, using the hash's own parameters: an argon2id PHC
/// string, or a bcrypt hash of a key imported from fastmcp-guard 0.2 (see
/// [`verify_bcrypt`]; `secret` is then the whole 0.2 token).
///
/// Returns `Ok(false)` for a wrong secret.
///
/// # Errors
#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::hashing::verify_secret;

    /// A cost-4 bcrypt hash of `input` (cheap: tests only).
    fn bcrypt4(input: &str) -> String {
        ::bcrypt::hash(input, 4).unwrap()
    }

    #[test]
    fn bcrypt_hashes_of_0_2_keys_verify() {
        let token = "fmg_sk_3f9a0c1d2e4b5a69.YAjNHrl6-yQ65F2NTlnLQO-xuYLqE2diutM6MBFJGUs";
        let hash = bcrypt4(token);
        assert!(hash.starts_with("$2b$04$"), "{hash}");
        assert_eq!(HashScheme::of(&hash), Some(HashScheme::Bcrypt));
        assert!(verify_secret(token, &hash).unwrap());
        assert!(verify_bcrypt(token, &hash).unwrap());
        assert!(!verify_secret(&token.replace('Y', "Z"), &hash).unwrap());
        // The other spellings of the same hash verify too ($2a$ and $2y$ differ only in name).
        for v in ["$2a$", "$2y$"] {
            let h = format!("{v}{}", &hash[4..]);
            assert!(verify_secret(token, &h).unwrap(), "{h}");
        }
        // The same token hashed by Python's `bcrypt` 5.0 (`bcrypt.hashpw(token, gensalt(4))`),
        // as fastmcp-guard 0.2 did (at cost 12).
        let py = "$2b$04$YAr3tZ.fm8ymb2zcJGb1ye9HrUD1MlzWHmhVu7.pCOGxipHcwQCyi";
        assert!(verify_secret(token, py).unwrap());
        assert!(!verify_secret(&token[..66], py).unwrap());
        assert_eq!(
            HashScheme::of("$argon2id$v=19$"),
            Some(HashScheme::Argon2id)
        );
        assert_eq!(HashScheme::of("$2x$04$"), None);
        assert_eq!(HashScheme::of("plain"), None);
    }

    #[test]
    fn malformed_bcrypt_hashes_are_errors_not_panics() {
        let good = bcrypt4("x");
        let swap = |range: std::ops::Range<usize>, with: &str| {
            let mut h = good.clone();
            h.replace_range(range, with);
            h
        };
        let cases = [
            good[..59].to_owned(),
            format!("{good}A"),
            swap(0..4, "$2x$"),
            swap(4..6, "31"),
            swap(4..6, "17"),
            swap(4..6, "03"),
            swap(4..6, "+5"),
            swap(4..6, "ab"),
            swap(6..7, "x"),
            swap(10..11, "!"),
            swap(40..41, "é").chars().take(60).collect(),
            swap(40..41, "é"),
            "$2b$".to_owned(),
        ];
        for h in cases {
            let err = verify_secret("x", &h).unwrap_err();
            assert!(matches!(err, HashError::Malformed { .. }), "{h:?}: {err}");
            assert!(!err.to_string().contains(&good[7..]), "{err}");
        }
    }
}
