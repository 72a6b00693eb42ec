//! The last line of defence against leaked tokens: every audit line, row and
//! attribute the core renders goes through [`mask_tokens`], which masks anything
//! shaped like a token wherever it sits (a value, a key, an error message, the
//! tool name, nested JSON text inside a string).
//!
//! A token is found by its prefix `fmg_sk_` ([`TOKEN_PREFIX`]). What follows it,
//! the longest run of token characters (`A-Z a-z 0-9 _ . -`: the alphabets of the
//! current format and of fastmcp-guard 0.2's), is replaced:
//!
//! - `fmg_sk_<16 base62>_<...>` (the current format, [`tokens`](crate::tokens)):
//!   `fmg_sk_<16 base62>_***`. The public part stays, so the line still says which
//!   key the token claimed (`fmg_key_<16 base62>`);
//! - `fmg_sk_<16 lowercase hex>.<...>` (0.2's format): `fmg_sk_<16 hex>.***`;
//! - anything else (a truncated token, two tokens glued together, a token
//!   followed by more token characters): `fmg_sk_***`.
//!
//! The whole run is masked, not only a token's exact length, so a token with
//! characters glued after it leaks nothing either. A bare `fmg_sk_` followed by
//! no token character (a space, a quote, the end of the text) is left alone.
//!
//! The search works on bytes. In rendered JSON a token's characters are never
//! escaped (none of them is a quote, a backslash or a control character), so a
//! token inside any string, at any depth of nesting or of JSON-in-a-string
//! escaping, appears in the line exactly as in the value, and the run it starts
//! never reaches past the string's closing quote: masking a rendered line keeps
//! it valid JSON. A value the caller encoded itself (base64, `\u` escapes
//! written into the text) is not a token in that field and is not recognised.
//!
//! Cost: one SIMD substring search per rendered line ([`memchr::memmem`]); only
//! a line that holds `fmg_sk_` is copied.

use std::borrow::Cow;
use std::sync::LazyLock;

use memchr::memmem::Finder;

use crate::tokens::{KID_LEN, LEGACY_SELECTOR_LEN, TOKEN_PREFIX};

/// What replaces the secret part of a token.
pub const MASK: &str = "***";

static FINDER: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(TOKEN_PREFIX.as_bytes()));

/// A byte of the current token alphabet (base62 and `_`) or of 0.2's
/// (`[A-Za-z0-9_-]` and the `.` separator).
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

/// How much of `run` (what follows `fmg_sk_`) is the public part, kept: the
/// 16-character key id and its separator when the run has the shape of a
/// current or a 0.2 token, else nothing.
fn public_len(run: &[u8]) -> usize {
    debug_assert_eq!(KID_LEN, LEGACY_SELECTOR_LEN);
    if run.len() <= KID_LEN {
        return 0;
    }
    let (kid, sep) = (&run[..KID_LEN], run[KID_LEN]);
    let current = sep == b'_' && kid.iter().all(u8::is_ascii_alphanumeric);
    let legacy = sep == b'.' && kid.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if current || legacy {
        KID_LEN + 1
    } else {
        0
    }
}

/// `text` with every token-shaped run masked (see the module docs), or `None`
/// when there is nothing to mask (the common case: one substring search).
#[must_use]
pub fn mask_tokens(text: &[u8]) -> Option<Vec<u8>> {
    let needle = TOKEN_PREFIX.len();
    let mut at = FINDER.find(text)?;
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    loop {
        let body = at + needle;
        let run_len = text[body..]
            .iter()
            .position(|&b| !is_token_byte(b))
            .unwrap_or(text.len() - body);
        let next_from = if run_len == 0 {
            body
        } else {
            let keep = public_len(&text[body..body + run_len]);
            let o = out.get_or_insert_with(|| Vec::with_capacity(text.len()));
            o.extend_from_slice(&text[copied..body + keep]);
            o.extend_from_slice(MASK.as_bytes());
            copied = body + run_len;
            copied
        };
        match FINDER.find(&text[next_from..]) {
            Some(i) => at = next_from + i,
            None => break,
        }
    }
    let mut o = out?;
    o.extend_from_slice(&text[copied..]);
    Some(o)
}

/// [`mask_tokens`] for text: borrowed unchanged when there is nothing to mask.
#[must_use]
pub fn mask_str(text: &str) -> Cow<'_, str> {
    match mask_tokens(text.as_bytes()) {
        None => Cow::Borrowed(text),
        // Only ASCII runs were replaced by ASCII: still UTF-8.
        Some(v) => Cow::Owned(
            String::from_utf8(v)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
        ),
    }
}

/// Masks the bytes of `buf` from `start` on, in place (a rendered line).
pub fn mask_tail(buf: &mut Vec<u8>, start: usize) {
    if let Some(masked) = mask_tokens(&buf[start..]) {
        buf.truncate(start);
        buf.extend_from_slice(&masked);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing unwrap is a failing test")]
mod tests {
    use super::*;
    use crate::tokens;

    fn masked(s: &str) -> String {
        mask_str(s).into_owned()
    }

    fn token() -> (String, String) {
        let (tok, key_id) = tokens::generate().unwrap();
        (tok, key_id["fmg_key_".len()..].to_owned())
    }

    const LEGACY: &str = "fmg_sk_0123456789abcdef.AbC-def_ghiJKLmnoPQRstuVWXyz0123456789-_x";

    #[test]
    fn nothing_to_mask_is_borrowed() {
        for s in [
            "",
            "fmg_key_abc",
            "fmg_sk",
            "plain text",
            "fmg_sk_ and more",
            "fmg_sk_",
        ] {
            assert!(matches!(mask_str(s), Cow::Borrowed(_)), "{s:?}");
        }
    }

    #[test]
    fn a_current_token_keeps_its_public_part_only() {
        let (tok, kid) = token();
        assert_eq!(masked(&tok), format!("fmg_sk_{kid}_***"));
        let secret = &tok[7 + 17..];
        for s in [
            format!("Bearer {tok}"),
            format!("x{tok}y"),
            format!("{tok}{tok}"),
            format!("\"{tok}\\n"),
            format!("key={tok}&next=1"),
            format!("é{tok}é"),
        ] {
            let m = masked(&s);
            assert!(!m.contains(secret), "{s} -> {m}");
            assert!(m.contains(&format!("fmg_sk_{kid}_***")), "{s} -> {m}");
        }
    }

    #[test]
    fn a_legacy_token_keeps_its_selector_only() {
        assert_eq!(masked(LEGACY), "fmg_sk_0123456789abcdef.***");
        assert_eq!(
            masked(&format!("[{LEGACY}]")),
            "[fmg_sk_0123456789abcdef.***]"
        );
    }

    #[test]
    fn other_runs_after_the_prefix_are_masked_whole() {
        assert_eq!(masked("fmg_sk_short"), "fmg_sk_***");
        assert_eq!(masked("a fmg_sk_x. b"), "a fmg_sk_*** b");
        assert_eq!(masked("fmg_sk_fmg_sk_abc"), "fmg_sk_***");
        // Uppercase hex is not a 0.2 selector: nothing public is kept.
        assert_eq!(masked("fmg_sk_0123456789ABCDEF.secret"), "fmg_sk_***");
    }

    #[test]
    fn every_occurrence_is_masked() {
        let (a, ka) = token();
        let (b, kb) = token();
        let s = format!("{{\"{a}\":[\"{b}\",\"{LEGACY}\"],\"e\":\"x {a} y\"}}");
        let m = masked(&s);
        assert_eq!(
            m,
            format!(
                "{{\"fmg_sk_{ka}_***\":[\"fmg_sk_{kb}_***\",\"fmg_sk_0123456789abcdef.***\"],\
                 \"e\":\"x fmg_sk_{ka}_*** y\"}}"
            )
        );
        serde_json::from_str::<serde_json::Value>(&m).unwrap();
    }

    proptest::proptest! {
        /// A token placed anywhere in arbitrary text never survives, and text without
        /// the prefix is never changed.
        #[test]
        fn no_secret_survives(pre in ".{0,40}", post in ".{0,40}") {
            let (tok, _) = token();
            let secret = &tok[7 + 17..7 + 17 + 43];
            let m = masked(&format!("{pre}{tok}{post}"));
            proptest::prop_assert!(!m.contains(secret));
            if !pre.contains("fmg_sk_") && !post.contains("fmg_sk_") {
                let plain = format!("{pre}{post}");
                proptest::prop_assert_eq!(masked(&plain), plain);
            }
        }
    }
}
