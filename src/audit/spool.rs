//! Reading the HTTP audit spool for a batch: the shipper's inner loop, in Rust so that
//! it runs without the GIL (the Python shipper thread only sends the result).
//!
//! The spool is a chained JSONL log ([`chain`](super::chain)). A batch takes complete
//! chained lines in order, up to a line count and a body size; anything else that is
//! not blank (a torn line from a crash, ended by the writer) is skipped and counted, and
//! the restart records that acknowledge such lines are skipped (they are not events).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use memchr::{memchr, memmem};

use super::chain::is_restart;

/// Bytes read from a spool file at once, at least (more if the batch allows).
pub const READ_CHUNK: usize = 1 << 20;

/// `,"chain":"` + 64 hex + `"}`: how every chained line ends.
const CHAIN_TAIL: &[u8] = b",\"chain\":\"";
const TAIL_LEN: usize = 76;
const ID_KEY: &[u8] = b"\"id\":\"";
const ID_LEN: usize = 26;

/// Where a batch stands while it is gathered across spool files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchRoom {
    /// Lines already in the batch.
    pub lines: usize,
    /// Most lines per batch.
    pub max_lines: usize,
    /// Body bytes so far (`[`, `]` and the commas counted).
    pub size: usize,
    /// Most body bytes (one line always goes).
    pub max_bytes: usize,
}

/// What one read of one spool file added to a batch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpoolRead {
    /// The lines taken, joined by `,`.
    pub body: Vec<u8>,
    /// How many lines were taken.
    pub lines: usize,
    /// Event id of the first and of the last line taken.
    pub first_id: String,
    pub last_id: String,
    /// Bytes consumed from the offset on (through the last newline looked at).
    pub consumed: u64,
    /// Non-blank lines skipped because they are not complete chained lines.
    pub malformed: usize,
    /// The file's size when read.
    pub file_size: u64,
    /// The batch's body size after this read.
    pub size: usize,
}

/// Whether `line` is a complete chained line (ends with the chain field).
fn is_sealed(line: &[u8]) -> bool {
    let n = line.len();
    n >= TAIL_LEN
        && &line[n - TAIL_LEN..n - TAIL_LEN + CHAIN_TAIL.len()] == CHAIN_TAIL
        && line[n - 1] == b'}'
}

/// The event id of a chained line (`""` if it has none).
fn event_id(line: &[u8]) -> String {
    memmem::rfind(line, ID_KEY)
        .and_then(|at| line.get(at + ID_KEY.len()..at + ID_KEY.len() + ID_LEN))
        .map(|id| String::from_utf8_lossy(id).into_owned())
        .unwrap_or_default()
}

/// Reads the spool file `path` from `offset` and takes the chained lines that fit in
/// `room`. `None` if the file is gone or is no longer inode `ino` (rotated since it was
/// listed: list again).
///
/// # Errors
/// An I/O error other than "not found".
pub fn read_spool(
    path: &Path,
    ino: u64,
    offset: u64,
    room: BatchRoom,
) -> io::Result<Option<SpoolRead>> {
    let mut f = match File::open(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        other => other?,
    };
    if inode(&f)? != ino {
        return Ok(None);
    }
    f.seek(SeekFrom::Start(offset))?;
    let want = READ_CHUNK.max(room.max_bytes.saturating_sub(room.size) + 1);
    let mut data = Vec::with_capacity(want);
    (&mut f).take(want as u64).read_to_end(&mut data)?;
    let mut out = SpoolRead {
        file_size: f.metadata()?.len(),
        size: room.size,
        ..SpoolRead::default()
    };
    let mut pos = 0;
    let mut last: &[u8] = &[];
    while room.lines + out.lines < room.max_lines {
        let Some(k) = memchr(b'\n', &data[pos..]) else {
            break;
        };
        let line = &data[pos..pos + k];
        if room.lines + out.lines > 0 && out.size + line.len() + 1 > room.max_bytes {
            break;
        }
        pos += k + 1;
        if is_restart(line) {
            // The writer's acknowledgement of a torn line before it: not an event.
        } else if is_sealed(line) {
            if out.lines == 0 {
                out.first_id = event_id(line);
            } else {
                out.body.push(b',');
            }
            out.body.extend_from_slice(line);
            out.lines += 1;
            out.size += line.len() + 1;
            last = line;
        } else if !line.trim_ascii().is_empty() {
            out.malformed += 1; // a torn line from a crash, ended by the writer
        }
    }
    if out.lines > 0 {
        out.last_id = event_id(last);
    }
    out.consumed = pos as u64;
    Ok(Some(out))
}

#[cfg(unix)]
fn inode(f: &File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(f.metadata()?.ino())
}

#[cfg(not(unix))]
fn inode(_f: &File) -> io::Result<u64> {
    Ok(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing unwrap is a failing test")]
mod tests {
    use super::*;
    use crate::audit::chain::LineChain;

    fn sealed(n: usize) -> Vec<u8> {
        let mut sealer = LineChain::new(None, crate::audit::chain::GENESIS, true);
        let mut out = Vec::new();
        for i in 0..n {
            let line = format!("{{\"ts\":\"t\",\"key_id\":\"k{i}\"}}\n");
            sealer.seal(&mut out, line.as_bytes());
        }
        out
    }

    fn room(max_lines: usize, max_bytes: usize) -> BatchRoom {
        BatchRoom {
            lines: 0,
            max_lines,
            size: 2,
            max_bytes,
        }
    }

    fn ino(path: &Path) -> u64 {
        inode(&File::open(path).unwrap()).unwrap()
    }

    #[test]
    fn takes_chained_lines_in_order_and_skips_torn_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jsonl");
        let mut data = sealed(3);
        data.extend_from_slice(b"{\"torn\":\n\n   \n");
        data.extend_from_slice(&sealed(2)[..]);
        data.extend_from_slice(b"{\"no newline yet\"");
        std::fs::write(&path, &data).unwrap();
        let r = read_spool(&path, ino(&path), 0, room(100, 1 << 20))
            .unwrap()
            .unwrap();
        assert_eq!((r.lines, r.malformed), (5, 1));
        let body: Vec<serde_json::Value> =
            serde_json::from_slice(&[b"[", &r.body[..], b"]"].concat()).unwrap();
        let keys: Vec<&str> = body.iter().map(|v| v["key_id"].as_str().unwrap()).collect();
        assert_eq!(keys, ["k0", "k1", "k2", "k0", "k1"]);
        assert_eq!(r.first_id, body[0]["id"].as_str().unwrap());
        assert_eq!(r.last_id, body[4]["id"].as_str().unwrap());
        // Everything through the last newline is consumed; the unfinished line is not.
        assert_eq!(
            r.consumed as usize,
            data.len() - b"{\"no newline yet\"".len()
        );
        assert_eq!(r.file_size, data.len() as u64);
        assert_eq!(r.size, 2 + r.body.len() + 1);
    }

    #[test]
    fn stops_at_the_line_and_byte_limits_but_always_takes_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jsonl");
        let data = sealed(10);
        std::fs::write(&path, &data).unwrap();
        let ends: Vec<usize> = (0..data.len()).filter(|&i| data[i] == b'\n').collect();
        let one_line = ends[0] + 1;
        let r = read_spool(&path, ino(&path), 0, room(4, 1 << 20))
            .unwrap()
            .unwrap();
        assert_eq!((r.lines, r.consumed as usize), (4, ends[3] + 1));
        // A byte limit below one line still takes one line.
        let r = read_spool(&path, ino(&path), 0, room(100, 10))
            .unwrap()
            .unwrap();
        assert_eq!(r.lines, 1);
        // From an offset, with lines already in the batch from another file.
        let full = BatchRoom {
            lines: 99,
            ..room(100, 1 << 20)
        };
        let r = read_spool(&path, ino(&path), one_line as u64, full)
            .unwrap()
            .unwrap();
        assert_eq!(r.lines, 1);
        assert!(r.first_id == r.last_id && !r.first_id.is_empty());
    }

    #[test]
    fn a_missing_or_replaced_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jsonl");
        assert!(read_spool(&path, 1, 0, room(10, 100)).unwrap().is_none());
        std::fs::write(&path, sealed(1)).unwrap();
        let old = ino(&path);
        let other = dir.path().join("t.jsonl");
        std::fs::write(&other, sealed(1)).unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert!(read_spool(&path, old, 0, room(10, 100)).unwrap().is_none());
    }
}
