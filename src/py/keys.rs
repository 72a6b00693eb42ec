//! Bindings of the key manager (`src/keystore/`) behind the `KeyStore` facade
//! (`keys/__init__.py`; the PostgreSQL and Redis stores go through
//! `KeyManager.external`, see `src/pystore.rs`): `KeyManager`, `KeyInfo`, `Identity`
//! (what the verifier and `guard.py` see) and `VerifyLimits`. Argon2id, `SQLite` and the
//! store calls run with the GIL released; a cache hit stays attached.
//!
//! An `Identity` is a verified-token cache entry. The verifier attaches the FastMCP
//! `AccessToken` it builds to that entry (`Identity.attach`) and finds it on the next hit
//! (`Identity.attached`): the Python object lives in the core's cache entry and goes with
//! it, so tokens live in one place (the cache), keyed by their digest. An entry dropped
//! without the GIL (by a revocation, or the background thread) hands its object to PyO3's
//! deferred reference pool, released the next time any thread attaches.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::{Map, Value};

use super::json::{map_to_py, py_to_json};
use crate::errors::{self, Exc};
use crate::hashing::{CachedKey, Now};
use crate::keystore::credits::check_amount;
use crate::keystore::{
    grace_from_secs, CacheLookup, CreditChange, CreditLease, CreditSpec, Credits, FailThrottle,
    KeyError, KeyManager, KeyRecord, ManagerOptions, Refill,
};

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
        errors::invalid_argument(format!(
            "{what} must be a non-negative number of seconds, got {d}"
        ))
    })
}

/// A verified key, as the request path sees it.
#[pyclass(frozen, module = "fastmcp_guard._core", name = "Identity")]
pub(super) struct PyIdentity(Arc<CachedKey>);

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
    /// `None` if the key has no credits; else whether they run in shadow (running out
    /// is audited as "would refuse" instead of refusing).
    #[getter]
    fn credits_shadow(&self) -> Option<bool> {
        self.0.credits
    }
    /// The object attached to this entry (the verifier's `AccessToken`), or `None`.
    #[getter]
    fn attached(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.0
            .attachment
            .get::<Py<PyAny>>()
            .map(|obj| obj.clone_ref(py))
    }
    /// Attaches `obj` to this entry unless an object is attached already, and returns the
    /// attached one (the first attach wins). It lives as long as the entry, so it must not
    /// hold the `Identity` (a cycle the garbage collector cannot see).
    fn attach(&self, py: Python<'_>, obj: Py<PyAny>) -> Py<PyAny> {
        let given = obj.clone_ref(py);
        self.0
            .attachment
            .get_or_attach(obj)
            .map_or(given, |attached| attached.clone_ref(py))
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
pub(super) struct PyKeyInfo(KeyRecord);

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
    /// The store balance now (a top-up due now counted), not what processes hold in
    /// leases; `None`: no credits (unlimited).
    #[getter]
    fn credits(&self) -> Option<u64> {
        self.credit_view().map(|c| c.balance)
    }
    /// `"5000/month"`, `"100/day"` or `None`.
    #[getter]
    fn refill(&self) -> Option<String> {
        self.0.credits.as_ref()?.refill.map(|r| r.canonical())
    }
    #[getter]
    fn credits_shadow(&self) -> bool {
        self.0.credits.as_ref().is_some_and(|c| c.shadow)
    }
    /// What "below 10 %" is measured against (the refill amount; without one, the
    /// balance right after the last create / set / add).
    #[getter]
    fn credits_base(&self) -> Option<u64> {
        self.credit_view().map(|c| c.base)
    }
    /// The start of the current refill period (or when the credits were last set).
    #[getter]
    fn refilled_at(&self) -> Option<f64> {
        self.credit_view().map(|c| ts_to_f64(c.refilled_at))
    }
    /// The next top-up, Unix seconds; `None` without a refill.
    #[getter]
    fn refill_at(&self) -> Option<f64> {
        self.credit_view()?.refill_at.map(ts_to_f64)
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

impl PyKeyInfo {
    fn credit_view(&self) -> Option<Credits> {
        self.0.credits.as_ref().map(|c| c.view_at(Utc::now()))
    }
}

/// A block of credits taken from the store (`KeyManager.lease_credits`).
#[pyclass(frozen, module = "fastmcp_guard._core", name = "CreditLease")]
pub(super) struct PyCreditLease(CreditLease);

#[pymethods]
impl PyCreditLease {
    #[getter]
    fn granted(&self) -> u64 {
        self.0.granted
    }
    #[getter]
    fn balance_after(&self) -> u64 {
        self.0.balance_after
    }
    /// The next top-up, Unix seconds; `None` without a refill.
    #[getter]
    fn refill_at(&self) -> Option<f64> {
        self.0.refill_at.map(ts_to_f64)
    }
    #[getter]
    fn epoch(&self) -> u64 {
        self.0.epoch
    }
    #[getter]
    fn base(&self) -> u64 {
        self.0.base
    }
    #[getter]
    fn shadow(&self) -> bool {
        self.0.shadow
    }
    fn __repr__(&self) -> String {
        format!(
            "CreditLease(granted={}, balance_after={}, epoch={})",
            self.0.granted, self.0.balance_after, self.0.epoch
        )
    }
}

/// `"5000/month"` as `(5000, "month")`; `InvalidKeyInputError` (a `ValueError`) naming the
/// accepted forms otherwise.
#[pyfunction]
pub(super) fn parse_refill(text: &str) -> PyResult<(u64, &'static str)> {
    let r = Refill::parse(text)?;
    Ok((r.amount, r.period.as_str()))
}

fn credit_amount(value: i128, field: &'static str) -> PyResult<u64> {
    Ok(check_amount(value, field)?)
}

/// Key store + argon2id + verified-token cache.
#[pyclass(frozen, module = "fastmcp_guard._core", name = "KeyManager")]
pub(super) struct PyKeyManager(Arc<KeyManager>);

/// How much an unproven token may cost: the failure budgets, the negative cache of unknown
/// key ids, and the wait for a hashing thread (see `src/keystore/throttle.rs`).
#[pyclass(frozen, module = "fastmcp_guard._core", name = "VerifyLimits")]
#[derive(Clone)]
pub(super) struct PyVerifyLimits {
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
            return Err(errors::invalid_argument(
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
                        allow_past_expiry=false, credits=None, refill=None, credits_shadow=false))]
    #[allow(clippy::too_many_arguments, reason = "keyword-only options")]
    fn create(
        &self,
        py: Python<'_>,
        name: String,
        scopes: Option<Vec<String>>,
        expires_at: Option<f64>,
        metadata: Option<&Bound<'_, PyDict>>,
        allow_past_expiry: bool,
        credits: Option<i128>,
        refill: Option<&str>,
        credits_shadow: bool,
    ) -> PyResult<(PyKeyInfo, String)> {
        let spec = CreditSpec {
            credits: credits.map(|c| credit_amount(c, "credits")).transpose()?,
            refill: refill.map(Refill::parse).transpose()?,
            shadow: credits_shadow,
        };
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
            m.create_with_credits(&name, &scopes, exp, meta, allow_past_expiry, &spec)
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
        let grace = grace_from_secs(grace_seconds)?;
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

    /// Sets the balance of a key's credits (`None`: remove them; the key is unlimited).
    fn set_credits(
        &self,
        py: Python<'_>,
        key_id: &str,
        credits: Option<i128>,
    ) -> PyResult<PyKeyInfo> {
        let n = credits.map(|c| credit_amount(c, "credits")).transpose()?;
        let m = Arc::clone(&self.0);
        let id = key_id.to_owned();
        Ok(PyKeyInfo(py.detach(move || {
            m.change_credits(&id, &CreditChange::Set(n))
        })?))
    }

    /// Adds `n` (may be negative; the balance stops at 0) to a key's credits.
    fn add_credits(&self, py: Python<'_>, key_id: &str, n: i128) -> PyResult<PyKeyInfo> {
        let delta = i64::try_from(n).map_err(|_| {
            errors::new_err(
                Exc::InvalidKeyInput,
                format!("invalid credits: {n} is out of range; add at most 2**53"),
            )
        })?;
        let m = Arc::clone(&self.0);
        let id = key_id.to_owned();
        Ok(PyKeyInfo(py.detach(move || {
            m.change_credits(&id, &CreditChange::Add(delta))
        })?))
    }

    /// Takes up to `want` credits from the store after applying a top-up due at `now`
    /// (Unix seconds); `None` if the key has no credits. Blocking (a store write).
    fn lease_credits(
        &self,
        py: Python<'_>,
        key_id: &str,
        want: u64,
        now: f64,
    ) -> PyResult<Option<PyCreditLease>> {
        let now = f64_to_ts(now, "now")?;
        let m = Arc::clone(&self.0);
        let id = key_id.to_owned();
        Ok(py
            .detach(move || m.lease_credits(&id, want, now))?
            .map(PyCreditLease))
    }

    /// Gives back `n` unspent credits of a lease of `epoch`; whether they were taken back.
    fn return_credits(&self, py: Python<'_>, key_id: &str, n: u64, epoch: u64) -> PyResult<bool> {
        let m = Arc::clone(&self.0);
        let id = key_id.to_owned();
        Ok(py.detach(move || m.return_credits(&id, n, epoch))?)
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
