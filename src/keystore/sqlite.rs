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
//!
//! A file written by fastmcp-guard 0.2 (its `api_keys` table) is taken over when it is first
//! opened: schema version 2 imports its keys (see [`super::legacy`]). The switch is one way.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};

use super::legacy::{self, LegacyImport, LegacyRow};
use super::{
    Change, CreditLease, Credits, KeyBackend, KeyError, KeyRecord, KeyStatus, Refill, Touch,
};

/// A data step of a migration, run after its SQL in the same transaction.
pub type DataStep = fn(&SqliteBackend, &Connection) -> Result<(), KeyError>;

/// One schema migration.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// DDL (and SQL-only data changes), run first.
    pub sql: &'static str,
    /// Data work that needs Rust, run next in the same transaction.
    pub data: Option<DataStep>,
}

/// Schema migrations; entry `i` brings the file from version `i` to version `i + 1`. All
/// pending steps and the new `schema_version` commit in one transaction, so a failed step
/// leaves the file as it was. The SQL of every pending step runs before any data step
/// (data steps write rows in the newest schema).
///
/// * 1: `fmg_meta` (the revision counter) and `fmg_keys`.
/// * 2: `fmg_keys.legacy_selector` (unique where set), `fmg_legacy_imports`, and the import
///   of a fastmcp-guard 0.2 `api_keys` table if the file has one (the tables have distinct
///   names, so both live in one file; `api_keys` is left as it was).
/// * 3: the credit columns (`credits` NULL: no credits, as every key had before).
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        sql: MIGRATION_1,
        data: None,
    },
    Migration {
        sql: MIGRATION_2,
        data: Some(import_legacy_step),
    },
    Migration {
        sql: MIGRATION_3,
        data: None,
    },
];

const MIGRATION_1: &str = "
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
";

const MIGRATION_2: &str = "
    ALTER TABLE fmg_keys ADD COLUMN legacy_selector TEXT;
    CREATE UNIQUE INDEX fmg_keys_legacy_selector ON fmg_keys (legacy_selector)
        WHERE legacy_selector IS NOT NULL;
    CREATE TABLE fmg_legacy_imports (
        id TEXT PRIMARY KEY NOT NULL,
        selector TEXT NOT NULL,
        imported_at INTEGER NOT NULL
    );
";

const MIGRATION_3: &str = "
    ALTER TABLE fmg_keys ADD COLUMN credits INTEGER;
    ALTER TABLE fmg_keys ADD COLUMN refill TEXT;
    ALTER TABLE fmg_keys ADD COLUMN credits_shadow INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE fmg_keys ADD COLUMN credits_base INTEGER;
    ALTER TABLE fmg_keys ADD COLUMN refilled_at INTEGER;
    ALTER TABLE fmg_keys ADD COLUMN refill_at INTEGER;
    ALTER TABLE fmg_keys ADD COLUMN credits_epoch INTEGER NOT NULL DEFAULT 0;
";

fn import_legacy_step(backend: &SqliteBackend, tx: &Connection) -> Result<(), KeyError> {
    backend.import_legacy_in(tx).map(|_| ())
}

/// The schema version this build writes.
#[must_use]
pub fn schema_version() -> i64 {
    i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX)
}

const COLUMNS: &str = "id, name, phc_hash, scopes, metadata, status, created_at, expires_at, \
                       last_used_at, last_used_ip, grace_until, rotated_from, rotated_to, \
                       revoked_at, revision, legacy_selector, credits, refill, credits_shadow, \
                       credits_base, refilled_at, refill_at, credits_epoch";

/// The credit columns, in [`COLUMNS`] order.
const CREDIT_COLUMNS: &str =
    "credits, refill, credits_shadow, credits_base, refilled_at, refill_at, credits_epoch";

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
    legacy_selector: Option<String>,
    credits: RawCredits,
}

/// The credit columns as read.
struct RawCredits {
    balance: Option<i64>,
    refill: Option<String>,
    shadow: bool,
    base: Option<i64>,
    refilled_at: Option<i64>,
    refill_at: Option<i64>,
    epoch: i64,
}

impl RawCredits {
    fn read(row: &rusqlite::Row<'_>, from: usize) -> rusqlite::Result<Self> {
        Ok(Self {
            balance: row.get(from)?,
            refill: row.get(from + 1)?,
            shadow: row.get(from + 2)?,
            base: row.get(from + 3)?,
            refilled_at: row.get(from + 4)?,
            refill_at: row.get(from + 5)?,
            epoch: row.get(from + 6)?,
        })
    }

    /// The stored credits; `Err` says which column is bad.
    fn decode(self) -> Result<Option<Credits>, String> {
        let Some(balance) = self.balance else {
            return Ok(None);
        };
        let count =
            |v: i64, what: &str| u64::try_from(v).map_err(|_| format!("{what} {v} is negative"));
        let time = |v: Option<i64>, what: &str| {
            v.map(|v| {
                DateTime::from_timestamp_millis(v)
                    .ok_or_else(|| format!("{what} {v} is out of range"))
            })
            .transpose()
        };
        let refill = self
            .refill
            .as_deref()
            .map(Refill::parse)
            .transpose()
            .map_err(|e| e.to_string())?;
        let balance = count(balance, "credits")?;
        Ok(Some(Credits {
            balance,
            refill,
            shadow: self.shadow,
            base: self
                .base
                .map_or(Ok(balance), |b| count(b, "credits_base"))?,
            refilled_at: time(self.refilled_at, "refilled_at")?.unwrap_or_default(),
            refill_at: time(self.refill_at, "refill_at")?,
            epoch: count(self.epoch, "credits_epoch")?,
        }))
    }
}

/// The credit columns' values to write (all NULL / default without credits).
type CreditValues = (
    Option<i64>,
    Option<String>,
    bool,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    i64,
);

fn credit_values(c: Option<&Credits>) -> CreditValues {
    match c {
        None => (None, None, false, None, None, None, 0),
        Some(c) => (
            Some(to_i64(c.balance)),
            c.refill.map(|r| r.canonical()),
            c.shadow,
            Some(to_i64(c.base)),
            Some(ms(c.refilled_at)),
            opt_ms(c.refill_at),
            to_i64(c.epoch),
        ),
    }
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
            legacy_selector: row.get(15)?,
            credits: RawCredits::read(row, 16)?,
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
        if !path.exists() {
            // Create the file private (0600) before SQLite opens it: the -wal and -shm
            // files SQLite derives from it then get the same mode.
            let mut opts = std::fs::OpenOptions::new();
            opts.read(true).write(true).create(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            opts.open(&path).map_err(|source| KeyError::Io {
                path: display.clone(),
                source,
            })?;
        }
        let store_err = |source| KeyError::Store {
            path: display.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(store_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(store_err)?;
        // The first statement that reads the file: detects files that are not databases.
        crate::sqlite_wal::enable_wal(&conn, BUSY_TIMEOUT).map_err(|e| {
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
        let backend = Self {
            path,
            display,
            state: Mutex::new(State { conn, seen: None }),
        };
        backend.migrate()?;
        Ok(backend)
    }

    /// Imports the keys of a fastmcp-guard 0.2 `api_keys` table in this file that were not
    /// imported yet, in one transaction (also reachable as [`KeyBackend::import_legacy`] and
    /// [`super::KeyManager::import_legacy`]). Opening the file does this once (schema
    /// version 2); call this again only if a 0.2 process kept adding keys to the file after
    /// the switch (changes it made to keys already imported are not carried over: the switch
    /// is one way).
    ///
    /// # Errors
    /// [`KeyError::Corrupt`] naming a row that cannot be read (nothing is imported then);
    /// [`KeyError::LegacyTable`] if `api_keys` is not 0.2's; store errors.
    pub fn import_legacy(&self) -> Result<LegacyImport, KeyError> {
        let mut state = self.state.lock();
        let tx = state
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let report = self.import_legacy_in(&tx)?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(report)
    }

    /// Whether the file has a 0.2 `api_keys` table (checked for 0.2's columns).
    fn legacy_table(&self, tx: &Connection) -> Result<bool, KeyError> {
        let mut stmt = tx
            .prepare("SELECT name FROM pragma_table_info(?1)")
            .map_err(|e| self.err(e))?;
        let columns = stmt
            .query_map([legacy::TABLE], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))?;
        if columns.is_empty() {
            return Ok(false);
        }
        let missing: Vec<&str> = legacy::COLUMNS
            .iter()
            .copied()
            .filter(|c| !columns.iter().any(|have| have == c))
            .collect();
        if missing.is_empty() {
            Ok(true)
        } else {
            Err(KeyError::LegacyTable {
                path: self.display.clone(),
                reason: format!("it has no column {}", missing.join(", ")),
            })
        }
    }

    fn import_legacy_in(&self, tx: &Connection) -> Result<LegacyImport, KeyError> {
        if !self.legacy_table(tx)? {
            return Ok(LegacyImport::default());
        }
        let rows = {
            // Every value as text: 0.2 wrote text, and a stray number must not fail the read.
            let mut stmt = tx
                .prepare(&format!(
                    "SELECT {} FROM {} ORDER BY rowid",
                    legacy::COLUMNS
                        .iter()
                        .map(|c| format!("CAST({c} AS TEXT)"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    legacy::TABLE
                ))
                .map_err(|e| self.err(e))?;
            let rows = stmt
                .query_map([], |r| {
                    let text = |i: usize| r.get::<_, Option<String>>(i);
                    let req = |i: usize| text(i).map(Option::unwrap_or_default);
                    Ok(LegacyRow {
                        id: req(0)?,
                        token_hash: req(1)?,
                        selector: req(2)?,
                        name: req(3)?,
                        scopes: req(4)?,
                        status: req(5)?,
                        metadata: req(6)?,
                        created_at: req(7)?,
                        expires_at: text(8)?,
                        last_used_at: text(9)?,
                        rotated_from: text(10)?,
                        grace_until: text(11)?,
                    })
                })
                .map_err(|e| self.err(e))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(|e| self.err(e))?
        };
        let successors = legacy::successors(&rows);
        let now = Utc::now().timestamp_millis();
        let mut report = LegacyImport {
            found: rows.len(),
            ..LegacyImport::default()
        };
        for row in &rows {
            let seen = tx
                .query_row(
                    "SELECT 1 FROM fmg_legacy_imports WHERE id = ?1",
                    [&row.id],
                    |_| Ok(()),
                )
                .optional()
                .map_err(|e| self.err(e))?
                .is_some();
            if seen {
                report.already_imported += 1;
                continue;
            }
            let clash = tx
                .query_row(
                    "SELECT 1 FROM fmg_keys WHERE id = ?1 OR legacy_selector = ?2",
                    [&row.id, &row.selector],
                    |_| Ok(()),
                )
                .optional()
                .map_err(|e| self.err(e))?
                .is_some();
            if clash {
                report.conflicts += 1;
                continue;
            }
            let record = row
                .to_record(successors.get(&row.id).cloned())
                .map_err(|reason| {
                    self.corrupt(
                        &row.id,
                        format!(
                            "{reason} (a row of the fastmcp-guard 0.2 table `{}`; fix or \
                             delete that row, then open the key store again)",
                            legacy::TABLE
                        ),
                    )
                })?;
            self.insert_in(tx, &record)?;
            tx.execute(
                "INSERT INTO fmg_legacy_imports (id, selector, imported_at) VALUES (?1, ?2, ?3)",
                params![row.id, row.selector, now],
            )
            .map_err(|e| self.err(e))?;
            report.imported += 1;
        }
        Ok(report)
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
        let credits = raw.credits.decode().map_err(|why| self.corrupt(&id, why))?;
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
            legacy_selector: raw.legacy_selector,
            credits,
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
        let credit = credit_values(record.credits.as_ref());
        let rev = bump_revision(tx).map_err(|e| self.err(e))?;
        tx.execute(
            &format!(
                "INSERT INTO fmg_keys ({COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, \
                 ?17, ?18, ?19, ?20, ?21, ?22, ?23)"
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
                record.legacy_selector,
                credit.0,
                credit.1,
                credit.2,
                credit.3,
                credit.4,
                credit.5,
                credit.6,
            ],
        )
        .map_err(|e| {
            if e.sqlite_error_code() != Some(ErrorCode::ConstraintViolation) {
                return self.err(e);
            }
            let id_taken = tx
                .query_row("SELECT 1 FROM fmg_keys WHERE id = ?1", [&record.id], |_| {
                    Ok(())
                })
                .optional()
                .map_or(true, |found| found.is_some());
            match (&record.legacy_selector, id_taken) {
                (Some(sel), false) => KeyError::InvalidInput {
                    field: "legacy_selector",
                    reason: format!("a key with 0.2 selector `{sel}` already exists"),
                },
                _ => KeyError::InvalidInput {
                    field: "id",
                    reason: format!("a key with id `{}` already exists", record.id),
                },
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

impl SqliteBackend {
    /// The credits of key `id` in `tx` (`Err(NotFound)` if there is no such key).
    fn credits_in(&self, tx: &Connection, id: &str) -> Result<Option<Credits>, KeyError> {
        let raw = tx
            .query_row(
                &format!("SELECT {CREDIT_COLUMNS} FROM fmg_keys WHERE id = ?1"),
                [id],
                |r| RawCredits::read(r, 0),
            )
            .optional()
            .map_err(|e| self.err(e))?
            .ok_or_else(|| KeyError::NotFound { id: id.to_owned() })?;
        raw.decode().map_err(|why| self.corrupt(id, why))
    }

    /// Writes the credit columns of `id` (a new revision only if `revision`).
    fn put_credits_in(
        &self,
        tx: &Connection,
        id: &str,
        credits: Option<&Credits>,
        revision: Option<u64>,
    ) -> Result<(), KeyError> {
        let v = credit_values(credits);
        tx.execute(
            "UPDATE fmg_keys SET credits = ?2, refill = ?3, credits_shadow = ?4, \
             credits_base = ?5, refilled_at = ?6, refill_at = ?7, credits_epoch = ?8, \
             revision = COALESCE(?9, revision) WHERE id = ?1",
            params![id, v.0, v.1, v.2, v.3, v.4, v.5, v.6, revision.map(to_i64)],
        )
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Runs `f` on the credits of `id` in one `BEGIN IMMEDIATE` transaction; writes them
    /// back (without a new revision) when `f` says they changed.
    fn with_credits<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Credits) -> (T, bool),
    ) -> Result<Option<T>, KeyError> {
        let mut state = self.state.lock();
        let tx = state
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let Some(mut credits) = self.credits_in(&tx, id)? else {
            return Ok(None);
        };
        let (out, changed) = f(&mut credits);
        if changed {
            self.put_credits_in(&tx, id, Some(&credits), None)?;
            tx.commit().map_err(|e| self.err(e))?;
        }
        Ok(Some(out))
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

impl SqliteBackend {
    fn migrate(&self) -> Result<(), KeyError> {
        let display = self.display.as_str();
        let mut state = self.state.lock();
        migrate(self, &mut state.conn, display)
    }
}

fn migrate(backend: &SqliteBackend, conn: &mut Connection, display: &str) -> Result<(), KeyError> {
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
    // Every pending step's SQL first, then their data steps: a data step writes rows with
    // the code of this build, i.e. in the newest schema.
    for step in MIGRATIONS.iter().skip(done) {
        tx.execute_batch(step.sql).map_err(store_err)?;
    }
    for step in MIGRATIONS.iter().skip(done) {
        if let Some(data) = step.data {
            data(backend, &tx)?;
        }
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

    fn import_legacy(&self) -> Result<LegacyImport, KeyError> {
        SqliteBackend::import_legacy(self)
    }

    fn get_by_legacy_selector(&self, selector: &str) -> Result<Option<KeyRecord>, KeyError> {
        let raw = {
            let state = self.state.lock();
            let mut stmt = state
                .conn
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM fmg_keys WHERE legacy_selector = ?1"
                ))
                .map_err(|e| self.err(e))?;
            stmt.query_row([selector], RawRow::read)
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

    fn for_each_label(&self, each: &mut dyn FnMut(&str)) -> Result<(), KeyError> {
        let state = self.state.lock();
        let mut stmt = state
            .conn
            .prepare("SELECT id, legacy_selector FROM fmg_keys")
            .map_err(|e| self.err(e))?;
        let mut rows = stmt.query([]).map_err(|e| self.err(e))?;
        let mut label = String::from(crate::tokens::TOKEN_PREFIX);
        while let Some(row) = rows.next().map_err(|e| self.err(e))? {
            let id = row.get_ref(0).map_err(|e| self.err(e))?;
            each(id.as_str().map_err(|e| self.err(e.into()))?);
            let selector = row.get_ref(1).map_err(|e| self.err(e))?;
            if let Some(selector) = selector.as_str_or_null().map_err(|e| self.err(e.into()))? {
                label.truncate(crate::tokens::TOKEN_PREFIX.len());
                label.push_str(selector);
                each(&label);
            }
        }
        Ok(())
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

    fn lease_credits(
        &self,
        id: &str,
        want: u64,
        now: DateTime<Utc>,
    ) -> Result<Option<CreditLease>, KeyError> {
        self.with_credits(id, |c| {
            let before = c.clone();
            let lease = c.lease(want, now);
            (lease, *c != before)
        })
    }

    fn return_credits(&self, id: &str, n: u64, epoch: u64) -> Result<bool, KeyError> {
        Ok(self
            .with_credits(id, |c| {
                let given = c.give_back(n, epoch);
                (given, given)
            })?
            .unwrap_or(false))
    }

    fn write_credits(
        &self,
        id: &str,
        expected: Option<&Credits>,
        new: Option<&Credits>,
    ) -> Result<Option<u64>, KeyError> {
        let mut state = self.state.lock();
        let tx = state
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let current = self.credits_in(&tx, id)?;
        if !super::credits::same_state(current.as_ref(), expected) {
            return Ok(None);
        }
        let rev = bump_revision(&tx).map_err(|e| self.err(e))?;
        self.put_credits_in(&tx, id, new, Some(rev))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(Some(rev))
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

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::super::legacy::testing::{iso, write_file, Key02};
    use super::super::testing::{
        assert_secrets_absent, contains, manager_02, meta, opts, scopes, store_bytes,
    };
    use super::super::{sqlite, KeyManager};
    use super::*;
    use serde_json::Map;

    fn api_keys_dump(path: &Path) -> Vec<Vec<Option<String>>> {
        let conn = Connection::open(path).unwrap();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {} FROM api_keys ORDER BY id",
                legacy::COLUMNS.join(", ")
            ))
            .unwrap();
        stmt.query_map([], |r| {
            (0..legacy::COLUMNS.len())
                .map(|i| r.get::<_, Option<String>>(i))
                .collect()
        })
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
    }

    fn count(path: &Path, table: &str) -> i64 {
        Connection::open(path)
            .unwrap()
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }

    /// Three keys as 0.2 leaves them after `create`, `rotate(grace)` and `revoke`.
    fn three_keys() -> (Key02, Key02, Key02, Key02) {
        let now = Utc::now();
        let mut active = Key02::new("alice");
        active.scopes = r#"["read:data", "tools:write"]"#.to_owned();
        active.metadata = r#"{"team": "ops", "tier": 2}"#.to_owned();
        active.expires_at = Some(iso(now + chrono::Duration::days(30)));
        active.last_used_at = Some(iso(now - chrono::Duration::seconds(5)));
        let mut rotating = Key02::new("bob");
        rotating.status = "rotating";
        rotating.grace_until = Some(iso(now + chrono::Duration::hours(24)));
        let mut successor = Key02::new("bob");
        successor.rotated_from = Some(rotating.id.clone());
        successor.created_at = iso(now);
        let mut revoked = Key02::new("carol");
        revoked.status = "revoked";
        (active, rotating, successor, revoked)
    }

    #[test]
    fn a_0_2_file_is_imported_on_first_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let (active, rotating, successor, revoked) = three_keys();
        write_file(&path, &[&active, &rotating, &successor, &revoked]);
        let before = api_keys_dump(&path);

        let b = SqliteBackend::open(&path).unwrap();
        let rec = b.get(&active.id).unwrap().unwrap();
        assert_eq!(rec.name, "alice");
        assert_eq!(rec.scopes, ["read:data", "tools:write"]);
        assert_eq!(rec.metadata["team"], "ops");
        assert_eq!(rec.metadata["tier"], 2);
        assert_eq!(rec.status, KeyStatus::Active);
        assert_eq!(rec.phc_hash, active.hash);
        assert_eq!(
            rec.legacy_selector.as_deref(),
            Some(active.selector.as_str())
        );
        let ms_of = |s: &Option<String>| {
            legacy::parse_time(s.as_deref().unwrap())
                .unwrap()
                .timestamp_millis()
        };
        assert_eq!(
            rec.created_at.timestamp_millis(),
            ms_of(&Some(active.created_at.clone()))
        );
        assert_eq!(
            rec.expires_at.map(|t| t.timestamp_millis()),
            Some(ms_of(&active.expires_at))
        );
        assert_eq!(
            rec.last_used_at.map(|t| t.timestamp_millis()),
            Some(ms_of(&active.last_used_at))
        );
        assert!(rec.revision > 0);

        let rot = b.get(&rotating.id).unwrap().unwrap();
        assert_eq!(rot.status, KeyStatus::Rotating);
        assert_eq!(
            rot.grace_until.map(|t| t.timestamp_millis()),
            Some(ms_of(&rotating.grace_until))
        );
        assert_eq!(rot.rotated_to.as_deref(), Some(successor.id.as_str()));
        let succ = b.get(&successor.id).unwrap().unwrap();
        assert_eq!(succ.rotated_from.as_deref(), Some(rotating.id.as_str()));
        assert_eq!(
            b.get(&revoked.id).unwrap().unwrap().status,
            KeyStatus::Revoked
        );

        // Found by selector; the 0.2 table is untouched; the file is at the new version.
        let by_sel = b.get_by_legacy_selector(&active.selector).unwrap().unwrap();
        assert_eq!(by_sel, rec);
        assert!(b
            .get_by_legacy_selector("0000000000000000")
            .unwrap()
            .is_none());
        assert_eq!(b.list(true).unwrap().len(), 4);
        assert_eq!(api_keys_dump(&path), before);
        assert_eq!(count(&path, "fmg_legacy_imports"), 4);
        let version: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 3);
    }

    #[test]
    fn importing_is_idempotent_and_never_resurrects() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let (active, rotating, successor, revoked) = three_keys();
        write_file(&path, &[&active, &rotating, &successor, &revoked]);
        let first: Vec<KeyRecord> = {
            let b = SqliteBackend::open(&path).unwrap();
            let mut rec = b.get(&active.id).unwrap().unwrap();
            // Revoked here after the switch: no later import may bring it back as active.
            rec.status = KeyStatus::Revoked;
            b.update(&rec).unwrap();
            b.list(true).unwrap()
        };
        let b = SqliteBackend::open(&path).unwrap();
        assert_eq!(b.list(true).unwrap(), first);
        assert_eq!(
            b.import_legacy().unwrap(),
            LegacyImport {
                found: 4,
                imported: 0,
                already_imported: 4,
                conflicts: 0
            }
        );
        assert_eq!(b.list(true).unwrap(), first);
        assert_eq!(
            b.get(&active.id).unwrap().unwrap().status,
            KeyStatus::Revoked
        );

        // A key a 0.2 process added after the switch is only taken by an explicit import.
        let late = Key02::new("late");
        late.insert(&Connection::open(&path).unwrap());
        drop(b);
        let b = SqliteBackend::open(&path).unwrap();
        assert!(b.get(&late.id).unwrap().is_none());
        let report = b.import_legacy().unwrap();
        assert_eq!((report.found, report.imported), (5, 1));
        assert!(b.get(&late.id).unwrap().is_some());
        assert_eq!(count(&path, "fmg_keys"), 5);
    }

    #[test]
    fn a_row_whose_id_is_taken_is_a_conflict_not_an_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let b = SqliteBackend::open(&path).unwrap();
        let mut clash = Key02::new("clash");
        let mut mine = clash.to_row_record();
        mine.legacy_selector = None;
        mine.phc_hash = "$argon2id$mine".to_owned();
        b.insert(&mine).unwrap();
        clash.name = "theirs".to_owned();
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(legacy::testing::DDL).unwrap();
        clash.insert(&conn);
        let report = b.import_legacy().unwrap();
        assert_eq!((report.imported, report.conflicts), (0, 1));
        assert_eq!(
            b.get(&clash.id).unwrap().unwrap().phc_hash,
            "$argon2id$mine"
        );
    }

    #[test]
    fn a_version_1_file_gains_the_column_and_keeps_its_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATION_1).unwrap();
            conn.execute_batch(
                "CREATE TABLE schema_version (version INTEGER NOT NULL);
                 INSERT INTO schema_version VALUES (1);
                 UPDATE fmg_meta SET revision = 1;
                 INSERT INTO fmg_keys (id, name, phc_hash, scopes, metadata, status, created_at,
                     revision) VALUES ('fmg_key_AAAAAAAAAAAAAAAA', 'old', '$argon2id$x', '[]',
                     '{}', 'active', 1700000000000, 1);",
            )
            .unwrap();
        }
        let b = SqliteBackend::open(&path).unwrap();
        let rec = b.get("fmg_key_AAAAAAAAAAAAAAAA").unwrap().unwrap();
        assert_eq!((rec.name.as_str(), rec.legacy_selector), ("old", None));
        assert_eq!(rec.created_at.timestamp_millis(), 1_700_000_000_000);
        assert_eq!(b.import_legacy().unwrap(), LegacyImport::default());
    }

    #[test]
    fn a_bad_row_fails_the_open_naming_it_and_imports_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let good = Key02::new("good");
        let mut bad = Key02::new("bad");
        bad.expires_at = Some("next tuesday".to_owned());
        write_file(&path, &[&good, &bad]);
        let err = SqliteBackend::open(&path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, KeyError::Corrupt { .. }), "{msg}");
        assert!(
            msg.contains(&bad.id) && msg.contains("expires_at") && msg.contains("next tuesday"),
            "{msg}"
        );
        assert!(
            msg.contains("api_keys") && !msg.contains(&bad.hash),
            "{msg}"
        );
        // Nothing was written: not even our tables.
        let conn = Connection::open(&path).unwrap();
        let ours: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name LIKE 'fmg_%' \
                 OR name = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(ours, 0);
        // Fixed, it opens.
        conn.execute(
            "UPDATE api_keys SET expires_at = NULL WHERE id = ?1",
            [&bad.id],
        )
        .unwrap();
        drop(conn);
        let b = SqliteBackend::open(&path).unwrap();
        assert_eq!(b.list(true).unwrap().len(), 2);
    }

    #[test]
    fn a_foreign_api_keys_table_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE api_keys (id TEXT PRIMARY KEY, secret TEXT)")
            .unwrap();
        let err = SqliteBackend::open(&path).unwrap_err();
        assert!(matches!(err, KeyError::LegacyTable { .. }), "{err}");
        assert!(err.to_string().contains("token_hash"), "{err}");
    }

    #[test]
    fn an_empty_0_2_file_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        write_file(&path, &[]);
        let b = SqliteBackend::open(&path).unwrap();
        assert!(b.list(true).unwrap().is_empty());
        assert_eq!(
            b.import_legacy().unwrap(),
            LegacyImport {
                found: 0,
                ..LegacyImport::default()
            }
        );
    }

    #[test]
    fn selectors_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let b = SqliteBackend::open(dir.path().join("keys.db")).unwrap();
        let k = Key02::new("a");
        b.insert(&k.to_row_record()).unwrap();
        let mut twin = Key02::new("b").to_row_record();
        twin.legacy_selector = Some(k.selector.clone());
        let err = b.insert(&twin).unwrap_err();
        assert!(
            matches!(
                err,
                KeyError::InvalidInput {
                    field: "legacy_selector",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn token_and_secret_never_reach_the_sqlite_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let mut issued = Vec::new();
        {
            let m = KeyManager::sqlite(&path, opts()).unwrap();
            for i in 0..5 {
                let (rec, token) = m
                    .create(&format!("k{i}"), &scopes(&["read"]), None, Map::new())
                    .unwrap();
                m.verify(&token, Some("10.1.1.1")).unwrap();
                issued.push((rec.id, token));
            }
            let (_, rotated) = m.rotate(&issued[0].0, chrono::Duration::hours(1)).unwrap();
            m.revoke(&issued[1].0).unwrap();
            issued.push((String::new(), rotated));
            m.flush().unwrap();
            // Read the files while the WAL still holds the recent writes.
            let mut bytes = Vec::new();
            for entry in std::fs::read_dir(dir.path()).unwrap() {
                bytes.extend(std::fs::read(entry.unwrap().path()).unwrap());
            }
            assert_secrets_absent(&bytes, &issued);
        }
        let mut bytes = Vec::new();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            bytes.extend(std::fs::read(entry.unwrap().path()).unwrap());
        }
        // Sanity: we read the right files.
        let id = issued[2].0.as_bytes();
        assert!(bytes.windows(id.len()).any(|w| w == id));
        assert_secrets_absent(&bytes, &issued);
    }

    #[test]
    fn sqlite_open_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope").join("keys.db");
        let err = SqliteBackend::open(&missing).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, KeyError::DirectoryMissing { .. }), "{msg}");
        assert!(
            msg.contains("nope") && msg.contains("create the directory first"),
            "{msg}"
        );

        let text = dir.path().join("notes.txt");
        std::fs::write(
            &text,
            "this is not a database, just some text long enough ...".repeat(20),
        )
        .unwrap();
        let err = SqliteBackend::open(&text).unwrap_err();
        assert!(matches!(err, KeyError::NotADatabase { .. }), "{err}");
        assert!(err.to_string().contains("notes.txt"));

        let err = SqliteBackend::open(dir.path()).unwrap_err();
        assert!(matches!(err, KeyError::NotADatabase { .. }), "{err}");

        let future = dir.path().join("future.db");
        drop(SqliteBackend::open(&future).unwrap());
        let conn = rusqlite::Connection::open(&future).unwrap();
        conn.execute("UPDATE schema_version SET version = 99", [])
            .unwrap();
        drop(conn);
        let err = SqliteBackend::open(&future).unwrap_err();
        assert!(
            matches!(
                err,
                KeyError::SchemaTooNew {
                    found: 99,
                    supported: 3,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn sqlite_file_is_reopened_with_its_keys_and_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let (rec, token) = {
            let m = KeyManager::sqlite(&path, opts()).unwrap();
            m.create("persist", &scopes(&["read"]), None, meta("a", "b"))
                .unwrap()
        };
        let m = KeyManager::sqlite(&path, opts()).unwrap();
        assert_eq!(m.get(&rec.id).unwrap(), rec);
        m.verify(&token, None).unwrap();
        #[cfg(unix)]
        for suffix in ["", "-wal", "-shm"] {
            // The database and the files SQLite derives from it are private.
            use std::os::unix::fs::PermissionsExt;
            let file = format!("{}{suffix}", path.display());
            let perms = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(perms & 0o777, 0o600, "{file}");
        }
        let conn = rusqlite::Connection::open(&path).unwrap();
        let version: i64 = conn
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, sqlite::schema_version());
        assert_eq!(version, 3);
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let perms = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(perms & 0o777, 0o600);
        }
    }

    #[test]
    fn legacy_tokens_are_never_stored() {
        let k = Key02::new("alice");
        let (m, dir) = manager_02(&[&k]);
        m.verify(&k.token, Some("10.1.1.1")).unwrap();
        let (_, new_token) = m.rotate(&k.id, chrono::Duration::hours(1)).unwrap();
        m.verify(&k.token, None).unwrap();
        m.flush().unwrap();
        m.close().unwrap();
        drop(m);
        let bytes = store_bytes(dir.path());
        // The 0.2 file itself held only the bcrypt hash; neither we nor the import add
        // the token or its secret anywhere.
        assert!(
            contains(&bytes, k.hash.as_bytes()),
            "the bcrypt hash is kept"
        );
        assert!(contains(&bytes, k.selector.as_bytes()));
        for secret in [&k.token[24..], &k.token[30..50], &new_token[23..66]] {
            assert!(!contains(&bytes, secret.as_bytes()), "a secret was stored");
        }
    }
}
