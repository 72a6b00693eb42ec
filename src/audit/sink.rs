//! What the writer hands a sink: the queue's [`Entry`], the [`Batch`] of one write (JSONL
//! bytes or the queued [`Record`]s, as the sink's [`BatchFormat`] asks), and the [`Sink`]
//! trait a backend implements.

use std::io;

use super::{AuditError, AuditEvent};

// ---------------------------------------------------------------------------
// Queue entries
// ---------------------------------------------------------------------------

/// One slot of the writer's queue: an [`AuditEvent`], or that event's JSONL line
/// already rendered by the producer
/// ([`AuditWriter::enqueue_line`](super::AuditWriter::enqueue_line)). Entries are
/// boxed and go back to the producers for reuse once written, so a steady stream
/// of lines allocates nothing: the line buffer keeps its capacity.
#[derive(Debug, Clone)]
pub struct Entry {
    pub(super) event: AuditEvent,
    /// Non-empty: the complete line, ending with `\n` (`event` is then stale).
    pub(super) line: Vec<u8>,
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
    /// The events serialised by [`write_line`](super::write_line), one line each
    /// ([`Batch::jsonl`]).
    /// The thread recycles each event as soon as it is serialised.
    Jsonl,
    /// The entries as they were queued ([`Batch::records`]): events, or lines
    /// rendered by the producer; the thread serialises nothing.
    Events,
}

/// One entry of a [`BatchFormat::Events`] batch, as it was queued.
#[derive(Debug, Clone, Copy)]
pub enum Record<'a> {
    /// Queued by [`AuditWriter::enqueue`](super::AuditWriter::enqueue).
    Event(&'a AuditEvent),
    /// Queued by [`AuditWriter::enqueue_line`](super::AuditWriter::enqueue_line): one
    /// complete line laid out by [`write_line_parts`](super::write_line_parts), ending
    /// with `\n` (never sealed).
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
/// the queue logic; see [`AuditWriter::with_sink`](super::AuditWriter::with_sink).
///
/// A byte-oriented sink (a file, a socket) keeps the default
/// [`BatchFormat::Jsonl`] and reads [`Batch::jsonl`]; a sink that stores the
/// fields itself (such as [`SqliteSink`](super::SqliteSink)) asks for [`BatchFormat::Events`]
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
    /// [`WriterStats::write_errors`](super::WriterStats::write_errors) and keeps it for
    /// [`AuditWriter::last_error`](super::AuditWriter::last_error). Default: none.
    fn take_warning(&mut self) -> Option<AuditError> {
        None
    }
}
