//! Turning an `SQLite` file to WAL safely when several processes open it at once.
//!
//! `PRAGMA journal_mode=WAL` on a fresh file needs an exclusive lock, and `SQLite` does
//! not always call the busy handler for it: two processes opening a new key store or
//! audit database at the same moment could get "database is locked" from one of them.
//! [`enable_wal`] retries that statement while the file is busy, up to a deadline.

use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode};

/// Runs `PRAGMA journal_mode=WAL` on `conn`, retrying while the file is busy or locked
/// for at most `timeout`; returns the journal mode now in force. This is the first
/// statement that reads the file, so a file that is not a database fails here
/// (`ErrorCode::NotADatabase`).
///
/// # Errors
/// The last `SQLite` error (busy past `timeout`, not a database, I/O).
pub fn enable_wal(conn: &Connection, timeout: Duration) -> rusqlite::Result<String> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        match conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0)) {
            Err(e)
                if matches!(
                    e.sqlite_error_code(),
                    Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing unwrap is a failing test")]
mod tests {
    use super::*;

    // Several processes at once: tests/unit/test_sqlite_open_race.py (threads of one
    // process do not race on the file lock the way processes do).

    #[test]
    fn a_file_that_is_not_a_database_fails_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.db");
        std::fs::write(&path, vec![b'x'; 4096]).unwrap();
        let conn = Connection::open(&path).unwrap();
        let start = Instant::now();
        let err = enable_wal(&conn, Duration::from_secs(5)).unwrap_err();
        assert_eq!(err.sqlite_error_code(), Some(ErrorCode::NotADatabase));
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "no retry for a permanent error"
        );
    }
}
