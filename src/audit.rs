//! Audit log: one event type for every decision, written by a background
//! thread as JSON Lines ([`JsonlFileSink`]) or as rows of an `SQLite` table
//! ([`SqliteSink`], queried with [`query`]).
//!
//! The request path only calls [`AuditWriter::enqueue`], which moves the event
//! into a bounded queue and returns at once. One named thread (`fmg-audit`)
//! takes every event already queued (up to [`WriterOptions::batch_max`]) and
//! hands them to a [`Sink`] as one [`Batch`]: for a JSONL sink the thread
//! serialises them with [`write_line`] into one reused buffer (one write per
//! batch), or only copies lines the producer already rendered
//! ([`AuditWriter::enqueue_line`], which the Python binding uses: it writes the
//! line straight from the Python objects); the `SQLite` sink inserts the events
//! themselves in one transaction.
//! The sink is flushed to the OS after every batch and synced to disk on
//! [`AuditWriter::close`].
//!
//! Policies (documented here because callers depend on them):
//! - **Queue full:** the event is dropped and counted in
//!   [`WriterStats::dropped`]; `enqueue` returns `false`. It never blocks.
//! - **Write errors** (disk full, file made unwritable): the batch is lost and
//!   counted in [`WriterStats::write_errors`] / [`WriterStats::failed`], the
//!   message is kept for [`AuditWriter::last_error`], and the thread goes on.
//!   A torn line left by a failed write is ended with a newline before the
//!   next batch, so one failure never glues two lines together.
//! - **Flush:** a flush request travels on a separate, unbounded control
//!   channel, so it gets through even when the event queue is full. The
//!   thread then writes exactly the events that were in the queue when it
//!   picked up the request (crossbeam's `len()` counts every slot already
//!   claimed), which covers everything enqueued before `flush` was called and
//!   cannot be starved by producers that keep the queue full.
//! - **Close:** producers are fenced out first (an in-flight counter shares
//!   one atomic with the closed flag), then the thread drains the queue,
//!   writes, syncs and exits. Nothing accepted by `enqueue` is lost silently:
//!   after `close`, `enqueued == written + failed`.
//!
//! Throughput notes (the thread must sustain > 1 M events/s on two cores):
//! the queue carries boxes that the writer hands back for reuse, so event
//! memory is freed by producer threads (see [`AuditWriter::enqueue`]). The thread
//! never blocks on the event queue (only on its control channel, with a timeout of
//! 1 ms under load and 25 ms at request rates or idle), so producers never pay a
//! futex wake-up and a quiet server wakes the thread 40 times a second.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use parking_lot::Mutex;
use serde_json::{Map, Value};

pub mod chain;
pub mod fan;
mod jsonl;
pub mod mask;
pub mod redact;
pub mod refusals;
pub mod scan;
pub mod spool;
mod sqlite;

pub use chain::{verify_files, ChainKey, VerifyReport};
pub use fan::{FanSink, SlotCounts, SlotLoss, SlotStats};
pub use jsonl::{log_files, rotated_files, JsonlFileSink, JsonlOptions};
pub use mask::{mask_str, mask_tokens};
pub use redact::Redactor;
pub use refusals::{cut_field, Refusal, RefusalAggregator, RefusalCounts, RefusalOptions};
pub use sqlite::{query, AuditQuery, AuditRecord, SqliteSink, SQLITE_SCHEMA_VERSION};

/// Errors of the audit module.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A status name that is not one of [`Status::ALL`].
    #[error("unknown audit status {value:?}: expected one of {}", status_names())]
    InvalidStatus {
        /// The rejected name.
        value: String,
    },
    /// A [`WriterOptions`] field out of range.
    #[error("invalid audit writer option {name} = {value}: {fix}")]
    InvalidOption {
        /// The option's field name.
        name: &'static str,
        /// The rejected value, formatted.
        value: String,
        /// What to use instead.
        fix: &'static str,
    },
    /// The log file or database could not be opened (at construction).
    #[error("cannot open audit log {}: {source}; {}", .path.display(), open_hint(.source, .path))]
    Open {
        /// The path given to [`AuditWriter::open_jsonl`] / [`AuditWriter::open_sqlite`].
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The path holds a file that is not an `SQLite` database.
    #[error(
        "cannot use {} as the SQLite audit database: {reason}; give the path of an audit \
         database or of a new file (a JSONL log needs the file backend)",
        .path.display()
    )]
    NotADatabase {
        /// The path given.
        path: PathBuf,
        /// What `SQLite` said.
        reason: String,
    },
    /// There is no audit database at the path (querying never creates one).
    #[error(
        "no SQLite audit database at {}: the sqlite audit backend creates it when the \
         server starts; check the path",
        .path.display()
    )]
    NoDatabase {
        /// The path given.
        path: PathBuf,
    },
    /// An `SQLite` operation on the audit database failed (opening, migrating,
    /// querying).
    #[error(
        "SQLite audit database {}: {source}; check that the file and its directory are \
         readable and writable and that no other process holds a write lock for long",
        .path.display()
    )]
    Database {
        /// The database path.
        path: PathBuf,
        /// The `SQLite` error.
        source: rusqlite::Error,
    },
    /// The database was written by a newer fastmcp-guard.
    #[error(
        "audit database {} has schema version {found}, newer than this build supports \
         ({supported}); upgrade fastmcp-guard or use another file",
        .path.display()
    )]
    SchemaTooNew {
        /// The database path.
        path: PathBuf,
        /// The version found in the file.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// The database has no usable `audit_log` table.
    #[error(
        "audit database {} {problem}; point the sqlite audit backend at a file it created \
         (or at a fastmcp-guard 0.2 audit database)",
        .path.display()
    )]
    Schema {
        /// The database path.
        path: PathBuf,
        /// What is wrong, e.g. `lacks the columns tool, status in table audit_log`.
        problem: String,
    },
    /// A `redact` pattern that cannot be used.
    #[error("invalid redact pattern {pattern:?}: {reason}")]
    InvalidRedactPattern {
        /// The pattern as given.
        pattern: String,
        /// What is wrong and what to write instead.
        reason: &'static str,
    },
    /// Rotating the JSONL log (renaming it, creating the new file or deleting
    /// files beyond the retention) failed. No event was lost: the batch went to
    /// the live file, and the next batch tries again.
    #[error(
        "cannot rotate audit log {}: {source}; events go on being appended to it; check that \
         its directory is writable and has free space",
        .path.display()
    )]
    Rotate {
        /// The live log file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// An audit log file could not be read (verification).
    #[error("cannot read audit log {}: {source}; {}", .path.display(), read_hint(.source))]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The background thread could not be started.
    #[error(
        "cannot start the audit writer thread: {source}; the process is out of threads or memory"
    )]
    Spawn {
        /// The OS error.
        source: io::Error,
    },
    /// Writing or flushing a batch failed; its events were dropped.
    #[error(
        "audit log write failed, events were dropped: {source}; check free disk space and that \
         the log file is still writable (see WriterStats.write_errors)"
    )]
    Write {
        /// The OS error.
        source: io::Error,
    },
    /// Syncing the log to disk on close failed.
    #[error("audit log sync to disk failed: {source}; check the disk holding the audit log")]
    Sync {
        /// The OS error.
        source: io::Error,
    },
    /// The writer thread died (a bug); events are being dropped.
    #[error(
        "the audit writer thread stopped unexpectedly and events are being dropped; \
         create a new writer and report this as a bug"
    )]
    WriterStopped,
}

fn status_names() -> String {
    Status::ALL.map(Status::as_str).join(", ")
}

fn read_hint(err: &io::Error) -> &'static str {
    match err.kind() {
        io::ErrorKind::NotFound => "check the path (rotated files sit next to the live file)",
        io::ErrorKind::PermissionDenied => "the process needs read access to the file",
        io::ErrorKind::IsADirectory => "give the path of the log file, not of its directory",
        _ => "check the file and the disk holding it",
    }
}

fn open_hint(err: &io::Error, path: &Path) -> String {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.display().to_string(),
        _ => ".".to_owned(),
    };
    match err.kind() {
        io::ErrorKind::NotFound => format!("create the directory {dir} first, or choose another path"),
        io::ErrorKind::PermissionDenied => format!(
            "check permissions: the process needs write access to the file and to the directory {dir}"
        ),
        io::ErrorKind::NotADirectory => format!(
            "a component of {dir} is a regular file, not a directory; choose a path inside a directory"
        ),
        io::ErrorKind::IsADirectory => {
            "the path is a directory; give a file path inside it, such as <dir>/audit.jsonl".to_owned()
        }
        io::ErrorKind::ReadOnlyFilesystem => {
            "the filesystem is read-only; choose a path on a writable filesystem".to_owned()
        }
        _ => format!("check that {dir} exists and is writable"),
    }
}

// ---------------------------------------------------------------------------
// Event
// ---------------------------------------------------------------------------

/// Outcome recorded by an audit event: request decisions and key lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The call was allowed and succeeded.
    Ok,
    /// The call was allowed and the tool failed.
    Error,
    /// Refused by a rate limit.
    RateLimited,
    /// No valid credentials.
    Unauthorized,
    /// Valid credentials without the needed scope.
    Forbidden,
    /// Refused by the IP policy.
    IpDenied,
    /// Key lifecycle: a key was created.
    Created,
    /// Key lifecycle: a key was rotated.
    Rotated,
    /// Key lifecycle: a key was revoked.
    Revoked,
}

impl Status {
    /// Every status, in declaration order.
    pub const ALL: [Status; 9] = [
        Status::Ok,
        Status::Error,
        Status::RateLimited,
        Status::Unauthorized,
        Status::Forbidden,
        Status::IpDenied,
        Status::Created,
        Status::Rotated,
        Status::Revoked,
    ];

    /// The wire name (`"ok"`, `"rate_limited"`, ...).
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Error => "error",
            Status::RateLimited => "rate_limited",
            Status::Unauthorized => "unauthorized",
            Status::Forbidden => "forbidden",
            Status::IpDenied => "ip_denied",
            Status::Created => "created",
            Status::Rotated => "rotated",
            Status::Revoked => "revoked",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = AuditError;

    /// Parses a wire name exactly (case-sensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| AuditError::InvalidStatus {
                value: s.to_owned(),
            })
    }
}

/// One audit record. Serialised by [`write_line`] as one JSON object per line.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    /// When the decision was made (UTC; written with millisecond precision).
    pub ts: DateTime<Utc>,
    /// Public key id (`fmg_key_...`) or other client id; empty if unknown.
    pub key_id: String,
    /// Human name of the key.
    pub key_name: String,
    /// Tool, resource or prompt name (or the lifecycle operation).
    pub tool: String,
    /// Scopes of the caller.
    pub scopes: Vec<String>,
    /// Time spent, in milliseconds (written rounded to 3 decimals).
    pub duration_ms: f64,
    /// Outcome.
    pub status: Status,
    /// Error message, if any.
    pub error: Option<String>,
    /// Tool arguments (only when input logging is on; already redacted).
    pub input_args: Option<Value>,
    /// Start of the output (only when output logging is on).
    pub output_preview: Option<String>,
    /// Client address.
    pub client_ip: Option<String>,
    /// Free-form metadata; written as `{}` when `None`.
    pub metadata: Option<Value>,
    /// Extra top-level fields (e.g. `actor`, `method`, `retry_after`), written
    /// after the fixed ones in key order. A key equal to a fixed field name or
    /// to one the JSONL writer adds (`id`, `prev`, `chain`) is skipped: extras
    /// can never shadow or duplicate those ([`is_reserved_field`]).
    pub extra: Option<Map<String, Value>>,
}

impl AuditEvent {
    /// An event stamped now, with empty scopes, zero duration and no optional fields.
    #[must_use]
    pub fn new(
        key_id: impl Into<String>,
        key_name: impl Into<String>,
        tool: impl Into<String>,
        status: Status,
    ) -> Self {
        AuditEvent {
            ts: Utc::now(),
            key_id: key_id.into(),
            key_name: key_name.into(),
            tool: tool.into(),
            scopes: Vec::new(),
            duration_ms: 0.0,
            status,
            error: None,
            input_args: None,
            output_preview: None,
            client_ip: None,
            metadata: None,
            extra: None,
        }
    }
}

// ---------------------------------------------------------------------------
// Serialiser (hot loop)
// ---------------------------------------------------------------------------

/// Names of the fixed fields, in output order.
pub const FIXED_FIELDS: [&str; 12] = [
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

/// Appends `ev` to `buf` as one JSON object followed by `\n`.
///
/// Fields come in [`FIXED_FIELDS`] order, then the extras. Every string is
/// escaped (quotes, backslashes, all control characters), so the only raw
/// newline is the terminating one. Never fails: a value that cannot be
/// represented (a non-finite `duration_ms`) is written as `null`.
pub fn write_line(buf: &mut Vec<u8>, ev: &AuditEvent) {
    let head = LineHead {
        ts: ev.ts,
        key_id: &ev.key_id,
        key_name: &ev.key_name,
        tool: &ev.tool,
        duration_ms: ev.duration_ms,
        status: ev.status,
        error: ev.error.as_deref(),
        output_preview: ev.output_preview.as_deref(),
        client_ip: ev.client_ip.as_deref(),
    };
    write_line_parts(
        buf,
        &head,
        |buf| {
            for (i, scope) in ev.scopes.iter().enumerate() {
                if i > 0 {
                    buf.push(b',');
                }
                write_json_str(buf, scope);
            }
        },
        |buf| match &ev.input_args {
            Some(v) => write_value(buf, v),
            None => buf.extend_from_slice(b"null"),
        },
        |buf| match &ev.metadata {
            Some(v) => write_value(buf, v),
            None => buf.extend_from_slice(b"{}"),
        },
        |buf| {
            if let Some(extra) = &ev.extra {
                for (k, v) in extra {
                    if is_reserved_field(k) {
                        continue;
                    }
                    buf.push(b',');
                    write_json_str(buf, k);
                    buf.push(b':');
                    write_value(buf, v);
                }
            }
        },
    );
}

/// The plain fields of one audit line, borrowed (see [`write_line_parts`]).
#[derive(Debug, Clone, Copy)]
pub struct LineHead<'a> {
    /// When the decision was made.
    pub ts: DateTime<Utc>,
    /// Key id.
    pub key_id: &'a str,
    /// Key name.
    pub key_name: &'a str,
    /// Tool, resource or prompt name.
    pub tool: &'a str,
    /// Time spent, in milliseconds.
    pub duration_ms: f64,
    /// Outcome.
    pub status: Status,
    /// Error message.
    pub error: Option<&'a str>,
    /// Start of the output.
    pub output_preview: Option<&'a str>,
    /// Client address.
    pub client_ip: Option<&'a str>,
}

/// Whether `name` is one of [`FIXED_FIELDS`].
#[must_use]
pub fn is_fixed_field(name: &str) -> bool {
    FIXED_FIELDS.contains(&name)
}

/// Fields the JSONL writer adds after all others (see [`chain`]).
pub const SEAL_FIELDS: [&str; 3] = ["id", "prev", "chain"];

/// Whether an extra field called `name` is skipped: a fixed field or one of
/// [`SEAL_FIELDS`], so extras can never shadow or duplicate either.
#[must_use]
pub fn is_reserved_field(name: &str) -> bool {
    is_fixed_field(name) || SEAL_FIELDS.contains(&name)
}

/// The one place that lays out an audit line: [`write_line`] calls it for an
/// [`AuditEvent`], the Python binding with the caller's objects (no
/// intermediate event). The callbacks write, in this order: the scopes as
/// comma-separated JSON strings (without brackets); `input_args` as one JSON
/// value (`null` if absent); `metadata` as one JSON value (`{}` if absent);
/// and zero or more extra fields, each as `,"key":value`, skipping names for
/// which [`is_reserved_field`] holds. Each must write valid JSON with no raw
/// newline ([`write_json_str`] escapes strings).
///
/// The finished line goes through [`mask_tokens`]: a token-shaped string in any
/// field (a value, a key, the error, the tool name) is masked before the line
/// leaves this function, whoever wrote the field.
pub fn write_line_parts(
    buf: &mut Vec<u8>,
    head: &LineHead<'_>,
    scopes: impl FnOnce(&mut Vec<u8>),
    input_args: impl FnOnce(&mut Vec<u8>),
    metadata: impl FnOnce(&mut Vec<u8>),
    extra: impl FnOnce(&mut Vec<u8>),
) {
    let start = buf.len();
    buf.reserve(320 + head.key_id.len() + head.key_name.len() + head.tool.len());
    buf.extend_from_slice(b"{\"ts\":\"");
    write_ts(buf, &head.ts);
    buf.extend_from_slice(b"\",\"key_id\":");
    write_json_str(buf, head.key_id);
    buf.extend_from_slice(b",\"key_name\":");
    write_json_str(buf, head.key_name);
    buf.extend_from_slice(b",\"tool\":");
    write_json_str(buf, head.tool);
    buf.extend_from_slice(b",\"scopes\":[");
    scopes(buf);
    buf.extend_from_slice(b"],\"duration_ms\":");
    write_duration(buf, head.duration_ms);
    buf.extend_from_slice(b",\"status\":\"");
    buf.extend_from_slice(head.status.as_str().as_bytes());
    buf.extend_from_slice(b"\",\"error\":");
    write_opt_str(buf, head.error);
    buf.extend_from_slice(b",\"input_args\":");
    input_args(buf);
    buf.extend_from_slice(b",\"output_preview\":");
    write_opt_str(buf, head.output_preview);
    buf.extend_from_slice(b",\"client_ip\":");
    write_opt_str(buf, head.client_ip);
    buf.extend_from_slice(b",\"metadata\":");
    metadata(buf);
    extra(buf);
    buf.extend_from_slice(b"}\n");
    mask::mask_tail(buf, start);
}

/// Formats `ts` as RFC 3339 UTC with milliseconds and `Z`
/// (`2026-03-09T14:00:00.123Z`), truncating sub-millisecond digits, exactly as
/// chrono's `to_rfc3339_opts(SecondsFormat::Millis, true)`.
#[must_use]
pub fn format_ts(ts: &DateTime<Utc>) -> String {
    let mut buf = Vec::with_capacity(24);
    write_ts(&mut buf, ts);
    // write_ts emits ASCII only.
    String::from_utf8(buf).unwrap_or_else(|_| ts.to_rfc3339_opts(SecondsFormat::Millis, true))
}

#[allow(
    clippy::cast_possible_truncation,
    reason = "every value is < 10 before the cast"
)]
fn write_ts(buf: &mut Vec<u8>, ts: &DateTime<Utc>) {
    let naive = ts.naive_utc();
    let Ok(year) = u32::try_from(naive.year()) else {
        buf.extend_from_slice(ts.to_rfc3339_opts(SecondsFormat::Millis, true).as_bytes());
        return;
    };
    if year > 9999 {
        buf.extend_from_slice(ts.to_rfc3339_opts(SecondsFormat::Millis, true).as_bytes());
        return;
    }
    let secs = naive.num_seconds_from_midnight();
    let (hour, minute, mut second) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut millis = naive.nanosecond() / 1_000_000;
    if millis >= 1000 {
        // A leap second: chrono keeps it as nanoseconds >= 1e9 and prints `:60`.
        second += 1;
        millis -= 1000;
    }
    let d = |n: u32| b'0' + (n % 10) as u8;
    let (month, day) = (naive.month(), naive.day());
    buf.extend_from_slice(&[
        d(year / 1000),
        d(year / 100),
        d(year / 10),
        d(year),
        b'-',
        d(month / 10),
        d(month),
        b'-',
        d(day / 10),
        d(day),
        b'T',
        d(hour / 10),
        d(hour),
        b':',
        d(minute / 10),
        d(minute),
        b':',
        d(second / 10),
        d(second),
        b'.',
        d(millis / 100),
        d(millis / 10),
        d(millis),
        b'Z',
    ]);
}

#[allow(clippy::cast_possible_truncation, reason = "n % 10 < 10")]
fn write_u64(buf: &mut Vec<u8>, mut n: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&tmp[i..]);
}

/// Writes `d` rounded to 3 decimals as a JSON number with a fraction
/// (`12.5`, `3.0`, `0.001`); `null` if not finite.
fn write_duration(buf: &mut Vec<u8>, d: f64) {
    /// Below 2^53, so the rounded value is an exact integer in f64 and i64.
    const EXACT: f64 = 9.0e15;
    if !d.is_finite() {
        buf.extend_from_slice(b"null");
        return;
    }
    let scaled = (d * 1000.0).round();
    if scaled.abs() < EXACT {
        #[allow(
            clippy::cast_possible_truncation,
            reason = "|scaled| < 2^53 and integral"
        )]
        let m = scaled as i64;
        if m < 0 {
            buf.push(b'-');
        }
        let a = m.unsigned_abs();
        write_u64(buf, a / 1000);
        #[allow(clippy::cast_possible_truncation, reason = "< 1000")]
        let frac = (a % 1000) as u16;
        let digit = |n: u16| b'0' + (n % 10) as u8;
        let digits = [digit(frac / 100), digit(frac / 10), digit(frac)];
        let len = if frac % 100 == 0 {
            1
        } else if frac % 10 == 0 {
            2
        } else {
            3
        };
        buf.push(b'.');
        buf.extend_from_slice(&digits[..len]);
    } else {
        // Huge values: rare, so the standard (shortest round-trip) formatter is fine.
        let r = scaled / 1000.0;
        let v = if r.is_finite() { r } else { d };
        buf.extend_from_slice(v.to_string().as_bytes());
    }
}

/// JSON escape per byte: 0 = copy, `u` = `\u00XX`, else the char after `\`.
const ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = b'u';
        i += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0a] = b'n';
    t[0x0c] = b'f';
    t[0x0d] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

/// Appends `s` as a JSON string. Non-ASCII passes through as UTF-8 (valid JSON);
/// only ASCII bytes are escaped, so slicing never splits a character.
pub fn write_json_str(buf: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    buf.reserve(bytes.len() + 2);
    buf.push(b'"');
    // Most strings need no escape: find the first byte that does, 8 at a time.
    let clean = clean_prefix(bytes);
    buf.extend_from_slice(&bytes[..clean]);
    if clean < bytes.len() {
        write_escaped(buf, &bytes[clean..]);
    }
    buf.push(b'"');
}

/// Length of the longest prefix of `bytes` with no byte JSON must escape
/// (a control character, `"` or `\\`), checked a word at a time.
fn clean_prefix(bytes: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // High bit set in each byte of `x` that is zero (exact for the first such byte).
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let mut i = 0;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        // A byte < 0x20: (b - 0x20) borrows into its high bit while b's own is clear.
        let control = w.wrapping_sub(ONES * 0x20) & !w & HIGHS;
        let quote = zero(w ^ (ONES * u64::from(b'"')));
        let backslash = zero(w ^ (ONES * u64::from(b'\\')));
        if control | quote | backslash != 0 {
            break;
        }
        i += 8;
    }
    while i < bytes.len() && ESCAPE[usize::from(bytes[i])] == 0 {
        i += 1;
    }
    i
}

/// Writes `bytes` escaped (the body of a JSON string, without quotes).
fn write_escaped(buf: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc = ESCAPE[usize::from(b)];
        if esc == 0 {
            continue;
        }
        buf.extend_from_slice(&bytes[start..i]);
        if esc == b'u' {
            buf.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]);
        } else {
            buf.extend_from_slice(&[b'\\', esc]);
        }
        start = i + 1;
    }
    buf.extend_from_slice(&bytes[start..]);
}

fn write_opt_str(buf: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => write_json_str(buf, s),
        None => buf.extend_from_slice(b"null"),
    }
}

fn write_value(buf: &mut Vec<u8>, v: &Value) {
    let mark = buf.len();
    // Serialising a `Value` into a Vec cannot fail; keep the line valid regardless.
    if serde_json::to_writer(&mut *buf, v).is_err() {
        buf.truncate(mark);
        buf.extend_from_slice(b"null");
    }
}

// ---------------------------------------------------------------------------
// Queue entries
// ---------------------------------------------------------------------------

/// One slot of the writer's queue: an [`AuditEvent`], or that event's JSONL line
/// already rendered by the producer ([`AuditWriter::enqueue_line`]). Entries are
/// boxed and go back to the producers for reuse once written, so a steady stream
/// of lines allocates nothing: the line buffer keeps its capacity.
#[derive(Debug, Clone)]
pub struct Entry {
    event: AuditEvent,
    /// Non-empty: the complete line, ending with `\n` (`event` is then stale).
    line: Vec<u8>,
}

impl Entry {
    /// The event (stale when the entry holds a rendered line).
    #[must_use]
    pub fn event(&self) -> &AuditEvent {
        &self.event
    }
}

impl From<AuditEvent> for Entry {
    fn from(event: AuditEvent) -> Self {
        Entry {
            event,
            line: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------
// Sinks
// ---------------------------------------------------------------------------

/// What a [`Sink`] reads from each [`Batch`] (see [`Sink::format`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchFormat {
    /// The events serialised by [`write_line`], one line each ([`Batch::jsonl`]).
    /// The thread recycles each event as soon as it is serialised.
    Jsonl,
    /// The entries as they were queued ([`Batch::records`]): events, or lines
    /// rendered by the producer; the thread serialises nothing.
    Events,
}

/// One entry of a [`BatchFormat::Events`] batch, as it was queued.
#[derive(Debug, Clone, Copy)]
pub enum Record<'a> {
    /// Queued by [`AuditWriter::enqueue`].
    Event(&'a AuditEvent),
    /// Queued by [`AuditWriter::enqueue_line`]: one complete line laid out by
    /// [`write_line_parts`], ending with `\n` (never sealed).
    Line(&'a [u8]),
}

/// One batch as the writer thread hands it to a [`Sink`]: `len` events in enqueue
/// order, as JSONL bytes or as events, depending on the sink's [`Sink::format`].
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    events: &'a [Box<Entry>],
    jsonl: &'a [u8],
    len: usize,
}

impl<'a> Batch<'a> {
    /// A [`BatchFormat::Jsonl`] batch: `jsonl` holds `len` complete lines.
    #[must_use]
    pub fn of_jsonl(jsonl: &'a [u8], len: usize) -> Self {
        Batch {
            events: &[],
            jsonl,
            len,
        }
    }

    /// A [`BatchFormat::Events`] batch.
    #[must_use]
    pub fn of_events(events: &'a [Box<Entry>]) -> Self {
        Batch {
            events,
            jsonl: &[],
            len: events.len(),
        }
    }

    /// The entries, in enqueue order (none in a [`BatchFormat::Jsonl`] batch).
    #[must_use]
    pub fn records(&self) -> impl ExactSizeIterator<Item = Record<'a>> + 'a {
        self.events.iter().map(|b| {
            if b.line.is_empty() {
                Record::Event(&b.event)
            } else {
                Record::Line(&b.line)
            }
        })
    }

    /// The events as complete JSONL lines (empty in a [`BatchFormat::Events`] batch).
    #[must_use]
    pub fn jsonl(&self) -> &'a [u8] {
        self.jsonl
    }

    /// Number of events in the batch, in either format.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the batch holds no event (the writer never sends one).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Where batches go. The writer thread calls these in order
/// `write_batch` → `flush` for every batch, and `sync` once on close.
/// Implement it to add a backend (rotation, `SQLite`, HTTP) without touching
/// the queue logic; see [`AuditWriter::with_sink`].
///
/// A byte-oriented sink (a file, a socket) keeps the default
/// [`BatchFormat::Jsonl`] and reads [`Batch::jsonl`]; a sink that stores the
/// fields itself (such as [`SqliteSink`]) asks for [`BatchFormat::Events`]
/// and reads [`Batch::records`], and the thread serialises nothing.
pub trait Sink: Send {
    /// What [`write_batch`](Self::write_batch) reads (default
    /// [`BatchFormat::Jsonl`]). Asked once, when the writer starts.
    fn format(&self) -> BatchFormat {
        BatchFormat::Jsonl
    }
    /// Writes one batch (never empty).
    ///
    /// # Errors
    /// The I/O error; the whole batch counts as lost.
    fn write_batch(&mut self, batch: &Batch<'_>) -> io::Result<()>;
    /// Pushes buffered data to the OS (not necessarily to disk).
    ///
    /// # Errors
    /// The I/O error.
    fn flush(&mut self) -> io::Result<()>;
    /// Makes written data durable (called on close).
    ///
    /// # Errors
    /// The I/O error.
    fn sync(&mut self) -> io::Result<()>;
    /// A failure that lost no event (a log rotation that could not be done),
    /// taken once after each batch: the writer counts it in
    /// [`WriterStats::write_errors`] and keeps it for
    /// [`AuditWriter::last_error`]. Default: none.
    fn take_warning(&mut self) -> Option<AuditError> {
        None
    }
}

// ---------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------

/// What became of a refusal given to [`AuditWriter::enqueue_refusal_line_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// Written one by one: its line was queued.
    Queued,
    /// Counted: a summary event will carry it.
    Counted,
    /// Lost: the queue was full, or the writer closed or paused (counted in
    /// [`WriterStats::dropped`]).
    Dropped,
}

/// What [`AuditWriter::enqueue`] does when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFull {
    /// Drop the event and count it in [`WriterStats::dropped`] (never blocks).
    #[default]
    Drop,
    /// Wait up to this long for room, then drop and count. The wait goes
    /// through the `wait` hook of [`AuditWriter::enqueue_with`] /
    /// [`AuditWriter::enqueue_line_with`] (the Python binding releases the GIL there).
    Block(Duration),
}

/// Tuning of an [`AuditWriter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterOptions {
    /// Events the queue holds before new ones are dropped (default 65 536; >= 1).
    pub queue_capacity: usize,
    /// Most events serialised into one write (default 4096; >= 1).
    pub batch_max: usize,
    /// Longest the thread sleeps with nothing to do (default 100 ms; > 0).
    /// Events are written as soon as the thread sees them, so under trickle
    /// load each reaches the OS well within this interval.
    pub flush_interval: Duration,
    /// Queue full: drop (default) or wait a bounded time.
    pub on_full: OnFull,
    /// How refusals logged with [`AuditWriter::enqueue_refusal_line_with`] are
    /// aggregated ([`refusals`]).
    pub refusals: RefusalOptions,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            queue_capacity: 65_536,
            batch_max: 4096,
            flush_interval: Duration::from_millis(100),
            on_full: OnFull::Drop,
            refusals: RefusalOptions::default(),
        }
    }
}

impl WriterOptions {
    fn validate(&self) -> Result<(), AuditError> {
        if self.queue_capacity == 0 {
            return Err(AuditError::InvalidOption {
                name: "queue_capacity",
                value: "0".to_owned(),
                fix: "use at least 1 (default 65536)",
            });
        }
        if self.batch_max == 0 {
            return Err(AuditError::InvalidOption {
                name: "batch_max",
                value: "0".to_owned(),
                fix: "use at least 1 (default 4096)",
            });
        }
        if self.flush_interval.is_zero() {
            return Err(AuditError::InvalidOption {
                name: "flush_interval",
                value: "0s".to_owned(),
                fix: "use a positive duration (default 100 ms)",
            });
        }
        if let OnFull::Block(wait) = self.on_full {
            if wait.is_zero() || wait > Duration::from_secs(60) {
                return Err(AuditError::InvalidOption {
                    name: "on_full",
                    value: format!("Block({wait:?})"),
                    fix: "block for a positive time of at most 60 s (1 s is usual), or drop",
                });
            }
        }
        self.refusals.validate()
    }
}

/// Counters of an [`AuditWriter`] (a consistent snapshot per field, not across fields).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Events accepted into the queue.
    pub enqueued: u64,
    /// Events written to the sink.
    pub written: u64,
    /// Events refused by `enqueue` (queue full, writer closed or paused).
    pub dropped: u64,
    /// Of `dropped`: refused while [`AuditWriter::pause`]d.
    pub paused_dropped: u64,
    /// Failed sink operations (writes, flushes, the final sync).
    pub write_errors: u64,
    /// Accepted events lost because their batch failed to write.
    /// After close, `enqueued == written + failed`.
    pub failed: u64,
    /// Events waiting in the queue now.
    pub queue_depth: usize,
    /// Refusals only counted, not written one by one (their summaries carry them;
    /// see [`refusals`]).
    pub refusals_suppressed: u64,
    /// Summary events the writer added (counted in `enqueued` too).
    pub refusal_summaries: u64,
}

/// The bounded wait of [`OnFull::Block`], handed to the `around` hook of
/// [`AuditWriter::enqueue_with`]: call it; it returns whether the event got in.
pub type Wait<'a> = Box<dyn FnOnce() -> bool + Send + 'a>;

/// What [`AuditWriter::take_loss_report`] tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LossReport {
    /// Events lost since the previous report.
    pub lost: u64,
    /// Events dropped so far (queue full, writer closed or paused).
    pub dropped: u64,
    /// Of `dropped`: refused while paused.
    pub paused_dropped: u64,
    /// Events lost to failed writes so far.
    pub failed: u64,
    /// The most recent sink error, if any.
    pub last_error: Option<String>,
    /// Why the writer is paused, if it is.
    pub paused: Option<String>,
}

/// Keeps a hot atomic on its own cache line.
#[repr(align(64))]
#[derive(Default)]
struct Padded<T>(T);

/// High bit of `Shared::state`: the writer is closed. The low bits count
/// `enqueue` calls in flight, so `close` can wait them out.
const CLOSED: usize = 1 << (usize::BITS - 1);
/// Next bit: [`AuditWriter::pause`]d.
const PAUSED: usize = 1 << (usize::BITS - 2);
/// Either flag refuses new events.
const FLAGS: usize = CLOSED | PAUSED;

struct Shared {
    state: Padded<AtomicUsize>,
    enqueued: Padded<AtomicU64>,
    dropped: Padded<AtomicU64>,
    written: Padded<AtomicU64>,
    /// The last batch reached the sink (false from a failure to the next success).
    sink_ok: Padded<AtomicBool>,
    failed: AtomicU64,
    write_errors: AtomicU64,
    /// Of `dropped`: refused while paused.
    paused_dropped: AtomicU64,
    /// Why the writer is paused (see [`AuditWriter::pause`]).
    pause_reason: Mutex<Option<String>>,
    last_error: Mutex<Option<String>>,
    /// When `dropped + failed` was last reported.
    losses: LossClock,
}

/// Rate-limits loss reports: remembers the loss count last reported and when.
#[derive(Debug, Default)]
pub(crate) struct LossClock {
    reported: AtomicU64,
    last_report: Mutex<Option<Instant>>,
}

impl LossClock {
    /// Events lost since the last report, if any and if `interval` has passed since it
    /// (the first loss is due at once); records this report. One relaxed load when
    /// nothing new was lost, so callers may ask after every event.
    pub(crate) fn due(&self, lost: u64, interval: Duration) -> Option<u64> {
        if lost == self.reported.load(Ordering::Relaxed) {
            return None;
        }
        let mut last = self.last_report.try_lock()?;
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < interval) {
            return None;
        }
        *last = Some(now);
        Some(lost.saturating_sub(self.reported.swap(lost, Ordering::Relaxed)))
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            state: Padded::default(),
            enqueued: Padded::default(),
            dropped: Padded::default(),
            written: Padded::default(),
            sink_ok: Padded(AtomicBool::new(true)),
            failed: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            paused_dropped: AtomicU64::new(0),
            pause_reason: Mutex::new(None),
            last_error: Mutex::new(None),
            losses: LossClock::default(),
        }
    }
}

impl Shared {
    fn record_error(&self, err: &AuditError) {
        self.write_errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock() = Some(err.to_string());
    }
}

enum Control {
    /// Write everything queued now, flush, reply.
    Flush(Sender<Result<(), AuditError>>),
    /// A producer waits for room (`OnFull::Block`): drain now.
    Wake,
    /// Drain, write, sync, exit.
    Close,
}

/// Bytes after which a batch is cut even below `batch_max`.
const BATCH_BYTES: usize = 1 << 20;
/// A buffer grown past this by a huge event is released after its batch.
const BUF_RETAIN: usize = 4 << 20;
/// Most written event boxes kept for reuse by `enqueue`; beyond this the
/// writer frees them itself. Bounds the memory a burst leaves behind.
const POOL_MAX: usize = 1024;
/// Pause after a partial batch of more than one event (see `Worker::run`).
/// At 1 M events/s this gathers ~1000 events, far below the queue capacity.
const LINGER: Duration = Duration::from_millis(1);
/// Longest an event waits in the queue at request rates (or the flush interval, if
/// shorter). Short enough that a burst after a quiet spell cannot fill the default
/// queue (65,536 events) before the thread looks: 25 ms at 1 M events/s is 25,000.
const IDLE_TICK: Duration = Duration::from_millis(25);
/// A drain at least this large means the queue is busy: look again after `LINGER`.
const BUSY_BATCH: usize = 1024;
/// Most batches written between two looks at the control channel (flush, close).
const DRAIN_BATCHES: usize = 16;

/// The asynchronous audit writer. `Send + Sync`: share it (e.g. in an `Arc`)
/// and call [`enqueue`](Self::enqueue) from any thread.
pub struct AuditWriter {
    events: Sender<Box<Entry>>,
    control: Sender<Control>,
    /// Boxes of written entries, for `enqueue` to reuse (see there).
    pool: Receiver<Box<Entry>>,
    on_full: OnFull,
    shared: Arc<Shared>,
    refusals: Arc<RefusalAggregator>,
    thread: Mutex<Option<JoinHandle<Result<(), AuditError>>>>,
}

impl fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditWriter")
            .field("closed", &self.is_closed())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl AuditWriter {
    /// Opens `path` (create + append, mode 0600 for a new file) and starts the
    /// writer thread. The file is opened here, so a bad path fails now, not
    /// at the first event.
    ///
    /// # Errors
    /// [`AuditError::Open`] (the message names the path and what to fix),
    /// [`AuditError::InvalidOption`], [`AuditError::Spawn`].
    pub fn open_jsonl(path: &Path, opts: WriterOptions) -> Result<AuditWriter, AuditError> {
        AuditWriter::open_jsonl_with(path, opts, JsonlOptions::default())
    }

    /// [`open_jsonl`](Self::open_jsonl) with rotation, retention and chain
    /// options ([`JsonlOptions`]; its `Default` is what `open_jsonl` uses: the
    /// hash chain on, no rotation). The chain is recovered from the last
    /// complete line of the newest log file.
    ///
    /// # Errors
    /// As [`open_jsonl`](Self::open_jsonl).
    pub fn open_jsonl_with(
        path: &Path,
        opts: WriterOptions,
        jsonl: JsonlOptions,
    ) -> Result<AuditWriter, AuditError> {
        opts.validate()?;
        let sink = JsonlFileSink::open_with(path, jsonl)?;
        AuditWriter::with_sink(sink, opts)
    }

    /// Opens (creating it, mode 0600 on unix, if missing) the `SQLite` audit
    /// database at `path`, migrates its schema (a fastmcp-guard 0.2 file is
    /// taken over in place), and starts the writer thread. Each batch is one
    /// transaction; see [`SqliteSink`].
    ///
    /// # Errors
    /// [`AuditError::Open`] (missing directory, permissions; names the path),
    /// [`AuditError::NotADatabase`], [`AuditError::SchemaTooNew`],
    /// [`AuditError::Schema`], [`AuditError::Database`],
    /// [`AuditError::InvalidOption`], [`AuditError::Spawn`].
    pub fn open_sqlite(path: &Path, opts: WriterOptions) -> Result<AuditWriter, AuditError> {
        Self::open_sqlite_retained(path, opts, None)
    }

    /// [`open_sqlite`](Self::open_sqlite), keeping only the last `retention_days` days of
    /// events (see [`SqliteSink::retain`]).
    ///
    /// # Errors
    /// As `open_sqlite`; [`AuditError::InvalidOption`] for a bad retention.
    pub fn open_sqlite_retained(
        path: &Path,
        opts: WriterOptions,
        retention_days: Option<f64>,
    ) -> Result<AuditWriter, AuditError> {
        opts.validate()?;
        let sink = SqliteSink::open(path)?.retain(retention_days)?;
        AuditWriter::with_sink(sink, opts)
    }

    /// Starts the writer thread (`fmg-audit`) over any [`Sink`].
    ///
    /// # Errors
    /// [`AuditError::InvalidOption`], [`AuditError::Spawn`].
    pub fn with_sink<S: Sink + 'static>(
        sink: S,
        opts: WriterOptions,
    ) -> Result<AuditWriter, AuditError> {
        opts.validate()?;
        let (events_tx, events_rx) = crossbeam_channel::bounded(opts.queue_capacity);
        let (control_tx, control_rx) = crossbeam_channel::unbounded();
        let (pool_tx, pool_rx) = crossbeam_channel::bounded(opts.queue_capacity.min(POOL_MAX));
        let shared = Arc::new(Shared::default());
        let refusals = Arc::new(RefusalAggregator::new(opts.refusals)?);
        let format = sink.format();
        let jsonl = format == BatchFormat::Jsonl;
        let worker = Worker {
            sink,
            shared: Arc::clone(&shared),
            format,
            pending: Vec::with_capacity(if jsonl {
                0
            } else {
                opts.batch_max.min(POOL_MAX)
            }),
            buf: Vec::with_capacity(if jsonl { 64 * 1024 } else { 0 }),
            batch_max: opts.batch_max,
            unreported: None,
            pool: pool_tx,
            refusals: Arc::clone(&refusals),
        };
        let interval = opts.flush_interval;
        let handle = std::thread::Builder::new()
            .name("fmg-audit".to_owned())
            .spawn(move || worker.run(&events_rx, &control_rx, interval))
            .map_err(|source| AuditError::Spawn { source })?;
        Ok(AuditWriter {
            on_full: opts.on_full,
            events: events_tx,
            control: control_tx,
            pool: pool_rx,
            shared,
            refusals,
            thread: Mutex::new(Some(handle)),
        })
    }

    /// Queues `ev`. Returns `false`, and counts the event in
    /// [`WriterStats::dropped`], when the queue is full or the writer is closed.
    /// With [`OnFull::Block`] a full queue is waited on (in this thread) first;
    /// with the default [`OnFull::Drop`] this never blocks.
    ///
    /// The queue holds boxes (16 bytes a slot, not the ~290-byte event), and
    /// the writer hands written boxes back through a small pool: this call
    /// reuses one, which also frees the previous event's strings here, on a
    /// producer thread. glibc malloc is several times slower when one thread
    /// allocates and another frees; this keeps both threads off that path.
    pub fn enqueue(&self, ev: AuditEvent) -> bool {
        self.enqueue_with(ev, |wait| wait())
    }

    /// [`enqueue`](Self::enqueue), with `around` running the bounded wait of
    /// [`OnFull::Block`] when the queue is full (it must call the closure it is
    /// given and return its result; the Python binding releases the GIL there).
    /// Not called when the event is queued at once.
    pub fn enqueue_with(&self, ev: AuditEvent, around: impl FnOnce(Wait<'_>) -> bool) -> bool {
        self.push(
            |entry| {
                entry.event = ev;
                entry.line.clear();
            },
            around,
        )
    }

    /// Queues one event rendered by `render` straight into a reused line buffer
    /// (cleared first): the producer pays for one serialisation and no
    /// allocation in the steady state. A JSONL sink's thread only copies the
    /// bytes; an events sink ([`SqliteSink`]) reads the line back into its
    /// columns, off the producer's path. `render` must append exactly one
    /// complete line ending with `\n`, laid out by [`write_line_parts`]. Same
    /// return value and policies as [`enqueue`](Self::enqueue); `render` is not
    /// called if the writer is closed or paused.
    pub fn enqueue_line(&self, render: impl FnOnce(&mut Vec<u8>)) -> bool {
        self.enqueue_line_with(render, |wait| wait())
    }

    /// [`enqueue_line`](Self::enqueue_line) with a hook around the bounded wait
    /// of [`OnFull::Block`] (see [`enqueue_with`](Self::enqueue_with)).
    pub fn enqueue_line_with(
        &self,
        render: impl FnOnce(&mut Vec<u8>),
        around: impl FnOnce(Wait<'_>) -> bool,
    ) -> bool {
        self.push(
            |entry| {
                entry.line.clear();
                render(&mut entry.line);
            },
            around,
        )
    }

    /// Refuses new events (each counted in [`WriterStats::dropped`] and
    /// [`WriterStats::paused_dropped`]) until called with `None`; `reason`
    /// (e.g. "the HTTP spool is over its size limit") is named in loss reports.
    /// Events already queued are still written. While paused,
    /// [`healthy`](Self::healthy) is false.
    pub fn pause(&self, reason: Option<String>) {
        let mut held = self.shared.pause_reason.lock();
        if reason.is_some() {
            self.shared.state.0.fetch_or(PAUSED, Ordering::AcqRel);
        } else {
            self.shared.state.0.fetch_and(!PAUSED, Ordering::AcqRel);
        }
        *held = reason;
    }

    /// Logs a refusal made before there is an identity, aggregated ([`refusals`]):
    /// the first [`RefusalOptions::burst`] of its group in an interval are rendered
    /// by `render` and queued as [`enqueue_line_with`](Self::enqueue_line_with) does
    /// ([`Admitted::Queued`], or [`Admitted::Dropped`] as that would be); the others
    /// are only counted ([`Admitted::Counted`]: `render` is not called), and the
    /// writer thread writes one summary event per group with their `count` when the
    /// interval ends, on flush and on close. A closed or paused writer drops it.
    pub fn enqueue_refusal_line_with(
        &self,
        refusal: &Refusal<'_>,
        render: impl FnOnce(&mut Vec<u8>),
        around: impl FnOnce(Wait<'_>) -> bool,
    ) -> Admitted {
        let sh = &*self.shared;
        let prev = sh.state.0.fetch_add(1, Ordering::AcqRel);
        if prev & FLAGS == 0 && !self.refusals.admit(refusal) {
            // Counted inside the fence: close's final summaries include it.
            sh.state.0.fetch_sub(1, Ordering::Release);
            return Admitted::Counted;
        }
        let accepted = prev & FLAGS == 0
            && self.send(
                |entry| {
                    entry.line.clear();
                    render(&mut entry.line);
                },
                around,
            );
        self.settle(prev, accepted);
        if accepted {
            Admitted::Queued
        } else {
            Admitted::Dropped
        }
    }

    /// Fills a (reused) entry and queues it; see [`enqueue`](Self::enqueue).
    fn push(&self, fill: impl FnOnce(&mut Entry), around: impl FnOnce(Wait<'_>) -> bool) -> bool {
        let prev = self.shared.state.0.fetch_add(1, Ordering::AcqRel);
        let accepted = prev & FLAGS == 0 && self.send(fill, around);
        self.settle(prev, accepted);
        accepted
    }

    /// Takes a box (from the pool if one is there), fills it and queues it: whether it
    /// got in. Call inside the fence (`state` incremented, no flag set).
    fn send(&self, fill: impl FnOnce(&mut Entry), around: impl FnOnce(Wait<'_>) -> bool) -> bool {
        let boxed = match self.pool.try_recv() {
            Ok(mut reused) => {
                fill(&mut reused);
                reused
            }
            Err(_) => {
                let mut fresh = Box::new(Entry::from(AuditEvent::new(
                    String::new(),
                    String::new(),
                    String::new(),
                    Status::Ok,
                )));
                fill(&mut fresh);
                fresh
            }
        };
        match self.events.try_send(boxed) {
            Ok(()) => true,
            Err(TrySendError::Full(boxed)) => match self.on_full {
                OnFull::Drop => false,
                OnFull::Block(limit) => {
                    // The thread does not watch the queue between its ticks: wake it.
                    self.control.send(Control::Wake).ok();
                    let events = &self.events;
                    around(Box::new(move || events.send_timeout(boxed, limit).is_ok()))
                }
            },
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    /// Counts an event accepted or refused and leaves the fence.
    fn settle(&self, prev: usize, accepted: bool) {
        let sh = &*self.shared;
        if accepted {
            sh.enqueued.0.fetch_add(1, Ordering::Relaxed);
        } else {
            sh.dropped.0.fetch_add(1, Ordering::Relaxed);
            if prev & FLAGS == PAUSED {
                sh.paused_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        sh.state.0.fetch_sub(1, Ordering::Release);
    }

    /// Whether an event enqueued now would reach the sink: the writer is open,
    /// the queue has room, and the last batch was written (a failure makes
    /// this false until a batch succeeds again). Atomic loads only: cheap
    /// enough to ask before every call (the `fail_closed` policy).
    #[must_use]
    pub fn healthy(&self) -> bool {
        self.shared.sink_ok.0.load(Ordering::Relaxed)
            && !self.events.is_full()
            && self.shared.state.0.load(Ordering::Relaxed) & FLAGS == 0
    }

    /// Events lost (dropped or failed) since the previous report, at most one
    /// report per `interval` (the first loss is reported at once). `None` when
    /// nothing new was lost or the interval has not passed: two relaxed atomic
    /// loads in the common case, so callers may ask after every event.
    pub fn take_loss_report(&self, interval: Duration) -> Option<LossReport> {
        let sh = &*self.shared;
        let dropped = sh.dropped.0.load(Ordering::Relaxed);
        let failed = sh.failed.load(Ordering::Relaxed);
        let lost = sh.losses.due(dropped + failed, interval)?;
        Some(LossReport {
            lost,
            dropped,
            paused_dropped: sh.paused_dropped.load(Ordering::Relaxed),
            failed,
            last_error: self.last_error(),
            paused: sh.pause_reason.lock().clone(),
        })
    }

    /// Blocks until every event enqueued before this call is written and
    /// flushed to the OS (not fsynced). Works with a full queue: the request
    /// goes through a separate control channel. After close, returns `Ok`
    /// (close already wrote everything).
    ///
    /// # Errors
    /// [`AuditError::Write`] if a batch failed since the previous `flush`
    /// (those events are lost; see [`stats`](Self::stats)), or
    /// [`AuditError::WriterStopped`].
    pub fn flush(&self) -> Result<(), AuditError> {
        if self.is_closed() {
            return Ok(());
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.control.send(Control::Flush(tx)).is_err() {
            return self.thread_gone();
        }
        rx.recv().unwrap_or_else(|_| self.thread_gone())
    }

    /// Stops accepting events, writes everything already queued, syncs the
    /// sink and joins the thread. Idempotent: later calls return `Ok`.
    ///
    /// # Errors
    /// [`AuditError::Write`] if a batch failed since the last `flush`,
    /// [`AuditError::Sync`], or [`AuditError::WriterStopped`].
    pub fn close(&self) -> Result<(), AuditError> {
        let mut thread = self.thread.lock();
        let Some(handle) = thread.take() else {
            return Ok(());
        };
        self.shared.state.0.fetch_or(CLOSED, Ordering::AcqRel);
        // Wait out enqueue calls that passed the closed check: after this no
        // event can enter the queue, so the thread's final drain is complete.
        while self.shared.state.0.load(Ordering::Acquire) & !FLAGS != 0 {
            std::thread::yield_now();
        }
        // If the thread is gone the send fails; join reports why.
        self.control.send(Control::Close).ok();
        let res = handle.join().unwrap_or(Err(AuditError::WriterStopped));
        // Free the pooled (already written) events now rather than at drop.
        while self.pool.try_recv().is_ok() {}
        res
    }

    /// Whether [`close`](Self::close) has started.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.shared.state.0.load(Ordering::Acquire) & CLOSED != 0
    }

    /// Current counters.
    #[must_use]
    pub fn stats(&self) -> WriterStats {
        let sh = &*self.shared;
        let r = self.refusals.counts();
        WriterStats {
            enqueued: sh.enqueued.0.load(Ordering::Relaxed),
            written: sh.written.0.load(Ordering::Relaxed),
            dropped: sh.dropped.0.load(Ordering::Relaxed),
            paused_dropped: sh.paused_dropped.load(Ordering::Relaxed),
            write_errors: sh.write_errors.load(Ordering::Relaxed),
            failed: sh.failed.load(Ordering::Relaxed),
            queue_depth: self.events.len(),
            refusals_suppressed: r.suppressed,
            refusal_summaries: r.summaries,
        }
    }

    /// Message of the most recent sink error, if any ever happened.
    #[must_use]
    pub fn last_error(&self) -> Option<String> {
        self.shared.last_error.lock().clone()
    }

    fn thread_gone(&self) -> Result<(), AuditError> {
        if self.is_closed() {
            Ok(())
        } else {
            Err(AuditError::WriterStopped)
        }
    }
}

impl Drop for AuditWriter {
    /// Closes the writer; an error is kept in `last_error` (nobody can be told).
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            *self.shared.last_error.lock() = Some(e.to_string());
        }
    }
}

/// State owned by the writer thread.
struct Worker<S> {
    sink: S,
    shared: Arc<Shared>,
    format: BatchFormat,
    /// `Events` format: the batch being gathered (boxes retired after the write).
    #[allow(
        clippy::vec_box,
        reason = "the boxes go back to the producers through the pool"
    )]
    pending: Vec<Box<Entry>>,
    buf: Vec<u8>,
    batch_max: usize,
    /// A failure not yet returned by `flush`/`close`.
    unreported: Option<AuditError>,
    /// Written boxes go back to the producers through here.
    pool: Sender<Box<Entry>>,
    /// Refusals aggregated for [`AuditWriter::enqueue_refusal_line_with`]: the
    /// thread writes their summaries.
    refusals: Arc<RefusalAggregator>,
}

impl<S: Sink> Worker<S> {
    fn run(
        mut self,
        events: &Receiver<Box<Entry>>,
        control: &Receiver<Control>,
        interval: Duration,
    ) -> Result<(), AuditError> {
        let linger = interval.min(LINGER);
        let idle = interval.min(IDLE_TICK);
        let filling = events.capacity().map_or(BUSY_BATCH, |c| (c / 4).max(1));
        let mut wait = idle;
        loop {
            // The thread blocks on the control channel only, never on the event
            // queue: producers find no waiter to wake, so `enqueue` makes no system
            // call. Flush and close requests wake it at once.
            match control.recv_timeout(wait) {
                Ok(Control::Flush(reply)) => {
                    let res = self.flush_pending(events);
                    // The caller may have given up waiting; nothing to do then.
                    reply.send(res).ok();
                }
                Ok(Control::Close) | Err(RecvTimeoutError::Disconnected) => {
                    return self.finish(events);
                }
                Ok(Control::Wake) => {}
                Err(RecvTimeoutError::Timeout) => {}
            }
            if self.refusals.due() {
                self.write_summaries(false);
            }
            let mut drained = 0;
            let mut backlog = false;
            for _ in 0..DRAIN_BATCHES {
                match events.try_recv() {
                    Ok(first) => {
                        drained += self.batch(events, first, usize::MAX);
                        // A batch ends at `batch_max` events or `BATCH_BYTES`: go on
                        // while the queue is filling up (a quarter full). Short of
                        // that, linger and let a batch gather: draining nonstop
                        // beside a fast producer only costs it cache and CPU.
                        backlog = events.len() >= filling;
                        if !backlog {
                            break;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return self.finish(events),
                }
            }
            // A backlog: only glance at the control channel, then drain again. Under
            // load, come back after a short linger so the queue never fills; at
            // request rates, after the tick, so that a thousand events a second cost
            // a few dozen wake-ups, not a thousand.
            wait = if backlog {
                Duration::ZERO
            } else if drained >= BUSY_BATCH {
                linger
            } else {
                idle
            };
        }
    }

    /// Takes `first` and up to `min(batch_max, limit) - 1` already-queued
    /// events, writes them as one batch, and returns how many it took.
    fn batch(&mut self, events: &Receiver<Box<Entry>>, first: Box<Entry>, limit: usize) -> usize {
        let max = self.batch_max.min(limit);
        self.push(first);
        let mut n = 1;
        while n < max && self.buf.len() < BATCH_BYTES {
            match events.try_recv() {
                Ok(ev) => {
                    self.push(ev);
                    n += 1;
                }
                Err(_) => break,
            }
        }
        self.write_pending(n);
        n
    }

    /// Adds one event to the batch: serialised and recycled at once in the
    /// `Jsonl` format (the event is hot in cache and the pool refills
    /// while the batch gathers), kept until the write in the `Events` format.
    fn push(&mut self, ev: Box<Entry>) {
        match self.format {
            BatchFormat::Jsonl => {
                if ev.line.is_empty() {
                    write_line(&mut self.buf, &ev.event);
                } else {
                    self.buf.extend_from_slice(&ev.line);
                }
                self.retire(ev);
            }
            // `enqueue_line` refuses an events sink, so every entry here is an event.
            BatchFormat::Events => self.pending.push(ev),
        }
    }

    /// Offers a written or serialised event's box to the producers for reuse;
    /// if the pool is full, `try_send` hands it back and it is freed here.
    fn retire(&self, ev: Box<Entry>) {
        self.pool.try_send(ev).ok();
    }

    /// Writes the gathered batch of `n` events, then retires kept events.
    fn write_pending(&mut self, n: usize) {
        let n64 = n as u64;
        let batch = match self.format {
            BatchFormat::Jsonl => Batch::of_jsonl(&self.buf, n),
            BatchFormat::Events => Batch::of_events(&self.pending),
        };
        match self.sink.write_batch(&batch) {
            Ok(()) => {
                self.shared.written.0.fetch_add(n64, Ordering::Relaxed);
                if self.sink_flush() {
                    self.set_sink_ok(true);
                }
            }
            Err(source) => {
                self.shared.failed.fetch_add(n64, Ordering::Relaxed);
                self.set_sink_ok(false);
                self.fail(AuditError::Write { source });
            }
        }
        if let Some(warning) = self.sink.take_warning() {
            self.shared.record_error(&warning);
        }
        let mut pending = std::mem::take(&mut self.pending);
        for ev in pending.drain(..) {
            self.retire(ev);
        }
        self.pending = pending;
        if self.buf.capacity() > BUF_RETAIN {
            self.buf = Vec::with_capacity(64 * 1024);
        } else {
            self.buf.clear();
        }
    }

    /// Flushes the sink; false (and recorded) on failure.
    fn sink_flush(&mut self) -> bool {
        if let Err(source) = self.sink.flush() {
            self.set_sink_ok(false);
            self.fail(AuditError::Write { source });
            return false;
        }
        true
    }

    /// Stores the sink's health, writing the shared flag only when it changes
    /// (producers read it before every call).
    fn set_sink_ok(&self, ok: bool) {
        let flag = &self.shared.sink_ok.0;
        if flag.load(Ordering::Relaxed) != ok {
            flag.store(ok, Ordering::Relaxed);
        }
    }

    fn fail(&mut self, err: AuditError) {
        self.shared.record_error(&err);
        self.unreported = Some(err);
    }

    /// Writes exactly the events queued now (`len()` counts every claimed
    /// slot, so this covers all `enqueue` calls that returned before the
    /// flush request was sent), then flushes the sink.
    fn flush_pending(&mut self, events: &Receiver<Box<Entry>>) -> Result<(), AuditError> {
        let mut remaining = events.len();
        while remaining > 0 {
            // A claimed slot is always filled, so this returns promptly.
            let Ok(first) = events.recv() else { break };
            remaining = remaining.saturating_sub(self.batch(events, first, remaining));
        }
        self.write_summaries(true);
        self.sink_flush();
        self.unreported.take().map_or(Ok(()), Err)
    }

    /// Ends the refusal interval if it is over (whatever its age with `force`) and
    /// writes its summary events, in batches (counted as enqueued and written).
    fn write_summaries(&mut self, force: bool) {
        let summaries = self.refusals.take_summaries(force);
        if summaries.is_empty() {
            return;
        }
        self.shared
            .enqueued
            .0
            .fetch_add(summaries.len() as u64, Ordering::Relaxed);
        let mut n = 0;
        for ev in summaries {
            self.push(Box::new(Entry::from(ev)));
            n += 1;
            if n == self.batch_max || self.buf.len() >= BATCH_BYTES {
                self.write_pending(n);
                n = 0;
            }
        }
        if n > 0 {
            self.write_pending(n);
        }
    }

    /// Drains the queue (producers are fenced out by now), writes, syncs.
    fn finish(mut self, events: &Receiver<Box<Entry>>) -> Result<(), AuditError> {
        while let Ok(first) = events.try_recv() {
            self.batch(events, first, usize::MAX);
        }
        self.write_summaries(true);
        self.sink_flush();
        if let Err(source) = self.sink.sync() {
            let err = AuditError::Sync { source };
            self.shared.record_error(&err);
            self.unreported.get_or_insert(err);
        }
        self.unreported.take().map_or(Ok(()), Err)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing unwrap is a failing test")]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;
    use std::fs::File;
    use std::io::BufRead;
    use std::sync::mpsc;

    fn ts(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(ms).single().unwrap()
    }

    fn sample() -> AuditEvent {
        AuditEvent {
            ts: Utc.with_ymd_and_hms(2026, 3, 9, 14, 0, 0).unwrap()
                + chrono::Duration::milliseconds(123),
            key_id: "fmg_key_abc".into(),
            key_name: "ci bot".into(),
            tool: "search".into(),
            scopes: vec!["read".into(), "write".into()],
            duration_ms: 12.345_67,
            status: Status::Ok,
            error: None,
            input_args: Some(serde_json::json!({"q": "x", "limit": 10})),
            output_preview: Some("result".into()),
            client_ip: Some("10.0.0.1".into()),
            metadata: None,
            extra: None,
        }
    }

    fn line_of(ev: &AuditEvent) -> String {
        let mut buf = Vec::new();
        write_line(&mut buf, ev);
        String::from_utf8(buf).unwrap()
    }

    fn read_lines(path: &Path) -> Vec<String> {
        let f = File::open(path).unwrap();
        io::BufReader::new(f).lines().map(Result::unwrap).collect()
    }

    fn numbered(i: usize) -> AuditEvent {
        let mut ev = sample();
        ev.key_id = format!("k{i}");
        ev
    }

    // ---- status ----

    #[test]
    fn rendered_lines_and_events_share_one_queue_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mixed.jsonl");
        // A small pool and queue: entries are recycled between the two kinds.
        let opts = WriterOptions {
            queue_capacity: 64,
            ..WriterOptions::default()
        };
        let w = AuditWriter::open_jsonl(&path, opts).unwrap();
        let mut sent = 0;
        for i in 0..2000 {
            let ok = if i % 3 == 0 {
                w.enqueue(numbered(i))
            } else {
                w.enqueue_line(|buf| write_line(buf, &numbered(i)))
            };
            if ok {
                sent += 1;
            } else {
                w.flush().unwrap();
                // Retry once after the queue drained.
                let again = w.enqueue_line(|buf| write_line(buf, &numbered(i)));
                assert!(again);
                sent += 1;
            }
        }
        w.close().unwrap();
        let lines = read_lines(&path);
        assert_eq!(lines.len(), sent);
        for (i, line) in lines.iter().enumerate() {
            assert_eq!(unsealed(line), line_of(&numbered(i)), "line {i}");
        }
    }

    /// A written line without the fields the chain adds (`id`, `prev`, `chain`), with its `\n`.
    fn unsealed(line: &str) -> String {
        let at = line.rfind(",\"id\":\"").unwrap();
        format!("{}}}\n", &line[..at])
    }

    #[test]
    fn an_events_sink_gets_lines_and_events_in_queue_order() {
        let sink = EventSink::default();
        let w = AuditWriter::with_sink(sink.clone(), WriterOptions::default()).unwrap();
        for i in 0..40 {
            let ok = if i % 2 == 0 {
                w.enqueue(numbered(i))
            } else {
                w.enqueue_line(|buf| write_line(buf, &numbered(i)))
            };
            assert!(ok);
        }
        w.close().unwrap();
        let ids: Vec<String> = sink.seen.lock().iter().flat_map(|s| s.2.clone()).collect();
        let want: Vec<String> = (0..40).map(|i| numbered(i).key_id).collect();
        assert_eq!(ids, want);
    }

    #[test]
    fn a_paused_writer_refuses_counts_and_reports_then_resumes() {
        let sink = EventSink::default();
        let w = AuditWriter::with_sink(sink.clone(), WriterOptions::default()).unwrap();
        assert!(w.enqueue(numbered(0)));
        w.pause(Some("spool over its limit".to_owned()));
        assert!(!w.healthy());
        let mut rendered = false;
        assert!(!w.enqueue_line(|_| rendered = true));
        assert!(!rendered, "a paused writer renders nothing");
        assert!(!w.enqueue(numbered(1)));
        let report = w.take_loss_report(Duration::ZERO).unwrap();
        assert_eq!(
            (report.lost, report.dropped, report.paused_dropped),
            (2, 2, 2)
        );
        assert_eq!(report.paused.as_deref(), Some("spool over its limit"));
        w.pause(None);
        assert!(w.healthy());
        assert!(w.enqueue(numbered(2)));
        w.close().unwrap();
        let st = w.stats();
        assert_eq!(
            (st.enqueued, st.written, st.dropped, st.paused_dropped),
            (2, 2, 2, 2)
        );
        let ids: Vec<String> = sink.seen.lock().iter().flat_map(|s| s.2.clone()).collect();
        assert_eq!(ids, [numbered(0).key_id, numbered(2).key_id]);
    }

    #[test]
    fn close_waits_out_nothing_extra_while_paused() {
        // The pause bit is not an enqueue in flight: close must not spin on it.
        let w = AuditWriter::with_sink(EventSink::default(), WriterOptions::default()).unwrap();
        w.pause(Some("test".to_owned()));
        w.close().unwrap();
        assert!(w.is_closed());
        assert!(!w.enqueue(numbered(0)));
    }

    #[test]
    fn status_names_round_trip() {
        let names: Vec<_> = Status::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "ok",
                "error",
                "rate_limited",
                "unauthorized",
                "forbidden",
                "ip_denied",
                "created",
                "rotated",
                "revoked"
            ]
        );
        for st in Status::ALL {
            assert_eq!(st.as_str().parse::<Status>().unwrap(), st);
            assert_eq!(st.to_string(), st.as_str());
            assert_eq!(
                serde_json::to_string(&st).unwrap(),
                format!("\"{}\"", st.as_str())
            );
        }
    }

    #[test]
    fn status_parse_error_names_valid_values() {
        let err = "OK".parse::<Status>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("\"OK\""), "{msg}");
        assert!(
            msg.contains("ok, error, rate_limited, unauthorized, forbidden, ip_denied"),
            "{msg}"
        );
        assert!(msg.contains("revoked"), "{msg}");
    }

    // ---- serialiser ----

    #[test]
    fn line_matches_golden_with_fixed_field_order() {
        let line = line_of(&sample());
        assert_eq!(
            line,
            "{\"ts\":\"2026-03-09T14:00:00.123Z\",\"key_id\":\"fmg_key_abc\",\"key_name\":\"ci bot\",\
             \"tool\":\"search\",\"scopes\":[\"read\",\"write\"],\"duration_ms\":12.346,\"status\":\"ok\",\
             \"error\":null,\"input_args\":{\"limit\":10,\"q\":\"x\"},\"output_preview\":\"result\",\
             \"client_ip\":\"10.0.0.1\",\"metadata\":{}}\n"
        );
    }

    #[test]
    fn absent_fields_are_null_and_metadata_empty_object() {
        let ev = AuditEvent::new("", "", "t", Status::Unauthorized);
        let v: Value = serde_json::from_str(&line_of(&ev)).unwrap();
        for f in ["error", "input_args", "output_preview", "client_ip"] {
            assert_eq!(v[f], Value::Null, "{f}");
        }
        assert_eq!(v["metadata"], serde_json::json!({}));
        assert_eq!(v["scopes"], serde_json::json!([]));
        assert_eq!(v["status"], "unauthorized");
        assert_eq!(v["duration_ms"].as_f64(), Some(0.0));
    }

    #[test]
    fn extra_fields_follow_fixed_ones_and_cannot_shadow_them() {
        let mut ev = sample();
        ev.status = Status::RateLimited;
        ev.metadata = Some(serde_json::json!({"k": [1, 2]}));
        let mut extra = Map::new();
        extra.insert("retry_after".into(), serde_json::json!(1.5));
        extra.insert("actor".into(), serde_json::json!("admin"));
        extra.insert("status".into(), serde_json::json!("ok"));
        extra.insert("ts".into(), serde_json::json!(0));
        ev.extra = Some(extra);
        let line = line_of(&ev);
        let tail = line.split("\"metadata\":{\"k\":[1,2]}").nth(1).unwrap();
        assert_eq!(tail, ",\"actor\":\"admin\",\"retry_after\":1.5}\n");
        assert_eq!(line.matches("\"status\":").count(), 1);
        assert_eq!(line.matches("\"ts\":").count(), 1);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["status"], "rate_limited");
    }

    #[test]
    fn keys_appear_in_the_documented_order() {
        let mut ev = sample();
        ev.extra = Some(Map::from_iter([(
            "method".to_owned(),
            Value::from("tools/call"),
        )]));
        let line = line_of(&ev);
        let mut last = 0;
        for key in FIXED_FIELDS.iter().chain(&["method"]) {
            let pos = line.find(&format!("\"{key}\":")).unwrap();
            assert!(pos >= last, "{key} out of order in {line}");
            last = pos;
        }
    }

    #[test]
    fn ts_format_examples() {
        assert_eq!(format_ts(&ts(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_ts(&ts(1_773_064_800_123)),
            "2026-03-09T14:00:00.123Z"
        );
        // Sub-millisecond digits are truncated, not rounded.
        let t = Utc
            .timestamp_opt(1_773_064_800, 123_999_999)
            .single()
            .unwrap();
        assert_eq!(format_ts(&t), "2026-03-09T14:00:00.123Z");
        let early = Utc.with_ymd_and_hms(5, 1, 2, 3, 4, 5).unwrap();
        assert_eq!(format_ts(&early), "0005-01-02T03:04:05.000Z");
        let far = Utc.with_ymd_and_hms(12_000, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(
            format_ts(&far),
            far.to_rfc3339_opts(SecondsFormat::Millis, true)
        );
        let neg = Utc.with_ymd_and_hms(-3, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(
            format_ts(&neg),
            neg.to_rfc3339_opts(SecondsFormat::Millis, true)
        );
    }

    #[test]
    fn ts_leap_second_matches_chrono() {
        let t = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_milli_opt(23, 59, 59, 1_250)
            .unwrap()
            .and_utc();
        assert_eq!(format_ts(&t), "2016-12-31T23:59:60.250Z");
        assert_eq!(
            format_ts(&t),
            t.to_rfc3339_opts(SecondsFormat::Millis, true)
        );
    }

    #[test]
    fn duration_rounding_and_shape() {
        let cases: &[(f64, &str)] = &[
            (0.0, "0.0"),
            (-0.0, "0.0"),
            (2.0, "2.0"),
            (1.5, "1.5"),
            (0.001, "0.001"),
            (0.0004, "0.0"),
            (0.0006, "0.001"),
            (12.345_67, "12.346"),
            (3.05, "3.05"),
            (100.100, "100.1"),
            (-1.25, "-1.25"),
            (-0.0004, "0.0"),
            (f64::NAN, "null"),
            (f64::INFINITY, "null"),
        ];
        for &(d, want) in cases {
            let mut buf = Vec::new();
            write_duration(&mut buf, d);
            assert_eq!(std::str::from_utf8(&buf).unwrap(), want, "{d}");
        }
        let mut buf = Vec::new();
        write_duration(&mut buf, 1e300);
        let back: f64 = serde_json::from_slice(&buf).unwrap();
        assert!((back - 1e300).abs() / 1e300 < 1e-12);
    }

    #[test]
    fn nasty_strings_are_escaped_on_one_line() {
        let nasty = "q\"uo\\te\n\r\t\u{0}\u{1f}\u{7f} é 日本 🦀 \u{2028}</script>";
        let mut ev = sample();
        ev.key_id = nasty.into();
        ev.key_name = nasty.into();
        ev.tool = nasty.into();
        ev.scopes = vec![nasty.into(), String::new()];
        ev.error = Some(nasty.into());
        ev.output_preview = Some(nasty.into());
        ev.client_ip = Some(nasty.into());
        ev.input_args = Some(serde_json::json!({ nasty: nasty }));
        ev.extra = Some(Map::from_iter([(nasty.to_owned(), Value::from(nasty))]));
        let line = line_of(&ev);
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.ends_with('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        for f in [
            "key_id",
            "key_name",
            "tool",
            "error",
            "output_preview",
            "client_ip",
        ] {
            assert_eq!(v[f], nasty, "{f}");
        }
        assert_eq!(v["scopes"][0], nasty);
        assert_eq!(v["input_args"][nasty], nasty);
        assert_eq!(v[nasty], nasty);
    }

    fn arb_status() -> impl Strategy<Value = Status> {
        (0..Status::ALL.len()).prop_map(|i| Status::ALL[i])
    }

    proptest! {
        /// The word-at-a-time scan finds every byte to escape wherever it sits
        /// (strings of mostly plain text with a few specials, at any offset).
        #[test]
        fn json_str_matches_serde(
            s in "([a-z0-9 é日]{0,20}[\x00-\x1f\"\\\x7f]?){0,4}[a-z]{0,9}",
        ) {
            let mut buf = Vec::new();
            write_json_str(&mut buf, &s);
            prop_assert_eq!(String::from_utf8(buf).unwrap(), serde_json::to_string(&s).unwrap());
        }
    }

    proptest! {
        #[test]
        fn every_line_parses_and_round_trips(
            key_id in any::<String>(),
            key_name in any::<String>(),
            tool in "(\\PC|[\\x00-\\x1f\"\\\\])*",
            scopes in proptest::collection::vec(any::<String>(), 0..4),
            error in proptest::option::of(any::<String>()),
            preview in proptest::option::of(any::<String>()),
            ip in proptest::option::of(any::<String>()),
            extra_key in "[a-z_]{1,8}",
            extra_val in any::<String>(),
            ms in -1_000_000_000_000i64..300_000_000_000_000,
            duration in -1e9f64..1e9,
            status in arb_status(),
        ) {
            let ev = AuditEvent {
                ts: ts(ms),
                key_id, key_name, tool, scopes,
                duration_ms: duration,
                status,
                error,
                input_args: Some(serde_json::json!({"s": extra_val.clone()})),
                output_preview: preview,
                client_ip: ip,
                metadata: Some(serde_json::json!([extra_val.clone()])),
                extra: Some(Map::from_iter([(extra_key.clone(), Value::from(extra_val.clone()))])),
            };
            let line = line_of(&ev);
            prop_assert_eq!(line.find('\n'), Some(line.len() - 1));
            let v: Map<String, Value> = serde_json::from_str(&line).unwrap();
            let keys: Vec<&str> = v.keys().map(String::as_str).collect();
            for f in FIXED_FIELDS { prop_assert!(keys.contains(&f)); }
            prop_assert_eq!(&v["ts"], &Value::from(ev.ts.to_rfc3339_opts(SecondsFormat::Millis, true)));
            prop_assert_eq!(&v["key_id"], &Value::from(ev.key_id.clone()));
            prop_assert_eq!(&v["key_name"], &Value::from(ev.key_name.clone()));
            prop_assert_eq!(&v["tool"], &Value::from(ev.tool.clone()));
            prop_assert_eq!(&v["scopes"], &Value::from(ev.scopes.clone()));
            let d = v["duration_ms"].as_f64().unwrap();
            prop_assert!((d - duration).abs() <= 0.000_500_1 + duration.abs() * 1e-15);
            // Exactly the nearest f64 to the 3-decimal rounding (sign of zero aside).
            prop_assert!((d - (duration * 1000.0).round() / 1000.0).abs() <= 0.0);
            prop_assert_eq!(v["status"].as_str().unwrap().parse::<Status>().unwrap(), status);
            prop_assert_eq!(&v["error"], &ev.error.clone().map_or(Value::Null, Value::from));
            prop_assert_eq!(&v["output_preview"], &ev.output_preview.clone().map_or(Value::Null, Value::from));
            prop_assert_eq!(&v["client_ip"], &ev.client_ip.clone().map_or(Value::Null, Value::from));
            prop_assert_eq!(Some(&v["input_args"]), ev.input_args.as_ref());
            prop_assert_eq!(Some(&v["metadata"]), ev.metadata.as_ref());
            if !FIXED_FIELDS.contains(&extra_key.as_str()) {
                prop_assert_eq!(&v[&extra_key], &Value::from(extra_val));
            }
        }

        #[test]
        fn ts_matches_chrono(secs in -62_167_219_200i64..253_402_300_799, nanos in 0u32..2_000_000_000) {
            if let Some(t) = DateTime::<Utc>::from_timestamp(secs, nanos) {
                prop_assert_eq!(format_ts(&t), t.to_rfc3339_opts(SecondsFormat::Millis, true));
            }
        }
    }

    // ---- open errors ----

    #[test]
    fn open_fails_at_construction_for_missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no_such_dir").join("audit.jsonl");
        let err = AuditWriter::open_jsonl(&path, WriterOptions::default()).unwrap_err();
        assert!(matches!(&err, AuditError::Open { path: p, .. } if p == &path));
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("create the directory"), "{msg}");
    }

    #[test]
    fn open_fails_at_construction_when_parent_is_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        let path = file.join("audit.jsonl");
        let err = AuditWriter::open_jsonl(&path, WriterOptions::default()).unwrap_err();
        let AuditError::Open { source, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(source.kind(), io::ErrorKind::NotADirectory);
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("not a directory"), "{msg}");
    }

    #[test]
    fn open_fails_when_path_is_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let err = AuditWriter::open_jsonl(dir.path(), WriterOptions::default()).unwrap_err();
        assert!(err.to_string().contains("give a file path"), "{err}");
    }

    #[test]
    fn invalid_options_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        for (opts, name) in [
            (
                WriterOptions {
                    queue_capacity: 0,
                    ..WriterOptions::default()
                },
                "queue_capacity",
            ),
            (
                WriterOptions {
                    batch_max: 0,
                    ..WriterOptions::default()
                },
                "batch_max",
            ),
            (
                WriterOptions {
                    flush_interval: Duration::ZERO,
                    ..WriterOptions::default()
                },
                "flush_interval",
            ),
        ] {
            let err = AuditWriter::open_jsonl(&path, opts).unwrap_err();
            assert!(matches!(err, AuditError::InvalidOption { name: n, .. } if n == name));
        }
    }

    #[cfg(unix)]
    #[test]
    fn new_file_gets_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let w = AuditWriter::open_jsonl(&path, WriterOptions::default()).unwrap();
        w.close().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // ---- writer ----

    #[test]
    fn writer_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<AuditWriter>();
    }

    #[test]
    fn flush_makes_lines_visible_before_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let w = AuditWriter::open_jsonl(&path, WriterOptions::default()).unwrap();
        for i in 0..1000 {
            assert!(w.enqueue(numbered(i)));
        }
        w.flush().unwrap();
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 1000);
        for (i, l) in lines.iter().enumerate() {
            let v: Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["key_id"], format!("k{i}"));
        }
        assert_eq!(w.stats().written, 1000);
        w.close().unwrap();
    }

    #[test]
    fn close_drains_everything_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let n = 100_000;
        let opts = WriterOptions {
            queue_capacity: n,
            ..WriterOptions::default()
        };
        let w = AuditWriter::open_jsonl(&path, opts).unwrap();
        let ev = sample();
        for _ in 0..n {
            assert!(w.enqueue(ev.clone()));
        }
        w.close().unwrap();
        w.close().unwrap();
        assert_eq!(read_lines(&path).len(), n);
        let s = w.stats();
        assert_eq!(
            (s.enqueued, s.written, s.dropped, s.failed),
            (n as u64, n as u64, 0, 0)
        );
        // After close: refused, counted, flush is a no-op.
        assert!(!w.enqueue(sample()));
        assert_eq!(w.stats().dropped, 1);
        w.flush().unwrap();
        assert!(w.is_closed());
    }

    #[test]
    fn drop_closes_and_appends_to_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        for _ in 0..2 {
            let w = AuditWriter::open_jsonl(&path, WriterOptions::default()).unwrap();
            for i in 0..10 {
                w.enqueue(numbered(i));
            }
        }
        assert_eq!(read_lines(&path).len(), 20);
    }

    #[test]
    fn torn_last_line_of_previous_run_is_ended_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        std::fs::write(&path, b"{\"ts\":\"2026-01-01T00:00:00.000Z\"}\n{\"torn").unwrap();
        let w = AuditWriter::open_jsonl(&path, WriterOptions::default()).unwrap();
        w.enqueue(sample());
        w.close().unwrap();
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[1], "{\"torn");
        // The restart record acknowledging it comes first, chained like any line.
        let restart: Value = serde_json::from_str(&lines[2]).unwrap();
        assert_eq!(restart["record"], "restart");
        assert_eq!(restart["torn_bytes"], 6);
        assert_eq!(
            restart["torn_blake3"],
            blake3::hash(b"{\"torn").to_hex().as_str()
        );
        assert!(restart["chain"].is_string());
        let ev: Value = serde_json::from_str(&lines[3]).unwrap();
        assert_eq!(ev["key_id"], "fmg_key_abc");
    }

    /// Signals "inside `write_batch`", then waits for a release token.
    type Gate = (mpsc::SyncSender<()>, Arc<Mutex<mpsc::Receiver<()>>>);

    /// Collects batches in memory; optionally blocks in `write_batch` until released.
    #[derive(Clone, Default)]
    struct MemSink {
        data: Arc<Mutex<Vec<u8>>>,
        batches: Arc<Mutex<Vec<usize>>>,
        thread_names: Arc<Mutex<Vec<String>>>,
        gate: Option<Gate>,
        synced: Arc<AtomicUsize>,
    }

    impl Sink for MemSink {
        fn write_batch(&mut self, batch: &Batch<'_>) -> io::Result<()> {
            let (buf, n) = (batch.jsonl(), batch.len());
            assert_eq!(batch.records().len(), 0, "a Jsonl batch carries no events");
            if let Some((entered, release)) = &self.gate {
                entered.send(()).unwrap();
                release.lock().recv().unwrap();
            }
            let name = std::thread::current().name().unwrap_or("").to_owned();
            self.thread_names.lock().push(name);
            self.batches.lock().push(n);
            self.data.lock().extend_from_slice(buf);
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn sync(&mut self) -> io::Result<()> {
            self.synced.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// A sink whose first `write_batch` blocks: returns it plus the handles
    /// to wait for the thread to be inside the write and to let it go on.
    fn gated_sink() -> (MemSink, mpsc::Receiver<()>, mpsc::SyncSender<()>) {
        let (entered_tx, entered_rx) = mpsc::sync_channel(1000);
        let (release_tx, release_rx) = mpsc::sync_channel(1000);
        let sink = MemSink {
            gate: Some((entered_tx, Arc::new(Mutex::new(release_rx)))),
            ..MemSink::default()
        };
        (sink, entered_rx, release_tx)
    }

    /// (len, JSONL bytes, key ids) of one batch.
    type Seen = (usize, usize, Vec<String>);

    /// Asks for events; records every batch.
    #[derive(Clone, Default)]
    struct EventSink {
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    impl Sink for EventSink {
        fn format(&self) -> BatchFormat {
            BatchFormat::Events
        }
        fn write_batch(&mut self, batch: &Batch<'_>) -> io::Result<()> {
            let ids = batch
                .records()
                .map(|r| match r {
                    Record::Event(e) => e.key_id.clone(),
                    Record::Line(l) => {
                        let v: Value = serde_json::from_slice(l).unwrap();
                        v["key_id"].as_str().unwrap().to_owned()
                    }
                })
                .collect();
            self.seen
                .lock()
                .push((batch.len(), batch.jsonl().len(), ids));
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn sync(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn events_format_sink_gets_the_events_in_order_and_no_bytes() {
        let sink = EventSink::default();
        let opts = WriterOptions {
            batch_max: 7,
            ..WriterOptions::default()
        };
        let w = AuditWriter::with_sink(sink.clone(), opts).unwrap();
        for i in 0..50 {
            assert!(w.enqueue(numbered(i)));
        }
        w.close().unwrap();
        let seen = sink.seen.lock();
        assert!(seen
            .iter()
            .all(|(n, bytes, ids)| *n == ids.len() && *n <= 7 && *bytes == 0));
        let ids: Vec<String> = seen.iter().flat_map(|(_, _, ids)| ids.clone()).collect();
        assert_eq!(ids, (0..50).map(|i| format!("k{i}")).collect::<Vec<_>>());
        assert_eq!(w.stats().written, 50);
    }

    #[test]
    fn runs_on_named_thread_and_syncs_once_on_close() {
        let sink = MemSink::default();
        let w = AuditWriter::with_sink(sink.clone(), WriterOptions::default()).unwrap();
        w.enqueue(sample());
        w.flush().unwrap();
        w.close().unwrap();
        assert_eq!(*sink.thread_names.lock(), ["fmg-audit"]);
        assert_eq!(sink.synced.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn batches_respect_batch_max() {
        let (sink, entered, release) = gated_sink();
        let opts = WriterOptions {
            batch_max: 10,
            ..WriterOptions::default()
        };
        let w = AuditWriter::with_sink(sink.clone(), opts).unwrap();
        w.enqueue(numbered(0));
        entered.recv().unwrap(); // thread is stuck writing event 0
        for i in 1..=25 {
            assert!(w.enqueue(numbered(i)));
        }
        for _ in 0..10 {
            release.send(()).unwrap();
        }
        w.close().unwrap();
        assert_eq!(*sink.batches.lock(), [1, 10, 10, 5]);
        let data = sink.data.lock();
        let ids: Vec<String> = data
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                serde_json::from_slice::<Value>(l).unwrap()["key_id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(ids, (0..=25).map(|i| format!("k{i}")).collect::<Vec<_>>());
    }

    /// Fails every write while `failing` is set.
    #[derive(Clone, Default)]
    struct SwitchSink {
        failing: Arc<AtomicBool>,
        lines: Arc<AtomicUsize>,
    }

    impl Sink for SwitchSink {
        fn write_batch(&mut self, batch: &Batch<'_>) -> io::Result<()> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(28));
            }
            self.lines.fetch_add(batch.len(), Ordering::SeqCst);
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn sync(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn healthy_follows_sink_failures_until_a_batch_succeeds() {
        let sink = SwitchSink::default();
        let w = AuditWriter::with_sink(sink.clone(), WriterOptions::default()).unwrap();
        assert!(w.healthy());
        sink.failing.store(true, Ordering::SeqCst);
        assert!(w.enqueue(numbered(0)));
        assert!(w.flush().is_err());
        assert!(!w.healthy());
        sink.failing.store(false, Ordering::SeqCst);
        assert!(!w.healthy(), "no success yet");
        assert!(w.enqueue(numbered(1)));
        w.flush().unwrap();
        assert!(w.healthy());
        w.close().unwrap();
        assert!(!w.healthy(), "closed: events would be dropped");
        assert_eq!(sink.lines.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn healthy_is_false_while_the_queue_is_full() {
        let (sink, entered, release) = gated_sink();
        let opts = WriterOptions {
            queue_capacity: 2,
            ..WriterOptions::default()
        };
        let w = AuditWriter::with_sink(sink, opts).unwrap();
        assert!(w.enqueue(numbered(0)));
        entered.recv().unwrap();
        assert!(w.enqueue(numbered(1)));
        assert!(w.healthy());
        assert!(w.enqueue(numbered(2)));
        assert!(!w.healthy());
        for _ in 0..10 {
            release.send(()).unwrap();
        }
        w.flush().unwrap();
        assert!(w.healthy());
        w.close().unwrap();
    }

    #[test]
    fn block_waits_for_room_through_the_hook_then_gives_up() {
        let (sink, entered, release) = gated_sink();
        let opts = WriterOptions {
            queue_capacity: 1,
            on_full: OnFull::Block(Duration::from_millis(150)),
            ..WriterOptions::default()
        };
        let w = Arc::new(AuditWriter::with_sink(sink.clone(), opts).unwrap());
        let hooked = AtomicUsize::new(0);
        let around = |wait: Wait<'_>| {
            hooked.fetch_add(1, Ordering::SeqCst);
            wait()
        };
        assert!(w.enqueue_with(numbered(0), around));
        entered.recv().unwrap(); // the thread holds event 0
        assert!(w.enqueue_with(numbered(1), around)); // room: no wait
        assert_eq!(hooked.load(Ordering::SeqCst), 0);
        // Full, and nobody makes room: waits the bound, then drops.
        let t = Instant::now();
        assert!(!w.enqueue_with(numbered(2), around));
        assert!(
            t.elapsed() >= Duration::from_millis(140),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(hooked.load(Ordering::SeqCst), 1);
        assert_eq!(w.stats().dropped, 1);
        // Full, and the thread makes room while we wait: accepted.
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            for _ in 0..10 {
                release.send(()).unwrap();
            }
        });
        assert!(w.enqueue(numbered(3)));
        releaser.join().unwrap();
        w.close().unwrap();
        let s = w.stats();
        assert_eq!((s.written, s.dropped), (3, 1));
    }

    #[test]
    fn loss_reports_come_at_most_once_per_interval() {
        let (sink, entered, release) = gated_sink();
        let opts = WriterOptions {
            queue_capacity: 1,
            ..WriterOptions::default()
        };
        let w = AuditWriter::with_sink(sink, opts).unwrap();
        let hour = Duration::from_secs(3600);
        assert!(w.take_loss_report(hour).is_none());
        assert!(w.enqueue(numbered(0)));
        entered.recv().unwrap();
        assert!(w.enqueue(numbered(1)));
        for i in 0..5 {
            assert!(!w.enqueue(numbered(i)));
        }
        let r = w.take_loss_report(hour).unwrap();
        assert_eq!((r.lost, r.dropped, r.failed), (5, 5, 0));
        assert!(!w.enqueue(numbered(9)));
        assert!(w.take_loss_report(hour).is_none(), "within the interval");
        for _ in 0..10 {
            release.send(()).unwrap();
        }
        w.close().unwrap();
        let w2 = AuditWriter::with_sink(SwitchSink::default(), WriterOptions::default()).unwrap();
        assert!(w2.take_loss_report(Duration::ZERO).is_none());
        w2.close().unwrap();
    }

    #[test]
    fn a_writer_chain_verifies_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        for run in 0..3 {
            let w = AuditWriter::open_jsonl(&path, WriterOptions::default()).unwrap();
            for i in 0..500 {
                assert!(w.enqueue(numbered(run * 500 + i)));
            }
            w.close().unwrap();
        }
        let r = verify_files(&log_files(&path).unwrap(), None).unwrap();
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.events, 1500);
        let ids: std::collections::HashSet<String> = read_lines(&path)
            .iter()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(ids.len(), 1500, "ids are unique");
    }

    #[test]
    fn a_block_bound_out_of_range_is_refused() {
        for wait in [Duration::ZERO, Duration::from_secs(61)] {
            let opts = WriterOptions {
                on_full: OnFull::Block(wait),
                ..WriterOptions::default()
            };
            let err = AuditWriter::with_sink(SwitchSink::default(), opts).unwrap_err();
            assert!(err.to_string().contains("on_full"), "{err}");
        }
    }

    #[test]
    fn full_queue_drops_and_counts_exactly() {
        let (sink, entered, release) = gated_sink();
        let opts = WriterOptions {
            queue_capacity: 4,
            ..WriterOptions::default()
        };
        let w = AuditWriter::with_sink(sink.clone(), opts).unwrap();
        assert!(w.enqueue(numbered(0)));
        entered.recv().unwrap(); // event 0 left the queue; the thread is blocked
        let accepted = (1..=100).filter(|&i| w.enqueue(numbered(i))).count();
        assert_eq!(accepted, 4);
        let s = w.stats();
        assert_eq!((s.enqueued, s.dropped, s.queue_depth), (5, 96, 4));
        for _ in 0..10 {
            release.send(()).unwrap();
        }
        w.close().unwrap();
        let s = w.stats();
        assert_eq!(s.written, 5);
        assert_eq!(s.written + s.dropped, 101);
    }

    #[test]
    fn flush_gets_through_a_full_queue() {
        let (sink, entered, release) = gated_sink();
        let opts = WriterOptions {
            queue_capacity: 8,
            ..WriterOptions::default()
        };
        let w = Arc::new(AuditWriter::with_sink(sink.clone(), opts).unwrap());
        w.enqueue(numbered(0));
        entered.recv().unwrap();
        while w.enqueue(numbered(1)) {}
        let flusher = {
            let w = Arc::clone(&w);
            std::thread::spawn(move || w.flush())
        };
        for _ in 0..100 {
            release.send(()).unwrap();
        }
        flusher.join().unwrap().unwrap();
        // Everything enqueued before the flush is in the sink, before close.
        assert_eq!(w.stats().written, 9);
        assert_eq!(
            sink.data
                .lock()
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .count(),
            9
        );
        w.close().unwrap();
    }

    #[test]
    fn full_queue_with_real_file_keeps_the_books_balanced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let opts = WriterOptions {
            queue_capacity: 16,
            batch_max: 4,
            ..WriterOptions::default()
        };
        let w = AuditWriter::open_jsonl(&path, opts).unwrap();
        let attempts = 50_000u64;
        let ev = sample();
        let accepted = (0..attempts).filter(|_| w.enqueue(ev.clone())).count() as u64;
        w.close().unwrap();
        let s = w.stats();
        assert_eq!(s.enqueued, accepted);
        assert_eq!(s.written + s.dropped, attempts);
        assert_eq!(read_lines(&path).len() as u64, s.written);
    }

    #[test]
    fn concurrent_enqueue_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let (threads, per) = (8usize, 10_000usize);
        let opts = WriterOptions {
            queue_capacity: threads * per,
            ..WriterOptions::default()
        };
        let w = Arc::new(AuditWriter::open_jsonl(&path, opts).unwrap());
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let w = Arc::clone(&w);
                std::thread::spawn(move || {
                    for i in 0..per {
                        let mut ev = sample();
                        ev.key_id = format!("{t}:{i}");
                        assert!(w.enqueue(ev));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        w.close().unwrap();
        let mut seen = std::collections::HashSet::new();
        for l in read_lines(&path) {
            let v: Value = serde_json::from_str(&l).unwrap();
            assert!(seen.insert(v["key_id"].as_str().unwrap().to_owned()));
        }
        assert_eq!(seen.len(), threads * per);
        let s = w.stats();
        assert_eq!((s.written, s.dropped), ((threads * per) as u64, 0));
    }

    #[test]
    fn close_races_with_enqueuers_without_losing_accepted_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let w = Arc::new(AuditWriter::open_jsonl(&path, WriterOptions::default()).unwrap());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let w = Arc::clone(&w);
                std::thread::spawn(move || {
                    let mut attempts = 0u64;
                    while attempts < 200_000 {
                        w.enqueue(sample());
                        attempts += 1;
                        if w.is_closed() {
                            break;
                        }
                    }
                    attempts
                })
            })
            .collect();
        while w.stats().enqueued < 1000 {
            std::thread::yield_now();
        }
        w.close().unwrap();
        let attempts: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        let s = w.stats();
        assert_eq!(s.enqueued, s.written);
        assert_eq!(s.written + s.dropped, attempts);
        assert_eq!(read_lines(&path).len() as u64, s.written);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn runtime_write_errors_are_counted_not_fatal() {
        let w = AuditWriter::open_jsonl(Path::new("/dev/full"), WriterOptions::default()).unwrap();
        for i in 0..10 {
            assert!(w.enqueue(numbered(i)));
        }
        let err = w.flush().unwrap_err();
        assert!(matches!(err, AuditError::Write { .. }), "{err:?}");
        assert!(err.to_string().contains("disk space"), "{err}");
        let s = w.stats();
        assert!(s.write_errors >= 1);
        assert_eq!((s.written, s.failed), (0, 10));
        assert!(
            w.last_error().unwrap().contains("No space left"),
            "{:?}",
            w.last_error()
        );
        // The thread is still alive and keeps counting.
        assert!(w.enqueue(numbered(10)));
        assert!(w.flush().is_err());
        assert_eq!(w.stats().failed, 11);
        // Errors were reported by flush; sync on a device is a no-op: close is clean.
        w.close().unwrap();
    }

    // ---- measurement ----

    fn realistic() -> AuditEvent {
        let mut ev = sample();
        ev.key_id = "fmg_key_01HZX4B7Q2W9".into();
        ev.key_name = "production-agent".into();
        ev.tool = "search_documents".into();
        ev.output_preview = None;
        ev.input_args = None;
        ev
    }

    /// CPU time (user + system, in clock ticks of 10 ms) from a
    /// `/proc/.../stat` file; 0 where unavailable.
    fn cpu_ticks(stat: &str) -> u64 {
        let Ok(text) = std::fs::read_to_string(stat) else {
            return 0;
        };
        let Some(end) = text.rfind(')') else { return 0 };
        let fields: Vec<&str> = text[end + 2..].split_whitespace().collect();
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        field(11) + field(12)
    }

    #[test]
    #[ignore = "measurement: cargo test --release -- --ignored --nocapture"]
    #[allow(clippy::cast_precision_loss, reason = "printing rates")]
    fn measure_throughput() {
        use std::time::Instant;
        let n = 200_000usize;
        let ev = realistic();
        let mut buf = Vec::with_capacity(1 << 20);
        let t = Instant::now();
        for _ in 0..n {
            write_line(&mut buf, &ev);
            if buf.len() > 1 << 20 {
                buf.clear();
            }
        }
        let per = t.elapsed().as_nanos() as f64 / n as f64;
        println!(
            "write_line alone: {per:.0} ns/event ({:.2} M/s), {} bytes/line",
            1e3 / per,
            line_of(&ev).len()
        );

        for (label, with_args) in [("no input_args", false), ("with input_args", true)] {
            let mut ev = realistic();
            if with_args {
                ev.input_args = Some(serde_json::json!({"query": "quarterly report", "limit": 10}));
            }
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("a.jsonl");
            let opts = WriterOptions::default();
            let cap = opts.queue_capacity;
            let w = AuditWriter::open_jsonl(&path, opts).unwrap();
            let events = 3_000_000u64;
            let (proc0, mine0) = (
                cpu_ticks("/proc/self/stat"),
                cpu_ticks("/proc/thread-self/stat"),
            );
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
            let mine = cpu_ticks("/proc/thread-self/stat") - mine0;
            w.close().unwrap();
            let all = cpu_ticks("/proc/self/stat") - proc0;
            let secs = start.elapsed().as_secs_f64();
            let stats = w.stats();
            let written = stats.written as f64;
            println!(
                "sustained ({label}): {} events in {secs:.2}s = {:.2} M events/s (dropped {}); \
                 CPU ns/event: producer (clone + enqueue) {:.0}, writer thread {:.0}",
                stats.written,
                written / secs / 1e6,
                stats.dropped,
                mine as f64 * 1e7 / written,
                all.saturating_sub(mine) as f64 * 1e7 / written,
            );

            let w = AuditWriter::open_jsonl(&path, WriterOptions::default()).unwrap();
            let start = Instant::now();
            for _ in 0..events {
                let mut e = ev.clone();
                e.ts = Utc::now();
                w.enqueue(e);
            }
            let enq = start.elapsed().as_secs_f64();
            w.close().unwrap();
            let stats = w.stats();
            println!(
                "unpaced ({label}): clone + enqueue {:.0} ns/call; written {} dropped {}",
                enq * 1e9 / events as f64,
                stats.written,
                stats.dropped
            );
        }
    }
}
