//! A [`KeyBackend`] implemented by a Python object: how the fleet stores (PostgreSQL
//! through psycopg, Redis through redis-py) plug in under the core's [`KeyManager`],
//! which keeps everything else: argon2id, the verified-token cache, the failure
//! throttle, lifecycle rules, batched `last_used_at`, and the change watcher.
//!
//! The Python object provides (records are dicts, times are Unix milliseconds):
//!
//! ```text
//! name: str                                   # for messages (password masked)
//! insert(record) -> int                       # the new record's revision
//! get(key_id) -> dict | None
//! list(include_revoked) -> list[dict]
//! update(record) -> int | None                # None: revision changed or record gone
//! rotate(old, new) -> tuple[int, int] | None  # atomic update(old) + insert(new)
//! touch_many([(key_id, at_ms, ip | None)]) -> None
//! current_revision() -> int
//! changed_since(revision) -> tuple[int, list[tuple[str, int]]]
//! # credits (optional: a store without them refuses keys with credits)
//! lease_credits(key_id, want, bounds) -> dict | None   # bounds: now_ms, day_start_ms,
//!                                                      # day_next_ms, month_start_ms,
//!                                                      # month_next_ms; None: no credits
//! return_credits(key_id, n, epoch) -> bool
//! write_credits(key_id, expected, new) -> int | None   # expected/new: credit dicts or None
//! ```
//!
//! A record's `credits` is `None` or a dict: `balance`, `refill` (`"N/day"`, `"N/month"`
//! or `None`), `shadow`, `base`, `refilled_at`, `refill_at` (ms or `None`), `epoch`. A
//! lease is a dict: `granted`, `balance_after`, `refill_at`, `epoch`, `base`, `shadow`.
//! `write_credits` compares `balance` and `epoch` (or absence) with `expected`, writes
//! `new` with a new revision and announces the change; `None` if they differ.
//!
//! Calls come from any thread (request workers, the `fmg-keys` thread); each attaches
//! to the interpreter for the call. A Python exception becomes [`KeyError::Backend`].

use chrono::{DateTime, TimeZone, Utc};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use serde_json::{Map, Value};

use crate::keystore::{
    Change, CreditLease, Credits, KeyBackend, KeyError, KeyRecord, KeyStatus, PeriodBounds, Refill,
    Touch,
};

/// The Python store object, called with the interpreter attached.
pub struct PyKeyBackend {
    obj: Py<PyAny>,
    name: String,
}

impl PyKeyBackend {
    /// Wraps `obj` (see the module docs for the methods it must have).
    ///
    /// # Errors
    /// `ArgumentTypeError` (a `TypeError`) naming the first missing method.
    pub fn new(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        for method in [
            "insert",
            "get",
            "list",
            "update",
            "rotate",
            "touch_many",
            "current_revision",
            "changed_since",
        ] {
            if !obj.hasattr(method)? {
                return Err(crate::errors::wrong_type(format!(
                    "a key store backend needs a {method}() method; {} has none",
                    obj.get_type().name()?
                )));
            }
        }
        let name = match obj.getattr("name") {
            Ok(n) => n.str()?.to_string(),
            Err(_) => obj.get_type().name()?.to_string(),
        };
        Ok(PyKeyBackend {
            obj: obj.clone().unbind(),
            name,
        })
    }

    fn err(&self, reason: impl Into<String>) -> KeyError {
        KeyError::Backend {
            store: self.name.clone(),
            reason: reason.into(),
        }
    }

    /// Calls `method(*args)` and converts the result with `convert`.
    fn call<T>(
        &self,
        method: &str,
        args: impl FnOnce(Python<'_>) -> PyResult<Bound<'_, PyTuple>>,
        convert: impl FnOnce(&Bound<'_, PyAny>) -> Result<T, String>,
    ) -> Result<T, KeyError> {
        // The background thread may still poll while the interpreter shuts down: then
        // this is an error for the caller, not a panic.
        Python::try_attach(|py| {
            let args = args(py).map_err(|e| self.err(e.to_string()))?;
            let out = self
                .obj
                .bind(py)
                .call_method1(method, args)
                .map_err(|e| self.err(format!("{method}() failed: {e}")))?;
            convert(&out).map_err(|why| self.err(format!("{method}() returned {why}")))
        })
        .unwrap_or_else(|| Err(self.err("the Python interpreter is shutting down")))
    }
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn opt_ms(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(ms)
}

/// `record` as the dict the Python store keeps.
fn record_to_py<'py>(py: Python<'py>, r: &KeyRecord) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("id", &r.id)?;
    d.set_item("name", &r.name)?;
    d.set_item("phc_hash", &r.phc_hash)?;
    d.set_item("scopes", &r.scopes)?;
    d.set_item(
        "metadata",
        serde_json::to_string(&r.metadata).unwrap_or_else(|_| "{}".to_owned()),
    )?;
    d.set_item("status", r.status.as_str())?;
    d.set_item("created_at", ms(r.created_at))?;
    d.set_item("expires_at", opt_ms(r.expires_at))?;
    d.set_item("last_used_at", opt_ms(r.last_used_at))?;
    d.set_item("last_used_ip", r.last_used_ip.as_deref())?;
    d.set_item("grace_until", opt_ms(r.grace_until))?;
    d.set_item("rotated_from", r.rotated_from.as_deref())?;
    d.set_item("rotated_to", r.rotated_to.as_deref())?;
    d.set_item("revoked_at", opt_ms(r.revoked_at))?;
    d.set_item("revision", r.revision)?;
    d.set_item("legacy_selector", r.legacy_selector.as_deref())?;
    d.set_item("credits", credits_to_py(py, r.credits.as_ref())?)?;
    Ok(d)
}

/// Credits as the dict the Python store keeps (`None`: no credits).
fn credits_to_py<'py>(py: Python<'py>, c: Option<&Credits>) -> PyResult<Bound<'py, PyAny>> {
    let Some(c) = c else {
        return Ok(py.None().into_bound(py));
    };
    let d = PyDict::new(py);
    d.set_item("balance", c.balance)?;
    d.set_item("refill", c.refill.map(|r| r.canonical()))?;
    d.set_item("shadow", c.shadow)?;
    d.set_item("base", c.base)?;
    d.set_item("refilled_at", ms(c.refilled_at))?;
    d.set_item("refill_at", opt_ms(c.refill_at))?;
    d.set_item("epoch", c.epoch)?;
    Ok(d.into_any())
}

/// Credits from the dict the Python store returned (`None` or absent: no credits).
fn credits_from_py(obj: Option<Bound<'_, PyAny>>) -> Result<Option<Credits>, String> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(None);
    };
    let d = obj
        .cast::<PyDict>()
        .map_err(|_| format!("credits as a {} instead of a dict", type_name(&obj)))?;
    let refill: Option<String> = extract(d, "refill")?;
    let refill = refill
        .as_deref()
        .map(Refill::parse)
        .transpose()
        .map_err(|e| format!("a record whose credits are invalid ({e})"))?;
    Ok(Some(Credits {
        balance: extract(d, "balance")?,
        refill,
        shadow: extract(d, "shadow")?,
        base: extract(d, "base")?,
        refilled_at: time(extract(d, "refilled_at")?, "refilled_at")?.unwrap_or_default(),
        refill_at: time(extract(d, "refill_at")?, "refill_at")?,
        epoch: extract(d, "epoch")?,
    }))
}

fn lease_from_py(out: &Bound<'_, PyAny>) -> Result<Option<CreditLease>, String> {
    if out.is_none() {
        return Ok(None);
    }
    let d = out
        .cast::<PyDict>()
        .map_err(|_| format!("a {} instead of a lease dict", type_name(out)))?;
    Ok(Some(CreditLease {
        granted: extract(d, "granted")?,
        balance_after: extract(d, "balance_after")?,
        refill_at: time(extract(d, "refill_at")?, "refill_at")?,
        epoch: extract(d, "epoch")?,
        base: extract(d, "base")?,
        shadow: extract(d, "shadow")?,
    }))
}

fn field<'py>(d: &Bound<'py, PyDict>, name: &str) -> Result<Bound<'py, PyAny>, String> {
    d.get_item(name)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("a record without {name:?}"))
}

fn extract<'py, T: pyo3::conversion::FromPyObjectOwned<'py>>(
    d: &Bound<'py, PyDict>,
    name: &str,
) -> Result<T, String> {
    field(d, name)?.extract::<T>().map_err(|e| {
        format!(
            "a record whose {name:?} is invalid ({})",
            Into::<PyErr>::into(e)
        )
    })
}

fn time(ms: Option<i64>, name: &str) -> Result<Option<DateTime<Utc>>, String> {
    ms.map(|v| {
        Utc.timestamp_millis_opt(v)
            .single()
            .ok_or_else(|| format!("a record whose {name:?} is out of range ({v})"))
    })
    .transpose()
}

/// A record from the dict the Python store returned.
fn record_from_py(obj: &Bound<'_, PyAny>) -> Result<KeyRecord, String> {
    let d = obj
        .cast::<PyDict>()
        .map_err(|_| format!("a {} instead of a dict", type_name(obj)))?;
    let status: String = extract(d, "status")?;
    let metadata_text: String = extract(d, "metadata")?;
    let metadata: Map<String, Value> = serde_json::from_str(&metadata_text)
        .map_err(|e| format!("a record whose metadata is not a JSON object ({e})"))?;
    let created: i64 = extract(d, "created_at")?;
    Ok(KeyRecord {
        id: extract(d, "id")?,
        name: extract(d, "name")?,
        phc_hash: extract(d, "phc_hash")?,
        scopes: extract(d, "scopes")?,
        metadata,
        status: KeyStatus::parse(&status)
            .ok_or_else(|| format!("a record with unknown status {status:?}"))?,
        created_at: time(Some(created), "created_at")?.unwrap_or_default(),
        expires_at: time(extract(d, "expires_at")?, "expires_at")?,
        last_used_at: time(extract(d, "last_used_at")?, "last_used_at")?,
        last_used_ip: extract(d, "last_used_ip")?,
        grace_until: time(extract(d, "grace_until")?, "grace_until")?,
        rotated_from: extract(d, "rotated_from")?,
        rotated_to: extract(d, "rotated_to")?,
        revoked_at: time(extract(d, "revoked_at")?, "revoked_at")?,
        revision: extract(d, "revision")?,
        legacy_selector: extract(d, "legacy_selector")?,
        credits: credits_from_py(d.get_item("credits").map_err(|e| e.to_string())?)?,
    })
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map_or_else(|_| "?".to_owned(), |n| n.to_string())
}

fn revision(out: &Bound<'_, PyAny>) -> Result<u64, String> {
    out.extract::<u64>()
        .map_err(|_| format!("{} instead of a revision (int >= 0)", type_name(out)))
}

impl KeyBackend for PyKeyBackend {
    fn insert(&self, record: &KeyRecord) -> Result<u64, KeyError> {
        if record.credits.is_some() {
            // A store that cannot keep credits must not make a limited key unlimited.
            self.check_credit_support("write_credits")?;
        }
        self.call(
            "insert",
            |py| PyTuple::new(py, [record_to_py(py, record)?]),
            revision,
        )
    }

    fn get(&self, id: &str) -> Result<Option<KeyRecord>, KeyError> {
        self.call(
            "get",
            |py| PyTuple::new(py, [id]),
            |out| {
                if out.is_none() {
                    Ok(None)
                } else {
                    record_from_py(out).map(Some)
                }
            },
        )
    }

    fn list(&self, include_revoked: bool) -> Result<Vec<KeyRecord>, KeyError> {
        self.call(
            "list",
            |py| PyTuple::new(py, [include_revoked]),
            |out| {
                let items = out
                    .cast::<PyList>()
                    .map_err(|_| format!("a {} instead of a list", type_name(out)))?;
                items.iter().map(|r| record_from_py(&r)).collect()
            },
        )
    }

    fn update(&self, record: &KeyRecord) -> Result<u64, KeyError> {
        let out = self.call(
            "update",
            |py| PyTuple::new(py, [record_to_py(py, record)?]),
            |out| {
                if out.is_none() {
                    Ok(None)
                } else {
                    revision(out).map(Some)
                }
            },
        )?;
        match out {
            Some(rev) => Ok(rev),
            None => Err(self.missing_or_conflict(&record.id)),
        }
    }

    fn rotate(&self, old: &KeyRecord, new: &KeyRecord) -> Result<(u64, u64), KeyError> {
        let out = self.call(
            "rotate",
            |py| PyTuple::new(py, [record_to_py(py, old)?, record_to_py(py, new)?]),
            |out| {
                if out.is_none() {
                    return Ok(None);
                }
                let (a, b): (u64, u64) = out
                    .extract()
                    .map_err(|_| format!("{} instead of (int, int)", type_name(out)))?;
                Ok(Some((a, b)))
            },
        )?;
        out.ok_or_else(|| self.missing_or_conflict(&old.id))
    }

    fn touch_many(&self, touches: &[Touch]) -> Result<(), KeyError> {
        self.call(
            "touch_many",
            |py| {
                let items = touches
                    .iter()
                    .map(|t| (t.id.as_str(), ms(t.at), t.ip.as_deref()).into_pyobject(py))
                    .collect::<PyResult<Vec<_>>>()?;
                PyTuple::new(py, [PyList::new(py, items)?])
            },
            |_| Ok(()),
        )
    }

    fn lease_credits(
        &self,
        id: &str,
        want: u64,
        now: DateTime<Utc>,
    ) -> Result<Option<CreditLease>, KeyError> {
        self.check_credit_support("lease_credits")?;
        let b = PeriodBounds::at(now);
        self.call(
            "lease_credits",
            |py| {
                let bounds = PyDict::new(py);
                bounds.set_item("now_ms", ms(b.now))?;
                bounds.set_item("day_start_ms", ms(b.day_start))?;
                bounds.set_item("day_next_ms", ms(b.day_next))?;
                bounds.set_item("month_start_ms", ms(b.month_start))?;
                bounds.set_item("month_next_ms", ms(b.month_next))?;
                (id, want, bounds).into_pyobject(py)
            },
            lease_from_py,
        )?
        .map_or_else(
            || {
                // `None`: no credits, or no such key.
                match self.get(id)? {
                    None => Err(KeyError::NotFound { id: id.to_owned() }),
                    Some(_) => Ok(None),
                }
            },
            |lease| Ok(Some(lease)),
        )
    }

    fn return_credits(&self, id: &str, n: u64, epoch: u64) -> Result<bool, KeyError> {
        self.check_credit_support("return_credits")?;
        self.call(
            "return_credits",
            |py| (id, n, epoch).into_pyobject(py),
            |out| {
                out.extract::<bool>()
                    .map_err(|_| format!("{} instead of a bool", type_name(out)))
            },
        )
    }

    fn write_credits(
        &self,
        id: &str,
        expected: Option<&Credits>,
        new: Option<&Credits>,
    ) -> Result<Option<u64>, KeyError> {
        self.check_credit_support("write_credits")?;
        let out = self.call(
            "write_credits",
            |py| (id, credits_to_py(py, expected)?, credits_to_py(py, new)?).into_pyobject(py),
            |out| {
                if out.is_none() {
                    Ok(None)
                } else {
                    revision(out).map(Some)
                }
            },
        )?;
        if out.is_none() && self.get(id)?.is_none() {
            return Err(KeyError::NotFound { id: id.to_owned() });
        }
        Ok(out)
    }

    fn current_revision(&self) -> Result<u64, KeyError> {
        self.call("current_revision", |py| Ok(PyTuple::empty(py)), revision)
    }

    fn changed_since(&self, rev: u64) -> Result<(u64, Vec<Change>), KeyError> {
        self.call(
            "changed_since",
            |py| PyTuple::new(py, [rev]),
            |out| {
                let (next, changes): (u64, Vec<(String, u64)>) = out.extract().map_err(|_| {
                    format!("{} instead of (int, [(key_id, revision)])", type_name(out))
                })?;
                Ok((
                    next,
                    changes
                        .into_iter()
                        .map(|(id, revision)| Change { id, revision })
                        .collect(),
                ))
            },
        )
    }
}

impl PyKeyBackend {
    /// `KeyError::InvalidInput` if the store has no credit methods.
    fn check_credit_support(&self, method: &str) -> Result<(), KeyError> {
        let has = Python::try_attach(|py| self.obj.bind(py).hasattr(method).unwrap_or(false))
            .unwrap_or(false);
        if has {
            Ok(())
        } else {
            Err(KeyError::InvalidInput {
                field: "credits",
                reason: format!(
                    "key store {} has no {method}() method, so it cannot keep credits; use \
                     the memory, sqlite, postgres or redis store",
                    self.name
                ),
            })
        }
    }

    /// After an `update` / `rotate` refused by revision: the record is gone, or changed.
    fn missing_or_conflict(&self, id: &str) -> KeyError {
        match self.get(id) {
            Ok(None) => KeyError::NotFound { id: id.to_owned() },
            Ok(Some(_)) => KeyError::Conflict { id: id.to_owned() },
            Err(e) => e,
        }
    }
}
