//! Taking over the key files of fastmcp-guard 0.2, so that the tokens it issued keep working.
//!
//! 0.2 kept its keys in an `SQLite` table that this version never writes:
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS api_keys (
//!     id            TEXT PRIMARY KEY,     -- fmg_key_<16 hex>
//!     token_hash    TEXT NOT NULL,        -- bcrypt of the WHOLE token ($2b$12$...)
//!     selector      TEXT NOT NULL,        -- the token's public part, unique index idx_selector
//!     name          TEXT NOT NULL,
//!     scopes        TEXT NOT NULL,        -- JSON list
//!     status        TEXT NOT NULL,        -- active | rotating | revoked
//!     metadata      TEXT NOT NULL,        -- JSON object
//!     created_at    TEXT NOT NULL,        -- isoformat(): 2026-03-09T14:00:00.123456+00:00
//!     expires_at    TEXT,
//!     last_used_at  TEXT,
//!     rotated_from  TEXT,
//!     grace_until   TEXT
//! )
//! ```
//!
//! Its tokens are `fmg_sk_<selector>.<secret>` ([`crate::tokens::parse_legacy`]).
//!
//! The `SQLite` backend imports every row into its own `fmg_keys` table (schema version 2,
//! see [`super::sqlite::MIGRATIONS`]): same id, name, scopes, metadata, status, expiry,
//! grace period, `rotated_from` and `last_used_at`; times become integer milliseconds (UTC);
//! the bcrypt hash is kept as the key's hash and the selector goes to the indexed
//! `legacy_selector` column. `rotated_to`, which 0.2 did not store, is filled from the newest
//! row that names the key in its `rotated_from`. Each imported id is recorded in
//! `fmg_legacy_imports`, so a row is never imported twice (even if the key is later changed).
//!
//! **The switch is one way.** `api_keys` is left in place, but only read: revocations,
//! rotations and new keys made by this version are not visible to a 0.2 process using the
//! same file, and keys a 0.2 process adds afterwards are only picked up by an explicit
//! [`super::SqliteBackend::import_legacy`]. Stop every 0.2 process before switching.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value};

use super::{KeyRecord, KeyStatus};

/// The 0.2 table.
pub const TABLE: &str = "api_keys";

/// The columns of the 0.2 table, all of which an import needs.
pub const COLUMNS: [&str; 12] = [
    "id",
    "token_hash",
    "selector",
    "name",
    "scopes",
    "status",
    "metadata",
    "created_at",
    "expires_at",
    "last_used_at",
    "rotated_from",
    "grace_until",
];

/// What an import did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LegacyImport {
    /// Rows in the 0.2 table (0 when there is none).
    pub found: usize,
    /// Rows imported by this run.
    pub imported: usize,
    /// Rows skipped because an earlier run imported them.
    pub already_imported: usize,
    /// Rows skipped because a key with the same id or selector already exists that was not
    /// imported from them (not expected in practice: ids and selectors are random).
    pub conflicts: usize,
}

/// One row of the 0.2 table, as stored (every value read as text).
///
/// `Debug` leaves out the hash.
#[derive(Clone, PartialEq, Eq)]
pub struct LegacyRow {
    /// `fmg_key_<16 hex>`.
    pub id: String,
    /// bcrypt hash of the whole 0.2 token.
    pub token_hash: String,
    /// The token's public selector (16 lowercase hex).
    pub selector: String,
    /// Human name.
    pub name: String,
    /// JSON list of scopes.
    pub scopes: String,
    /// `active`, `rotating` or `revoked`.
    pub status: String,
    /// JSON object.
    pub metadata: String,
    /// ISO-8601 time.
    pub created_at: String,
    /// ISO-8601 time or NULL.
    pub expires_at: Option<String>,
    /// ISO-8601 time or NULL.
    pub last_used_at: Option<String>,
    /// Id of the key this one replaced.
    pub rotated_from: Option<String>,
    /// ISO-8601 time or NULL: end of a rotating key's grace period.
    pub grace_until: Option<String>,
}

impl std::fmt::Debug for LegacyRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LegacyRow")
            .field("id", &self.id)
            .field("selector", &self.selector)
            .field("name", &self.name)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// Parses a time written by 0.2 (Python's `datetime.isoformat()`), to UTC, truncated to
/// milliseconds.
///
/// Accepts an offset (`+00:00`, `+02:00`, `Z`) and times without one (taken as UTC: 0.2 made
/// only aware times, but a hand-edited row might not), with or without fractional seconds,
/// with `T` or a space between date and time. `None` for anything else.
#[must_use]
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    let t = match DateTime::parse_from_rfc3339(s) {
        Ok(t) => t.with_timezone(&Utc),
        Err(_) => ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
            .iter()
            .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())?
            .and_utc(),
    };
    DateTime::from_timestamp_millis(t.timestamp_millis())
}

/// For each key id, the id of the newest row whose `rotated_from` names it (0.2 stored only
/// that back link; rows may be rotated more than once).
#[must_use]
pub fn successors(rows: &[LegacyRow]) -> HashMap<String, String> {
    let mut newest: HashMap<&str, (Option<DateTime<Utc>>, &str)> = HashMap::new();
    for row in rows {
        let Some(old) = row.rotated_from.as_deref() else {
            continue;
        };
        let created = parse_time(&row.created_at);
        let entry = newest.entry(old).or_insert((created, &row.id));
        if (created, row.id.as_str()) > (entry.0, entry.1) {
            *entry = (created, &row.id);
        }
    }
    newest
        .into_iter()
        .map(|(old, (_, new))| (old.to_owned(), new.to_owned()))
        .collect()
}

fn optional(v: Option<&String>) -> Option<&str> {
    v.map(|s| s.trim()).filter(|s| !s.is_empty())
}

impl LegacyRow {
    /// The record this row becomes, with `rotated_to` (from [`successors`]). `revision` is
    /// 0 (the backend assigns it); `revoked_at` and `last_used_ip` are unknown (`None`).
    ///
    /// # Errors
    /// What is wrong with the row (a time that is not ISO-8601, scopes that are not a JSON
    /// list of strings, metadata that is not a JSON object, an unknown status), naming the
    /// column and the bad value (never the hash).
    pub fn to_record(&self, rotated_to: Option<String>) -> Result<KeyRecord, String> {
        let time = |column: &str, v: &str| {
            parse_time(v).ok_or_else(|| {
                format!("{column} {v:?} is not an ISO-8601 time such as 2026-03-09T14:00:00+00:00")
            })
        };
        let opt_time =
            |column: &str, v: Option<&String>| optional(v).map(|v| time(column, v)).transpose();
        let scopes: Vec<String> = serde_json::from_str(&self.scopes).map_err(|e| {
            format!(
                "scopes {:?} are not a JSON list of strings: {e}",
                self.scopes
            )
        })?;
        let metadata: Map<String, Value> = serde_json::from_str(&self.metadata)
            .map_err(|e| format!("metadata {:?} is not a JSON object: {e}", self.metadata))?;
        let status = KeyStatus::parse(self.status.trim()).ok_or_else(|| {
            format!(
                "status {:?} is not one of active, rotating, revoked",
                self.status
            )
        })?;
        Ok(KeyRecord {
            id: self.id.clone(),
            name: self.name.clone(),
            phc_hash: self.token_hash.clone(),
            scopes,
            metadata,
            status,
            created_at: time("created_at", &self.created_at)?,
            expires_at: opt_time("expires_at", self.expires_at.as_ref())?,
            last_used_at: opt_time("last_used_at", self.last_used_at.as_ref())?,
            last_used_ip: None,
            grace_until: opt_time("grace_until", self.grace_until.as_ref())?,
            rotated_from: optional(self.rotated_from.as_ref()).map(str::to_owned),
            rotated_to,
            revoked_at: None,
            revision: 0,
            legacy_selector: Some(self.selector.clone()),
            credits: None,
        })
    }
}

/// Builds fastmcp-guard 0.2 key files the way 0.2 did, for tests in this crate.
#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test helpers fail loudly")]
pub(crate) mod testing {
    use std::path::Path;

    use chrono::{DateTime, Utc};
    use rusqlite::{params, Connection};

    use crate::tokens;

    /// 0.2's DDL, verbatim (`fastmcp_guard/keys/backends/sqlite.py`).
    pub(crate) const DDL: &str = "
        CREATE TABLE IF NOT EXISTS api_keys (
            id            TEXT PRIMARY KEY,
            token_hash    TEXT NOT NULL,
            selector      TEXT NOT NULL,
            name          TEXT NOT NULL,
            scopes        TEXT NOT NULL,
            status        TEXT NOT NULL,
            metadata      TEXT NOT NULL,
            created_at    TEXT NOT NULL,
            expires_at    TEXT,
            last_used_at  TEXT,
            rotated_from  TEXT,
            grace_until   TEXT
        );
        CREATE UNIQUE INDEX IF NOT EXISTS idx_selector ON api_keys(selector);
    ";

    /// `datetime.isoformat()` of an aware UTC time (microseconds, `+00:00`).
    pub(crate) fn iso(t: DateTime<Utc>) -> String {
        t.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
    }

    /// A 0.2 key: its token and its row (bcrypt at cost 4: cheap, tests only).
    pub(crate) struct Key02 {
        pub token: String,
        pub id: String,
        pub selector: String,
        pub hash: String,
        pub name: String,
        pub scopes: String,
        pub status: &'static str,
        pub metadata: String,
        pub created_at: String,
        pub expires_at: Option<String>,
        pub last_used_at: Option<String>,
        pub rotated_from: Option<String>,
        pub grace_until: Option<String>,
    }

    impl Key02 {
        /// An active key created a minute ago, as `KeyStore.create` made it.
        pub(crate) fn new(name: &str) -> Self {
            let (token, selector) = tokens::generate_legacy().unwrap();
            let (_, id_src) = tokens::generate_legacy().unwrap();
            Self {
                hash: bcrypt::hash(&token, 4).unwrap(),
                token,
                id: format!("fmg_key_{id_src}"),
                selector,
                name: name.to_owned(),
                scopes: r#"["read:data"]"#.to_owned(),
                status: "active",
                metadata: r#"{"team": "ops"}"#.to_owned(),
                created_at: iso(Utc::now() - chrono::Duration::minutes(1)),
                expires_at: None,
                last_used_at: None,
                rotated_from: None,
                grace_until: None,
            }
        }

        /// Writes the row as 0.2's `_upsert` did.
        pub(crate) fn insert(&self, conn: &Connection) {
            conn.execute(
                "INSERT INTO api_keys (id, token_hash, selector, name, scopes, status, metadata, \
                 created_at, expires_at, last_used_at, rotated_from, grace_until) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    self.id,
                    self.hash,
                    self.selector,
                    self.name,
                    self.scopes,
                    self.status,
                    self.metadata,
                    self.created_at,
                    self.expires_at,
                    self.last_used_at,
                    self.rotated_from,
                    self.grace_until
                ],
            )
            .unwrap();
        }
    }

    impl Key02 {
        /// The record an import makes of this row.
        pub(crate) fn to_row_record(&self) -> super::KeyRecord {
            super::LegacyRow {
                id: self.id.clone(),
                token_hash: self.hash.clone(),
                selector: self.selector.clone(),
                name: self.name.clone(),
                scopes: self.scopes.clone(),
                status: self.status.to_owned(),
                metadata: self.metadata.clone(),
                created_at: self.created_at.clone(),
                expires_at: self.expires_at.clone(),
                last_used_at: self.last_used_at.clone(),
                rotated_from: self.rotated_from.clone(),
                grace_until: self.grace_until.clone(),
            }
            .to_record(None)
            .unwrap()
        }
    }

    /// Creates a 0.2 key file at `path` holding `keys`.
    pub(crate) fn write_file(path: &Path, keys: &[&Key02]) {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(DDL).unwrap();
        for k in keys {
            k.insert(&conn);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row(id: &str) -> LegacyRow {
        LegacyRow {
            id: id.to_owned(),
            token_hash: "$2b$04$hash".to_owned(),
            selector: "0123456789abcdef".to_owned(),
            name: "alice".to_owned(),
            scopes: r#"["read:data", "tools:write"]"#.to_owned(),
            status: "active".to_owned(),
            metadata: r#"{"team": "ops", "n": 3}"#.to_owned(),
            created_at: "2026-03-09T14:00:00.123456+00:00".to_owned(),
            expires_at: None,
            last_used_at: None,
            rotated_from: None,
            grace_until: None,
        }
    }

    fn ms(s: &str) -> i64 {
        parse_time(s).unwrap().timestamp_millis()
    }

    #[test]
    fn python_isoformat_times_parse() {
        let base = ms("2026-03-09T14:00:00+00:00");
        assert_eq!(base, 1_773_064_800_000);
        // Microseconds are truncated to milliseconds.
        assert_eq!(ms("2026-03-09T14:00:00.123456+00:00"), base + 123);
        assert_eq!(ms("2026-03-09T14:00:00.999999+00:00"), base + 999);
        assert_eq!(ms("2026-03-09T14:00:00.5Z"), base + 500);
        assert_eq!(ms("2026-03-09T16:00:00.123456+02:00"), base + 123);
        assert_eq!(ms("2026-03-09T09:30:00-04:30"), base);
        // No offset: UTC. A space instead of `T`.
        assert_eq!(ms("2026-03-09T14:00:00.123456"), base + 123);
        assert_eq!(ms("2026-03-09 14:00:00"), base);
        assert_eq!(ms(" 2026-03-09T14:00:00+00:00\n"), base);
        for bad in [
            "",
            "yesterday",
            "2026-03-09",
            "2026-13-09T14:00:00",
            "1773064800",
        ] {
            assert_eq!(parse_time(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn row_becomes_a_record() {
        let mut r = row("fmg_key_00112233aabbccdd");
        r.status = "rotating".to_owned();
        r.expires_at = Some("2027-01-01T00:00:00+00:00".to_owned());
        r.grace_until = Some("2026-03-10T14:00:00.000001+00:00".to_owned());
        r.last_used_at = Some("2026-03-09T15:00:00+00:00".to_owned());
        r.rotated_from = Some("fmg_key_ffeeddccbbaa9988".to_owned());
        let rec = r
            .to_record(Some("fmg_key_1111111111111111".to_owned()))
            .unwrap();
        assert_eq!(rec.id, "fmg_key_00112233aabbccdd");
        assert_eq!(rec.name, "alice");
        assert_eq!(rec.scopes, ["read:data", "tools:write"]);
        assert_eq!(rec.metadata["team"], "ops");
        assert_eq!(rec.metadata["n"], 3);
        assert_eq!(rec.status, KeyStatus::Rotating);
        assert_eq!(rec.phc_hash, "$2b$04$hash");
        assert_eq!(rec.legacy_selector.as_deref(), Some("0123456789abcdef"));
        assert_eq!(rec.created_at.timestamp_millis(), 1_773_064_800_123);
        assert_eq!(
            rec.grace_until.unwrap().timestamp_millis(),
            1_773_151_200_000
        );
        assert_eq!(
            rec.expires_at.unwrap().timestamp_millis(),
            ms("2027-01-01T00:00:00Z")
        );
        assert!(rec.last_used_at.is_some());
        assert_eq!(
            rec.rotated_from.as_deref(),
            Some("fmg_key_ffeeddccbbaa9988")
        );
        assert_eq!(rec.rotated_to.as_deref(), Some("fmg_key_1111111111111111"));
        assert_eq!(rec.revoked_at, None);
        assert!(!format!("{r:?}").contains("$2b$"));
    }

    #[test]
    fn bad_rows_name_the_column_and_value() {
        type Spoil = fn(&mut LegacyRow);
        let cases: [(&str, Spoil); 6] = [
            ("created_at", |r| r.created_at = "soon".to_owned()),
            ("expires_at", |r| r.expires_at = Some("never".to_owned())),
            ("scopes", |r| r.scopes = r#"{"a": 1}"#.to_owned()),
            ("scopes", |r| r.scopes = "[1, 2]".to_owned()),
            ("metadata", |r| r.metadata = "[]".to_owned()),
            ("status", |r| r.status = "disabled".to_owned()),
        ];
        for (column, spoil) in cases {
            let mut r = row("fmg_key_00112233aabbccdd");
            spoil(&mut r);
            let err = r.to_record(None).unwrap_err();
            assert!(err.starts_with(column), "{err}");
        }
        // Empty optional times count as absent.
        let mut r = row("fmg_key_00112233aabbccdd");
        r.expires_at = Some(String::new());
        assert_eq!(r.to_record(None).unwrap().expires_at, None);
    }

    #[test]
    fn successor_is_the_newest_rotation() {
        let mut a = row("fmg_key_aaaaaaaaaaaaaaaa");
        let mut b = row("fmg_key_bbbbbbbbbbbbbbbb");
        let mut c = row("fmg_key_cccccccccccccccc");
        b.rotated_from = Some(a.id.clone());
        b.created_at = "2026-03-09T15:00:00+00:00".to_owned();
        c.rotated_from = Some(a.id.clone());
        c.created_at = "2026-03-09T16:00:00+00:00".to_owned();
        a.created_at = "2026-03-09T14:00:00+00:00".to_owned();
        let s = successors(&[c.clone(), a.clone(), b.clone()]);
        assert_eq!(s.len(), 1);
        assert_eq!(s[&a.id], c.id);
        // The order of the rows does not matter.
        assert_eq!(successors(&[b, a, c]), s);
    }

    proptest! {
        #[test]
        fn parse_time_never_panics_and_round_trips(
            s in "\\PC{0,40}",
            ms in -10_000_000_000_000i64..10_000_000_000_000,
        ) {
            let _ = parse_time(&s);
            let t = DateTime::from_timestamp_millis(ms).unwrap();
            // Python writes `isoformat()` with microseconds; we read it back to the ms.
            let py = t.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string();
            prop_assert_eq!(parse_time(&py), Some(t));
        }
    }
}
