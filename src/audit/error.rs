//! [`AuditError`]: every failure of the audit log (opening, writing, reading, options),
//! with messages that say what to fix.

use std::io;
use std::path::{Path, PathBuf};

use super::Status;

/// Errors of the audit module.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A status name that is not one of [`Status::ALL`].
    #[error("unknown audit status {value:?}: expected one of {}", status_names())]
    InvalidStatus {
        /// The rejected name.
        value: String,
    },
    /// A [`WriterOptions`](super::WriterOptions) field out of range.
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
        /// The path given to [`AuditWriter::open_jsonl`](super::AuditWriter::open_jsonl) /
        /// [`AuditWriter::open_sqlite`](super::AuditWriter::open_sqlite).
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
