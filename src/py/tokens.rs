//! Bindings of the token format (`src/tokens.rs`): `token_key_id` and
//! `looks_like_guard_token`, the helpers the CLI (`cli/keys.py`, `cli/audit.py`,
//! `cli/rate.py`) and the admin routes (`admin.py`) use to name a key from what a user
//! typed.

use pyo3::prelude::*;

use crate::tokens;

/// The key id named by a key id, a bare public id or a token; `None` if none.
#[pyfunction]
pub(super) fn token_key_id(token_or_id: &str) -> Option<String> {
    tokens::key_id_from_public_part(token_or_id)
}

/// True when `token` starts with `fmg_sk_`.
#[pyfunction]
pub(super) fn looks_like_guard_token(token: &str) -> bool {
    tokens::looks_like_guard_token(token)
}
