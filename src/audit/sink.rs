//! What the writer hands a sink: the [`Batch`] of one write (the events, and their JSONL
//! lines when a sink reads those, as its [`BatchFormat`] asks), and the [`Sink`] trait a
//! backend implements.

use std::io;

use super::{AuditError, AuditEvent};

/// What a [`Sink`] reads from each [`Batch`] (see [`Sink::format`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchFormat {
    /// The events rendered by [`write_line`](super::write_line), one line each
    /// ([`Batch::jsonl`]): rendered once per batch for every sink that asks.
    Jsonl,
    /// The events themselves ([`Batch::events`]): the sink stores the fields (the
    /// `SQLite` sink binds them to columns).
    Events,
}

/// One batch as the writer thread hands it to a [`Sink`]: `len` events in enqueue
/// order, and their JSONL lines when a sink of the writer reads those.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    events: &'a [Box<AuditEvent>],
    jsonl: &'a [u8],
    len: usize,
}

impl<'a> Batch<'a> {
    /// A batch of `len` events: `events` (empty when no sink reads them: the writer
    /// then recycles each event as soon as it is rendered) and `jsonl`, their lines
    /// (empty when no sink reads those).
    #[must_use]
    pub fn new(events: &'a [Box<AuditEvent>], jsonl: &'a [u8], len: usize) -> Self {
        Batch { events, jsonl, len }
    }

    /// A batch of `events` only (no lines: for sinks that read events).
    #[must_use]
    pub fn of_events(events: &'a [Box<AuditEvent>]) -> Self {
        Batch::new(events, &[], events.len())
    }

    /// The events, in enqueue order ([`BatchFormat::Events`]).
    #[must_use]
    pub fn events(&self) -> &'a [Box<AuditEvent>] {
        self.events
    }

    /// The events as complete JSONL lines ([`BatchFormat::Jsonl`]).
    #[must_use]
    pub fn jsonl(&self) -> &'a [u8] {
        self.jsonl
    }

    /// Number of events in the batch.
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
/// the queue logic; see [`AuditWriter::new`](super::AuditWriter::new).
///
/// A byte-oriented sink (a file, a socket) keeps the default
/// [`BatchFormat::Jsonl`] and reads [`Batch::jsonl`]; a sink that stores the
/// fields itself (such as [`SqliteSink`](super::SqliteSink)) asks for [`BatchFormat::Events`]
/// and reads [`Batch::events`]; the thread renders lines only if some sink reads them.
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
