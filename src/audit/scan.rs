//! Streaming filter and export of JSONL audit logs (`fastmcp-guard audit
//! query|export`): constant memory, no per-line allocation on the path of a
//! line that does not match.
//!
//! # Input
//! One JSON object per line, as written by [`write_line`](super::write_line),
//! by fastmcp-guard 0.2 (`", "` separators, `+00:00` timestamps with
//! microseconds) or by hand: field order, whitespace and string escapes are
//! free, and every comparison uses the *decoded* string value.
//!
//! - A line ends at `\n`; a `\r` just before it belongs to the terminator (a
//!   CRLF file is read like an LF file). A final line without `\n` (a torn
//!   write) is processed like any other.
//! - Blank lines (only spaces, tabs, CRs) are skipped; they count in
//!   [`ScanStats::lines`] only.
//! - A line is **malformed** (counted in [`ScanStats::malformed`], skipped,
//!   never an error) when it is not UTF-8, not exactly one JSON object, repeats
//!   a fixed field (duplicate `ts`, say), or lacks a string `ts` that parses as
//!   RFC 3339. Lines longer than [`MAX_LINE_BYTES`] are malformed too and are
//!   skipped without being buffered whole.
//!
//! # Speed: the pre-filter
//! Before parsing, a line must contain each wanted string value (key, tool,
//! status) as a quoted JSON string (`"alice"`) *or* contain a backslash
//! (any escaped spelling such as `"al\u0069ce"` needs one); a line starting
//! with our writer's canonical `{"ts":"2026-03-09T14:00:00.123Z"` is also
//! ruled out by a bytewise time comparison. The pre-filter only rules lines
//! out: every line it lets through is parsed with `serde_json` and checked
//! exactly. Consequence for the books: with a key, tool, status or time filter,
//! a malformed line that the pre-filter proves cannot match is never parsed
//! and so not counted in `malformed`; without such a filter every line is
//! parsed and the count is exact. Over-long lines are always counted.
//!
//! # CSV
//! [`OutputFormat::Csv`] writes RFC 4180 with **CRLF** row ends (the RFC's,
//! Excel's and Python's `csv` default) and the columns [`CSV_COLUMNS`]. A cell
//! is quoted when it contains `,`, `"`, CR or LF, with quotes doubled. Cells:
//! - string values decoded (escapes resolved); `null` or an absent field gives
//!   an empty cell;
//! - `scopes`: the array's strings joined with one space;
//! - `duration_ms` and other non-string scalars: the number's source text
//!   (`12.50` stays `12.50`);
//! - `input_args`, `metadata` and any nested value: the source JSON made
//!   compact (whitespace outside strings removed, escapes and number text
//!   kept); a string `input_args` keeps its quotes (it is JSON text);
//! - `extra`: the top-level fields that are not in
//!   [`FIXED_FIELDS`](super::FIXED_FIELDS), as one compact JSON object in
//!   source order (empty cell when there are none).
//!
//! CSV injection guard (OWASP): a cell made from string values (the string
//! fields and `scopes`) that starts with `=`, `+`, `-`, `@`, TAB or CR gets a
//! leading `'`, so a spreadsheet shows it as text instead of running it as a
//! formula. JSON-text cells (`input_args`, `metadata`, `extra`, numbers) are
//! not prefixed: they start with `{`, `[`, `"`, a digit or a JSON literal.

use std::borrow::Cow;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeDelta, Utc};
use memchr::{memchr, memchr2, memmem};
use serde::de::{self, DeserializeSeed, Deserializer as _, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::{format_ts, write_json_str, Status, FIXED_FIELDS};

/// Lines longer than this (in bytes, without the `\n`) are skipped as
/// malformed, without ever being held in memory whole.
pub const MAX_LINE_BYTES: usize = 16 << 20;

/// The progress callback of [`scan`] is called each time about this many more
/// bytes have been read (and once at the end).
pub const PROGRESS_INTERVAL_BYTES: u64 = 8 << 20;

/// Columns of [`OutputFormat::Csv`]: the fixed fields in
/// [`FIXED_FIELDS`](super::FIXED_FIELDS) order, then `extra` (the other
/// top-level fields as one compact JSON object).
pub const CSV_COLUMNS: [&str; 13] = {
    let mut cols = [""; 13];
    let mut i = 0;
    while i < FIXED_FIELDS.len() {
        cols[i] = FIXED_FIELDS[i];
        i += 1;
    }
    cols[FIXED_FIELDS.len()] = "extra";
    cols
};

/// Read buffer size; it grows (up to [`MAX_LINE_BYTES`] + 1) only for longer lines.
const CHUNK_BYTES: usize = 1 << 20;

/// Output is handed to the writer in pieces of about this size.
const OUT_FLUSH_BYTES: usize = 256 << 10;

// Indexes into `FIXED_FIELDS` of the fields read by name (checked by a test; `error`,
// `output_preview` and `client_ip` are 7, 9 and 10).
const TS: usize = 0;
const KEY_ID: usize = 1;
const KEY_NAME: usize = 2;
const TOOL: usize = 3;
const SCOPES: usize = 4;
const DURATION_MS: usize = 5;
const STATUS: usize = 6;
const INPUT_ARGS: usize = 8;
const METADATA: usize = 11;

/// Errors of [`scan`] and [`scan_path`]. Malformed lines are not errors (see
/// [`ScanStats::malformed`]).
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The audit log could not be opened.
    #[error("cannot open audit log {}: {source}; {}", .path.display(), open_hint(.source))]
    Open {
        /// The path given to [`scan_path`].
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The path names a directory.
    #[error(
        "audit log path {} is a directory; give the JSONL file inside it (such as {}/audit.jsonl)",
        .path.display(),
        .path.display()
    )]
    IsADirectory {
        /// The path given to [`scan_path`].
        path: PathBuf,
    },
    /// Reading the input failed part-way.
    #[error(
        "reading the audit log{} failed after {bytes_read} bytes: {source}; check that the \
         file is still readable (not removed or on a failing disk) and run the command again",
        path_suffix(.path.as_deref())
    )]
    Read {
        /// The file, when known ([`scan_path`]).
        path: Option<PathBuf>,
        /// Bytes read successfully before the failure.
        bytes_read: u64,
        /// The OS error.
        source: io::Error,
    },
    /// Writing the output failed. A `BrokenPipe` kind means the reader went
    /// away (`| head`): callers usually stop quietly.
    #[error(
        "writing the scan output failed: {source}; check free disk space, or that the \
         program reading the output is still running"
    )]
    Write {
        /// The OS error.
        source: io::Error,
    },
    /// The progress callback returned `false` (Ctrl-C). The output written so
    /// far is complete up to the last whole line and has been flushed.
    #[error(
        "audit scan interrupted after {} lines ({} matched, {} bytes read)",
        .stats.lines,
        .stats.matched,
        .stats.bytes_read
    )]
    Interrupted {
        /// What was done before stopping.
        stats: ScanStats,
    },
    /// The directory of a log could not be listed for its rotated files
    /// ([`log_files`], [`whole_log`]).
    #[error(
        "cannot list the audit log files of {}: {source}; check that its directory is \
         readable by this user",
        .path.display()
    )]
    List {
        /// The live log file whose directory was listed.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The export file could not be created ([`create_export`]).
    #[error(
        "cannot write {}: {source}; check that its directory exists and is writable, or \
         choose another output file",
        .path.display()
    )]
    Create {
        /// The output path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// `since` is not before `until`: the range holds no instant.
    #[error(
        "empty time range: since {} is not before until {}; swap them or widen the range",
        format_ts(.since),
        format_ts(.until)
    )]
    EmptyRange {
        /// The filter's `since`.
        since: DateTime<Utc>,
        /// The filter's `until`.
        until: DateTime<Utc>,
    },
}

fn open_hint(err: &io::Error) -> &'static str {
    match err.kind() {
        io::ErrorKind::NotFound => {
            "check the path (the file audit backend writes where its `path` option says)"
        }
        io::ErrorKind::PermissionDenied => {
            "check permissions: run as a user that can read the file and its directory"
        }
        _ => "check that the path names a readable file",
    }
}

fn path_suffix(path: Option<&Path>) -> String {
    path.map(|p| format!(" {}", p.display()))
        .unwrap_or_default()
}

/// Which lines to keep. Every set criterion must hold (AND); `Default` keeps
/// every well-formed line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScanFilter {
    /// Keeps lines whose `key_id` **or** `key_name` equals this (decoded, exact).
    pub key: Option<String>,
    /// Keeps lines whose `tool` equals this (decoded, exact).
    pub tool: Option<String>,
    /// Keeps lines whose `status` is this status's wire name.
    pub status: Option<Status>,
    /// Keeps lines with `ts >= since` (inclusive).
    pub since: Option<DateTime<Utc>>,
    /// Keeps lines with `ts < until` (exclusive).
    pub until: Option<DateTime<Utc>>,
    /// Stops reading after this many matches (`Some(0)`: reads nothing).
    pub limit: Option<u64>,
}

/// What [`scan`] writes for each matching line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// The line, byte for byte (without a CR before its LF), then `\n`.
    Jsonl,
    /// One RFC 4180 row per line (CRLF ends; see the module docs), columns
    /// [`CSV_COLUMNS`]; `header` writes their names first (even with no match).
    Csv {
        /// Write a header row first.
        header: bool,
    },
}

/// Counters of one scan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Lines read (blank and malformed ones included), up to where the scan stopped.
    pub lines: u64,
    /// Lines written to the output.
    pub matched: u64,
    /// Lines skipped as malformed (see the module docs for which are counted).
    pub malformed: u64,
    /// Bytes read from the input (may run past the last line processed when
    /// `limit` stopped the scan).
    pub bytes_read: u64,
}

/// Streams `input` (JSON Lines), writes the lines that pass `filter` to `out`
/// in `format`, and returns the counters.
///
/// Memory stays constant: a 1 MiB read buffer (growing only to hold a longer
/// line, at most [`MAX_LINE_BYTES`]) and a 256 KiB output buffer. `out` gets
/// large writes and a final `flush`, so it needs no buffering of its own.
///
/// `progress(bytes_read)` is called about every [`PROGRESS_INTERVAL_BYTES`]
/// and once at the end; returning `false` stops the scan with
/// [`ScanError::Interrupted`] (the return value of the final call is ignored:
/// the work is done).
///
/// # Errors
/// [`ScanError::Read`] / [`ScanError::Write`] on I/O failure,
/// [`ScanError::Interrupted`], [`ScanError::EmptyRange`] when
/// `since >= until`. Malformed lines are counted, not errors.
pub fn scan<R: Read, W: Write>(
    input: R,
    filter: &ScanFilter,
    format: OutputFormat,
    out: &mut W,
    progress: &mut dyn FnMut(u64) -> bool,
) -> Result<ScanStats, ScanError> {
    run(input, filter, format, out, progress, Tuning::DEFAULT).map(|(stats, _)| stats)
}

/// [`scan`] over the file at `path`.
///
/// # Errors
/// As [`scan`], plus [`ScanError::Open`] (missing file, no permission) and
/// [`ScanError::IsADirectory`]; every message names the path.
pub fn scan_path<W: Write>(
    path: &Path,
    filter: &ScanFilter,
    format: OutputFormat,
    out: &mut W,
    progress: &mut dyn FnMut(u64) -> bool,
) -> Result<ScanStats, ScanError> {
    scan_paths(&[path.to_path_buf()], filter, format, out, progress)
}

/// [`scan`] over several files read one after the other as one log (a
/// rotated JSONL log, oldest first: see
/// [`log_files`](super::log_files)). `limit` and the counters span all
/// of them; a file whose last line has no `\n` is ended before the next
/// file starts. Every file is opened before the scan starts.
///
/// # Errors
/// As [`scan_path`] for each file; a read error names the file it happened in.
pub fn scan_paths<W: Write>(
    paths: &[PathBuf],
    filter: &ScanFilter,
    format: OutputFormat,
    out: &mut W,
    progress: &mut dyn FnMut(u64) -> bool,
) -> Result<ScanStats, ScanError> {
    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        let open_err = |source| ScanError::Open {
            path: path.clone(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        if file.metadata().map_err(open_err)?.is_dir() {
            return Err(ScanError::IsADirectory { path: path.clone() });
        }
        files.push((path.clone(), file));
    }
    let single = (paths.len() == 1).then(|| paths[0].clone());
    let input = Files {
        files: files.into_iter(),
        current: None,
        last: b'\n',
        pending_newline: false,
    };
    scan(input, filter, format, out, progress).map_err(|e| match e {
        ScanError::Read {
            path: None,
            bytes_read,
            source,
        } => ScanError::Read {
            path: single,
            bytes_read,
            source,
        },
        other => other,
    })
}

/// Every file of the JSONL audit log at `path`, oldest first: its rotated
/// files, then `path` itself if it exists (empty when there is no log).
///
/// # Errors
/// [`ScanError::List`] when the directory cannot be read.
pub fn log_files(path: &Path) -> Result<Vec<PathBuf>, ScanError> {
    super::log_files(path).map_err(|source| ScanError::List {
        path: path.to_path_buf(),
        source,
    })
}

/// The files to read for the whole log at `path` (see [`log_files`]), with the
/// live file listed also when no file exists, so that opening it reports the
/// missing path.
///
/// # Errors
/// [`ScanError::List`] when the directory cannot be read.
pub fn whole_log(path: &Path) -> Result<Vec<PathBuf>, ScanError> {
    let mut files = log_files(path)?;
    if files.is_empty() {
        files.push(path.to_path_buf());
    }
    Ok(files)
}

/// Creates the export file at `path` (mode 0600 on Unix: audit lines may hold
/// arguments), or truncates the file there.
///
/// # Errors
/// [`ScanError::Create`] naming the path.
pub fn create_export(path: &Path) -> Result<File, ScanError> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o.open(path).map_err(|source| ScanError::Create {
        path: path.to_path_buf(),
        source,
    })
}

/// Several files read as one stream, a `\n` added after a file that does not
/// end with one; read errors name their file.
struct Files {
    files: std::vec::IntoIter<(PathBuf, File)>,
    current: Option<(PathBuf, File)>,
    /// The last byte handed out (`\n` at the start).
    last: u8,
    pending_newline: bool,
}

impl Read for Files {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.pending_newline {
                self.pending_newline = false;
                self.last = b'\n';
                buf[0] = b'\n';
                return Ok(1);
            }
            let Some((path, file)) = &mut self.current else {
                match self.files.next() {
                    Some(next) => {
                        self.current = Some(next);
                        continue;
                    }
                    None => return Ok(0),
                }
            };
            match file.read(buf) {
                Ok(0) => {
                    self.pending_newline = self.last != b'\n';
                    self.current = None;
                }
                Ok(n) => {
                    self.last = buf[n - 1];
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display())));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Reader loop
// ---------------------------------------------------------------------------

/// Sizes, smaller in tests to reach every boundary.
#[derive(Debug, Clone, Copy)]
struct Tuning {
    chunk: usize,
    max_line: usize,
    progress_every: u64,
}

impl Tuning {
    const DEFAULT: Tuning = Tuning {
        chunk: CHUNK_BYTES,
        max_line: MAX_LINE_BYTES,
        progress_every: PROGRESS_INTERVAL_BYTES,
    };
}

/// Whether to keep reading after a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Go,
    Stop,
}

/// The scan; also returns the largest read-buffer size reached (for tests).
fn run<R: Read, W: Write>(
    mut input: R,
    filter: &ScanFilter,
    format: OutputFormat,
    out: &mut W,
    progress: &mut dyn FnMut(u64) -> bool,
    tuning: Tuning,
) -> Result<(ScanStats, usize), ScanError> {
    let filter = Compiled::new(filter)?;
    let mut eng = Engine::new(filter, format, out);
    if let OutputFormat::Csv { header: true } = format {
        eng.out_buf
            .extend_from_slice(CSV_COLUMNS.join(",").as_bytes());
        eng.out_buf.extend_from_slice(b"\r\n");
    }
    let max_line = tuning.max_line.max(1);
    let mut buf = vec![0u8; tuning.chunk.clamp(1, max_line + 1)];
    if eng.filter.limit == Some(0) {
        return eng.finish(progress).map(|s| (s, buf.len()));
    }
    // buf[start..end] is unprocessed; buf[start..scanned] holds no newline.
    let (mut start, mut scanned, mut end) = (0usize, 0usize, 0usize);
    let mut skipping = false; // inside an over-long line: drop bytes up to its newline
    let mut next_progress = tuning.progress_every.max(1);
    loop {
        while let Some(i) = memchr(b'\n', &buf[scanned..end]) {
            let nl = scanned + i;
            let flow = eng.line(&buf[start..nl])?;
            start = nl + 1;
            scanned = start;
            if flow == Flow::Stop {
                return eng.finish(progress).map(|s| (s, buf.len()));
            }
        }
        scanned = end;
        if start > 0 {
            buf.copy_within(start..end, 0);
            end -= start;
            scanned = end;
            start = 0;
        }
        if end == buf.len() {
            if buf.len() > max_line {
                eng.stats.lines += 1;
                eng.stats.malformed += 1;
                skipping = true;
                (end, scanned) = (0, 0);
            } else {
                let grown = buf.len().saturating_mul(2).min(max_line + 1);
                buf.resize(grown, 0);
            }
        }
        let n = match input.read(&mut buf[end..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                eng.flush()?;
                return Err(ScanError::Read {
                    path: None,
                    bytes_read: eng.stats.bytes_read,
                    source,
                });
            }
        };
        if n == 0 {
            break;
        }
        eng.stats.bytes_read += n as u64;
        if eng.stats.bytes_read >= next_progress {
            next_progress = eng.stats.bytes_read + tuning.progress_every.max(1);
            if !progress(eng.stats.bytes_read) {
                eng.flush()?;
                return Err(ScanError::Interrupted { stats: eng.stats });
            }
        }
        if skipping {
            if let Some(i) = memchr(b'\n', &buf[end..end + n]) {
                start = end + i + 1;
                scanned = start;
                end += n;
                skipping = false;
            }
            // else: drop the chunk (end stays 0)
        } else {
            end += n;
        }
    }
    if !skipping && start < end {
        eng.line(&buf[start..end])?;
    }
    eng.finish(progress).map(|s| (s, buf.len()))
}

/// The filter, prepared: needles for the pre-filter and time bounds.
struct Compiled {
    key: Option<String>,
    tool: Option<String>,
    status: Option<&'static str>,
    /// Quoted JSON spellings of the wanted strings (`"alice"`).
    needles: Vec<memmem::Finder<'static>>,
    since: Option<Bound>,
    until: Option<Bound>,
    /// Both set bounds have a canonical form: canonical timestamps compare bytewise.
    bytewise: bool,
    limit: Option<u64>,
}

/// A time bound, with its canonical 24-byte form rounded *up* to the
/// millisecond. For a millisecond-precision `ts`, `ts >= b` iff
/// `ts >= ceil_ms(b)` and `ts < b` iff `ts < ceil_ms(b)`, so the canonical
/// form compares bytewise with canonical timestamps.
struct Bound {
    at: DateTime<Utc>,
    canon: Option<[u8; 24]>,
}

impl Bound {
    fn new(at: DateTime<Utc>) -> Bound {
        let sub_ms = at.timestamp_subsec_nanos() % 1_000_000;
        let canon = if at.timestamp_subsec_nanos() >= 1_000_000_000 {
            None // a leap second: let chrono compare
        } else {
            let ceil = if sub_ms == 0 {
                Some(at)
            } else {
                at.checked_add_signed(TimeDelta::nanoseconds(i64::from(1_000_000 - sub_ms)))
            };
            ceil.and_then(|c| {
                let text = format_ts(&c);
                let bytes: [u8; 24] = text.as_bytes().try_into().ok()?;
                canonical_ts(&bytes).map(|_| bytes)
            })
        };
        Bound { at, canon }
    }
}

impl Compiled {
    fn new(f: &ScanFilter) -> Result<Compiled, ScanError> {
        if let (Some(since), Some(until)) = (f.since, f.until) {
            if since >= until {
                return Err(ScanError::EmptyRange { since, until });
            }
        }
        let status = f.status.map(Status::as_str);
        let needles = [f.key.as_deref(), f.tool.as_deref(), status]
            .into_iter()
            .flatten()
            .map(|s| {
                let mut quoted = Vec::with_capacity(s.len() + 2);
                quoted.push(b'"');
                quoted.extend_from_slice(s.as_bytes());
                quoted.push(b'"');
                memmem::Finder::new(&quoted).into_owned()
            })
            .collect();
        let since = f.since.map(Bound::new);
        let until = f.until.map(Bound::new);
        let bytewise = [&since, &until]
            .into_iter()
            .flatten()
            .all(|b| b.canon.is_some());
        Ok(Compiled {
            key: f.key.clone(),
            tool: f.tool.clone(),
            status,
            needles,
            since,
            until,
            bytewise,
            limit: f.limit,
        })
    }

    /// Cheap test on the raw bytes: `false` only if the line cannot match.
    fn may_match(&self, line: &[u8]) -> bool {
        if self.bytewise && (self.since.is_some() || self.until.is_some()) {
            if let Some(ts) = leading_canonical_ts(line) {
                if !self.in_range_bytes(ts) {
                    return false;
                }
            }
        }
        let mut backslash = None;
        for needle in &self.needles {
            if needle.find(line).is_none()
                && !*backslash.get_or_insert_with(|| memchr(b'\\', line).is_some())
            {
                return false;
            }
        }
        true
    }

    fn in_range_bytes(&self, ts: &[u8; 24]) -> bool {
        let ge_since = self
            .since
            .as_ref()
            .and_then(|b| b.canon.as_ref())
            .is_none_or(|c| ts >= c);
        let lt_until = self
            .until
            .as_ref()
            .and_then(|b| b.canon.as_ref())
            .is_none_or(|c| ts < c);
        ge_since && lt_until
    }

    /// Whether `ts` is a valid RFC 3339 timestamp (`None` if not) inside the range.
    fn check_ts(&self, ts: &str) -> Option<bool> {
        if let Some(c) = canonical_ts(ts.as_bytes()) {
            if !valid_canonical(c) {
                return None;
            }
            if self.bytewise {
                return Some(self.in_range_bytes(c));
            }
        }
        let t = DateTime::parse_from_rfc3339(ts).ok()?;
        Some(
            self.since.as_ref().is_none_or(|b| t >= b.at)
                && self.until.as_ref().is_none_or(|b| t < b.at),
        )
    }

    fn matches(&self, f: &Fields<'_>) -> bool {
        let is = |field: usize, want: &str| f[field].as_str() == Some(want);
        self.key
            .as_deref()
            .is_none_or(|k| is(KEY_ID, k) || is(KEY_NAME, k))
            && self.tool.as_deref().is_none_or(|t| is(TOOL, t))
            && self.status.is_none_or(|s| is(STATUS, s))
    }
}

/// `{"ts":"<canonical>"` at the very start of the line, as our writer puts it.
fn leading_canonical_ts(line: &[u8]) -> Option<&[u8; 24]> {
    let rest = line.strip_prefix(b"{\"ts\":\"")?;
    if rest.get(24) != Some(&b'"') {
        return None;
    }
    canonical_ts(rest.get(..24)?)
}

/// `Some` if `b` has the shape `DDDD-DD-DDTDD:DD:DD.DDDZ`.
fn canonical_ts(b: &[u8]) -> Option<&[u8; 24]> {
    const SHAPE: &[u8; 24] = b"0000-00-00T00:00:00.000Z"; // '0': any digit
    let b: &[u8; 24] = b.try_into().ok()?;
    // No early exit: branch-free over 24 bytes.
    let shape_ok = b.iter().zip(SHAPE).fold(true, |ok, (&c, &p)| {
        ok & if p == b'0' {
            c.is_ascii_digit()
        } else {
            c == p
        }
    });
    shape_ok.then_some(b)
}

/// Whether a canonical-shaped timestamp is a real instant, exactly as
/// `DateTime::parse_from_rfc3339` decides (second 60 is a leap second).
fn valid_canonical(b: &[u8; 24]) -> bool {
    let num =
        |r: std::ops::Range<usize>| b[r].iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
    let (year, month, day) = (num(0..4), num(5..7), num(8..10));
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&day) && num(11..13) < 24 && num(14..16) < 60 && num(17..19) <= 60
}

// ---------------------------------------------------------------------------
// Line parsing (serde_json, borrowed)
// ---------------------------------------------------------------------------

/// One fixed field of a line.
#[derive(Debug, Clone, Default)]
enum Val<'a> {
    /// The field is not in the line.
    #[default]
    Absent,
    /// JSON `null`.
    Null,
    /// A string, decoded (borrowed unless it had escapes).
    Str(Cow<'a, str>),
    /// Any other value (and any `input_args` / `metadata`), as source text.
    Raw(&'a RawValue),
}

impl Val<'_> {
    fn as_str(&self) -> Option<&str> {
        match self {
            Val::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// The fixed fields of one line, in [`FIXED_FIELDS`] order.
type Fields<'a> = [Val<'a>; 12];

/// Fields that hold a string (or null) in every line our writers produce.
const fn is_string_field(i: usize) -> bool {
    !matches!(i, SCOPES | DURATION_MS | INPUT_ARGS | METADATA)
}

/// Classifies a raw value; `input_args` / `metadata` keep strings as JSON text.
fn val_of(i: usize, raw: &RawValue) -> Val<'_> {
    if raw.get() == "null" {
        return Val::Null;
    }
    if matches!(i, INPUT_ARGS | METADATA) {
        return Val::Raw(raw);
    }
    str_value(raw).map_or(Val::Raw(raw), Val::Str)
}

/// Reads a string or `null` in one step; any other type is an error, upon
/// which the line is parsed again with raw values (see [`parse_line`]).
struct StrSeed;

impl<'de> DeserializeSeed<'de> for StrSeed {
    type Value = Val<'de>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Val<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrSeed {
    type Value = Val<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or null")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Val<'de>, E> {
        Ok(Val::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Val<'de>, E> {
        Ok(Val::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Val<'de>, E> {
        Ok(Val::Null)
    }
}

fn fixed_index(name: &str) -> Option<usize> {
    Some(match name {
        "ts" => 0,
        "key_id" => 1,
        "key_name" => 2,
        "tool" => 3,
        "scopes" => 4,
        "duration_ms" => 5,
        "status" => 6,
        "error" => 7,
        "input_args" => 8,
        "output_preview" => 9,
        "client_ip" => 10,
        "metadata" => 11,
        _ => return None,
    })
}

enum Key<'de> {
    Fixed(usize),
    /// Not a fixed field; the name only when extras are collected.
    Extra(Cow<'de, str>),
}

#[derive(Clone, Copy)]
struct KeySeed {
    keep_name: bool,
}

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key<'de>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Key<'de>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Key<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
        Ok(match fixed_index(v) {
            Some(i) => Key::Fixed(i),
            None if self.keep_name => Key::Extra(Cow::Borrowed(v)),
            None => Key::Extra(Cow::Borrowed("")),
        })
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
        Ok(match fixed_index(v) {
            Some(i) => Key::Fixed(i),
            None if self.keep_name => Key::Extra(Cow::Owned(v.to_owned())),
            None => Key::Extra(Cow::Borrowed("")),
        })
    }
}

/// Visits the top-level object; appends the extras (as `{"k":v,...` without
/// the closing brace) to `extras` when given.
struct LineVisitor<'x, 'de> {
    /// Filled in place (moving a returned array costs more than parsing a field).
    fields: &'x mut Fields<'de>,
    extras: Option<&'x mut Vec<u8>>,
    /// Read string fields with [`StrSeed`] (fails on other types).
    fast: bool,
}

impl<'de> Visitor<'de> for LineVisitor<'_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an audit event object")
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let fields = self.fields;
        let seed = KeySeed {
            keep_name: self.extras.is_some(),
        };
        while let Some(key) = map.next_key_seed(seed)? {
            match key {
                Key::Fixed(i) => {
                    let val = if self.fast && is_string_field(i) {
                        map.next_value_seed(StrSeed)?
                    } else {
                        val_of(i, map.next_value()?)
                    };
                    if !matches!(std::mem::replace(&mut fields[i], val), Val::Absent) {
                        return Err(de::Error::custom(format_args!(
                            "duplicate field {}",
                            FIXED_FIELDS[i]
                        )));
                    }
                }
                Key::Extra(name) => {
                    let value: &'de RawValue = map.next_value()?;
                    if let Some(buf) = self.extras.as_deref_mut() {
                        buf.push(if buf.is_empty() { b'{' } else { b',' });
                        write_json_str(buf, &name);
                        buf.push(b':');
                        push_compact(buf, value.get());
                    }
                }
            }
        }
        Ok(())
    }
}

/// Parses one line. A first pass reads string fields directly; if it fails
/// (a malformed line, or a string field holding a number, array or object),
/// a second pass reads every value raw and decides.
/// Returns `false` if the line is malformed.
fn parse_line<'a>(s: &'a str, fields: &mut Fields<'a>, mut extras: Option<&mut Vec<u8>>) -> bool {
    let mark = extras.as_deref().map_or(0, Vec::len);
    if parse_pass(s, fields, extras.as_deref_mut(), true).is_ok() {
        return true;
    }
    if let Some(buf) = extras.as_deref_mut() {
        buf.truncate(mark);
    }
    *fields = Default::default();
    parse_pass(s, fields, extras, false).is_ok()
}

fn parse_pass<'a>(
    s: &'a str,
    fields: &mut Fields<'a>,
    extras: Option<&mut Vec<u8>>,
    fast: bool,
) -> Result<(), serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(s);
    (&mut de).deserialize_map(LineVisitor {
        fields,
        extras,
        fast,
    })?;
    de.end()
}

/// The decoded value if `raw` is a JSON string; borrowed unless it has escapes.
fn str_value(raw: &RawValue) -> Option<Cow<'_, str>> {
    let s = raw.get();
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    if memchr(b'\\', inner.as_bytes()).is_none() {
        Some(Cow::Borrowed(inner))
    } else {
        serde_json::from_str::<String>(s).ok().map(Cow::Owned)
    }
}

/// Appends valid JSON text without the whitespace outside strings; with
/// `double_quotes`, every `"` is written twice (for a quoted CSV cell).
fn push_json_text(buf: &mut Vec<u8>, src: &str, double_quotes: bool) {
    let b = src.as_bytes();
    let (mut i, mut seg) = (0, 0); // b[seg..i] is pending output
    while i < b.len() {
        match b[i] {
            b'"' => {
                // Copy through the opening quote, then jump string body by body.
                if double_quotes {
                    buf.extend_from_slice(&b[seg..=i]);
                    seg = i; // the quote is written again: doubled
                }
                i += 1;
                loop {
                    let Some(k) = memchr2(b'"', b'\\', &b[i..]) else {
                        i = b.len(); // unterminated: cannot happen in validated JSON
                        break;
                    };
                    let at = i + k;
                    if b[at] == b'"' {
                        i = at;
                        break;
                    }
                    // An escape: `\"` needs its quote doubled too.
                    if double_quotes && b.get(at + 1) == Some(&b'"') {
                        buf.extend_from_slice(&b[seg..=at + 1]);
                        seg = at + 1;
                    }
                    i = (at + 2).min(b.len());
                }
                if i < b.len() && double_quotes {
                    buf.extend_from_slice(&b[seg..=i]);
                    seg = i;
                }
                i += 1;
            }
            b' ' | b'\t' | b'\n' | b'\r' => {
                buf.extend_from_slice(&b[seg..i]);
                i += 1;
                seg = i;
            }
            _ => i += 1,
        }
    }
    buf.extend_from_slice(&b[seg.min(b.len())..]);
}

/// Appends valid JSON text without the whitespace outside strings.
fn push_compact(buf: &mut Vec<u8>, src: &str) {
    push_json_text(buf, src, false);
}

// ---------------------------------------------------------------------------
// Per-line work and output
// ---------------------------------------------------------------------------

struct Engine<'w, W: Write> {
    filter: Compiled,
    format: OutputFormat,
    out: &'w mut W,
    out_buf: Vec<u8>,
    /// Scratch for the extras object (CSV).
    extras: Vec<u8>,
    /// Scratch for a joined cell (CSV scopes).
    cell: Vec<u8>,
    stats: ScanStats,
}

impl<'w, W: Write> Engine<'w, W> {
    fn new(filter: Compiled, format: OutputFormat, out: &'w mut W) -> Self {
        Engine {
            filter,
            format,
            out,
            out_buf: Vec::with_capacity(OUT_FLUSH_BYTES + (64 << 10)),
            extras: Vec::new(),
            cell: Vec::new(),
            stats: ScanStats::default(),
        }
    }

    fn line(&mut self, raw: &[u8]) -> Result<Flow, ScanError> {
        self.stats.lines += 1;
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.first() != Some(&b'{') && line.iter().all(|&b| matches!(b, b' ' | b'\t' | b'\r')) {
            return Ok(Flow::Go); // blank
        }
        if !self.filter.may_match(line) {
            return Ok(Flow::Go);
        }
        let Ok(text) = std::str::from_utf8(line) else {
            self.stats.malformed += 1;
            return Ok(Flow::Go);
        };
        let csv = matches!(self.format, OutputFormat::Csv { .. });
        self.extras.clear();
        let mut fields: Fields<'_> = Default::default();
        if !parse_line(text, &mut fields, csv.then_some(&mut self.extras)) {
            self.stats.malformed += 1;
            return Ok(Flow::Go);
        }
        let Some(ts) = fields[TS].as_str() else {
            self.stats.malformed += 1;
            return Ok(Flow::Go);
        };
        match self.filter.check_ts(ts) {
            None => {
                self.stats.malformed += 1;
                return Ok(Flow::Go);
            }
            Some(false) => return Ok(Flow::Go),
            Some(true) => {}
        }
        if !self.filter.matches(&fields) {
            return Ok(Flow::Go);
        }
        if csv {
            if !self.extras.is_empty() {
                self.extras.push(b'}');
            }
            write_csv_row(&mut self.out_buf, &mut self.cell, &fields, &self.extras);
        } else {
            self.out_buf.extend_from_slice(line);
            self.out_buf.push(b'\n');
        }
        self.stats.matched += 1;
        if self.out_buf.len() >= OUT_FLUSH_BYTES {
            self.flush_buf()?;
        }
        if self.filter.limit.is_some_and(|l| self.stats.matched >= l) {
            return Ok(Flow::Stop);
        }
        Ok(Flow::Go)
    }

    fn flush_buf(&mut self) -> Result<(), ScanError> {
        self.out
            .write_all(&self.out_buf)
            .map_err(|source| ScanError::Write { source })?;
        self.out_buf.clear();
        if self.out_buf.capacity() > 4 * OUT_FLUSH_BYTES {
            self.out_buf.shrink_to(OUT_FLUSH_BYTES + (64 << 10)); // after a huge line
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ScanError> {
        self.flush_buf()?;
        self.out
            .flush()
            .map_err(|source| ScanError::Write { source })
    }

    fn finish(mut self, progress: &mut dyn FnMut(u64) -> bool) -> Result<ScanStats, ScanError> {
        self.flush()?;
        // The work is done: a `false` here changes nothing.
        let _ = progress(self.stats.bytes_read);
        Ok(self.stats)
    }
}

/// First characters a spreadsheet may run as a formula.
fn needs_guard(cell: &[u8]) -> bool {
    matches!(
        cell.first(),
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r')
    )
}

/// Appends one cell, quoted per RFC 4180 if needed, with `'` first if `guard`.
fn push_cell(out: &mut Vec<u8>, cell: &[u8], guard: bool) {
    let guard = guard && needs_guard(cell);
    // No early exit: this form vectorises, and cells are short.
    let quote = cell
        .iter()
        .fold(false, |q, &c| q | matches!(c, b',' | b'"' | b'\n' | b'\r'));
    if !quote {
        if guard {
            out.push(b'\'');
        }
        out.extend_from_slice(cell);
        return;
    }
    out.push(b'"');
    if guard {
        out.push(b'\'');
    }
    let mut rest = cell;
    while let Some(i) = memchr(b'"', rest) {
        out.extend_from_slice(&rest[..=i]);
        out.push(b'"');
        rest = &rest[i + 1..];
    }
    out.extend_from_slice(rest);
    out.push(b'"');
}

/// Compact JSON text, unguarded; quoted if it holds a quote or a comma
/// (after compaction it has no raw CR or LF).
fn push_json_cell(out: &mut Vec<u8>, text: &str) {
    if memchr2(b'"', b',', text.as_bytes()).is_some() {
        out.push(b'"');
        push_json_text(out, text, true);
        out.push(b'"');
    } else {
        push_compact(out, text);
    }
}

/// Joins an array's elements with one space (strings decoded, others compact).
struct JoinVisitor<'x>(&'x mut Vec<u8>);

impl<'de> Visitor<'de> for JoinVisitor<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut first = true;
        while let Some(el) = seq.next_element::<&'de RawValue>()? {
            if !first {
                self.0.push(b' ');
            }
            first = false;
            match str_value(el) {
                Some(s) => self.0.extend_from_slice(s.as_bytes()),
                None if el.get() == "null" => {}
                None => push_compact(self.0, el.get()),
            }
        }
        Ok(())
    }
}

/// `scopes` given as an array.
fn push_scopes_cell(out: &mut Vec<u8>, cell: &mut Vec<u8>, raw: &RawValue) {
    cell.clear();
    let mut de = serde_json::Deserializer::from_str(raw.get());
    if (&mut de).deserialize_seq(JoinVisitor(cell)).is_err() {
        // Cannot happen for a validated array; keep the source text then.
        cell.clear();
        push_compact(cell, raw.get());
    }
    push_cell(out, cell, true);
}

fn write_csv_row(out: &mut Vec<u8>, cell: &mut Vec<u8>, fields: &Fields<'_>, extras: &[u8]) {
    for (i, val) in fields.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match val {
            Val::Absent | Val::Null => {}
            Val::Str(s) => push_cell(out, s.as_bytes(), true),
            Val::Raw(raw) if i == SCOPES && raw.get().starts_with('[') => {
                push_scopes_cell(out, cell, raw);
            }
            Val::Raw(raw) => push_json_cell(out, raw.get()),
        }
    }
    out.push(b',');
    push_cell(out, extras, false);
    out.extend_from_slice(b"\r\n");
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing unwrap is a failing test")]
mod tests {
    use super::*;
    use crate::audit::{write_line, AuditEvent, RawJson};
    use chrono::TimeZone;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn at(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(ms).single().unwrap()
    }

    /// 2026-03-09T14:00:00.000Z
    const BASE_MS: i64 = 1_773_064_800_000;

    fn ev(key_id: &str, key_name: &str, tool: &str, status: Status, ms: i64) -> AuditEvent {
        let mut e = AuditEvent::new(key_id, key_name, tool, status);
        e.ts = at(BASE_MS + ms);
        e.scopes = vec!["read".into(), "write".into()];
        e.duration_ms = 12.5;
        e
    }

    fn lines_of(events: &[AuditEvent]) -> Vec<u8> {
        let mut buf = Vec::new();
        for e in events {
            write_line(&mut buf, e);
        }
        buf
    }

    fn tiny() -> Tuning {
        Tuning {
            chunk: 7,
            max_line: 4096,
            progress_every: 1 << 40,
        }
    }

    fn run_with(
        input: &[u8],
        f: &ScanFilter,
        format: OutputFormat,
        t: Tuning,
    ) -> (String, ScanStats) {
        let mut out = Vec::new();
        let (stats, _) = run(input, f, format, &mut out, &mut |_| true, t).unwrap();
        (String::from_utf8(out).unwrap(), stats)
    }

    /// JSONL scan with default and tiny buffers; asserts they agree.
    fn query(input: &[u8], f: &ScanFilter) -> (Vec<String>, ScanStats) {
        let (a, sa) = run_with(input, f, OutputFormat::Jsonl, Tuning::DEFAULT);
        let (b, mut sb) = run_with(input, f, OutputFormat::Jsonl, tiny());
        if f.limit.is_some() {
            sb.bytes_read = sa.bytes_read; // reading may run ahead of the last match
        }
        assert_eq!((&a, sa), (&b, sb), "buffer size changed the result");
        (a.lines().map(str::to_owned).collect(), sa)
    }

    fn csv(input: &[u8], f: &ScanFilter, header: bool) -> (String, ScanStats) {
        let (a, sa) = run_with(input, f, OutputFormat::Csv { header }, Tuning::DEFAULT);
        let (b, mut sb) = run_with(input, f, OutputFormat::Csv { header }, tiny());
        if f.limit.is_some() {
            sb.bytes_read = sa.bytes_read;
        }
        assert_eq!((&a, sa), (&b, sb));
        (a, sa)
    }

    /// Minimal RFC 4180 reader (CRLF rows) for checking our output.
    fn parse_csv(text: &str) -> Vec<Vec<String>> {
        let mut rows = Vec::new();
        let (mut row, mut cell) = (Vec::new(), String::new());
        let mut chars = text.chars().peekable();
        let mut quoted = false;
        while let Some(c) = chars.next() {
            if quoted {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        cell.push('"');
                    } else {
                        quoted = false;
                    }
                } else {
                    cell.push(c);
                }
            } else if c == '"' {
                quoted = true;
            } else if c == ',' {
                row.push(std::mem::take(&mut cell));
            } else if c == '\r' && chars.peek() == Some(&'\n') {
                chars.next();
                row.push(std::mem::take(&mut cell));
                rows.push(std::mem::take(&mut row));
            } else {
                cell.push(c);
            }
        }
        assert!(cell.is_empty() && row.is_empty(), "unterminated row");
        rows
    }

    fn key_of(line: &str) -> String {
        let v: Value = serde_json::from_str(line).unwrap();
        v["key_id"].as_str().unwrap().to_owned()
    }

    fn golden() -> Vec<u8> {
        lines_of(&[
            ev("k1", "alice", "get_data", Status::Ok, 0),
            ev("k2", "bob", "get_data", Status::Ok, 1),
            ev("k3", "alice", "put_data", Status::Error, 2),
            ev("alice", "carol", "get_data", Status::RateLimited, 3),
            ev("k5", "alice", "get_data", Status::Ok, 4),
        ])
    }

    fn keys(lines: &[String]) -> Vec<String> {
        lines.iter().map(|l| key_of(l)).collect()
    }

    // ---- filters on golden lines ----

    #[test]
    fn no_filter_copies_every_line_byte_for_byte() {
        let input = golden();
        let (lines, stats) = query(&input, &ScanFilter::default());
        assert_eq!(
            lines.join("\n") + "\n",
            String::from_utf8(input.clone()).unwrap()
        );
        assert_eq!(
            stats,
            ScanStats {
                lines: 5,
                matched: 5,
                malformed: 0,
                bytes_read: input.len() as u64
            }
        );
    }

    #[test]
    fn several_files_scan_as_one_log() {
        let dir = tempfile::tempdir().unwrap();
        let input = golden();
        let text = String::from_utf8(input.clone()).unwrap();
        let all: Vec<&str> = text.lines().collect();
        let a = dir.path().join("a.jsonl");
        let b = dir.path().join("b.jsonl");
        let c = dir.path().join("c.jsonl");
        // The first file's last line lacks its newline (torn): it stays one line.
        std::fs::write(&a, format!("{}\n{}", all[0], all[1])).unwrap();
        std::fs::write(&b, "").unwrap();
        std::fs::write(&c, format!("{}\n", all[2..].join("\n"))).unwrap();
        let paths = [a.clone(), b, c];
        let mut out = Vec::new();
        let stats = scan_paths(
            &paths,
            &ScanFilter::default(),
            OutputFormat::Jsonl,
            &mut out,
            &mut |_| true,
        )
        .unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), text);
        assert_eq!((stats.lines, stats.matched), (5, 5));
        // `limit` spans the files.
        let f = ScanFilter {
            limit: Some(3),
            ..ScanFilter::default()
        };
        let mut out = Vec::new();
        let stats = scan_paths(&paths, &f, OutputFormat::Jsonl, &mut out, &mut |_| true).unwrap();
        assert_eq!(stats.matched, 3);
        // A missing file is refused before anything is written, naming it.
        let missing = dir.path().join("gone.jsonl");
        let err = scan_paths(
            &[a, missing.clone()],
            &ScanFilter::default(),
            OutputFormat::Jsonl,
            &mut Vec::new(),
            &mut |_| true,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn key_matches_key_id_or_key_name() {
        let f = ScanFilter {
            key: Some("alice".into()),
            ..ScanFilter::default()
        };
        assert_eq!(keys(&query(&golden(), &f).0), ["k1", "k3", "alice", "k5"]);
        let f = ScanFilter {
            key: Some("k2".into()),
            ..ScanFilter::default()
        };
        assert_eq!(keys(&query(&golden(), &f).0), ["k2"]);
        let f = ScanFilter {
            key: Some("alic".into()),
            ..ScanFilter::default()
        };
        assert!(query(&golden(), &f).0.is_empty());
    }

    #[test]
    fn tool_and_status_filters_alone() {
        let f = ScanFilter {
            tool: Some("get_data".into()),
            ..ScanFilter::default()
        };
        assert_eq!(keys(&query(&golden(), &f).0), ["k1", "k2", "alice", "k5"]);
        let f = ScanFilter {
            status: Some(Status::Ok),
            ..ScanFilter::default()
        };
        assert_eq!(keys(&query(&golden(), &f).0), ["k1", "k2", "k5"]);
        let f = ScanFilter {
            status: Some(Status::RateLimited),
            ..ScanFilter::default()
        };
        assert_eq!(keys(&query(&golden(), &f).0), ["alice"]);
    }

    #[test]
    fn combined_filters_are_anded() {
        let f = ScanFilter {
            key: Some("alice".into()),
            tool: Some("get_data".into()),
            status: Some(Status::Ok),
            ..ScanFilter::default()
        };
        let (lines, stats) = query(&golden(), &f);
        assert_eq!(keys(&lines), ["k1", "k5"]);
        assert_eq!((stats.lines, stats.matched, stats.malformed), (5, 2, 0));
        let f = ScanFilter {
            since: Some(at(BASE_MS + 1)),
            ..f
        };
        assert_eq!(keys(&query(&golden(), &f).0), ["k5"]);
    }

    #[test]
    fn since_is_inclusive_and_until_exclusive() {
        let f = ScanFilter {
            since: Some(at(BASE_MS + 1)),
            until: Some(at(BASE_MS + 3)),
            ..ScanFilter::default()
        };
        assert_eq!(keys(&query(&golden(), &f).0), ["k2", "k3"]);
        let f = ScanFilter {
            since: Some(at(BASE_MS + 4)),
            ..ScanFilter::default()
        };
        assert_eq!(keys(&query(&golden(), &f).0), ["k5"]);
        let f = ScanFilter {
            until: Some(at(BASE_MS)),
            ..ScanFilter::default()
        };
        assert!(query(&golden(), &f).0.is_empty());
    }

    #[test]
    fn sub_millisecond_bounds_compare_as_instants() {
        let input = golden(); // ts at .000, .001, .002, ...
        let half = |ms: i64| at(BASE_MS + ms) + TimeDelta::microseconds(500);
        // since .0015: .001 is before it, .002 is after.
        let f = ScanFilter {
            since: Some(half(1)),
            until: Some(half(2)), // until .0025 keeps .002
            ..ScanFilter::default()
        };
        assert_eq!(keys(&query(&input, &f).0), ["k3"]);
    }

    const LEGACY: &str = concat!(
        r#"{"ts": "2026-03-09T14:00:00.000500+00:00", "key_id": "k1", "key_name": "alice", "tool": "get_data", "scopes": ["read", "write"], "duration_ms": 1.25, "status": "ok", "error": null, "input_args": {"q": "x y", "n": 1}, "output_preview": null, "client_ip": "10.0.0.1", "metadata": {}}"#,
        "\n",
        r#"{"status": "ok", "tool": "get_data", "key_name": "alice", "key_id": "k2", "ts": "2026-03-09T16:00:00.002+02:00"}"#,
        "\n",
        r#"  { "ts" : "2026-03-09T14:00:00.003Z" , "key_id":"k3","key_name":"al\u0069ce","tool":"get\u005fdata","status":"\u006fk" }  "#,
        "\n",
    );

    #[test]
    fn legacy_and_hand_written_lines_match_in_any_order_and_spelling() {
        let f = ScanFilter {
            key: Some("alice".into()),
            tool: Some("get_data".into()),
            status: Some(Status::Ok),
            ..ScanFilter::default()
        };
        let (lines, stats) = query(LEGACY.as_bytes(), &f);
        assert_eq!(keys(&lines), ["k1", "k2", "k3"]);
        assert_eq!(stats.malformed, 0);
        // Each line is copied byte for byte, spaces included.
        assert_eq!(lines.join("\n") + "\n", LEGACY);
    }

    #[test]
    fn time_bounds_on_legacy_timestamps() {
        // k1 at .0005, k2 at .002 (written +02:00), k3 at .003Z
        let f = ScanFilter {
            since: Some(at(BASE_MS)),
            until: Some(at(BASE_MS + 2)),
            ..ScanFilter::default()
        };
        assert_eq!(keys(&query(LEGACY.as_bytes(), &f).0), ["k1"]);
        let f = ScanFilter {
            since: Some(at(BASE_MS) + TimeDelta::microseconds(501)),
            until: Some(at(BASE_MS + 3)),
            ..ScanFilter::default()
        };
        assert_eq!(keys(&query(LEGACY.as_bytes(), &f).0), ["k2"]);
        let f = ScanFilter {
            since: Some(at(BASE_MS) + TimeDelta::microseconds(500)),
            until: Some(at(BASE_MS) + TimeDelta::microseconds(501)),
            ..ScanFilter::default()
        };
        assert_eq!(keys(&query(LEGACY.as_bytes(), &f).0), ["k1"]);
    }

    #[test]
    fn escaped_needles_match_decoded_values() {
        let input = concat!(
            r#"{"ts":"2026-03-09T14:00:00.000Z","key_id":"a\"b","tool":"caf\u00e9","status":"ok"}"#,
            "\n",
            r#"{"ts":"2026-03-09T14:00:00.000Z","key_id":"x","tool":"café","status":"ok"}"#,
            "\n",
            r#"{"ts":"2026-03-09T14:00:00.000Z","key_id":"a\\b","tool":"cafe","status":"ok"}"#,
            "\n",
        );
        let f = ScanFilter {
            key: Some("a\"b".into()),
            ..ScanFilter::default()
        };
        assert_eq!(query(input.as_bytes(), &f).0.len(), 1);
        let f = ScanFilter {
            tool: Some("café".into()),
            ..ScanFilter::default()
        };
        assert_eq!(keys(&query(input.as_bytes(), &f).0), ["a\"b", "x"]);
        let f = ScanFilter {
            key: Some("a\\b".into()),
            ..ScanFilter::default()
        };
        assert_eq!(keys(&query(input.as_bytes(), &f).0), ["a\\b"]);
    }

    #[test]
    fn non_string_values_never_match_a_string_filter() {
        let input = br#"{"ts":"2026-03-09T14:00:00.000Z","key_id":7,"key_name":null,"tool":["x"],"status":"ok"}
"#;
        for f in [
            ScanFilter {
                key: Some("7".into()),
                ..ScanFilter::default()
            },
            ScanFilter {
                tool: Some("x".into()),
                ..ScanFilter::default()
            },
        ] {
            let (lines, stats) = query(input, &f);
            assert!(lines.is_empty());
            assert_eq!(stats.malformed, 0);
        }
    }

    #[test]
    fn limit_stops_after_n_matches() {
        let f = ScanFilter {
            key: Some("alice".into()),
            limit: Some(2),
            ..ScanFilter::default()
        };
        let (lines, stats) = query(&golden(), &f);
        assert_eq!(keys(&lines), ["k1", "k3"]);
        assert_eq!((stats.lines, stats.matched), (3, 2));
        let f = ScanFilter {
            limit: Some(0),
            ..ScanFilter::default()
        };
        let (lines, stats) = query(&golden(), &f);
        assert!(lines.is_empty());
        assert_eq!(stats, ScanStats::default());
        let (text, _) = csv(&golden(), &f, true);
        assert_eq!(text, CSV_COLUMNS.join(",") + "\r\n");
    }

    #[test]
    fn empty_time_range_is_an_error_naming_both_bounds() {
        let f = ScanFilter {
            since: Some(at(BASE_MS)),
            until: Some(at(BASE_MS)),
            ..ScanFilter::default()
        };
        let err = scan(
            &b""[..],
            &f,
            OutputFormat::Jsonl,
            &mut Vec::new(),
            &mut |_| true,
        )
        .unwrap_err();
        assert!(matches!(err, ScanError::EmptyRange { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("2026-03-09T14:00:00.000Z") && msg.contains("swap"),
            "{msg}"
        );
    }

    // ---- malformed, blank, torn, long ----

    #[test]
    fn malformed_lines_are_counted_not_fatal() {
        let good = String::from_utf8(golden()).unwrap();
        let mut input = Vec::new();
        input.extend_from_slice(good.lines().next().unwrap().as_bytes());
        input.extend_from_slice(b"\n\n   \n\t\r\n");
        input.extend_from_slice(b"not json\n");
        input.extend_from_slice(b"[1,2]\n");
        input.extend_from_slice(b"{\"key_id\":\"k\"}\n"); // no ts
        input.extend_from_slice(b"{\"ts\":17}\n");
        input.extend_from_slice(b"{\"ts\":\"2026-13-09T14:00:00.000Z\"}\n");
        input.extend_from_slice(b"{\"ts\":\"2026-02-30T14:00:00.000Z\"}\n");
        input.extend_from_slice(b"{\"ts\":\"yesterday\"}\n");
        input.extend_from_slice(
            b"{\"ts\":\"2026-03-09T14:00:00.000Z\",\"ts\":\"2026-03-09T14:00:00.000Z\"}\n",
        );
        input.extend_from_slice(b"{\"ts\":\"2026-03-09T14:00:00.000Z\"} x\n");
        input.extend_from_slice(b"{\"ts\":\"2026-03-09T14:00:00.000Z\",\"k\":\"\xff\"}\n");
        input.extend_from_slice(b"{\"ts\":\"2026-03-09T14:00:00.000Z\",\"k\":\"\xff\"\n");
        input.extend_from_slice(b"{\"ts\":\"2026-03-09T14:00:00.000Z\"}\r\n"); // CRLF: fine
        input.extend_from_slice(b"{\"ts\":\"2026-03-09T14:00:00.000Z\",\"to"); // torn
        let (lines, stats) = query(&input, &ScanFilter::default());
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1], "{\"ts\":\"2026-03-09T14:00:00.000Z\"}");
        assert_eq!(stats.lines, 17); // 4 of them blank
        assert_eq!(stats.malformed, 12);
        assert_eq!(stats.matched, 2);
    }

    #[test]
    fn torn_final_line_is_processed() {
        let mut input = golden();
        input.pop(); // no final newline
        let (lines, stats) = query(&input, &ScanFilter::default());
        assert_eq!(stats.matched, 5);
        assert_eq!(keys(&lines)[4], "k5");
    }

    #[test]
    fn filter_skips_unparsed_malformed_lines_but_counts_candidates() {
        let input = b"garbage\n{\"ts\":\"bad\",\"key_id\":\"alice\"}\nal\\ice\n";
        let f = ScanFilter {
            key: Some("alice".into()),
            ..ScanFilter::default()
        };
        let (lines, stats) = query(input, &f);
        assert!(lines.is_empty());
        // "garbage" cannot match and is not parsed; the other two are candidates.
        assert_eq!((stats.lines, stats.malformed), (3, 2));
    }

    fn long_line(len: usize) -> Vec<u8> {
        let mut l = b"{\"ts\":\"2026-03-09T14:00:00.000Z\",\"pad\":\"".to_vec();
        let pad = len - l.len() - 2;
        l.resize(l.len() + pad, b'x');
        l.extend_from_slice(b"\"}");
        assert_eq!(l.len(), len);
        l
    }

    #[test]
    fn over_long_lines_are_malformed_at_the_exact_limit() {
        let max = 300;
        for chunk in [1, 7, 64, 299, 300, 301, 1000] {
            let t = Tuning {
                chunk,
                max_line: max,
                progress_every: 1 << 40,
            };
            let mut input = long_line(max);
            input.push(b'\n');
            input.extend_from_slice(&long_line(max + 1));
            input.push(b'\n');
            input.extend_from_slice(&long_line(5 * max));
            input.push(b'\n');
            input.extend_from_slice(&long_line(max - 1));
            input.push(b'\n');
            input.extend_from_slice(&long_line(max + 1)); // over-long and torn at EOF
            let mut out = Vec::new();
            let (stats, peak) = run(
                &input[..],
                &ScanFilter::default(),
                OutputFormat::Jsonl,
                &mut out,
                &mut |_| true,
                t,
            )
            .unwrap();
            assert_eq!(
                (stats.lines, stats.matched, stats.malformed),
                (5, 2, 3),
                "chunk {chunk}"
            );
            assert!(peak <= max + 1, "buffer grew to {peak}");
            let out = String::from_utf8(out).unwrap();
            let lens: Vec<usize> = out.lines().map(str::len).collect();
            assert_eq!(lens, [max, max - 1]);
        }
    }

    /// Yields `len` bytes of one giant line, then a newline and a good line.
    struct Giant {
        left: usize,
        tail: &'static [u8],
    }

    impl Read for Giant {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.left > 0 {
                let n = self.left.min(buf.len());
                buf[..n].fill(b'x');
                buf[0] = b'{';
                self.left -= n;
                return Ok(n);
            }
            let n = self.tail.len().min(buf.len());
            buf[..n].copy_from_slice(&self.tail[..n]);
            self.tail = &self.tail[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_line_over_16_mib_is_skipped_in_bounded_memory() {
        let input = Giant {
            left: 40 << 20,
            tail: b"\n{\"ts\":\"2026-03-09T14:00:00.000Z\"}\n",
        };
        let mut out = Vec::new();
        let (stats, peak) = run(
            input,
            &ScanFilter::default(),
            OutputFormat::Jsonl,
            &mut out,
            &mut |_| true,
            Tuning::DEFAULT,
        )
        .unwrap();
        assert_eq!((stats.lines, stats.matched, stats.malformed), (2, 1, 1));
        assert_eq!(peak, MAX_LINE_BYTES + 1);
        assert_eq!(out, b"{\"ts\":\"2026-03-09T14:00:00.000Z\"}\n");
    }

    // ---- CSV ----

    #[test]
    fn csv_header_rows_and_cells() {
        let mut e = ev("k1", "alice", "get_data", Status::Error, 0);
        e.error = Some("boom, \"bad\"\nline 2".into());
        e.input_args = Some(json!({"q": "x, y", "n": [1, 2]}).into());
        e.client_ip = Some("10.0.0.1".into());
        let mut extra = serde_json::Map::new();
        extra.insert("actor".into(), json!("admin"));
        extra.insert("retry_after".into(), json!(3));
        e.extra = RawJson::extra(&extra);
        let plain = ev("k2", "bob", "t", Status::Ok, 1);
        let (text, stats) = csv(&lines_of(&[e, plain]), &ScanFilter::default(), true);
        assert_eq!(stats.matched, 2);
        assert!(text.ends_with("\r\n"));
        let rows = parse_csv(&text);
        assert_eq!(rows[0], CSV_COLUMNS);
        assert_eq!(
            rows[1],
            [
                "2026-03-09T14:00:00.000Z",
                "k1",
                "alice",
                "get_data",
                "read write",
                "12.5",
                "error",
                "boom, \"bad\"\nline 2",
                r#"{"n":[1,2],"q":"x, y"}"#,
                "",
                "10.0.0.1",
                "{}",
                r#"{"actor":"admin","retry_after":3}"#,
            ]
        );
        // null / absent cells are empty; no extras -> empty last cell.
        assert_eq!(rows[2][7..], ["", "", "", "", "{}", ""]);
        assert_eq!(rows.len(), 3);
    }

    #[test]
    fn csv_keeps_source_text_compacts_json_and_decodes_strings() {
        let input = concat!(
            r#"{"extra_b": {"a": [1, 2.50]}, "ts": "2026-03-09T14:00:00.000Z", "key_id": "caf\u00e9", "#,
            r#""scopes": ["a\tb", "c"], "duration_ms": 12.50, "input_args": {"s": "x  y"}, "metadata": null, "z": null, "\u0061": "\n"}"#,
            "\n"
        );
        let (text, _) = csv(input.as_bytes(), &ScanFilter::default(), false);
        let rows = parse_csv(&text);
        let r = &rows[0];
        assert_eq!(r[1], "café");
        assert_eq!(r[2], "");
        assert_eq!(r[4], "a\tb c");
        assert_eq!(r[5], "12.50");
        assert_eq!(r[8], r#"{"s":"x  y"}"#);
        assert_eq!(r[11], "");
        assert_eq!(r[12], r#"{"extra_b":{"a":[1,2.50]},"z":null,"a":"\n"}"#);
    }

    #[test]
    fn csv_json_cells_double_every_quote_and_drop_outer_whitespace() {
        let mut out = Vec::new();
        push_json_cell(&mut out, r#"{ "a" : "x\"y, z" , "b" : [ 1 , null ] }"#);
        out.push(b'|');
        push_json_cell(&mut out, "12.50");
        out.push(b'|');
        push_json_cell(&mut out, "[ 1 , 2 ]");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#""{""a"":""x\""y, z"",""b"":[1,null]}"|12.50|"[1,2]""#
        );
    }

    #[test]
    fn csv_odd_types_fall_back_to_raw_values_without_duplicating_extras() {
        let input = concat!(
            r#"{"actor":"x","ts":"2026-03-09T14:00:00.000Z","key_id":7,"key_name":"n\"q","#,
            r#""scopes":"one","duration_ms":"12","status":true,"error":{"code":1}}"#,
            "\n"
        );
        let (text, stats) = csv(input.as_bytes(), &ScanFilter::default(), false);
        assert_eq!(stats.malformed, 0);
        let r = &parse_csv(&text)[0];
        assert_eq!(r[1], "7");
        assert_eq!(r[2], "n\"q");
        assert_eq!(r[4], "one");
        assert_eq!(r[5], "12");
        assert_eq!(r[6], "true");
        assert_eq!(r[7], r#"{"code":1}"#);
        assert_eq!(r[12], r#"{"actor":"x"}"#);
    }

    #[test]
    fn crlf_lines_are_read_like_lf_lines() {
        let input = golden();
        let crlf: Vec<u8> = input
            .split_inclusive(|&b| b == b'\n')
            .flat_map(|l| [&l[..l.len() - 1], b"\r\n"].concat())
            .collect();
        let (lines, stats) = query(&crlf, &ScanFilter::default());
        assert_eq!(stats.matched, 5);
        assert_eq!(lines.join("\n") + "\n", String::from_utf8(input).unwrap());
    }

    #[test]
    fn csv_quotes_exactly_the_cells_that_need_it() {
        let mut out = Vec::new();
        for cell in ["plain", "a,b", "a\"b", "a\nb", "a\rb", ""] {
            push_cell(&mut out, cell.as_bytes(), false);
            out.push(b'|');
        }
        assert_eq!(out, b"plain|\"a,b\"|\"a\"\"b\"|\"a\nb\"|\"a\rb\"||");
    }

    #[test]
    fn csv_injection_guard_on_string_cells_only() {
        let mut e = ev("=cmd|' /C calc'!A0", "+x", "-y", Status::Ok, 0);
        e.error = Some("@SUM(1)".into());
        e.output_preview = Some("\tz".into());
        e.client_ip = Some("\r1,2".into());
        e.scopes = vec!["-admin".into()];
        e.input_args = Some(json!(-5).into());
        e.metadata = Some(json!("=not a cell string").into());
        let (text, _) = csv(&lines_of(&[e]), &ScanFilter::default(), false);
        let r = &parse_csv(&text)[0];
        assert_eq!(r[1], "'=cmd|' /C calc'!A0");
        assert_eq!(r[2], "'+x");
        assert_eq!(r[3], "'-y");
        assert_eq!(r[4], "'-admin");
        assert_eq!(r[7], "'@SUM(1)");
        assert_eq!(r[9], "'\tz");
        assert_eq!(r[10], "'\r1,2");
        assert_eq!(r[8], "-5"); // JSON text, not a string value
        assert_eq!(r[11], "\"=not a cell string\""); // JSON text keeps its quotes
        assert_eq!(r[0], "2026-03-09T14:00:00.000Z");
    }

    #[test]
    fn csv_filter_applies_like_jsonl() {
        let f = ScanFilter {
            key: Some("alice".into()),
            status: Some(Status::Ok),
            ..ScanFilter::default()
        };
        let (text, stats) = csv(&golden(), &f, false);
        let rows = parse_csv(&text);
        assert_eq!(stats.matched, 2);
        assert_eq!(
            rows.iter().map(|r| r[1].as_str()).collect::<Vec<_>>(),
            ["k1", "k5"]
        );
    }

    // ---- progress and interruption ----

    #[test]
    fn progress_is_reported_and_can_interrupt() {
        let input: Vec<u8> = (0..200)
            .flat_map(|i| lines_of(&[ev(&format!("k{i}"), "n", "t", Status::Ok, i)]))
            .collect();
        let t = Tuning {
            chunk: 1000,
            max_line: 4096,
            progress_every: 5000,
        };
        let mut seen = Vec::new();
        let mut out = Vec::new();
        let (stats, _) = run(
            &input[..],
            &ScanFilter::default(),
            OutputFormat::Jsonl,
            &mut out,
            &mut |b| {
                seen.push(b);
                true
            },
            t,
        )
        .unwrap();
        assert_eq!(*seen.last().unwrap(), input.len() as u64);
        assert!(seen.windows(2).all(|w| w[0] <= w[1]));
        assert!(seen.windows(2).all(|w| w[1] - w[0] <= 6000), "{seen:?}");
        assert_eq!(seen.len() as u64, input.len() as u64 / 5000 + 1);
        assert_eq!(stats.matched, 200);

        let mut calls = 0;
        let mut out = Vec::new();
        let err = run(
            &input[..],
            &ScanFilter::default(),
            OutputFormat::Jsonl,
            &mut out,
            &mut |_| {
                calls += 1;
                calls < 3
            },
            t,
        )
        .unwrap_err();
        let ScanError::Interrupted { stats } = err else {
            panic!("{err:?}")
        };
        assert_eq!(calls, 3);
        assert!(stats.bytes_read >= 15_000 && stats.bytes_read < input.len() as u64);
        // What was written is whole lines, flushed.
        let out = String::from_utf8(out).unwrap();
        assert_eq!(out.lines().count() as u64, stats.matched);
        assert!(stats.matched > 0 && out.ends_with('\n'));
        assert!(ScanError::Interrupted { stats }
            .to_string()
            .contains("interrupted"));
    }

    struct FailingReader(usize);

    impl Read for FailingReader {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::other("disk on fire"));
            }
            self.0 -= 1;
            buf[0] = b'\n';
            Ok(1)
        }
    }

    struct FailingWriter;

    impl Write for FailingWriter {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn io_errors_are_typed() {
        let err = scan(
            FailingReader(3),
            &ScanFilter::default(),
            OutputFormat::Jsonl,
            &mut Vec::new(),
            &mut |_| true,
        )
        .unwrap_err();
        assert!(
            matches!(err, ScanError::Read { bytes_read: 3, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("disk on fire"));
        let err = scan(
            &golden()[..],
            &ScanFilter::default(),
            OutputFormat::Jsonl,
            &mut FailingWriter,
            &mut |_| true,
        )
        .unwrap_err();
        let ScanError::Write { source } = err else {
            panic!("{err:?}")
        };
        assert_eq!(source.kind(), io::ErrorKind::BrokenPipe);
    }

    // ---- scan_path ----

    #[test]
    fn scan_path_reads_files_and_names_the_path_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.jsonl");
        std::fs::write(&file, golden()).unwrap();
        let mut out = Vec::new();
        let stats = scan_path(
            &file,
            &ScanFilter::default(),
            OutputFormat::Jsonl,
            &mut out,
            &mut |_| true,
        )
        .unwrap();
        assert_eq!(stats.matched, 5);
        assert_eq!(out, golden());

        let missing = dir.path().join("nope.jsonl");
        let err = scan_path(
            &missing,
            &ScanFilter::default(),
            OutputFormat::Jsonl,
            &mut out,
            &mut |_| true,
        )
        .unwrap_err();
        assert!(
            matches!(&err, ScanError::Open { source, .. } if source.kind() == io::ErrorKind::NotFound)
        );
        assert!(err.to_string().contains("nope.jsonl"), "{err}");

        let err = scan_path(
            dir.path(),
            &ScanFilter::default(),
            OutputFormat::Jsonl,
            &mut out,
            &mut |_| true,
        )
        .unwrap_err();
        assert!(matches!(err, ScanError::IsADirectory { .. }), "{err:?}");
        assert!(err.to_string().contains(&dir.path().display().to_string()));
    }

    #[cfg(unix)]
    #[test]
    fn scan_path_permission_denied_is_open_error() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret.jsonl");
        std::fs::write(&file, golden()).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o000)).unwrap();
        if File::open(&file).is_ok() {
            return; // running as root: permissions are not enforced
        }
        let err = scan_path(
            &file,
            &ScanFilter::default(),
            OutputFormat::Jsonl,
            &mut Vec::new(),
            &mut |_| true,
        )
        .unwrap_err();
        assert!(err.to_string().contains("secret.jsonl") && err.to_string().contains("permission"));
    }

    // ---- the files of a log, the export file ----

    #[test]
    fn log_files_lists_rotated_files_oldest_first_then_the_live_file() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("audit.jsonl");
        assert!(log_files(&live).unwrap().is_empty(), "no log yet");
        // The missing live file is still read (and reported missing) for a whole log.
        assert_eq!(whole_log(&live).unwrap(), vec![live.clone()]);
        let newer = dir.path().join("audit-20260309T140000123.jsonl");
        let older = dir.path().join("audit-20260101T000000000.jsonl");
        std::fs::write(&newer, b"").unwrap();
        std::fs::write(&older, b"").unwrap();
        std::fs::write(dir.path().join("other.jsonl"), b"").unwrap();
        // Rotated files without the live one (removed, or not yet reopened).
        assert_eq!(
            whole_log(&live).unwrap(),
            vec![older.clone(), newer.clone()]
        );
        std::fs::write(&live, b"").unwrap();
        let all = vec![older, newer, live.clone()];
        assert_eq!(log_files(&live).unwrap(), all);
        assert_eq!(whole_log(&live).unwrap(), all);
        // A log in a missing directory has no files; it is not an error.
        let gone = dir.path().join("missing").join("audit.jsonl");
        assert!(log_files(&gone).unwrap().is_empty());
    }

    #[cfg(unix)]
    #[test]
    fn log_files_of_an_unreadable_directory_is_a_list_error_naming_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("locked");
        std::fs::create_dir(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o000)).unwrap();
        let listed = log_files(&sub.join("audit.jsonl"));
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o700)).unwrap();
        if std::fs::read_dir(&sub).is_ok() && listed.is_ok() {
            return; // running as root: permissions are not enforced
        }
        let err = listed.unwrap_err();
        assert!(
            matches!(&err, ScanError::List { source, .. } if source.kind() == io::ErrorKind::PermissionDenied),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("locked") && msg.contains("readable"), "{msg}");
    }

    #[test]
    fn create_export_makes_a_private_file_or_truncates_one() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("export.jsonl");
        std::fs::write(&out, b"old content").unwrap();
        let mut f = create_export(&out).unwrap();
        f.write_all(b"new").unwrap();
        drop(f);
        assert_eq!(std::fs::read(&out).unwrap(), b"new");
        let fresh = dir.path().join("fresh.csv");
        drop(create_export(&fresh).unwrap());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        }
        let err = create_export(&dir.path().join("no").join("dir.csv")).unwrap_err();
        assert!(
            matches!(&err, ScanError::Create { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("dir.csv") && msg.contains("choose another output file"),
            "{msg}"
        );
    }

    // ---- internals ----

    #[test]
    fn column_and_field_tables_agree_with_the_writer() {
        assert_eq!(CSV_COLUMNS[..12], FIXED_FIELDS);
        assert_eq!(CSV_COLUMNS[12], "extra");
        for (i, name) in FIXED_FIELDS.iter().enumerate() {
            assert_eq!(fixed_index(name), Some(i));
        }
        assert_eq!(
            [TS, KEY_ID, KEY_NAME, TOOL, SCOPES, STATUS, INPUT_ARGS, METADATA]
                .map(|i| FIXED_FIELDS[i]),
            [
                "ts",
                "key_id",
                "key_name",
                "tool",
                "scopes",
                "status",
                "input_args",
                "metadata"
            ]
        );
    }

    #[test]
    fn compact_keeps_strings_intact() {
        let mut b = Vec::new();
        push_compact(
            &mut b,
            "{ \"a \\\" b\" : [ 1 ,\n\t2 ] , \"c\" : \" \\\\\" }",
        );
        assert_eq!(
            String::from_utf8(b).unwrap(),
            r#"{"a \" b":[1,2],"c":" \\"}"#
        );
    }

    proptest! {
        #[test]
        fn canonical_validation_agrees_with_chrono(
            y in 0u32..10000, mo in 0u32..14, d in 0u32..33,
            h in 0u32..26, mi in 0u32..62, s in 0u32..62, ms in 0u32..1000,
        ) {
            let text = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z");
            let c = canonical_ts(text.as_bytes()).unwrap();
            prop_assert_eq!(valid_canonical(c), DateTime::parse_from_rfc3339(&text).is_ok(), "{}", text);
        }

        #[test]
        fn bytewise_range_agrees_with_instants(
            t in 0i64..10_000, since in proptest::option::of(0i64..10_000_000),
            until in proptest::option::of(0i64..10_000_000),
        ) {
            // line ts in ms; bounds in microseconds
            let ts = at(BASE_MS + t);
            let b = |us: i64| at(BASE_MS) + TimeDelta::microseconds(us);
            let f = ScanFilter { since: since.map(b), until: until.map(b), ..ScanFilter::default() };
            let Ok(c) = Compiled::new(&f) else { return Ok(()) };
            prop_assert!(c.bytewise);
            let want = f.since.is_none_or(|s| ts >= s) && f.until.is_none_or(|u| ts < u);
            prop_assert_eq!(c.check_ts(&format_ts(&ts)), Some(want));
            let legacy = ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, false);
            prop_assert_eq!(c.check_ts(&legacy), Some(want));
        }
    }

    // ---- property: scan == reference filter over serde_json::Value ----

    const NAMES: [&str; 4] = ["alice", "bob", "al\"ice", "é"];
    const TOOLS: [&str; 3] = ["get_data", "put", "get_data2"];

    fn arb_event() -> impl Strategy<Value = AuditEvent> {
        (
            0..NAMES.len(),
            0..NAMES.len(),
            0..TOOLS.len(),
            0..Status::ALL.len(),
            0i64..50,
            proptest::option::of("[a-z\"\\\\ ,=]{0,8}"),
            proptest::option::of(prop_oneof![Just(json!({"k": "alice"})), Just(json!("ok"))]),
            proptest::bool::ANY,
        )
            .prop_map(|(i, n, t, s, ms, err, args, extra)| {
                let mut e = ev(NAMES[i], NAMES[n], TOOLS[t], Status::ALL[s], ms);
                e.error = err;
                e.input_args = args.map(Into::into);
                if extra {
                    let mut m = serde_json::Map::new();
                    m.insert("actor".into(), json!("alice"));
                    e.extra = RawJson::extra(&m);
                }
                e
            })
    }

    fn arb_filter() -> impl Strategy<Value = ScanFilter> {
        (
            proptest::option::of(0..NAMES.len()),
            proptest::option::of(0..TOOLS.len()),
            proptest::option::of(0..3usize),
            proptest::option::of(0i64..50_000),
            proptest::option::of(0i64..50_000),
        )
            .prop_map(|(k, t, s, since, until)| ScanFilter {
                key: k.map(|k| NAMES[k].to_owned()),
                tool: t.map(|t| TOOLS[t].to_owned()),
                status: s.map(|s| Status::ALL[s]),
                since: since.map(|us| at(BASE_MS) + TimeDelta::microseconds(us)),
                until: until.map(|us| at(BASE_MS) + TimeDelta::microseconds(us)),
                limit: None,
            })
    }

    /// Re-spells a line: reversed field order, `": "` separators, letters
    /// a-e escaped as `\u00XX`, ts as `+00:00` with microseconds.
    fn respell(line: &str) -> String {
        fn enc(s: &str) -> String {
            use std::fmt::Write as _;
            let mut o = String::from("\"");
            for c in s.chars() {
                match c {
                    'a'..='e' => write!(o, "\\u{:04x}", u32::from(c)).unwrap(),
                    '"' => o.push_str("\\\""),
                    '\\' => o.push_str("\\\\"),
                    c if u32::from(c) < 0x20 => write!(o, "\\u{:04x}", u32::from(c)).unwrap(),
                    c => o.push(c),
                }
            }
            o.push('"');
            o
        }
        let v: serde_json::Map<String, Value> = serde_json::from_str(line).unwrap();
        let parts: Vec<String> = v
            .iter()
            .rev()
            .map(|(k, val)| {
                let val = match (k.as_str(), val) {
                    ("ts", Value::String(s)) => {
                        let t = DateTime::parse_from_rfc3339(s).unwrap();
                        enc(&t.to_rfc3339_opts(chrono::SecondsFormat::Micros, false))
                    }
                    (_, Value::String(s)) => enc(s),
                    (_, other) => other.to_string(),
                };
                format!("{}: {val}", enc(k))
            })
            .collect();
        format!("{{{}}}", parts.join(", "))
    }

    fn reference(line: &str, f: &ScanFilter) -> bool {
        let v: Value = serde_json::from_str(line).unwrap();
        let s = |k: &str| v[k].as_str().map(str::to_owned);
        let ts = DateTime::parse_from_rfc3339(v["ts"].as_str().unwrap()).unwrap();
        f.key
            .as_ref()
            .is_none_or(|k| s("key_id").as_ref() == Some(k) || s("key_name").as_ref() == Some(k))
            && f.tool
                .as_ref()
                .is_none_or(|t| s("tool").as_ref() == Some(t))
            && f.status
                .is_none_or(|st| s("status").as_deref() == Some(st.as_str()))
            && f.since.is_none_or(|x| ts >= x)
            && f.until.is_none_or(|x| ts < x)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn scan_matches_reference_filter(
            events in proptest::collection::vec(arb_event(), 0..30),
            f in arb_filter(),
            respelled in proptest::bool::ANY,
        ) {
            let text = String::from_utf8(lines_of(&events)).unwrap();
            let lines: Vec<String> = if respelled {
                text.lines().map(respell).collect()
            } else {
                text.lines().map(str::to_owned).collect()
            };
            let input: String = lines.iter().flat_map(|l| [l.as_str(), "\n"]).collect();
            let want: Vec<String> = lines.iter().filter(|l| reference(l, &f)).cloned().collect();
            if f.since.zip(f.until).is_some_and(|(s, u)| s >= u) {
                return Ok(());
            }
            let (got, stats) = query(input.as_bytes(), &f);
            prop_assert_eq!(&got, &want);
            prop_assert_eq!(stats.malformed, 0);
            let (csv_text, csv_stats) = csv(input.as_bytes(), &f, false);
            prop_assert_eq!(csv_stats.matched, want.len() as u64);
            let rows = parse_csv(&csv_text);
            prop_assert_eq!(rows.len(), want.len());
            for (row, line) in rows.iter().zip(&want) {
                let v: Value = serde_json::from_str(line).unwrap();
                prop_assert_eq!(row.len(), 13);
                prop_assert_eq!(row[3].trim_start_matches('\''), v["tool"].as_str().unwrap());
                prop_assert_eq!(&row[2], v["key_name"].as_str().unwrap());
                prop_assert_eq!(row[7].trim_start_matches('\''), v["error"].as_str().unwrap_or(""));
            }
        }
    }

    // ---- measurement ----

    /// Writes `n` realistic lines (~330 bytes) to `path`.
    fn generate(path: &Path, n: usize) {
        let mut names: Vec<String> = (0..50).map(|i| format!("agent-{i:02}")).collect();
        names[0] = "alice".into();
        let mut tools: Vec<String> = (0..20).map(|i| format!("tool_{i:02}")).collect();
        tools[0] = "get_data".into();
        let mut file = io::BufWriter::new(File::create(path).unwrap());
        let mut buf = Vec::new();
        for i in 0..n {
            let mut e = AuditEvent::new(
                format!("fmg_key_01HZX4B7Q2W9{:02}", i % 50),
                names[i % 50].clone(),
                tools[(i / 3) % 20].clone(),
                if i % 17 == 0 {
                    Status::RateLimited
                } else if i % 29 == 0 {
                    Status::Error
                } else {
                    Status::Ok
                },
            );
            e.ts = at(BASE_MS + i64::try_from(i).unwrap() * 7);
            e.scopes = vec!["read".into(), "write".into()];
            e.duration_ms = f64::from(u32::try_from(i % 1000).unwrap()) * 0.731;
            e.input_args = Some(
                json!({"query": "quarterly report for region emea", "limit": 10 + i % 7}).into(),
            );
            e.client_ip = Some(format!("10.0.{}.{}", i % 200, i % 250));
            e.metadata = Some(json!({"request_id": format!("req-{i:012}")}).into());
            if i % 17 == 0 {
                let mut m = serde_json::Map::new();
                m.insert("retry_after".into(), json!(1.5));
                e.extra = RawJson::extra(&m);
            }
            buf.clear();
            write_line(&mut buf, &e);
            file.write_all(&buf).unwrap();
        }
        file.flush().unwrap();
    }

    #[test]
    #[ignore = "measurement: cargo test --release -- --ignored --nocapture measure"]
    #[allow(clippy::cast_precision_loss, reason = "printing rates")]
    fn measure_scan_throughput() {
        use std::time::Instant;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let n = 1_000_000usize;
        generate(&path, n);
        let size = std::fs::metadata(&path).unwrap().len();
        println!("{n} lines, {:.0} bytes/line", size as f64 / n as f64);
        let sel = ScanFilter {
            key: Some("alice".into()),
            tool: Some("get_data".into()),
            status: Some(Status::Ok),
            ..ScanFilter::default()
        };
        let by_time = ScanFilter {
            since: Some(at(BASE_MS + 3_000_000)),
            until: Some(at(BASE_MS + 3_500_000)),
            ..ScanFilter::default()
        };
        let cases = [
            ("query key+tool+status -> jsonl", &sel, OutputFormat::Jsonl),
            ("query since/until -> jsonl", &by_time, OutputFormat::Jsonl),
            (
                "no filter -> jsonl",
                &ScanFilter::default(),
                OutputFormat::Jsonl,
            ),
            (
                "export csv",
                &ScanFilter::default(),
                OutputFormat::Csv { header: true },
            ),
        ];
        for (label, f, fmt) in cases {
            let mut best = f64::MAX;
            let mut stats = ScanStats::default();
            for _ in 0..3 {
                let mut out = io::sink();
                let t = Instant::now();
                stats = scan_path(&path, f, fmt, &mut out, &mut |_| true).unwrap();
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "{label}: {:.3}s = {:.2} M lines/s ({} matched)",
                best,
                n as f64 / best / 1e6,
                stats.matched
            );
        }
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        if let Some(hwm) = status.lines().find(|l| l.starts_with("VmHWM")) {
            println!("peak RSS of the test process: {hwm}");
        }
        if let Ok(keep) = std::env::var("SCAN_KEEP") {
            std::fs::copy(&path, keep).unwrap();
        }
    }
}
