//! Checks of caller input to the key service: key names, scopes, and ids given by a caller
//! (echoed in errors only when they cannot be a token).

use crate::tokens;

use super::KeyError;

/// An id given by a caller, safe to echo in an error (never a token).
pub(super) fn echo_id(input: &str) -> String {
    if tokens::looks_like_guard_token(input.trim()) || input.chars().count() > 64 {
        "<the given token or value>".to_owned()
    } else {
        input.to_owned()
    }
}

pub(super) fn resolve_id(input: &str) -> Result<String, KeyError> {
    tokens::key_id_from_public_part(input).ok_or_else(|| KeyError::NotFound { id: echo_id(input) })
}

const MAX_NAME_CHARS: usize = 200;

const MAX_SCOPE_CHARS: usize = 200;

pub(super) fn validate_name(name: &str) -> Result<String, KeyError> {
    let trimmed = name.trim();
    let invalid = |reason: String| KeyError::InvalidInput {
        field: "name",
        reason,
    };
    if trimmed.is_empty() {
        return Err(invalid("is empty; give the key a name".to_owned()));
    }
    let chars = trimmed.chars().count();
    if chars > MAX_NAME_CHARS {
        return Err(invalid(format!(
            "is {chars} characters long; use at most {MAX_NAME_CHARS}"
        )));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(invalid(
            "contains control characters (such as a newline); use plain text".to_owned(),
        ));
    }
    Ok(trimmed.to_owned())
}

pub(super) fn validate_scopes(scopes: &[String]) -> Result<Vec<String>, KeyError> {
    let mut out: Vec<String> = Vec::with_capacity(scopes.len());
    for scope in scopes {
        let invalid = |reason: String| KeyError::InvalidInput {
            field: "scopes",
            reason,
        };
        if scope.is_empty() {
            return Err(invalid("contains an empty scope; remove it".to_owned()));
        }
        if scope.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid(format!(
                "scope {scope:?} contains whitespace; scopes are single words such as `read` \
                 or `tools:write`"
            )));
        }
        if scope.chars().count() > MAX_SCOPE_CHARS {
            return Err(invalid(format!(
                "a scope is longer than {MAX_SCOPE_CHARS} characters"
            )));
        }
        if !out.contains(scope) {
            out.push(scope.clone());
        }
    }
    Ok(out)
}

/// Milliseconds a grace period may not reach (2^63: past it an `i64` overflows).
const GRACE_MS_LIMIT: f64 = 9_223_372_036_854_775_808.0;

/// The rotation grace period given as a number of seconds (what the bindings take), to
/// the millisecond. 0 revokes the old key at once.
///
/// # Errors
/// [`KeyError::InvalidInput`] (field `grace`) for a negative or non-finite number, or
/// one too large to be a duration.
pub fn grace_from_secs(secs: f64) -> Result<chrono::Duration, KeyError> {
    let invalid = |reason: String| KeyError::InvalidInput {
        field: "grace",
        reason,
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(invalid(format!(
            "must be a number of seconds >= 0 (0 revokes the old key at once), got {secs}"
        )));
    }
    let too_long = || invalid(format!("is too long ({secs} seconds)"));
    let ms = (secs * 1000.0).round();
    if ms >= GRACE_MS_LIMIT {
        return Err(too_long());
    }
    #[allow(
        clippy::cast_possible_truncation,
        reason = "0 <= ms < 2^63, checked above"
    )]
    chrono::Duration::try_milliseconds(ms as i64).ok_or_else(too_long)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::keystore::testing::*;
    use crate::keystore::{KeyManager, KeyRecord};
    use chrono::Utc;
    use serde_json::Map;

    #[test]
    fn a_grace_period_in_seconds_is_checked_and_kept_to_the_millisecond() {
        assert_eq!(grace_from_secs(0.0).unwrap(), chrono::Duration::zero());
        assert_eq!(grace_from_secs(-0.0).unwrap(), chrono::Duration::zero());
        assert_eq!(
            grace_from_secs(86_400.0).unwrap(),
            chrono::Duration::days(1)
        );
        assert_eq!(
            grace_from_secs(1.2345).unwrap(),
            chrono::Duration::milliseconds(1235)
        );
        let refused = |secs: f64| match grace_from_secs(secs) {
            Err(KeyError::InvalidInput { field, reason }) => {
                assert_eq!(field, "grace");
                reason
            }
            other => panic!("{secs}: expected InvalidInput, got {other:?}"),
        };
        for bad in [-1.0, -0.001, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(refused(bad).contains(">= 0"), "{bad}");
        }
        for huge in [9.3e15, 1e300, f64::MAX] {
            assert!(refused(huge).contains("too long"), "{huge}");
        }
        // The largest period that converts still fails cleanly in `rotate` (too long to add
        // to now), never panics.
        let longest = grace_from_secs(9.2e15).unwrap();
        let m = KeyManager::memory(opts()).unwrap();
        let (rec, _) = m.create("a", &[], None, Map::new()).unwrap();
        match m.rotate(&rec.id, longest) {
            Err(KeyError::InvalidInput { field: "grace", .. }) => {}
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn create_validates_its_arguments() {
        let m = KeyManager::memory(opts()).unwrap();
        let field = |r: Result<(KeyRecord, String), KeyError>| match r {
            Err(KeyError::InvalidInput { field, reason }) => (field, reason),
            other => panic!("expected InvalidInput, got {other:?}"),
        };
        assert_eq!(field(m.create("  ", &[], None, Map::new())).0, "name");
        assert_eq!(
            field(m.create(&"x".repeat(201), &[], None, Map::new())).0,
            "name"
        );
        assert!(m.create(&"é".repeat(200), &[], None, Map::new()).is_ok());
        assert_eq!(field(m.create("a\nb", &[], None, Map::new())).0, "name");
        assert_eq!(
            field(m.create("a", &scopes(&[""]), None, Map::new())).0,
            "scopes"
        );
        let (f, reason) = field(m.create("a", &scopes(&["read write"]), None, Map::new()));
        assert_eq!(f, "scopes");
        assert!(reason.contains("read write"), "{reason}");
        let past = Utc::now() - chrono::Duration::seconds(1);
        assert_eq!(
            field(m.create("a", &[], Some(past), Map::new())).0,
            "expires_at"
        );
        assert_eq!(m.list(true).unwrap().len(), 1);
    }
}
