//! Bindings of the audit writer (`src/audit/`) behind the `AuditLog` facade
//! (`audit/__init__.py`) and its backends (`audit/http.py`, `audit/otel.py`).
//!
//! `AuditWriter` is one queue and one writer thread over a list of `AuditSink`s (JSONL,
//! `SQLite`, the HTTP spool); `AuditWriter(path)` and `AuditWriter.sqlite(path)` are a
//! writer over one sink, `AuditWriter.of_sinks([...])` over several (or none: then only
//! its observers see the events). `log` turns the call's Python objects into one
//! [`AuditEvent`] (the only conversion: each sink takes that event), applying the audit
//! log's [`EventPolicy`] and `redact=` patterns, then calls the observers (OpenTelemetry,
//! metrics) with the recorded fields. `JsonText` and `mask_tokens` serve `http.py` and
//! `otel.py`. Flushes and opening files run with the GIL released. The read side
//! (query, export, verify) is in `scan.rs`.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFloat, PyList, PyString, PyTuple};

use super::json::{write_py_json, write_py_json_redacted, write_py_key};
use crate::audit::mask::{mask_str, mask_tail};
use crate::audit::{
    cut_field, is_reserved_field, Admitted, AuditEvent, AuditWriter, ChainKey, EventPolicy,
    JsonlFileSink, JsonlOptions, OnFull, Redactor, Refusal, RefusalOptions, Sink, SinkStats,
    SqliteSink, Status, WriterOptions,
};
use crate::errors::{self, Exc};

/// One queue and one writer thread over a list of sinks; see the module docs.
#[pyclass(frozen, weakref, module = "fastmcp_guard._core", name = "AuditWriter")]
pub(super) struct PyAuditWriter {
    /// `None` for a writer with no sink (observers only).
    inner: Option<Arc<AuditWriter>>,
    sinks: Vec<Py<PyAuditSink>>,
    /// Each sink's path and counters, for the loss warnings and `stats`.
    slots: Vec<(String, Arc<SinkStats>)>,
    /// The first sink's path (`""` without one), for `path` and the queue's warnings.
    path: String,
    kind: &'static str,
    policy: EventPolicy,
    /// `redact=` patterns; `None` when there are none (the hot path skips them).
    redact: Option<Redactor>,
    /// Called with the recorded fields after each event is queued.
    observers: parking_lot::RwLock<Vec<Py<PyAny>>>,
    /// At most one lost-events warning per this interval.
    warn_interval: Duration,
}

/// The arguments of one `log` call, as given (the original objects, which observers
/// receive).
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

/// `s` as text (`""` when absent); a `str` Python cannot encode (a lone surrogate) is
/// taken lossily, as the scopes and the JSON values are: an event is recorded, never
/// refused for its text.
fn text<'a>(s: Option<&'a Bound<'_, PyString>>) -> Cow<'a, str> {
    s.map_or(Cow::Borrowed(""), lossy)
}

/// `s`'s text, lossily (see [`text`]).
fn lossy<'a>(s: &'a Bound<'_, PyString>) -> Cow<'a, str> {
    s.to_cow().unwrap_or_else(|_| s.to_string_lossy())
}

/// The keyword options every writer takes.
struct Options {
    writer: WriterOptions,
    policy: EventPolicy,
    redact: Option<Redactor>,
    warn_interval: Duration,
}

impl PyAuditWriter {
    /// A writer over `sinks` (each bound to it, so it reports its own counters).
    fn start(py: Python<'_>, sinks: Vec<Py<PyAuditSink>>, o: Options) -> PyResult<Self> {
        let mut taken: Vec<Box<dyn Sink>> = Vec::with_capacity(sinks.len());
        for s in &sinks {
            let s = s.get();
            let Some(sink) = s.unopened.lock().take() else {
                // The sinks taken so far are dropped (closed) with this error.
                return Err(errors::invalid_argument(format!(
                    "audit sink {} already belongs to an AuditWriter; open a new AuditSink",
                    s.path
                )));
            };
            taken.push(sink);
        }
        let inner = if taken.is_empty() {
            None
        } else {
            let opts = o.writer;
            Some(Arc::new(py.detach(move || AuditWriter::new(taken, opts))?))
        };
        let mut slots = Vec::with_capacity(sinks.len());
        if let Some(w) = &inner {
            for (s, st) in sinks.iter().zip(w.sink_stats()) {
                let s = s.get();
                s.bound.set((Arc::clone(w), Arc::clone(st))).ok();
                slots.push((s.path.clone(), Arc::clone(st)));
            }
        }
        let (path, kind) = sinks.first().map_or((String::new(), "none"), |s| {
            (s.get().path.clone(), s.get().kind)
        });
        Ok(PyAuditWriter {
            inner,
            sinks,
            slots,
            path,
            kind,
            policy: o.policy,
            redact: o.redact,
            observers: parking_lot::RwLock::new(Vec::new()),
            warn_interval: o.warn_interval,
        })
    }

    /// Turns the call into one event (the policy applied, the values rendered once) in a
    /// reused queue box of the writer (a full queue under the block policy is waited on
    /// with the GIL released), then calls each observer with the recorded fields in
    /// `log`'s positional order. `False` if the queue dropped the event or an observer
    /// returned false; an observer's exception propagates.
    fn record<'py>(
        &self,
        py: Python<'py>,
        c: &LogCall<'_, 'py>,
        refusal: Option<&str>,
    ) -> PyResult<bool> {
        let status: Status = c.status.to_str()?.parse()?;
        // Read only if recorded: an output not logged is never looked at.
        let output = c
            .output_preview
            .filter(|_| self.policy.log_outputs)
            .map(|p| (p, lossy(p)));
        let preview = output
            .as_ref()
            .and_then(|(p, full)| self.policy.preview(full).map(|cut| (*p, full, cut)));
        let input_args = c
            .input_args
            .filter(|v| self.policy.keeps_inputs() && !v.is_none());
        let (key_id, key_name, tool) = (text(c.key_id), text(c.key_name), text(c.tool));
        let error = c.error.map(lossy);
        let client_ip = c.client_ip.map(lossy);
        let scopes = match c.scopes {
            Some(s) => scopes_tuple(s)?,
            None => PyTuple::empty(py),
        };
        let metadata = c.metadata.filter(|v| !v.is_none());
        let redact = self.redact.as_ref();
        let json = |buf: &mut Vec<u8>, v: &Bound<'_, PyAny>| match redact {
            None => write_py_json(buf, v, 0),
            Some(r) => write_py_json_redacted(buf, v, 0, r, r.root()),
        };
        let fill = |ev: &mut AuditEvent| {
            ev.ts = Utc::now();
            AuditEvent::set(&mut ev.key_id, &key_id);
            AuditEvent::set(&mut ev.key_name, &key_name);
            AuditEvent::set(&mut ev.tool, &tool);
            fill_scopes(ev, &scopes);
            ev.duration_ms = c.duration_ms;
            ev.status = status;
            AuditEvent::set_opt(&mut ev.error, error.as_deref());
            AuditEvent::set_json(&mut ev.input_args, |buf| {
                input_args.is_some_and(|v| {
                    json(buf, v);
                    true
                })
            });
            AuditEvent::set_opt(&mut ev.output_preview, preview.map(|(_, _, cut)| cut));
            AuditEvent::set_opt(&mut ev.client_ip, client_ip.as_deref());
            AuditEvent::set_json(&mut ev.metadata, |buf| {
                metadata.is_some_and(|v| {
                    json(buf, v);
                    true
                })
            });
            AuditEvent::set_json(&mut ev.extra, |buf| write_extra(buf, c.extra));
        };
        let queued = match (&self.inner, refusal) {
            (None, _) => true,
            (Some(w), None) => w.enqueue_fill(fill, |wait| py.detach(wait)),
            (Some(w), Some(reason)) => {
                let r = Refusal {
                    status,
                    client_ip: client_ip.as_deref(),
                    reason,
                    key_id: &key_id,
                    error: error.as_deref(),
                };
                // A refusal only counted is accounted for (its group's summary has it).
                w.enqueue_refusal_with(&r, fill, |wait| py.detach(wait)) != Admitted::Dropped
            }
        };
        let observers: Vec<Py<PyAny>> = {
            let held = self.observers.read();
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
            Some((orig, full, cut)) if cut.len() == full.len() => orig.clone().into_any(),
            Some((_, _, cut)) => PyString::new(py, cut).into_any(),
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
                or_none(c.input_args.filter(|_| self.policy.keeps_inputs())),
                preview_obj,
                or_none(c.client_ip.map(|e| e.as_any())),
                or_none(c.metadata),
                or_none(c.extra.map(|e| e.as_any())),
            ],
        )?;
        let mut all = queued;
        for observer in observers {
            all &= observer.call1(py, args.clone())?.is_truthy(py)?;
        }
        Ok(all)
    }

    /// `log_refusal`: the refusal as an event with `reason` first among its extra
    /// fields, aggregated by the core writer; every observer sees every refusal (the
    /// metrics count them all), whether its line is written or only counted. Every
    /// string given is cut at [`cut_field`]'s bound first (the text is the client's: a
    /// refusal line must stay small), for the line and the observers alike.
    #[allow(clippy::too_many_arguments, reason = "the refusal's fields, as given")]
    fn refusal<'py>(
        &self,
        py: Python<'py>,
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
        self.record(py, &call, Some(reason.to_str()?))
    }

    /// Logs a warning on `fastmcp_guard.audit` for events lost since the last one, by the
    /// queue and by each sink, if the interval has passed (`force`: whatever the interval).
    fn warn_losses(&self, py: Python<'_>, force: bool) {
        let Some(w) = &self.inner else { return };
        let interval = if force {
            Duration::ZERO
        } else {
            self.warn_interval
        };
        let queue = if self.slots.len() == 1 {
            self.path.as_str()
        } else {
            "queue"
        };
        if let Some(r) = w.take_loss_report(interval) {
            audit_warning(py, r.describe(queue));
        }
        if self.slots.len() > 1 {
            for (path, slot) in &self.slots {
                if let Some(r) = slot.take_loss_report(interval) {
                    audit_warning(py, r.describe(path));
                }
            }
        }
    }

    /// What `flush` / `close` raise: with one sink, the writer's own error; with several,
    /// the first sink whose writes failed since the last call, named (every sink's record
    /// is taken).
    fn report(&self, res: Result<(), crate::audit::AuditError>) -> PyResult<()> {
        let mut named = Ok(());
        for (path, slot) in &self.slots {
            let failure = sink_failure(path, slot);
            if named.is_ok() {
                named = failure;
            }
        }
        if self.slots.len() > 1 {
            named?;
        }
        res.map_err(Into::into)
    }
}

/// The scopes into `ev`'s list, reusing its strings (a `str` Python cannot encode is
/// taken lossily, as every text of the line is).
fn fill_scopes(ev: &mut AuditEvent, scopes: &Bound<'_, PyTuple>) {
    let mut n = 0;
    for s in scopes.iter() {
        let Ok(s) = s.cast::<PyString>() else {
            continue;
        };
        let text = s.to_cow().unwrap_or_else(|_| s.to_string_lossy());
        match ev.scopes.get_mut(n) {
            Some(d) => AuditEvent::set(d, &text),
            None => ev.scopes.push(text.into_owned()),
        }
        n += 1;
    }
    ev.scopes.truncate(n);
}

/// The extra fields as one JSON object (those a line cannot carry left out:
/// [`is_reserved_field`]); `false` when none is left.
fn write_extra(buf: &mut Vec<u8>, extra: Option<&Bound<'_, PyDict>>) -> bool {
    let Some(extra) = extra else { return false };
    for (k, v) in extra.iter() {
        if k.cast::<PyString>()
            .ok()
            .and_then(|k| k.to_str().ok().map(is_reserved_field))
            .unwrap_or(false)
        {
            continue;
        }
        buf.push(if buf.is_empty() { b'{' } else { b',' });
        write_py_key(buf, &k);
        buf.push(b':');
        write_py_json(buf, &v, 0);
    }
    if buf.is_empty() {
        return false;
    }
    buf.push(b'}');
    true
}

/// A writer's `flush` / `close` result seen from one of its sinks: write and sync
/// failures are each sink's own (reported by [`sink_failure`]); anything else (the
/// writer thread gone) is raised.
fn not_this_sinks(res: Result<(), crate::audit::AuditError>) -> PyResult<()> {
    match res {
        Err(crate::audit::AuditError::Write { .. } | crate::audit::AuditError::Sync { .. }) => {
            Ok(())
        }
        other => other.map_err(Into::into),
    }
}

/// `AuditWriteError` naming the backend at `path` if its writes failed since last asked.
fn sink_failure(path: &str, slot: &SinkStats) -> PyResult<()> {
    match slot.take_failure() {
        None => Ok(()),
        Some(msg) => Err(errors::new_err(
            Exc::AuditWrite,
            format!("audit backend {path}: {msg}"),
        )),
    }
}

#[pymethods]
impl PyAuditWriter {
    /// A writer over one JSONL file (options of `AuditSink.jsonl`, then of the writer).
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
        let o = options(
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
            redact,
            EventPolicy {
                log_inputs,
                log_outputs,
                preview_chars: output_preview_chars,
            },
            loss_warning_interval_ms,
        )?;
        let sink = PyAuditSink::jsonl(
            py,
            path,
            rotate_bytes,
            rotate_daily,
            retention,
            chain,
            chain_key,
        )?;
        PyAuditWriter::start(py, vec![Py::new(py, sink)?], o)
    }

    /// A writer over one `SQLite` audit database (opened, created or migrated here).
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
        let o = options(
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
            redact,
            EventPolicy {
                log_inputs,
                log_outputs,
                preview_chars: output_preview_chars,
            },
            loss_warning_interval_ms,
        )?;
        let sink = PyAuditSink::sqlite(py, path, retention_days)?;
        PyAuditWriter::start(py, vec![Py::new(py, sink)?], o)
    }

    /// A writer over `sinks` (one queue and one thread whatever their number; each sink
    /// keeps its own counters). With no sink, only the observers see the events.
    #[staticmethod]
    #[pyo3(signature = (sinks, *, queue_capacity=65_536, batch_max=4096, flush_interval_ms=100,
                        redact=None, on_full="drop", block_ms=1000,
                        loss_warning_interval_ms=10_000, log_inputs=true, log_outputs=true,
                        output_preview_chars=200, refusal_burst=5,
                        refusal_interval_ms=60_000, refusal_max_groups=1024,
                        refusal_max_lines=1000))]
    #[allow(clippy::too_many_arguments, reason = "keyword-only options")]
    fn of_sinks(
        py: Python<'_>,
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
        let o = options(
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
            redact,
            EventPolicy {
                log_inputs,
                log_outputs,
                preview_chars: output_preview_chars,
            },
            loss_warning_interval_ms,
        )?;
        PyAuditWriter::start(py, sinks, o)
    }

    /// The sinks, in the order given.
    #[getter]
    fn sinks(&self, py: Python<'_>) -> Vec<Py<PyAuditSink>> {
        self.sinks.iter().map(|w| w.clone_ref(py)).collect()
    }

    /// The first sink's path (`""` without a sink).
    #[getter]
    fn path(&self) -> &str {
        &self.path
    }

    /// The first sink's kind: `"jsonl"` or `"sqlite"` (`"none"` without a sink).
    #[getter]
    fn kind(&self) -> &'static str {
        self.kind
    }

    /// Enqueues one event for every sink, then calls the observers; `False` if it was
    /// dropped (queue full, writer closed or paused) or an observer returned false.
    /// Keyword or positional, in this order.
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
        let queued = self.record(py, &call, None)?;
        self.warn_losses(py, false);
        Ok(queued)
    }

    /// Logs a refusal made before there is an identity (`unauthorized`, `ip_denied`, a
    /// throttled attempt), aggregated per (status, `reason`, `key_id`, client address; an
    /// IPv6 address per /64) and interval: the first `refusal_burst` of a group in an
    /// interval are written as usual events (with `reason` as an extra field), the others
    /// counted and written as one summary event per group (`"summary": true`, `"count"`)
    /// when the interval ends, on `flush` and on `close`. Observers see every refusal.
    /// `False` only if it was lost (queue full, writer closed or paused).
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
        let queued = self.refusal(py, status, client_ip, reason, key_id, error, extra)?;
        self.warn_losses(py, false);
        Ok(queued)
    }

    /// Also call `observer(*fields)` (positional, as `log` takes them, after
    /// `log_inputs` / `log_outputs` / the preview length) for every event, after it is
    /// queued.
    fn add_observer(&self, observer: Py<PyAny>) {
        self.observers.write().push(observer);
    }

    /// Refuse new events (counted as dropped, `reason` named in the loss warning)
    /// until called with `None`.
    #[pyo3(signature = (reason))]
    fn pause(&self, reason: Option<String>) {
        if let Some(w) = &self.inner {
            w.pause(reason);
        }
    }

    /// Blocks until every event logged so far is written to every sink; raises
    /// `AuditWriteError` if writes failed since the last `flush` / `close` (with several
    /// sinks, naming the first that failed).
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        let Some(w) = &self.inner else { return Ok(()) };
        let res = py.detach(|| w.flush());
        self.report(res)
    }

    /// Writes what is queued, syncs every sink and stops the thread; raises as `flush`.
    /// Idempotent.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let Some(w) = &self.inner else { return Ok(()) };
        let res = py.detach(|| w.close());
        self.warn_losses(py, true);
        self.report(res)
    }

    /// Whether an event logged now would be written: the queue is open and has room,
    /// and every sink is healthy (atomic loads only).
    fn healthy(&self) -> bool {
        self.inner.as_ref().is_none_or(|w| w.healthy())
            && self.slots.iter().all(|(_, s)| s.healthy())
    }

    /// The queue's `enqueued`, `queue_depth`, `write_errors` (over all sinks) and refusal
    /// counts; `written`, `failed`, `paused_dropped` summed over the sinks (an event
    /// written to three sinks counts three times in `written`); `dropped`: refused by the
    /// queue plus skipped by paused sinks.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let q = self.inner.as_ref().map(|w| w.stats()).unwrap_or_default();
        let mut sum = crate::audit::SinkCounts::default();
        for (_, st) in &self.slots {
            let c = st.counts();
            sum.written += c.written;
            sum.failed += c.failed;
            sum.paused_dropped += c.paused_dropped;
        }
        let d = PyDict::new(py);
        d.set_item("enqueued", q.enqueued)?;
        d.set_item("written", sum.written)?;
        d.set_item("dropped", q.dropped + sum.paused_dropped)?;
        d.set_item("paused_dropped", q.paused_dropped + sum.paused_dropped)?;
        d.set_item("write_errors", q.write_errors)?;
        d.set_item("failed", sum.failed)?;
        d.set_item("queue_depth", q.queue_depth)?;
        d.set_item("refusals_suppressed", q.refusals_suppressed)?;
        d.set_item("refusal_summaries", q.refusal_summaries)?;
        Ok(d)
    }

    /// The most recent sink error, if any.
    fn last_error(&self) -> Option<String> {
        self.inner.as_ref().and_then(|w| w.last_error())
    }
}

/// One backend of an [`PyAuditWriter`]: opened here (so a bad path fails now, naming it),
/// then given to a writer, after which it reports that backend's own counters.
#[pyclass(frozen, module = "fastmcp_guard._core", name = "AuditSink")]
pub(super) struct PyAuditSink {
    path: String,
    kind: &'static str,
    /// The opened sink, until a writer takes it.
    unopened: parking_lot::Mutex<Option<Box<dyn Sink>>>,
    /// Set when a writer took the sink: the writer and this backend's counters.
    bound: std::sync::OnceLock<(Arc<AuditWriter>, Arc<SinkStats>)>,
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

    fn bound(&self) -> PyResult<&(Arc<AuditWriter>, Arc<SinkStats>)> {
        self.bound.get().ok_or_else(|| {
            errors::invalid_argument(format!(
                "audit sink {} is not given to an AuditWriter yet: pass it to \
                 AuditWriter.of_sinks first",
                self.path
            ))
        })
    }
}

#[pymethods]
impl PyAuditSink {
    /// A JSONL file backend (`rotate_bytes`, `rotate_daily`, `retention`, `chain`,
    /// `chain_key`: see `FileBackend`).
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

    /// A `SQLite` backend (`retention_days`: see `SQLiteBackend`).
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

    /// This backend's counters: `written`, `failed`, `write_errors`, `paused_dropped`
    /// (for the only sink of its writer, also the events its writer refused while paused).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (writer, slot) = self.bound()?;
        let c = slot.counts();
        let refused = if writer.sink_stats().len() == 1 {
            writer.stats().paused_dropped
        } else {
            0
        };
        let d = PyDict::new(py);
        d.set_item("written", c.written)?;
        d.set_item("failed", c.failed)?;
        d.set_item("write_errors", c.write_errors)?;
        d.set_item("paused_dropped", c.paused_dropped + refused)?;
        Ok(d)
    }

    /// The writer's queue has room and is open, and this backend's last write
    /// succeeded and it is not paused.
    fn healthy(&self) -> PyResult<bool> {
        let (writer, slot) = self.bound()?;
        Ok(writer.healthy() && slot.healthy())
    }

    /// Stop giving events to this backend (`reason` is named in the loss warning; each
    /// skipped event counts in `paused_dropped`) until called with `None`. The only sink
    /// of its writer pauses the writer too: `log` then refuses events at once (returns
    /// false) rather than queueing them for nobody.
    #[pyo3(signature = (reason))]
    fn pause(&self, reason: Option<String>) -> PyResult<()> {
        let (writer, slot) = self.bound()?;
        if writer.sink_stats().len() == 1 {
            writer.pause(reason.clone());
        }
        slot.pause(reason);
        Ok(())
    }

    fn last_error(&self) -> PyResult<Option<String>> {
        Ok(self.bound()?.1.last_error())
    }

    /// Flushes the whole writer (every backend).
    /// Raises if writes to this backend failed since the last `flush` / `close` (not for
    /// another backend's failures).
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        let (writer, slot) = self.bound()?;
        let res = py.detach(|| writer.flush());
        sink_failure(&self.path, slot)?;
        not_this_sinks(res)
    }

    /// Closes the whole writer (every backend). Idempotent.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let (writer, slot) = self.bound()?;
        let res = py.detach(|| writer.close());
        sink_failure(&self.path, slot)?;
        not_this_sinks(res)
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

/// Logs `msg` as a warning on `fastmcp_guard.audit`; never fails (logging must never make
/// `log` fail).
fn audit_warning(py: Python<'_>, msg: String) {
    let _ = py
        .import("logging")
        .and_then(|m| m.call_method1("getLogger", (AUDIT_LOGGER,)))
        .and_then(|l| l.call_method1("warning", (msg,)));
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

#[allow(clippy::too_many_arguments, reason = "the writers' keyword options")]
fn options(
    queue_capacity: usize,
    batch_max: usize,
    flush_interval_ms: u64,
    on_full: &str,
    block_ms: u64,
    refusals: RefusalArgs,
    redact: Option<Vec<String>>,
    policy: EventPolicy,
    loss_warning_interval_ms: u64,
) -> PyResult<Options> {
    let on_full = match on_full {
        "drop" => OnFull::Drop,
        "block" => OnFull::Block(Duration::from_millis(block_ms)),
        other => {
            return Err(crate::errors::invalid_argument(format!(
                "on_full must be 'drop' or 'block', got {other:?}"
            )))
        }
    };
    Ok(Options {
        writer: WriterOptions {
            queue_capacity,
            batch_max,
            flush_interval: Duration::from_millis(flush_interval_ms),
            on_full,
            refusals: refusals.into(),
        },
        policy,
        redact: redactor(redact)?,
        warn_interval: Duration::from_millis(loss_warning_interval_ms),
    })
}

fn redactor(patterns: Option<Vec<String>>) -> PyResult<Option<Redactor>> {
    let Some(patterns) = patterns else {
        return Ok(None);
    };
    let r = Redactor::new(&patterns).map_err(|e| errors::invalid_argument(e.to_string()))?;
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
        return Err(errors::wrong_type(format!(
            "chain_key must be bytes or str, got {}",
            key.get_type().name()?
        )));
    };
    ChainKey::new(&bytes)
        .map(Some)
        .map_err(|e| errors::invalid_argument(e.to_string()))
}

/// `scopes` as a tuple of `str` (a list is copied into one), or a `TypeError`.
fn scopes_tuple<'py>(scopes: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyTuple>> {
    let tuple: Bound<'py, PyTuple> = if let Ok(l) = scopes.cast::<PyList>() {
        l.to_tuple()
    } else if let Ok(t) = scopes.cast::<PyTuple>() {
        t.clone()
    } else {
        return Err(errors::wrong_type(format!(
            "scopes must be a list or tuple of str, got {}",
            scopes.get_type().name()?
        )));
    };
    for s in tuple.iter() {
        if s.cast::<PyString>().is_err() {
            return Err(errors::wrong_type(format!(
                "scopes must be str, got {}",
                s.get_type().name()?
            )));
        }
    }
    Ok(tuple)
}
