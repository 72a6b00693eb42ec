//! Bindings of the audit log's read side (`src/audit/scan.rs`, `query`, `verify_files`,
//! `spool.rs`), each run with the GIL released: `audit_scan` (the filtered export
//! behind `fastmcp-guard audit export` / `tail`, `cli/audit.py`), `audit_verify` (`audit
//! verify`), `audit_log_files` (the CLI, and the HTTP backend's spool in
//! `audit/http.py`), `audit_spool_read` (that backend's batches) and `audit_query`
//! (`AuditLog.query` over `SQLite`, `audit/__init__.py`).

use std::path::PathBuf;

use chrono::{DateTime, TimeZone, Utc};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};

use super::audit::chain_key;
use super::json::json_to_py;
use crate::audit::scan::{
    create_export, log_files, scan_paths, whole_log, OutputFormat, ScanFilter,
};
use crate::audit::{AuditQuery, AuditRecord, Status};
use crate::errors::{audit_read_error, invalid_argument, wrong_type};

/// Unix seconds to an instant truncated to the millisecond (as stored timestamps are).
fn query_instant(secs: f64, what: &str) -> PyResult<DateTime<Utc>> {
    let bad = || {
        invalid_argument(format!(
            "{what} must be a Unix time in seconds within years 1..9999, got {secs}"
        ))
    };
    if !secs.is_finite() || secs.abs() > 3.0e11 {
        return Err(bad());
    }
    // Whole microseconds first: `secs * 1000` floored directly would turn .042 into .041.
    #[allow(
        clippy::cast_possible_truncation,
        reason = "|secs| <= 3e11, so |micros| < 2^53"
    )]
    let micros = (secs * 1e6).round() as i64;
    Utc.timestamp_millis_opt(micros.div_euclid(1000))
        .single()
        .ok_or_else(bad)
}

fn record_to_py<'py>(py: Python<'py>, r: &AuditRecord) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("ts", &r.ts)?;
    d.set_item("key_id", &r.key_id)?;
    d.set_item("key_name", &r.key_name)?;
    d.set_item("tool", &r.tool)?;
    d.set_item("scopes", &r.scopes)?;
    d.set_item("duration_ms", r.duration_ms)?;
    d.set_item("status", &r.status)?;
    d.set_item("error", &r.error)?;
    d.set_item(
        "input_args",
        r.input_args
            .as_ref()
            .map(|v| json_to_py(py, v))
            .transpose()?,
    )?;
    d.set_item("output_preview", &r.output_preview)?;
    d.set_item("client_ip", &r.client_ip)?;
    d.set_item("metadata", json_to_py(py, &r.metadata)?)?;
    for (k, v) in &r.extra {
        d.set_item(k, json_to_py(py, v)?)?;
    }
    Ok(d)
}

/// Where `audit_scan` writes: a file it creates, or a Python binary stream.
enum ScanOut {
    File(std::io::BufWriter<std::fs::File>),
    Stream {
        target: Py<PyAny>,
        /// The exception `target.write` raised, re-raised after the scan.
        failed: Option<PyErr>,
    },
}

impl std::io::Write for ScanOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            ScanOut::File(f) => f.write(buf),
            ScanOut::Stream { target, failed } => Python::attach(|py| {
                match target.call_method1(py, "write", (pyo3::types::PyBytes::new(py, buf),)) {
                    Ok(_) => Ok(buf.len()),
                    Err(e) => {
                        let broken = e.is_instance_of::<pyo3::exceptions::PyBrokenPipeError>(py);
                        *failed = Some(e);
                        Err(std::io::Error::new(
                            if broken {
                                std::io::ErrorKind::BrokenPipe
                            } else {
                                std::io::ErrorKind::Other
                            },
                            "the output stream's write() raised",
                        ))
                    }
                }
            }),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            ScanOut::File(f) => f.flush(),
            ScanOut::Stream { .. } => Ok(()),
        }
    }
}

/// Filters a JSONL audit log in one streaming pass (constant memory, the GIL released),
/// writing matching lines as JSONL or CSV to `out`: a path (created, mode 0600, or
/// truncated) or a binary stream with `write(bytes)`. `path` may be a list of files,
/// read in order as one log (see `audit_log_files`). Returns the counts.
#[pyfunction]
#[pyo3(signature = (path, out, *, key=None, tool=None, status=None, since=None, until=None,
                    limit=None, format="jsonl", header=true, progress=None))]
#[allow(clippy::too_many_arguments, reason = "one keyword argument per filter")]
pub(super) fn audit_scan<'py>(
    py: Python<'py>,
    path: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    key: Option<String>,
    tool: Option<String>,
    status: Option<&str>,
    since: Option<f64>,
    until: Option<f64>,
    limit: Option<u64>,
    format: &str,
    header: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let (paths, _) = log_paths(path)?;
    let format = match format {
        "jsonl" => OutputFormat::Jsonl,
        "csv" => OutputFormat::Csv { header },
        other => {
            return Err(invalid_argument(format!(
                "format must be 'jsonl' or 'csv', got {other:?}"
            )))
        }
    };
    let filter = ScanFilter {
        key,
        tool,
        status: status.map(str::parse::<Status>).transpose()?,
        since: since.map(|s| query_instant(s, "since")).transpose()?,
        until: until.map(|s| query_instant(s, "until")).transpose()?,
        limit,
    };
    let mut sink = if let Ok(p) = out.extract::<PathBuf>() {
        let file = py.detach(|| create_export(&p))?;
        ScanOut::File(std::io::BufWriter::with_capacity(1 << 20, file))
    } else if out.hasattr("write")? {
        ScanOut::Stream {
            target: out.clone().unbind(),
            failed: None,
        }
    } else {
        return Err(wrong_type(format!(
            "out must be a path or a binary stream with write(), got {}",
            out.get_type().name()?
        )));
    };
    let mut callback_error: Option<PyErr> = None;
    let result = py.detach(|| {
        let mut on_progress = |bytes: u64| -> bool {
            Python::attach(|py| {
                let step = py.check_signals().and_then(|()| match &progress {
                    Some(cb) => cb.call1(py, (bytes,))?.bind(py).is_truthy(),
                    None => Ok(true),
                });
                step.unwrap_or_else(|e| {
                    callback_error = Some(e);
                    false
                })
            })
        };
        let res = scan_paths(&paths, &filter, format, &mut sink, &mut on_progress);
        let flushed = std::io::Write::flush(&mut sink);
        (res, flushed)
    });
    if let Some(e) = callback_error {
        return Err(e);
    }
    if let ScanOut::Stream {
        failed: Some(e), ..
    } = &mut sink
    {
        if let Some(e) = Some(e.clone_ref(py)) {
            return Err(e);
        }
    }
    let stats = result.0?;
    result
        .1
        .map_err(|source| crate::audit::scan::ScanError::Write { source })?;
    let d = PyDict::new(py);
    d.set_item("lines", stats.lines)?;
    d.set_item("matched", stats.matched)?;
    d.set_item("malformed", stats.malformed)?;
    d.set_item("bytes_read", stats.bytes_read)?;
    Ok(d)
}

/// Paths from `path_or_paths`: one path (the live file: the whole log, rotated files
/// first) or a sequence of paths taken as they are.
fn log_paths(path_or_paths: &Bound<'_, PyAny>) -> PyResult<(Vec<PathBuf>, bool)> {
    if let Ok(p) = path_or_paths.extract::<PathBuf>() {
        return Ok((vec![p], true));
    }
    if path_or_paths.cast::<PyString>().is_err() {
        if let Ok(list) = path_or_paths.extract::<Vec<PathBuf>>() {
            return Ok((list, false));
        }
    }
    Err(wrong_type(format!(
        "expected a path or a list of paths, got {}",
        path_or_paths.get_type().name()?
    )))
}

/// Every file of the JSONL audit log at `path`, oldest first: its rotated files
/// (`<stem>-<yyyymmddTHHMMSSmmm><ext>` beside it), then `path` itself if it exists.
#[pyfunction]
pub(super) fn audit_log_files(py: Python<'_>, path: PathBuf) -> PyResult<Vec<String>> {
    let files = py.detach(|| log_files(&path))?;
    Ok(files.iter().map(|p| p.display().to_string()).collect())
}

/// One read of an HTTP audit spool file for a batch (the GIL released): the complete
/// chained lines from `offset` that fit after `lines` lines / `size` body bytes of at most
/// `max_lines` / `max_bytes`. `None` if the file is gone or is no longer inode `ino`.
/// Else `(body, lines, first_id, last_id, consumed, malformed, file_size, size)`: `body`
/// the lines joined by `,`; `consumed` the bytes read through the last newline looked at.
#[pyfunction]
#[allow(
    clippy::type_complexity,
    clippy::too_many_arguments,
    reason = "flat arguments and tuple for one internal caller"
)]
pub(super) fn audit_spool_read<'py>(
    py: Python<'py>,
    path: PathBuf,
    ino: u64,
    offset: u64,
    lines: usize,
    max_lines: usize,
    size: usize,
    max_bytes: usize,
) -> PyResult<
    Option<(
        Bound<'py, PyBytes>,
        usize,
        String,
        String,
        u64,
        usize,
        u64,
        usize,
    )>,
> {
    let room = crate::audit::spool::BatchRoom {
        lines,
        max_lines,
        size,
        max_bytes,
    };
    let read = py
        .detach(|| crate::audit::spool::read_spool(&path, ino, offset, room))
        .map_err(|e| {
            audit_read_error(
                &e,
                format!("cannot read the audit spool file {}: {e}", path.display()),
            )
        })?;
    Ok(read.map(|r| {
        (
            PyBytes::new(py, &r.body),
            r.lines,
            r.first_id,
            r.last_id,
            r.consumed,
            r.malformed,
            r.file_size,
            r.size,
        )
    }))
}

/// Checks the hash chain of a JSONL audit log (the GIL released). `path_or_paths`: the
/// live file (its rotated files are read first, oldest first) or a list of files in
/// order. `key`: the chain key it was written with (`bytes` or `str`).
#[pyfunction]
#[pyo3(signature = (path_or_paths, *, key=None))]
pub(super) fn audit_verify<'py>(
    py: Python<'py>,
    path_or_paths: &Bound<'py, PyAny>,
    key: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let (given, whole_log_given) = log_paths(path_or_paths)?;
    let key = chain_key(key)?;
    let paths = if whole_log_given {
        py.detach(|| whole_log(&given[0]))?
    } else {
        given
    };
    let report = py.detach(|| crate::audit::verify_files(&paths, key.as_ref()))?;
    let d = PyDict::new(py);
    d.set_item("ok", report.is_ok())?;
    d.set_item("events", report.events)?;
    d.set_item("files", report.files)?;
    d.set_item(
        "paths",
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>(),
    )?;
    d.set_item("unchained", report.unchained)?;
    d.set_item("torn", report.torn)?;
    d.set_item(
        "torn_at_end",
        report
            .torn_at_end
            .iter()
            .map(|(p, l)| format!("{}:{l}", p.display()))
            .collect::<Vec<_>>(),
    )?;
    d.set_item(
        "continues_from",
        report
            .continues_from
            .as_ref()
            .map(|(p, l)| format!("{}:{l}", p.display())),
    )?;
    d.set_item(
        "last_chain",
        report.last_chain.as_ref().map(crate::audit::chain::to_hex),
    )?;
    let broken = match &report.broken {
        None => None,
        Some(b) => {
            let bd = PyDict::new(py);
            bd.set_item("file", b.path.display().to_string())?;
            bd.set_item("line", b.line)?;
            bd.set_item("reason", &b.reason)?;
            Some(bd)
        }
    };
    d.set_item("broken", broken)?;
    Ok(d)
}

/// Records of the `SQLite` audit database at `path`, newest first (releases the GIL).
#[pyfunction]
#[pyo3(signature = (path, *, key_id=None, key_name=None, tool=None, status=None, since=None, until=None, limit=100))]
#[allow(clippy::too_many_arguments, reason = "one keyword argument per filter")]
pub(super) fn audit_query<'py>(
    py: Python<'py>,
    path: PathBuf,
    key_id: Option<String>,
    key_name: Option<String>,
    tool: Option<String>,
    status: Option<&str>,
    since: Option<f64>,
    until: Option<f64>,
    limit: i64,
) -> PyResult<Vec<Bound<'py, PyDict>>> {
    let status = status.map(str::parse::<Status>).transpose()?;
    let limit = usize::try_from(limit)
        .map_err(|_| invalid_argument(format!("limit must be >= 0, got {limit}")))?;
    let q = AuditQuery {
        key_id,
        key_name,
        tool,
        status,
        since: since.map(|s| query_instant(s, "since")).transpose()?,
        until: until.map(|s| query_instant(s, "until")).transpose()?,
        limit,
    };
    let records = py.detach(move || crate::audit::query(&path, &q))?;
    records.iter().map(|r| record_to_py(py, r)).collect()
}
