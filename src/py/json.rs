//! Python values <-> JSON, shared by the other bindings (binds no facade itself):
//! [`json_to_py`] / [`map_to_py`] turn stored JSON into Python objects (key metadata in
//! `keys.rs`, audit records in `scan.rs`); [`py_to_json`] takes key metadata in,
//! refusing what JSON cannot hold; the `write_py_*` writers render Python objects
//! straight into the bytes of an audit line (`audit.rs`), never failing.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Value};

use crate::audit::redact::{Cursor, Step, REDACTED};
use crate::audit::{write_json_str, Redactor};

pub(super) fn json_to_py(py: Python<'_>, v: &Value) -> PyResult<Py<PyAny>> {
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

pub(super) fn map_to_py<'py>(
    py: Python<'py>,
    m: &Map<String, Value>,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in m {
        d.set_item(k, json_to_py(py, v)?)?;
    }
    Ok(d)
}

/// Appends `s` as a JSON string; a `str` that is not valid UTF-8 (lone surrogates)
/// is written with replacement characters rather than failing.
pub(super) fn write_py_str(buf: &mut Vec<u8>, s: &Bound<'_, PyString>) {
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
pub(super) fn write_py_json(buf: &mut Vec<u8>, obj: &Bound<'_, PyAny>, depth: u32) {
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
pub(super) fn write_py_json_redacted(
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
pub(super) fn write_py_key(buf: &mut Vec<u8>, k: &Bound<'_, PyAny>) {
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
pub(super) fn py_to_json(obj: &Bound<'_, PyAny>, depth: u32) -> PyResult<Value> {
    if depth > 64 {
        return Err(crate::errors::invalid_argument(
            "value nested deeper than 64 levels: flatten it (JSON depth is limited to 64)",
        ));
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
                    return Err(crate::errors::wrong_type(format!(
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
    Err(crate::errors::wrong_type(format!(
        "value of type {} is not JSON-serialisable (use str, int, float, bool, None, list, dict)",
        obj.get_type().name()?
    )))
}
