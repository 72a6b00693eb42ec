//! The audit writer: [`AuditWriter`], its bounded queue, the `fmg-audit` thread that
//! batches events to a [`Sink`], flush and close.
//!
//! The request path only calls [`AuditWriter::enqueue`], which moves the event
//! into a bounded queue and returns at once. One named thread (`fmg-audit`)
//! takes every event already queued (up to [`WriterOptions::batch_max`]) and
//! hands them to each of its sinks as one [`Batch`] (a single sink is a list of
//! one; see [`sinks`](super::sinks)): if a sink reads lines (JSONL, the HTTP
//! spool) the thread renders the events with [`write_line`] into one reused buffer,
//! once for all of them; the `SQLite` sink binds the events' fields itself, one
//! transaction per batch. Producers fill reused events in place
//! ([`AuditWriter::enqueue_fill`], which the Python binding uses).
//! Each sink is flushed to the OS after every batch and synced to disk on
//! [`AuditWriter::close`].
//!
//! Policies (documented here because callers depend on them):
//! - **Queue full:** the event is dropped and counted in
//!   [`WriterStats::dropped`]; `enqueue` returns `false`. It never blocks.
//! - **Write errors** (disk full, file made unwritable): the batch is lost for
//!   that sink (its [`SinkStats`]) and counted in [`WriterStats::write_errors`];
//!   when no sink recorded it, also in [`WriterStats::failed`]. The message is
//!   kept for [`AuditWriter::last_error`], and the thread goes on.
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
//!   after `close`, `enqueued == written + failed + skipped` (`skipped`: every
//!   sink was paused).
//!
//! Throughput notes (the thread must sustain > 1 M events/s on two cores):
//! the queue carries boxes that the writer hands back for reuse, so event
//! memory is freed by producer threads (see [`AuditWriter::enqueue`]). The thread
//! never blocks on the event queue (only on its control channel, with a timeout of
//! 1 ms under load and 25 ms at request rates or idle), so producers never pay a
//! futex wake-up and a quiet server wakes the thread 40 times a second.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use parking_lot::Mutex;

use super::sinks::SinkList;
use super::{
    write_line, AuditError, AuditEvent, Batch, BatchFormat, JsonlFileSink, JsonlOptions, Refusal,
    RefusalAggregator, RefusalOptions, Sink, SinkStats, SqliteSink,
};

// ---------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------

/// What became of a refusal given to [`AuditWriter::enqueue_refusal_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// Written one by one: its event was queued.
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
    /// through the `around` hook of [`AuditWriter::enqueue_fill`] (the Python
    /// binding releases the GIL there).
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
    /// How refusals logged with [`AuditWriter::enqueue_refusal_with`] are
    /// aggregated ([`refusals`](super::refusals)).
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
    /// Events written (by at least one sink: each sink's own count is in its
    /// [`SinkStats`]).
    pub written: u64,
    /// Events refused by `enqueue` (queue full, writer closed or paused).
    pub dropped: u64,
    /// Of `dropped`: refused while [`AuditWriter::pause`]d.
    pub paused_dropped: u64,
    /// Failed sink operations (writes, flushes, the final sync), over all sinks.
    pub write_errors: u64,
    /// Accepted events lost because their batch failed to write to every sink.
    /// After close, `enqueued == written + failed + skipped`.
    pub failed: u64,
    /// Accepted events no sink was given because every sink was paused (each sink
    /// counts them in its `paused_dropped`).
    pub skipped: u64,
    /// Events waiting in the queue now.
    pub queue_depth: usize,
    /// Refusals only counted, not written one by one (their summaries carry them;
    /// see [`refusals`](super::refusals)).
    pub refusals_suppressed: u64,
    /// Summary events the writer added (counted in `enqueued` too).
    pub refusal_summaries: u64,
}

/// The bounded wait of [`OnFull::Block`], handed to the `around` hook of
/// [`AuditWriter::enqueue_fill`]: call it; it returns whether the event got in.
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

impl LossReport {
    /// The warning an operator reads, for the log at `path`: how many events were lost
    /// since the last one, how (queue full, closed or paused; failed writes) and why.
    #[must_use]
    pub fn describe(&self, path: &str) -> String {
        format!(
            "audit log {path}: {} event{} lost since the last warning ({} dropped in all: queue \
             full, writer closed or paused{}; {} lost to failed writes in all){}",
            self.lost,
            plural(self.lost),
            self.dropped,
            if self.paused_dropped > 0 {
                format!(", {} of them while paused", self.paused_dropped)
            } else {
                String::new()
            },
            self.failed,
            loss_context(self.paused.as_deref(), self.last_error.as_deref()),
        )
    }
}

/// `"s"` unless `n` is 1.
pub(super) fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// `; paused: <why>` and `; last error: <message>`, each when there is one.
pub(super) fn loss_context(paused: Option<&str>, last_error: Option<&str>) -> String {
    let mut out = String::new();
    if let Some(p) = paused {
        out += &format!("; paused: {p}");
    }
    if let Some(e) = last_error {
        out += &format!("; last error: {e}");
    }
    out
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
    /// The last batch reached a sink (false from a failure to the next success).
    sink_ok: Padded<AtomicBool>,
    failed: AtomicU64,
    /// Accepted events no sink was given: every sink was paused when they were written.
    skipped: AtomicU64,
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
            skipped: AtomicU64::new(0),
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
    events: Sender<Box<AuditEvent>>,
    control: Sender<Control>,
    /// Boxes of written events, for `enqueue` to reuse (see there).
    pool: Receiver<Box<AuditEvent>>,
    /// Each sink's counters, in the order given.
    sinks: Vec<Arc<SinkStats>>,
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

    /// Starts the writer thread (`fmg-audit`) over one [`Sink`] (a list of one).
    ///
    /// # Errors
    /// [`AuditError::InvalidOption`], [`AuditError::Spawn`].
    pub fn with_sink<S: Sink + 'static>(
        sink: S,
        opts: WriterOptions,
    ) -> Result<AuditWriter, AuditError> {
        AuditWriter::new(vec![Box::new(sink)], opts)
    }

    /// Starts the writer thread (`fmg-audit`) over `sinks`: every event goes to each,
    /// in order ([`sinks`](super::sinks)); [`sink_stats`](Self::sink_stats) has each
    /// one's counters.
    ///
    /// # Errors
    /// [`AuditError::InvalidOption`] (also for an empty list), [`AuditError::Spawn`].
    pub fn new(sinks: Vec<Box<dyn Sink>>, opts: WriterOptions) -> Result<AuditWriter, AuditError> {
        opts.validate()?;
        if sinks.is_empty() {
            return Err(AuditError::InvalidOption {
                name: "sinks",
                value: "[]".to_owned(),
                fix: "give at least one sink",
            });
        }
        let (events_tx, events_rx) = crossbeam_channel::bounded(opts.queue_capacity);
        let (control_tx, control_rx) = crossbeam_channel::unbounded();
        let (pool_tx, pool_rx) = crossbeam_channel::bounded(opts.queue_capacity.min(POOL_MAX));
        let shared = Arc::new(Shared::default());
        let refusals = Arc::new(RefusalAggregator::new(opts.refusals)?);
        let (sinks, stats) = SinkList::new(sinks);
        let render = sinks.reads(BatchFormat::Jsonl);
        let keep = sinks.reads(BatchFormat::Events);
        let worker = Worker {
            sinks,
            shared: Arc::clone(&shared),
            render,
            keep,
            pending: Vec::with_capacity(if keep {
                opts.batch_max.min(POOL_MAX)
            } else {
                0
            }),
            pending_bytes: 0,
            buf: Vec::with_capacity(if render { 64 * 1024 } else { 0 }),
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
            sinks: stats,
            shared,
            refusals,
            thread: Mutex::new(Some(handle)),
        })
    }

    /// Each sink's counters, in the order given to [`new`](Self::new).
    #[must_use]
    pub fn sink_stats(&self) -> &[Arc<SinkStats>] {
        &self.sinks
    }

    /// Queues `ev`. Returns `false`, and counts the event in
    /// [`WriterStats::dropped`], when the queue is full or the writer is closed.
    /// With [`OnFull::Block`] a full queue is waited on (in this thread) first;
    /// with the default [`OnFull::Drop`] this never blocks.
    pub fn enqueue(&self, ev: AuditEvent) -> bool {
        self.enqueue_fill(|slot| *slot = ev, |wait| wait())
    }

    /// Queues one event that `fill` writes into a reused box (the previous event's, with
    /// its strings' capacity: see [`AuditEvent::set`]), so a steady stream of events
    /// allocates nothing. `fill` must set every field (it finds the last event's values).
    /// `around` runs the bounded wait of [`OnFull::Block`] when the queue is full (it
    /// must call the closure it is given and return its result; the Python binding
    /// releases the GIL there); it is not called when the event is queued at once.
    /// `fill` is not called if the writer is closed or paused. Same return value and
    /// policies as [`enqueue`](Self::enqueue).
    ///
    /// The queue holds boxes (8 bytes a slot, not the ~300-byte event), and the writer
    /// hands written boxes back through a small pool: this reuses one, which also frees
    /// whatever `fill` replaces here, on a producer thread. glibc malloc is several times
    /// slower when one thread allocates and another frees; this keeps both threads off
    /// that path.
    pub fn enqueue_fill(
        &self,
        fill: impl FnOnce(&mut AuditEvent),
        around: impl FnOnce(Wait<'_>) -> bool,
    ) -> bool {
        self.push(fill, around)
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

    /// Logs a refusal made before there is an identity, aggregated ([`refusals`](super::refusals)):
    /// the first [`RefusalOptions::burst`] of its group in an interval are filled by
    /// `fill` and queued as [`enqueue_fill`](Self::enqueue_fill) does
    /// ([`Admitted::Queued`], or [`Admitted::Dropped`] as that would be); the others
    /// are only counted ([`Admitted::Counted`]: `fill` is not called), and the
    /// writer thread writes one summary event per group with their `count` when the
    /// interval ends, on flush and on close. A closed or paused writer drops it.
    pub fn enqueue_refusal_with(
        &self,
        refusal: &Refusal<'_>,
        fill: impl FnOnce(&mut AuditEvent),
        around: impl FnOnce(Wait<'_>) -> bool,
    ) -> Admitted {
        let sh = &*self.shared;
        let prev = sh.state.0.fetch_add(1, Ordering::AcqRel);
        if prev & FLAGS == 0 && !self.refusals.admit(refusal) {
            // Counted inside the fence: close's final summaries include it.
            sh.state.0.fetch_sub(1, Ordering::Release);
            return Admitted::Counted;
        }
        let accepted = prev & FLAGS == 0 && self.send(fill, around);
        self.settle(prev, accepted);
        if accepted {
            Admitted::Queued
        } else {
            Admitted::Dropped
        }
    }

    /// Fills a (reused) entry and queues it; see [`enqueue`](Self::enqueue).
    fn push(
        &self,
        fill: impl FnOnce(&mut AuditEvent),
        around: impl FnOnce(Wait<'_>) -> bool,
    ) -> bool {
        let prev = self.shared.state.0.fetch_add(1, Ordering::AcqRel);
        let accepted = prev & FLAGS == 0 && self.send(fill, around);
        self.settle(prev, accepted);
        accepted
    }

    /// Takes a box (from the pool if one is there), fills it and queues it: whether it
    /// got in. Call inside the fence (`state` incremented, no flag set).
    fn send(
        &self,
        fill: impl FnOnce(&mut AuditEvent),
        around: impl FnOnce(Wait<'_>) -> bool,
    ) -> bool {
        let mut boxed = self
            .pool
            .try_recv()
            .unwrap_or_else(|_| Box::new(AuditEvent::blank()));
        fill(&mut boxed);
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

    /// Whether an event enqueued now would be written: the writer is open, the
    /// queue has room, and the last batch was written by a sink (a failure of
    /// every sink makes this false until a batch succeeds again). Atomic loads only: cheap
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
            skipped: sh.skipped.load(Ordering::Relaxed),
            queue_depth: self.events.len(),
            refusals_suppressed: r.suppressed,
            refusal_summaries: r.summaries,
        }
    }

    /// Message of the most recent sink error (of any sink), if any ever happened.
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
struct Worker {
    sinks: SinkList,
    shared: Arc<Shared>,
    /// Some sink reads lines: render each event into `buf`.
    render: bool,
    /// Some sink reads the events: keep them in `pending` until the batch is written.
    keep: bool,
    /// The batch being gathered (boxes retired after the write) when `keep`.
    #[allow(
        clippy::vec_box,
        reason = "the boxes go back to the producers through the pool"
    )]
    pending: Vec<Box<AuditEvent>>,
    /// Size of `pending`'s events, to cut batches at `BATCH_BYTES` as `buf` does.
    pending_bytes: usize,
    buf: Vec<u8>,
    batch_max: usize,
    /// A failure not yet returned by `flush`/`close`.
    unreported: Option<AuditError>,
    /// Written boxes go back to the producers through here.
    pool: Sender<Box<AuditEvent>>,
    /// Refusals aggregated for [`AuditWriter::enqueue_refusal_with`]: the
    /// thread writes their summaries.
    refusals: Arc<RefusalAggregator>,
}

impl Worker {
    fn run(
        mut self,
        events: &Receiver<Box<AuditEvent>>,
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
    fn batch(
        &mut self,
        events: &Receiver<Box<AuditEvent>>,
        first: Box<AuditEvent>,
        limit: usize,
    ) -> usize {
        let max = self.batch_max.min(limit);
        self.push(first);
        let mut n = 1;
        while n < max && self.batch_bytes() < BATCH_BYTES {
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

    /// Bytes gathered for the batch (its lines, or its events' size).
    fn batch_bytes(&self) -> usize {
        if self.render {
            self.buf.len()
        } else {
            self.pending_bytes
        }
    }

    /// Adds one event to the batch: rendered into `buf` if a sink reads lines, then
    /// kept until the write if a sink reads events, else recycled at once (the event
    /// is hot in cache and the pool refills while the batch gathers).
    fn push(&mut self, ev: Box<AuditEvent>) {
        if self.render {
            write_line(&mut self.buf, &ev);
        }
        if self.keep {
            self.pending_bytes += ev.size_hint();
            self.pending.push(ev);
        } else {
            self.retire(ev);
        }
    }

    /// Offers a written or serialised event's box to the producers for reuse;
    /// if the pool is full, `try_send` hands it back and it is freed here.
    fn retire(&self, ev: Box<AuditEvent>) {
        self.pool.try_send(ev).ok();
    }

    /// Writes the gathered batch of `n` events to every sink, then retires kept events.
    fn write_pending(&mut self, n: usize) {
        let n64 = n as u64;
        let batch = Batch::new(&self.pending, &self.buf, n);
        let shared = &self.shared;
        match self.sinks.write_batch(&batch, |e| shared.record_error(e)) {
            Ok(recorded) => {
                if recorded {
                    self.shared.written.0.fetch_add(n64, Ordering::Relaxed);
                } else {
                    // Every sink paused: they counted the batch as skipped.
                    self.shared.skipped.fetch_add(n64, Ordering::Relaxed);
                }
                self.set_sink_ok(true);
            }
            Err(err) => {
                self.shared.failed.fetch_add(n64, Ordering::Relaxed);
                self.set_sink_ok(false);
                self.unreported = Some(err);
            }
        }
        let mut pending = std::mem::take(&mut self.pending);
        for ev in pending.drain(..) {
            self.retire(ev);
        }
        self.pending = pending;
        self.pending_bytes = 0;
        if self.buf.capacity() > BUF_RETAIN {
            self.buf = Vec::with_capacity(64 * 1024);
        } else {
            self.buf.clear();
        }
    }

    /// Stores the sink's health, writing the shared flag only when it changes
    /// (producers read it before every call).
    fn set_sink_ok(&self, ok: bool) {
        let flag = &self.shared.sink_ok.0;
        if flag.load(Ordering::Relaxed) != ok {
            flag.store(ok, Ordering::Relaxed);
        }
    }

    /// Writes exactly the events queued now (`len()` counts every claimed
    /// slot, so this covers all `enqueue` calls that returned before the
    /// flush request was sent), then flushes the sink.
    fn flush_pending(&mut self, events: &Receiver<Box<AuditEvent>>) -> Result<(), AuditError> {
        let mut remaining = events.len();
        while remaining > 0 {
            // A claimed slot is always filled, so this returns promptly.
            let Ok(first) = events.recv() else { break };
            remaining = remaining.saturating_sub(self.batch(events, first, remaining));
        }
        self.write_summaries(true);
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
            self.push(Box::new(ev));
            n += 1;
            if n == self.batch_max || self.batch_bytes() >= BATCH_BYTES {
                self.write_pending(n);
                n = 0;
            }
        }
        if n > 0 {
            self.write_pending(n);
        }
    }

    /// Drains the queue (producers are fenced out by now), writes, syncs.
    fn finish(mut self, events: &Receiver<Box<AuditEvent>>) -> Result<(), AuditError> {
        while let Ok(first) = events.try_recv() {
            self.batch(events, first, usize::MAX);
        }
        self.write_summaries(true);
        let shared = &self.shared;
        if let Err(err) = self.sinks.sync(|e| shared.record_error(e)) {
            self.unreported.get_or_insert(err);
        }
        self.unreported.take().map_or(Ok(()), Err)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing unwrap is a failing test")]
mod tests {
    use super::*;
    use crate::audit::testing::*;
    use crate::audit::{log_files, verify_files, RawJson};
    use chrono::Utc;
    use serde_json::Value;
    use std::io;
    use std::sync::mpsc;

    #[test]
    fn refilled_boxes_carry_nothing_of_the_previous_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mixed.jsonl");
        // A small pool and queue: boxes are recycled many times.
        let opts = WriterOptions {
            queue_capacity: 64,
            ..WriterOptions::default()
        };
        let w = AuditWriter::open_jsonl(&path, opts).unwrap();
        let mut sent = 0;
        let fill = |i: usize| {
            move |e: &mut AuditEvent| {
                let want = numbered(i);
                e.ts = want.ts;
                AuditEvent::set(&mut e.key_id, &want.key_id);
                AuditEvent::set(&mut e.key_name, &want.key_name);
                AuditEvent::set(&mut e.tool, &want.tool);
                e.set_scopes(want.scopes.iter().map(String::as_str));
                e.duration_ms = want.duration_ms;
                e.status = want.status;
                AuditEvent::set_opt(&mut e.error, want.error.as_deref());
                AuditEvent::set_json(&mut e.input_args, |buf| {
                    let Some(raw) = &want.input_args else {
                        return false;
                    };
                    buf.extend_from_slice(raw.as_bytes());
                    true
                });
                AuditEvent::set_opt(&mut e.output_preview, want.output_preview.as_deref());
                AuditEvent::set_opt(&mut e.client_ip, want.client_ip.as_deref());
                AuditEvent::set_json(&mut e.metadata, |_| false);
                AuditEvent::set_json(&mut e.extra, |_| false);
            }
        };
        for i in 0..2000 {
            let ok = if i % 3 == 0 {
                // A different shape now and then: error and extra set, then cleared.
                let mut odd = numbered(i);
                odd.error = Some("x".repeat(100));
                odd.extra = RawJson::extra(&serde_json::Map::from_iter([(
                    "n".to_owned(),
                    Value::from(i),
                )]));
                w.enqueue(odd)
            } else {
                w.enqueue_fill(fill(i), |wait| wait())
            };
            assert!(
                ok || {
                    w.flush().unwrap();
                    w.enqueue_fill(fill(i), |wait| wait())
                }
            );
            sent += 1;
        }
        w.close().unwrap();
        let lines = read_lines(&path);
        assert_eq!(lines.len(), sent);
        for (i, line) in lines.iter().enumerate() {
            let v: Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["key_id"], format!("k{i}"), "line {i}");
            if i % 3 != 0 {
                assert_eq!(unsealed(line), line_of(&numbered(i)), "line {i}");
                assert!(v.get("n").is_none(), "line {i}");
            }
        }
    }

    #[test]
    fn a_loss_report_says_how_many_how_and_why() {
        let r = LossReport {
            lost: 1,
            dropped: 3,
            paused_dropped: 2,
            failed: 4,
            last_error: Some("disk full".to_owned()),
            paused: Some("spool over its limit".to_owned()),
        };
        assert_eq!(
            r.describe("/var/log/a.jsonl"),
            "audit log /var/log/a.jsonl: 1 event lost since the last warning (3 dropped in \
             all: queue full, writer closed or paused, 2 of them while paused; 4 lost to failed \
             writes in all); paused: spool over its limit; last error: disk full"
        );
        let quiet = LossReport {
            lost: 2,
            paused_dropped: 0,
            last_error: None,
            paused: None,
            ..r
        };
        assert_eq!(
            quiet.describe("x"),
            "audit log x: 2 events lost since the last warning (3 dropped in all: queue full, \
             writer closed or paused; 4 lost to failed writes in all)"
        );
    }

    #[test]
    fn an_events_sink_gets_the_events_in_queue_order() {
        let sink = EventSink::default();
        let w = AuditWriter::with_sink(sink.clone(), WriterOptions::default()).unwrap();
        for i in 0..40 {
            assert!(w.enqueue(numbered(i)));
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
        let mut filled = false;
        assert!(!w.enqueue_fill(|_| filled = true, |wait| wait()));
        assert!(!filled, "a paused writer fills nothing");
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
            assert_eq!(
                batch.events().len(),
                0,
                "no sink reads events: none are kept"
            );
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
            let ids = batch.events().iter().map(|e| e.key_id.clone()).collect();
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
        assert!(w.enqueue_fill(|e| *e = numbered(0), around));
        entered.recv().unwrap(); // the thread holds event 0
        assert!(w.enqueue_fill(|e| *e = numbered(1), around)); // room: no wait
        assert_eq!(hooked.load(Ordering::SeqCst), 0);
        // Full, and nobody makes room: waits the bound, then drops.
        let t = Instant::now();
        assert!(!w.enqueue_fill(|e| *e = numbered(2), around));
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
    fn full_queue_with_real_file_keeps_the_counts_balanced() {
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
                ev.input_args =
                    Some(serde_json::json!({"query": "quarterly report", "limit": 10}).into());
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
