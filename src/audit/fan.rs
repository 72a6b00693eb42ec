//! One queue, several backends: [`FanSink`] writes every batch to each of its
//! sinks (a JSONL file, `SQLite`, the HTTP spool...), so that an audit log with
//! every backend on costs the request path one enqueue, as a single backend does.
//!
//! The writer thread hands [`FanSink`] the batch as queued (lines rendered by the
//! producer, or events). A JSONL sink gets the lines as one buffer, built once per
//! batch and shared by every JSONL sink; an events sink (`SqliteSink`) gets the
//! records and reads each line back into its columns.
//!
//! Each sink keeps its own books in a [`SlotStats`]: written, failed, write errors,
//! health and last error. One failing sink does not stop the others, and does not
//! make the batch count as failed for the writer: the writer's own counters then
//! say what was *queued*, the slots what each backend *recorded*.
//!
//! A slot can be paused ([`SlotStats::pause`]): while it is, the batches written
//! are not given to that sink and count in its `paused_dropped`. The pause is
//! applied when a batch is written, so events queued just before the pause
//! (within one flush interval) are dropped for that sink too.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::{write_line, AuditError, Batch, BatchFormat, LossClock, Record, Sink};

/// The books of one sink of a [`FanSink`], shared with the handles that report them.
#[derive(Debug)]
pub struct SlotStats {
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
    /// `failed` as of the last [`SlotStats::take_failure`].
    failed_seen: AtomicU64,
}

impl Default for SlotStats {
    fn default() -> Self {
        SlotStats {
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

/// A snapshot of a [`SlotStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotCounts {
    /// Events this sink recorded.
    pub written: u64,
    /// Events lost because a write to this sink failed.
    pub failed: u64,
    /// Failed operations on this sink (writes, flushes, sync, warnings).
    pub write_errors: u64,
    /// Events not given to this sink because it was paused.
    pub paused_dropped: u64,
}

/// What [`SlotStats::take_loss_report`] tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotLoss {
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

impl SlotStats {
    /// Current counters.
    #[must_use]
    pub fn counts(&self) -> SlotCounts {
        SlotCounts {
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
    pub fn take_loss_report(&self, interval: Duration) -> Option<SlotLoss> {
        let failed = self.failed.load(Ordering::Relaxed);
        let paused_dropped = self.paused_dropped.load(Ordering::Relaxed);
        let lost = self.losses.due(failed + paused_dropped, interval)?;
        Some(SlotLoss {
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
    stats: Arc<SlotStats>,
}

/// A [`Sink`] that writes each batch to several sinks; see the module docs.
pub struct FanSink {
    slots: Vec<Slot>,
    /// The batch's lines, for the JSONL sinks (built once per batch).
    lines: Vec<u8>,
}

impl std::fmt::Debug for FanSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FanSink")
            .field("sinks", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl FanSink {
    /// A fan-out over `sinks`, in order; returns it with each sink's books.
    #[must_use]
    pub fn new(sinks: Vec<Box<dyn Sink>>) -> (FanSink, Vec<Arc<SlotStats>>) {
        let slots: Vec<Slot> = sinks
            .into_iter()
            .map(|sink| Slot {
                format: sink.format(),
                sink,
                stats: Arc::new(SlotStats::default()),
            })
            .collect();
        let stats = slots.iter().map(|s| Arc::clone(&s.stats)).collect();
        (
            FanSink {
                slots,
                lines: Vec::new(),
            },
            stats,
        )
    }
}

/// Lowers the retained capacity of the shared line buffer after a huge batch.
const LINES_RETAIN: usize = 8 << 20;

impl Sink for FanSink {
    fn format(&self) -> BatchFormat {
        BatchFormat::Events
    }

    fn write_batch(&mut self, batch: &Batch<'_>) -> io::Result<()> {
        let n = batch.len() as u64;
        let mut lines_ready = false;
        for slot in &mut self.slots {
            let st = &slot.stats;
            if st.paused.load(Ordering::Relaxed) {
                st.paused_dropped.fetch_add(n, Ordering::Relaxed);
                continue;
            }
            let res = match slot.format {
                BatchFormat::Events => slot.sink.write_batch(batch),
                BatchFormat::Jsonl => {
                    if !lines_ready {
                        self.lines.clear();
                        for record in batch.records() {
                            match record {
                                Record::Line(line) => self.lines.extend_from_slice(line),
                                Record::Event(ev) => write_line(&mut self.lines, ev),
                            }
                        }
                        lines_ready = true;
                    }
                    slot.sink
                        .write_batch(&Batch::of_jsonl(&self.lines, batch.len()))
                }
            }
            .and_then(|()| slot.sink.flush());
            match res {
                Ok(()) => {
                    st.written.fetch_add(n, Ordering::Relaxed);
                    if !st.sink_ok.load(Ordering::Relaxed) {
                        st.sink_ok.store(true, Ordering::Relaxed);
                    }
                }
                Err(source) => {
                    st.failed.fetch_add(n, Ordering::Relaxed);
                    st.sink_ok.store(false, Ordering::Relaxed);
                    st.record_error(&AuditError::Write { source });
                }
            }
            if let Some(warning) = slot.sink.take_warning() {
                st.record_error(&warning);
            }
        }
        if self.lines.capacity() > LINES_RETAIN {
            self.lines = Vec::new();
        }
        // Each sink's failures are in its own books; the queue did its part.
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Every sink was flushed after its write.
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        let mut first = Ok(());
        for slot in &mut self.slots {
            if let Err(source) = slot.sink.sync() {
                let again = io::Error::new(source.kind(), source.to_string());
                slot.stats.record_error(&AuditError::Sync { source });
                if first.is_ok() {
                    first = Err(again);
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
        let (fan, stats) = FanSink::new(vec![
            Box::new(JsonlFileSink::open(&jsonl).unwrap()),
            Box::new(SqliteSink::open(&db).unwrap()),
        ]);
        let w = AuditWriter::with_sink(fan, WriterOptions::default()).unwrap();
        for i in 0..500 {
            let ok = if i % 2 == 0 {
                w.enqueue(ev(i))
            } else {
                w.enqueue_line(|buf| write_line(buf, &ev(i)))
            };
            assert!(ok);
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
        let (fan, stats) = FanSink::new(vec![
            Box::new(Flaky {
                fail: Arc::new(AtomicBool::new(false)),
                got: Arc::clone(&good),
            }),
            Box::new(Flaky {
                fail: Arc::clone(&fail),
                got: Arc::clone(&bad),
            }),
        ]);
        let w = AuditWriter::with_sink(fan, WriterOptions::default()).unwrap();
        for i in 0..10 {
            assert!(w.enqueue(ev(i)));
        }
        w.flush().unwrap(); // the writer itself saw no failure
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
            SlotCounts {
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
        let (fan, stats) = FanSink::new(vec![sink(&a), sink(&b)]);
        let w = AuditWriter::with_sink(fan, WriterOptions::default()).unwrap();
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
}
