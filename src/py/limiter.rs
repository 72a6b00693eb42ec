//! Bindings of the limiter (`src/limiter.rs`) behind the `RateLimit` facade
//! (`rate/__init__.py`) and the Redis limiter (`rate/redis.py`): `Rate` and
//! `parse_rate` (also used by `config.py`), `Refusal`, `Gcra` and `Limiter`.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::invalid_argument;

use crate::limiter::{parse_rate, BucketStatus, Decision, Gcra, Limiter, LimiterStatus, Rate};

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
    /// The refusal of a call by the bucket of `scope` (`per_key`, `global`, `tool`), to
    /// retry in `retry_ns`, full again in `reset_ns`.
    fn refusal(&self, scope: &str, retry_ns: u64, reset_ns: u64) -> PyResult<PyRefusal> {
        let scope = match scope {
            "per_key" => "per_key",
            "global" => "global",
            "tool" => "tool",
            other => {
                return Err(invalid_argument(format!(
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
pub(super) struct PyLimiter {
    inner: Limiter,
    /// `RateLimit`'s admitted decision and its `Decision` type, for [`Self::decide`].
    decisions: std::sync::OnceLock<(Py<PyAny>, Py<PyAny>)>,
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
    #[pyo3(signature = (*, per_key=None, global_limit=None))]
    fn new(per_key: Option<&str>, global_limit: Option<&str>) -> PyResult<Self> {
        let pk = per_key.map(parse_rate).transpose()?;
        let gl = global_limit.map(parse_rate).transpose()?;
        Ok(PyLimiter {
            inner: Limiter::new(pk, gl),
            decisions: std::sync::OnceLock::new(),
        })
    }

    fn set_tool_rate(&self, tool: &str, rate: Option<&str>) -> PyResult<()> {
        let r = rate.map(parse_rate).transpose()?;
        self.inner.set_tool_rate(tool, r);
        Ok(())
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
