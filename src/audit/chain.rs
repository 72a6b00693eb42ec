//! Tamper evidence for JSONL audit logs: an event id and a hash chain on every line.
//!
//! The JSONL sink's writer thread ends every line with two fields, after all others:
//!
//! ```text
//! {"ts":...,"metadata":{},"id":"01JNV4C7B0ZK3W5T6Y8A9QXMRD","chain":"3f5a...64 hex"}
//! ```
//!
//! - `id`: 26 characters of Crockford base32 (ULID layout): 48 bits of Unix
//!   milliseconds at write time, then 80 bits that start at a random value per
//!   process and count up by one per event. Ids sort in write order within a
//!   process and are unique across processes for all practical purposes: use
//!   them to ingest events idempotently.
//! - `chain`: lowercase hex of `BLAKE3(prev || line[..c])`, where `prev` is the
//!   previous line's chain value (32 raw bytes) and `line[..c]` is this line's
//!   bytes up to, not including, `,"chain":"`. With a chain key the hash is
//!   BLAKE3's keyed mode, under the key `BLAKE3-derive_key(KEY_CONTEXT, secret)`.
//!
//! The first line the writer puts into a file that holds no chained line yet
//! (a new log, the fresh file after a rotation, or a file written before the
//! chain was turned on) also carries `"prev":"<64 hex>"` just before `"chain"`:
//! the chain value it continues from ([`GENESIS`], all zeros, for a new log).
//! That makes every file self-describing: the first line of the oldest file
//! left by retention can be checked, and a file whose first line does not
//! continue from the previous file's last line is reported.
//!
//! The chain continues across rotation and restarts: on open, the sink reads
//! the chain value of the last complete line of the newest file ([`tail_state`]).
//!
//! **Torn lines.** A crash (or a full disk) can leave an incomplete line, which
//! carries no chain. Such a line is accepted only where a crash leaves one: at
//! the end of a file, or in the middle when the very next line is the **restart
//! record** the writer puts after it when it next writes to that file
//! ([`scan_tail`], [`restart_line`]):
//!
//! ```text
//! {"ts":"2026-03-09T14:00:00.123Z","record":"restart","torn_bytes":57,"torn_blake3":"<64 hex>","id":...,"chain":...}
//! ```
//!
//! `torn_bytes` and `torn_blake3` (unkeyed BLAKE3, lowercase hex) cover the bytes
//! from the start of the first incomplete line after the last complete one to the
//! end of the last, their newlines in between included (the newline ending the last
//! one, which the writer adds, is not). The record is chained like any line, so
//! with a chain key nobody else can write one: an incomplete line inserted
//! anywhere else, a restart record that does not match the bytes before it, or one
//! whose incomplete line was removed, breaks verification at that line.
//!
//! **What it proves.** Without a key, the chain detects accidental damage and
//! naive edits (a changed, deleted, inserted or reordered line, a truncated last
//! line, a missing file between two others); anyone who can edit the file can
//! also recompute the hashes after their edit. With a key the attacker must also
//! know the key. Removing whole files at the *start* (as retention does) or
//! lines at the very *end* cannot be seen from the files alone: keep the last
//! chain value ([`VerifyReport::last_chain`]) elsewhere to check the end.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::AuditError;

/// The chain value a new log starts from: 32 zero bytes.
pub const GENESIS: [u8; 32] = [0; 32];

/// BLAKE3 `derive_key` context that turns a chain secret into the 32-byte key.
pub const KEY_CONTEXT: &str = "fastmcp-guard 2026-03 audit chain key v1";

/// Length of an event id (26 Crockford base32 characters).
pub const ID_LEN: usize = 26;

/// `,"chain":"` — what ends the hashed part of a line.
const CHAIN_FIELD: &[u8] = b",\"chain\":\"";
/// `,"prev":"` — the file-start field before `chain`.
const PREV_FIELD: &[u8] = b",\"prev\":\"";
/// `,"chain":"` + 64 hex + `"}`: the end of every chained line.
const CHAIN_SUFFIX_LEN: usize = CHAIN_FIELD.len() + 64 + 2;
/// `,"prev":"` + 64 hex + `"`.
const PREV_LEN: usize = PREV_FIELD.len() + 64 + 1;
/// How a restart record starts: `{"ts":"` + 24 characters of time + `"`, then this.
const RESTART_HEAD: &[u8] = b",\"record\":\"restart\",\"torn_bytes\":";
/// The field after `torn_bytes`.
const RESTART_HASH: &[u8] = b",\"torn_blake3\":\"";
/// `{"ts":"` + a canonical time (24 characters) + `"`.
const TS_PREFIX_LEN: usize = 7 + 24 + 1;

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const HEX: &[u8; 16] = b"0123456789abcdef";
const MASK80: u128 = (1 << 80) - 1;
const MASK48: u64 = (1 << 48) - 1;

/// The key of a keyed chain, derived from a secret of any length.
#[derive(Clone, PartialEq, Eq)]
pub struct ChainKey([u8; 32]);

impl ChainKey {
    /// Derives the chain key from `secret` (any non-empty bytes, e.g. a passphrase).
    ///
    /// # Errors
    /// [`AuditError::InvalidOption`] for an empty secret.
    pub fn new(secret: &[u8]) -> Result<ChainKey, AuditError> {
        if secret.is_empty() {
            return Err(AuditError::InvalidOption {
                name: "chain_key",
                value: "an empty key".to_owned(),
                fix: "give a non-empty secret (32 random bytes or more is best), or none for an \
                      unkeyed chain",
            });
        }
        Ok(ChainKey(blake3::derive_key(KEY_CONTEXT, secret)))
    }
}

impl fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChainKey(****)")
    }
}

/// The chain value of a line whose hashed part is `msg`, following `prev`.
#[must_use]
pub fn link(key: Option<&ChainKey>, prev: &[u8; 32], msg: &[u8]) -> [u8; 32] {
    let mut h = match key {
        Some(k) => blake3::Hasher::new_keyed(&k.0),
        None => blake3::Hasher::new(),
    };
    h.update(prev);
    h.update(msg);
    *h.finalize().as_bytes()
}

/// Lowercase hex of a chain value.
#[must_use]
pub fn to_hex(v: &[u8; 32]) -> String {
    let mut s = String::with_capacity(64);
    for b in v {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

fn push_hex(out: &mut Vec<u8>, v: &[u8; 32]) {
    let mut hex = [0u8; 64];
    for (pair, b) in hex.chunks_exact_mut(2).zip(v) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
    out.extend_from_slice(&hex);
}

fn parse_hex(h: &[u8]) -> Option<[u8; 32]> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    if h.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in h.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// A chained line taken apart: the hashed part ends at `msg_end`; `prev` is
/// the recorded `"prev"` of a file-start line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    /// End of the hashed part (where `,"chain":"` starts).
    pub msg_end: usize,
    /// The line's chain value.
    pub chain: [u8; 32],
    /// The `"prev"` field, present on the first chained line of a file.
    pub prev: Option<[u8; 32]>,
}

/// Parses the end of a chained line (`line` without its `\n`); `None` if the
/// line does not end with `,"chain":"<64 hex>"}`.
#[must_use]
pub fn parse_sealed(line: &[u8]) -> Option<Sealed> {
    let n = line.len();
    if n < CHAIN_SUFFIX_LEN + 1 || !line.ends_with(b"\"}") {
        return None;
    }
    let msg_end = n - CHAIN_SUFFIX_LEN;
    if &line[msg_end..msg_end + CHAIN_FIELD.len()] != CHAIN_FIELD {
        return None;
    }
    let chain = parse_hex(&line[msg_end + CHAIN_FIELD.len()..n - 2])?;
    let prev = if msg_end >= PREV_LEN
        && &line[msg_end - PREV_LEN..msg_end - PREV_LEN + PREV_FIELD.len()] == PREV_FIELD
        && line[msg_end - 1] == b'"'
    {
        parse_hex(&line[msg_end - 65..msg_end - 1])
    } else {
        None
    };
    Some(Sealed {
        msg_end,
        chain,
        prev,
    })
}

/// Incomplete lines at the end of a log file, as [`scan_tail`] finds them: the
/// bytes a restart record acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TornRegion {
    /// Offset of the first incomplete line.
    pub start: u64,
    /// Bytes from `start` to the end of the last incomplete line (without the
    /// newline that ends it, if the file has one).
    pub len: u64,
    /// Unkeyed BLAKE3 of those bytes.
    pub hash: [u8; 32],
}

/// Appends the restart record acknowledging `torn` (one line, ending with `\n`,
/// not yet sealed: the sealer chains it like any line).
pub fn restart_line(out: &mut Vec<u8>, ts: &chrono::DateTime<chrono::Utc>, torn: &TornRegion) {
    out.extend_from_slice(b"{\"ts\":\"");
    out.extend_from_slice(super::format_ts(ts).as_bytes());
    out.push(b'"');
    out.extend_from_slice(RESTART_HEAD);
    out.extend_from_slice(torn.len.to_string().as_bytes());
    out.extend_from_slice(RESTART_HASH);
    push_hex(out, &torn.hash);
    out.extend_from_slice(b"\"}\n");
}

/// Whether `line` is a restart record (see the module docs).
#[must_use]
pub fn is_restart(line: &[u8]) -> bool {
    line.starts_with(b"{\"ts\":\"")
        && line
            .get(TS_PREFIX_LEN..)
            .is_some_and(|rest| rest.starts_with(RESTART_HEAD))
}

/// The `(torn_bytes, torn_blake3)` of a restart record; `None` if `line` is not
/// one, or is a damaged one.
#[must_use]
pub fn parse_restart(line: &[u8]) -> Option<(u64, [u8; 32])> {
    if !is_restart(line) {
        return None;
    }
    let rest = &line[TS_PREFIX_LEN + RESTART_HEAD.len()..];
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let len: u64 = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    let rest = rest[digits..].strip_prefix(RESTART_HASH)?;
    let hash = parse_hex(rest.get(..64)?)?;
    (rest.get(64) == Some(&b'"')).then_some((len, hash))
}

// ---------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------

/// Event ids: 48-bit milliseconds + an 80-bit counter that starts at random.
#[derive(Debug, Clone)]
struct IdGen {
    ms: u64,
    counter: u128,
}

impl IdGen {
    fn new() -> IdGen {
        let mut seed = [0u8; 16];
        if getrandom::fill(&mut seed[..10]).is_err() {
            // No OS randomness (very unusual): derive a start from the time and pid.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let mut h = blake3::Hasher::new();
            h.update(&nanos.to_le_bytes());
            h.update(&std::process::id().to_le_bytes());
            seed[..10].copy_from_slice(&h.finalize().as_bytes()[..10]);
        }
        IdGen {
            ms: 0,
            counter: u128::from_le_bytes(seed) & MASK80,
        }
    }

    /// The next id, stamped `max(now_ms, last)` so ids never go back in time.
    fn next(&mut self, now_ms: u64) -> [u8; ID_LEN] {
        self.ms = self.ms.max(now_ms & MASK48);
        self.counter = (self.counter + 1) & MASK80;
        let v = u128::from(self.ms) << 80 | self.counter;
        let mut out = [0u8; ID_LEN];
        for (i, c) in out.iter_mut().enumerate() {
            // 26 x 5 = 130 bits: the first character holds the top 3.
            #[allow(clippy::cast_possible_truncation, reason = "masked to 5 bits")]
            let d = ((v >> (125 - 5 * i)) & 31) as usize;
            *c = CROCKFORD[d];
        }
        out
    }
}

/// Appends `id` and `chain` (and `prev` at a file start) to lines: the
/// writer-side state of one chained JSONL log.
#[derive(Debug, Clone)]
pub struct LineChain {
    key: Option<ChainKey>,
    prev: [u8; 32],
    /// The next line starts a file (gets a `"prev"` field).
    at_start: bool,
    ids: IdGen,
    now_ms: u64,
}

impl LineChain {
    /// A sealer continuing from `prev`; `at_start`: the next line is the first
    /// chained line of its file.
    #[must_use]
    pub fn new(key: Option<ChainKey>, prev: [u8; 32], at_start: bool) -> LineChain {
        LineChain {
            key,
            prev,
            at_start,
            ids: IdGen::new(),
            now_ms: 0,
        }
    }

    /// The chain value the next line continues from, and whether it starts a file.
    #[must_use]
    pub fn state(&self) -> ([u8; 32], bool) {
        (self.prev, self.at_start)
    }

    /// Rolls the state back (after a failed write) or forward.
    pub fn set_state(&mut self, prev: [u8; 32], at_start: bool) {
        self.prev = prev;
        self.at_start = at_start;
    }

    /// Sets the write time stamped into the ids of the following lines.
    pub fn set_time(&mut self, unix_ms: u64) {
        self.now_ms = unix_ms;
    }

    /// Appends `line` (one JSON object followed by `\n`) to `out` with the
    /// fields `"id"`, `"prev"` (at a file start) and `"chain"` added before its
    /// closing brace, and returns its chain value. A line that does not end
    /// with `}\n` (never produced by the writer) is copied unchanged, does not
    /// advance the chain, and `None` is returned.
    pub fn seal(&mut self, out: &mut Vec<u8>, line: &[u8]) -> Option<[u8; 32]> {
        let n = line.len();
        if n < 3 || line[n - 2] != b'}' || line[n - 1] != b'\n' || line[0] != b'{' {
            out.extend_from_slice(line);
            return None;
        }
        let start = out.len();
        out.reserve(n + 48 + PREV_LEN + CHAIN_SUFFIX_LEN);
        out.extend_from_slice(&line[..n - 2]);
        // `{}` gets no leading comma.
        out.extend_from_slice(if n == 3 { b"\"id\":\"" } else { b",\"id\":\"" });
        out.extend_from_slice(&self.ids.next(self.now_ms));
        out.push(b'"');
        if self.at_start {
            out.extend_from_slice(PREV_FIELD);
            push_hex(out, &self.prev);
            out.push(b'"');
        }
        let chain = link(self.key.as_ref(), &self.prev, &out[start..]);
        out.extend_from_slice(CHAIN_FIELD);
        push_hex(out, &chain);
        out.extend_from_slice(b"\"}\n");
        self.prev = chain;
        self.at_start = false;
        Some(chain)
    }
}

/// What the end of an existing log file says about the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// No complete line (a new, empty or only torn file).
    Empty,
    /// The last complete line carries no chain (written with the chain off,
    /// or by an older version).
    Unsealed,
    /// The last complete line's chain value.
    Sealed([u8; 32]),
}

/// Reads the end of the log file at `path`: the chain value of its last
/// complete line, skipping the incomplete lines after it (see [`scan_tail`]).
/// Not a regular file: [`Tail::Empty`].
///
/// # Errors
/// The I/O error (a missing file is [`Tail::Empty`]).
pub fn tail_state(path: &Path) -> io::Result<Tail> {
    Ok(scan_tail(path)?.tail)
}

/// What the end of a log file holds: see [`scan_tail`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TailScan {
    /// The last complete line's chain state.
    pub tail: Tail,
    /// The incomplete lines after it, if any: what a restart record must
    /// acknowledge before anything else is appended.
    pub torn: Option<TornRegion>,
}

/// Most bytes [`scan_tail`] reads back from the end of a file: past this, what
/// is left unread stays unacknowledged (a file no writer of ours leaves).
const TAIL_SCAN_MAX: u64 = 64 << 20;

/// Reads the end of the log file at `path` line by line, backwards: the last
/// *complete* line (one JSON object, chained or not; a whole chained line that
/// only lacks its newline counts), and the incomplete lines after it (anything
/// else that is not blank: a torn write, or a restart record cut short by a
/// second crash). Blank lines are skipped (inside the torn region they are part
/// of its bytes). Not a regular file, or empty: [`Tail::Empty`], nothing torn.
///
/// # Errors
/// The I/O error (a missing file is [`Tail::Empty`]).
pub fn scan_tail(path: &Path) -> io::Result<TailScan> {
    let none = TailScan {
        tail: Tail::Empty,
        torn: None,
    };
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(none),
        Err(e) => return Err(e),
    };
    let meta = f.metadata()?;
    if !meta.is_file() || meta.len() == 0 {
        return Ok(none);
    }
    let len = meta.len();
    let last = read_range(&mut f, len - 1, len)?;
    // End of the region's bytes: the file's end, less the newline ending the last line.
    let content_end = if last == b"\n" { len - 1 } else { len };
    let mut end = content_end;
    let mut first_torn: Option<u64> = None;
    let tail = loop {
        let start = last_newline(&mut f, end)?.map_or(0, |p| p + 1);
        if len - start > TAIL_SCAN_MAX {
            break Tail::Empty;
        }
        let line = read_range(&mut f, start, end)?;
        if !line.iter().all(u8::is_ascii_whitespace) {
            if is_json_object(&line) {
                break classify(&line);
            }
            first_torn = Some(start);
        }
        if start == 0 {
            break Tail::Empty;
        }
        end = start - 1;
    };
    let torn = match first_torn {
        None => None,
        Some(start) => {
            let bytes = read_range(&mut f, start, content_end)?;
            Some(TornRegion {
                start,
                len: content_end - start,
                hash: *blake3::hash(&bytes).as_bytes(),
            })
        }
    };
    Ok(TailScan { tail, torn })
}

/// Whether `line` is one complete JSON object (what every writer writes).
fn is_json_object(line: &[u8]) -> bool {
    line.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
        && serde_json::from_slice::<serde::de::IgnoredAny>(line).is_ok()
}

/// Offset of the last `\n` in the first `len` bytes of `f`, read backwards in blocks.
fn last_newline(f: &mut File, len: u64) -> io::Result<Option<u64>> {
    const BLOCK: u64 = 64 * 1024;
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        let block = read_range(f, start, end)?;
        if let Some(i) = memchr::memrchr(b'\n', &block) {
            return Ok(Some(start + i as u64));
        }
        end = start;
    }
    Ok(None)
}

fn read_range(f: &mut File, start: u64, end: u64) -> io::Result<Vec<u8>> {
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(end - start).read_to_end(&mut buf)?;
    Ok(buf)
}

fn classify(line: &[u8]) -> Tail {
    match parse_sealed(line) {
        Some(s) => Tail::Sealed(s.chain),
        None => Tail::Unsealed,
    }
}

// ---------------------------------------------------------------------------
// Verifying
// ---------------------------------------------------------------------------

/// Where the chain broke, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// The file holding the first line that fails.
    pub path: PathBuf,
    /// Its 1-based line number in that file.
    pub line: u64,
    /// What is wrong, in words.
    pub reason: String,
}

/// The result of [`verify_files`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Chained lines checked and found intact (up to the break, if any).
    pub events: u64,
    /// Files read.
    pub files: usize,
    /// Lines without a chain before the first chained line (written before
    /// the chain was on); not covered by the check.
    pub unchained: u64,
    /// Incomplete lines (torn writes) accepted: each acknowledged by the restart
    /// record after it, or at the end of a file.
    pub torn: u64,
    /// Where incomplete lines end a file (file, first line of them): a crash
    /// while writing, not yet acknowledged by a restart record (the writer adds
    /// one when it next writes to that file).
    pub torn_at_end: Vec<(PathBuf, u64)>,
    /// The first chained line, when it continues from a chain value that is
    /// not [`GENESIS`]: earlier files are gone (removed by retention, or not
    /// given). Its own hash is still checked.
    pub continues_from: Option<(PathBuf, u64)>,
    /// Chain value of the last intact line (compare it with one kept
    /// elsewhere to detect lines removed at the end).
    pub last_chain: Option<[u8; 32]>,
    /// The first broken link; `None` when the whole log verifies.
    pub broken: Option<Break>,
}

impl VerifyReport {
    /// Whether every line checked out.
    #[must_use]
    pub fn is_ok(&self) -> bool {
        self.broken.is_none()
    }
}

/// How many recent chain values are kept to explain a break (a line that
/// chains from an earlier line than the previous one).
const RECENT: usize = 64;

struct Verifier<'k> {
    key: Option<&'k ChainKey>,
    report: VerifyReport,
    prev: Option<[u8; 32]>,
    /// The first of the incomplete lines (not one JSON object) just read, waiting
    /// for the restart record that must acknowledge them (or the end of the file).
    torn: Option<(usize, u64)>,
    /// How many such lines in a row.
    torn_run: u64,
    /// Their bytes, the newlines between them included (what a restart record's
    /// `torn_bytes` and `torn_blake3` cover).
    torn_len: u64,
    torn_hash: blake3::Hasher,
    /// Where the lines without a chain start.
    first_unchained: Option<(usize, u64)>,
    recent: VecDeque<([u8; 32], usize, u64)>,
    paths: Vec<PathBuf>,
}

impl Verifier<'_> {
    fn brk(&mut self, file: usize, line: u64, reason: String) {
        self.report.broken = Some(Break {
            path: self.paths[file].clone(),
            line,
            reason,
        });
    }

    fn place(&self, file: usize, line: u64) -> String {
        format!("{}:{line}", self.paths[file].display())
    }

    /// Checks one line (without its `\n`); returns false once broken.
    fn line(&mut self, file: usize, n: u64, line: &[u8]) -> bool {
        let blank = line.iter().all(u8::is_ascii_whitespace);
        if self.torn.is_some() {
            if blank || !is_json_object(line) {
                self.torn_hash.update(b"\n");
                self.torn_hash.update(line);
                self.torn_len += 1 + line.len() as u64;
                self.torn_run += u64::from(!blank);
                return true;
            }
            // A complete line after incomplete ones: the restart record, or forgery.
            if !self.acknowledge(file, n, line) {
                return false;
            }
        } else if blank {
            return true;
        } else if is_restart(line) {
            self.brk(
                file,
                n,
                "a restart record with no incomplete line before it: the line it acknowledges \
                 was removed"
                    .to_owned(),
            );
            return false;
        }
        let Some(s) = parse_sealed(line) else {
            return self.unsealed(file, n, line);
        };
        let msg = &line[..s.msg_end];
        let Some(prev) = self.prev else {
            // The first chained line: it must say what it continues from.
            let Some(recorded) = s.prev else {
                self.brk(
                    file,
                    n,
                    "the first chained line does not start a file (it has no \"prev\" field): \
                     lines before it were deleted"
                        .to_owned(),
                );
                return false;
            };
            if link(self.key, &recorded, msg) != s.chain {
                let reason = format!(
                    "the chain value does not match: {}",
                    mismatch_reason(self.key.is_some())
                );
                self.brk(file, n, reason);
                return false;
            }
            if recorded != GENESIS {
                if self.report.unchained > 0 {
                    // After lines written before the chain, the writer starts at GENESIS.
                    self.brk(
                        file,
                        n,
                        "the chain continues from lines that are not here, yet lines without \
                         a chain come before it: lines were stripped of their chain fields"
                            .to_owned(),
                    );
                    return false;
                }
                self.report.continues_from = Some((self.paths[file].clone(), n));
            }
            return self.accept(file, n, s.chain);
        };
        if link(self.key, &prev, msg) == s.chain {
            return self.accept(file, n, s.chain);
        }
        // Broken: say as much as can be told.
        if let Some(&(_, f, l)) = self.recent.iter().find(|(c, _, _)| *c == s.chain) {
            let reason = format!(
                "the line is a copy of {}: it was inserted (or moved) here",
                self.place(f, l)
            );
            self.brk(file, n, reason);
            return false;
        }
        if let Some(recorded) = s.prev {
            if recorded != prev {
                let what = if n == 1 && file > 0 {
                    format!(
                        "the file does not continue from the last line of {}: a file in \
                         between is missing, or lines were removed at the end of that file",
                        self.paths[file - 1].display()
                    )
                } else {
                    "the line starts a new chain in the middle of the log: lines or files \
                     before it are missing"
                        .to_owned()
                };
                self.brk(file, n, what);
                return false;
            }
        }
        let from = self
            .recent
            .iter()
            .rev()
            .skip(1)
            .find(|(c, _, _)| link(self.key, c, msg) == s.chain)
            .map(|&(_, f, l)| (f, l));
        let reason = match from {
            Some((f, l)) => format!(
                "the line chains from {} instead of the line just before it: lines were \
                 inserted or moved here",
                self.place(f, l)
            ),
            None if n == 1 && file > 0 => format!(
                "the file's first line does not chain from the last line of {}: a file in \
                 between is missing, or {}",
                self.paths[file - 1].display(),
                mismatch_reason(self.key.is_some())
            ),
            None => format!(
                "the chain value does not match: {}",
                mismatch_reason(self.key.is_some())
            ),
        };
        self.brk(file, n, reason);
        false
    }

    /// Judges the incomplete lines before `line` (a complete one, at `file:n`): fine
    /// only if `line` is the restart record acknowledging exactly their bytes.
    fn acknowledge(&mut self, file: usize, n: u64, line: &[u8]) -> bool {
        let Some((tf, tn)) = self.torn.take() else {
            return true;
        };
        let run = std::mem::take(&mut self.torn_run);
        let (len, hash) = (self.torn_len, *self.torn_hash.finalize().as_bytes());
        let why = match parse_restart(line) {
            Some((l, h)) if l == len && h == hash => {
                self.report.torn += run;
                return true;
            }
            Some((l, _)) => format!(
                "the restart record at {} does not acknowledge it ({}): the incomplete line \
                 was edited, or inserted before the record",
                self.place(file, n),
                if l == len {
                    "its torn_blake3 differs".to_owned()
                } else {
                    format!("it says {l} bytes, the incomplete line has {len}")
                }
            ),
            None => format!(
                "an incomplete line in the middle of the log, and the next line ({}) is not \
                 the restart record that would acknowledge it: it was inserted (a crash leaves \
                 one only at the end of a file, and the writer acknowledges it when it next \
                 writes there)",
                self.place(file, n)
            ),
        };
        self.brk(tf, tn, why);
        false
    }

    /// The end of a file (`newline`: its last byte is `\n`). Incomplete lines pending
    /// there are what a crash leaves, if the file ends in the middle of a line: a write
    /// cut short never ends with a newline. False once broken.
    fn end_of_file(&mut self, newline: bool) -> bool {
        let Some((f, n)) = self.torn.take() else {
            return true;
        };
        if newline {
            self.brk(
                f,
                n,
                "the file ends with an incomplete line that ends with a newline: a crash \
                 leaves a line cut short, without one; the line was edited or inserted"
                    .to_owned(),
            );
            return false;
        }
        self.report.torn += std::mem::take(&mut self.torn_run);
        self.report.torn_at_end.push((self.paths[f].clone(), n));
        true
    }

    fn accept(&mut self, file: usize, n: u64, chain: [u8; 32]) -> bool {
        self.prev = Some(chain);
        self.report.events += 1;
        self.report.last_chain = Some(chain);
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((chain, file, n));
        true
    }

    fn unsealed(&mut self, file: usize, n: u64, line: &[u8]) -> bool {
        if !is_json_object(line) {
            // Incomplete (or damaged): fine at the end of the file, or if the next
            // complete line is the restart record acknowledging it (see `line`).
            self.torn = Some((file, n));
            self.torn_run = 1;
            self.torn_len = line.len() as u64;
            self.torn_hash = blake3::Hasher::new();
            self.torn_hash.update(line);
            return true;
        }
        let has_field = memchr::memmem::find(line, b"\"chain\"").is_some()
            || memchr::memmem::find(line, b"\"prev\"").is_some();
        if self.prev.is_none() && !has_field {
            // Written before the chain was on: allowed before the first chained line.
            self.report.unchained += 1;
            self.first_unchained.get_or_insert((file, n));
            return true;
        }
        self.brk(
            file,
            n,
            if has_field {
                "the chain field is damaged or not the last field: the line was edited".to_owned()
            } else {
                "the line has no chain field: it was inserted, or written while the chain \
                 was off"
                    .to_owned()
            },
        );
        false
    }
}

fn mismatch_reason(keyed: bool) -> String {
    format!(
        "this line was edited, or lines before it were deleted, inserted or reordered{}",
        if keyed {
            " (or the chain key is not the one the log was written with)"
        } else {
            " (or the log was written with a chain key: give it)"
        }
    )
}

/// Checks the hash chain across `paths`, read in the order given (oldest
/// first, the live file last; see [`rotated_files`](super::rotated_files)).
/// Stops at the first broken link ([`VerifyReport::broken`]).
///
/// # Errors
/// [`AuditError::Read`] when a file cannot be opened or read (names the file).
pub fn verify_files(paths: &[PathBuf], key: Option<&ChainKey>) -> Result<VerifyReport, AuditError> {
    let mut v = Verifier {
        key,
        report: VerifyReport::default(),
        prev: None,
        torn: None,
        torn_run: 0,
        torn_len: 0,
        torn_hash: blake3::Hasher::new(),
        first_unchained: None,
        recent: VecDeque::with_capacity(RECENT),
        paths: paths.to_vec(),
    };
    let mut buf = Vec::with_capacity(64 * 1024);
    for (i, path) in paths.iter().enumerate() {
        let read_err = |source| AuditError::Read {
            path: path.clone(),
            source,
        };
        let file = File::open(path).map_err(read_err)?;
        if file.metadata().map_err(read_err)?.is_dir() {
            return Err(read_err(io::Error::from(io::ErrorKind::IsADirectory)));
        }
        v.report.files += 1;
        let mut r = BufReader::with_capacity(1 << 20, file);
        let mut n = 0u64;
        let mut newline = false;
        loop {
            buf.clear();
            if r.read_until(b'\n', &mut buf).map_err(read_err)? == 0 {
                break;
            }
            n += 1;
            newline = buf.last() == Some(&b'\n');
            let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
            if !v.line(i, n, line) {
                return Ok(v.report);
            }
        }
        if !v.end_of_file(newline) {
            return Ok(v.report);
        }
    }
    if let (None, Some((f, n))) = (v.prev, v.first_unchained) {
        v.brk(
            f,
            n,
            "no line carries a hash chain (written with chain=False, or before fastmcp-guard \
             0.3): nothing could be verified"
                .to_owned(),
        );
    }
    Ok(v.report)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing unwrap is a failing test")]
mod tests {
    use super::*;

    fn seal_all(s: &mut LineChain, lines: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for l in lines {
            s.seal(&mut out, format!("{l}\n").as_bytes()).unwrap();
        }
        out
    }

    #[test]
    fn ids_are_ulid_shaped_and_increase() {
        let mut g = IdGen::new();
        let a = g.next(1_773_064_800_123);
        let b = g.next(1_773_064_800_123);
        let c = g.next(1_773_064_800_000); // clock stepped back: never goes back
        assert!(a < b && b < c, "{a:?} {b:?} {c:?}");
        assert!(a.iter().all(|ch| CROCKFORD.contains(ch)));
        // The time prefix (10 chars = 50 bits, the top 2 zero) encodes the ms.
        let ms = a[..10].iter().fold(0u64, |acc, ch| {
            acc * 32 + CROCKFORD.iter().position(|x| x == ch).unwrap() as u64
        });
        assert_eq!(ms, 1_773_064_800_123);
        let mut other = IdGen::new();
        assert_ne!(
            other.next(1),
            IdGen::new().next(1),
            "random start per generator"
        );
    }

    #[test]
    fn sealed_lines_parse_back_and_chain() {
        let mut s = LineChain::new(None, GENESIS, true);
        s.set_time(1000);
        let out = seal_all(&mut s, &[r#"{"a":1}"#, r#"{"b":"x"}"#, "{}"]);
        let text = String::from_utf8(out.clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let mut prev = GENESIS;
        for (i, l) in lines.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["id"].as_str().unwrap().len(), ID_LEN);
            let p = parse_sealed(l.as_bytes()).unwrap();
            assert_eq!(p.prev.is_some(), i == 0, "prev only on the file start");
            assert_eq!(link(None, &prev, &l.as_bytes()[..p.msg_end]), p.chain);
            assert_eq!(v["chain"].as_str().unwrap(), to_hex(&p.chain));
            prev = p.chain;
        }
        assert!(lines[2].starts_with("{\"id\":"));
        assert_eq!(s.state(), (prev, false));
    }

    #[test]
    fn a_key_changes_every_chain_value() {
        let key = ChainKey::new(b"secret").unwrap();
        let mut a = LineChain::new(None, GENESIS, true);
        let mut b = LineChain::new(Some(key.clone()), GENESIS, true);
        let la = a.seal(&mut Vec::new(), b"{\"a\":1}\n").unwrap();
        let lb = b.seal(&mut Vec::new(), b"{\"a\":1}\n").unwrap();
        assert_ne!(la, lb);
        assert!(ChainKey::new(b"").is_err());
        assert_eq!(format!("{key:?}"), "ChainKey(****)");
    }

    #[test]
    fn lines_that_are_not_objects_are_copied_unchanged() {
        let mut s = LineChain::new(None, GENESIS, true);
        let mut out = Vec::new();
        assert!(s.seal(&mut out, b"[1]\n").is_none());
        assert!(s.seal(&mut out, b"{\"a\":1}").is_none());
        assert_eq!(out, b"[1]\n{\"a\":1}");
        assert_eq!(s.state(), (GENESIS, true));
    }

    proptest::proptest! {
        /// Any change to one byte of a chained log is found, at that line or the next
        /// (a byte turned into a newline splits the line).
        #[test]
        fn any_changed_byte_is_found(
            n in 1usize..8,
            which in 0usize..8,
            at in 0usize..400,
            xor in 1u8..=255,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut s = LineChain::new(None, GENESIS, true);
            let src: Vec<String> = (0..n).map(|i| format!(r#"{{"n":{i},"s":"x\u00e9"}}"#)).collect();
            let refs: Vec<&str> = src.iter().map(String::as_str).collect();
            let out = seal_all(&mut s, &refs);
            let text = String::from_utf8(out).unwrap();
            let mut lines: Vec<Vec<u8>> = text.split_inclusive('\n').map(|l| l.as_bytes().to_vec()).collect();
            let line = which % n;
            let body = lines[line].len() - 1; // keep the newline
            lines[line][at % body] ^= xor;
            let p = write(dir.path(), "a.jsonl", &lines.concat());
            let r = verify_files(&[p], None).unwrap();
            let b = r.broken.clone();
            proptest::prop_assert!(b.is_some(), "not found: line {} byte {} ^ {}", line, at % body, xor);
            let got = b.unwrap().line;
            proptest::prop_assert!(got == line as u64 + 1 || got == line as u64 + 2, "{:?}", r);
        }
    }

    fn write(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn tail_state_reads_the_last_complete_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = LineChain::new(None, GENESIS, true);
        let out = seal_all(&mut s, &[r#"{"a":1}"#, r#"{"a":2}"#]);
        let last = s.state().0;
        let p = write(dir.path(), "a.jsonl", &out);
        assert_eq!(tail_state(&p).unwrap(), Tail::Sealed(last));
        // A torn tail is skipped.
        let mut torn = out.clone();
        torn.extend_from_slice(b"{\"a\":3,\"id\"");
        let p = write(dir.path(), "b.jsonl", &torn);
        assert_eq!(tail_state(&p).unwrap(), Tail::Sealed(last));
        // A whole chained line that only lacks its newline counts.
        let p = write(dir.path(), "c.jsonl", &out[..out.len() - 1]);
        assert_eq!(tail_state(&p).unwrap(), Tail::Sealed(last));
        let mut blank = out.clone();
        blank.extend_from_slice(b"\n\n");
        let p = write(dir.path(), "blank.jsonl", &blank);
        assert_eq!(tail_state(&p).unwrap(), Tail::Sealed(last));
        let p = write(dir.path(), "d.jsonl", b"{\"legacy\":1}\n");
        assert_eq!(tail_state(&p).unwrap(), Tail::Unsealed);
        let p = write(dir.path(), "e.jsonl", b"{\"torn");
        assert_eq!(tail_state(&p).unwrap(), Tail::Empty);
        let p = write(dir.path(), "f.jsonl", b"");
        assert_eq!(tail_state(&p).unwrap(), Tail::Empty);
        assert_eq!(tail_state(&dir.path().join("none")).unwrap(), Tail::Empty);
        // A long torn tail spanning several read blocks.
        let mut long = out.clone();
        long.extend(std::iter::repeat_n(b'x', 200_000));
        let p = write(dir.path(), "g.jsonl", &long);
        assert_eq!(tail_state(&p).unwrap(), Tail::Sealed(last));
        // A long last line.
        let mut s2 = LineChain::new(None, GENESIS, true);
        let big = format!("{{\"a\":\"{}\"}}", "y".repeat(150_000));
        let out2 = seal_all(&mut s2, &[r#"{"a":1}"#, &big]);
        let p = write(dir.path(), "h.jsonl", &out2);
        assert_eq!(tail_state(&p).unwrap(), Tail::Sealed(s2.state().0));
    }
}
