//! Bindings of the audit writers (`src/audit/`) behind the `AuditLog` facade
//! (`audit/__init__.py`) and its backends (`audit/http.py`, `audit/otel.py`):
//! `AuditWriter` (one JSONL or `SQLite` backend), `AuditFanout` over `AuditSink`s (several
//! backends, one queue), `JsonText` and `mask_tokens` (also used by `http.py`). `log`
//! renders the line straight from the Python objects and only enqueues it; flushes and
//! opening files run with the GIL released. The read side (query, export, verify) is
//! in `scan.rs`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFloat, PyList, PyString, PyTuple};

use super::json::{write_py_json, write_py_json_redacted, write_py_key, write_py_str};
use crate::audit::mask::{mask_str, mask_tail};
use crate::audit::{
    cut_field, is_reserved_field, write_line_parts, Admitted, AuditWriter, ChainKey, FanSink,
    JsonlFileSink, JsonlOptions, LineHead, OnFull, Redactor, Refusal, RefusalOptions, Sink,
    SlotStats, SqliteSink, Status, WriterOptions,
};
use crate::errors::{self, Exc};

/// Bounded queue + background thread writing batches: JSONL lines (`AuditWriter(path)`)
/// or `SQLite` rows, one transaction per batch (`AuditWriter.sqlite(path)`).
#[pyclass(frozen, weakref, module = "fastmcp_guard._core", name = "AuditWriter")]
pub(super) struct PyAuditWriter {
    inner: AuditWriter,
    path: String,
    kind: &'static str,
    /// What is recorded of each event (redaction, inputs, outputs).
    rec: Recording,
    /// At most one lost-events warning per this interval.
    warn_interval: Duration,
}

/// What `log` records of an event, and how: the audit log's choices, applied in Rust so
/// that `AuditLog.log` can be the core's method itself; plus the Python targets that see
/// every event after it is queued (OpenTelemetry, metrics: "taps").
struct Recording {
    /// `redact=` patterns; `None` when there are none (the hot path skips them).
    redact: Option<Redactor>,
    log_inputs: bool,
    log_outputs: bool,
    preview_chars: usize,
    taps: parking_lot::RwLock<Vec<Py<PyAny>>>,
}

/// The arguments of one `log` call, as given (the original objects, which taps receive).
struct LogCall<'a, 'py> {
    status: &'a Bound<'py, PyString>,
    key_id: Option<&'a Bound<'py, PyString>>,
    key_name: Option<&'a Bound<'py, PyString>>,
    tool: Option<&'a Bound<'py, PyString>>,
    scopes: Option<&'a Bound<'py, PyAny>>,
    duration_ms: f64,
    error: Option<&'a Bound<'py, PyString>>,
    input_args: Option<&'a Bound<'py, PyAny>>,
    output_preview: Option<&'a Bound<'py, PyString>>,
    client_ip: Option<&'a Bound<'py, PyString>>,
    metadata: Option<&'a Bound<'py, PyAny>>,
    extra: Option<&'a Bound<'py, PyDict>>,
}

/// `s` as `&str` (`""` when absent).
fn text<'a>(s: Option<&'a Bound<'_, PyString>>) -> PyResult<&'a str> {
    s.map_or(Ok(""), |s| s.to_str())
}

impl Recording {
    fn new(
        redact: Option<Vec<String>>,
        log_inputs: bool,
        log_outputs: bool,
        preview_chars: usize,
    ) -> PyResult<Self> {
        Ok(Recording {
            redact: redactor(redact)?,
            log_inputs,
            log_outputs,
            preview_chars,
            taps: parking_lot::RwLock::new(Vec::new()),
        })
    }

    /// Renders the event straight from the Python objects into a reused queue entry of
    /// `writer` (one serialisation, no allocation in the steady state; a full queue under
    /// the block policy is waited on with the GIL released), then calls each tap with the
    /// recorded fields in `AuditWriter.log`'s positional order. `False` if the queue
    /// dropped the event or a tap returned false; a tap's exception propagates.
    fn enqueue<'py>(
        &self,
        py: Python<'py>,
        writer: &AuditWriter,
        c: &LogCall<'_, 'py>,
        refusal: Option<&str>,
    ) -> PyResult<bool> {
        let preview = c
            .output_preview
            .filter(|_| self.log_outputs)
            .map(|p| p.to_str().map(|t| (p, first_chars(t, self.preview_chars))))
            .transpose()?;
        let input_args = c.input_args.filter(|_| self.log_inputs);
        let status: Status = c
            .status
            .to_str()?
            .parse()
            .map_err(|e: crate::audit::AuditError| PyValueError::new_err(e.to_string()))?;
        let head = LineHead {
            ts: Utc::now(),
            key_id: text(c.key_id)?,
            key_name: text(c.key_name)?,
            tool: text(c.tool)?,
            duration_ms: c.duration_ms,
            status,
            error: c.error.map(|e| e.to_str()).transpose()?,
            output_preview: preview.map(|(_, cut)| cut),
            client_ip: c.client_ip.map(|e| e.to_str()).transpose()?,
        };
        let scopes = match c.scopes {
            Some(s) => scopes_tuple(s)?,
            None => PyTuple::empty(py),
        };
        let render = |buf: &mut Vec<u8>| {
            render_line(
                buf,
                &head,
                &scopes,
                input_args,
                c.metadata,
                c.extra,
                self.redact.as_ref(),
            );
        };
        let queued = match refusal {
            None => writer.enqueue_line_with(render, |wait| py.detach(wait)),
            Some(reason) => {
                let r = Refusal {
                    status,
                    client_ip: head.client_ip,
                    reason,
                    key_id: head.key_id,
                    error: head.error,
                };
                // A refusal only counted is accounted for (its group's summary has it).
                writer.enqueue_refusal_line_with(&r, render, |wait| py.detach(wait))
                    != Admitted::Dropped
            }
        };
        let taps: Vec<Py<PyAny>> = {
            let held = self.taps.read();
            if held.is_empty() {
                return Ok(queued);
            }
            held.iter().map(|t| t.clone_ref(py)).collect()
        };
        let empty = pyo3::intern!(py, "");
        let none = py.None().into_bound(py);
        let or_none = |v: Option<&Bound<'py, PyAny>>| -> Bound<'py, PyAny> {
            v.map_or_else(|| none.clone(), Clone::clone)
        };
        let preview_obj = match preview {
            None => none.clone(),
            Some((orig, cut)) if cut.len() == orig.to_str()?.len() => orig.clone().into_any(),
            Some((_, cut)) => PyString::new(py, cut).into_any(),
        };
        let args = PyTuple::new(
            py,
            [
                c.status.clone().into_any(),
                c.key_id.unwrap_or(empty).clone().into_any(),
                c.key_name.unwrap_or(empty).clone().into_any(),
                c.tool.unwrap_or(empty).clone().into_any(),
                scopes.into_any(),
                PyFloat::new(py, c.duration_ms).into_any(),
                or_none(c.error.map(|e| e.as_any())),
                or_none(input_args),
                preview_obj,
                or_none(c.client_ip.map(|e| e.as_any())),
                or_none(c.metadata),
                or_none(c.extra.map(|e| e.as_any())),
            ],
        )?;
        let mut all = queued;
        for tap in taps {
            all &= tap.call1(py, args.clone())?.is_truthy(py)?;
        }
        Ok(all)
    }

    fn add_tap(&self, tap: Py<PyAny>) {
        self.taps.write().push(tap);
    }

    /// `log_refusal` of the writers: the refusal as an event with `reason` first among
    /// its extra fields, aggregated by the core writer; every tap sees every refusal
    /// (the metrics count them all), whether its line is written or only counted.
    /// Every string given is cut at [`cut_field`]'s bound first (the text is the
    /// client's: a refusal line must stay small), for the line and the taps alike.
    #[allow(clippy::too_many_arguments, reason = "the refusal's fields, as given")]
    fn refusal<'py>(
        &self,
        py: Python<'py>,
        writer: &AuditWriter,
        status: &Bound<'py, PyString>,
        client_ip: Option<&Bound<'py, PyString>>,
        reason: &Bound<'py, PyString>,
        key_id: Option<&Bound<'py, PyString>>,
        error: Option<&Bound<'py, PyString>>,
        extra: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<bool> {
        let reason = cut_py(reason)?;
        let client_ip = client_ip.map(cut_py).transpose()?;
        let key_id = key_id.map(cut_py).transpose()?;
        let error = error.map(cut_py).transpose()?;
        let fields = PyDict::new(py);
        fields.set_item(pyo3::intern!(py, "reason"), &reason)?;
        if let Some(extra) = extra {
            for (k, v) in extra.iter() {
                if !k.eq(pyo3::intern!(py, "reason"))? {
                    let k = match k.cast::<PyString>() {
                        Ok(name) => cut_py(name)?.into_any(),
                        Err(_) => k,
                    };
                    fields.set_item(k, cut_value(&v)?)?;
                }
            }
        }
        let call = LogCall {
            status,
            key_id: key_id.as_ref(),
            key_name: None,
            tool: None,
            scopes: None,
            duration_ms: 0.0,
            error: error.as_ref(),
            input_args: None,
            output_preview: None,
            client_ip: client_ip.as_ref(),
            metadata: None,
            extra: Some(&fields),
        };
        self.enqueue(py, writer, &call, Some(reason.to_str()?))
    }
}

/// `s` cut as every string of a refusal is ([`cut_field`]): itself when short enough.
/// A string Python cannot encode (a lone surrogate) is taken lossily, as the renderer
/// does: a refusal is recorded, never raised.
fn cut_py<'py>(s: &Bound<'py, PyString>) -> PyResult<Bound<'py, PyString>> {
    let Ok(text) = s.to_str() else {
        let lossy = s.to_string_lossy();
        return Ok(PyString::new(s.py(), cut_field(&lossy)));
    };
    let cut = cut_field(text);
    Ok(if cut.len() == text.len() {
        s.clone()
    } else {
        PyString::new(s.py(), cut)
    })
}

/// An `extra` value of a refusal, bounded: a string cut as [`cut_py`]; any other value
/// kept if its JSON is short enough, else replaced by that JSON text, cut.
fn cut_value<'py>(v: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    if let Ok(s) = v.cast::<PyString>() {
        return Ok(cut_py(s)?.into_any());
    }
    let mut json = Vec::new();
    write_py_json(&mut json, v, 0);
    if json.len() <= crate::audit::refusals::MAX_FIELD_BYTES {
        return Ok(v.clone());
    }
    let text = String::from_utf8_lossy(&json);
    Ok(PyString::new(v.py(), cut_field(&text)).into_any())
}

/// The first `n` characters of `s` (as Python's `s[:n]`).
fn first_chars(s: &str, n: usize) -> &str {
    if n >= s.len() {
        return s; // no more characters than bytes
    }
    s.char_indices().nth(n).map_or(s, |(i, _)| &s[..i])
}

/// Logs `msg` as a warning on `fastmcp_guard.audit`; never fails (logging must never make
/// `log` fail).
fn audit_warning(py: Python<'_>, msg: String) {
    let _ = py
        .import("logging")
        .and_then(|m| m.call_method1("getLogger", (AUDIT_LOGGER,)))
        .and_then(|l| l.call_method1("warning", (msg,)));
}

/// Warns about events `writer` lost (queue full, closed, paused, failed writes) since the
/// last warning, at most once per `interval`.
fn warn_writer_losses(py: Python<'_>, path: &str, writer: &AuditWriter, interval: Duration) {
    let Some(r) = writer.take_loss_report(interval) else {
        return;
    };
    audit_warning(
        py,
        format!(
            "audit log {path}: {} event{} lost since the last warning ({} dropped in all: queue \
             full, writer closed or paused{}; {} lost to failed writes in all){}",
            r.lost,
            if r.lost == 1 { "" } else { "s" },
            r.dropped,
            if r.paused_dropped > 0 {
                format!(", {} of them while paused", r.paused_dropped)
            } else {
                String::new()
            },
            r.failed,
            loss_context(r.paused, r.last_error),
        ),
    );
}

/// `; paused: <why>` and `; last error: <message>`, each when there is one.
fn loss_context(paused: Option<String>, last_error: Option<String>) -> String {
    let mut out = String::new();
    if let Some(p) = paused {
        out += &format!("; paused: {p}");
    }
    if let Some(e) = last_error {
        out += &format!("; last error: {e}");
    }
    out
}

/// Warns about events one backend of a fan-out lost (failed writes, paused).
fn warn_slot_losses(py: Python<'_>, path: &str, slot: &SlotStats, interval: Duration) {
    let Some(r) = slot.take_loss_report(interval) else {
        return;
    };
    audit_warning(
        py,
        format!(
            "audit log {path}: {} event{} lost since the last warning ({} lost to failed \
             writes in all; {} skipped while paused in all){}",
            r.lost,
            if r.lost == 1 { "" } else { "s" },
            r.failed,
            r.paused_dropped,
            loss_context(r.paused, r.last_error),
        ),
    );
}

/// Logger of the lost-events warnings.
const AUDIT_LOGGER: &str = "fastmcp_guard.audit";

/// The `refusal_*` keyword options of the writers.
#[derive(Debug, Clone, Copy)]
struct RefusalArgs {
    burst: u32,
    interval_ms: u64,
    max_groups: usize,
    max_lines: u32,
}

impl From<RefusalArgs> for RefusalOptions {
    fn from(a: RefusalArgs) -> Self {
        RefusalOptions {
            burst: a.burst,
            interval: Duration::from_millis(a.interval_ms),
            max_groups: a.max_groups,
            max_lines: a.max_lines,
        }
    }
}

fn writer_options(
    queue_capacity: usize,
    batch_max: usize,
    flush_interval_ms: u64,
    on_full: &str,
    block_ms: u64,
    refusals: RefusalArgs,
) -> PyResult<WriterOptions> {
    let on_full = match on_full {
        "drop" => OnFull::Drop,
        "block" => OnFull::Block(Duration::from_millis(block_ms)),
        other => {
            return Err(crate::errors::invalid_argument(format!(
                "on_full must be 'drop' or 'block', got {other:?}"
            )))
        }
    };
    Ok(WriterOptions {
        queue_capacity,
        batch_max,
        flush_interval: Duration::from_millis(flush_interval_ms),
        on_full,
        refusals: refusals.into(),
    })
}

fn redactor(patterns: Option<Vec<String>>) -> PyResult<Option<Redactor>> {
    let Some(patterns) = patterns else {
        return Ok(None);
    };
    let r = Redactor::new(&patterns).map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok((!r.is_empty()).then_some(r))
}

/// Renders values as the audit line does: compact JSON text, values JSON cannot hold
/// as their `repr`, keys matched by the `redact=` patterns as `"[redacted]"` (for
/// backends that do not write lines, e.g. OpenTelemetry attributes).
#[pyclass(frozen, module = "fastmcp_guard._core", name = "JsonText")]
pub(super) struct PyJsonText {
    redact: Option<Redactor>,
}

#[pymethods]
impl PyJsonText {
    #[new]
    #[pyo3(signature = (redact=None))]
    fn new(redact: Option<Vec<String>>) -> PyResult<Self> {
        Ok(PyJsonText {
            redact: redactor(redact)?,
        })
    }

    fn __call__(&self, value: &Bound<'_, PyAny>) -> String {
        let mut buf = Vec::with_capacity(64);
        match &self.redact {
            None => write_py_json(&mut buf, value, 0),
            Some(r) => write_py_json_redacted(&mut buf, value, 0, r, r.root()),
        }
        mask_tail(&mut buf, 0);
        // The writer emits UTF-8 (strings are copied from Python's UTF-8, escapes ASCII).
        String::from_utf8(buf).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into())
    }
}

/// `text` with every token-shaped string masked as audit lines are (`fmg_sk_<id>_***`):
/// for what Python hands to a backend the core does not render (OpenTelemetry attributes).
#[pyfunction]
pub(super) fn mask_tokens<'py>(text: &Bound<'py, PyString>) -> PyResult<Bound<'py, PyString>> {
    let s = text.to_str()?;
    Ok(match mask_str(s) {
        std::borrow::Cow::Borrowed(_) => text.clone(),
        std::borrow::Cow::Owned(m) => PyString::new(text.py(), &m),
    })
}

/// A chain key given as `bytes` or `str` (its UTF-8).
pub(super) fn chain_key(key: Option<&Bound<'_, PyAny>>) -> PyResult<Option<ChainKey>> {
    let Some(key) = key.filter(|k| !k.is_none()) else {
        return Ok(None);
    };
    let bytes: Vec<u8> = if let Ok(s) = key.cast::<PyString>() {
        s.to_str()?.as_bytes().to_vec()
    } else if let Ok(b) = key.extract::<Vec<u8>>() {
        b
    } else {
        return Err(PyTypeError::new_err(format!(
            "chain_key must be bytes or str, got {}",
            key.get_type().name()?
        )));
    };
    ChainKey::new(&bytes)
        .map(Some)
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// `scopes` as a tuple of `str` (a list is copied into one), or a `TypeError`.
fn scopes_tuple<'py>(scopes: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyTuple>> {
    let tuple: Bound<'py, PyTuple> = if let Ok(l) = scopes.cast::<PyList>() {
        l.to_tuple()
    } else if let Ok(t) = scopes.cast::<PyTuple>() {
        t.clone()
    } else {
        return Err(PyTypeError::new_err(format!(
            "scopes must be a list or tuple of str, got {}",
            scopes.get_type().name()?
        )));
    };
    for s in tuple.iter() {
        if s.cast::<PyString>().is_err() {
            return Err(PyTypeError::new_err(format!(
                "scopes must be str, got {}",
                s.get_type().name()?
            )));
        }
    }
    Ok(tuple)
}

/// Renders one audit line straight from the Python objects (the one layout:
/// [`write_line_parts`]), applying `redact` to `input_args` and `metadata`.
fn render_line(
    buf: &mut Vec<u8>,
    head: &LineHead<'_>,
    scopes: &Bound<'_, PyTuple>,
    input_args: Option<&Bound<'_, PyAny>>,
    metadata: Option<&Bound<'_, PyAny>>,
    extra: Option<&Bound<'_, PyDict>>,
    redact: Option<&Redactor>,
) {
    let json = |buf: &mut Vec<u8>, v: &Bound<'_, PyAny>| match redact {
        None => write_py_json(buf, v, 0),
        Some(r) => write_py_json_redacted(buf, v, 0, r, r.root()),
    };
    write_line_parts(
        buf,
        head,
        |buf| {
            for (i, s) in scopes.iter().enumerate() {
                if i > 0 {
                    buf.push(b',');
                }
                if let Ok(s) = s.cast::<PyString>() {
                    write_py_str(buf, s);
                }
            }
        },
        |buf| match input_args {
            Some(v) if !v.is_none() => json(buf, v),
            _ => buf.extend_from_slice(b"null"),
        },
        |buf| match metadata {
            Some(v) if !v.is_none() => json(buf, v),
            _ => buf.extend_from_slice(b"{}"),
        },
        |buf| {
            let Some(extra) = extra else { return };
            for (k, v) in extra.iter() {
                if k.cast::<PyString>()
                    .ok()
                    .and_then(|k| k.to_str().ok().map(is_reserved_field))
                    .unwrap_or(false)
                {
                    continue;
                }
                buf.push(b',');
                write_py_key(buf, &k);
                buf.push(b':');
                write_py_json(buf, &v, 0);
            }
        },
    );
}

/// One backend of an [`PyAuditFanout`]: opened here (so a bad path fails now, naming it),
/// then given to a fan-out, after which it reports that backend's own books.
#[pyclass(frozen, module = "fastmcp_guard._core", name = "AuditSink")]
pub(super) struct PyAuditSink {
    path: String,
    kind: &'static str,
    /// The opened sink, until a fan-out takes it.
    unopened: parking_lot::Mutex<Option<Box<dyn Sink>>>,
    /// Set when a fan-out took the sink: its writer and this backend's books.
    bound: std::sync::OnceLock<(Arc<AuditWriter>, Arc<SlotStats>)>,
}

impl PyAuditSink {
    fn new(path: String, kind: &'static str, sink: Box<dyn Sink>) -> Self {
        PyAuditSink {
            path,
            kind,
            unopened: parking_lot::Mutex::new(Some(sink)),
            bound: std::sync::OnceLock::new(),
        }
    }

    fn bound(&self) -> PyResult<&(Arc<AuditWriter>, Arc<SlotStats>)> {
        self.bound.get().ok_or_else(|| {
            PyValueError::new_err(format!(
                "audit sink {} is not part of an AuditFanout yet",
                self.path
            ))
        })
    }
}

#[pymethods]
impl PyAuditSink {
    /// A JSONL file backend (options as `AuditWriter`).
    #[staticmethod]
    #[pyo3(signature = (path, *, rotate_bytes=None, rotate_daily=false, retention=None,
                        chain=true, chain_key=None))]
    fn jsonl(
        py: Python<'_>,
        path: PathBuf,
        rotate_bytes: Option<u64>,
        rotate_daily: bool,
        retention: Option<usize>,
        chain: bool,
        chain_key: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let opts = JsonlOptions {
            rotate_bytes,
            rotate_daily,
            retention,
            chain,
            chain_key: self::chain_key(chain_key)?,
        };
        let shown = path.display().to_string();
        let sink = py.detach(move || JsonlFileSink::open_with(&path, opts))?;
        Ok(PyAuditSink::new(shown, "jsonl", Box::new(sink)))
    }

    /// A `SQLite` backend (options as `AuditWriter.sqlite`).
    #[staticmethod]
    #[pyo3(signature = (path, *, retention_days=None))]
    fn sqlite(py: Python<'_>, path: PathBuf, retention_days: Option<f64>) -> PyResult<Self> {
        let shown = path.display().to_string();
        let sink = py.detach(move || SqliteSink::open(&path)?.retain(retention_days))?;
        Ok(PyAuditSink::new(shown, "sqlite", Box::new(sink)))
    }

    #[getter]
    fn path(&self) -> &str {
        &self.path
    }

    /// `"jsonl"` or `"sqlite"`.
    #[getter]
    fn kind(&self) -> &'static str {
        self.kind
    }

    /// This backend's books: `written`, `failed`, `write_errors`, `paused_dropped`.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.bound()?.1.counts();
        let d = PyDict::new(py);
        d.set_item("written", c.written)?;
        d.set_item("failed", c.failed)?;
        d.set_item("write_errors", c.write_errors)?;
        d.set_item("paused_dropped", c.paused_dropped)?;
        Ok(d)
    }

    /// The fan-out's queue has room and is open, and this backend's last write
    /// succeeded and it is not paused.
    fn healthy(&self) -> PyResult<bool> {
        let (writer, slot) = self.bound()?;
        Ok(writer.healthy() && slot.healthy())
    }

    /// Stop giving events to this backend (`reason` is named in the loss warning; each
    /// skipped event counts in `paused_dropped`) until called with `None`.
    #[pyo3(signature = (reason))]
    fn pause(&self, reason: Option<String>) -> PyResult<()> {
        self.bound()?.1.pause(reason);
        Ok(())
    }

    fn last_error(&self) -> PyResult<Option<String>> {
        Ok(self.bound()?.1.last_error())
    }

    /// Flushes the whole fan-out (every backend).
    /// Raises if writes to this backend failed since the last `flush` / `close` (not for
    /// another backend's failures).
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        let (writer, slot) = self.bound()?;
        py.detach(|| writer.flush())?;
        slot_failure(&self.path, slot)
    }

    /// Closes the whole fan-out (every backend). Idempotent.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let (writer, slot) = self.bound()?;
        py.detach(|| writer.close())?;
        slot_failure(&self.path, slot)
    }
}

/// `AuditWriteError` naming the backend at `path` if its writes failed since last asked.
fn slot_failure(path: &str, slot: &SlotStats) -> PyResult<()> {
    match slot.take_failure() {
        None => Ok(()),
        Some(msg) => Err(errors::new_err(
            Exc::AuditWrite,
            format!("audit backend {path}: {msg}"),
        )),
    }
}

/// Several audit backends behind one queue and one writer thread: `log` renders the line
/// once, straight from the Python objects, and enqueues it once, whatever the number of
/// backends; the thread writes each batch to every backend ([`FanSink`]), each keeping its
/// own books ([`PyAuditSink`]). Applies the audit log's choices (`redact`, `log_inputs`,
/// `log_outputs`, `output_preview_chars`), so `AuditLog.log` can be this method itself.
#[pyclass(frozen, weakref, module = "fastmcp_guard._core", name = "AuditFanout")]
pub(super) struct PyAuditFanout {
    inner: Arc<AuditWriter>,
    sinks: Vec<Py<PyAuditSink>>,
    /// Each backend's path and books, for the loss warnings.
    slots: Vec<(String, Arc<SlotStats>)>,
    rec: Recording,
    warn_interval: Duration,
}

impl PyAuditFanout {
    /// The first backend whose writes failed since the last call, as an error naming it
    /// (every backend's record is taken).
    fn take_failures(&self) -> PyResult<()> {
        let mut first = Ok(());
        for (path, slot) in &self.slots {
            let res = slot_failure(path, slot);
            if first.is_ok() {
                first = res;
            }
        }
        first
    }

    fn warn_losses(&self, py: Python<'_>, force: bool) {
        let interval = if force {
            Duration::ZERO
        } else {
            self.warn_interval
        };
        warn_writer_losses(py, "queue", &self.inner, interval);
        for (path, slot) in &self.slots {
            warn_slot_losses(py, path, slot, interval);
        }
    }
}

#[pymethods]
impl PyAuditFanout {
    #[new]
    #[pyo3(signature = (sinks, *, queue_capacity=65_536, batch_max=4096, flush_interval_ms=100,
                        redact=None, on_full="drop", block_ms=1000,
                        loss_warning_interval_ms=10_000, log_inputs=true, log_outputs=true,
                        output_preview_chars=200, refusal_burst=5,
                        refusal_interval_ms=60_000, refusal_max_groups=1024,
                        refusal_max_lines=1000))]
    #[allow(clippy::too_many_arguments, reason = "keyword-only options")]
    fn new(
        sinks: Vec<Py<PyAuditSink>>,
        queue_capacity: usize,
        batch_max: usize,
        flush_interval_ms: u64,
        redact: Option<Vec<String>>,
        on_full: &str,
        block_ms: u64,
        loss_warning_interval_ms: u64,
        log_inputs: bool,
        log_outputs: bool,
        output_preview_chars: usize,
        refusal_burst: u32,
        refusal_interval_ms: u64,
        refusal_max_groups: usize,
        refusal_max_lines: u32,
    ) -> PyResult<Self> {
        if sinks.is_empty() {
            return Err(PyValueError::new_err(
                "AuditFanout needs at least one AuditSink",
            ));
        }
        let opts = writer_options(
            queue_capacity,
            batch_max,
            flush_interval_ms,
            on_full,
            block_ms,
            RefusalArgs {
                burst: refusal_burst,
                interval_ms: refusal_interval_ms,
                max_groups: refusal_max_groups,
                max_lines: refusal_max_lines,
            },
        )?;
        let rec = Recording::new(redact, log_inputs, log_outputs, output_preview_chars)?;
        let mut boxed = Vec::with_capacity(sinks.len());
        for s in &sinks {
            let s = s.get();
            let Some(sink) = s.unopened.lock().take() else {
                // The sinks taken so far are dropped (closed) with this error.
                return Err(PyValueError::new_err(format!(
                    "audit sink {} already belongs to an AuditFanout; open a new AuditSink",
                    s.path
                )));
            };
            boxed.push(sink);
        }
        let (fan, stats) = FanSink::new(boxed);
        let inner = Arc::new(AuditWriter::with_sink(fan, opts)?);
        let mut slots = Vec::with_capacity(sinks.len());
        for (s, st) in sinks.iter().zip(stats) {
            let s = s.get();
            s.bound.set((Arc::clone(&inner), Arc::clone(&st))).ok();
            slots.push((s.path.clone(), st));
        }
        Ok(PyAuditFanout {
            inner,
            sinks,
            slots,
            rec,
            warn_interval: Duration::from_millis(loss_warning_interval_ms),
        })
    }

    /// The backends, in the order given.
    #[getter]
    fn sinks(&self, py: Python<'_>) -> Vec<Py<PyAuditSink>> {
        self.sinks.iter().map(|w| w.clone_ref(py)).collect()
    }

    /// Enqueues one event for every backend; `False` if it was dropped (queue full or
    /// closed). Keyword or positional, in `AuditWriter.log`'s order.
    #[pyo3(signature = (status, key_id=None, key_name=None, tool=None, scopes=None,
                        duration_ms=0.0, error=None, input_args=None, output_preview=None,
                        client_ip=None, metadata=None, extra=None))]
    #[allow(
        clippy::too_many_arguments,
        reason = "mirrors the audit record's fields, keyword or positional"
    )]
    fn log(
        &self,
        py: Python<'_>,
        status: &Bound<'_, PyString>,
        key_id: Option<&Bound<'_, PyString>>,
        key_name: Option<&Bound<'_, PyString>>,
        tool: Option<&Bound<'_, PyString>>,
        scopes: Option<&Bound<'_, PyAny>>,
        duration_ms: f64,
        error: Option<&Bound<'_, PyString>>,
        input_args: Option<&Bound<'_, PyAny>>,
        output_preview: Option<&Bound<'_, PyString>>,
        client_ip: Option<&Bound<'_, PyString>>,
        metadata: Option<&Bound<'_, PyAny>>,
        extra: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<bool> {
        let call = LogCall {
            status,
            key_id,
            key_name,
            tool,
            scopes,
            duration_ms,
            error,
            input_args,
            output_preview,
            client_ip,
            metadata,
            extra,
        };
        let queued = self.rec.enqueue(py, &self.inner, &call, None)?;
        self.warn_losses(py, false);
        Ok(queued)
    }

    /// Logs a refusal made before there is an identity (as `AuditWriter.log_refusal`).
    #[pyo3(signature = (status, *, client_ip, reason, key_id=None, error=None, extra=None))]
    #[allow(
        clippy::too_many_arguments,
        reason = "the refusal's fields, keyword-only"
    )]
    fn log_refusal(
        &self,
        py: Python<'_>,
        status: &Bound<'_, PyString>,
        client_ip: Option<&Bound<'_, PyString>>,
        reason: &Bound<'_, PyString>,
        key_id: Option<&Bound<'_, PyString>>,
        error: Option<&Bound<'_, PyString>>,
        extra: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<bool> {
        let queued = self.rec.refusal(
            py,
            &self.inner,
            status,
            client_ip,
            reason,
            key_id,
            error,
            extra,
        )?;
        self.warn_losses(py, false);
        Ok(queued)
    }

    /// Also call `tap(*fields)` for every event, after it is queued (as `AuditWriter`).
    fn add_tap(&self, tap: Py<PyAny>) {
        self.rec.add_tap(tap);
    }

    /// Blocks until every event logged so far is written to every backend; raises
    /// `AuditWriteError` (naming the backend) if writes to one failed since the last
    /// `flush` / `close`, as a single writer does.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.flush())?;
        self.take_failures()
    }

    /// Writes what is queued, syncs every backend and stops the thread; raises as `flush`.
    /// Idempotent.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let res = py.detach(|| self.inner.close());
        self.warn_losses(py, true);
        res?;
        self.take_failures()
    }

    /// The queue is open and has room, and every backend is healthy.
    fn healthy(&self) -> bool {
        self.inner.healthy() && self.slots.iter().all(|(_, s)| s.healthy())
    }

    /// The queue's `enqueued` and `queue_depth`; `written`, `failed`, `paused_dropped`
    /// summed over the backends (an event written to three backends counts three times
    /// in `written`); `dropped`: refused by the queue plus skipped by paused backends;
    /// `write_errors`: the queue's and the backends'.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let q = self.inner.stats();
        let mut sum = crate::audit::SlotCounts::default();
        for (_, st) in &self.slots {
            let c = st.counts();
            sum.written += c.written;
            sum.failed += c.failed;
            sum.write_errors += c.write_errors;
            sum.paused_dropped += c.paused_dropped;
        }
        let d = PyDict::new(py);
        d.set_item("enqueued", q.enqueued)?;
        d.set_item("written", sum.written)?;
        d.set_item("dropped", q.dropped + sum.paused_dropped)?;
        d.set_item("paused_dropped", sum.paused_dropped)?;
        d.set_item("write_errors", q.write_errors + sum.write_errors)?;
        d.set_item("failed", sum.failed)?;
        d.set_item("queue_depth", q.queue_depth)?;
        d.set_item("refusals_suppressed", q.refusals_suppressed)?;
        d.set_item("refusal_summaries", q.refusal_summaries)?;
        Ok(d)
    }
}

impl PyAuditWriter {
    /// Logs a warning on `fastmcp_guard.audit` if events were lost since the last
    /// one and the interval has passed (`force`: whatever the interval).
    fn warn_losses(&self, py: Python<'_>, force: bool) {
        let interval = if force {
            Duration::ZERO
        } else {
            self.warn_interval
        };
        warn_writer_losses(py, &self.path, &self.inner, interval);
    }
}

#[pymethods]
impl PyAuditWriter {
    #[new]
    #[pyo3(signature = (path, *, queue_capacity=65_536, batch_max=4096, flush_interval_ms=100,
                        rotate_bytes=None, rotate_daily=false, retention=None, chain=true,
                        chain_key=None, redact=None, on_full="drop", block_ms=1000,
                        loss_warning_interval_ms=10_000, log_inputs=true, log_outputs=true,
                        output_preview_chars=usize::MAX, refusal_burst=5,
                        refusal_interval_ms=60_000, refusal_max_groups=1024,
                        refusal_max_lines=1000))]
    #[allow(clippy::too_many_arguments, reason = "keyword-only options")]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        queue_capacity: usize,
        batch_max: usize,
        flush_interval_ms: u64,
        rotate_bytes: Option<u64>,
        rotate_daily: bool,
        retention: Option<usize>,
        chain: bool,
        chain_key: Option<&Bound<'_, PyAny>>,
        redact: Option<Vec<String>>,
        on_full: &str,
        block_ms: u64,
        loss_warning_interval_ms: u64,
        log_inputs: bool,
        log_outputs: bool,
        output_preview_chars: usize,
        refusal_burst: u32,
        refusal_interval_ms: u64,
        refusal_max_groups: usize,
        refusal_max_lines: u32,
    ) -> PyResult<Self> {
        let opts = writer_options(
            queue_capacity,
            batch_max,
            flush_interval_ms,
            on_full,
            block_ms,
            RefusalArgs {
                burst: refusal_burst,
                interval_ms: refusal_interval_ms,
                max_groups: refusal_max_groups,
                max_lines: refusal_max_lines,
            },
        )?;
        let rec = Recording::new(redact, log_inputs, log_outputs, output_preview_chars)?;
        let jsonl = JsonlOptions {
            rotate_bytes,
            rotate_daily,
            retention,
            chain,
            chain_key: self::chain_key(chain_key)?,
        };
        let shown = path.display().to_string();
        let inner = py.detach(move || AuditWriter::open_jsonl_with(&path, opts, jsonl))?;
        Ok(PyAuditWriter {
            inner,
            path: shown,
            kind: "jsonl",
            rec,
            warn_interval: Duration::from_millis(loss_warning_interval_ms),
        })
    }

    /// Opens (creating, migrating) the `SQLite` audit database at `path`.
    #[staticmethod]
    #[pyo3(signature = (path, *, queue_capacity=65_536, batch_max=4096, flush_interval_ms=100,
                        redact=None, on_full="drop", block_ms=1000, loss_warning_interval_ms=10_000,
                        retention_days=None, log_inputs=true, log_outputs=true,
                        output_preview_chars=usize::MAX, refusal_burst=5,
                        refusal_interval_ms=60_000, refusal_max_groups=1024,
                        refusal_max_lines=1000))]
    #[allow(clippy::too_many_arguments, reason = "keyword-only options")]
    fn sqlite(
        py: Python<'_>,
        path: PathBuf,
        queue_capacity: usize,
        batch_max: usize,
        flush_interval_ms: u64,
        redact: Option<Vec<String>>,
        on_full: &str,
        block_ms: u64,
        loss_warning_interval_ms: u64,
        retention_days: Option<f64>,
        log_inputs: bool,
        log_outputs: bool,
        output_preview_chars: usize,
        refusal_burst: u32,
        refusal_interval_ms: u64,
        refusal_max_groups: usize,
        refusal_max_lines: u32,
    ) -> PyResult<Self> {
        let opts = writer_options(
            queue_capacity,
            batch_max,
            flush_interval_ms,
            on_full,
            block_ms,
            RefusalArgs {
                burst: refusal_burst,
                interval_ms: refusal_interval_ms,
                max_groups: refusal_max_groups,
                max_lines: refusal_max_lines,
            },
        )?;
        let rec = Recording::new(redact, log_inputs, log_outputs, output_preview_chars)?;
        let shown = path.display().to_string();
        let inner =
            py.detach(move || AuditWriter::open_sqlite_retained(&path, opts, retention_days))?;
        Ok(PyAuditWriter {
            inner,
            path: shown,
            kind: "sqlite",
            rec,
            warn_interval: Duration::from_millis(loss_warning_interval_ms),
        })
    }

    #[getter]
    fn path(&self) -> &str {
        &self.path
    }

    /// `"jsonl"` or `"sqlite"`.
    #[getter]
    fn kind(&self) -> &'static str {
        self.kind
    }

    #[pyo3(signature = (status, key_id=None, key_name=None, tool=None, scopes=None,
                        duration_ms=0.0, error=None, input_args=None, output_preview=None,
                        client_ip=None, metadata=None, extra=None))]
    #[allow(
        clippy::too_many_arguments,
        reason = "mirrors the audit record's fields, keyword or positional"
    )]
    fn log(
        &self,
        py: Python<'_>,
        status: &Bound<'_, PyString>,
        key_id: Option<&Bound<'_, PyString>>,
        key_name: Option<&Bound<'_, PyString>>,
        tool: Option<&Bound<'_, PyString>>,
        scopes: Option<&Bound<'_, PyAny>>,
        duration_ms: f64,
        error: Option<&Bound<'_, PyString>>,
        input_args: Option<&Bound<'_, PyAny>>,
        output_preview: Option<&Bound<'_, PyString>>,
        client_ip: Option<&Bound<'_, PyString>>,
        metadata: Option<&Bound<'_, PyAny>>,
        extra: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<bool> {
        let call = LogCall {
            status,
            key_id,
            key_name,
            tool,
            scopes,
            duration_ms,
            error,
            input_args,
            output_preview,
            client_ip,
            metadata,
            extra,
        };
        let queued = self.rec.enqueue(py, &self.inner, &call, None)?;
        self.warn_losses(py, false);
        Ok(queued)
    }

    /// Logs a refusal made before there is an identity (`unauthorized`, `ip_denied`, a
    /// throttled attempt), aggregated per (status, `reason`, `key_id`, client address; an
    /// IPv6 address per /64) and interval: the first `refusal_burst` of a group in an
    /// interval are written as usual lines (with `reason` as an extra field), the others
    /// counted and written as one summary event per group (`"summary": true`, `"count"`)
    /// when the interval ends, on `flush` and on `close`. Taps see every refusal. `False`
    /// only if it was lost (queue full, writer closed or paused).
    #[pyo3(signature = (status, *, client_ip, reason, key_id=None, error=None, extra=None))]
    #[allow(
        clippy::too_many_arguments,
        reason = "the refusal's fields, keyword-only"
    )]
    fn log_refusal(
        &self,
        py: Python<'_>,
        status: &Bound<'_, PyString>,
        client_ip: Option<&Bound<'_, PyString>>,
        reason: &Bound<'_, PyString>,
        key_id: Option<&Bound<'_, PyString>>,
        error: Option<&Bound<'_, PyString>>,
        extra: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<bool> {
        let queued = self.rec.refusal(
            py,
            &self.inner,
            status,
            client_ip,
            reason,
            key_id,
            error,
            extra,
        )?;
        self.warn_losses(py, false);
        Ok(queued)
    }

    /// Also call `tap(*fields)` (positional, as `log` takes them, after `log_inputs` /
    /// `log_outputs` / the preview length) for every event, after it is queued.
    fn add_tap(&self, tap: Py<PyAny>) {
        self.rec.add_tap(tap);
    }

    /// Refuse new events (counted as dropped, `reason` named in the loss warning)
    /// until called with `None`.
    #[pyo3(signature = (reason))]
    fn pause(&self, reason: Option<String>) {
        self.inner.pause(reason);
    }

    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.flush())?;
        Ok(())
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let res = py.detach(|| self.inner.close());
        self.warn_losses(py, true);
        res?;
        Ok(())
    }

    /// Whether an event logged now would reach the sink (atomic loads only).
    fn healthy(&self) -> bool {
        self.inner.healthy()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("enqueued", s.enqueued)?;
        d.set_item("written", s.written)?;
        d.set_item("dropped", s.dropped)?;
        d.set_item("paused_dropped", s.paused_dropped)?;
        d.set_item("write_errors", s.write_errors)?;
        d.set_item("failed", s.failed)?;
        d.set_item("queue_depth", s.queue_depth)?;
        d.set_item("refusals_suppressed", s.refusals_suppressed)?;
        d.set_item("refusal_summaries", s.refusal_summaries)?;
        Ok(d)
    }

    fn last_error(&self) -> Option<String> {
        self.inner.last_error()
    }
}
