//! The JSONL file sink: appends lines, seals them into a hash chain
//! ([`chain`](super::chain)), rotates and prunes files.
//!
//! # Rotation
//! Before each batch, the sink rotates when the live file is not empty and
//! either the batch would take it past [`JsonlOptions::rotate_bytes`] or the
//! UTC day changed since the file was started ([`JsonlOptions::rotate_daily`];
//! a file found on open counts from its last modification). A batch is never
//! split, so a file exceeds `rotate_bytes` only when one batch alone is larger
//! (batches are cut at about 1 MiB).
//!
//! Rotating renames the live file to `<stem>-<UTC yyyymmddTHHMMSSmmm><ext>`
//! next to it (`audit.jsonl` → `audit-20260309T140000123.jsonl`; names sort in
//! time order and never repeat) and creates a new live file, mode 0600. It
//! never copies or truncates, so `tail -F` and log shippers that follow the
//! name see every line once. Then the oldest rotated files beyond
//! [`JsonlOptions::retention`] are deleted. [`rotated_files`] lists them,
//! oldest first.
//!
//! A rotation that fails (the directory is not writable) loses nothing: the
//! batch goes to the live file, the failure is counted in `write_errors` and
//! kept in `last_error`, and the next batch tries again. Paths that are not
//! regular files (`/dev/stdout`, a FIFO) are never rotated.
//!
//! # Several writers
//! The server and the CLI (`fastmcp-guard keys ...` records lifecycle events)
//! may append to the same log. On unix each batch is written under an
//! exclusive `flock` of the live file, after catching up with the others: a
//! file another writer rotated away is followed to the new live file, and
//! lines others appended become the point the chain continues from. So the
//! log stays one chain whatever the number of writing processes. (Elsewhere,
//! give each process its own file.)

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDate, Utc};

use super::chain::{restart_line, scan_tail, tail_state, ChainKey, LineChain, Tail, GENESIS};
use super::{AuditError, Batch, Sink};

/// Options of the JSONL sink beyond the path. `Default`: chain on, no key,
/// no rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonlOptions {
    /// Rotate before a batch would take the live file past this many bytes.
    pub rotate_bytes: Option<u64>,
    /// Rotate at the first batch of each new UTC day.
    pub rotate_daily: bool,
    /// Keep at most this many rotated files (the oldest are deleted); `None` keeps all.
    pub retention: Option<usize>,
    /// Add `"id"` and the hash `"chain"` to every line (see [`chain`](super::chain)).
    pub chain: bool,
    /// Key the chain (BLAKE3 keyed mode); only used with `chain`.
    pub chain_key: Option<ChainKey>,
}

impl Default for JsonlOptions {
    fn default() -> Self {
        JsonlOptions {
            rotate_bytes: None,
            rotate_daily: false,
            retention: None,
            chain: true,
            chain_key: None,
        }
    }
}

impl JsonlOptions {
    fn validate(&self) -> Result<(), AuditError> {
        if self.rotate_bytes == Some(0) {
            return Err(AuditError::InvalidOption {
                name: "rotate_bytes",
                value: "0".to_owned(),
                fix: "use a size in bytes of at least 1 (e.g. 104857600 for 100 MiB), or none",
            });
        }
        Ok(())
    }
}

/// Appends JSONL to one file (opened create + append; new files mode 0600 on
/// unix), sealing lines into the hash chain and rotating as configured.
#[derive(Debug)]
pub struct JsonlFileSink {
    file: File,
    path: PathBuf,
    /// The file ends in the middle of a line (a torn write, ours or a crashed
    /// previous process's): end it before writing the next batch.
    partial_line: bool,
    /// The live file may end with incomplete lines (at open, after another writer
    /// appended, after a failed write): look before the next batch, and if it does,
    /// write the restart record that acknowledges them first (see
    /// [`chain`](super::chain)).
    torn_check: bool,
    opts: JsonlOptions,
    /// A regular file: may be rotated.
    regular: bool,
    /// Bytes in the live file.
    size: u64,
    /// UTC day the live file belongs to.
    day: NaiveDate,
    /// Millisecond stamp of the newest rotated file (names never repeat).
    last_rotation_ms: i64,
    sealer: Option<LineChain>,
    /// The sealed batch.
    out: Vec<u8>,
    /// End offset in `out` and chain value of each sealed line of the batch.
    marks: Vec<(usize, [u8; 32])>,
    /// The sealer's state before the batch (restored when no line of it got written).
    batch_start: ([u8; 32], bool),
    /// A rotation or pruning failure not yet reported.
    warning: Option<AuditError>,
    /// Tests: the next write fails after this many bytes.
    #[cfg(test)]
    fail_after: Option<usize>,
    /// Tests: run in `rotate` between opening the new live file and locking it.
    #[cfg(test)]
    after_open: Option<tests::Hook>,
}

impl JsonlFileSink {
    /// Opens `path` for appending with the default options (chain on, no rotation).
    ///
    /// # Errors
    /// As [`open_with`](Self::open_with).
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        JsonlFileSink::open_with(path, JsonlOptions::default())
    }

    /// Opens `path` for appending, creating it (mode 0600 on unix) if missing,
    /// and recovers the chain from the last complete line of the newest file.
    ///
    /// # Errors
    /// [`AuditError::Open`] naming the path and what to fix (missing directory,
    /// permissions, a parent that is a file, a directory given as the path);
    /// [`AuditError::InvalidOption`].
    pub fn open_with(path: &Path, opts: JsonlOptions) -> Result<Self, AuditError> {
        opts.validate()?;
        let open_err = |source| AuditError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = open_append(path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let regular = meta.is_file();
        let partial_line = ends_mid_line(&file, path);
        let size = if regular { meta.len() } else { 0 };
        let day = file_day(&meta);
        let rotated = if regular {
            rotated_files(path).unwrap_or_default()
        } else {
            Vec::new()
        };
        let last_rotation_ms = rotated
            .last()
            .and_then(|p| rotation_stamp(path, p))
            .unwrap_or(i64::MIN);
        let sealer = if opts.chain {
            let (prev, at_start) = if regular {
                recover_chain(path, &rotated).map_err(open_err)?
            } else {
                (GENESIS, true)
            };
            Some(LineChain::new(opts.chain_key.clone(), prev, at_start))
        } else {
            None
        };
        Ok(JsonlFileSink {
            file,
            path: path.to_path_buf(),
            partial_line,
            torn_check: regular,
            opts,
            regular,
            size,
            day,
            last_rotation_ms,
            sealer,
            out: Vec::new(),
            marks: Vec::new(),
            batch_start: (GENESIS, true),
            warning: None,
            #[cfg(test)]
            fail_after: None,
            #[cfg(test)]
            after_open: None,
        })
    }

    /// The path the sink appends to.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn due(&self, now: &DateTime<Utc>, incoming: usize) -> bool {
        self.regular
            && self.size > 0
            && (self
                .opts
                .rotate_bytes
                .is_some_and(|max| self.size.saturating_add(incoming as u64) > max)
                || (self.opts.rotate_daily && now.date_naive() != self.day))
    }

    /// Renames the live file aside, opens a new one, prunes old files; true if
    /// it rotated. On failure the live file stays as it was; the error becomes
    /// a warning (see [`Sink::take_warning`]).
    fn rotate(&mut self, now: &DateTime<Utc>) -> bool {
        let mut ms = now
            .timestamp_millis()
            .max(self.last_rotation_ms.saturating_add(1));
        let mut target = rotated_name(&self.path, ms);
        while target.as_ref().is_some_and(|t| t.exists()) {
            ms += 1;
            target = rotated_name(&self.path, ms);
        }
        let Some(target) = target else {
            return false;
        };
        let fail = |path: &Path, source| AuditError::Rotate {
            path: path.to_path_buf(),
            source,
        };
        if let Err(e) = fs::rename(&self.path, &target) {
            self.warning = Some(fail(&self.path, e));
            return false;
        }
        match open_append(&self.path) {
            Ok(f) => {
                #[cfg(test)]
                if let Some(hook) = &mut self.after_open {
                    (hook.0)();
                }
                // Lock the new file before the old one's lock goes (with its handle):
                // a writer waiting on the old file then finds the new one taken.
                lock(&f).ok();
                self.file = f;
            }
            Err(e) => {
                // Put the file back and go on appending to it.
                fs::rename(&target, &self.path).ok();
                self.warning = Some(fail(&self.path, e));
                return false;
            }
        }
        self.last_rotation_ms = ms;
        self.size = 0;
        self.partial_line = false;
        self.day = now.date_naive();
        // Another writer may have created the new file first (it found no live file
        // between the rename and the open above), taken its lock before this one, and
        // rotated it away in turn: then the handle is on a rotated file. Follow it to the
        // live file, as `lock_live` does; the caller catches up with what is there.
        if !self.is_live() {
            if let Err(e) = self.lock_live() {
                self.warning = Some(fail(&self.path, e));
            }
        }
        if let Some(keep) = self.opts.retention {
            if let Err(e) = prune(&self.path, keep) {
                self.warning = Some(fail(&self.path, e));
            }
        }
        true
    }

    /// Takes the live file's lock (flock, held for the batch) and catches up
    /// with other processes appending to the same log (`fastmcp-guard keys` beside
    /// a running server): a file rotated away by another writer is followed to
    /// the new live file, and when the file grew by others' lines the chain
    /// continues from their last one.
    fn lock_live(&mut self) -> io::Result<()> {
        if !self.regular {
            return Ok(());
        }
        // Each retry follows one rotation made by another writer.
        for _ in 0..16 {
            lock(&self.file)?;
            let ours = self.file.metadata()?;
            match fs::metadata(&self.path) {
                Ok(live) if same_file(&live, &ours) => {
                    if ours.len() != self.size {
                        self.catch_up(ours.len())?;
                    }
                    return Ok(());
                }
                _ => {
                    let f = open_append(&self.path)?;
                    let meta = f.metadata()?;
                    // The old handle, and its lock, go here.
                    self.file = f;
                    self.day = file_day(&meta);
                    self.size = u64::MAX; // unknown: catch up once locked
                }
            }
        }
        Err(io::Error::other(
            "the live audit log kept being replaced while this writer waited for it; \
             is another program renaming it?",
        ))
    }

    /// Whether the handle is on the file at the live path (best effort: `false` when
    /// either cannot be read).
    fn is_live(&self) -> bool {
        match (self.file.metadata(), fs::metadata(&self.path)) {
            (Ok(ours), Ok(live)) => same_file(&ours, &live),
            _ => false,
        }
    }

    /// Re-reads the state of the live file (`len` bytes) after others wrote to it.
    fn catch_up(&mut self, len: u64) -> io::Result<()> {
        self.size = len;
        self.partial_line = ends_mid_line(&self.file, &self.path);
        self.torn_check = true;
        if let Some(sealer) = &mut self.sealer {
            let (prev, at_start) = recover_chain(&self.path, &rotated_files(&self.path)?)?;
            sealer.set_state(prev, at_start);
        }
        Ok(())
    }

    /// Lays out what the batch writes into `self.out`: a newline ending a torn last
    /// line (`lead`), the restart record (`restart`, possibly empty), then the batch's
    /// lines, each sealed into the chain (their ends into `marks`). Without the chain
    /// the lines are copied as they are.
    fn seal(&mut self, restart: &[u8], lines: &[u8], now: &DateTime<Utc>, lead: bool) {
        self.out.clear();
        self.marks.clear();
        if lead {
            self.out.push(b'\n');
        }
        let Some(sealer) = &mut self.sealer else {
            self.out.extend_from_slice(restart);
            self.out.extend_from_slice(lines);
            return;
        };
        self.batch_start = sealer.state();
        sealer.set_time(u64::try_from(now.timestamp_millis()).unwrap_or(0));
        for part in [restart, lines] {
            let mut rest = part;
            while !rest.is_empty() {
                let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
                if let Some(chain) = sealer.seal(&mut self.out, &rest[..end]) {
                    self.marks.push((self.out.len(), chain));
                }
                rest = &rest[end..];
            }
        }
    }

    /// The restart record for the incomplete lines the live file ends with, if it
    /// does (empty otherwise). Best effort: a file that cannot be read back gets none.
    fn restart_record(&self, now: &DateTime<Utc>) -> Vec<u8> {
        let mut record = Vec::new();
        if self.regular {
            if let Ok(scan) = scan_tail(&self.path) {
                if let Some(torn) = scan.torn {
                    restart_line(&mut record, now, &torn);
                }
            }
        }
        record
    }
}

/// The UTC day a log file belongs to: of its last change if it has data, else today.
fn file_day(meta: &fs::Metadata) -> NaiveDate {
    match meta.modified() {
        Ok(t) if meta.len() > 0 => DateTime::<Utc>::from(t).date_naive(),
        _ => Utc::now().date_naive(),
    }
}

/// Takes the exclusive `flock` of a log file (waits for other writers' batches).
#[cfg(unix)]
fn lock(file: &File) -> io::Result<()> {
    rustix::fs::flock(file, rustix::fs::FlockOperation::LockExclusive).map_err(io::Error::from)
}

#[cfg(not(unix))]
fn lock(_file: &File) -> io::Result<()> {
    Ok(())
}

#[cfg(unix)]
fn unlock(file: &File) {
    // Closing the handle would release it too; an error here changes nothing.
    rustix::fs::flock(file, rustix::fs::FlockOperation::Unlock).ok();
}

#[cfg(not(unix))]
fn unlock(_file: &File) {}

/// Whether two metadata describe the same file (device and inode).
#[cfg(unix)]
fn same_file(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_file(_a: &fs::Metadata, _b: &fs::Metadata) -> bool {
    true
}

/// Opens `path` create + append, mode 0600 for a new file on unix.
fn open_append(path: &Path) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)
}

/// Where the chain goes on: the last complete line of the live file, else of
/// the newest rotated file; and whether the next line starts its file.
fn recover_chain(path: &Path, rotated: &[PathBuf]) -> io::Result<([u8; 32], bool)> {
    match tail_state(path)? {
        Tail::Sealed(c) => return Ok((c, false)),
        Tail::Unsealed => return Ok((GENESIS, true)),
        Tail::Empty => {}
    }
    for older in rotated.iter().rev() {
        match tail_state(older)? {
            Tail::Sealed(c) => return Ok((c, true)),
            Tail::Unsealed => return Ok((GENESIS, true)),
            Tail::Empty => {}
        }
    }
    Ok((GENESIS, true))
}

/// Whether an existing regular file's last byte is not `\n`. Best effort:
/// any error (no read permission, special file) answers `false`.
fn ends_mid_line(file: &File, path: &Path) -> bool {
    let Ok(meta) = file.metadata() else {
        return false;
    };
    if !meta.is_file() || meta.len() == 0 {
        return false;
    }
    let Ok(mut reader) = File::open(path) else {
        return false;
    };
    let mut last = [0u8; 1];
    reader.seek(SeekFrom::End(-1)).is_ok()
        && reader.read_exact(&mut last).is_ok()
        && last[0] != b'\n'
}

/// Writes `buf` (complete lines) to `w`, first ending a torn line if
/// `partial_line` says the output ends mid-line. `written` counts the bytes of
/// `buf` written (all of them on success); on failure, records whether this
/// write left a torn line behind.
pub(super) fn append_lines<W: Write>(
    w: &mut W,
    buf: &[u8],
    partial_line: &mut bool,
    written: &mut usize,
) -> io::Result<()> {
    *written = 0;
    if *partial_line {
        w.write_all(b"\n")?;
        *partial_line = false;
    }
    let mut off = 0;
    while off < buf.len() {
        let err = match w.write(&buf[off..]) {
            Ok(0) => io::Error::from(io::ErrorKind::WriteZero),
            Ok(k) => {
                off += k;
                *written = off;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => e,
        };
        *partial_line = off > 0 && buf[off - 1] != b'\n';
        return Err(err);
    }
    Ok(())
}

impl Sink for JsonlFileSink {
    fn write_batch(&mut self, batch: &Batch<'_>) -> io::Result<()> {
        self.lock_live()?;
        let res = self.write_locked(batch);
        if self.regular {
            unlock(&self.file);
        }
        res
    }

    fn flush(&mut self) -> io::Result<()> {
        // `File` has no user-space buffer: `write` already handed the data to the OS.
        self.file.flush()
    }

    fn sync(&mut self) -> io::Result<()> {
        match self.file.sync_data() {
            // EINVAL: a pipe or character device (e.g. /dev/stdout) cannot be synced.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => Ok(()),
            other => other,
        }
    }

    fn take_warning(&mut self) -> Option<AuditError> {
        self.warning.take()
    }
}

impl JsonlFileSink {
    /// [`Sink::write_batch`] with the live file locked and caught up.
    fn write_locked(&mut self, batch: &Batch<'_>) -> io::Result<()> {
        let now = Utc::now();
        let lines = batch.jsonl();
        let mut restart = if self.torn_check {
            self.restart_record(&now)
        } else {
            Vec::new()
        };
        self.seal(&restart, lines, &now, self.partial_line);
        let incoming = self.out.len().max(lines.len());
        if self.due(&now, incoming) && self.rotate(&now) {
            // The incomplete lines stay at the end of the old file, where a crash
            // leaves them: no restart record for them in the new one. Another writer
            // may have got into the new file before it was locked.
            let len = self.file.metadata().map_or(0, |m| m.len());
            let caught_up = len > 0 && self.catch_up(len).is_ok();
            restart = if caught_up {
                self.restart_record(&now)
            } else {
                Vec::new()
            };
            if !caught_up {
                if let Some(sealer) = &mut self.sealer {
                    // The first line of the new file records where it continues from.
                    sealer.set_state(self.batch_start.0, true);
                }
            }
            self.seal(&restart, lines, &now, self.partial_line);
        }
        let lead = self.partial_line;
        // Without the chain, and with nothing to add before the lines, they go as they are.
        let data = if self.sealer.is_some() || lead || !restart.is_empty() {
            &self.out[..]
        } else {
            lines
        };
        // One write: the newline ending a torn line, the restart record and the batch.
        let mut torn_now = false;
        let mut written = 0;
        #[cfg(test)]
        let res = match self.fail_after.take() {
            Some(left) => {
                let mut w = tests::Limited {
                    inner: &mut self.file,
                    left,
                };
                append_lines(&mut w, data, &mut torn_now, &mut written)
            }
            None => append_lines(&mut self.file, data, &mut torn_now, &mut written),
        };
        #[cfg(not(test))]
        let res = append_lines(&mut self.file, data, &mut torn_now, &mut written);
        if self.regular {
            self.size += written as u64;
        }
        if res.is_ok() {
            self.partial_line = false;
            self.torn_check = false;
        } else {
            // Nothing written: the file ends as it did. Else as the write left it.
            self.partial_line = if written == 0 { lead } else { torn_now };
            // What this write left (or the lines it was to acknowledge) needs a restart
            // record next time.
            self.torn_check = true;
            if let Some(sealer) = &mut self.sealer {
                // Go on from the last line that reached the file (one missing only
                // its newline counts: the next write ends it), else from before
                // the batch.
                match self.marks.iter().rev().find(|(end, _)| end - 1 <= written) {
                    Some(&(_, chain)) => sealer.set_state(chain, false),
                    None => sealer.set_state(self.batch_start.0, self.batch_start.1),
                }
            }
        }
        res
    }
}

// ---------------------------------------------------------------------------
// Rotated file names
// ---------------------------------------------------------------------------

/// `(stem, ext)` of the live path: `audit.jsonl` → `("audit", ".jsonl")`.
fn stem_ext(path: &Path) -> Option<(String, String)> {
    let stem = path.file_stem()?.to_str()?.to_owned();
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map_or_else(String::new, |e| format!(".{e}"));
    Some((stem, ext))
}

/// The rotated name for the live `path` at Unix milliseconds `ms`.
fn rotated_name(path: &Path, ms: i64) -> Option<PathBuf> {
    let (stem, ext) = stem_ext(path)?;
    let at = DateTime::<Utc>::from_timestamp_millis(ms)?;
    let stamp = at.format("%Y%m%dT%H%M%S%3f");
    Some(path.with_file_name(format!("{stem}-{stamp}{ext}")))
}

/// The millisecond stamp in a rotated file's name, if it is one of `path`'s.
fn rotation_stamp(path: &Path, rotated: &Path) -> Option<i64> {
    let (stem, ext) = stem_ext(path)?;
    let name = rotated.file_name()?.to_str()?;
    let stamp = name
        .strip_prefix(&stem)?
        .strip_prefix('-')?
        .strip_suffix(&ext as &str)?;
    let b = stamp.as_bytes();
    if b.len() != 18
        || b[8] != b'T'
        || !b
            .iter()
            .enumerate()
            .all(|(i, c)| i == 8 || c.is_ascii_digit())
    {
        return None;
    }
    let naive = chrono::NaiveDateTime::parse_from_str(&stamp[..15], "%Y%m%dT%H%M%S").ok()?;
    let ms: i64 = stamp[15..].parse().ok()?;
    Some(naive.and_utc().timestamp_millis() + ms)
}

/// The rotated files of the JSONL log at `path`, oldest first (names of the
/// form `<stem>-<yyyymmddTHHMMSSmmm><ext>` in its directory); the live file
/// is not included. A missing directory gives an empty list.
///
/// # Errors
/// The I/O error of reading the directory.
pub fn rotated_files(path: &Path) -> io::Result<Vec<PathBuf>> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found: Vec<(i64, PathBuf)> = Vec::new();
    for entry in entries {
        let entry = entry?;
        let candidate = dir.join(entry.file_name());
        if let Some(ms) = rotation_stamp(path, &candidate) {
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                found.push((ms, candidate));
            }
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// Every file of the JSONL log at `path`, oldest first: the rotated files,
/// then the live file if it exists.
///
/// # Errors
/// The I/O error of reading the directory.
pub fn log_files(path: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = rotated_files(path)?;
    if path.exists() {
        files.push(path.to_path_buf());
    }
    Ok(files)
}

/// Deletes the oldest rotated files of `path` beyond `keep`.
fn prune(path: &Path, keep: usize) -> io::Result<()> {
    let files = rotated_files(path)?;
    let excess = files.len().saturating_sub(keep);
    for old in &files[..excess] {
        match fs::remove_file(old) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing unwrap is a failing test")]
pub(super) mod tests {
    use super::super::chain::{parse_restart, parse_sealed, verify_files, VerifyReport};
    use super::*;
    use serde_json::Value;

    /// Passes `left` bytes to `inner`, then fails like a full disk.
    pub(crate) struct Limited<'a> {
        pub(crate) inner: &'a mut File,
        pub(crate) left: usize,
    }

    impl Write for Limited<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.left == 0 {
                return Err(io::Error::from_raw_os_error(28)); // ENOSPC
            }
            let k = self.left.min(buf.len());
            let k = self.inner.write(&buf[..k])?;
            self.left -= k;
            Ok(k)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Accepts `limit` bytes, then fails.
    struct Flaky {
        out: Vec<u8>,
        limit: usize,
    }

    impl Write for Flaky {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let room = self.limit.saturating_sub(self.out.len());
            if room == 0 {
                return Err(io::Error::other("disk full"));
            }
            let k = room.min(buf.len()).min(7);
            self.out.extend_from_slice(&buf[..k]);
            Ok(k)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn torn_write_is_terminated_before_the_next_batch() {
        let mut w = Flaky {
            out: Vec::new(),
            limit: 20,
        };
        let mut partial = false;
        let mut written = 0;
        let buf = b"{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n";
        append_lines(&mut w, buf, &mut partial, &mut written).unwrap_err();
        assert!(partial);
        assert_eq!(written, 20);
        w.limit = usize::MAX;
        append_lines(&mut w, b"{\"d\":4}\n", &mut partial, &mut written).unwrap();
        assert!(!partial);
        let text = String::from_utf8(w.out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines, ["{\"a\":1}", "{\"b\":2}", "{\"c\"", "{\"d\":4}"]);
        // A failure exactly at a line boundary leaves nothing to repair.
        let mut w = Flaky {
            out: Vec::new(),
            limit: 8,
        };
        let mut partial = false;
        append_lines(
            &mut w,
            b"{\"a\":1}\n{\"b\":2}\n",
            &mut partial,
            &mut written,
        )
        .unwrap_err();
        assert!(!partial);
        assert_eq!(written, 8);
    }

    fn lines(n: usize, from: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for i in from..from + n {
            out.extend_from_slice(
                format!("{{\"ts\":\"2026-03-09T14:00:00.000Z\",\"n\":{i}}}\n").as_bytes(),
            );
        }
        out
    }

    fn write(sink: &mut JsonlFileSink, n: usize, from: usize) {
        let data = lines(n, from);
        sink.write_batch(&Batch::new(&[], &data, n)).unwrap();
    }

    /// A test's code run inside the sink (see `after_open`).
    pub(super) struct Hook(pub(super) Box<dyn FnMut() + Send>);

    impl std::fmt::Debug for Hook {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Hook")
        }
    }

    fn rotating(path: &Path) -> JsonlFileSink {
        let opts = JsonlOptions {
            rotate_bytes: Some(1),
            ..JsonlOptions::default()
        };
        JsonlFileSink::open_with(path, opts).unwrap()
    }

    /// A log of `batches.len()` files (every batch rotates): `batches[i]` lines each.
    fn log_set(dir: &Path, batches: &[usize]) -> PathBuf {
        let path = dir.join("audit.jsonl");
        let mut sink = rotating(&path);
        let mut n = 0;
        for &b in batches {
            write(&mut sink, b, n);
            n += b;
        }
        path
    }

    fn read(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .split_inclusive('\n')
            .map(str::to_owned)
            .collect()
    }

    fn numbers(paths: &[PathBuf]) -> Vec<u64> {
        paths
            .iter()
            .flat_map(|p| read(p))
            .map(|l| {
                serde_json::from_str::<Value>(&l).unwrap()["n"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    }

    fn verify(path: &Path) -> VerifyReport {
        verify_files(&log_files(path).unwrap(), None).unwrap()
    }

    /// (file name, line) of the break, or panics.
    fn broken_at(r: &VerifyReport) -> (String, u64) {
        let b = r
            .broken
            .as_ref()
            .unwrap_or_else(|| panic!("not broken: {r:?}"));
        (
            b.path.file_name().unwrap().to_string_lossy().into_owned(),
            b.line,
        )
    }

    fn name(p: &Path) -> String {
        p.file_name().unwrap().to_string_lossy().into_owned()
    }

    #[test]
    fn size_rotation_renames_aside_keeps_order_and_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_set(dir.path(), &[3, 2, 4, 1]);
        let rotated = rotated_files(&path).unwrap();
        assert_eq!(rotated.len(), 3);
        for r in &rotated {
            let n = name(r);
            assert!(n.starts_with("audit-") && n.ends_with(".jsonl"), "{n}");
            assert_eq!(n.len(), "audit-20260309T140000123.jsonl".len(), "{n}");
        }
        let mut sorted = rotated.clone();
        sorted.sort();
        assert_eq!(sorted, rotated, "names sort in time order");
        let all = log_files(&path).unwrap();
        assert_eq!(all.last().unwrap(), &path);
        assert_eq!(numbers(&all), (0..10).collect::<Vec<_>>());
        assert_eq!(read(&all[0]).len(), 3);
        // Each file's first line records what it continues from; others do not.
        for f in &all {
            for (i, l) in read(f).iter().enumerate() {
                let s = parse_sealed(l.trim_end().as_bytes()).unwrap();
                assert_eq!(s.prev.is_some(), i == 0, "{} line {}", name(f), i + 1);
            }
        }
        let r = verify(&path);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!((r.events, r.files, r.continues_from.clone()), (10, 4, None));
    }

    #[cfg(unix)]
    #[test]
    fn the_new_live_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = log_set(dir.path(), &[1, 1]);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_file_stays_under_rotate_bytes_unless_one_batch_is_larger() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let one = {
            let mut s = JsonlFileSink::open(&dir.path().join("probe.jsonl")).unwrap();
            write(&mut s, 1, 0);
            std::fs::metadata(dir.path().join("probe.jsonl"))
                .unwrap()
                .len()
        };
        let opts = JsonlOptions {
            rotate_bytes: Some(one * 3 + 10),
            ..JsonlOptions::default()
        };
        let mut sink = JsonlFileSink::open_with(&path, opts).unwrap();
        for i in 0..10 {
            write(&mut sink, 1, i);
        }
        write(&mut sink, 5, 10); // one batch larger than the limit: not split
        let files = log_files(&path).unwrap();
        let sizes: Vec<u64> = files
            .iter()
            .map(|f| std::fs::metadata(f).unwrap().len())
            .collect();
        assert!(
            sizes[..sizes.len() - 1]
                .iter()
                .all(|&s| s <= one * 3 + 10 + 80),
            "{sizes:?}"
        );
        assert_eq!(read(files.last().unwrap()).len(), 5);
        assert_eq!(numbers(&files), (0..15).collect::<Vec<_>>());
        assert!(verify(&path).is_ok());
    }

    #[test]
    fn retention_keeps_the_newest_rotated_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let opts = JsonlOptions {
            rotate_bytes: Some(1),
            retention: Some(2),
            ..JsonlOptions::default()
        };
        let mut sink = JsonlFileSink::open_with(&path, opts).unwrap();
        for i in 0..6 {
            write(&mut sink, 1, i);
        }
        let files = log_files(&path).unwrap();
        assert_eq!(files.len(), 3);
        assert_eq!(numbers(&files), [3, 4, 5]);
        // What is left verifies; it continues from a file retention removed.
        let r = verify(&path);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.events, 3);
        assert_eq!(
            r.continues_from.as_ref().map(|(p, l)| (name(p), *l)),
            Some((name(&files[0]), 1))
        );
    }

    #[test]
    fn daily_rotation_starts_a_file_per_utc_day() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let opts = JsonlOptions {
            rotate_daily: true,
            ..JsonlOptions::default()
        };
        let mut sink = JsonlFileSink::open_with(&path, opts.clone()).unwrap();
        write(&mut sink, 2, 0);
        write(&mut sink, 1, 2); // same day: no rotation
        drop(sink);
        assert!(rotated_files(&path).unwrap().is_empty());
        // Last written yesterday: the first batch of today rotates.
        let yesterday = std::time::SystemTime::now() - std::time::Duration::from_secs(86_400);
        File::options()
            .append(true)
            .open(&path)
            .unwrap()
            .set_modified(yesterday)
            .unwrap();
        let mut sink = JsonlFileSink::open_with(&path, opts).unwrap();
        write(&mut sink, 1, 3);
        let files = log_files(&path).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(numbers(&files), [0, 1, 2, 3]);
        assert!(verify(&path).is_ok());
    }

    #[test]
    fn the_chain_survives_restarts_including_one_right_after_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut sink = rotating(&path);
        write(&mut sink, 2, 0);
        drop(sink);
        let mut sink = JsonlFileSink::open(&path).unwrap(); // restart, no rotation
        write(&mut sink, 2, 2);
        drop(sink);
        assert_eq!(read(&path).len(), 4);
        assert!(parse_sealed(read(&path)[2].trim_end().as_bytes())
            .unwrap()
            .prev
            .is_none());
        // Rotated, then the process died before writing to the new (empty) file.
        let mut sink = rotating(&path);
        write(&mut sink, 1, 4);
        drop(sink);
        std::fs::rename(&path, rotated_name(&path, 4_102_444_800_000).unwrap()).unwrap();
        File::create(&path).unwrap();
        let mut sink = JsonlFileSink::open(&path).unwrap();
        write(&mut sink, 2, 5);
        drop(sink);
        let files = log_files(&path).unwrap();
        assert_eq!(numbers(&files), (0..7).collect::<Vec<_>>());
        let r = verify(&path);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.events, 7);
    }

    #[test]
    fn a_torn_line_left_by_a_crash_is_ended_and_chained_past() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut sink = JsonlFileSink::open(&path).unwrap();
        write(&mut sink, 3, 0);
        drop(sink);
        let mut data = std::fs::read(&path).unwrap();
        let keep = data.len() - 30;
        data.truncate(keep); // the last line cut short, as by a crash mid-write
        std::fs::write(&path, &data).unwrap();
        // At the end of the file, where a crash leaves it: accepted, and said.
        let r = verify(&path);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!((r.events, r.torn), (2, 1));
        assert_eq!(r.torn_at_end, [(path.clone(), 3)]);
        let mut sink = JsonlFileSink::open(&path).unwrap();
        write(&mut sink, 2, 3);
        drop(sink);
        // The writer ended it and acknowledged it with a restart record (chained).
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6);
        let (n, hash) = parse_restart(lines[3].as_bytes()).unwrap();
        assert_eq!(n, lines[2].len() as u64);
        assert_eq!(&hash, blake3::hash(lines[2].as_bytes()).as_bytes());
        let r = verify(&path);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!((r.events, r.torn), (5, 1));
        assert!(r.torn_at_end.is_empty());
    }

    /// A chained log of 4 lines, then `torn` inserted after line `at` (0-based).
    fn with_inserted(dir: &Path, key: Option<&ChainKey>, at: usize, torn: &[u8]) -> PathBuf {
        let path = dir.join("audit.jsonl");
        let opts = JsonlOptions {
            chain_key: key.cloned(),
            ..JsonlOptions::default()
        };
        let mut sink = JsonlFileSink::open_with(&path, opts).unwrap();
        write(&mut sink, 4, 0);
        drop(sink);
        let mut ls = read(&path);
        ls.insert(at, String::from_utf8(torn.to_vec()).unwrap());
        std::fs::write(&path, ls.concat()).unwrap();
        path
    }

    #[test]
    fn a_forged_incomplete_line_in_the_middle_breaks_with_or_without_a_key() {
        let key = ChainKey::new(b"k").unwrap();
        for k in [None, Some(&key)] {
            for at in [0, 1, 3] {
                let dir = tempfile::tempdir().unwrap();
                let path = with_inserted(dir.path(), k, at, b"{\"ts\":\"2026\n");
                let r = verify_files(&log_files(&path).unwrap(), k).unwrap();
                assert_eq!(broken_at(&r), ("audit.jsonl".to_owned(), at as u64 + 1));
                assert!(r.broken.unwrap().reason.contains("not the restart record"));
            }
            // At the end, but ending with a newline: not what a crash leaves.
            let dir = tempfile::tempdir().unwrap();
            let path = with_inserted(dir.path(), k, 4, b"{\"x\n");
            let r = verify_files(&log_files(&path).unwrap(), k).unwrap();
            assert_eq!(broken_at(&r), ("audit.jsonl".to_owned(), 5));
        }
    }

    /// A log of 2 lines, then a third cut short as by a crash mid-write.
    fn crashed(dir: &Path) -> PathBuf {
        let path = dir.join("audit.jsonl");
        let mut sink = JsonlFileSink::open(&path).unwrap();
        write(&mut sink, 2, 0);
        drop(sink);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"ts\":\"2026-03-09T14:").unwrap();
        path
    }

    #[test]
    fn a_restart_record_must_match_the_incomplete_line_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = crashed(dir.path());
        let mut sink = JsonlFileSink::open(&path).unwrap();
        write(&mut sink, 1, 2);
        drop(sink);
        assert!(verify(&path).is_ok());
        // The incomplete line edited (same length, then another length): found at it.
        for forged in ["{\"ts\":\"2026-03-09T15:", "{\"ts\":\"2026-03-09T1"] {
            let mut ls = read(&path);
            ls[2] = format!("{forged}\n");
            let p = dir.path().join("edited.jsonl");
            std::fs::write(&p, ls.concat()).unwrap();
            let r = verify_files(&[p], None).unwrap();
            assert_eq!(broken_at(&r), ("edited.jsonl".to_owned(), 3));
            assert!(r.broken.unwrap().reason.contains("does not acknowledge"));
        }
        // The incomplete line removed: its restart record has nothing to acknowledge.
        let mut ls = read(&path);
        ls.remove(2);
        let p = dir.path().join("removed.jsonl");
        std::fs::write(&p, ls.concat()).unwrap();
        let r = verify_files(&[p], None).unwrap();
        assert_eq!(broken_at(&r), ("removed.jsonl".to_owned(), 3));
        assert!(r.broken.unwrap().reason.contains("restart record"));
        // Another incomplete line inserted before the acknowledged one.
        let mut ls = read(&path);
        ls.insert(2, "{\"forged\n".to_owned());
        let p = dir.path().join("inserted.jsonl");
        std::fs::write(&p, ls.concat()).unwrap();
        let r = verify_files(&[p], None).unwrap();
        assert_eq!(broken_at(&r), ("inserted.jsonl".to_owned(), 3));
    }

    #[test]
    fn a_second_crash_inside_the_restart_record_is_acknowledged_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = crashed(dir.path());
        // The next writer crashes in turn, part way through its restart record.
        let mut sink = JsonlFileSink::open(&path).unwrap();
        sink.fail_after = Some(40);
        let data = lines(2, 2);
        assert!(sink.write_batch(&Batch::new(&[], &data, 2)).is_err());
        drop(sink);
        assert!(
            verify(&path).is_ok(),
            "two incomplete lines at the end of the file"
        );
        let mut sink = JsonlFileSink::open(&path).unwrap();
        write(&mut sink, 1, 4);
        drop(sink);
        let r = verify(&path);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!((r.events, r.torn), (4, 2));
    }

    #[test]
    fn incomplete_lines_at_the_end_of_a_rotated_file_need_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut sink = rotating(&path);
        write(&mut sink, 2, 0);
        drop(sink);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"ts\":").unwrap();
        drop(f);
        let mut sink = rotating(&path);
        write(&mut sink, 2, 2); // rotates first: the torn line stays where it is
        drop(sink);
        let files = log_files(&path).unwrap();
        assert_eq!(files.len(), 2);
        assert!(read(&files[0]).last().unwrap().ends_with("{\"ts\":"));
        let r = verify(&path);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!((r.events, r.torn), (4, 1));
        assert_eq!(r.torn_at_end, [(files[0].clone(), 3)]);
    }

    #[test]
    fn a_failed_write_rolls_the_chain_back_to_what_reached_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut sink = JsonlFileSink::open(&path).unwrap();
        write(&mut sink, 2, 0);
        let before = std::fs::metadata(&path).unwrap().len();
        // Disk full after 1.5 lines of the next batch, at its start, and one
        // byte short of a whole line (its newline missing: the line counts).
        let one = usize::try_from(before).unwrap() / 2;
        for fail_at in [one + one / 2, 0, one - 1] {
            sink.fail_after = Some(fail_at);
            let data = lines(3, 100);
            assert!(sink.write_batch(&Batch::new(&[], &data, 3)).is_err());
            write(&mut sink, 1, 200);
            let r = verify(&path);
            assert!(r.is_ok(), "fail at {fail_at}: {r:?}");
        }
        drop(sink);
        // A restart continues from the right line too.
        let mut sink = JsonlFileSink::open(&path).unwrap();
        write(&mut sink, 1, 300);
        let r = verify(&path);
        assert!(r.is_ok(), "{r:?}");
        assert!(r.torn >= 2, "{r:?}");
    }

    #[test]
    fn lines_written_before_the_chain_are_an_unchained_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let off = JsonlOptions {
            chain: false,
            ..JsonlOptions::default()
        };
        let mut sink = JsonlFileSink::open_with(&path, off.clone()).unwrap();
        write(&mut sink, 2, 0);
        drop(sink);
        assert!(read(&path)
            .iter()
            .all(|l| !l.contains("\"chain\"") && !l.contains("\"id\"")));
        let mut sink = JsonlFileSink::open(&path).unwrap();
        write(&mut sink, 2, 2);
        drop(sink);
        let r = verify(&path);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!((r.unchained, r.events), (2, 2));
        // Turning the chain off again breaks verification where it happened.
        let mut sink = JsonlFileSink::open_with(&path, off).unwrap();
        write(&mut sink, 1, 4);
        drop(sink);
        assert_eq!(broken_at(&verify(&path)), ("audit.jsonl".to_owned(), 5));
    }

    #[test]
    fn special_files_are_never_rotated_or_read_back() {
        let opts = JsonlOptions {
            rotate_bytes: Some(1),
            rotate_daily: true,
            ..JsonlOptions::default()
        };
        let mut sink = JsonlFileSink::open_with(Path::new("/dev/null"), opts).unwrap();
        write(&mut sink, 2, 0);
        write(&mut sink, 2, 0);
        assert!(sink.take_warning().is_none());
    }

    #[test]
    fn zero_rotate_bytes_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let opts = JsonlOptions {
            rotate_bytes: Some(0),
            ..JsonlOptions::default()
        };
        let err = JsonlFileSink::open_with(&dir.path().join("a.jsonl"), opts).unwrap_err();
        assert!(err.to_string().contains("rotate_bytes"), "{err}");
    }

    #[test]
    fn two_writers_on_one_log_keep_one_chain_through_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        // Three lines per file or so; the two writers take turns.
        let opts = JsonlOptions {
            rotate_bytes: Some(400),
            ..JsonlOptions::default()
        };
        let mut a = JsonlFileSink::open_with(&path, opts.clone()).unwrap();
        let mut b = JsonlFileSink::open_with(&path, opts).unwrap();
        for i in 0..20 {
            let sink = if i % 3 == 0 { &mut b } else { &mut a };
            write(sink, 1, i);
        }
        drop((a, b));
        let files = log_files(&path).unwrap();
        assert!(files.len() > 4, "{files:?}");
        assert_eq!(numbers(&files), (0..20).collect::<Vec<_>>());
        let r = verify(&path);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.events, 20);
    }

    #[test]
    fn a_writer_whose_new_file_is_rotated_away_before_it_locks_it_follows_the_live_file() {
        // C and A append to one log that rotates at every batch. A rotates L2 away and
        // creates L3; before A locks L3, C (its handle on an older file whose lock is
        // free) writes to L3 and then rotates it away in turn (to L4). A must not append
        // to the rotated L3 with a chain taken from L4: it follows the live file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut c = rotating(&path);
        write(&mut c, 1, 0); // L1: 0
        let mut a = rotating(&path);
        write(&mut a, 1, 1); // L1 rotated; L2: 1 (C's handle is on the rotated L1 now)
        let c = std::sync::Arc::new(parking_lot::Mutex::new(Some(c)));
        let c_in_hook = std::sync::Arc::clone(&c);
        a.after_open = Some(Hook(Box::new(move || {
            if let Some(mut c) = c_in_hook.lock().take() {
                write(&mut c, 1, 2); // into L3, which A created and has not locked yet
                write(&mut c, 1, 3); // rotates L3 away; L4: 3
            }
        })));
        write(&mut a, 1, 4); // rotates L2; its hook runs C; then A writes 4
        a.after_open = None;
        write(&mut a, 1, 5);
        let files = log_files(&path).unwrap();
        let mut seen = numbers(&files);
        seen.sort_unstable();
        assert_eq!(seen, (0..6).collect::<Vec<u64>>(), "{files:?}");
        let r = verify(&path);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.events, 6);
    }

    #[test]
    fn concurrent_writer_threads_on_one_log_lose_nothing_and_verify() {
        use super::super::{AuditEvent, AuditWriter, Status, WriterOptions};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let per = 3000;
        let handles: Vec<_> = (0..3)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let opts = JsonlOptions {
                        rotate_bytes: Some(64 * 1024),
                        ..JsonlOptions::default()
                    };
                    let w = AuditWriter::open_jsonl_with(&path, WriterOptions::default(), opts)
                        .unwrap();
                    for i in 0..per {
                        let ev = AuditEvent::new(format!("{t}:{i}"), "n", "tool", Status::Ok);
                        assert!(w.enqueue(ev));
                        if i % 500 == 0 {
                            w.flush().unwrap();
                        }
                    }
                    w.close().unwrap();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let files = log_files(&path).unwrap();
        let mut seen = std::collections::HashSet::new();
        for f in &files {
            for l in read(f) {
                let v: Value = serde_json::from_str(&l).unwrap();
                assert!(seen.insert(v["key_id"].as_str().unwrap().to_owned()));
            }
        }
        assert_eq!(seen.len(), 3 * per);
        let r = verify(&path);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.events, 3 * per as u64);
    }

    // ---- tampering: each kind is found at the right place ----

    /// A log of three files (3, 4, 3 lines), their paths, and a clean check.
    fn three_files(dir: &Path) -> (PathBuf, Vec<PathBuf>) {
        let path = log_set(dir, &[3, 4, 3]);
        let files = log_files(&path).unwrap();
        assert_eq!(files.len(), 3);
        assert!(verify(&path).is_ok());
        (path, files)
    }

    fn edit(file: &Path, f: impl FnOnce(&mut Vec<String>)) {
        let mut ls = read(file);
        f(&mut ls);
        std::fs::write(file, ls.concat()).unwrap();
    }

    #[test]
    fn an_edited_field_is_found_on_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let (path, files) = three_files(dir.path());
        edit(&files[1], |ls| ls[2] = ls[2].replace("\"n\":5", "\"n\":9"));
        let r = verify(&path);
        assert_eq!(broken_at(&r), (name(&files[1]), 3));
        assert!(r.broken.unwrap().reason.contains("edited"));
        assert_eq!(r.events, 5);
    }

    #[test]
    fn an_edit_of_the_very_first_line_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let (path, files) = three_files(dir.path());
        edit(&files[0], |ls| ls[0] = ls[0].replace("\"n\":0", "\"n\":1"));
        assert_eq!(broken_at(&verify(&path)), (name(&files[0]), 1));
    }

    #[test]
    fn a_deleted_line_is_found_where_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let (path, files) = three_files(dir.path());
        edit(&files[1], |ls| {
            ls.remove(1);
        });
        assert_eq!(broken_at(&verify(&path)), (name(&files[1]), 2));
        // Deleting the first line of the log is found too.
        let dir = tempfile::tempdir().unwrap();
        let (path, files) = three_files(dir.path());
        edit(&files[0], |ls| {
            ls.remove(0);
        });
        let r = verify(&path);
        assert_eq!(broken_at(&r), (name(&files[0]), 1));
        assert!(r.broken.unwrap().reason.contains("deleted"));
    }

    #[test]
    fn an_inserted_line_is_found_on_its_line() {
        for copy_of in [None, Some(0), Some(1)] {
            let dir = tempfile::tempdir().unwrap();
            let (path, files) = three_files(dir.path());
            edit(&files[1], |ls| {
                let line = match copy_of {
                    None => "{\"ts\":\"2026-03-09T14:00:00.000Z\",\"n\":42}\n".to_owned(),
                    Some(i) => ls[i].clone(),
                };
                ls.insert(2, line);
            });
            let r = verify(&path);
            assert_eq!(broken_at(&r), (name(&files[1]), 3), "{copy_of:?}");
        }
    }

    #[test]
    fn two_reordered_lines_are_found_at_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let (path, files) = three_files(dir.path());
        edit(&files[1], |ls| ls.swap(1, 2));
        let r = verify(&path);
        assert_eq!(broken_at(&r), (name(&files[1]), 2));
    }

    #[test]
    fn a_cut_last_line_is_a_crash_unless_it_keeps_its_newline() {
        let dir = tempfile::tempdir().unwrap();
        let (path, files) = three_files(dir.path());
        let data = std::fs::read(&files[2]).unwrap();
        std::fs::write(&files[2], &data[..data.len() - 20]).unwrap();
        let r = verify(&path);
        assert!(r.is_ok(), "a crash mid-write leaves this: {r:?}");
        assert_eq!(r.torn_at_end, [(files[2].clone(), 3)]);
        // Cut inside the chain value, newline kept: not a crash, found.
        let (path, files) = three_files(&dir.path().join("x").tap_mkdir());
        edit(&files[2], |ls| {
            let l = ls[2].trim_end().to_owned();
            ls[2] = format!("{}\n", &l[..l.len() - 10]);
        });
        assert_eq!(broken_at(&verify(&path)), (name(&files[2]), 3));
    }

    #[test]
    fn a_deleted_file_in_the_middle_is_found_at_the_next_file() {
        let dir = tempfile::tempdir().unwrap();
        let (path, files) = three_files(dir.path());
        std::fs::remove_file(&files[1]).unwrap();
        let r = verify(&path);
        assert_eq!(broken_at(&r), (name(&files[2]), 1));
        assert!(r
            .broken
            .unwrap()
            .reason
            .contains("file in between is missing"));
    }

    #[test]
    fn stripping_the_chain_from_lines_does_not_pass_for_an_old_log() {
        // The whole first file rewritten without chain fields.
        let dir = tempfile::tempdir().unwrap();
        let (path, files) = three_files(dir.path());
        edit(&files[0], |ls| {
            for l in ls.iter_mut() {
                let at = l.find(",\"id\":").unwrap();
                *l = format!("{}}}\n", &l[..at]).replace("\"n\":0", "\"n\":7");
            }
        });
        let r = verify(&path);
        assert_eq!(broken_at(&r), (name(&files[1]), 1));
        assert!(r.broken.unwrap().reason.contains("stripped"));
        // A log with no chain at all verifies nothing: that is a failure, not an OK.
        let p = dir.path().join("plain.jsonl");
        std::fs::write(&p, "{\"a\":1}\n{\"a\":2}\n").unwrap();
        let r = verify(&p);
        assert_eq!(broken_at(&r), ("plain.jsonl".to_owned(), 1));
        assert!(r
            .broken
            .unwrap()
            .reason
            .contains("no line carries a hash chain"));
        // An empty log has nothing wrong with it.
        let p = dir.path().join("empty.jsonl");
        std::fs::write(&p, "").unwrap();
        assert!(verify(&p).is_ok());
    }

    #[test]
    fn a_keyed_chain_needs_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let key = ChainKey::new(b"k1").unwrap();
        let opts = JsonlOptions {
            chain_key: Some(key.clone()),
            ..JsonlOptions::default()
        };
        let mut sink = JsonlFileSink::open_with(&path, opts.clone()).unwrap();
        write(&mut sink, 3, 0);
        drop(sink);
        let mut sink = JsonlFileSink::open_with(&path, opts).unwrap(); // restart
        write(&mut sink, 1, 3);
        drop(sink);
        let files = log_files(&path).unwrap();
        assert!(verify_files(&files, Some(&key)).unwrap().is_ok());
        let wrong = ChainKey::new(b"k2").unwrap();
        let r = verify_files(&files, Some(&wrong)).unwrap();
        assert_eq!(broken_at(&r), ("audit.jsonl".to_owned(), 1));
        assert!(r.broken.unwrap().reason.contains("chain key"));
        assert!(!verify(&path).is_ok());
    }

    trait TapMkdir {
        fn tap_mkdir(self) -> Self;
    }

    impl TapMkdir for PathBuf {
        fn tap_mkdir(self) -> Self {
            std::fs::create_dir_all(&self).unwrap();
            self
        }
    }
}
