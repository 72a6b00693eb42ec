//! The writer's list of sinks: every batch goes to each sink of an [`AuditWriter`]
//! (a JSONL file, `SQLite`, the HTTP spool...), so an audit log with every backend on
//! costs the request path one enqueue, as a single backend does. A single sink is a
//! list of one.
//!
//! Each sink keeps its own counters in a [`SinkStats`]: written, failed, write errors,
//! health and last error. One failing sink does not stop the others: an event counts
//! as failed for the writer only when no sink recorded it; the sinks' counters say what
//! each backend recorded.
//!
//! A sink can be paused ([`SinkStats::pause`]): while it is, the batches written are
//! not given to it and count in its `paused_dropped`. The pause is applied when a
//! batch is written, so events queued just before the pause (within one flush
//! interval) are dropped for that sink too.
//!
//! [`AuditWriter`]: super::AuditWriter

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::{AuditError, Batch, BatchFormat, LossClock, Sink};

/// The counters of one sink of a writer, shared with the handles that report them.
#[derive(Debug)]
pub struct SinkStats {
    written: AtomicU64,
    failed: AtomicU64,
    write_errors: AtomicU64,
    paused_dropped: AtomicU64,
    sink_ok: AtomicBool,
    paused: AtomicBool,
    pause_reason: Mutex<Option<String>>,
    last_error: Mutex<Option<String>>,
    /// When `failed + paused_dropped` was last reported.
    losses: LossClock,
    /// `failed` as of the last [`SinkStats::take_failure`].
    failed_seen: AtomicU64,
}

impl Default for SinkStats {
    fn default() -> Self {
        SinkStats {
            written: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            paused_dropped: AtomicU64::new(0),
            sink_ok: AtomicBool::new(true),
            paused: AtomicBool::new(false),
            pause_reason: Mutex::new(None),
            last_error: Mutex::new(None),
            losses: LossClock::default(),
            failed_seen: AtomicU64::new(0),
        }
    }
}

/// A snapshot of a [`SinkStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkCounts {
    /// Events this sink recorded.
    pub written: u64,
    /// Events lost because a write to this sink failed.
    pub failed: u64,
    /// Failed operations on this sink (writes, flushes, sync, warnings).
    pub write_errors: u64,
    /// Events not given to this sink because it was paused.
    pub paused_dropped: u64,
}

/// What [`SinkStats::take_loss_report`] tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkLoss {
    /// Events lost by this sink since the previous report.
    pub lost: u64,
    /// Of all losses so far: to failed writes.
    pub failed: u64,
    /// Of all losses so far: while paused.
    pub paused_dropped: u64,
    /// Why the sink is paused, if it is.
    pub paused: Option<String>,
    /// The sink's most recent error.
    pub last_error: Option<String>,
}

impl SinkLoss {
    /// The warning an operator reads, for the backend at `path`.
    #[must_use]
    pub fn describe(&self, path: &str) -> String {
        format!(
            "audit log {path}: {} event{} lost since the last warning ({} lost to failed \
             writes in all; {} skipped while paused in all){}",
            self.lost,
            super::writer::plural(self.lost),
            self.failed,
            self.paused_dropped,
            super::writer::loss_context(self.paused.as_deref(), self.last_error.as_deref()),
        )
    }
}

impl SinkStats {
    /// Current counters.
    #[must_use]
    pub fn counts(&self) -> SinkCounts {
        SinkCounts {
            written: self.written.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            write_errors: self.write_errors.load(Ordering::Relaxed),
            paused_dropped: self.paused_dropped.load(Ordering::Relaxed),
        }
    }

    /// The last write to this sink succeeded and it is not paused.
    #[must_use]
    pub fn healthy(&self) -> bool {
        self.sink_ok.load(Ordering::Relaxed) && !self.paused.load(Ordering::Relaxed)
    }

    /// Stops giving batches to this sink (`Some(reason)`) or starts again (`None`).
    pub fn pause(&self, reason: Option<String>) {
        let mut held = self.pause_reason.lock();
        self.paused.store(reason.is_some(), Ordering::Relaxed);
        *held = reason;
    }

    /// The sink's most recent error message.
    #[must_use]
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    /// Events this sink lost since the previous report, at most one report per
    /// `interval`; `None` if nothing new was lost or the interval has not passed.
    pub fn take_loss_report(&self, interval: Duration) -> Option<SinkLoss> {
        let failed = self.failed.load(Ordering::Relaxed);
        let paused_dropped = self.paused_dropped.load(Ordering::Relaxed);
        let lost = self.losses.due(failed + paused_dropped, interval)?;
        Some(SinkLoss {
            lost,
            failed,
            paused_dropped,
            paused: self.pause_reason.lock().clone(),
            last_error: self.last_error(),
        })
    }

    /// If writes to this sink failed since the last call, its last error message (what
    /// `flush` and `close` raise, as a single writer's do).
    pub fn take_failure(&self) -> Option<String> {
        let failed = self.failed.load(Ordering::Relaxed);
        if self.failed_seen.swap(failed, Ordering::Relaxed) == failed {
            return None;
        }
        Some(
            self.last_error()
                .unwrap_or_else(|| "a write failed".to_owned()),
        )
    }

    fn record_error(&self, err: &AuditError) {
        self.write_errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock() = Some(err.to_string());
    }
}

struct Slot {
    sink: Box<dyn Sink>,
    format: BatchFormat,
    stats: Arc<SinkStats>,
}

/// The sinks of one writer, in order, each with its counters.
pub(super) struct SinkList {
    slots: Vec<Slot>,
}

impl std::fmt::Debug for SinkList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkList")
            .field("sinks", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl SinkList {
    /// The list over `sinks` (at least one), and each sink's counters.
    pub(super) fn new(sinks: Vec<Box<dyn Sink>>) -> (SinkList, Vec<Arc<SinkStats>>) {
        let slots: Vec<Slot> = sinks
            .into_iter()
            .map(|sink| Slot {
                format: sink.format(),
                sink,
                stats: Arc::new(SinkStats::default()),
            })
            .collect();
        let stats = slots.iter().map(|s| Arc::clone(&s.stats)).collect();
        (SinkList { slots }, stats)
    }

    /// Whether some sink reads [`Batch::events`] / [`Batch::jsonl`].
    pub(super) fn reads(&self, format: BatchFormat) -> bool {
        self.slots.iter().any(|s| s.format == format)
    }

    /// Writes `batch` to every sink that is not paused, then flushes it; each sink's
    /// outcome goes to its counters, and each error (or warning) to `on_error` too.
    /// `Ok(true)`: a sink recorded the batch; `Ok(false)`: every sink was paused (each
    /// counted it in its `paused_dropped`); `Err` (the first sink's error): no sink
    /// recorded it and one failed: the events are lost.
    pub(super) fn write_batch(
        &mut self,
        batch: &Batch<'_>,
        mut on_error: impl FnMut(&AuditError),
    ) -> Result<bool, AuditError> {
        let n = batch.len() as u64;
        let mut recorded = false;
        let mut first_err = None;
        for slot in &mut self.slots {
            let st = &slot.stats;
            if st.paused.load(Ordering::Relaxed) {
                st.paused_dropped.fetch_add(n, Ordering::Relaxed);
                continue;
            }
            match slot
                .sink
                .write_batch(batch)
                .and_then(|()| slot.sink.flush())
            {
                Ok(()) => {
                    recorded = true;
                    st.written.fetch_add(n, Ordering::Relaxed);
                    if !st.sink_ok.load(Ordering::Relaxed) {
                        st.sink_ok.store(true, Ordering::Relaxed);
                    }
                }
                Err(source) => {
                    st.failed.fetch_add(n, Ordering::Relaxed);
                    st.sink_ok.store(false, Ordering::Relaxed);
                    let err = AuditError::Write { source };
                    st.record_error(&err);
                    on_error(&err);
                    first_err.get_or_insert(err);
                }
            }
            if let Some(warning) = slot.sink.take_warning() {
                st.record_error(&warning);
                on_error(&warning);
            }
        }
        match first_err {
            Some(err) if !recorded => Err(err),
            _ => Ok(recorded),
        }
    }

    /// Makes every sink's data durable (on close); the first error, each recorded in
    /// its sink's counters and given to `on_error`.
    pub(super) fn sync(&mut self, mut on_error: impl FnMut(&AuditError)) -> Result<(), AuditError> {
        let mut first = Ok(());
        for slot in &mut self.slots {
            if let Err(source) = slot.sink.sync() {
                let again = io::Error::new(source.kind(), source.to_string());
                let err = AuditError::Sync { source };
                slot.stats.record_error(&err);
                on_error(&err);
                if first.is_ok() {
                    first = Err(AuditError::Sync { source: again });
                }
            }
        }
        first
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing unwrap is a failing test")]
mod tests {
    use super::*;
    use crate::audit::{
        query, AuditEvent, AuditQuery, AuditWriter, JsonlFileSink, SqliteSink, Status,
        WriterOptions,
    };
    use std::sync::atomic::AtomicU64;

    fn ev(i: usize) -> AuditEvent {
        AuditEvent::new(format!("k{i}"), "alice", "search", Status::Ok)
    }

    /// Fails every write while `fail` is set.
    struct Flaky {
        fail: Arc<AtomicBool>,
        got: Arc<AtomicU64>,
    }

    impl Sink for Flaky {
        fn write_batch(&mut self, batch: &Batch<'_>) -> io::Result<()> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(io::Error::other("disk on fire"));
            }
            self.got.fetch_add(batch.len() as u64, Ordering::SeqCst);
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
    fn every_sink_gets_every_event_from_one_queue() {
        let dir = tempfile::tempdir().unwrap();
        let (jsonl, db) = (dir.path().join("a.jsonl"), dir.path().join("a.db"));
        let w = AuditWriter::new(
            vec![
                Box::new(JsonlFileSink::open(&jsonl).unwrap()),
                Box::new(SqliteSink::open(&db).unwrap()),
            ],
            WriterOptions::default(),
        )
        .unwrap();
        let stats = w.sink_stats().to_vec();
        for i in 0..500 {
            assert!(w.enqueue(ev(i)));
        }
        w.close().unwrap();
        assert_eq!(
            std::fs::read_to_string(&jsonl).unwrap().lines().count(),
            500
        );
        let q = AuditQuery {
            limit: 1000,
            ..AuditQuery::default()
        };
        let rows = query(&db, &q).unwrap();
        assert_eq!(rows.len(), 500);
        assert_eq!(rows[0].key_id, "k499");
        for st in &stats {
            assert_eq!(st.counts().written, 500);
            assert!(st.healthy());
        }
        assert_eq!(w.stats().enqueued, 500);
    }

    #[test]
    fn one_failing_sink_loses_only_its_copy_and_says_so() {
        let fail = Arc::new(AtomicBool::new(true));
        let (good, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let w = AuditWriter::new(
            vec![
                Box::new(Flaky {
                    fail: Arc::new(AtomicBool::new(false)),
                    got: Arc::clone(&good),
                }),
                Box::new(Flaky {
                    fail: Arc::clone(&fail),
                    got: Arc::clone(&bad),
                }),
            ],
            WriterOptions::default(),
        )
        .unwrap();
        let stats = w.sink_stats().to_vec();
        for i in 0..10 {
            assert!(w.enqueue(ev(i)));
        }
        w.flush().unwrap(); // another sink recorded them: the writer lost nothing
        assert!(w.healthy());
        assert!(stats[0].take_failure().is_none());
        let err = stats[1].take_failure().unwrap();
        assert!(err.contains("disk on fire"), "{err}");
        assert!(stats[1].take_failure().is_none(), "reported once");
        assert!(stats[0].healthy() && !stats[1].healthy());
        let loss = stats[1].take_loss_report(Duration::ZERO).unwrap();
        assert_eq!((loss.lost, loss.failed), (10, 10));
        assert!(loss.last_error.unwrap().contains("disk on fire"));
        fail.store(false, Ordering::SeqCst);
        assert!(w.enqueue(ev(10)));
        w.close().unwrap();
        assert!(stats[1].healthy());
        assert_eq!(good.load(Ordering::SeqCst), 11);
        assert_eq!(bad.load(Ordering::SeqCst), 1);
        assert_eq!(
            stats[1].counts(),
            SinkCounts {
                written: 1,
                failed: 10,
                write_errors: 1,
                paused_dropped: 0
            }
        );
    }

    #[test]
    fn a_paused_sink_is_skipped_and_counted_until_resumed() {
        let (a, b) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let sink = |got: &Arc<AtomicU64>| -> Box<dyn Sink> {
            Box::new(Flaky {
                fail: Arc::new(AtomicBool::new(false)),
                got: Arc::clone(got),
            })
        };
        let w = AuditWriter::new(vec![sink(&a), sink(&b)], WriterOptions::default()).unwrap();
        let stats = w.sink_stats().to_vec();
        stats[1].pause(Some("spool full".to_owned()));
        assert!(!stats[1].healthy());
        for i in 0..5 {
            assert!(w.enqueue(ev(i)));
        }
        w.flush().unwrap();
        let loss = stats[1].take_loss_report(Duration::ZERO).unwrap();
        assert_eq!((loss.lost, loss.paused_dropped), (5, 5));
        assert_eq!(loss.paused.as_deref(), Some("spool full"));
        assert!(
            stats[1].take_loss_report(Duration::ZERO).is_none(),
            "nothing new"
        );
        stats[1].pause(None);
        assert!(w.enqueue(ev(5)));
        w.close().unwrap();
        assert_eq!((a.load(Ordering::SeqCst), b.load(Ordering::SeqCst)), (6, 1));
        assert_eq!(stats[1].counts().paused_dropped, 5);
    }

    #[test]
    fn a_sink_loss_says_how_many_and_why() {
        let loss = SinkLoss {
            lost: 5,
            failed: 2,
            paused_dropped: 3,
            paused: Some("spool full".to_owned()),
            last_error: None,
        };
        assert_eq!(
            loss.describe("spool/"),
            "audit log spool/: 5 events lost since the last warning (2 lost to failed writes \
             in all; 3 skipped while paused in all); paused: spool full"
        );
    }

    #[test]
    fn events_no_sink_was_given_are_skipped_not_written() {
        let got = Arc::new(AtomicU64::new(0));
        let w = AuditWriter::new(
            vec![Box::new(Flaky {
                fail: Arc::new(AtomicBool::new(false)),
                got: Arc::clone(&got),
            })],
            WriterOptions::default(),
        )
        .unwrap();
        w.sink_stats()[0].pause(Some("spool full".to_owned()));
        for i in 0..4 {
            assert!(w.enqueue(ev(i))); // queued: the writer itself is not paused
        }
        w.close().unwrap();
        let st = w.stats();
        assert_eq!(
            (st.enqueued, st.written, st.failed, st.skipped),
            (4, 0, 0, 4)
        );
        assert_eq!(w.sink_stats()[0].counts().paused_dropped, 4);
        assert_eq!(got.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn an_event_no_sink_recorded_is_a_failure_of_the_writer() {
        let fail = Arc::new(AtomicBool::new(true));
        let flaky = || -> Box<dyn Sink> {
            Box::new(Flaky {
                fail: Arc::clone(&fail),
                got: Arc::new(AtomicU64::new(0)),
            })
        };
        let w = AuditWriter::new(vec![flaky(), flaky()], WriterOptions::default()).unwrap();
        for i in 0..3 {
            assert!(w.enqueue(ev(i)));
        }
        let err = w.flush().unwrap_err().to_string();
        assert!(err.contains("disk on fire"), "{err}");
        assert!(!w.healthy());
        let st = w.stats();
        assert_eq!((st.enqueued, st.written, st.failed), (3, 0, 3));
        for s in w.sink_stats() {
            assert_eq!(s.counts().failed, 3);
        }
    }
}
