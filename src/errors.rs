//! The one conversion point from the core's typed errors to Python exceptions.
//!
//! Every exception derives from `GuardError`; most also extend the built-in that fits
//! (`ValueError` for bad input, `TypeError` for a wrong type, `KeyError` for an unknown
//! key, `OSError` for I/O), so code written for fastmcp-guard 0.2 that caught those keeps
//! working. A file the audit reader cannot read gets a class per kind under
//! `AuditReadError` (`AuditFileNotFoundError` is also a `FileNotFoundError`, and so on),
//! with `errno` set: `except FileNotFoundError` still catches it. The bindings
//! (`src/py/`) raise nothing else: a domain error converts here with `?`, and a refused
//! argument goes through [`invalid_argument`] / [`wrong_type`]. (`KeyboardInterrupt`, when
//! a scan's progress callback asks to stop, is a signal, not an error.) The classes are
//! made once at import with `type(name, bases, ns)`, since PyO3's `create_exception!`
//! cannot express two bases.

use pyo3::exceptions::{
    PyException, PyFileNotFoundError, PyIsADirectoryError, PyKeyError, PyKeyboardInterrupt,
    PyOSError, PyPermissionError, PyTypeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use std::io;

use crate::audit::scan::ScanError;
use crate::audit::AuditError;
use crate::ipmatch::IpError;
use crate::keystore::{KeyError, ThrottleScope, VerifyError};
use crate::limiter::RateError;
use crate::tokens::TokenError;

/// The exception classes, in the order `register` creates them.
#[derive(Clone, Copy)]
pub enum Exc {
    Guard,
    InvalidRate,
    InvalidIp,
    InvalidKeyInput,
    KeyNotFound,
    KeyRevoked,
    Store,
    AuditWrite,
    Verify,
    InvalidArgument,
    ArgumentType,
    AuditRead,
    AuditFileNotFound,
    AuditPermission,
    AuditIsADirectory,
}

const ALL: [(Exc, &str, &str); 15] = [
    (
        Exc::Guard,
        "GuardError",
        "Root of every error fastmcp-guard raises.",
    ),
    (
        Exc::InvalidRate,
        "InvalidRateError",
        "A rate string such as '10/minute' could not be parsed.",
    ),
    (
        Exc::InvalidIp,
        "InvalidIPError",
        "An allow / deny / trusted-proxy entry is not an address or CIDR.",
    ),
    (
        Exc::InvalidKeyInput,
        "InvalidKeyInputError",
        "A key name, scope, expiry or metadata value was refused.",
    ),
    (Exc::KeyNotFound, "KeyNotFoundError", "No key has that id."),
    (
        Exc::KeyRevoked,
        "KeyRevokedError",
        "The operation needs a key that is not revoked.",
    ),
    (
        Exc::Store,
        "StoreError",
        "The key store could not be opened, read or written.",
    ),
    (
        Exc::AuditWrite,
        "AuditWriteError",
        "The audit sink could not be opened or written.",
    ),
    (
        Exc::Verify,
        "VerifyError",
        "A token was refused: `reason` says why, `key_id` names the key the token claims \
         (None if malformed), `retry_after` (seconds) and `scope` (the failure budget: \
         'client', 'key', 'server' or 'unknown_keys') are set when `reason` is 'throttled'.",
    ),
    (
        Exc::InvalidArgument,
        "InvalidArgumentError",
        "An argument or option was refused (out of range, unknown name, malformed value).",
    ),
    (
        Exc::ArgumentType,
        "ArgumentTypeError",
        "An argument has the wrong type (for example a scope that is not a str).",
    ),
    (
        Exc::AuditRead,
        "AuditReadError",
        "An audit log file could not be read (export, query, verify, the HTTP backend's \
         spool); `errno` is set when the OS gave one.",
    ),
    (
        Exc::AuditFileNotFound,
        "AuditFileNotFoundError",
        "An audit log file does not exist (an AuditReadError and a FileNotFoundError).",
    ),
    (
        Exc::AuditPermission,
        "AuditPermissionError",
        "An audit log file may not be read by this user (an AuditReadError and a \
         PermissionError).",
    ),
    (
        Exc::AuditIsADirectory,
        "AuditIsADirectoryError",
        "An audit log path names a directory (an AuditReadError and an IsADirectoryError).",
    ),
];

static CLASSES: PyOnceLock<Vec<Py<PyType>>> = PyOnceLock::new();

fn build(py: Python<'_>) -> PyResult<Vec<Py<PyType>>> {
    fn make<'py>(
        py: Python<'py>,
        name: &str,
        doc: &str,
        bases: Bound<'py, PyTuple>,
        plain_str: bool,
    ) -> PyResult<Bound<'py, PyType>> {
        let ns = PyDict::new(py);
        ns.set_item("__module__", "fastmcp_guard._core")?;
        ns.set_item("__doc__", doc)?;
        if name == "VerifyError" {
            // Also set on each instance the core raises; these serve one made elsewhere.
            ns.set_item("key_id", py.None())?;
            ns.set_item("retry_after", py.None())?;
            ns.set_item("scope", py.None())?;
        }
        if plain_str {
            // KeyError's str() is the repr of its argument; keep the plain message.
            ns.set_item("__str__", py.get_type::<PyException>().getattr("__str__")?)?;
        }
        Ok(py
            .get_type::<PyType>()
            .call1((name, bases, ns))?
            .cast_into::<PyType>()?)
    }
    let (_, root_name, root_doc) = ALL[0];
    let root = make(
        py,
        root_name,
        root_doc,
        PyTuple::new(py, [py.get_type::<PyException>()])?,
        false,
    )?;
    let mut out: Vec<Py<PyType>> = vec![root.unbind()];
    for (exc, name, doc) in &ALL[1..] {
        // The class it derives from (built before it: `ALL` lists parents first), and the
        // built-in it also extends.
        let (parent, builtin) = match exc {
            Exc::InvalidRate
            | Exc::InvalidIp
            | Exc::InvalidKeyInput
            | Exc::KeyRevoked
            | Exc::InvalidArgument => (Exc::Guard, Some(py.get_type::<PyValueError>())),
            Exc::ArgumentType => (Exc::Guard, Some(py.get_type::<PyTypeError>())),
            Exc::KeyNotFound => (Exc::Guard, Some(py.get_type::<PyKeyError>())),
            Exc::Store | Exc::AuditWrite | Exc::AuditRead => {
                (Exc::Guard, Some(py.get_type::<PyOSError>()))
            }
            Exc::AuditFileNotFound => (Exc::AuditRead, Some(py.get_type::<PyFileNotFoundError>())),
            Exc::AuditPermission => (Exc::AuditRead, Some(py.get_type::<PyPermissionError>())),
            Exc::AuditIsADirectory => (Exc::AuditRead, Some(py.get_type::<PyIsADirectoryError>())),
            Exc::Guard | Exc::Verify => (Exc::Guard, None),
        };
        let parent = out
            .get(parent as usize)
            .map(|c| c.bind(py).clone())
            .ok_or_else(|| PyException::new_err("internal error: exception parent missing"))?;
        let bases = match builtin {
            Some(b) => PyTuple::new(py, [parent, b])?,
            None => PyTuple::new(py, [parent])?,
        };
        out.push(make(py, name, doc, bases, matches!(exc, Exc::KeyNotFound))?.unbind());
    }
    Ok(out)
}

/// Add every exception class to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let classes = CLASSES.get_or_try_init(py, || build(py))?;
    for ((_, name, _), cls) in ALL.iter().zip(classes) {
        m.add(*name, cls.bind(py))?;
    }
    Ok(())
}

fn class(py: Python<'_>, exc: Exc) -> PyResult<Bound<'_, PyType>> {
    let classes = CLASSES.get_or_try_init(py, || build(py))?;
    let idx = exc as usize;
    classes
        .get(idx)
        .map(|c| c.bind(py).clone())
        .ok_or_else(|| PyException::new_err("internal error: exception class missing"))
}

/// A Python exception of class `exc` carrying `msg`.
pub fn new_err(exc: Exc, msg: impl Into<String>) -> PyErr {
    let msg: String = msg.into();
    Python::attach(|py| match class(py, exc) {
        Ok(cls) => PyErr::from_type(cls, msg),
        Err(e) => e,
    })
}

/// `InvalidArgumentError(msg)` (a `GuardError` and a `ValueError`): an argument or option
/// was refused. The message says which and what to pass instead.
pub fn invalid_argument(msg: impl Into<String>) -> PyErr {
    new_err(Exc::InvalidArgument, msg)
}

/// `ArgumentTypeError(msg)` (a `GuardError` and a `TypeError`): an argument has the wrong
/// type. The message names the argument, the type expected and the type given.
pub fn wrong_type(msg: impl Into<String>) -> PyErr {
    new_err(Exc::ArgumentType, msg)
}

/// An exception of class `exc` (an `OSError` subclass) carrying `msg`, with `errno` set
/// when the OS gave one (its `str()` stays `msg`).
fn os_err(exc: Exc, msg: String, errno: Option<i32>) -> PyErr {
    Python::attach(|py| {
        let make = || -> PyResult<PyErr> {
            let inst = class(py, exc)?.call1((msg.as_str(),))?;
            if let Some(n) = errno {
                inst.setattr("errno", n)?;
            }
            Ok(PyErr::from_value(inst))
        };
        make().unwrap_or_else(|e| e)
    })
}

/// An audit file could not be read: `AuditFileNotFoundError`, `AuditPermissionError`,
/// `AuditIsADirectoryError` (so `except FileNotFoundError` and its siblings keep
/// working) or `AuditReadError`, by the kind of `source`, with its `errno`.
pub fn audit_read_error(source: &io::Error, msg: impl Into<String>) -> PyErr {
    let exc = match source.kind() {
        io::ErrorKind::NotFound => Exc::AuditFileNotFound,
        io::ErrorKind::PermissionDenied => Exc::AuditPermission,
        io::ErrorKind::IsADirectory => Exc::AuditIsADirectory,
        _ => Exc::AuditRead,
    };
    os_err(exc, msg.into(), source.raw_os_error())
}

/// `VerifyError(msg)` with its `reason`, `key_id` (the key id the token claims, public;
/// `None` for a malformed token) and `retry_after` (seconds, for `throttled`; else `None`).
pub fn verify_err(
    reason: &str,
    msg: impl Into<String>,
    key_id: Option<&str>,
    retry_after: Option<f64>,
) -> PyErr {
    verify_err_in(reason, msg.into(), key_id, retry_after, None)
}

/// [`verify_err`], with `scope`: the failure budget that refused a throttled token.
fn verify_err_in(
    reason: &str,
    msg: String,
    key_id: Option<&str>,
    retry_after: Option<f64>,
    scope: Option<&str>,
) -> PyErr {
    Python::attach(|py| {
        let make = || -> PyResult<PyErr> {
            let inst = class(py, Exc::Verify)?.call1((msg.as_str(),))?;
            inst.setattr("reason", reason)?;
            inst.setattr("key_id", key_id)?;
            inst.setattr("retry_after", retry_after)?;
            inst.setattr("scope", scope)?;
            Ok(PyErr::from_value(inst))
        };
        make().unwrap_or_else(|e| e)
    })
}

impl From<RateError> for PyErr {
    fn from(e: RateError) -> PyErr {
        new_err(Exc::InvalidRate, e.to_string())
    }
}

impl From<IpError> for PyErr {
    fn from(e: IpError) -> PyErr {
        new_err(Exc::InvalidIp, e.to_string())
    }
}

impl From<TokenError> for PyErr {
    fn from(e: TokenError) -> PyErr {
        verify_err("malformed", e.to_string(), None, None)
    }
}

impl From<AuditError> for PyErr {
    fn from(e: AuditError) -> PyErr {
        match &e {
            // A bad option, status or pattern is the caller's input, not an I/O failure.
            AuditError::InvalidOption { .. }
            | AuditError::InvalidStatus { .. }
            | AuditError::InvalidRedactPattern { .. } => invalid_argument(e.to_string()),
            AuditError::Read { source, .. } => audit_read_error(source, e.to_string()),
            _ => new_err(Exc::AuditWrite, e.to_string()),
        }
    }
}

impl From<ScanError> for PyErr {
    fn from(e: ScanError) -> PyErr {
        let msg = e.to_string();
        match &e {
            ScanError::Open { source, .. }
            | ScanError::Read { source, .. }
            | ScanError::List { source, .. } => audit_read_error(source, msg),
            ScanError::IsADirectory { .. } => {
                audit_read_error(&io::Error::from(io::ErrorKind::IsADirectory), msg)
            }
            ScanError::Create { source, .. } | ScanError::Write { source } => {
                os_err(Exc::AuditWrite, msg, source.raw_os_error())
            }
            // The progress callback asked to stop (Ctrl-C): not an error of ours.
            ScanError::Interrupted { .. } => PyKeyboardInterrupt::new_err(msg),
            ScanError::EmptyRange { .. } => invalid_argument(msg),
        }
    }
}

impl From<KeyError> for PyErr {
    fn from(e: KeyError) -> PyErr {
        let exc = match &e {
            KeyError::NotFound { .. } => Exc::KeyNotFound,
            KeyError::Revoked { .. } => Exc::KeyRevoked,
            KeyError::InvalidInput { .. } | KeyError::AlreadyRotated { .. } => Exc::InvalidKeyInput,
            _ => Exc::Store,
        };
        new_err(exc, e.to_string())
    }
}

impl From<VerifyError> for PyErr {
    fn from(e: VerifyError) -> PyErr {
        let reason = match &e {
            VerifyError::Malformed(_) => "malformed",
            VerifyError::UnknownKey { .. } => "unknown_key",
            VerifyError::BadSecret { .. } => "bad_secret",
            VerifyError::Revoked { .. } => "revoked",
            VerifyError::Expired { .. } => "expired",
            VerifyError::Throttled { .. } => "throttled",
            VerifyError::Busy { .. } => "busy",
            VerifyError::Store { .. } => "store",
        };
        let retry_after = e.retry_after().map(|d| d.as_secs_f64());
        // An id refused by the unknown-id budget is not known to exist: attacker-chosen,
        // it must not name anything (nor split the audit's refusal groups).
        let key_id = match &e {
            VerifyError::Throttled {
                scope: ThrottleScope::UnknownKeys,
                ..
            } => None,
            _ => e.key_id(),
        };
        let scope = match &e {
            VerifyError::Throttled { scope, .. } => Some(scope.as_str()),
            _ => None,
        };
        verify_err_in(reason, e.to_string(), key_id, retry_after, scope)
    }
}
