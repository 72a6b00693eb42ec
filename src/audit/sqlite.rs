//! The queryable backend: audit events as rows of an `SQLite` table, and [`query`].
//!
//! * Table `audit_log` keeps the shape fastmcp-guard 0.2 created (`id INTEGER PRIMARY KEY
//!   AUTOINCREMENT, ts TEXT NOT NULL, key_id, key_name, tool, scopes, duration_ms REAL,
//!   status, error, input_args, output_preview, client_ip, metadata`, indexes `idx_ts`,
//!   `idx_key_id`, `idx_tool`), so a 0.2 audit database is taken over in place and its rows
//!   stay queryable. Version 2 adds an `extra` column and indexes `(key_id, ts)`,
//!   `(tool, ts)`, `(status, ts)` (the first two replace 0.2's one-column ones).
//! * `ts` is the RFC 3339 text of the JSONL log (`2026-03-09T14:00:00.042Z`): text order is
//!   time order, and `since` / `until` compare on it at millisecond precision. Rows written
//!   by 0.2 hold Python's `isoformat()` (`...T14:00:00.042123+00:00`), which sorts with them.
//! * JSON text columns: `scopes` (array), `input_args` (`NULL` when not logged), `metadata`
//!   (`{}` when empty) and `extra` (the event's extra fields as an object, `NULL` if none).
//! * WAL journal, `synchronous=NORMAL`, `busy_timeout` 5 s: several processes may write to
//!   one file, and queries read beside the writer. Each batch from the writer thread is one
//!   `IMMEDIATE` transaction running one cached prepared `INSERT`.
//! * The schema version lives in `audit_schema_version`, not `schema_version`: the key store
//!   uses that name, and one file may hold both. A file from a newer build is refused.
//! * Every statement is a compile-time constant with bound parameters; no value is ever
//!   spliced into SQL.

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::types::ValueRef;
use rusqlite::{
    params, CachedStatement, Connection, ErrorCode, OpenFlags, Row, Transaction,
    TransactionBehavior,
};
use serde_json::{Map, Value};

use super::mask::mask_str;
use std::borrow::Cow;

use super::{
    format_ts, write_json_str, write_ts, AuditError, AuditEvent, Batch, BatchFormat, RawJson, Sink,
    Status, FIXED_FIELDS,
};

/// The schema version this build writes (`audit_schema_version`).
pub const SQLITE_SCHEMA_VERSION: i64 = 2;

type Step = fn(&Transaction<'_>) -> rusqlite::Result<()>;

/// Entry `i` brings a file from version `i` to `i + 1`.
const MIGRATIONS: [Step; 2] = [migrate_v1, migrate_v2];

#[allow(clippy::cast_possible_wrap, reason = "two entries")]
const _: () = assert!(MIGRATIONS.len() as i64 == SQLITE_SCHEMA_VERSION);

/// fastmcp-guard 0.2's audit table and indexes, verbatim (`SQLiteAuditBackend._init_db`;
/// `IF NOT EXISTS`: a 0.2 file has them already, without a version table).
pub(crate) const DDL_0_2: &str = "
        CREATE TABLE IF NOT EXISTS audit_log (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts TEXT NOT NULL,
            key_id TEXT,
            key_name TEXT,
            tool TEXT,
            scopes TEXT,
            duration_ms REAL,
            status TEXT,
            error TEXT,
            input_args TEXT,
            output_preview TEXT,
            client_ip TEXT,
            metadata TEXT
        );
        CREATE INDEX IF NOT EXISTS idx_ts ON audit_log(ts);
        CREATE INDEX IF NOT EXISTS idx_key_id ON audit_log(key_id);
        CREATE INDEX IF NOT EXISTS idx_tool ON audit_log(tool);
        ";

/// Version 1: fastmcp-guard 0.2's table and indexes, exactly (`IF NOT EXISTS`: a 0.2 file
/// has them already, without a version table).
fn migrate_v1(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(DDL_0_2)
}

/// Version 2: the `extra` column (added only if absent), and indexes that also serve the
/// newest-first order: `(key_id, ts)` and `(tool, ts)` replace 0.2's one-column
/// `idx_key_id` and `idx_tool` (they serve every lookup those did; with one-column
/// indexes, the newest 100 rows of a key with 1 M rows cost a sort of 1 M rows), and
/// `(status, ts)` is new. Each row still updates four indexes.
fn migrate_v2(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "
        CREATE INDEX IF NOT EXISTS idx_key_id_ts ON audit_log(key_id, ts);
        CREATE INDEX IF NOT EXISTS idx_tool_ts ON audit_log(tool, ts);
        CREATE INDEX IF NOT EXISTS idx_status_ts ON audit_log(status, ts);
        DROP INDEX IF EXISTS idx_key_id;
        DROP INDEX IF EXISTS idx_tool;
        ",
    )?;
    if !column_names(tx)?.iter().any(|c| c == "extra") {
        tx.execute_batch("ALTER TABLE audit_log ADD COLUMN extra TEXT")?;
    }
    Ok(())
}

/// Columns the writer and the reader need (0.2's); the writer also needs `extra`.
const REQUIRED: [&str; 13] = [
    "id",
    "ts",
    "key_id",
    "key_name",
    "tool",
    "scopes",
    "duration_ms",
    "status",
    "error",
    "input_args",
    "output_preview",
    "client_ip",
    "metadata",
];

const INSERT: &str = "INSERT INTO audit_log (ts, key_id, key_name, tool, scopes, duration_ms, \
                      status, error, input_args, output_preview, client_ip, metadata, extra) \
                      VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)";

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

fn column_names(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('audit_log')")?;
    let names = stmt.query_map([], |r| r.get(0))?;
    names.collect()
}

/// Checks that `audit_log` has every column in `REQUIRED` (and `extra` if `need_extra`);
/// returns whether it has `extra`.
fn check_columns(conn: &Connection, path: &Path, need_extra: bool) -> Result<bool, AuditError> {
    let names = column_names(conn).map_err(|e| classify(path, e))?;
    if names.is_empty() {
        return Err(AuditError::Schema {
            path: path.to_path_buf(),
            problem: "has no audit_log table".to_owned(),
        });
    }
    let has_extra = names.iter().any(|n| n == "extra");
    let mut missing: Vec<&str> = REQUIRED
        .into_iter()
        .filter(|c| !names.iter().any(|n| n == c))
        .collect();
    if need_extra && !has_extra {
        missing.push("extra");
    }
    if missing.is_empty() {
        Ok(has_extra)
    } else {
        Err(AuditError::Schema {
            path: path.to_path_buf(),
            problem: format!(
                "lacks the columns {} in table audit_log",
                missing.join(", ")
            ),
        })
    }
}

/// `NotADatabase` when `SQLite` says so (the first statement that reads the file), else
/// `Database`.
fn classify(path: &Path, e: rusqlite::Error) -> AuditError {
    if e.sqlite_error_code() == Some(ErrorCode::NotADatabase) {
        AuditError::NotADatabase {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    } else {
        AuditError::Database {
            path: path.to_path_buf(),
            source: e,
        }
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), AuditError> {
    let db_err = |source| AuditError::Database {
        path: path.to_path_buf(),
        source,
    };
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS audit_schema_version (version INTEGER NOT NULL)")
        .map_err(db_err)?;
    let found: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM audit_schema_version",
            [],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    if found > SQLITE_SCHEMA_VERSION {
        return Err(AuditError::SchemaTooNew {
            path: path.to_path_buf(),
            found,
            supported: SQLITE_SCHEMA_VERSION,
        });
    }
    if found == SQLITE_SCHEMA_VERSION {
        return Ok(());
    }
    let done = usize::try_from(found).unwrap_or(0);
    for step in MIGRATIONS.iter().skip(done) {
        step(&tx).map_err(db_err)?;
    }
    tx.execute("DELETE FROM audit_schema_version", [])
        .map_err(db_err)?;
    tx.execute(
        "INSERT INTO audit_schema_version (version) VALUES (?1)",
        [SQLITE_SCHEMA_VERSION],
    )
    .map_err(db_err)?;
    tx.commit().map_err(db_err)
}

/// Creates `path` with mode 0600 (unix) if missing, so that the database and the WAL
/// files `SQLite` derives from it are private; checks that it can be opened read-write.
fn create_private(path: &Path) -> Result<(), AuditError> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)
        .map(drop)
        .map_err(|source| AuditError::Open {
            path: path.to_path_buf(),
            source,
        })
}

// ---------------------------------------------------------------------------
// Sink
// ---------------------------------------------------------------------------

/// Inserts batches into `audit_log` of an `SQLite` file, one transaction per batch.
/// Asks for [`BatchFormat::Events`]: each event's fields are bound to their columns
/// (its JSON fields as the text the producer rendered); nothing is serialised to JSONL.
pub struct SqliteSink {
    conn: Connection,
    path: PathBuf,
    /// Events not stored since the last batch: a JSON field was not UTF-8 (a bug if ever
    /// non-zero).
    unreadable: u64,
    /// Reused for the text columns of one row (ts and the JSON columns).
    scratch: Vec<u8>,
    /// Rows older than this are deleted (see [`SqliteSink::retain`]).
    retention: Option<chrono::Duration>,
    /// When the next pruning pass is due.
    next_prune: std::time::Instant,
}

/// How often a sink with a retention deletes old rows (and once at open).
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl std::fmt::Debug for SqliteSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteSink")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteSink {
    /// Opens (creating it, mode 0600 on unix, if missing) the database at `path`, sets WAL,
    /// `synchronous=NORMAL` and a 5 s busy timeout, and migrates the schema (a 0.2 file is
    /// taken over in place).
    ///
    /// # Errors
    /// [`AuditError::Open`] naming the path and what to fix (missing directory,
    /// permissions, a parent that is a file, a directory given as the path);
    /// [`AuditError::NotADatabase`] (e.g. a JSONL log); [`AuditError::SchemaTooNew`];
    /// [`AuditError::Schema`] (an `audit_log` table of another shape);
    /// [`AuditError::Database`] for other `SQLite` failures.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        create_private(path)?;
        let db_err = |source| AuditError::Database {
            path: path.to_path_buf(),
            source,
        };
        let mut conn = Connection::open(path).map_err(db_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
        // The first statement that reads the file: detects files that are not databases.
        crate::sqlite_wal::enable_wal(&conn, BUSY_TIMEOUT).map_err(|e| classify(path, e))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db_err)?;
        // An existing table of another shape is refused before any change to the file.
        if !column_names(&conn).map_err(db_err)?.is_empty() {
            check_columns(&conn, path, false)?;
        }
        migrate(&mut conn, path)?;
        check_columns(&conn, path, true)?;
        Ok(SqliteSink {
            conn,
            path: path.to_path_buf(),
            scratch: Vec::with_capacity(1024),
            unreadable: 0,
            retention: None,
            next_prune: std::time::Instant::now(),
        })
    }

    /// Keeps only the last `days` days of events: older rows are deleted now, then about
    /// once a minute, after a batch (one indexed `DELETE` by `ts`). `None` keeps all.
    ///
    /// # Errors
    /// [`AuditError::InvalidOption`] for a non-positive or absurd number of days;
    /// [`AuditError::Database`] if the first pruning fails.
    pub fn retain(mut self, days: Option<f64>) -> Result<Self, AuditError> {
        let Some(days) = days else {
            return Ok(self);
        };
        if !(days.is_finite() && days > 0.0 && days <= 365.0 * 1000.0) {
            return Err(AuditError::InvalidOption {
                name: "retention_days",
                value: days.to_string(),
                fix: "use a number of days > 0 (e.g. 90), or None to keep everything",
            });
        }
        #[allow(
            clippy::cast_possible_truncation,
            reason = "days <= 365,000, so the milliseconds fit in i64"
        )]
        let ms = (days * 86_400_000.0) as i64;
        self.retention = Some(chrono::Duration::milliseconds(ms));
        self.prune().map_err(|source| AuditError::Database {
            path: self.path.clone(),
            source,
        })?;
        Ok(self)
    }

    /// Deletes the rows older than the retention; returns how many.
    fn prune(&mut self) -> rusqlite::Result<usize> {
        let Some(keep) = self.retention else {
            return Ok(0);
        };
        self.next_prune = std::time::Instant::now() + PRUNE_EVERY;
        let cutoff = format_ts(&(Utc::now() - keep));
        // Stored `ts` are RFC 3339 UTC (ours fixed-width with `Z`; 0.2's with `+00:00`):
        // both order as text by instant up to the second, enough to prune by days.
        self.conn
            .execute("DELETE FROM audit_log WHERE ts < ?1", [cutoff])
    }

    /// The database path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn io_err(e: rusqlite::Error) -> io::Error {
    io::Error::other(e)
}

/// Binds one event's fields to the cached `INSERT` and runs it: the JSON columns are the
/// event's own text ([`RawJson`]), so nothing is serialised twice. Every text column goes
/// through the token mask, as a rendered line does. `Ok(false)`: a JSON field was not
/// UTF-8 (a producer's bug): the row is skipped and counted.
fn insert_row(
    stmt: &mut CachedStatement<'_>,
    buf: &mut Vec<u8>,
    ev: &AuditEvent,
) -> rusqlite::Result<bool> {
    buf.clear();
    write_ts(buf, &ev.ts);
    let ts_end = buf.len();
    buf.push(b'[');
    for (i, scope) in ev.scopes.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        write_json_str(buf, scope);
    }
    buf.push(b']');
    let text = |a: usize, b: usize| std::str::from_utf8(&buf[a..b]).map(mask_str);
    let ts = text(0, ts_end)?;
    let scopes = text(ts_end, buf.len())?;
    let (Ok(args), Ok(meta), Ok(extra)) = (raw(&ev.input_args), raw(&ev.metadata), raw(&ev.extra))
    else {
        return Ok(false);
    };
    stmt.execute(params![
        ts,
        mask_str(&ev.key_id),
        mask_str(&ev.key_name),
        mask_str(&ev.tool),
        scopes,
        stored_duration(ev.duration_ms),
        ev.status.as_str(),
        ev.error.as_deref().map(mask_str),
        args,
        ev.output_preview.as_deref().map(mask_str),
        ev.client_ip.as_deref().map(mask_str),
        meta.as_deref().unwrap_or("{}"),
        extra,
    ])?;
    Ok(true)
}

/// A JSON field's text for its column, masked; `Err` if it is not UTF-8.
fn raw(r: &Option<RawJson>) -> Result<Option<Cow<'_, str>>, ()> {
    match r {
        Some(r) if !r.is_empty() => r.as_str().map(|t| Some(mask_str(t))).ok_or(()),
        _ => Ok(None),
    }
}

/// `duration_ms` rounded to 3 decimals, as the JSONL log writes it; `NULL` if not finite.
fn stored_duration(d: f64) -> Option<f64> {
    if !d.is_finite() {
        return None;
    }
    let r = (d * 1000.0).round() / 1000.0;
    Some(if r.is_finite() { r } else { d })
}

impl Sink for SqliteSink {
    fn format(&self) -> BatchFormat {
        BatchFormat::Events
    }

    fn write_batch(&mut self, batch: &Batch<'_>) -> io::Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(io_err)?;
        {
            let mut stmt = tx.prepare_cached(INSERT).map_err(io_err)?;
            for ev in batch.events() {
                if !insert_row(&mut stmt, &mut self.scratch, ev).map_err(io_err)? {
                    self.unreadable += 1;
                }
            }
        }
        // On any error above, dropping `tx` rolls the whole batch back.
        tx.commit().map_err(io_err)?;
        if self.retention.is_some() && std::time::Instant::now() >= self.next_prune {
            self.prune().map_err(io_err)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Each batch was committed: its rows are in the WAL, handed to the OS.
        Ok(())
    }

    fn take_warning(&mut self) -> Option<AuditError> {
        if self.unreadable == 0 {
            return None;
        }
        let n = std::mem::take(&mut self.unreadable);
        Some(AuditError::Write {
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{n} audit event(s) not stored: a JSON field was not UTF-8 (a bug)"),
            ),
        })
    }

    fn sync(&mut self) -> io::Result<()> {
        // A checkpoint fsyncs the WAL first. PASSIVE never waits for readers.
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .map_err(io_err)
    }
}

// ---------------------------------------------------------------------------
// Query
// ---------------------------------------------------------------------------

/// Filters for [`query`]. `None` matches everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditQuery {
    /// Exact key id.
    pub key_id: Option<String>,
    /// Exact key name.
    pub key_name: Option<String>,
    /// Exact tool (or resource / prompt / lifecycle operation) name.
    pub tool: Option<String>,
    /// Exact status.
    pub status: Option<Status>,
    /// Events at or after this instant (millisecond precision).
    pub since: Option<DateTime<Utc>>,
    /// Events strictly before this instant (millisecond precision).
    pub until: Option<DateTime<Utc>>,
    /// Most records returned (default 100); 0 returns none.
    pub limit: usize,
}

impl Default for AuditQuery {
    fn default() -> Self {
        AuditQuery {
            key_id: None,
            key_name: None,
            tool: None,
            status: None,
            since: None,
            until: None,
            limit: 100,
        }
    }
}

/// One stored event, as [`query`] returns it. Rows written by other programs (or by
/// fastmcp-guard 0.2) are read leniently: a `NULL` text is `""`, a `NULL` duration `0.0`,
/// a column holding invalid JSON is returned as a JSON string of its text.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    /// Row id (insertion order).
    pub id: i64,
    /// The stored timestamp text (RFC 3339).
    pub ts: String,
    /// Key id or other client id.
    pub key_id: String,
    /// Key name.
    pub key_name: String,
    /// Tool, resource or prompt name (or the lifecycle operation).
    pub tool: String,
    /// Scopes of the caller.
    pub scopes: Vec<String>,
    /// Time spent, in milliseconds.
    pub duration_ms: f64,
    /// Status name as stored (one of [`Status::ALL`] for rows this crate wrote).
    pub status: String,
    /// Error message.
    pub error: Option<String>,
    /// Tool arguments, if they were logged.
    pub input_args: Option<Value>,
    /// Start of the output, if it was logged.
    pub output_preview: Option<String>,
    /// Client address.
    pub client_ip: Option<String>,
    /// Metadata (an empty object when none).
    pub metadata: Value,
    /// Extra fields (never a name from [`FIXED_FIELDS`]).
    pub extra: Map<String, Value>,
}

/// `SELECT` for one driving filter. Each filter is `(?n IS NULL OR col = ?n)`; the
/// driving one is also stated plainly so that `SQLite` can use its index.
macro_rules! select {
    ($extra:literal, $driver:literal) => {
        concat!(
            "SELECT id, ts, key_id, key_name, tool, scopes, duration_ms, status, error, \
             input_args, output_preview, client_ip, metadata, ",
            $extra,
            " FROM audit_log WHERE ",
            $driver,
            " AND (?1 IS NULL OR key_id = ?1) AND (?2 IS NULL OR key_name = ?2) \
             AND (?3 IS NULL OR tool = ?3) AND (?4 IS NULL OR status = ?4) \
             AND ts >= ?5 AND ts < ?6 ORDER BY ts DESC, id DESC LIMIT ?7"
        )
    };
}

/// `SELECTS[has extra column][driver]`, drivers: key id, tool, status, time.
const SELECTS: [[&str; 4]; 2] = [
    [
        select!("NULL", "key_id = ?1"),
        select!("NULL", "tool = ?3"),
        select!("NULL", "status = ?4"),
        select!("NULL", "1"),
    ],
    [
        select!("extra", "key_id = ?1"),
        select!("extra", "tool = ?3"),
        select!("extra", "status = ?4"),
        select!("extra", "1"),
    ],
];

/// Above every timestamp text (`ts < ?6` when there is no `until`).
const TS_MAX: &str = "\u{10FFFF}";

fn select_for(q: &AuditQuery, has_extra: bool) -> &'static str {
    let driver = if q.key_id.is_some() {
        0
    } else if q.tool.is_some() {
        1
    } else if q.status.is_some() {
        2
    } else {
        3
    };
    SELECTS[usize::from(has_extra)][driver]
}

/// Records of the `SQLite` audit database at `path` matching `q`, newest first (by `ts`,
/// then by insertion order). Opens its own connection (read-only in effect:
/// `query_only`), so it runs beside a writer in this or another process, and never
/// creates or migrates the file: an unmigrated 0.2 database is read as it is.
///
/// # Errors
/// [`AuditError::NoDatabase`] if there is no file at `path`; [`AuditError::NotADatabase`];
/// [`AuditError::Schema`] if it has no usable `audit_log` table; [`AuditError::Database`].
pub fn query(path: &Path, q: &AuditQuery) -> Result<Vec<AuditRecord>, AuditError> {
    if !path.is_file() {
        return Err(AuditError::NoDatabase {
            path: path.to_path_buf(),
        });
    }
    let db_err = |source| AuditError::Database {
        path: path.to_path_buf(),
        source,
    };
    // READ_WRITE without CREATE: falls back to read-only if the file is write-protected.
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(db_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
    conn.pragma_update(None, "query_only", true)
        .map_err(db_err)?;
    let has_extra = check_columns(&conn, path, false)?;
    let since = q.since.as_ref().map(format_ts).unwrap_or_default();
    let until = q
        .until
        .as_ref()
        .map_or_else(|| TS_MAX.to_owned(), format_ts);
    let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
    let mut stmt = conn.prepare(select_for(q, has_extra)).map_err(db_err)?;
    let rows = stmt
        .query_map(
            params![
                q.key_id,
                q.key_name,
                q.tool,
                q.status.map(Status::as_str),
                since,
                until,
                limit
            ],
            decode,
        )
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
}

fn text(row: &Row<'_>, i: usize) -> rusqlite::Result<Option<String>> {
    Ok(match row.get_ref(i)? {
        ValueRef::Null => None,
        ValueRef::Text(t) | ValueRef::Blob(t) => Some(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Integer(n) => Some(n.to_string()),
        ValueRef::Real(x) => Some(x.to_string()),
    })
}

/// Parses a JSON column; text that is not JSON comes back as a JSON string.
fn json(raw: Option<String>) -> Option<Value> {
    raw.map(|s| match serde_json::from_str::<Value>(&s) {
        Ok(v) => v,
        Err(_) => Value::String(s),
    })
}

fn decode(row: &Row<'_>) -> rusqlite::Result<AuditRecord> {
    let scopes = match json(text(row, 5)?) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => s,
                other => other.to_string(),
            })
            .collect(),
        Some(Value::String(s)) => vec![s],
        Some(other) => vec![other.to_string()],
    };
    #[allow(
        clippy::cast_precision_loss,
        reason = "a duration stored as an integer"
    )]
    let duration_ms = match row.get_ref(6)? {
        ValueRef::Real(x) => x,
        ValueRef::Integer(n) => n as f64,
        ValueRef::Text(t) => std::str::from_utf8(t)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0.0),
        ValueRef::Null | ValueRef::Blob(_) => 0.0,
    };
    let extra = match json(text(row, 13)?) {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m
            .into_iter()
            .filter(|(k, _)| !FIXED_FIELDS.contains(&k.as_str()))
            .collect(),
        Some(other) => Map::from_iter([("extra".to_owned(), other)]),
    };
    Ok(AuditRecord {
        id: row.get(0)?,
        ts: text(row, 1)?.unwrap_or_default(),
        key_id: text(row, 2)?.unwrap_or_default(),
        key_name: text(row, 3)?.unwrap_or_default(),
        tool: text(row, 4)?.unwrap_or_default(),
        scopes,
        duration_ms,
        status: text(row, 7)?.unwrap_or_default(),
        error: text(row, 8)?,
        input_args: json(text(row, 9)?).filter(|v| !v.is_null()),
        output_preview: text(row, 10)?,
        client_ip: text(row, 11)?,
        metadata: match json(text(row, 12)?) {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(v) => v,
        },
        extra,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing unwrap is a failing test")]
mod tests {
    use super::*;
    use crate::audit::{AuditWriter, WriterOptions};
    use chrono::TimeZone;
    use serde_json::json;

    fn at(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(ms).single().unwrap()
    }

    /// 2026-03-09T14:00:00.000Z
    const T0: i64 = 1_773_064_800_000;

    fn event(i: i64, key: &str, tool: &str, status: Status) -> AuditEvent {
        let mut ev = AuditEvent::new(key, format!("name-{key}"), tool, status);
        ev.ts = at(T0 + i * 1000);
        ev
    }

    fn write_all(path: &Path, events: Vec<AuditEvent>) {
        let w = AuditWriter::open_sqlite(path, WriterOptions::default()).unwrap();
        for ev in events {
            assert!(w.enqueue(ev));
        }
        w.close().unwrap();
        let s = w.stats();
        assert_eq!((s.failed, s.write_errors), (0, 0), "{:?}", w.last_error());
    }

    fn q() -> AuditQuery {
        AuditQuery::default()
    }

    fn keys(recs: &[AuditRecord]) -> Vec<String> {
        recs.iter()
            .map(|r| format!("{}@{}", r.key_id, &r.ts[14..19]))
            .collect()
    }

    fn pragma(conn: &Connection, name: &str) -> String {
        conn.query_row(&format!("PRAGMA {name}"), [], |r| {
            Ok(match r.get_ref(0)? {
                ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                ValueRef::Integer(n) => n.to_string(),
                _ => String::new(),
            })
        })
        .unwrap()
    }

    fn version(path: &Path) -> Option<i64> {
        let conn = Connection::open(path).unwrap();
        conn.query_row("SELECT MAX(version) FROM audit_schema_version", [], |r| {
            r.get(0)
        })
        .ok()
    }

    // ---- writing ----

    #[test]
    fn every_field_round_trips_through_a_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let mut ev = event(0, "fmg_key_abc", "search", Status::RateLimited);
        ev.ts = at(T0 + 42) + chrono::Duration::microseconds(999);
        ev.scopes = vec!["read".into(), "we\"ird\n".into()];
        ev.duration_ms = 12.345_67;
        ev.error = Some("Rate limit exceeded".into());
        ev.input_args = Some(json!({"q": "x\u{0}y", "n": [1, 2.5, null]}).into());
        ev.output_preview = Some("r\u{e9}sultat".into());
        ev.client_ip = Some("10.0.0.7".into());
        ev.metadata = Some(json!({"team": "ops"}).into());
        let mut extra = Map::new();
        extra.insert("retry_after".into(), json!(1.5));
        extra.insert("status".into(), json!("ok")); // cannot shadow a fixed field
        ev.extra = RawJson::extra(&extra);
        write_all(&path, vec![ev, event(1, "k2", "t", Status::Ok)]);

        let recs = query(&path, &q()).unwrap();
        assert_eq!(recs.len(), 2);
        let r = &recs[1];
        assert_eq!(r.ts, "2026-03-09T14:00:00.042Z");
        assert_eq!(r.key_id, "fmg_key_abc");
        assert_eq!(r.key_name, "name-fmg_key_abc");
        assert_eq!(r.tool, "search");
        assert_eq!(r.scopes, ["read", "we\"ird\n"]);
        assert!((r.duration_ms - 12.346).abs() < 1e-9, "{}", r.duration_ms);
        assert_eq!(r.status, "rate_limited");
        assert_eq!(r.error.as_deref(), Some("Rate limit exceeded"));
        assert_eq!(
            r.input_args,
            Some(json!({"q": "x\u{0}y", "n": [1, 2.5, null]}))
        );
        assert_eq!(r.output_preview.as_deref(), Some("r\u{e9}sultat"));
        assert_eq!(r.client_ip.as_deref(), Some("10.0.0.7"));
        assert_eq!(r.metadata, json!({"team": "ops"}));
        assert_eq!(Value::Object(r.extra.clone()), json!({"retry_after": 1.5}));
        // Absent optional fields.
        let bare = &recs[0];
        assert_eq!(
            (
                &bare.error,
                &bare.input_args,
                &bare.output_preview,
                &bare.client_ip
            ),
            (&None, &None, &None, &None)
        );
        assert_eq!(bare.metadata, json!({}));
        assert!(bare.scopes.is_empty() && bare.extra.is_empty());
        // Stored shapes: JSON text, and NULL for absent input_args / extra.
        let conn = Connection::open(&path).unwrap();
        let (scopes, args, meta, extra): (String, Option<String>, String, Option<String>) = conn
            .query_row(
                "SELECT scopes, input_args, metadata, extra FROM audit_log WHERE key_id = 'k2'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!(
            (scopes.as_str(), args, meta.as_str(), extra),
            ("[]", None, "{}", None)
        );
    }

    /// Every column of every row, as text (`NULL` as `None`), in insertion order.
    #[test]
    fn a_row_holds_what_the_line_of_the_same_event_holds() {
        let dir = tempfile::tempdir().unwrap();
        let mut full = event(0, "fmg_key_abc", "se\"arch", Status::RateLimited);
        full.scopes = vec!["read".into(), "we\"ird\n".into()];
        full.duration_ms = 12.345_67;
        full.error = Some("Rate limit \u{1f600} exceeded".into());
        full.input_args = Some(json!({"q": "x\u{0}y", "n": [1, 2.5, null, -0.0, 1e300]}).into());
        full.output_preview = Some("r\u{e9}sultat".into());
        full.client_ip = Some("10.0.0.7".into());
        full.metadata = Some(json!({"team": "ops", "nested": {"a": []}}).into());
        let mut extra = Map::new();
        extra.insert("retry_after".into(), json!(1.5));
        extra.insert("status".into(), json!("ok")); // cannot shadow a fixed field
        extra.insert("id".into(), json!("x")); // nor a seal field
        full.extra = RawJson::extra(&extra);
        let mut odd = event(1, "", "", Status::Ok);
        odd.duration_ms = f64::NAN;
        odd.input_args = Some(json!("just a string").into());
        let events = vec![full, odd, event(2, "k2", "t", Status::Error)];
        let path = dir.path().join("e.db");
        write_all(&path, events.clone());
        let mut rows = query(&path, &q()).unwrap();
        rows.reverse();
        assert_eq!(rows.len(), 3);
        for (ev, row) in events.iter().zip(&rows) {
            let mut line = Vec::new();
            crate::audit::write_line(&mut line, ev);
            let v: Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(row.ts, v["ts"].as_str().unwrap());
            assert_eq!(row.key_id, v["key_id"].as_str().unwrap());
            assert_eq!(row.tool, v["tool"].as_str().unwrap());
            assert_eq!(json!(row.scopes), v["scopes"]);
            assert_eq!(
                row.input_args.clone().unwrap_or(Value::Null),
                v["input_args"]
            );
            assert_eq!(row.metadata, v["metadata"]);
            assert_eq!(row.error.as_deref(), v["error"].as_str());
            assert_eq!(row.client_ip.as_deref(), v["client_ip"].as_str());
            let extras: Vec<_> = v
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| !FIXED_FIELDS.contains(&k.as_str()))
                .cloned()
                .collect();
            let row_extras: Vec<_> = row.extra.keys().cloned().collect();
            assert_eq!(row_extras, extras);
        }
        assert_eq!(rows[0].extra["retry_after"], json!(1.5));
    }

    #[test]
    fn an_unstorable_event_is_skipped_and_reported_not_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let w = AuditWriter::open_sqlite(&path, WriterOptions::default()).unwrap();
        assert!(w.enqueue(event(0, "a", "t", Status::Ok)));
        let mut broken = event(1, "b", "t", Status::Ok);
        AuditEvent::set_json(&mut broken.input_args, |buf| {
            buf.extend_from_slice(b"\"\xff\"");
            true
        });
        assert!(w.enqueue(broken));
        assert!(w.enqueue(event(2, "c", "t", Status::Ok)));
        w.close().unwrap();
        assert_eq!(query(&path, &q()).unwrap().len(), 2);
        assert_eq!(w.stats().write_errors, 1);
        let err = w.last_error().unwrap();
        assert!(err.contains("not UTF-8"), "{err}");
    }

    #[test]
    fn ts_text_matches_the_jsonl_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let ev = event(7, "k", "t", Status::Ok);
        let mut line = Vec::new();
        crate::audit::write_line(&mut line, &ev);
        let v: Value = serde_json::from_slice(&line).unwrap();
        write_all(&path, vec![ev]);
        assert_eq!(query(&path, &q()).unwrap()[0].ts, v["ts"].as_str().unwrap());
    }

    #[test]
    fn new_database_is_private_wal_and_versioned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let sink = SqliteSink::open(&path).unwrap();
        assert_eq!(pragma(&sink.conn, "journal_mode"), "wal");
        assert_eq!(pragma(&sink.conn, "synchronous"), "1"); // NORMAL
        assert_eq!(pragma(&sink.conn, "busy_timeout"), "5000");
        assert_eq!(sink.format(), BatchFormat::Events);
        drop(sink);
        assert_eq!(version(&path), Some(SQLITE_SCHEMA_VERSION));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Reopening is a no-op migration and keeps the rows.
        write_all(&path, vec![event(0, "a", "t", Status::Ok)]);
        write_all(&path, vec![event(1, "b", "t", Status::Ok)]);
        assert_eq!(query(&path, &q()).unwrap().len(), 2);
        assert_eq!(version(&path), Some(SQLITE_SCHEMA_VERSION));
    }

    #[test]
    fn retention_prunes_old_rows_at_open_and_after_batches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let old = |i: i64| {
            let mut ev = event(i, "k", "t", Status::Ok);
            ev.ts = Utc::now() - chrono::Duration::days(10) + chrono::Duration::milliseconds(i);
            Box::new(ev)
        };
        let fresh = |i: i64| {
            let mut ev = event(i, "k", "t", Status::Ok);
            ev.ts = Utc::now();
            Box::new(ev)
        };
        let mut sink = SqliteSink::open(&path).unwrap();
        sink.write_batch(&Batch::of_events(&[old(1), old(2), fresh(3)]))
            .unwrap();
        drop(sink);
        let count = || {
            query(&path, &AuditQuery { limit: 1000, ..q() })
                .unwrap()
                .len()
        };
        assert_eq!(count(), 3);
        // Opening with a 7-day retention prunes at once.
        let mut sink = SqliteSink::open(&path).unwrap().retain(Some(7.0)).unwrap();
        assert_eq!(count(), 1);
        // Later batches prune when a pass is due (not every batch).
        sink.write_batch(&Batch::of_events(&[old(4)])).unwrap();
        assert_eq!(count(), 2, "not due yet");
        sink.next_prune = std::time::Instant::now();
        sink.write_batch(&Batch::of_events(&[fresh(5)])).unwrap();
        assert_eq!(count(), 2, "the old row went, the fresh one came");
        for bad in [0.0, -1.0, f64::NAN, 1e9] {
            let err = SqliteSink::open(&path)
                .unwrap()
                .retain(Some(bad))
                .unwrap_err();
            assert!(err.to_string().contains("retention_days"), "{err}");
        }
    }

    #[test]
    fn a_batch_is_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let mut sink = SqliteSink::open(&path).unwrap();
        sink.conn
            .execute_batch(
                "CREATE TRIGGER poison BEFORE INSERT ON audit_log WHEN NEW.tool = 'poison'
                 BEGIN SELECT RAISE(ABORT, 'poisoned row'); END",
            )
            .unwrap();
        let good: Vec<Box<AuditEvent>> = (0..3)
            .map(|i| Box::new(event(i, "k", "ok", Status::Ok)))
            .collect();
        sink.write_batch(&Batch::of_events(&good)).unwrap();
        let mut bad = good.clone();
        bad.insert(2, Box::new(event(9, "k", "poison", Status::Ok)));
        let err = sink.write_batch(&Batch::of_events(&bad)).unwrap_err();
        assert!(err.to_string().contains("poisoned row"), "{err}");
        // The rows before the failing one were rolled back with it.
        assert_eq!(query(&path, &q()).unwrap().len(), 3);
        // The connection is usable afterwards.
        sink.write_batch(&Batch::of_events(&good)).unwrap();
        assert_eq!(query(&path, &q()).unwrap().len(), 6);
    }

    #[test]
    fn failed_batches_are_counted_and_the_thread_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        SqliteSink::open(&path).unwrap();
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TRIGGER poison BEFORE INSERT ON audit_log WHEN NEW.tool = 'poison'
                 BEGIN SELECT RAISE(ABORT, 'poisoned row'); END",
            )
            .unwrap();
        let w = AuditWriter::open_sqlite(&path, WriterOptions::default()).unwrap();
        w.enqueue(event(0, "k", "poison", Status::Ok));
        let err = w.flush().unwrap_err();
        assert!(matches!(err, AuditError::Write { .. }), "{err:?}");
        assert!(w.last_error().unwrap().contains("poisoned row"));
        w.enqueue(event(1, "k", "fine", Status::Ok));
        w.flush().unwrap();
        w.close().unwrap();
        let s = w.stats();
        assert_eq!((s.enqueued, s.written, s.failed), (2, 1, 1));
        assert_eq!(query(&path, &q()).unwrap()[0].tool, "fine");
    }

    #[test]
    fn rows_are_visible_to_queries_after_flush_while_the_writer_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let w = AuditWriter::open_sqlite(&path, WriterOptions::default()).unwrap();
        for i in 0..5000 {
            w.enqueue(event(i, "k", "t", Status::Ok));
        }
        w.flush().unwrap();
        let all = AuditQuery {
            limit: 10_000,
            ..q()
        };
        assert_eq!(query(&path, &all).unwrap().len(), 5000);
        assert_eq!(w.stats().written, 5000);
        w.close().unwrap();
    }

    // ---- querying ----

    fn fixture() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        write_all(
            &path,
            vec![
                event(0, "a", "search", Status::Ok),
                event(1, "b", "search", Status::Error),
                event(2, "a", "write", Status::RateLimited),
                event(3, "a", "search", Status::Ok),
                event(4, "c", "write", Status::Forbidden),
                // Same millisecond as the previous one: insertion order breaks the tie.
                event(4, "d", "write", Status::Ok),
            ],
        );
        (dir, path)
    }

    #[test]
    fn newest_first_with_insertion_order_tie_break() {
        let (_d, path) = fixture();
        let recs = query(&path, &q()).unwrap();
        assert_eq!(
            keys(&recs),
            ["d@00:04", "c@00:04", "a@00:03", "a@00:02", "b@00:01", "a@00:00"]
        );
        assert!(recs.windows(2).all(|w| w[0].id != w[1].id));
    }

    #[test]
    fn filters_combine() {
        let (_d, path) = fixture();
        let run = |q: AuditQuery| keys(&query(&path, &q).unwrap());
        assert_eq!(
            run(AuditQuery {
                key_id: Some("a".into()),
                ..q()
            }),
            ["a@00:03", "a@00:02", "a@00:00"]
        );
        assert_eq!(
            run(AuditQuery {
                key_name: Some("name-b".into()),
                ..q()
            }),
            ["b@00:01"]
        );
        assert_eq!(
            run(AuditQuery {
                tool: Some("write".into()),
                ..q()
            }),
            ["d@00:04", "c@00:04", "a@00:02"]
        );
        assert_eq!(
            run(AuditQuery {
                status: Some(Status::Ok),
                ..q()
            }),
            ["d@00:04", "a@00:03", "a@00:00"]
        );
        assert_eq!(
            run(AuditQuery {
                key_id: Some("a".into()),
                tool: Some("search".into()),
                status: Some(Status::Ok),
                ..q()
            }),
            ["a@00:03", "a@00:00"]
        );
        assert!(run(AuditQuery {
            key_id: Some("nobody".into()),
            ..q()
        })
        .is_empty());
        // Values are bound, never spliced into SQL.
        assert!(run(AuditQuery {
            key_id: Some("a' OR '1'='1".into()),
            ..q()
        })
        .is_empty());
    }

    #[test]
    fn since_is_inclusive_until_exclusive_and_limit_caps() {
        let (_d, path) = fixture();
        let run = |q: AuditQuery| keys(&query(&path, &q).unwrap());
        assert_eq!(
            run(AuditQuery {
                since: Some(at(T0 + 1000)),
                until: Some(at(T0 + 3000)),
                ..q()
            }),
            ["a@00:02", "b@00:01"]
        );
        assert_eq!(
            run(AuditQuery {
                since: Some(at(T0 + 3000)),
                ..q()
            }),
            ["d@00:04", "c@00:04", "a@00:03"]
        );
        assert_eq!(
            run(AuditQuery {
                until: Some(at(T0 + 1000)),
                ..q()
            }),
            ["a@00:00"]
        );
        assert_eq!(run(AuditQuery { limit: 2, ..q() }), ["d@00:04", "c@00:04"]);
        assert!(run(AuditQuery { limit: 0, ..q() }).is_empty());
        assert!(run(AuditQuery {
            since: Some(at(T0 + 10_000)),
            ..q()
        })
        .is_empty());
    }

    #[test]
    fn each_driving_filter_uses_its_index() {
        let (_d, path) = fixture();
        let conn = Connection::open(&path).unwrap();
        for (driver, index) in [
            (0, "idx_key_id_ts"),
            (1, "idx_tool_ts"),
            (2, "idx_status_ts"),
            (3, "idx_ts"),
        ] {
            let sql = format!("EXPLAIN QUERY PLAN {}", SELECTS[1][driver]);
            let mut stmt = conn.prepare(&sql).unwrap();
            let plan: Vec<String> = stmt
                .query_map(
                    params!["a", None::<String>, "t", "ok", "", TS_MAX, 10],
                    |r| r.get(3),
                )
                .unwrap()
                .map(Result::unwrap)
                .collect();
            assert!(plan.iter().any(|p| p.contains(index)), "{index}: {plan:?}");
            // The index gives the newest-first order: no sort of the matching rows.
            assert!(!plan.iter().any(|p| p.contains("TEMP B-TREE")), "{plan:?}");
        }
    }

    // ---- fastmcp-guard 0.2 databases ----

    /// A database as 0.2 left it, with one row as 0.2's `_write_sync` wrote it.
    fn db_0_2(path: &Path) {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(DDL_0_2).unwrap();
        conn.execute(
            "INSERT INTO audit_log (ts, key_id, key_name, tool, scopes, duration_ms, status, \
             error, input_args, output_preview, client_ip, metadata) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                "2026-03-09T13:59:59.123456+00:00",
                "key_0_2",
                "legacy",
                "get_data",
                "[\"read:data\"]",
                4.56,
                "ok",
                None::<String>,
                "null",
                "Results for: x",
                "10.0.0.1",
                "{\"team\": \"data\"}",
            ],
        )
        .unwrap();
    }

    #[test]
    fn a_0_2_database_is_migrated_in_place_and_its_rows_stay_queryable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        db_0_2(&path);
        // Readable before any migration, without changing the file.
        let before = query(&path, &q()).unwrap();
        assert_eq!(before.len(), 1);
        assert_eq!(version(&path), None);

        write_all(&path, vec![event(0, "fmg_key_new", "get_data", Status::Ok)]);
        assert_eq!(version(&path), Some(SQLITE_SCHEMA_VERSION));
        let conn = Connection::open(&path).unwrap();
        assert!(column_names(&conn).unwrap().contains(&"extra".to_owned()));
        let indexes: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            indexes,
            ["idx_key_id_ts", "idx_status_ts", "idx_tool_ts", "idx_ts"]
        );

        let recs = query(&path, &q()).unwrap();
        assert_eq!(keys(&recs), ["fmg_key_new@00:00", "key_0_2@59:59"]);
        let old = &recs[1];
        assert_eq!(old, &before[0]);
        assert_eq!(old.ts, "2026-03-09T13:59:59.123456+00:00");
        assert_eq!(old.scopes, ["read:data"]);
        assert!((old.duration_ms - 4.56).abs() < 1e-9);
        assert_eq!(old.input_args, None); // 0.2 stored json.dumps(None)
        assert_eq!(old.metadata, json!({"team": "data"}));
        assert!(old.extra.is_empty());
        // Old rows answer the new filters, time included.
        let by_key = AuditQuery {
            key_id: Some("key_0_2".into()),
            since: Some(at(T0 - 1000)),
            ..q()
        };
        assert_eq!(query(&path, &by_key).unwrap().len(), 1);
        let by_status = AuditQuery {
            status: Some(Status::Ok),
            until: Some(at(T0)),
            ..q()
        };
        assert_eq!(keys(&query(&path, &by_status).unwrap()), ["key_0_2@59:59"]);
    }

    #[test]
    fn lenient_reads_of_foreign_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        db_0_2(&path);
        Connection::open(&path)
            .unwrap()
            .execute(
                "INSERT INTO audit_log (ts, key_id, scopes, duration_ms, metadata, input_args) \
                 VALUES ('2026-03-09T14:00:00+00:00', NULL, 'not json', NULL, NULL, '{bad')",
                [],
            )
            .unwrap();
        let r = &query(&path, &q()).unwrap()[0];
        assert_eq!((r.key_id.as_str(), r.status.as_str()), ("", ""));
        assert_eq!(r.scopes, ["not json"]);
        assert!(r.duration_ms.abs() < f64::EPSILON);
        assert_eq!(r.metadata, json!({}));
        assert_eq!(r.input_args, Some(json!("{bad")));
    }

    // ---- errors ----

    #[test]
    fn missing_directory_fails_at_construction_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope").join("audit.db");
        let err = AuditWriter::open_sqlite(&path, WriterOptions::default()).unwrap_err();
        assert!(
            matches!(&err, AuditError::Open { path: p, .. } if p == &path),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("create the directory"), "{msg}");
    }

    #[test]
    fn a_file_that_is_not_a_database_is_refused_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(
            &path,
            "{\"ts\":\"2026-03-09T14:00:00.000Z\",\"status\":\"ok\"}\n".repeat(50),
        )
        .unwrap();
        let before = std::fs::read(&path).unwrap();
        let err = AuditWriter::open_sqlite(&path, WriterOptions::default()).unwrap_err();
        assert!(matches!(err, AuditError::NotADatabase { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("not a database"), "{msg}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "the file was changed"
        );
        let err = query(&path, &q()).unwrap_err();
        assert!(matches!(err, AuditError::NotADatabase { .. }), "{err:?}");
    }

    #[test]
    fn a_directory_or_a_file_parent_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = SqliteSink::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("give a file path"), "{err}");
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        let err = SqliteSink::open(&file.join("audit.db")).unwrap_err();
        let AuditError::Open { source, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(source.kind(), io::ErrorKind::NotADirectory);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        drop(SqliteSink::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .execute("UPDATE audit_schema_version SET version = 99", [])
            .unwrap();
        let err = SqliteSink::open(&path).unwrap_err();
        assert!(
            matches!(
                err,
                AuditError::SchemaTooNew {
                    found: 99,
                    supported: 2,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("upgrade fastmcp-guard"), "{err}");
    }

    #[test]
    fn a_foreign_audit_log_table_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TABLE audit_log (id INTEGER PRIMARY KEY, ts TEXT NOT NULL, what TEXT)",
            )
            .unwrap();
        let err = SqliteSink::open(&path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, AuditError::Schema { .. }), "{err:?}");
        assert!(
            msg.contains("lacks the columns key_id, key_name, tool"),
            "{msg}"
        );
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }

    #[test]
    fn query_never_creates_a_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let err = query(&path, &q()).unwrap_err();
        assert!(matches!(err, AuditError::NoDatabase { .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()));
        assert!(!path.exists());
        // An empty SQLite file (no table) says so.
        drop(Connection::open(&path).unwrap());
        let err = query(&path, &q()).unwrap_err();
        assert!(err.to_string().contains("has no audit_log table"), "{err}");
    }

    // ---- measurement ----

    #[test]
    #[ignore = "measurement: cargo test --release -- --ignored --nocapture sqlite"]
    #[allow(clippy::cast_precision_loss, reason = "printing rates")]
    fn measure_sqlite_throughput() {
        use std::time::Instant;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let mut ev = event(0, "fmg_key_01HZX4B7Q2W9", "search_documents", Status::Ok);
        ev.key_name = "production-agent".into();
        ev.scopes = vec!["read:data".into()];
        ev.duration_ms = 0.412;
        ev.client_ip = Some("10.0.0.7".into());
        for (label, args) in [
            ("no input_args", None),
            (
                "with input_args",
                Some(json!({"query": "quarterly report", "limit": 10})),
            ),
        ] {
            ev.input_args = args.map(Into::into);
            let opts = WriterOptions::default();
            let cap = opts.queue_capacity;
            let w = AuditWriter::open_sqlite(&path, opts).unwrap();
            let events = 1_000_000u64;
            let start = Instant::now();
            for i in 0..events {
                // Sustained: pace the producer instead of dropping.
                if i % 256 == 0 {
                    while w.stats().queue_depth > cap - 512 {
                        std::thread::yield_now();
                    }
                }
                let mut e = ev.clone();
                e.ts = Utc::now();
                w.enqueue(e);
            }
            w.close().unwrap();
            let secs = start.elapsed().as_secs_f64();
            let s = w.stats();
            assert_eq!((s.written, s.dropped, s.failed), (events, 0, 0));
            println!(
                "sqlite sustained ({label}): {} events in {secs:.2}s = {:.0} events/s",
                s.written,
                s.written as f64 / secs
            );
        }
        let all = AuditQuery {
            key_id: Some("fmg_key_01HZX4B7Q2W9".into()),
            limit: 100,
            ..q()
        };
        let start = Instant::now();
        let n = query(&path, &all).unwrap().len();
        println!(
            "query newest 100 of one key_id among 2 M rows: {n} records in {:.1} ms",
            start.elapsed().as_secs_f64() * 1e3
        );
    }
}
