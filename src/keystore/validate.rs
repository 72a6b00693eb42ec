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

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::keystore::testing::*;
    use crate::keystore::{KeyManager, KeyRecord};
    use chrono::Utc;
    use serde_json::Map;

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
