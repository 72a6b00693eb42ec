//! Bindings of the limiter (`src/limiter.rs`) behind the `RateLimit` facade
//! (`rate/__init__.py`) and the Redis limiter (`rate/redis.py`): `Rate` and
//! `parse_rate` (also used by `config.py`), `Refusal`, `Verdict`, `Gcra`, `Limiter` and
//! `args_hash`.

use std::borrow::Cow;
use std::sync::OnceLock;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use crate::errors::{invalid_argument, wrong_type};

use crate::limiter::{
    args_hash_hex, monotonic_nanos, parse_rate, ArgsHasher, BucketStatus, Decision, Gcra, Limiter,
    LimiterStatus, Rate, ShadowHit, ARGS_MAX_DEPTH,
};

/// A parsed rate such as `10/minute`.
#[pyclass(frozen, module = "fastmcp_guard._core", name = "Rate")]
pub(super) struct PyRate(Rate);

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
pub(super) fn py_parse_rate(spec: &str) -> PyResult<PyRate> {
    PyRate::new(spec)
}

/// Why the limiter refused a call: the in-process limiter's, the Redis limiter's, or an
/// unreachable shared limiter's (scope `backend`).
#[pyclass(frozen, module = "fastmcp_guard._core", name = "Refusal")]
pub(super) struct PyRefusal {
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
            return Err(invalid_argument(format!(
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
pub(super) struct PyGcra(Gcra);

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
    /// The refusal of a call by the bucket of `scope` (`per_key`, `global`, `tool`,
    /// `loop`), to retry in `retry_ns`, full again in `reset_ns`.
    fn refusal(&self, scope: &str, retry_ns: u64, reset_ns: u64) -> PyResult<PyRefusal> {
        let scope = match scope {
            "per_key" => "per_key",
            "global" => "global",
            "tool" => "tool",
            "loop" => "loop",
            other => {
                return Err(invalid_argument(format!(
                    "unknown refusal scope {other:?}; expected 'per_key', 'global', 'tool' \
                     or 'loop'"
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
    /// Calls of cost 1 a bucket admits when its TAT is `ahead_ns` ahead of now
    /// (`Limiter.call`'s `remaining`).
    fn remaining(&self, ahead_ns: u64) -> u64 {
        self.0.remaining(ahead_ns, 0)
    }
    fn __repr__(&self) -> String {
        format!("Gcra('{}')", self.0.rate())
    }
}

/// The decision on one call by `Limiter.call` (or the Redis limiter's `call`): refused
/// (`refusal`), or admitted, perhaps with a shadow rule's would-be refusal (`shadow`), and
/// the tightest enforced bucket's state for the agent's budget.
#[pyclass(frozen, module = "fastmcp_guard._core", name = "Verdict")]
pub(super) struct PyVerdict {
    refusal: Option<Py<PyRefusal>>,
    shadow: Option<Py<PyRefusal>>,
    remaining: Option<u64>,
    reset_after: f64,
    limit: Option<Rate>,
    args_hash: Option<u64>,
}

impl PyVerdict {
    const ADMITTED: PyVerdict = PyVerdict {
        refusal: None,
        shadow: None,
        remaining: None,
        reset_after: 0.0,
        limit: None,
        args_hash: None,
    };
}

fn shadow_refusal(hit: ShadowHit) -> PyRefusal {
    PyRefusal::of(
        hit.scope.as_str(),
        hit.rate,
        hit.retry_after,
        hit.reset_after,
    )
}

#[pymethods]
impl PyVerdict {
    #[new]
    #[pyo3(signature = (refusal=None, shadow=None, remaining=None, reset_after=0.0, limit=None, args_hash=None))]
    fn new(
        refusal: Option<Py<PyRefusal>>,
        shadow: Option<Py<PyRefusal>>,
        remaining: Option<u64>,
        reset_after: f64,
        limit: Option<&str>,
        args_hash: Option<&str>,
    ) -> PyResult<Self> {
        if !(reset_after.is_finite() && reset_after >= 0.0) {
            return Err(invalid_argument(format!(
                "reset_after must be a finite number of seconds >= 0, got {reset_after}"
            )));
        }
        let args_hash = args_hash
            .map(|h| {
                if h.len() == 16 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                    u64::from_str_radix(h, 16).map_err(|e| invalid_argument(e.to_string()))
                } else {
                    Err(invalid_argument(format!(
                        "args_hash must be 16 lowercase hex digits (as args_hash() gives), \
                         got {h:?}"
                    )))
                }
            })
            .transpose()?;
        Ok(PyVerdict {
            refusal,
            shadow,
            remaining,
            reset_after,
            limit: limit.map(parse_rate).transpose()?,
            args_hash,
        })
    }
    /// The enforced refusal: the call is refused (`None`: admitted).
    #[getter]
    fn refusal(&self, py: Python<'_>) -> Option<Py<PyRefusal>> {
        self.refusal.as_ref().map(|r| r.clone_ref(py))
    }
    /// On an admitted call, the shadow rule that would have refused it.
    #[getter]
    fn shadow(&self, py: Python<'_>) -> Option<Py<PyRefusal>> {
        self.shadow.as_ref().map(|r| r.clone_ref(py))
    }
    /// Calls of cost 1 the tightest enforced bucket still admits (`None`: no enforced
    /// bucket applies, or the call was refused).
    #[getter]
    fn remaining(&self) -> Option<u64> {
        self.remaining
    }
    /// Seconds until that bucket is full again.
    #[getter]
    fn reset_after(&self) -> f64 {
        self.reset_after
    }
    /// That bucket's rate, canonical (`"10/minute"`).
    #[getter]
    fn limit(&self, py: Python<'_>) -> Option<Py<PyString>> {
        self.limit.map(|r| rate_text(py, r))
    }
    /// The arguments' hash (16 hex digits) when a loop breaker applied.
    #[getter]
    fn args_hash(&self) -> Option<String> {
        self.args_hash.map(args_hash_hex)
    }
    /// Always true: the decision is final (the Redis limiter returns the same class).
    #[getter]
    fn settled(&self) -> bool {
        true
    }
    /// The agent's view of this decision, as `_meta["fastmcp-guard/budget"]` carries it:
    /// `{"remaining": ..., "reset": ..., "limit": ...}` (all `None` when no enforced
    /// bucket applies). One dict built here: the middleware adds it to every result.
    fn budget<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item(pyo3::intern!(py, "remaining"), self.remaining)?;
        let reset = self.remaining.map(|_| self.reset_after);
        d.set_item(pyo3::intern!(py, "reset"), reset)?;
        d.set_item(pyo3::intern!(py, "limit"), self.limit(py))?;
        Ok(d)
    }
    fn __repr__(&self, py: Python<'_>) -> String {
        let refusal = |r: &Option<Py<PyRefusal>>| {
            r.as_ref()
                .map_or_else(|| "None".to_owned(), |r| r.get().__repr__())
        };
        let _ = py;
        format!(
            "Verdict(refusal={}, shadow={}, remaining={}, reset_after={:.3}, limit={}, \
             args_hash={})",
            refusal(&self.refusal),
            refusal(&self.shadow),
            self.remaining
                .map_or_else(|| "None".to_owned(), |r| r.to_string()),
            self.reset_after,
            self.limit
                .map_or_else(|| "None".to_owned(), |r| format!("'{r}'")),
            self.args_hash
                .map_or_else(|| "None".to_owned(), |h| format!("'{}'", args_hash_hex(h))),
        )
    }
}

// ------------------------------------------------------------------------- argument hash

/// `str(obj)` as a string, or `<unprintable TYPE>` if it raises (anything: the walk never
/// fails).
fn str_of(obj: &Bound<'_, PyAny>) -> String {
    match obj.str() {
        Ok(s) => s.to_string_lossy().into_owned(),
        Err(_) => {
            let name = obj.get_type().name().map_or_else(
                |_| "object".to_owned(),
                |n| n.to_string_lossy().into_owned(),
            );
            format!("<unprintable {name}>")
        }
    }
}

/// Python's `repr` of a float (`json.dumps`'s spelling); `NaN`, `Infinity`, `-Infinity`.
fn float_text(py: Python<'_>, x: f64) -> String {
    if x.is_nan() {
        "NaN".to_owned()
    } else if x.is_infinite() {
        if x > 0.0 { "Infinity" } else { "-Infinity" }.to_owned()
    } else {
        // A float of our own: a subclass's __repr__ does not count.
        PyFloat::new(py, x)
            .repr()
            .map_or_else(|_| x.to_string(), |r| r.to_string_lossy().into_owned())
    }
}

/// A whole number in decimal (`int.__repr__`; a subclass's `__str__` does not count).
fn int_text(obj: &Bound<'_, PyAny>) -> String {
    if let Ok(i) = obj.extract::<i64>() {
        return i.to_string();
    }
    if let Ok(i) = obj.extract::<i128>() {
        return i.to_string();
    }
    let py = obj.py();
    py.get_type::<PyInt>()
        .call_method1("__repr__", (obj,))
        .and_then(|r| r.extract::<String>())
        .unwrap_or_else(|_| str_of(obj))
}

/// A dict key as `json.dumps` writes it (a string), with a type rank for sorting keys that
/// read alike (`1` and `"1"`).
fn key_text<'a>(k: &'a Bound<'_, PyAny>) -> (Cow<'a, str>, u8) {
    if let Ok(s) = k.cast::<PyString>() {
        (s.to_cow().unwrap_or_else(|_| s.to_string_lossy()), 0)
    } else if k.is_exact_instance_of::<PyBool>() {
        let t = if k.is_truthy().unwrap_or(false) {
            "true"
        } else {
            "false"
        };
        (Cow::Borrowed(t), 3)
    } else if k.cast::<PyInt>().is_ok() {
        (Cow::Owned(int_text(k)), 1)
    } else if let Ok(f) = k.cast::<PyFloat>() {
        (Cow::Owned(float_text(k.py(), f.value())), 2)
    } else if k.is_none() {
        (Cow::Borrowed("null"), 4)
    } else {
        (Cow::Owned(str_of(k)), 5)
    }
}

/// Writes `obj`'s canonical JSON into `h` (see `limiter`'s "Argument hash" notes).
fn walk(h: &mut ArgsHasher, obj: &Bound<'_, PyAny>, depth: usize) {
    if h.is_full() {
        return;
    }
    if depth > ARGS_MAX_DEPTH {
        h.depth_marker();
        return;
    }
    if obj.is_none() {
        h.raw(b"null");
    } else if let Ok(s) = obj.cast::<PyString>() {
        h.string(&s.to_string_lossy());
    } else if obj.is_exact_instance_of::<PyBool>() {
        h.raw(if obj.is_truthy().unwrap_or(false) {
            b"true"
        } else {
            b"false"
        });
    } else if obj.cast::<PyInt>().is_ok() {
        if let Ok(i) = obj.extract::<i64>() {
            h.int(i);
        } else {
            h.raw(int_text(obj).as_bytes());
        }
    } else if let Ok(f) = obj.cast::<PyFloat>() {
        h.raw(float_text(obj.py(), f.value()).as_bytes());
    } else if let Ok(d) = obj.cast::<PyDict>() {
        // A snapshot of the items first (no Python code runs while iterating): `str()` of
        // a key may run code that changes the dict.
        let pairs: Vec<_> = d.iter().collect();
        let mut items: Vec<_> = pairs.iter().map(|(k, v)| (key_text(k), v)).collect();
        items.sort_by(|a, b| a.0.cmp(&b.0));
        h.raw(b"{");
        for (i, ((k, _), v)) in items.iter().enumerate() {
            if h.is_full() {
                return;
            }
            if i > 0 {
                h.raw(b",");
            }
            h.string(k);
            h.raw(b":");
            walk(h, v, depth + 1);
        }
        h.raw(b"}");
    } else if let Ok(l) = obj.cast::<PyList>() {
        walk_array(h, l.iter(), depth);
    } else if let Ok(t) = obj.cast::<PyTuple>() {
        walk_array(h, t.iter(), depth);
    } else {
        h.string(&str_of(obj));
    }
}

/// Writes a list or a tuple as a JSON array.
fn walk_array<'py>(
    h: &mut ArgsHasher,
    items: impl Iterator<Item = Bound<'py, PyAny>>,
    depth: usize,
) {
    h.raw(b"[");
    for (i, x) in items.enumerate() {
        if h.is_full() {
            return;
        }
        if i > 0 {
            h.raw(b",");
        }
        walk(h, &x, depth + 1);
    }
    h.raw(b"]");
}

/// The argument hash of `obj` as a number.
fn hash_args(obj: &Bound<'_, PyAny>) -> u64 {
    let mut h = ArgsHasher::new();
    walk(&mut h, obj, 0);
    h.finish()
}

/// The loop breaker's hash of a call's arguments: 16 lowercase hex digits, the first 8
/// bytes of blake3 over the canonical JSON of `obj` (keys sorted, no whitespace, UTF-8).
/// Never raises: deep nesting and huge values hash as far as the limits allow.
#[pyfunction]
pub(super) fn args_hash(obj: &Bound<'_, PyAny>) -> String {
    args_hash_hex(hash_args(obj))
}

/// Canonical rate strings already made, so a verdict's `limit` is not formatted again on
/// every call (the rates are the configuration's: a handful). At most this many kept.
const RATE_TEXTS_MAX: usize = 256;
type RateTexts = parking_lot::Mutex<std::collections::HashMap<Rate, Py<PyString>>>;
static RATE_TEXTS: std::sync::LazyLock<RateTexts> = std::sync::LazyLock::new(Default::default);

/// `rate`'s canonical spelling as a Python string, from [`RATE_TEXTS`] when made before.
fn rate_text(py: Python<'_>, rate: Rate) -> Py<PyString> {
    let mut texts = RATE_TEXTS.lock();
    if let Some(t) = texts.get(&rate) {
        return t.clone_ref(py);
    }
    let t = PyString::new(py, &rate.to_string()).unbind();
    if texts.len() < RATE_TEXTS_MAX {
        texts.insert(rate, t.clone_ref(py));
    }
    t
}

/// The most a call may cost (units).
pub(super) const MAX_COST: i64 = 1_000_000;

/// The cost of a call: a whole number from 1 to [`MAX_COST`] (`None`: 1). The one check of
/// a cost: the limiters (in process and Redis) and the configuration (`check_cost`) use it.
fn cost_of(cost: Option<&Bound<'_, PyAny>>) -> PyResult<u64> {
    let Some(c) = cost else { return Ok(1) };
    if c.is_exact_instance_of::<PyBool>() || c.cast::<PyInt>().is_err() {
        return Err(wrong_type(format!(
            "cost must be an int (a whole number) from 1 to {MAX_COST}, got {}",
            c.get_type()
                .name()
                .map_or_else(|_| "object".to_owned(), |n| n.to_string())
        )));
    }
    match c.extract::<i64>() {
        Ok(n @ 1..=MAX_COST) => Ok(n.unsigned_abs()),
        Ok(n) if n < 1 => Err(invalid_argument(format!(
            "cost must be a whole number from 1 to {MAX_COST}, got {n}: a call always costs \
             at least 1 unit (to make a tool free, leave it out of every limit instead)"
        ))),
        _ => Err(invalid_argument(format!(
            "cost must be a whole number from 1 to {MAX_COST}, got {}",
            str_of(c)
        ))),
    }
}

/// `cost` checked as every limiter checks a call's cost: the int itself, or
/// `InvalidArgumentError` / `ArgumentTypeError` saying what a cost may be.
#[pyfunction]
pub(super) fn check_cost(cost: &Bound<'_, PyAny>) -> PyResult<u64> {
    cost_of(Some(cost))
}

/// GCRA token buckets: per key, global, per (key, tool), and the loop breaker's per (key,
/// tool, arguments); each rule enforced or in shadow.
#[pyclass(frozen, module = "fastmcp_guard._core", name = "Limiter")]
pub(super) struct PyLimiter {
    inner: Limiter,
    /// `RateLimit`'s admitted decision and its `Decision` type, for [`Self::decide`].
    decisions: OnceLock<(Py<PyAny>, Py<PyAny>)>,
    /// The plain admitted verdict (no enforced bucket, no shadow hit, no loop breaker),
    /// shared by every such call.
    admitted: OnceLock<Py<PyVerdict>>,
}

fn opt_rate(rate: Option<&str>) -> PyResult<Option<Rate>> {
    Ok(rate.map(parse_rate).transpose()?)
}

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
    #[pyo3(signature = (*, per_key=None, global_limit=None, per_key_shadow=false, global_shadow=false))]
    fn new(
        per_key: Option<&str>,
        global_limit: Option<&str>,
        per_key_shadow: bool,
        global_shadow: bool,
    ) -> PyResult<Self> {
        let inner = Limiter::new(opt_rate(per_key)?, opt_rate(global_limit)?);
        inner.set_modes(per_key_shadow, global_shadow);
        Ok(PyLimiter {
            inner,
            decisions: OnceLock::new(),
            admitted: OnceLock::new(),
        })
    }

    /// Set (`rate`) or clear (`None`) `tool`'s per-(key, tool) rate, enforced or in shadow.
    #[pyo3(signature = (tool, rate, shadow=false))]
    fn set_tool_rate(&self, tool: &str, rate: Option<&str>, shadow: bool) -> PyResult<()> {
        self.inner.set_tool_rate(tool, opt_rate(rate)?, shadow);
        Ok(())
    }

    /// The limiter-wide loop breaker (`None`: off; tools with their own keep it).
    #[pyo3(signature = (rate, shadow=true))]
    fn set_loop_breaker(&self, rate: Option<&str>, shadow: bool) -> PyResult<()> {
        self.inner.set_loop_breaker(opt_rate(rate)?, shadow);
        Ok(())
    }

    /// `tool`'s own loop breaker in place of the limiter-wide one (`None`: off for it).
    #[pyo3(signature = (tool, rate, shadow=true))]
    fn set_tool_loop_breaker(&self, tool: &str, rate: Option<&str>, shadow: bool) -> PyResult<()> {
        self.inner
            .set_tool_loop_breaker(tool, opt_rate(rate)?, shadow);
        Ok(())
    }

    /// Drops `tool`'s own loop breaker: the limiter-wide one applies again.
    fn clear_tool_loop_breaker(&self, tool: &str) {
        self.inner.clear_tool_loop_breaker(tool);
    }

    /// The loop breaker that applies to `tool`: `(rate, shadow)`, or `None`.
    fn loop_breaker(&self, tool: &str) -> Option<(String, bool)> {
        self.inner
            .loop_breaker(tool)
            .map(|(rate, shadow)| (rate.to_string(), shadow))
    }

    /// Decide (and on admission consume) one call of `cost` by `key` to `tool`, with
    /// `args` for the loop breaker (hashed only when one applies to the tool).
    #[pyo3(signature = (key, tool=None, cost=None, args=None))]
    #[pyo3(text_signature = "($self, key, tool=None, cost=1, args=None)")]
    fn call(
        &self,
        py: Python<'_>,
        key: &str,
        tool: Option<&str>,
        cost: Option<&Bound<'_, PyAny>>,
        args: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyVerdict>> {
        let n = cost_of(cost)?;
        self.call_impl(py, key, tool, n, args, monotonic_nanos())
    }

    /// `call` at an explicit time in nanoseconds (tests; one clock per limiter).
    #[pyo3(signature = (key, tool, cost, args, now_ns))]
    fn call_at(
        &self,
        py: Python<'_>,
        key: &str,
        tool: Option<&str>,
        cost: Option<&Bound<'_, PyAny>>,
        args: Option<&Bound<'_, PyAny>>,
        now_ns: u64,
    ) -> PyResult<Py<PyVerdict>> {
        let n = cost_of(cost)?;
        self.call_impl(py, key, tool, n, args, now_ns)
    }

    #[pyo3(signature = (key, tool=None))]
    fn check(&self, key: &str, tool: Option<&str>) -> Option<PyRefusal> {
        refusal(self.inner.check(key, tool))
    }

    /// Gives [`decide`](Self::decide) what it returns: `admitted` for an admitted call,
    /// `decision(refusal)` for a refused one (`RateLimit`'s `ADMITTED` and `Decision`).
    /// Once per limiter.
    fn set_decisions(&self, admitted: Py<PyAny>, decision: Py<PyAny>) -> PyResult<()> {
        self.decisions.set((admitted, decision)).map_err(|_| {
            crate::errors::invalid_argument("this limiter's decisions are set already")
        })
    }

    /// `check` answered as `RateLimit.check` answers: the objects given to
    /// `set_decisions` (no Python frame on the request path).
    #[pyo3(signature = (key_id, tool=None))]
    fn decide(&self, py: Python<'_>, key_id: &str, tool: Option<&str>) -> PyResult<Py<PyAny>> {
        let Some((admitted, decision)) = self.decisions.get() else {
            return Err(crate::errors::invalid_argument(
                "call set_decisions(admitted, decision) before decide()",
            ));
        };
        match refusal(self.inner.check(key_id, tool)) {
            None => Ok(admitted.clone_ref(py)),
            Some(r) => decision.call1(py, (r,)),
        }
    }

    /// `check` at an explicit time (nanoseconds on one clock of the caller's choosing; never
    /// mix it with `check` on one limiter). For tests and simulations.
    #[pyo3(signature = (key, tool, now_ns))]
    fn check_at(&self, key: &str, tool: Option<&str>, now_ns: u64) -> Option<PyRefusal> {
        refusal(self.inner.check_at(key, tool, now_ns))
    }

    fn status<'py>(&self, py: Python<'py>, key: &str) -> PyResult<Bound<'py, PyDict>> {
        status_dict(py, &self.inner.status(key))
    }

    /// `status` at an explicit time (see `check_at`).
    fn status_at<'py>(
        &self,
        py: Python<'py>,
        key: &str,
        now_ns: u64,
    ) -> PyResult<Bound<'py, PyDict>> {
        status_dict(py, &self.inner.status_at(key, now_ns))
    }
    fn reset(&self, key: &str) {
        self.inner.reset(key);
    }

    /// Keys that have buckets now (seen and not yet evicted as idle), sorted.
    fn tracked_keys(&self) -> Vec<String> {
        self.inner.tracked_keys()
    }
}

impl PyLimiter {
    fn call_impl(
        &self,
        py: Python<'_>,
        key: &str,
        tool: Option<&str>,
        cost: u64,
        args: Option<&Bound<'_, PyAny>>,
        now: u64,
    ) -> PyResult<Py<PyVerdict>> {
        let (decision, hash) =
            self.inner
                .check_call_with(key, tool, cost, args.map(|a| move || hash_args(a)), now);
        let verdict = match decision {
            Decision::Limited { .. } => PyVerdict {
                refusal: refusal(decision).map(|r| Py::new(py, r)).transpose()?,
                args_hash: hash,
                ..PyVerdict::ADMITTED
            },
            Decision::Allowed {
                remaining,
                reset_after,
                limit,
                shadow,
            } => {
                if limit.is_none() && shadow.is_none() && hash.is_none() {
                    if let Some(v) = self.admitted.get() {
                        return Ok(v.clone_ref(py));
                    }
                    let v = Py::new(py, PyVerdict::ADMITTED)?;
                    return Ok(self.admitted.get_or_init(|| v).clone_ref(py));
                }
                PyVerdict {
                    refusal: None,
                    shadow: shadow.map(|h| Py::new(py, shadow_refusal(h))).transpose()?,
                    remaining: limit.map(|_| remaining),
                    reset_after,
                    limit,
                    args_hash: hash,
                }
            }
        };
        Py::new(py, verdict)
    }
}
