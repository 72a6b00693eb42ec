//! `SQLite` key backend: one file shared by the server processes and the CLI.
//!
//! * WAL journal, `synchronous=NORMAL`, `busy_timeout` 5 s.
//! * One `Mutex<Connection>` serves reads and writes. That is enough: `SQLite` is only touched
//!   off the hot path (cache misses, management calls, the batched `last_used_at` flush and
//!   the change poll), and every call is short.
//! * `schema_version` holds one row; [`MIGRATIONS`] lists the steps, so a new version appends
//!   one entry. A file from a newer build is refused rather than misread.
//! * Every write that matters for verification takes a new value from the one-row `fmg_meta`
//!   counter and stores it in the row's `revision`, so another process can ask what changed
//!   since the revision it last saw ([`KeyBackend::changed_since`]); the poll is skipped
//!   cheaply while `PRAGMA data_version` shows no commit from another connection.
//!
//! Timestamps are stored as integer milliseconds since the Unix epoch (UTC); scopes and
//! metadata as JSON text.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};

use super::{Change, KeyBackend, KeyError, KeyRecord, KeyStatus, Touch};

/// Schema migrations; entry `i` brings the file from version `i` to version `i + 1`.
///
/// TODO(0.2 import): a later migration may take over fastmcp-guard 0.2 files, whose
/// `api_keys` table holds bcrypt hashes of tokens shaped `fmg_sk_<hex16>.<secret>` with a
/// `selector` column. Their rows would need a `hash_scheme` column (bcrypt vs argon2id) and
/// a 0.2-shaped token parser; the table names are kept distinct (`fmg_keys` vs `api_keys`)
/// so both can live in one file during the import.
pub const MIGRATIONS: &[&str] = &[
    // Version 1.
    "
    CREATE TABLE fmg_meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        revision INTEGER NOT NULL
    );
    INSERT INTO fmg_meta (id, revision) VALUES (1, 0);
    CREATE TABLE fmg_keys (
        id TEXT PRIMARY KEY NOT NULL,
        name TEXT NOT NULL,
        phc_hash TEXT NOT NULL,
        scopes TEXT NOT NULL,
        metadata TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('active', 'rotating', 'revoked')),
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        last_used_at INTEGER,
        last_used_ip TEXT,
        grace_until INTEGER,
        rotated_from TEXT,
        rotated_to TEXT,
        revoked_at INTEGER,
        revision INTEGER NOT NULL
    );
    CREATE INDEX fmg_keys_revision ON fmg_keys (revision);
    ",
];

/// The schema version this build writes.
#[must_use]
pub fn schema_version() -> i64 {
    i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX)
}

const COLUMNS: &str = "id, name, phc_hash, scopes, metadata, status, created_at, expires_at, \
                       last_used_at, last_used_ip, grace_until, rotated_from, rotated_to, \
                       revoked_at, revision";

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

struct State {
    conn: Connection,
    /// `PRAGMA data_version` and the revision returned at the last `changed_since`.
    seen: Option<(i64, u64)>,
}

/// A [`KeyBackend`] in an `SQLite` file.
pub struct SqliteBackend {
    path: PathBuf,
    display: String,
    state: Mutex<State>,
}

impl std::fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteBackend")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// One row as read, before decoding.
struct RawRow {
    id: String,
    name: String,
    phc_hash: String,
    scopes: String,
    metadata: String,
    status: String,
    created_at: i64,
    expires_at: Option<i64>,
    last_used_at: Option<i64>,
    last_used_ip: Option<String>,
    grace_until: Option<i64>,
    rotated_from: Option<String>,
    rotated_to: Option<String>,
    revoked_at: Option<i64>,
    revision: i64,
}

impl RawRow {
    fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            name: row.get(1)?,
            phc_hash: row.get(2)?,
            scopes: row.get(3)?,
            metadata: row.get(4)?,
            status: row.get(5)?,
            created_at: row.get(6)?,
            expires_at: row.get(7)?,
            last_used_at: row.get(8)?,
            last_used_ip: row.get(9)?,
            grace_until: row.get(10)?,
            rotated_from: row.get(11)?,
            rotated_to: row.get(12)?,
            revoked_at: row.get(13)?,
            revision: row.get(14)?,
        })
    }
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn opt_ms(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(ms)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl SqliteBackend {
    /// Opens (creating if needed) the key store at `path`, and migrates its schema.
    ///
    /// A new file is created with mode 0600 on Unix (it holds key hashes).
    ///
    /// # Errors
    /// [`KeyError::DirectoryMissing`] if the parent directory does not exist;
    /// [`KeyError::NotADatabase`] if the path is a directory or not an `SQLite` file;
    /// [`KeyError::SchemaTooNew`]; [`KeyError::Store`] naming the path for other failures.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        let path = path.as_ref().to_path_buf();
        let display = path.display().to_string();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                return Err(KeyError::DirectoryMissing {
                    path: display,
                    dir: dir.display().to_string(),
                });
            }
        }
        if path.is_dir() {
            return Err(KeyError::NotADatabase {
                path: display,
                reason: "it is a directory".to_owned(),
            });
        }
        let existed = path.exists();
        let store_err = |source| KeyError::Store {
            path: display.clone(),
            source,
        };
        let mut conn = Connection::open(&path).map_err(store_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(store_err)?;
        // The first statement that reads the file: detects files that are not databases.
        conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0))
            .map_err(|e| {
                if e.sqlite_error_code() == Some(ErrorCode::NotADatabase) {
                    KeyError::NotADatabase {
                        path: display.clone(),
                        reason: e.to_string(),
                    }
                } else {
                    store_err(e)
                }
            })?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(store_err)?;
        migrate(&mut conn, &display)?;
        #[cfg(unix)]
        if !existed {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(
                |source| KeyError::Io {
                    path: display.clone(),
                    source,
                },
            )?;
        }
        #[cfg(not(unix))]
        let _ = existed;
        Ok(Self {
            path,
            display,
            state: Mutex::new(State { conn, seen: None }),
        })
    }

    /// The database path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, source: rusqlite::Error) -> KeyError {
        KeyError::Store {
            path: self.display.clone(),
            source,
        }
    }

    fn corrupt(&self, id: &str, reason: String) -> KeyError {
        KeyError::Corrupt {
            path: self.display.clone(),
            id: id.to_owned(),
            reason,
        }
    }

    fn decode(&self, raw: RawRow) -> Result<KeyRecord, KeyError> {
        let id = raw.id;
        let time = |v: i64, field: &str| {
            DateTime::from_timestamp_millis(v)
                .ok_or_else(|| self.corrupt(&id, format!("{field} {v} is out of range")))
        };
        let opt_time = |v: Option<i64>, field: &str| v.map(|v| time(v, field)).transpose();
        let scopes: Vec<String> = serde_json::from_str(&raw.scopes)
            .map_err(|e| self.corrupt(&id, format!("scopes are not a JSON list: {e}")))?;
        let metadata: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&raw.metadata)
                .map_err(|e| self.corrupt(&id, format!("metadata is not a JSON object: {e}")))?;
        let status = KeyStatus::parse(&raw.status)
            .ok_or_else(|| self.corrupt(&id, format!("unknown status {:?}", raw.status)))?;
        let revision = u64::try_from(raw.revision)
            .map_err(|_| self.corrupt(&id, format!("negative revision {}", raw.revision)))?;
        Ok(KeyRecord {
            created_at: time(raw.created_at, "created_at")?,
            expires_at: opt_time(raw.expires_at, "expires_at")?,
            last_used_at: opt_time(raw.last_used_at, "last_used_at")?,
            grace_until: opt_time(raw.grace_until, "grace_until")?,
            revoked_at: opt_time(raw.revoked_at, "revoked_at")?,
            name: raw.name,
            phc_hash: raw.phc_hash,
            scopes,
            metadata,
            status,
            last_used_ip: raw.last_used_ip,
            rotated_from: raw.rotated_from,
            rotated_to: raw.rotated_to,
            revision,
            id,
        })
    }

    fn json(&self, record: &KeyRecord) -> Result<(String, String), KeyError> {
        let scopes = serde_json::to_string(&record.scopes)
            .map_err(|e| self.corrupt(&record.id, format!("cannot encode scopes: {e}")))?;
        let metadata = serde_json::to_string(&record.metadata)
            .map_err(|e| self.corrupt(&record.id, format!("cannot encode metadata: {e}")))?;
        Ok((scopes, metadata))
    }

    fn insert_in(&self, tx: &Connection, record: &KeyRecord) -> Result<u64, KeyError> {
        let (scopes, metadata) = self.json(record)?;
        let rev = bump_revision(tx).map_err(|e| self.err(e))?;
        tx.execute(
            &format!(
                "INSERT INTO fmg_keys ({COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
            ),
            params![
                record.id,
                record.name,
                record.phc_hash,
                scopes,
                metadata,
                record.status.as_str(),
                ms(record.created_at),
                opt_ms(record.expires_at),
                opt_ms(record.last_used_at),
                record.last_used_ip,
                opt_ms(record.grace_until),
                record.rotated_from,
                record.rotated_to,
                opt_ms(record.revoked_at),
                to_i64(rev),
            ],
        )
        .map_err(|e| {
            if e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation) {
                KeyError::InvalidInput {
                    field: "id",
                    reason: format!("a key with id `{}` already exists", record.id),
                }
            } else {
                self.err(e)
            }
        })?;
        Ok(rev)
    }

    fn update_in(&self, tx: &Connection, record: &KeyRecord) -> Result<u64, KeyError> {
        let (scopes, metadata) = self.json(record)?;
        let rev = bump_revision(tx).map_err(|e| self.err(e))?;
        let changed = tx
            .execute(
                "UPDATE fmg_keys SET name = ?1, scopes = ?2, metadata = ?3, status = ?4, \
                 expires_at = ?5, grace_until = ?6, rotated_from = ?7, rotated_to = ?8, \
                 revoked_at = ?9, revision = ?10 WHERE id = ?11 AND revision = ?12",
                params![
                    record.name,
                    scopes,
                    metadata,
                    record.status.as_str(),
                    opt_ms(record.expires_at),
                    opt_ms(record.grace_until),
                    record.rotated_from,
                    record.rotated_to,
                    opt_ms(record.revoked_at),
                    to_i64(rev),
                    record.id,
                    to_i64(record.revision),
                ],
            )
            .map_err(|e| self.err(e))?;
        if changed == 0 {
            let exists = tx
                .query_row("SELECT 1 FROM fmg_keys WHERE id = ?1", [&record.id], |_| {
                    Ok(())
                })
                .optional()
                .map_err(|e| self.err(e))?
                .is_some();
            let id = record.id.clone();
            return Err(if exists {
                KeyError::Conflict { id }
            } else {
                KeyError::NotFound { id }
            });
        }
        Ok(rev)
    }
}

fn bump_revision(conn: &Connection) -> rusqlite::Result<u64> {
    let rev: i64 = conn.query_row(
        "UPDATE fmg_meta SET revision = revision + 1 WHERE id = 1 RETURNING revision",
        [],
        |r| r.get(0),
    )?;
    Ok(u64::try_from(rev).unwrap_or(0))
}

fn migrate(conn: &mut Connection, display: &str) -> Result<(), KeyError> {
    let store_err = |source| KeyError::Store {
        path: display.to_owned(),
        source,
    };
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(store_err)?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        .map_err(store_err)?;
    let found: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_version",
            [],
            |r| r.get(0),
        )
        .map_err(store_err)?;
    let supported = schema_version();
    if found > supported {
        return Err(KeyError::SchemaTooNew {
            path: display.to_owned(),
            found,
            supported,
        });
    }
    if found == supported {
        return Ok(());
    }
    let done = usize::try_from(found).unwrap_or(0);
    for step in MIGRATIONS.iter().skip(done) {
        tx.execute_batch(step).map_err(store_err)?;
    }
    tx.execute("DELETE FROM schema_version", [])
        .map_err(store_err)?;
    tx.execute(
        "INSERT INTO schema_version (version) VALUES (?1)",
        [supported],
    )
    .map_err(store_err)?;
    tx.commit().map_err(store_err)
}

impl KeyBackend for SqliteBackend {
    fn insert(&self, record: &KeyRecord) -> Result<u64, KeyError> {
        let mut state = self.state.lock();
        let tx = state
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let rev = self.insert_in(&tx, record)?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(rev)
    }

    fn get(&self, id: &str) -> Result<Option<KeyRecord>, KeyError> {
        let raw = {
            let state = self.state.lock();
            let mut stmt = state
                .conn
                .prepare_cached(&format!("SELECT {COLUMNS} FROM fmg_keys WHERE id = ?1"))
                .map_err(|e| self.err(e))?;
            stmt.query_row([id], RawRow::read)
                .optional()
                .map_err(|e| self.err(e))?
        };
        raw.map(|r| self.decode(r)).transpose()
    }

    fn list(&self, include_revoked: bool) -> Result<Vec<KeyRecord>, KeyError> {
        let raws = {
            let state = self.state.lock();
            let filter = if include_revoked {
                ""
            } else {
                "WHERE status != 'revoked' "
            };
            let mut stmt = state
                .conn
                .prepare(&format!(
                    "SELECT {COLUMNS} FROM fmg_keys {filter}ORDER BY created_at, id"
                ))
                .map_err(|e| self.err(e))?;
            let rows = stmt.query_map([], RawRow::read).map_err(|e| self.err(e))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(|e| self.err(e))?
        };
        raws.into_iter().map(|r| self.decode(r)).collect()
    }

    fn update(&self, record: &KeyRecord) -> Result<u64, KeyError> {
        let mut state = self.state.lock();
        let tx = state
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let rev = self.update_in(&tx, record)?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(rev)
    }

    fn rotate(&self, old: &KeyRecord, new: &KeyRecord) -> Result<(u64, u64), KeyError> {
        let mut state = self.state.lock();
        let tx = state
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let old_rev = self.update_in(&tx, old)?;
        let new_rev = self.insert_in(&tx, new)?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok((old_rev, new_rev))
    }

    fn touch_many(&self, touches: &[Touch]) -> Result<(), KeyError> {
        if touches.is_empty() {
            return Ok(());
        }
        let mut state = self.state.lock();
        let tx = state
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        {
            // SET expressions see the old row, so both test the previous last_used_at.
            let mut stmt = tx
                .prepare_cached(
                    "UPDATE fmg_keys SET \
                     last_used_ip = CASE WHEN ?2 >= COALESCE(last_used_at, ?2) \
                                    THEN COALESCE(?3, last_used_ip) ELSE last_used_ip END, \
                     last_used_at = MAX(COALESCE(last_used_at, ?2), ?2) \
                     WHERE id = ?1",
                )
                .map_err(|e| self.err(e))?;
            for t in touches {
                stmt.execute(params![t.id, ms(t.at), t.ip])
                    .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    fn current_revision(&self) -> Result<u64, KeyError> {
        let state = self.state.lock();
        let rev: i64 = state
            .conn
            .query_row("SELECT revision FROM fmg_meta WHERE id = 1", [], |r| {
                r.get(0)
            })
            .map_err(|e| self.err(e))?;
        Ok(u64::try_from(rev).unwrap_or(0))
    }

    fn changed_since(&self, revision: u64) -> Result<(u64, Vec<Change>), KeyError> {
        let mut state = self.state.lock();
        let data_version: i64 = state
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        if let Some((seen_version, seen_rev)) = state.seen {
            // No other connection committed since the last poll: nothing new to report.
            if seen_version == data_version && revision >= seen_rev {
                return Ok((revision, Vec::new()));
            }
        }
        let rows = {
            let mut stmt = state
                .conn
                .prepare_cached("SELECT id, revision FROM fmg_keys WHERE revision > ?1")
                .map_err(|e| self.err(e))?;
            let rows = stmt
                .query_map([to_i64(revision)], |r| {
                    Ok(Change {
                        id: r.get(0)?,
                        revision: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                    })
                })
                .map_err(|e| self.err(e))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(|e| self.err(e))?
        };
        let next = rows.iter().map(|c| c.revision).fold(revision, u64::max);
        state.seen = Some((data_version, next));
        Ok((next, rows))
    }
}
