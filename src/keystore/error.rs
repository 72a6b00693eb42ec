//! Errors of the key service: [`KeyError`] (management and storage) and [`VerifyError`]
//! (why a token was refused). Messages say what to fix; none contains a token.

use std::time::Duration;

use crate::hashing::HashError;
use crate::tokens::TokenError;

use super::throttle::ThrottleScope;

/// Errors from key management and storage. Messages say what to fix; none contains a token.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No key with this id.
    #[error("no key with id `{id}`; list keys with `fastmcp-guard keys list`")]
    NotFound {
        /// The id asked for.
        id: String,
    },
    /// The key is revoked (or its rotation grace period is over).
    #[error("key `{id}` is revoked; create a new key instead")]
    Revoked {
        /// The key id.
        id: String,
    },
    /// The key was already rotated and is in its grace period.
    #[error("key `{id}` is already rotating to `{successor}`; rotate `{successor}` instead")]
    AlreadyRotated {
        /// The key id.
        id: String,
        /// The key that replaces it.
        successor: String,
    },
    /// A bad argument.
    #[error("invalid {field}: {reason}")]
    InvalidInput {
        /// The argument.
        field: &'static str,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// Another writer changed the key between read and write (optimistic concurrency).
    #[error("key `{id}` was changed concurrently by another writer; retry")]
    Conflict {
        /// The key id.
        id: String,
    },
    /// An `SQLite` error.
    #[error("key store {path}: {source}")]
    Store {
        /// Database path.
        path: String,
        /// The driver error.
        #[source]
        source: rusqlite::Error,
    },
    /// The database's directory does not exist.
    #[error("key store {path}: directory {dir} does not exist; create the directory first")]
    DirectoryMissing {
        /// Database path.
        path: String,
        /// The missing directory.
        dir: String,
    },
    /// The path exists but is not an `SQLite` database.
    #[error(
        "key store {path} is not an SQLite database ({reason}); give the path of a new file \
         or of an existing key store"
    )]
    NotADatabase {
        /// Database path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The database was written by a newer fastmcp-guard.
    #[error(
        "key store {path} has schema version {found}, newer than this fastmcp-guard supports \
         ({supported}); upgrade fastmcp-guard"
    )]
    SchemaTooNew {
        /// Database path.
        path: String,
        /// Version in the file.
        found: i64,
        /// Newest version this build knows.
        supported: i64,
    },
    /// The file has an `api_keys` table that is not fastmcp-guard 0.2's, so its keys cannot
    /// be imported.
    #[error(
        "key store {path}: table `api_keys` is not the key table of fastmcp-guard 0.2 \
         ({reason}), so its keys cannot be imported; use a separate file for the key store, \
         or rename that table if it holds nothing to keep"
    )]
    LegacyTable {
        /// Database path.
        path: String,
        /// What does not match.
        reason: String,
    },
    /// A stored row cannot be decoded.
    #[error("key store {path}: record `{id}` is corrupt: {reason}")]
    Corrupt {
        /// Database path.
        path: String,
        /// Key id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// A store implemented outside the core (PostgreSQL, Redis: through Python drivers)
    /// failed; `reason` is the driver's message.
    #[error("key store {store}: {reason}")]
    Backend {
        /// The store, as its owner names it (a DSN with the password masked).
        store: String,
        /// What went wrong.
        reason: String,
    },
    /// A file-system error around the database.
    #[error("key store {path}: {source}")]
    Io {
        /// Database path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Hashing failed, or a stored hash is malformed.
    #[error(transparent)]
    Hash(#[from] HashError),
    /// Token generation failed.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The background thread could not be started.
    #[error("cannot start a key manager thread (fmg-keys, fmg-hash): {reason}")]
    Thread {
        /// The OS error.
        reason: String,
    },
}

/// Why a token was refused. Messages name the key id (public), never the token.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Not a well-formed token (refused before any lookup).
    #[error(transparent)]
    Malformed(TokenError),
    /// Well-formed, but no key has this id.
    #[error("unknown key `{key_id}`")]
    UnknownKey {
        /// The key id in the token (for a 0.2 token, its public part `fmg_sk_<selector>`).
        key_id: String,
    },
    /// The secret does not match.
    #[error("invalid secret for key `{key_id}`")]
    BadSecret {
        /// The key id.
        key_id: String,
    },
    /// The key is revoked, or its rotation grace period is over.
    #[error("key `{key_id}` is revoked")]
    Revoked {
        /// The key id.
        key_id: String,
    },
    /// The key has expired.
    #[error("key `{key_id}` has expired")]
    Expired {
        /// The key id.
        key_id: String,
    },
    /// A failure budget is spent (see [`throttle`](super::throttle)): refused without
    /// hashing. Only tokens not yet proven on this node are ever refused this way.
    #[error(
        "{}; retry in {} s",
        match scope {
            ThrottleScope::Client =>
                format!("too many failed attempts for key `{key_id}` from this client"),
            ThrottleScope::Key =>
                format!("too many failed attempts for key `{key_id}` from all clients"),
            ThrottleScope::Server => "too many failed key verifications on this server".to_owned(),
            ThrottleScope::UnknownKeys => "too many unknown key ids from this client".to_owned(),
        },
        retry_after_secs(*retry_after)
    )]
    Throttled {
        /// The key id (for a 0.2 token, its public part `fmg_sk_<selector>`).
        key_id: String,
        /// Time until the budget's window ends.
        retry_after: Duration,
        /// Which budget refused.
        scope: ThrottleScope,
    },
    /// No hashing thread started the verification within `verify_wait`.
    #[error("too many key verifications in progress; retry shortly")]
    Busy {
        /// The key id the token claims (for a 0.2 token, its public part).
        key_id: Option<String>,
    },
    /// The store failed (or holds a malformed hash).
    #[error("key store error: {source}")]
    Store {
        /// The key id the token claims, if it was parsed (for a 0.2 token, its public part).
        key_id: Option<String>,
        /// What failed.
        source: KeyError,
    },
}

/// Whole seconds to wait, rounded up, at least 1 (what `Retry-After` carries).
pub(super) fn retry_after_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

impl VerifyError {
    /// The key id the token claims: public, so it may be logged (for a 0.2 token, its public
    /// part `fmg_sk_<selector>` unless the record was read). `None` for a malformed token.
    #[must_use]
    pub fn key_id(&self) -> Option<&str> {
        match self {
            Self::Malformed(_) => None,
            Self::UnknownKey { key_id }
            | Self::BadSecret { key_id }
            | Self::Revoked { key_id }
            | Self::Expired { key_id }
            | Self::Throttled { key_id, .. } => Some(key_id),
            Self::Busy { key_id } | Self::Store { key_id, .. } => key_id.as_deref(),
        }
    }

    /// How long to wait before retrying, for a throttled attempt.
    #[must_use]
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Throttled { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    pub(super) fn store(key_id: &str, source: KeyError) -> Self {
        Self::Store {
            key_id: Some(key_id.to_owned()),
            source,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::keystore::testing::*;
    use crate::tokens;
    use serde_json::Map;

    #[test]
    fn refusals_name_the_claimed_key_id_and_throttled_ones_when_to_retry() {
        let m = budgeted(1, 0, 0);
        let (rec, _) = m.create("k", &[], None, Map::new()).unwrap();
        let bad = wrong_secret(&rec.id);
        let first = m.verify(&bad, Some("1.2.3.4")).unwrap_err();
        assert_eq!(first.key_id(), Some(rec.id.as_str()));
        assert_eq!(first.retry_after(), None);
        let second = m.verify(&bad, Some("1.2.3.4")).unwrap_err();
        assert_eq!(second.key_id(), Some(rec.id.as_str()));
        let after = second.retry_after().unwrap();
        assert!(after > Duration::from_secs(55) && after <= Duration::from_secs(60));
        assert!(second.to_string().contains("retry in 60 s"), "{second}");
        let (unknown, _) = tokens::generate().unwrap();
        let err = m.verify(&unknown, None).unwrap_err();
        assert_eq!(
            err.key_id(),
            Some(tokens::parse(&unknown).unwrap().key_id().as_str())
        );
        assert_eq!(m.verify("fmg_sk_nope", None).unwrap_err().key_id(), None);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(59_001)), 60);
    }
}
