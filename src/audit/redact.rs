//! Redaction of audit fields by key path: `redact=["password", "*.token", "headers.authorization"]`.
//!
//! A pattern names keys of `input_args` (and of `metadata`) by dotted path,
//! from the top of that value:
//! - a bare name (`password`, no dot) matches that key at **any depth**;
//! - a dotted path (`headers.authorization`) matches from the top only, one
//!   key per segment;
//! - `*` as a segment matches any one key (`*.token`: `token` inside any
//!   top-level key; `headers.*`: every key under `headers`);
//! - lists are transparent: the items of a list sit at the list's own path
//!   (`users.password` reaches `{"users": [{"password": ...}]}`);
//! - keys compare ASCII case-insensitively (`Authorization` = `authorization`).
//!
//! A matching key keeps its name; its value, whatever it is (a whole object
//! included), becomes the string [`REDACTED`]. The JSONL writer applies this
//! while rendering the line from the Python objects; the `SQLite` sink to the
//! event's values ([`Redactor::redact_value`]); no pattern, no cost.

use serde_json::Value;

use super::AuditError;

/// What a redacted value is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Most dotted patterns in one set (a bit each in [`Cursor`]).
pub const MAX_PATTERNS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Any,
    Key(String),
}

impl Seg {
    fn matches(&self, key: &str) -> bool {
        match self {
            Seg::Any => true,
            Seg::Key(k) => k.eq_ignore_ascii_case(key),
        }
    }
}

/// A compiled set of redaction patterns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redactor {
    /// Dotted patterns, anchored at the top.
    paths: Vec<Vec<Seg>>,
    /// Bare names, matched at any depth (`*` alone: every key).
    names: Vec<Seg>,
    patterns: Vec<String>,
}

/// Where a walk is in the tree: which dotted patterns still match the path so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    alive: u64,
    depth: usize,
}

/// What to do with the value of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Replace the value with [`REDACTED`].
    Redact,
    /// Keep the value; walk into it with this cursor.
    Keep(Cursor),
}

impl Redactor {
    /// Compiles `patterns`.
    ///
    /// # Errors
    /// [`AuditError::InvalidRedactPattern`] for an empty pattern or segment
    /// (`""`, `a..b`, `.a`), a segment that mixes `*` with other characters,
    /// or more than [`MAX_PATTERNS`] dotted patterns.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Redactor, AuditError> {
        let mut r = Redactor::default();
        for p in patterns {
            let p = p.as_ref();
            let bad = |reason| AuditError::InvalidRedactPattern {
                pattern: p.to_owned(),
                reason,
            };
            let text = p.trim();
            if text.is_empty() {
                return Err(bad("empty pattern; write a key name such as \"password\""));
            }
            let mut segs = Vec::new();
            for seg in text.split('.') {
                if seg.is_empty() {
                    return Err(bad(
                        "empty segment; write key names separated by single dots, e.g. \
                         \"headers.authorization\"",
                    ));
                }
                if seg == "*" {
                    segs.push(Seg::Any);
                } else if seg.contains('*') {
                    return Err(bad(
                        "'*' stands for one whole key, not part of a name; write \"*.token\", \
                         not \"tok*\"",
                    ));
                } else {
                    segs.push(Seg::Key(seg.to_owned()));
                }
            }
            if segs.len() == 1 {
                r.names.extend(segs);
            } else {
                if r.paths.len() == MAX_PATTERNS {
                    return Err(bad("too many dotted patterns (at most 64)"));
                }
                r.paths.push(segs);
            }
            r.patterns.push(text.to_owned());
        }
        Ok(r)
    }

    /// Whether no pattern is set (nothing is ever redacted).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty() && self.names.is_empty()
    }

    /// The patterns, as given (trimmed).
    #[must_use]
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// The cursor at the top of a value (`input_args` or `metadata`).
    #[must_use]
    pub fn root(&self) -> Cursor {
        let alive = if self.paths.len() == 64 {
            u64::MAX
        } else {
            (1u64 << self.paths.len()) - 1
        };
        Cursor { alive, depth: 0 }
    }

    /// Whether nothing below `at` can be redacted (the walk may stop).
    #[must_use]
    pub fn inert(&self, at: Cursor) -> bool {
        at.alive == 0 && self.names.is_empty()
    }

    /// The decision for key `key` of an object at `at`.
    #[must_use]
    pub fn step(&self, at: Cursor, key: &str) -> Step {
        if self.names.iter().any(|n| n.matches(key)) {
            return Step::Redact;
        }
        let mut alive = 0u64;
        let mut bits = at.alive;
        while bits != 0 {
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let path = &self.paths[i];
            if path.get(at.depth).is_some_and(|s| s.matches(key)) {
                if at.depth + 1 == path.len() {
                    return Step::Redact;
                }
                alive |= 1 << i;
            }
        }
        Step::Keep(Cursor {
            alive,
            depth: at.depth + 1,
        })
    }

    /// Redacts `v` in place (a `serde_json` value: the `SQLite` events path).
    pub fn redact_value(&self, v: &mut Value) {
        if !self.is_empty() {
            self.walk(v, self.root());
        }
    }

    fn walk(&self, v: &mut Value, at: Cursor) {
        match v {
            Value::Object(map) => {
                for (k, child) in map.iter_mut() {
                    match self.step(at, k) {
                        Step::Redact => *child = Value::String(REDACTED.to_owned()),
                        Step::Keep(next) if !self.inert(next) => self.walk(child, next),
                        Step::Keep(_) => {}
                    }
                }
            }
            Value::Array(items) => {
                for item in items {
                    self.walk(item, at);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing unwrap is a failing test")]
mod tests {
    use super::*;
    use serde_json::json;

    fn redact(patterns: &[&str], mut v: Value) -> Value {
        Redactor::new(patterns).unwrap().redact_value(&mut v);
        v
    }

    #[test]
    fn bare_names_match_at_any_depth_and_through_lists() {
        let v = redact(
            &["password"],
            json!({"password": "a", "user": {"name": "x", "Password": {"deep": 1}},
                   "list": [{"password": "b"}, [{"password": "c", "k": 2}]], "n": 3}),
        );
        assert_eq!(
            v,
            json!({"password": "[redacted]", "user": {"name": "x", "Password": "[redacted]"},
                   "list": [{"password": "[redacted]"}, [{"password": "[redacted]", "k": 2}]],
                   "n": 3})
        );
    }

    #[test]
    fn dotted_paths_are_anchored_and_star_is_one_key() {
        let input = json!({
            "token": "top",
            "a": {"token": "one", "b": {"token": "two"}},
            "headers": {"authorization": "Bearer x", "accept": "json"},
            "users": [{"token": "in list"}],
        });
        let v = redact(&["*.token", "headers.Authorization"], input);
        assert_eq!(v["token"], "top", "*.token needs one key above");
        assert_eq!(v["a"]["token"], "[redacted]");
        assert_eq!(v["a"]["b"]["token"], "two", "anchored: not two levels down");
        assert_eq!(
            v["users"][0]["token"], "[redacted]",
            "lists are transparent"
        );
        assert_eq!(v["headers"]["authorization"], "[redacted]");
        assert_eq!(v["headers"]["accept"], "json");
        let v = redact(
            &["headers.*"],
            json!({"headers": {"a": 1, "b": [2]}, "c": 3}),
        );
        assert_eq!(
            v,
            json!({"headers": {"a": "[redacted]", "b": "[redacted]"}, "c": 3})
        );
    }

    #[test]
    fn scalars_and_empty_sets_are_untouched() {
        assert_eq!(redact(&["x"], json!("x")), json!("x"));
        assert_eq!(redact(&[], json!({"password": 1})), json!({"password": 1}));
        assert!(Redactor::new::<&str>(&[]).unwrap().is_empty());
    }

    #[test]
    fn bad_patterns_say_what_to_write() {
        for (p, hint) in [
            ("", "empty pattern"),
            ("a..b", "empty segment"),
            (".a", "empty segment"),
            ("tok*", "one whole key"),
        ] {
            let err = Redactor::new(&[p]).unwrap_err().to_string();
            assert!(
                err.contains(hint) && err.contains(&format!("{p:?}")),
                "{err}"
            );
        }
        let many: Vec<String> = (0..65).map(|i| format!("a.k{i}")).collect();
        assert!(Redactor::new(&many)
            .unwrap_err()
            .to_string()
            .contains("at most 64"));
        let max: Vec<String> = (0..64).map(|i| format!("a.k{i}")).collect();
        let r = Redactor::new(&max).unwrap();
        let mut v = json!({"a": {"k63": 1, "k0": 2, "z": 3}});
        r.redact_value(&mut v);
        assert_eq!(
            v,
            json!({"a": {"k63": "[redacted]", "k0": "[redacted]", "z": 3}})
        );
    }
}
