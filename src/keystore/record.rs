//! One API key as stored ([`KeyRecord`]), its lifecycle [`KeyStatus`], the batched use
//! ([`Touch`]) and change notice ([`Change`]) a backend exchanges, and the millisecond
//! timestamps records carry.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

use super::Credits;

/// Lifecycle status of a key, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    /// In use.
    Active,
    /// Replaced by a newer key; still valid until `grace_until`.
    Rotating,
    /// No longer valid.
    Revoked,
}

impl KeyStatus {
    /// `"active"`, `"rotating"` or `"revoked"`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Rotating => "rotating",
            Self::Revoked => "revoked",
        }
    }

    /// The status named by [`KeyStatus::as_str`]'s output, or `None`.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "rotating" => Some(Self::Rotating),
            "revoked" => Some(Self::Revoked),
            _ => None,
        }
    }
}

impl std::fmt::Display for KeyStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One API key as stored. Timestamps have millisecond precision.
///
/// `Debug` and `Serialize` leave out `phc_hash`. Records imported from fastmcp-guard 0.2
/// carry a bcrypt hash of the whole 0.2 token in `phc_hash` and set `legacy_selector`.
#[derive(Clone, PartialEq, Serialize)]
pub struct KeyRecord {
    /// Public key id, `fmg_key_<kid>`.
    pub id: String,
    /// Human name.
    pub name: String,
    /// argon2id PHC string of the token's secret part; for a key imported from 0.2, the
    /// bcrypt hash (`$2b$...`) of its whole token.
    #[serde(skip_serializing)]
    pub phc_hash: String,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// Free-form metadata.
    pub metadata: Map<String, Value>,
    /// Stored lifecycle status (see [`KeyRecord::effective_status_at`]).
    pub status: KeyStatus,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// The key stops working at this time, if set.
    pub expires_at: Option<DateTime<Utc>>,
    /// Last successful verification (written in batches).
    pub last_used_at: Option<DateTime<Utc>>,
    /// Client address of the last use, if known.
    pub last_used_ip: Option<String>,
    /// End of the grace period of a rotating key.
    pub grace_until: Option<DateTime<Utc>>,
    /// The key this one replaced.
    pub rotated_from: Option<String>,
    /// The key that replaced this one.
    pub rotated_to: Option<String>,
    /// When the key was revoked.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Store revision of the last change (managed by the backend; used for optimistic
    /// concurrency and cross-process invalidation).
    pub revision: u64,
    /// For a key imported from fastmcp-guard 0.2: the public selector of its token
    /// (`fmg_sk_<selector>.<secret>`), by which that token is looked up. Set only on insert
    /// (never changed by `update`); `None` for keys made by this version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub legacy_selector: Option<String>,
    /// The key's credits, if it has any (`None`: unlimited). Written by `insert` and by
    /// the credit operations ([`KeyBackend::lease_credits`](super::KeyBackend::lease_credits)
    /// and friends), never by `update`.
    pub credits: Option<Credits>,
}

impl std::fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRecord")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .field("metadata", &self.metadata)
            .field("status", &self.status)
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .field("last_used_at", &self.last_used_at)
            .field("last_used_ip", &self.last_used_ip)
            .field("grace_until", &self.grace_until)
            .field("rotated_from", &self.rotated_from)
            .field("rotated_to", &self.rotated_to)
            .field("revoked_at", &self.revoked_at)
            .field("revision", &self.revision)
            .field("legacy_selector", &self.legacy_selector)
            .field("credits", &self.credits)
            .finish_non_exhaustive()
    }
}

impl KeyRecord {
    /// Whether `expires_at` has passed at `now`.
    #[must_use]
    pub fn is_expired_at(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|e| now >= e)
    }

    /// The status at `now`: a rotating key whose grace period has ended counts as revoked.
    /// (Expiry is reported separately by [`KeyRecord::is_expired_at`].)
    #[must_use]
    pub fn effective_status_at(&self, now: DateTime<Utc>) -> KeyStatus {
        match self.status {
            KeyStatus::Rotating if self.grace_until.is_some_and(|g| now >= g) => KeyStatus::Revoked,
            s => s,
        }
    }

    /// Whether a token of this key is accepted at `now`.
    #[must_use]
    pub fn is_valid_at(&self, now: DateTime<Utc>) -> bool {
        self.effective_status_at(now) != KeyStatus::Revoked && !self.is_expired_at(now)
    }

    /// When the key stops being valid: `min(expires_at, grace_until)` (grace only while
    /// rotating). `None`: no end (until revoked).
    #[must_use]
    pub fn valid_until(&self) -> Option<DateTime<Utc>> {
        let grace = match self.status {
            KeyStatus::Rotating => self.grace_until,
            _ => None,
        };
        match (self.expires_at, grace) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// A batched `last_used_at` update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Touch {
    /// Key id.
    pub id: String,
    /// Time of use.
    pub at: DateTime<Utc>,
    /// Client address, if known (`None` keeps the stored one).
    pub ip: Option<String>,
}

/// One changed record reported by [`KeyBackend::changed_since`](super::KeyBackend::changed_since).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Key id.
    pub id: String,
    /// The record's revision now.
    pub revision: u64,
}

pub(super) fn now_utc() -> DateTime<Utc> {
    truncate_ms(Utc::now())
}

pub(super) fn truncate_ms(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

pub(super) fn utc_from_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::keystore::testing::*;
    use crate::keystore::KeyManager;

    #[test]
    fn records_do_not_leak_hashes() {
        let m = KeyManager::memory(opts()).unwrap();
        let (rec, _) = m.create("a", &[], None, Map::new()).unwrap();
        assert!(!format!("{rec:?}").contains(&rec.phc_hash));
        let json = serde_json::to_string(&rec).unwrap();
        assert!(
            !json.contains("phc_hash") && !json.contains("argon2"),
            "{json}"
        );
        assert!(json.contains(r#""status":"active""#), "{json}");
    }

    #[test]
    fn status_helpers() {
        let now = Utc::now();
        let mut rec = KeyManager::memory(opts())
            .unwrap()
            .create("a", &[], None, Map::new())
            .unwrap()
            .0;
        assert!(rec.is_valid_at(now));
        assert_eq!(rec.valid_until(), None);
        rec.status = KeyStatus::Rotating;
        rec.grace_until = Some(now + chrono::Duration::hours(1));
        rec.expires_at = Some(now + chrono::Duration::hours(2));
        assert_eq!(rec.valid_until(), rec.grace_until);
        assert_eq!(rec.effective_status_at(now), KeyStatus::Rotating);
        assert_eq!(
            rec.effective_status_at(now + chrono::Duration::hours(1)),
            KeyStatus::Revoked
        );
        assert!(!rec.is_valid_at(now + chrono::Duration::hours(1)));
        rec.status = KeyStatus::Active;
        assert_eq!(rec.valid_until(), rec.expires_at);
        assert!(rec.is_expired_at(now + chrono::Duration::hours(2)));
        for s in [KeyStatus::Active, KeyStatus::Rotating, KeyStatus::Revoked] {
            assert_eq!(KeyStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(KeyStatus::parse("expired"), None);
    }
}
