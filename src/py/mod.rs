//! Python bindings: the extension module `fastmcp_guard._core`, one file per Python
//! facade, each wrapping a domain module in `frozen` pyclasses and pyfunctions:
//!
//! - `keys.rs`: the key manager, for `KeyStore` (`keys/`);
//! - `limiter.rs`: rates, the limiter and its GCRA, for `RateLimit` (`rate/`);
//! - `ip.rs`: the IP matcher, for `IPPolicy` (`ip/`);
//! - `audit.rs`: the audit writer and its sinks, for `AuditLog` and its backends (`audit/`);
//! - `scan.rs`: reading written audit logs (the `audit` CLI, `AuditLog.query`, the HTTP
//!   backend's spool);
//! - `tokens.rs`: token-format helpers for the CLI and the admin routes;
//! - `usage.rs`: the usage book, for `Usage` (`usage.py`);
//! - `json.rs`: Python values <-> JSON, shared by the others.
//!
//! Where PyO3 is used: only in code compiled with the `python` feature, namely this
//! folder, `src/errors.rs` (the one conversion point from the core's typed errors to the
//! Python exception tree, and the registration of that tree) and `src/pystore.rs` (a
//! `KeyBackend` implemented by a Python object: the PostgreSQL and Redis key stores).
//! The domain modules (`audit`, `hashing`, `ipmatch`, `keystore`, `limiter`, `tokens`,
//! `sqlite_wal`) never name PyO3, so plain `cargo test` builds and tests them without an
//! interpreter.
//!
//! Microsecond paths (cache hit, bucket check, IP check, audit enqueue) stay attached
//! to the interpreter; anything that can wait (argon2id, SQLite, flushes) runs inside
//! `py.detach` with no Python object in hand.

mod audit;
mod ip;
mod json;
mod keys;
mod limiter;
mod scan;
mod tokens;
mod usage;

use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::audit::Status;
use crate::errors;

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    m.add_function(wrap_pyfunction!(tokens::token_key_id, m)?)?;
    m.add_function(wrap_pyfunction!(scan::audit_scan, m)?)?;
    m.add_class::<audit::PyJsonText>()?;
    m.add_function(wrap_pyfunction!(audit::mask_tokens, m)?)?;
    m.add(
        "AUDIT_STATUSES",
        PyTuple::new(m.py(), Status::ALL.iter().map(|s| s.as_str()))?,
    )?;
    m.add_function(wrap_pyfunction!(tokens::looks_like_guard_token, m)?)?;
    m.add_function(wrap_pyfunction!(limiter::py_parse_rate, m)?)?;
    m.add_class::<limiter::PyRate>()?;
    m.add_class::<limiter::PyRefusal>()?;
    m.add_class::<limiter::PyGcra>()?;
    m.add_class::<limiter::PyLimiter>()?;
    m.add_class::<limiter::PyVerdict>()?;
    m.add_function(wrap_pyfunction!(limiter::args_hash, m)?)?;
    m.add_function(wrap_pyfunction!(limiter::check_cost, m)?)?;
    m.add("MAX_COST", limiter::MAX_COST)?;
    m.add_class::<ip::PyIpMatcher>()?;
    m.add_class::<keys::PyIdentity>()?;
    m.add_class::<keys::PyKeyInfo>()?;
    m.add_class::<keys::PyKeyManager>()?;
    m.add_class::<keys::PyVerifyLimits>()?;
    m.add_class::<keys::PyCreditLease>()?;
    m.add_function(wrap_pyfunction!(keys::parse_refill, m)?)?;
    m.add_class::<audit::PyAuditWriter>()?;
    m.add_class::<audit::PyAuditSink>()?;
    m.add_function(wrap_pyfunction!(scan::audit_query, m)?)?;
    m.add_function(wrap_pyfunction!(scan::audit_verify, m)?)?;
    m.add_function(wrap_pyfunction!(scan::audit_log_files, m)?)?;
    m.add_function(wrap_pyfunction!(scan::audit_spool_read, m)?)?;
    m.add_class::<usage::PyUsageBook>()?;
    Ok(())
}
