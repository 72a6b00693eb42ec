//! Bindings of the usage book (`src/usage.rs`) behind `Usage` (`usage.py`): `UsageBook`.
//!
//! `record` is the hot path (one call per guarded call): it stays attached to the
//! interpreter and takes borrowed `&str`s. Rows cross as tuples
//! `(day, key_id, tool, calls, errors, cost, duration_ms, refusals)`, `day` in days since
//! 1970-01-01 (UTC) and `refusals` a `dict[str, int]`.

use std::borrow::Cow;
use std::collections::HashMap;

use pyo3::prelude::*;

use crate::errors::invalid_argument;
use crate::usage::{Counts, Row, UsageBook, UsageError};

type PyRow = (
    i64,
    String,
    String,
    u64,
    u64,
    u64,
    f64,
    HashMap<String, u64>,
);

fn usage_err(e: UsageError) -> PyErr {
    invalid_argument(e.to_string())
}

fn to_py(row: Row) -> PyRow {
    let c = row.counts;
    let refusals = c
        .refusals
        .into_iter()
        .map(|(k, n)| (k.into_owned(), n))
        .collect();
    (
        row.day,
        row.key_id,
        row.tool,
        c.calls,
        c.errors,
        c.cost,
        c.duration_ms,
        refusals,
    )
}

/// Usage per key x tool x UTC day, aggregated in memory until drained.
#[pyclass(frozen, module = "fastmcp_guard._core", name = "UsageBook")]
pub(super) struct PyUsageBook(UsageBook);

#[pymethods]
impl PyUsageBook {
    /// `max_rows`: the rows held between two drains (`usage::DEFAULT_MAX_ROWS`).
    #[new]
    #[pyo3(signature = (*, max_rows = 100_000))]
    fn new(max_rows: usize) -> PyResult<Self> {
        Ok(PyUsageBook(UsageBook::new(max_rows).map_err(usage_err)?))
    }

    /// Record one call (`ok` / `error`) or refusal (any other kind) on the current day.
    fn record(
        &self,
        key_id: &str,
        tool: &str,
        kind: &str,
        cost: i64,
        duration_ms: f64,
    ) -> PyResult<()> {
        self.record_at(key_id, tool, kind, cost, duration_ms, self.0.today())
    }

    /// `record` on `day` (days since 1970-01-01, UTC).
    #[allow(clippy::too_many_arguments)]
    fn record_at(
        &self,
        key_id: &str,
        tool: &str,
        kind: &str,
        cost: i64,
        duration_ms: f64,
        day: i64,
    ) -> PyResult<()> {
        self.0
            .record_at(key_id, tool, kind, cost, duration_ms, day)
            .map_err(usage_err)
    }

    /// Every held row, removed from the book.
    fn drain(&self) -> Vec<PyRow> {
        self.0.drain().into_iter().map(to_py).collect()
    }

    /// A copy of every held row.
    fn snapshot(&self) -> Vec<PyRow> {
        self.0.snapshot().into_iter().map(to_py).collect()
    }

    /// Put drained rows back (after a failed flush).
    fn restore(&self, rows: Vec<PyRow>) {
        let rows = rows
            .into_iter()
            .map(
                |(day, key_id, tool, calls, errors, cost, duration_ms, refusals)| Row {
                    day,
                    key_id,
                    tool,
                    counts: Counts {
                        calls,
                        errors,
                        cost,
                        duration_ms,
                        refusals: refusals
                            .into_iter()
                            .map(|(k, n)| (Cow::Owned(k), n))
                            .collect(),
                    },
                },
            )
            .collect();
        self.0.restore(rows);
    }

    /// Rows held.
    fn pending(&self) -> usize {
        self.0.pending()
    }

    /// The current UTC day (or the fixed one), in days since 1970-01-01.
    fn today(&self) -> i64 {
        self.0.today()
    }

    /// Fix the day `record` uses (tests); `None` goes back to the clock.
    #[pyo3(signature = (day))]
    fn set_day(&self, day: Option<i64>) {
        self.0.set_day(day);
    }

    /// Records folded into the `*other*` row because the book was full.
    #[getter]
    fn folded(&self) -> u64 {
        self.0.folded()
    }

    #[getter]
    fn max_rows(&self) -> usize {
        self.0.max_rows()
    }

    fn __repr__(&self) -> String {
        format!(
            "UsageBook(pending={}, max_rows={}, folded={})",
            self.0.pending(),
            self.0.max_rows(),
            self.0.folded()
        )
    }
}
