//! Python bindings (`fastmcp_guard._core`). Only this file and `errors.rs` touch PyO3.
//!
//! Microsecond paths (cache hit, bucket check, IP check, audit enqueue) stay attached
//! to the interpreter; anything that can wait (argon2id, SQLite, flushes) runs inside
//! `py.detach` with no Python object in hand.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Value};

use crate::audit::mask::{mask_str, mask_tail};
use crate::audit::redact::{Cursor, Step, REDACTED};
use crate::audit::{
    cut_field, is_reserved_field, write_json_str, write_line_parts, Admitted, AuditQuery,
    AuditRecord, AuditWriter, ChainKey, FanSink, JsonlFileSink, JsonlOptions, LineHead, OnFull,
    Redactor, Refusal, RefusalOptions, Sink, SlotStats, SqliteSink, Status, WriterOptions,
};
use crate::errors::{self, Exc};
use crate::hashing::CachedKey;
use crate::hashing::Now;
use crate::ipmatch::{IpDecision, IpMatcher};
use crate::keystore::{CacheLookup, FailThrottle, KeyError, KeyManager, KeyRecord, ManagerOptions};
use crate::limiter::{parse_rate, BucketStatus, Decision, Gcra, Limiter, LimiterStatus, Rate};
use crate::tokens;

// --------------------------------------------------------------------------------------
// JSON <-> Python
// --------------------------------------------------------------------------------------

fn json_to_py(py: Python<'_>, v: &Value) -> PyResult<Py<PyAny>> {
    Ok(match v {
        Value::Null => py.None(),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any().unbind(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any().unbind()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any().unbind()
            } else {
                n.as_f64()
                    .unwrap_or(f64::NAN)
                    .into_pyobject(py)?
                    .into_any()
                    .unbind()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any().unbind(),
        Value::Array(a) => {
            let items = a
                .iter()
                .map(|x| json_to_py(py, x))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any().unbind()
        }
        Value::Object(o) => map_to_py(py, o)?.into_any().unbind(),
    })
}

fn map_to_py<'py>(py: Python<'py>, m: &Map<String, Value>) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in m {
        d.set_item(k, json_to_py(py, v)?)?;
    }
    Ok(d)
}

/// Appends `s` as a JSON string; a `str` that is not valid UTF-8 (lone surrogates)
/// is written with replacement characters rather than failing.
fn write_py_str(buf: &mut Vec<u8>, s: &Bound<'_, PyString>) {
    match s.to_str() {
        Ok(text) => write_json_str(buf, text),
        Err(_) => write_json_str(buf, &s.to_string_lossy()),
    }
}

/// Appends `repr(obj)` (or a placeholder if `repr` raises) as a JSON string.
fn write_py_repr(buf: &mut Vec<u8>, obj: &Bound<'_, PyAny>) {
    match obj.repr() {
        Ok(r) => write_py_str(buf, &r),
        Err(_) => write_json_str(buf, "<unrepresentable>"),
    }
}

/// Appends `obj` as JSON text straight from the Python objects: the audit hot path
/// (no intermediate `Value`, no allocation but the line buffer's growth). The same
/// mapping as [`py_to_json`], except that what JSON cannot hold becomes its `repr`
/// (a non-string key its `str`), so this never fails. Dict keys keep their insertion order.
fn write_py_json(buf: &mut Vec<u8>, obj: &Bound<'_, PyAny>, depth: u32) {
    use std::io::Write as _;
    if depth > 64 {
        write_json_str(buf, "<nested too deep>");
        return;
    }
    // Cheapest checks first: str, dict and int are flag tests; `bool` cannot be
    // subclassed, so an exact check (a pointer compare) settles it.
    if obj.is_none() {
        buf.extend_from_slice(b"null");
    } else if let Ok(s) = obj.cast::<PyString>() {
        write_py_str(buf, s);
    } else if let Ok(d) = obj.cast::<PyDict>() {
        buf.push(b'{');
        for (i, (k, v)) in d.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            write_py_key(buf, &k);
            buf.push(b':');
            write_py_json(buf, &v, depth + 1);
        }
        buf.push(b'}');
    } else if obj.cast::<PyInt>().is_ok() {
        // Writing into a Vec cannot fail.
        if obj.is_exact_instance_of::<PyBool>() {
            buf.extend_from_slice(if obj.is_truthy().unwrap_or(false) {
                b"true"
            } else {
                b"false"
            });
        } else if let Ok(i) = obj.extract::<i64>() {
            write!(buf, "{i}").ok();
        } else if let Ok(u) = obj.extract::<u64>() {
            write!(buf, "{u}").ok();
        } else {
            match obj.str() {
                Ok(text) => write_py_str(buf, &text),
                Err(_) => write_py_repr(buf, obj),
            }
        }
    } else if let Ok(f) = obj.cast::<PyFloat>() {
        let x = f.value();
        if x.is_finite() {
            serde_json::to_writer(&mut *buf, &x).ok();
        } else {
            buf.extend_from_slice(b"null");
        }
    } else if let Ok(l) = obj.cast::<PyList>() {
        write_py_array(buf, l.iter(), depth);
    } else if let Ok(t) = obj.cast::<PyTuple>() {
        write_py_array(buf, t.iter(), depth);
    } else {
        write_py_repr(buf, obj);
    }
}

fn write_py_array<'py>(
    buf: &mut Vec<u8>,
    items: impl Iterator<Item = Bound<'py, PyAny>>,
    depth: u32,
) {
    buf.push(b'[');
    for (i, x) in items.enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        write_py_json(buf, &x, depth + 1);
    }
    buf.push(b']');
}

/// [`write_py_json`] with redaction: the value of a key that `red` matches at
/// `at` is written as `"[redacted]"`. Subtrees no pattern can reach go through
/// the plain writer.
fn write_py_json_redacted(
    buf: &mut Vec<u8>,
    obj: &Bound<'_, PyAny>,
    depth: u32,
    red: &Redactor,
    at: Cursor,
) {
    if red.inert(at) || depth > 64 {
        write_py_json(buf, obj, depth);
    } else if let Ok(d) = obj.cast::<PyDict>() {
        buf.push(b'{');
        for (i, (k, v)) in d.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            write_py_key(buf, &k);
            buf.push(b':');
            match red.step(at, &py_key_text(&k)) {
                Step::Redact => write_json_str(buf, REDACTED),
                Step::Keep(next) => write_py_json_redacted(buf, &v, depth + 1, red, next),
            }
        }
        buf.push(b'}');
    } else if let Ok(l) = obj.cast::<PyList>() {
        write_py_array_redacted(buf, l.iter(), depth, red, at);
    } else if let Ok(t) = obj.cast::<PyTuple>() {
        write_py_array_redacted(buf, t.iter(), depth, red, at);
    } else {
        write_py_json(buf, obj, depth);
    }
}

fn write_py_array_redacted<'py>(
    buf: &mut Vec<u8>,
    items: impl Iterator<Item = Bound<'py, PyAny>>,
    depth: u32,
    red: &Redactor,
    at: Cursor,
) {
    buf.push(b'[');
    for (i, x) in items.enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        // Lists are transparent: items keep the list's path.
        write_py_json_redacted(buf, &x, depth + 1, red, at);
    }
    buf.push(b']');
}

/// The text a dict key is written as (see [`write_py_key`]), for matching.
fn py_key_text<'a>(k: &'a Bound<'_, PyAny>) -> std::borrow::Cow<'a, str> {
    if let Ok(s) = k.cast::<PyString>() {
        if let Ok(text) = s.to_str() {
            return std::borrow::Cow::Borrowed(text);
        }
        return std::borrow::Cow::Owned(s.to_string_lossy().into_owned());
    }
    std::borrow::Cow::Owned(
        k.str()
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_default(),
    )
}

/// A dict key as a JSON string: a `str` as is, anything else as its `str()`.
fn write_py_key(buf: &mut Vec<u8>, k: &Bound<'_, PyAny>) {
    if let Ok(s) = k.cast::<PyString>() {
        write_py_str(buf, s);
    } else {
        match k.str() {
            Ok(text) => write_py_str(buf, &text),
            Err(_) => write_py_repr(buf, k),
        }
    }
}

/// A Python value as JSON (key metadata: stored and compared later), refusing what
/// JSON cannot hold.
fn py_to_json(obj: &Bound<'_, PyAny>, depth: u32) -> PyResult<Value> {
    if depth > 64 {
        return Err(PyValueError::new_err("value nested deeper than 64 levels"));
    }
    if obj.is_none() {
        return Ok(Value::Null);
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Value::String(s.to_str()?.to_owned()));
    }
    if obj.cast::<PyInt>().is_ok() {
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(Value::from(i));
        }
        if let Ok(u) = obj.extract::<u64>() {
            return Ok(Value::from(u));
        }
        return Ok(Value::String(obj.str()?.to_str()?.to_owned()));
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        let x = f.value();
        return Ok(serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number));
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        let mut m = Map::with_capacity(d.len());
        for (k, v) in d.iter() {
            let key = match k.cast::<PyString>() {
                Ok(s) => s.to_str()?.to_owned(),
                Err(_) => {
                    return Err(PyTypeError::new_err(format!(
                        "dictionary keys must be strings, got {}",
                        k.get_type().name()?
                    )))
                }
            };
            m.insert(key, py_to_json(&v, depth + 1)?);
        }
        return Ok(Value::Object(m));
    }
    if let Ok(l) = obj.cast::<PyList>() {
        return l
            .iter()
            .map(|x| py_to_json(&x, depth + 1))
            .collect::<PyResult<Vec<_>>>()
            .map(Value::Array);
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        return t
            .iter()
            .map(|x| py_to_json(&x, depth + 1))
            .collect::<PyResult<Vec<_>>>()
            .map(Value::Array);
    }
    Err(PyTypeError::new_err(format!(
        "value of type {} is not JSON-serialisable (use str, int, float, bool, None, list, dict)",
        obj.get_type().name()?
    )))
}

fn ts_to_f64(ts: DateTime<Utc>) -> f64 {
    #[allow(clippy::cast_precision_loss, reason = "Unix seconds as a Python float")]
    let ms = ts.timestamp_millis() as f64;
    ms / 1000.0
}

fn f64_to_ts(secs: f64, what: &str) -> PyResult<DateTime<Utc>> {
    if !secs.is_finite() {
        return Err(errors::new_err(
            Exc::InvalidKeyInput,
            format!("{what} must be a finite Unix time"),
        ));
    }
    #[allow(
        clippy::cast_possible_truncation,
        reason = "range-checked by chrono below"
    )]
    let ms = (secs * 1000.0).round() as i64;
    Utc.timestamp_millis_opt(ms).single().ok_or_else(|| {
        errors::new_err(
            Exc::InvalidKeyInput,
            format!("{what} is out of range: {secs}"),
        )
    })
}

fn secs(d: f64, what: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(d).map_err(|_| {
        PyValueError::new_err(format!(
            "{what} must be a non-negative number of seconds, got {d}"
        ))
    })
}

// --------------------------------------------------------------------------------------
// Tokens
// --------------------------------------------------------------------------------------

/// The key id named by a key id, a bare public id or a token; `None` if none.
#[pyfunction]
fn token_key_id(token_or_id: &str) -> Option<String> {
    tokens::key_id_from_public_part(token_or_id)
}

/// True when `token` starts with `fmg_sk_`.
#[pyfunction]
fn looks_like_guard_token(token: &str) -> bool {
    tokens::looks_like_guard_token(token)
}

// --------------------------------------------------------------------------------------
// Rates and the limiter
// --------------------------------------------------------------------------------------

/// A parsed rate such as `10/minute`.
#[pyclass(frozen, module = "fastmcp_guard._core", name = "Rate")]
struct PyRate(Rate);

#[pymethods]
impl PyRate {
    #[new]
    fn new(spec: &str) -> PyResult<Self> {
        Ok(PyRate(parse_rate(spec)?))
    }
    #[getter]
    fn count(&self) -> u64 {
        self.0.count
    }
    #[getter]
    fn period_seconds(&self) -> f64 {
        self.0.window_seconds()
    }
    fn __str__(&self) -> String {
        self.0.to_string()
    }
    fn __repr__(&self) -> String {
        format!("Rate('{}')", self.0)
    }
}

/// Parse a rate string; raises `InvalidRateError` naming the bad value.
#[pyfunction(name = "parse_rate")]
fn py_parse_rate(spec: &str) -> PyResult<PyRate> {
    PyRate::new(spec)
}

/// Why the limiter refused a call: the in-process limiter's, the Redis limiter's, or an
/// unreachable shared limiter's (scope `backend`).
#[pyclass(frozen, module = "fastmcp_guard._core", name = "Refusal")]
struct PyRefusal {
    scope: &'static str,
    limit: String,
    count: u64,
    window_seconds: f64,
    retry_after: f64,
    reset_after: f64,
}

impl PyRefusal {
    fn of(scope: &'static str, rate: Rate, retry_after: f64, reset_after: f64) -> Self {
        PyRefusal {
            scope,
            limit: rate.to_string(),
            count: rate.count,
            window_seconds: rate.window_seconds(),
            retry_after,
            reset_after,
        }
    }
}

#[pymethods]
impl PyRefusal {
    /// The refusal of a call when the shared limiter cannot be reached and its policy is
    /// `deny`: scope `backend`, retry after `retry_after` seconds.
    #[staticmethod]
    fn unavailable(retry_after: f64) -> PyResult<Self> {
        if !(retry_after.is_finite() && retry_after >= 0.0) {
            return Err(PyValueError::new_err(format!(
                "retry_after must be a finite number of seconds >= 0, got {retry_after}"
            )));
        }
        Ok(PyRefusal {
            scope: "backend",
            limit: "unavailable".to_owned(),
            count: 0,
            window_seconds: 0.0,
            retry_after,
            reset_after: retry_after,
        })
    }
    #[getter]
    fn scope(&self) -> &'static str {
        self.scope
    }
    #[getter]
    fn limit(&self) -> &str {
        &self.limit
    }
    #[getter]
    fn count(&self) -> u64 {
        self.count
    }
    #[getter]
    fn window_seconds(&self) -> f64 {
        self.window_seconds
    }
    #[getter]
    fn retry_after(&self) -> f64 {
        self.retry_after
    }
    #[getter]
    fn reset_after(&self) -> f64 {
        self.reset_after
    }
    fn __repr__(&self) -> String {
        format!(
            "Refusal(scope='{}', limit='{}', retry_after={:.3})",
            self.scope, self.limit, self.retry_after
        )
    }
}

/// The GCRA strategy of one rate (see `limiter::Gcra`): its constants for a storage that
/// keeps TATs elsewhere (the Redis limiter's Lua script), and the status and refusal a
/// stored TAT gives.
#[pyclass(frozen, module = "fastmcp_guard._core", name = "Gcra")]
struct PyGcra(Gcra);

#[pymethods]
impl PyGcra {
    #[new]
    fn new(rate: &str) -> PyResult<Self> {
        Ok(PyGcra(Gcra::new(parse_rate(rate)?)))
    }
    /// The rate, canonical (`"10/minute"`).
    #[getter]
    fn rate(&self) -> String {
        self.0.rate().to_string()
    }
    #[getter]
    fn limit(&self) -> u64 {
        self.0.limit()
    }
    #[getter]
    fn window_seconds(&self) -> f64 {
        self.0.rate().window_seconds()
    }
    #[getter]
    fn emission_ns(&self) -> u64 {
        self.0.emission_ns()
    }
    #[getter]
    fn tau_ns(&self) -> u64 {
        self.0.tau_ns()
    }
    /// The bucket whose TAT is `tat_ns`, at `now_ns` (as `Limiter.status` gives it).
    fn status<'py>(
        &self,
        py: Python<'py>,
        tat_ns: u64,
        now_ns: u64,
    ) -> PyResult<Bound<'py, PyDict>> {
        bucket_dict(py, &self.0.status(tat_ns, now_ns))
    }
    /// The refusal of a call by the bucket of `scope` (`per_key`, `global`, `tool`), to
    /// retry in `retry_ns`, full again in `reset_ns`.
    fn refusal(&self, scope: &str, retry_ns: u64, reset_ns: u64) -> PyResult<PyRefusal> {
        let scope = match scope {
            "per_key" => "per_key",
            "global" => "global",
            "tool" => "tool",
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown refusal scope {other:?}; expected 'per_key', 'global' or 'tool'"
                )))
            }
        };
        Ok(PyRefusal::of(
            scope,
            self.0.rate(),
            retry_ns as f64 / 1e9,
            reset_ns as f64 / 1e9,
        ))
    }
    fn __repr__(&self) -> String {
        format!("Gcra('{}')", self.0.rate())
    }
}

/// GCRA token buckets: per key, global, and per (key, tool).
#[pyclass(frozen, module = "fastmcp_guard._core", name = "Limiter")]
struct PyLimiter(Limiter);

fn bucket_dict<'py>(py: Python<'py>, b: &BucketStatus) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("limit", b.limit)?;
    d.set_item("used", b.used)?;
    d.set_item("remaining", b.remaining)?;
    d.set_item("window_seconds", b.window_seconds)?;
    d.set_item("reset_after", b.reset_after)?;
    Ok(d)
}

fn refusal(decision: Decision) -> Option<PyRefusal> {
    match decision {
        Decision::Allowed { .. } => None,
        Decision::Limited {
            scope,
            rate,
            retry_after,
            reset_after,
        } => Some(PyRefusal::of(
            scope.as_str(),
            rate,
            retry_after,
            reset_after,
        )),
    }
}

fn status_dict<'py>(py: Python<'py>, st: &LimiterStatus) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    if let Some(b) = &st.per_key {
        d.set_item("per_key", bucket_dict(py, b)?)?;
    }
    if let Some(b) = &st.global {
        d.set_item("global", bucket_dict(py, b)?)?;
    }
    if !st.tools.is_empty() {
        let t = PyDict::new(py);
        for (name, b) in &st.tools {
            t.set_item(name, bucket_dict(py, b)?)?;
        }
        d.set_item("tools", t)?;
    }
    Ok(d)
}

#[pymethods]
impl PyLimiter {
    #[new]
    #[pyo3(signature = (*, per_key=None, global_limit=None))]
    fn new(per_key: Option<&str>, global_limit: Option<&str>) -> PyResult<Self> {
        let pk = per_key.map(parse_rate).transpose()?;
        let gl = global_limit.map(parse_rate).transpose()?;
        Ok(PyLimiter(Limiter::new(pk, gl)))
    }

    fn set_tool_rate(&self, tool: &str, rate: Option<&str>) -> PyResult<()> {
        let r = rate.map(parse_rate).transpose()?;
        self.0.set_tool_rate(tool, r);
        Ok(())
    }

    #[pyo3(signature = (key, tool=None))]
    fn check(&self, key: &str, tool: Option<&str>) -> Option<PyRefusal> {
        refusal(self.0.check(key, tool))
    }

    /// `check` at an explicit time (nanoseconds on one clock of the caller's choosing; never
    /// mix it with `check` on one limiter). For tests and simulations.
    #[pyo3(signature = (key, tool, now_ns))]
    fn check_at(&self, key: &str, tool: Option<&str>, now_ns: u64) -> Option<PyRefusal> {
        refusal(self.0.check_at(key, tool, now_ns))
    }

    fn status<'py>(&self, py: Python<'py>, key: &str) -> PyResult<Bound<'py, PyDict>> {
        status_dict(py, &self.0.status(key))
    }

    /// `status` at an explicit time (see `check_at`).
    fn status_at<'py>(
        &self,
        py: Python<'py>,
        key: &str,
        now_ns: u64,
    ) -> PyResult<Bound<'py, PyDict>> {
        status_dict(py, &self.0.status_at(key, now_ns))
    }
    fn reset(&self, key: &str) {
        self.0.reset(key);
    }

    /// Keys that have buckets now (seen and not yet evicted as idle), sorted.
    fn tracked_keys(&self) -> Vec<String> {
        self.0.tracked_keys()
    }
}

// --------------------------------------------------------------------------------------
// IP policy
// --------------------------------------------------------------------------------------

/// Allow / deny lists (deny wins) and trusted proxies.
#[pyclass(frozen, module = "fastmcp_guard._core", name = "IPMatcher")]
struct PyIpMatcher(IpMatcher);

#[pymethods]
impl PyIpMatcher {
    #[new]
    #[pyo3(signature = (*, allow=None, deny=None, trusted_proxies=None))]
    fn new(
        allow: Option<Vec<String>>,
        deny: Option<Vec<String>>,
        trusted_proxies: Option<Vec<String>>,
    ) -> PyResult<Self> {
        let (a, d, t) = (
            allow.unwrap_or_default(),
            deny.unwrap_or_default(),
            trusted_proxies.unwrap_or_default(),
        );
        Ok(PyIpMatcher(IpMatcher::new(&a, &d, &t)?))
    }

    fn is_allowed(&self, ip: &str) -> bool {
        self.0.is_allowed_str(ip)
    }

    fn check(&self, ip: &str) -> Option<&'static str> {
        match crate::ipmatch::parse_addr(ip) {
            None => Some("unparsable"),
            Some(addr) => match self.0.check(addr) {
                IpDecision::Allowed => None,
                IpDecision::Denied(reason) => Some(reason.as_str()),
            },
        }
    }

    /// The client: an address, or the unparsable peer / forwarded hop itself (cut to 64
    /// characters), which `check` refuses as `"unparsable"`.
    #[pyo3(signature = (peer, x_forwarded_for=None))]
    fn client_ip(&self, peer: &str, x_forwarded_for: Option<&str>) -> String {
        self.0.resolve_client(peer, x_forwarded_for).text()
    }
}

// --------------------------------------------------------------------------------------
// Keys
// --------------------------------------------------------------------------------------

/// A verified key, as the request path sees it.
#[pyclass(frozen, module = "fastmcp_guard._core", name = "Identity")]
struct PyIdentity(Arc<CachedKey>);

#[pymethods]
impl PyIdentity {
    #[getter]
    fn key_id(&self) -> &str {
        &self.0.key_id
    }
    #[getter]
    fn key_name(&self) -> &str {
        &self.0.name
    }
    #[getter]
    fn scopes(&self) -> Vec<String> {
        self.0.scopes.to_vec()
    }
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        map_to_py(py, &self.0.metadata)
    }
    /// When the token stops being valid (expiry, or the end of a rotation grace period).
    #[getter]
    fn expires_at(&self) -> Option<f64> {
        #[allow(clippy::cast_precision_loss, reason = "Unix seconds as a Python float")]
        self.0.valid_until.map(|ms| ms as f64 / 1000.0)
    }
    fn __repr__(&self) -> String {
        format!(
            "Identity(key_id='{}', key_name={:?})",
            self.0.key_id, self.0.name
        )
    }
}

/// A stored key record: never the token or its hash.
#[pyclass(frozen, module = "fastmcp_guard._core", name = "KeyInfo")]
struct PyKeyInfo(KeyRecord);

#[pymethods]
impl PyKeyInfo {
    #[getter]
    fn id(&self) -> &str {
        &self.0.id
    }
    #[getter]
    fn name(&self) -> &str {
        &self.0.name
    }
    #[getter]
    fn scopes(&self) -> Vec<String> {
        self.0.scopes.clone()
    }
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        map_to_py(py, &self.0.metadata)
    }
    #[getter]
    fn status(&self) -> &'static str {
        self.0.status.as_str()
    }
    #[getter]
    fn created_at(&self) -> f64 {
        ts_to_f64(self.0.created_at)
    }
    #[getter]
    fn expires_at(&self) -> Option<f64> {
        self.0.expires_at.map(ts_to_f64)
    }
    #[getter]
    fn last_used_at(&self) -> Option<f64> {
        self.0.last_used_at.map(ts_to_f64)
    }
    #[getter]
    fn last_used_ip(&self) -> Option<&str> {
        self.0.last_used_ip.as_deref()
    }
    #[getter]
    fn grace_until(&self) -> Option<f64> {
        self.0.grace_until.map(ts_to_f64)
    }
    #[getter]
    fn rotated_from(&self) -> Option<&str> {
        self.0.rotated_from.as_deref()
    }
    #[getter]
    fn rotated_to(&self) -> Option<&str> {
        self.0.rotated_to.as_deref()
    }
    #[getter]
    fn revoked_at(&self) -> Option<f64> {
        self.0.revoked_at.map(ts_to_f64)
    }
    fn __repr__(&self) -> String {
        format!(
            "KeyInfo(id='{}', name={:?}, status='{}')",
            self.0.id,
            self.0.name,
            self.0.status.as_str()
        )
    }
}

/// Key store + argon2id + verified-token cache.
#[pyclass(frozen, module = "fastmcp_guard._core", name = "KeyManager")]
struct PyKeyManager(Arc<KeyManager>);

/// How much an unproven token may cost: the failure budgets, the negative cache of unknown
/// key ids, and the wait for a hashing thread (see `src/keystore/throttle.rs`).
#[pyclass(frozen, module = "fastmcp_guard._core", name = "VerifyLimits")]
#[derive(Clone)]
struct PyVerifyLimits {
    throttle: FailThrottle,
    unknown_key_ttl: Duration,
    verify_wait: Duration,
}

impl Default for PyVerifyLimits {
    fn default() -> Self {
        let d = ManagerOptions::default();
        Self {
            throttle: d.fail_throttle,
            unknown_key_ttl: d.negative_ttl,
            verify_wait: d.verify_wait,
        }
    }
}

#[pymethods]
impl PyVerifyLimits {
    #[new]
    #[pyo3(signature = (*, max_failures=10, failure_window_seconds=60.0, key_failure_budget=100,
                        global_failure_budget=600, unknown_key_budget=20,
                        unknown_key_ttl_seconds=5.0, verify_wait_seconds=2.0))]
    fn new(
        max_failures: u32,
        failure_window_seconds: f64,
        key_failure_budget: u32,
        global_failure_budget: u32,
        unknown_key_budget: u32,
        unknown_key_ttl_seconds: f64,
        verify_wait_seconds: f64,
    ) -> PyResult<Self> {
        let window = secs(failure_window_seconds, "failure_window_seconds")?;
        if window.is_zero() {
            return Err(PyValueError::new_err(
                "failure_window_seconds must be greater than 0",
            ));
        }
        Ok(Self {
            throttle: FailThrottle {
                max_failures,
                window,
                key_budget: key_failure_budget,
                global_budget: global_failure_budget,
                unknown_budget: unknown_key_budget,
            },
            unknown_key_ttl: secs(unknown_key_ttl_seconds, "unknown_key_ttl_seconds")?,
            verify_wait: secs(verify_wait_seconds, "verify_wait_seconds")?,
        })
    }
    #[getter]
    fn max_failures(&self) -> u32 {
        self.throttle.max_failures
    }
    #[getter]
    fn failure_window_seconds(&self) -> f64 {
        self.throttle.window.as_secs_f64()
    }
    #[getter]
    fn key_failure_budget(&self) -> u32 {
        self.throttle.key_budget
    }
    #[getter]
    fn global_failure_budget(&self) -> u32 {
        self.throttle.global_budget
    }
    #[getter]
    fn unknown_key_budget(&self) -> u32 {
        self.throttle.unknown_budget
    }
    #[getter]
    fn unknown_key_ttl_seconds(&self) -> f64 {
        self.unknown_key_ttl.as_secs_f64()
    }
    #[getter]
    fn verify_wait_seconds(&self) -> f64 {
        self.verify_wait.as_secs_f64()
    }
    fn __repr__(&self) -> String {
        format!(
            "VerifyLimits(max_failures={}, failure_window_seconds={}, key_failure_budget={}, \
             global_failure_budget={}, unknown_key_budget={}, unknown_key_ttl_seconds={}, \
             verify_wait_seconds={})",
            self.throttle.max_failures,
            self.throttle.window.as_secs_f64(),
            self.throttle.key_budget,
            self.throttle.global_budget,
            self.throttle.unknown_budget,
            self.unknown_key_ttl.as_secs_f64(),
            self.verify_wait.as_secs_f64()
        )
    }
}

fn manager_options(
    cache_ttl_seconds: f64,
    cache_capacity: usize,
    touch_interval_seconds: f64,
    watch_interval_seconds: f64,
    max_concurrent_verifications: Option<usize>,
    limits: Option<&Bound<'_, PyVerifyLimits>>,
) -> PyResult<ManagerOptions> {
    let defaults = ManagerOptions::default();
    let limits = limits.map(|l| l.get().clone()).unwrap_or_default();
    Ok(ManagerOptions {
        cache_ttl: secs(cache_ttl_seconds, "cache_ttl_seconds")?,
        cache_capacity,
        touch_interval: secs(touch_interval_seconds, "touch_interval_seconds")?,
        watch_interval: secs(watch_interval_seconds, "watch_interval_seconds")?,
        max_concurrent_verifications: max_concurrent_verifications
            .unwrap_or(defaults.max_concurrent_verifications),
        fail_throttle: limits.throttle,
        negative_ttl: limits.unknown_key_ttl,
        verify_wait: limits.verify_wait,
        ..defaults
    })
}

#[pymethods]
impl PyKeyManager {
    #[staticmethod]
    #[pyo3(signature = (*, cache_ttl_seconds=60.0, cache_capacity=10_000, touch_interval_seconds=5.0,
                        watch_interval_seconds=0.25, max_concurrent_verifications=None, limits=None))]
    fn memory(
        cache_ttl_seconds: f64,
        cache_capacity: usize,
        touch_interval_seconds: f64,
        watch_interval_seconds: f64,
        max_concurrent_verifications: Option<usize>,
        limits: Option<&Bound<'_, PyVerifyLimits>>,
    ) -> PyResult<Self> {
        let o = manager_options(
            cache_ttl_seconds,
            cache_capacity,
            touch_interval_seconds,
            watch_interval_seconds,
            max_concurrent_verifications,
            limits,
        )?;
        Ok(PyKeyManager(Arc::new(KeyManager::memory(o)?)))
    }

    #[staticmethod]
    #[pyo3(signature = (path, *, cache_ttl_seconds=60.0, cache_capacity=10_000, touch_interval_seconds=5.0,
                        watch_interval_seconds=0.25, max_concurrent_verifications=None, limits=None))]
    #[allow(clippy::too_many_arguments, reason = "keyword-only options")]
    fn sqlite(
        py: Python<'_>,
        path: PathBuf,
        cache_ttl_seconds: f64,
        cache_capacity: usize,
        touch_interval_seconds: f64,
        watch_interval_seconds: f64,
        max_concurrent_verifications: Option<usize>,
        limits: Option<&Bound<'_, PyVerifyLimits>>,
    ) -> PyResult<Self> {
        let o = manager_options(
            cache_ttl_seconds,
            cache_capacity,
            touch_interval_seconds,
            watch_interval_seconds,
            max_concurrent_verifications,
            limits,
        )?;
        let m = py.detach(|| KeyManager::sqlite(&path, o))?;
        Ok(PyKeyManager(Arc::new(m)))
    }

    /// A manager over a store implemented in Python (PostgreSQL, Redis): see
    /// `src/pystore.rs` for the methods `backend` must have.
    #[staticmethod]
    #[pyo3(signature = (backend, *, cache_ttl_seconds=60.0, cache_capacity=10_000, touch_interval_seconds=5.0,
                        watch_interval_seconds=0.25, max_concurrent_verifications=None, limits=None))]
    #[allow(clippy::too_many_arguments, reason = "keyword-only options")]
    fn external(
        py: Python<'_>,
        backend: &Bound<'_, PyAny>,
        cache_ttl_seconds: f64,
        cache_capacity: usize,
        touch_interval_seconds: f64,
        watch_interval_seconds: f64,
        max_concurrent_verifications: Option<usize>,
        limits: Option<&Bound<'_, PyVerifyLimits>>,
    ) -> PyResult<Self> {
        let o = manager_options(
            cache_ttl_seconds,
            cache_capacity,
            touch_interval_seconds,
            watch_interval_seconds,
            max_concurrent_verifications,
            limits,
        )?;
        // No Rust background thread: it would call into Python, and could not be joined
        // at interpreter exit. The Python owner runs flush / sync_changes on a schedule.
        let o = ManagerOptions {
            background_thread: false,
            ..o
        };
        let backend: Arc<dyn crate::keystore::KeyBackend> =
            Arc::new(crate::pystore::PyKeyBackend::new(backend)?);
        let m = py.detach(|| KeyManager::with_backend(backend, o))?;
        Ok(PyKeyManager(Arc::new(m)))
    }

    #[pyo3(signature = (name, *, scopes=None, expires_at=None, metadata=None,
                        allow_past_expiry=false))]
    fn create(
        &self,
        py: Python<'_>,
        name: String,
        scopes: Option<Vec<String>>,
        expires_at: Option<f64>,
        metadata: Option<&Bound<'_, PyDict>>,
        allow_past_expiry: bool,
    ) -> PyResult<(PyKeyInfo, String)> {
        let exp = expires_at.map(|s| f64_to_ts(s, "expires_at")).transpose()?;
        let meta = match metadata {
            None => Map::new(),
            Some(d) => match py_to_json(d.as_any(), 0) {
                Ok(Value::Object(m)) => m,
                Ok(_) => Map::new(),
                Err(e) => {
                    return Err(errors::new_err(
                        Exc::InvalidKeyInput,
                        format!("metadata: {e}"),
                    ));
                }
            },
        };
        let scopes = scopes.unwrap_or_default();
        let m = Arc::clone(&self.0);
        let (rec, token) = py.detach(move || {
            if allow_past_expiry {
                m.create_allowing_past_expiry(&name, &scopes, exp, meta)
            } else {
                m.create(&name, &scopes, exp, meta)
            }
        })?;
        Ok((PyKeyInfo(rec), token))
    }

    fn get(&self, py: Python<'_>, key_id: &str) -> PyResult<Option<PyKeyInfo>> {
        let m = Arc::clone(&self.0);
        let id = key_id.to_owned();
        match py.detach(move || m.get(&id)) {
            Ok(rec) => Ok(Some(PyKeyInfo(rec))),
            Err(KeyError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    #[pyo3(signature = (*, include_revoked=false))]
    fn list(&self, py: Python<'_>, include_revoked: bool) -> PyResult<Vec<PyKeyInfo>> {
        let m = Arc::clone(&self.0);
        Ok(py
            .detach(move || m.list(include_revoked))?
            .into_iter()
            .map(PyKeyInfo)
            .collect())
    }

    #[pyo3(signature = (key_id, *, grace_seconds))]
    fn rotate(
        &self,
        py: Python<'_>,
        key_id: &str,
        grace_seconds: f64,
    ) -> PyResult<(PyKeyInfo, String)> {
        if !grace_seconds.is_finite() || grace_seconds < 0.0 {
            return Err(errors::new_err(
                Exc::InvalidKeyInput,
                format!("grace period must be >= 0, got {grace_seconds}"),
            ));
        }
        #[allow(
            clippy::cast_possible_truncation,
            reason = "grace periods are far below i64 ms"
        )]
        let grace = chrono::Duration::milliseconds((grace_seconds * 1000.0).round() as i64);
        let m = Arc::clone(&self.0);
        let id = key_id.to_owned();
        let (rec, token) = py.detach(move || m.rotate(&id, grace))?;
        Ok((PyKeyInfo(rec), token))
    }

    fn revoke(&self, py: Python<'_>, key_id: &str) -> PyResult<PyKeyInfo> {
        let m = Arc::clone(&self.0);
        let id = key_id.to_owned();
        Ok(PyKeyInfo(py.detach(move || m.revoke(&id))?))
    }

    /// Revokes a key and its predecessors still in their rotation grace period; the key
    /// and those predecessors (nearest first).
    fn revoke_lineage(
        &self,
        py: Python<'_>,
        key_id: &str,
    ) -> PyResult<(PyKeyInfo, Vec<PyKeyInfo>)> {
        let m = Arc::clone(&self.0);
        let id = key_id.to_owned();
        let done = py.detach(move || m.revoke_lineage(&id))?;
        Ok((
            PyKeyInfo(done.key),
            done.predecessors.into_iter().map(PyKeyInfo).collect(),
        ))
    }

    #[pyo3(signature = (token, client=None))]
    fn verify_cached(&self, token: &str, client: Option<&str>) -> Option<PyIdentity> {
        match self.0.verify_cached_from(token, client, Now::system()) {
            CacheLookup::Hit(k) => Some(PyIdentity(k)),
            _ => None,
        }
    }

    #[pyo3(signature = (token, client=None))]
    fn verify(&self, py: Python<'_>, token: &str, client: Option<&str>) -> PyResult<PyIdentity> {
        let m = Arc::clone(&self.0);
        let token = token.to_owned();
        let client = client.map(str::to_owned);
        Ok(PyIdentity(
            py.detach(move || m.verify(&token, client.as_deref()))?,
        ))
    }

    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        let m = Arc::clone(&self.0);
        py.detach(move || m.flush())?;
        Ok(())
    }

    /// Drops the cached verifications of one key (a store's change notification).
    fn invalidate(&self, key_id: &str) {
        self.0.invalidate(key_id);
    }

    /// Drops every cached verification (after a lost notification channel reconnects).
    fn clear_cache(&self) {
        self.0.clear_cache();
    }

    /// Reads what other processes changed in the store now (the watcher does it every
    /// `watch_interval_seconds`; a store with change notifications calls this on each);
    /// drops their keys from the verified-token cache. Returns how many changed.
    fn sync_changes(&self, py: Python<'_>) -> PyResult<usize> {
        let m = Arc::clone(&self.0);
        Ok(py.detach(move || m.sync_changes())?)
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let m = Arc::clone(&self.0);
        py.detach(move || m.close())?;
        Ok(())
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.0.stats();
        let d = PyDict::new(py);
        d.set_item("argon2_runs", s.argon2_runs)?;
        d.set_item("bcrypt_runs", s.bcrypt_runs)?;
        d.set_item("store_reads", s.store_reads)?;
        d.set_item("touch_batches", s.touch_batches)?;
        d.set_item("touches_written", s.touches_written)?;
        d.set_item("invalidations", s.invalidations)?;
        d.set_item("throttled", s.throttled)?;
        d.set_item("busy", s.busy)?;
        d.set_item("proof_refreshes", s.proof_refreshes)?;
        d.set_item("negative_hits", s.negative_hits)?;
        d.set_item("proven_len", s.proven_len)?;
        d.set_item("known_ids", s.known_ids)?;
        d.set_item("hash_memory_bytes", s.hash_memory_bytes)?;
        d.set_item(
            "hash_threads",
            self.0.options().max_concurrent_verifications,
        )?;
        d.set_item("background_errors", s.background_errors)?;
        d.set_item("cache_len", s.cache_len)?;
        d.set_item("pending_touches", s.pending_touches)?;
        Ok(d)
    }
}

// --------------------------------------------------------------------------------------
// Audit
// --------------------------------------------------------------------------------------

/// Bounded queue + background thread writing batches: JSONL lines (`AuditWriter(path)`)
/// or `SQLite` rows, one transaction per batch (`AuditWriter.sqlite(path)`).
#[pyclass(frozen, weakref, module = "fastmcp_guard._core", name = "AuditWriter")]
struct PyAuditWriter {
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
            return Err(PyValueError::new_err(format!(
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
struct PyJsonText {
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
fn mask_tokens<'py>(text: &Bound<'py, PyString>) -> PyResult<Bound<'py, PyString>> {
    let s = text.to_str()?;
    Ok(match mask_str(s) {
        std::borrow::Cow::Borrowed(_) => text.clone(),
        std::borrow::Cow::Owned(m) => PyString::new(text.py(), &m),
    })
}

/// A chain key given as `bytes` or `str` (its UTF-8).
fn chain_key(key: Option<&Bound<'_, PyAny>>) -> PyResult<Option<ChainKey>> {
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
struct PyAuditSink {
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
struct PyAuditFanout {
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

/// Unix seconds to an instant truncated to the millisecond (as stored timestamps are).
fn query_instant(secs: f64, what: &str) -> PyResult<DateTime<Utc>> {
    let bad = || {
        PyValueError::new_err(format!(
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

fn scan_error(e: crate::audit::scan::ScanError) -> PyErr {
    use crate::audit::scan::ScanError as E;
    use pyo3::exceptions::{
        PyBrokenPipeError, PyFileNotFoundError, PyIsADirectoryError, PyKeyboardInterrupt,
        PyOSError, PyPermissionError,
    };
    let msg = e.to_string();
    match &e {
        E::Open { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
            std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
            _ => PyOSError::new_err(msg),
        },
        E::IsADirectory { .. } => PyIsADirectoryError::new_err(msg),
        E::Write { source } if source.kind() == std::io::ErrorKind::BrokenPipe => {
            PyBrokenPipeError::new_err(msg)
        }
        E::Interrupted { .. } => PyKeyboardInterrupt::new_err(msg),
        E::EmptyRange { .. } => PyValueError::new_err(msg),
        _ => PyOSError::new_err(msg),
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
fn audit_scan<'py>(
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
    use crate::audit::scan::{scan_paths, OutputFormat, ScanFilter};
    let (paths, _) = log_paths(path)?;
    let format = match format {
        "jsonl" => OutputFormat::Jsonl,
        "csv" => OutputFormat::Csv { header },
        other => {
            return Err(PyValueError::new_err(format!(
                "format must be 'jsonl' or 'csv', got {other:?}"
            )))
        }
    };
    let filter = ScanFilter {
        key,
        tool,
        status: status
            .map(str::parse::<Status>)
            .transpose()
            .map_err(|e| PyValueError::new_err(e.to_string()))?,
        since: since.map(|s| query_instant(s, "since")).transpose()?,
        until: until.map(|s| query_instant(s, "until")).transpose()?,
        limit,
    };
    let mut sink = if let Ok(p) = out.extract::<PathBuf>() {
        let file = py.detach(|| {
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
            o.open(&p).map_err(|e| {
                pyo3::exceptions::PyOSError::new_err(format!("cannot write {}: {e}", p.display()))
            })
        })?;
        ScanOut::File(std::io::BufWriter::with_capacity(1 << 20, file))
    } else if out.hasattr("write")? {
        ScanOut::Stream {
            target: out.clone().unbind(),
            failed: None,
        }
    } else {
        return Err(PyTypeError::new_err(format!(
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
    let stats = result.0.map_err(scan_error)?;
    result
        .1
        .map_err(|e| pyo3::exceptions::PyOSError::new_err(format!("writing the output: {e}")))?;
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
    Err(PyTypeError::new_err(format!(
        "expected a path or a list of paths, got {}",
        path_or_paths.get_type().name()?
    )))
}

fn io_to_py(e: &std::io::Error, msg: String) -> PyErr {
    use pyo3::exceptions::{
        PyFileNotFoundError, PyIsADirectoryError, PyOSError, PyPermissionError,
    };
    match e.kind() {
        std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
        std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
        std::io::ErrorKind::IsADirectory => PyIsADirectoryError::new_err(msg),
        _ => PyOSError::new_err(msg),
    }
}

/// Every file of the JSONL audit log at `path`, oldest first: its rotated files
/// (`<stem>-<yyyymmddTHHMMSSmmm><ext>` beside it), then `path` itself if it exists.
#[pyfunction]
fn audit_log_files(py: Python<'_>, path: PathBuf) -> PyResult<Vec<String>> {
    let files = py.detach(|| crate::audit::log_files(&path)).map_err(|e| {
        io_to_py(
            &e,
            format!("cannot list the audit log files of {}: {e}", path.display()),
        )
    })?;
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
fn audit_spool_read<'py>(
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
            io_to_py(
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
fn audit_verify<'py>(
    py: Python<'py>,
    path_or_paths: &Bound<'py, PyAny>,
    key: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let (given, whole_log) = log_paths(path_or_paths)?;
    let key = chain_key(key)?;
    let (paths, report) = py
        .detach(move || {
            let paths = if whole_log {
                let live = &given[0];
                let mut files = crate::audit::rotated_files(live).map_err(|e| {
                    crate::audit::AuditError::Read {
                        path: live.clone(),
                        source: e,
                    }
                })?;
                if live.exists() || files.is_empty() {
                    files.push(live.clone());
                }
                files
            } else {
                given
            };
            crate::audit::verify_files(&paths, key.as_ref()).map(|r| (paths, r))
        })
        .map_err(|e| match &e {
            crate::audit::AuditError::Read { source, .. } => io_to_py(source, e.to_string()),
            _ => PyErr::from(e),
        })?;
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
fn audit_query<'py>(
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
    let status = status
        .map(str::parse::<Status>)
        .transpose()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let limit = usize::try_from(limit)
        .map_err(|_| PyValueError::new_err(format!("limit must be >= 0, got {limit}")))?;
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

// --------------------------------------------------------------------------------------
// Module
// --------------------------------------------------------------------------------------

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    m.add_function(wrap_pyfunction!(token_key_id, m)?)?;
    m.add_function(wrap_pyfunction!(audit_scan, m)?)?;
    m.add_class::<PyJsonText>()?;
    m.add_function(wrap_pyfunction!(mask_tokens, m)?)?;
    m.add(
        "AUDIT_STATUSES",
        PyTuple::new(m.py(), Status::ALL.iter().map(|s| s.as_str()))?,
    )?;
    m.add_function(wrap_pyfunction!(looks_like_guard_token, m)?)?;
    m.add_function(wrap_pyfunction!(py_parse_rate, m)?)?;
    m.add_class::<PyRate>()?;
    m.add_class::<PyRefusal>()?;
    m.add_class::<PyGcra>()?;
    m.add_class::<PyLimiter>()?;
    m.add_class::<PyIpMatcher>()?;
    m.add_class::<PyIdentity>()?;
    m.add_class::<PyKeyInfo>()?;
    m.add_class::<PyKeyManager>()?;
    m.add_class::<PyVerifyLimits>()?;
    m.add_class::<PyAuditWriter>()?;
    m.add_class::<PyAuditFanout>()?;
    m.add_class::<PyAuditSink>()?;
    m.add_function(wrap_pyfunction!(audit_query, m)?)?;
    m.add_function(wrap_pyfunction!(audit_verify, m)?)?;
    m.add_function(wrap_pyfunction!(audit_log_files, m)?)?;
    m.add_function(wrap_pyfunction!(audit_spool_read, m)?)?;
    Ok(())
}
