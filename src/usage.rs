//! The usage book: per key x tool x UTC day, the calls, errors, cost units, total duration
//! and refusals by kind, aggregated in memory on the hot path and drained in batches by a
//! flusher (`python/fastmcp_guard/usage.py`) into the key store's database.
//!
//! # Hot path
//!
//! [`UsageBook::record`] is called once per guarded call. It takes one mutex, finds the
//! (key, tool, day) row with two hash lookups on borrowed `&str` and a scan of the (one or
//! two) pending days of that pair, and adds to plain integers: no I/O and no allocation
//! once the row exists. The UTC day comes from `SystemTime` (a vDSO read) or from a day
//! fixed with [`UsageBook::set_day`] (tests).
//!
//! # What a kind counts
//!
//! - `ok` and `error`: a call that ran. It adds 1 to `calls` (and to `errors` for `error`),
//!   its cost to `cost` and its duration to `duration_ms`.
//! - Any other kind (`rate_limited`, `credits_exhausted`, `loop_detected`, `forbidden`,
//!   `ip_denied`, ...): a refusal, counted in `refusals[kind]`. A refusal consumes nothing,
//!   so its cost and duration are ignored. `would_refuse` (a shadow rule's would-be
//!   refusal) is recorded *beside* the `ok`/`error` of the same call: it is counted in
//!   `refusals` and the call in `calls` as well.
//!
//! A kind is 1 to [`MAX_KIND_BYTES`] bytes of `a-z`, `0-9` and `_`; anything else is a
//! [`UsageError`] (kinds come from the guard's code, never from callers).
//!
//! # Bounds
//!
//! - Key ids and tool names are cut to [`MAX_KEY_BYTES`] / [`MAX_TOOL_BYTES`] bytes (at a
//!   character boundary): a caller cannot make a row arbitrarily large.
//! - At most `max_rows` (key, tool, day) rows are held between two drains. A record that
//!   would need a new row beyond that is counted in the day's [`OTHER`] / [`OTHER`] row
//!   instead, and [`UsageBook::folded`] counts such records: counts are never dropped, and
//!   many keys or tool names cannot grow the book without bound.
//! - A row holds at most [`MAX_KINDS_PER_ROW`] refusal kinds; further kinds are counted
//!   under `other`.
//! - Counters saturate instead of wrapping.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

/// Longest key id kept, in bytes (longer ones are cut at a character boundary).
pub const MAX_KEY_BYTES: usize = 128;
/// Longest tool name kept, in bytes (longer ones are cut at a character boundary).
pub const MAX_TOOL_BYTES: usize = 128;
/// Longest refusal kind accepted, in bytes.
pub const MAX_KIND_BYTES: usize = 32;
/// Most refusal kinds one row keeps apart; further kinds are counted as `other`.
pub const MAX_KINDS_PER_ROW: usize = 16;
/// Default bound on the rows held between two drains.
pub const DEFAULT_MAX_ROWS: usize = 100_000;
/// The key id and tool name of the row that takes records beyond the row bound.
pub const OTHER: &str = "*other*";
/// The refusal kind that takes kinds beyond [`MAX_KINDS_PER_ROW`].
const OTHER_KIND: &str = "other";

/// Refusal kinds the guard records, kept without allocating.
const KNOWN_KINDS: [&str; 9] = [
    "rate_limited",
    "credits_exhausted",
    "loop_detected",
    "forbidden",
    "ip_denied",
    "would_refuse",
    "unauthorized",
    "unavailable",
    OTHER_KIND,
];

const NO_DAY: i64 = i64::MIN;

/// A refused argument of the usage book.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsageError {
    #[error(
        "usage kind {0:?} is not valid; use 'ok', 'error' or a refusal kind of 1 to 32 \
         characters a-z, 0-9 and _ (such as 'rate_limited')"
    )]
    BadKind(String),
    #[error("usage cost must be a whole number >= 0, got {0}")]
    BadCost(i64),
    #[error("max_rows must be at least 1, got {0}")]
    BadMaxRows(usize),
}

/// What one record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind<'a> {
    /// A call that ran and succeeded.
    Ok,
    /// A call that ran and failed.
    Error,
    /// A refusal (or a shadow rule's `would_refuse`).
    Refusal(&'a str),
}

impl<'a> Kind<'a> {
    /// Parse a kind; see the module docs for the accepted forms.
    ///
    /// # Errors
    /// [`UsageError::BadKind`] for an empty, too long or non `[a-z0-9_]` kind.
    pub fn parse(kind: &'a str) -> Result<Self, UsageError> {
        match kind {
            "ok" => Ok(Kind::Ok),
            "error" => Ok(Kind::Error),
            _ if !kind.is_empty()
                && kind.len() <= MAX_KIND_BYTES
                && kind
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') =>
            {
                Ok(Kind::Refusal(kind))
            }
            _ => Err(UsageError::BadKind(cut(kind, 64).to_owned())),
        }
    }
}

/// The counts of one (key, tool, day).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    /// Calls that ran (`ok` + `error`).
    pub calls: u64,
    /// Of which failed.
    pub errors: u64,
    /// Cost units of the calls that ran.
    pub cost: u64,
    /// Total duration of the calls that ran, in milliseconds.
    pub duration_ms: f64,
    /// Refusals by kind (at most [`MAX_KINDS_PER_ROW`] kinds).
    pub refusals: Vec<(Cow<'static, str>, u64)>,
}

impl Counts {
    fn add(&mut self, kind: Kind<'_>, cost: u64, duration_ms: f64) {
        match kind {
            Kind::Ok | Kind::Error => {
                self.calls = self.calls.saturating_add(1);
                if kind == Kind::Error {
                    self.errors = self.errors.saturating_add(1);
                }
                self.cost = self.cost.saturating_add(cost);
                self.duration_ms += duration_ms;
            }
            Kind::Refusal(k) => self.add_refusals(k, 1),
        }
    }

    fn add_refusals(&mut self, kind: &str, n: u64) {
        if let Some(slot) = self.refusals.iter_mut().find(|(k, _)| k == kind) {
            slot.1 = slot.1.saturating_add(n);
            return;
        }
        if self.refusals.len() + 1 >= MAX_KINDS_PER_ROW && kind != OTHER_KIND {
            return self.add_refusals(OTHER_KIND, n);
        }
        let name = match KNOWN_KINDS.iter().find(|k| **k == kind) {
            Some(k) => Cow::Borrowed(*k),
            None => Cow::Owned(kind.to_owned()),
        };
        self.refusals.push((name, n));
    }

    /// Add `other` into these counts.
    pub fn merge(&mut self, other: &Counts) {
        self.calls = self.calls.saturating_add(other.calls);
        self.errors = self.errors.saturating_add(other.errors);
        self.cost = self.cost.saturating_add(other.cost);
        self.duration_ms += other.duration_ms;
        for (k, n) in &other.refusals {
            self.add_refusals(k, *n);
        }
    }
}

/// One drained (or restored) row: a UTC day (days since 1970-01-01), a key id, a tool and
/// its counts.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub day: i64,
    pub key_id: String,
    pub tool: String,
    pub counts: Counts,
}

#[derive(Default, Clone)]
struct Rows {
    /// key id -> tool -> [(day, counts)] (one or two days between drains).
    keys: HashMap<String, HashMap<String, Vec<(i64, Counts)>>>,
    /// (key, tool, day) rows held.
    len: usize,
}

impl Rows {
    /// The rows, flattened and sorted by (day, key, tool).
    fn into_rows(self) -> Vec<Row> {
        let mut out = Vec::with_capacity(self.len);
        for (key_id, tools) in self.keys {
            for (tool, days) in tools {
                out.extend(days.into_iter().map(|(day, counts)| Row {
                    day,
                    key_id: key_id.clone(),
                    tool: tool.clone(),
                    counts,
                }));
            }
        }
        out.sort_unstable_by(|a, b| (a.day, &a.key_id, &a.tool).cmp(&(b.day, &b.key_id, &b.tool)));
        out
    }

    /// The counts of (key, tool, day), created (or folded into the `OTHER` row) if new.
    fn slot(&mut self, key: &str, tool: &str, day: i64, max_rows: usize) -> (&mut Counts, bool) {
        let exists = self
            .keys
            .get(key)
            .and_then(|t| t.get(tool))
            .is_some_and(|days| days.iter().any(|(d, _)| *d == day));
        let (key, tool, folded) = if exists || self.len < max_rows {
            (key, tool, false)
        } else {
            (OTHER, OTHER, true)
        };
        let tools = self.keys.entry_ref(key);
        let days = tools.entry_ref(tool);
        let i = match days.iter().position(|(d, _)| *d == day) {
            Some(i) => i,
            None => {
                days.push((day, Counts::default()));
                self.len += 1;
                days.len() - 1
            }
        };
        (&mut days[i].1, folded)
    }
}

/// `HashMap::entry` with a borrowed key, allocating only when the entry is new.
trait EntryRef<V> {
    fn entry_ref(&mut self, key: &str) -> &mut V;
}

impl<V: Default> EntryRef<V> for HashMap<String, V> {
    fn entry_ref(&mut self, key: &str) -> &mut V {
        if !self.contains_key(key) {
            self.insert(key.to_owned(), V::default());
        }
        // Just inserted or already there.
        self.get_mut(key).unwrap_or_else(|| unreachable!())
    }
}

/// The in-memory aggregate of usage between two flushes; see the module docs.
pub struct UsageBook {
    rows: Mutex<Rows>,
    max_rows: usize,
    fixed_day: AtomicI64,
    folded: AtomicU64,
}

impl UsageBook {
    /// A book holding at most `max_rows` rows between drains.
    ///
    /// # Errors
    /// [`UsageError::BadMaxRows`] for 0.
    pub fn new(max_rows: usize) -> Result<Self, UsageError> {
        if max_rows == 0 {
            return Err(UsageError::BadMaxRows(max_rows));
        }
        Ok(UsageBook {
            rows: Mutex::new(Rows::default()),
            max_rows,
            fixed_day: AtomicI64::new(NO_DAY),
            folded: AtomicU64::new(0),
        })
    }

    /// The row bound.
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    /// The current UTC day (days since 1970-01-01), or the day fixed by [`Self::set_day`].
    pub fn today(&self) -> i64 {
        let fixed = self.fixed_day.load(Ordering::Relaxed);
        if fixed != NO_DAY {
            return fixed;
        }
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs() / 86_400).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_secs().div_ceil(86_400)).unwrap_or(0),
        }
    }

    /// Fix the day [`Self::record`] uses (tests), or go back to the clock with `None`.
    pub fn set_day(&self, day: Option<i64>) {
        let stored = day.map_or(NO_DAY, |d| d.max(NO_DAY + 1));
        self.fixed_day.store(stored, Ordering::Relaxed);
    }

    /// Record one call (or refusal) on the current UTC day.
    ///
    /// # Errors
    /// [`UsageError`] for a bad kind or a negative cost.
    pub fn record(
        &self,
        key_id: &str,
        tool: &str,
        kind: &str,
        cost: i64,
        duration_ms: f64,
    ) -> Result<(), UsageError> {
        self.record_at(key_id, tool, kind, cost, duration_ms, self.today())
    }

    /// Record one call (or refusal) on `day` (days since 1970-01-01).
    ///
    /// A duration that is negative or not finite counts as 0.
    ///
    /// # Errors
    /// [`UsageError`] for a bad kind or a negative cost.
    pub fn record_at(
        &self,
        key_id: &str,
        tool: &str,
        kind: &str,
        cost: i64,
        duration_ms: f64,
        day: i64,
    ) -> Result<(), UsageError> {
        let kind = Kind::parse(kind)?;
        let cost = u64::try_from(cost).map_err(|_| UsageError::BadCost(cost))?;
        let duration_ms = if duration_ms.is_finite() && duration_ms > 0.0 {
            duration_ms
        } else {
            0.0
        };
        let key_id = cut(key_id, MAX_KEY_BYTES);
        let tool = cut(tool, MAX_TOOL_BYTES);
        let mut rows = self.rows.lock();
        // Fast path: the row exists (no allocation).
        if let Some(c) = rows
            .keys
            .get_mut(key_id)
            .and_then(|t| t.get_mut(tool))
            .and_then(|days| days.iter_mut().find(|(d, _)| *d == day))
        {
            c.1.add(kind, cost, duration_ms);
            return Ok(());
        }
        let (counts, folded) = rows.slot(key_id, tool, day, self.max_rows);
        counts.add(kind, cost, duration_ms);
        if folded {
            self.folded.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Rows held (not yet drained).
    pub fn pending(&self) -> usize {
        self.rows.lock().len
    }

    /// Records counted in an [`OTHER`] row because the book was full, since it was made.
    pub fn folded(&self) -> u64 {
        self.folded.load(Ordering::Relaxed)
    }

    /// Every held row, removed from the book, sorted by (day, key, tool).
    pub fn drain(&self) -> Vec<Row> {
        let taken = std::mem::take(&mut *self.rows.lock());
        taken.into_rows()
    }

    /// A copy of every held row, sorted by (day, key, tool); the book is unchanged.
    pub fn snapshot(&self) -> Vec<Row> {
        let copy = self.rows.lock().clone();
        copy.into_rows()
    }

    /// Put drained rows back (a flush that failed), merged with what was recorded since.
    /// The row bound applies as to records: beyond it rows fold into the [`OTHER`] row.
    pub fn restore(&self, rows: Vec<Row>) {
        let mut held = self.rows.lock();
        let mut folded = 0u64;
        for row in rows {
            let key_id = cut(&row.key_id, MAX_KEY_BYTES);
            let tool = cut(&row.tool, MAX_TOOL_BYTES);
            let (counts, was_folded) = held.slot(key_id, tool, row.day, self.max_rows);
            counts.merge(&row.counts);
            if was_folded {
                folded = folded
                    .saturating_add(row.counts.calls)
                    .saturating_add(row.counts.refusals.iter().map(|(_, n)| *n).sum());
            }
        }
        drop(held);
        self.folded.fetch_add(folded, Ordering::Relaxed);
    }
}

/// `text` cut to at most `max` bytes at a character boundary.
pub fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::float_cmp)]
mod tests {
    use super::*;

    fn book(max_rows: usize) -> UsageBook {
        UsageBook::new(max_rows).unwrap()
    }

    fn refusals(c: &Counts) -> Vec<(String, u64)> {
        let mut v: Vec<_> = c
            .refusals
            .iter()
            .map(|(k, n)| (k.to_string(), *n))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn aggregates_calls_errors_cost_duration_and_refusals() {
        let b = book(10);
        b.record_at("k1", "search", "ok", 2, 1.5, 100).unwrap();
        b.record_at("k1", "search", "ok", 2, 2.5, 100).unwrap();
        b.record_at("k1", "search", "error", 3, 4.0, 100).unwrap();
        b.record_at("k1", "search", "rate_limited", 5, 9.0, 100)
            .unwrap();
        b.record_at("k1", "search", "rate_limited", 5, 9.0, 100)
            .unwrap();
        b.record_at("k1", "search", "would_refuse", 0, 0.0, 100)
            .unwrap();
        b.record_at("k1", "fetch", "ok", 1, 1.0, 100).unwrap();
        b.record_at("k2", "search", "credits_exhausted", 1, 0.0, 100)
            .unwrap();
        assert_eq!(b.pending(), 3);
        let rows = b.drain();
        assert_eq!(b.pending(), 0);
        assert_eq!(rows.len(), 3);
        let names: Vec<_> = rows
            .iter()
            .map(|r| (r.key_id.as_str(), r.tool.as_str()))
            .collect();
        assert_eq!(names, [("k1", "fetch"), ("k1", "search"), ("k2", "search")]);
        let s = &rows[1].counts;
        assert_eq!((s.calls, s.errors, s.cost), (3, 1, 7));
        assert_eq!(s.duration_ms, 8.0);
        assert_eq!(
            refusals(s),
            [("rate_limited".into(), 2), ("would_refuse".into(), 1)]
        );
        let k2 = &rows[2].counts;
        assert_eq!((k2.calls, k2.cost, k2.duration_ms), (0, 0, 0.0));
        assert_eq!(refusals(k2), [("credits_exhausted".into(), 1)]);
        assert!(b.drain().is_empty());
    }

    #[test]
    fn days_are_separate_rows() {
        let b = book(10);
        b.record_at("k", "t", "ok", 1, 1.0, 20_000).unwrap();
        b.record_at("k", "t", "ok", 1, 1.0, 20_001).unwrap();
        b.record_at("k", "t", "ok", 1, 1.0, 20_001).unwrap();
        let rows = b.drain();
        assert_eq!(
            rows.iter()
                .map(|r| (r.day, r.counts.calls))
                .collect::<Vec<_>>(),
            [(20_000, 1), (20_001, 2)]
        );
    }

    #[test]
    fn record_uses_the_fixed_day_then_the_clock() {
        let b = book(10);
        b.set_day(Some(12_345));
        assert_eq!(b.today(), 12_345);
        b.record("k", "t", "ok", 1, 0.0).unwrap();
        b.set_day(None);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            / 86_400;
        assert!((b.today() - i64::try_from(now).unwrap()).abs() <= 1);
        b.record("k", "t", "ok", 1, 0.0).unwrap();
        let days: Vec<_> = b.drain().iter().map(|r| r.day).collect();
        assert_eq!(days.len(), 2);
        assert_eq!(days[0], 12_345);
    }

    #[test]
    fn rows_beyond_the_bound_fold_into_other() {
        let b = book(3);
        for i in 0..10 {
            b.record_at(&format!("key{i}"), "t", "ok", 2, 1.0, 7)
                .unwrap();
        }
        b.record_at("key0", "t", "ok", 2, 1.0, 7).unwrap(); // existing row: not folded
        b.record_at("key9", "t", "rate_limited", 2, 1.0, 7).unwrap();
        assert_eq!(b.folded(), 8);
        assert_eq!(b.pending(), 4); // 3 + the OTHER row
        let rows = b.drain();
        let other = rows.iter().find(|r| r.key_id == OTHER).unwrap();
        assert_eq!(other.tool, OTHER);
        assert_eq!((other.counts.calls, other.counts.cost), (7, 14));
        assert_eq!(refusals(&other.counts), [("rate_limited".into(), 1)]);
        let total: u64 = rows.iter().map(|r| r.counts.calls).sum();
        assert_eq!(total, 11, "no call dropped");
        // After a drain the book takes new rows again.
        b.record_at("key5", "t", "ok", 1, 1.0, 7).unwrap();
        assert_eq!(b.drain()[0].key_id, "key5");
    }

    #[test]
    fn long_names_are_cut_at_a_char_boundary() {
        let b = book(10);
        let key = "é".repeat(200);
        b.record_at(&key, &"t".repeat(500), "ok", 1, 1.0, 1)
            .unwrap();
        let rows = b.drain();
        assert_eq!(rows[0].key_id.len(), MAX_KEY_BYTES);
        assert_eq!(rows[0].tool.len(), MAX_TOOL_BYTES);
        assert_eq!(cut("aé", 2), "a");
    }

    #[test]
    fn bad_kind_and_cost_are_refused() {
        let b = book(10);
        for bad in ["", "Rate", "rate-limited", "x y", &"a".repeat(33)] {
            assert!(matches!(
                b.record_at("k", "t", bad, 1, 1.0, 1),
                Err(UsageError::BadKind(_))
            ));
        }
        assert_eq!(
            b.record_at("k", "t", "ok", -1, 1.0, 1),
            Err(UsageError::BadCost(-1))
        );
        assert_eq!(b.pending(), 0);
        assert!(UsageBook::new(0).is_err());
    }

    #[test]
    fn odd_durations_count_as_zero() {
        let b = book(10);
        for d in [f64::NAN, f64::INFINITY, -3.0] {
            b.record_at("k", "t", "ok", 1, d, 1).unwrap();
        }
        let rows = b.drain();
        assert_eq!((rows[0].counts.calls, rows[0].counts.duration_ms), (3, 0.0));
    }

    #[test]
    fn refusal_kinds_per_row_are_bounded() {
        let b = book(10);
        for i in 0..40 {
            b.record_at("k", "t", &format!("kind{i}"), 1, 1.0, 1)
                .unwrap();
        }
        let rows = b.drain();
        let r = &rows[0].counts.refusals;
        assert_eq!(r.len(), MAX_KINDS_PER_ROW);
        assert_eq!(r.iter().map(|(_, n)| n).sum::<u64>(), 40);
        let other = r.iter().find(|(k, _)| k == "other").unwrap().1;
        assert_eq!(other, 40 - (MAX_KINDS_PER_ROW as u64 - 1));
    }

    #[test]
    fn restore_merges_with_new_records() {
        let b = book(10);
        b.record_at("k", "t", "ok", 2, 1.0, 5).unwrap();
        b.record_at("k", "t", "forbidden", 0, 0.0, 5).unwrap();
        let drained = b.drain();
        b.record_at("k", "t", "ok", 3, 2.0, 5).unwrap();
        b.restore(drained);
        let rows = b.drain();
        assert_eq!(rows.len(), 1);
        let c = &rows[0].counts;
        assert_eq!((c.calls, c.cost, c.duration_ms), (2, 5, 3.0));
        assert_eq!(refusals(c), [("forbidden".into(), 1)]);
        assert_eq!(b.snapshot(), Vec::new());
    }

    #[test]
    fn restore_beyond_the_bound_folds() {
        let b = book(2);
        let rows: Vec<Row> = (0..5)
            .map(|i| Row {
                day: 1,
                key_id: format!("k{i}"),
                tool: "t".into(),
                counts: Counts {
                    calls: 2,
                    ..Counts::default()
                },
            })
            .collect();
        b.restore(rows);
        let out = b.drain();
        assert_eq!(out.iter().map(|r| r.counts.calls).sum::<u64>(), 10);
        assert_eq!(out.iter().filter(|r| r.key_id == OTHER).count(), 1);
        assert_eq!(b.folded(), 6);
    }

    #[test]
    fn snapshot_leaves_the_book_unchanged() {
        let b = book(10);
        b.record_at("k", "t", "ok", 1, 1.0, 1).unwrap();
        let snap = b.snapshot();
        assert_eq!(snap, b.drain());
    }

    #[test]
    fn concurrent_records_all_count() {
        let b = std::sync::Arc::new(book(1000));
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000 {
                        b.record_at(&format!("k{}", i % 7), "t", "ok", 1, 0.5, t % 2)
                            .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let rows = b.drain();
        assert_eq!(rows.iter().map(|r| r.counts.calls).sum::<u64>(), 40_000);
        assert_eq!(rows.len(), 14);
    }
}
