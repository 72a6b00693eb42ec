//! The `fmg_sk_` token format: generation, parsing and checksum.
//!
//! A token looks like
//!
//! ```text
//! fmg_sk_<kid: 16 base62>_<secret: 43 base62><checksum: 6 base62>
//! ```
//!
//! * `fmg_sk_` marks the token as a fastmcp-guard secret key (secret scanners can match it).
//! * `kid` is the public part. The key id stored and shown everywhere is `fmg_key_<kid>`,
//!   so verification fetches exactly one record.
//! * `secret` is 43 base62 characters drawn uniformly from the OS RNG: 43·log2(62) ≈ 256.03
//!   bits. Only an argon2id hash of it is ever stored.
//! * `checksum` is CRC32 over everything before it (`fmg_sk_<kid>_<secret>`), base62,
//!   zero-padded to 6 characters (as GitHub's tokens do). It lets mistyped or truncated tokens
//!   be refused before any lookup. CRC32 detects every single-character change.
//!
//! Every token is exactly [`TOKEN_LEN`] ASCII bytes. [`parse`] checks the prefix and the length
//! first (both O(1)), so a megabyte of garbage is refused without being scanned.
//!
//! No error message or `Debug` output in this module ever contains a token or a secret.
//!
//! # Tokens of fastmcp-guard 0.2
//!
//! Keys issued by fastmcp-guard 0.2 (and imported from its `SQLite` files) keep working. Their
//! tokens look like
//!
//! ```text
//! fmg_sk_<selector: 16 lowercase hex>.<secret: 43 of [A-Za-z0-9_-]>
//! ```
//!
//! (Python's `secrets.token_hex(8)` and `secrets.token_urlsafe(32)`), 67 bytes, with no
//! checksum. [`parse_legacy`] reads exactly that shape; [`parse`] refuses it (`.` and `-` are
//! not in the current alphabet), and [`parse_any`] picks the format by the byte after the
//! selector (`_` or `.`), so both are routed in O(1).

use std::fmt;

/// Prefix of every token.
pub const TOKEN_PREFIX: &str = "fmg_sk_";
/// Prefix of every key id (`fmg_key_<kid>`).
pub const KEY_ID_PREFIX: &str = "fmg_key_";
/// Length of the public key id part (`kid`), in base62 characters.
pub const KID_LEN: usize = 16;
/// Length of the secret part, in base62 characters (≥ 256 bits).
pub const SECRET_LEN: usize = 43;
/// Length of the checksum, in base62 characters.
pub const CHECKSUM_LEN: usize = 6;
/// Total length of a token in bytes.
pub const TOKEN_LEN: usize = TOKEN_PREFIX.len() + KID_LEN + 1 + SECRET_LEN + CHECKSUM_LEN;
/// Length of a key id (`fmg_key_` + kid) in bytes.
pub const KEY_ID_LEN: usize = KEY_ID_PREFIX.len() + KID_LEN;

/// Length of a 0.2 token's selector (lowercase hex).
pub const LEGACY_SELECTOR_LEN: usize = 16;
/// Length of a 0.2 token's secret (`token_urlsafe(32)`: unpadded URL-safe base64).
pub const LEGACY_SECRET_LEN: usize = 43;
/// Total length of a 0.2 token in bytes.
pub const LEGACY_TOKEN_LEN: usize =
    TOKEN_PREFIX.len() + LEGACY_SELECTOR_LEN + 1 + LEGACY_SECRET_LEN;
const LEGACY_SEP_POS: usize = KID_START + LEGACY_SELECTOR_LEN;

const KID_START: usize = TOKEN_PREFIX.len();
const SEP_POS: usize = KID_START + KID_LEN;
const SECRET_START: usize = SEP_POS + 1;
const CHECKSUM_START: usize = SECRET_START + SECRET_LEN;

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Why a token was refused. Messages describe the problem, never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token does not start with `fmg_sk_`.
    #[error("not a fastmcp-guard token: it must start with `fmg_sk_`")]
    Prefix,
    /// The token has the wrong length.
    #[error("malformed token: expected {expected} characters, got {actual}; copy the whole token")]
    Length {
        /// The required length ([`TOKEN_LEN`]).
        expected: usize,
        /// The length received (bytes).
        actual: usize,
    },
    /// A character outside `[0-9A-Za-z]` (or a missing `_` separator).
    #[error(
        "malformed token: unexpected character at position {position} \
         (tokens contain only letters, digits and `_`); copy the token again"
    )]
    Charset {
        /// Byte offset of the first bad character.
        position: usize,
    },
    /// The checksum does not match: the token was mistyped or altered.
    #[error("malformed token: checksum mismatch (the token was mistyped or altered)")]
    Checksum,
    /// The OS random number generator failed (only from [`generate`]).
    #[error("cannot generate a token: the OS random number generator failed: {reason}")]
    Random {
        /// The OS error description.
        reason: String,
    },
}

/// A syntactically valid token, borrowed from the input.
///
/// `Debug` never prints the secret.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ParsedToken<'a> {
    /// The whole token (used for the cache digest).
    pub token: &'a str,
    /// The public part (16 base62 characters, without `fmg_key_`).
    pub kid: &'a str,
    /// The secret part (43 base62 characters, without the checksum).
    pub secret: &'a str,
}

impl ParsedToken<'_> {
    /// The key id this token belongs to: `fmg_key_<kid>`.
    #[must_use]
    pub fn key_id(&self) -> String {
        format!("{KEY_ID_PREFIX}{}", self.kid)
    }
}

impl fmt::Debug for ParsedToken<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParsedToken")
            .field("kid", &self.kid)
            .field("secret", &"<redacted>")
            .finish_non_exhaustive()
    }
}

fn is_base62(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

fn fill_random(buf: &mut [u8]) -> Result<(), TokenError> {
    getrandom::fill(buf).map_err(|e| TokenError::Random {
        reason: e.to_string(),
    })
}

/// Appends `n` base62 characters drawn uniformly from the OS RNG (rejection sampling).
fn push_random_base62(out: &mut String, n: usize) -> Result<(), TokenError> {
    // 248 = 4 * 62: bytes >= 248 are rejected so `b % 62` is uniform.
    let mut pool = [0u8; 64];
    let mut used = pool.len();
    let mut pushed = 0;
    while pushed < n {
        if used == pool.len() {
            fill_random(&mut pool)?;
            used = 0;
        }
        let b = pool[used];
        used += 1;
        if b < 248 {
            out.push(char::from(ALPHABET[usize::from(b % 62)]));
            pushed += 1;
        }
    }
    Ok(())
}

/// Base62, zero-padded to [`CHECKSUM_LEN`] characters (62^6 > 2^32).
fn encode_checksum(mut value: u32) -> [u8; CHECKSUM_LEN] {
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        // `value % 62` < 62, so the index is in range and the cast is lossless.
        *slot = ALPHABET[(value % 62) as usize];
        value /= 62;
    }
    out
}

fn checksum_of(body: &[u8]) -> [u8; CHECKSUM_LEN] {
    encode_checksum(crc32fast::hash(body))
}

/// Generates a new token and its key id: `(token, key_id)`.
///
/// The kid and the secret come from the OS RNG.
///
/// # Errors
/// [`TokenError::Random`] if the OS RNG fails.
pub fn generate() -> Result<(String, String), TokenError> {
    let mut token = String::with_capacity(TOKEN_LEN);
    token.push_str(TOKEN_PREFIX);
    push_random_base62(&mut token, KID_LEN)?;
    token.push('_');
    push_random_base62(&mut token, SECRET_LEN)?;
    let sum = checksum_of(token.as_bytes());
    token.extend(sum.iter().map(|&b| char::from(b)));
    let key_id = format!("{KEY_ID_PREFIX}{}", &token[KID_START..SEP_POS]);
    Ok((token, key_id))
}

/// Builds a token from a kid and a secret (adding the checksum); for tests that need a
/// well-formed token with a chosen key id. `None` if the parts have the wrong shape.
#[cfg(test)]
pub(crate) fn from_parts(kid: &str, secret: &str) -> Option<String> {
    if !is_kid(kid) || secret.len() != SECRET_LEN || !secret.bytes().all(is_base62) {
        return None;
    }
    let mut token = format!("{TOKEN_PREFIX}{kid}_{secret}");
    let sum = checksum_of(token.as_bytes());
    token.extend(sum.iter().map(|&b| char::from(b)));
    Some(token)
}

/// A syntactically valid fastmcp-guard 0.2 token (`fmg_sk_<selector>.<secret>`), borrowed from
/// the input. 0.2 stored a bcrypt hash of the whole token, so there is no separate secret here.
///
/// `Debug` prints the selector (public, as in 0.2) but never the token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct LegacyToken<'a> {
    /// The whole token (bcrypt input and cache digest input).
    pub token: &'a str,
    /// The public selector: 16 lowercase hex characters.
    pub selector: &'a str,
}

impl fmt::Debug for LegacyToken<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LegacyToken")
            .field("selector", &self.selector)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl LegacyToken<'_> {
    /// The token's public part, `fmg_sk_<selector>`: how a 0.2 key is named before its
    /// record (and so its key id) is known.
    #[must_use]
    pub fn public_part(&self) -> String {
        format!("{TOKEN_PREFIX}{}", self.selector)
    }
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

fn is_urlsafe_b64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Parses a fastmcp-guard 0.2 token: `fmg_sk_` + 16 lowercase hex + `.` + 43 characters of
/// `[A-Za-z0-9_-]` (67 bytes).
///
/// Checks, in order: prefix and length (O(1), before looking at the rest), then the selector,
/// the `.` separator and the secret's alphabet. There is no checksum in this format. Never
/// panics.
///
/// # Errors
/// [`TokenError::Prefix`], [`TokenError::Length`] (expected [`LEGACY_TOKEN_LEN`]) or
/// [`TokenError::Charset`].
pub fn parse_legacy(token: &str) -> Result<LegacyToken<'_>, TokenError> {
    let bytes = token.as_bytes();
    if !bytes.starts_with(TOKEN_PREFIX.as_bytes()) {
        return Err(TokenError::Prefix);
    }
    if bytes.len() != LEGACY_TOKEN_LEN {
        return Err(TokenError::Length {
            expected: LEGACY_TOKEN_LEN,
            actual: bytes.len(),
        });
    }
    for (position, &b) in bytes.iter().enumerate().skip(KID_START) {
        let ok = match position.cmp(&LEGACY_SEP_POS) {
            std::cmp::Ordering::Less => is_lower_hex(b),
            std::cmp::Ordering::Equal => b == b'.',
            std::cmp::Ordering::Greater => is_urlsafe_b64(b),
        };
        if !ok {
            return Err(TokenError::Charset { position });
        }
    }
    // Every byte is ASCII now, so both slices fall on character boundaries; `get` anyway.
    let selector = token
        .get(KID_START..LEGACY_SEP_POS)
        .ok_or(TokenError::Charset {
            position: KID_START,
        })?;
    Ok(LegacyToken { token, selector })
}

/// A token of either format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnyToken<'a> {
    /// The current `fmg_sk_<kid>_<secret><checksum>` format.
    Current(ParsedToken<'a>),
    /// A fastmcp-guard 0.2 token, `fmg_sk_<selector>.<secret>`.
    Legacy(LegacyToken<'a>),
}

impl<'a> AnyToken<'a> {
    /// The whole token (the input of the cache digest).
    #[must_use]
    pub fn token(&self) -> &'a str {
        match self {
            Self::Current(p) => p.token,
            Self::Legacy(l) => l.token,
        }
    }
}

/// Parses a token of either format, choosing by the byte after the 16-character public part
/// (`.`: 0.2, anything else: current), so the error describes the format the input was
/// meant to be in. O(1) before the character scan, like [`parse`]; never panics.
///
/// # Errors
/// As [`parse`] or [`parse_legacy`].
pub fn parse_any(token: &str) -> Result<AnyToken<'_>, TokenError> {
    if token.as_bytes().get(LEGACY_SEP_POS) == Some(&b'.') {
        parse_legacy(token).map(AnyToken::Legacy)
    } else {
        parse(token).map(AnyToken::Current)
    }
}

/// The 0.2 selector named by a 0.2 token or its public part (`fmg_sk_<16 hex>`, optionally
/// followed by `.` and anything: only the public part is read). Surrounding whitespace is
/// ignored. `None` for anything else.
#[must_use]
pub fn legacy_selector_from_public_part(s: &str) -> Option<&str> {
    let rest = s.trim().strip_prefix(TOKEN_PREFIX)?;
    let selector = rest.get(..LEGACY_SELECTOR_LEN)?;
    if !selector.bytes().all(is_lower_hex) {
        return None;
    }
    match rest.as_bytes().get(LEGACY_SELECTOR_LEN) {
        None | Some(b'.') => Some(selector),
        Some(_) => None,
    }
}

/// A random 0.2-shaped token and its selector, made the way 0.2 made them; for tests.
///
/// # Errors
/// [`TokenError::Random`] if the OS RNG fails.
#[cfg(test)]
pub(crate) fn generate_legacy() -> Result<(String, String), TokenError> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut raw = [0u8; LEGACY_SELECTOR_LEN + LEGACY_SECRET_LEN];
    fill_random(&mut raw)?;
    let selector: String = raw[..LEGACY_SELECTOR_LEN]
        .iter()
        .map(|&b| char::from(HEX[usize::from(b & 15)]))
        .collect();
    let secret: String = raw[LEGACY_SELECTOR_LEN..]
        .iter()
        .map(|&b| char::from(B64[usize::from(b & 63)]))
        .collect();
    Ok((format!("{TOKEN_PREFIX}{selector}.{secret}"), selector))
}

/// Parses a token given as text. See [`parse_bytes`].
///
/// # Errors
/// See [`parse_bytes`].
pub fn parse(token: &str) -> Result<ParsedToken<'_>, TokenError> {
    parse_bytes(token.as_bytes())
}

/// Parses a token given as arbitrary bytes.
///
/// Checks, in order: prefix and length (O(1), before looking at the rest), the character set
/// and separator, then the checksum. Never panics.
///
/// # Errors
/// [`TokenError::Prefix`], [`TokenError::Length`], [`TokenError::Charset`] or
/// [`TokenError::Checksum`].
pub fn parse_bytes(bytes: &[u8]) -> Result<ParsedToken<'_>, TokenError> {
    if !bytes.starts_with(TOKEN_PREFIX.as_bytes()) {
        return Err(TokenError::Prefix);
    }
    if bytes.len() != TOKEN_LEN {
        return Err(TokenError::Length {
            expected: TOKEN_LEN,
            actual: bytes.len(),
        });
    }
    for (position, &b) in bytes.iter().enumerate().skip(KID_START) {
        let ok = if position == SEP_POS {
            b == b'_'
        } else {
            is_base62(b)
        };
        if !ok {
            return Err(TokenError::Charset { position });
        }
    }
    if checksum_of(&bytes[..CHECKSUM_START]) != bytes[CHECKSUM_START..] {
        return Err(TokenError::Checksum);
    }
    // Every byte is ASCII at this point, so this cannot fail; map it anyway rather than panic.
    let token = std::str::from_utf8(bytes).map_err(|e| TokenError::Charset {
        position: e.valid_up_to(),
    })?;
    Ok(ParsedToken {
        token,
        kid: &token[KID_START..SEP_POS],
        secret: &token[SECRET_START..CHECKSUM_START],
    })
}

fn is_kid(s: &str) -> bool {
    s.len() == KID_LEN && s.bytes().all(is_base62)
}

/// Whether `s` is a well-formed key id (`fmg_key_` + 16 base62 characters).
#[must_use]
pub fn is_key_id(s: &str) -> bool {
    s.strip_prefix(KEY_ID_PREFIX).is_some_and(is_kid)
}

/// The key id named by a public identifier, for the CLI and the management API.
///
/// Accepts `fmg_key_<kid>`, a bare `<kid>`, or a full or partial token `fmg_sk_<kid>[_...]`
/// (only the public part is read; the rest is ignored, not validated). Surrounding whitespace
/// is ignored. Returns `None` for anything else.
#[must_use]
pub fn key_id_from_public_part(s: &str) -> Option<String> {
    let s = s.trim();
    let kid = if let Some(rest) = s.strip_prefix(KEY_ID_PREFIX) {
        rest
    } else if let Some(rest) = s.strip_prefix(TOKEN_PREFIX) {
        // `get` avoids slicing inside a multi-byte character.
        let kid = rest.get(..KID_LEN)?;
        match rest.as_bytes().get(KID_LEN) {
            None | Some(b'_') => kid,
            Some(_) => return None,
        }
    } else {
        s
    };
    is_kid(kid).then(|| format!("{KEY_ID_PREFIX}{kid}"))
}

/// Whether `s` looks like a fastmcp-guard token (prefix check only).
///
/// Used to route `fmg_sk_` tokens to the guard and anything else to another verifier.
#[must_use]
pub fn looks_like_guard_token(s: &str) -> bool {
    s.starts_with(TOKEN_PREFIX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn generated_token_has_the_documented_shape() {
        let (token, key_id) = generate().unwrap();
        assert_eq!(token.len(), TOKEN_LEN);
        assert_eq!(TOKEN_LEN, 73);
        assert!(token.starts_with("fmg_sk_"));
        assert_eq!(token.as_bytes()[SEP_POS], b'_');
        assert!(is_key_id(&key_id));
        assert_eq!(&key_id[KEY_ID_PREFIX.len()..], &token[KID_START..SEP_POS]);
        let parsed = parse(&token).unwrap();
        assert_eq!(parsed.key_id(), key_id);
        assert_eq!(parsed.secret.len(), SECRET_LEN);
        assert_eq!(parsed.token, token);
    }

    #[test]
    fn tokens_are_distinct() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a.0, b.0);
        assert_ne!(a.1, b.1);
    }

    #[test]
    fn secret_characters_cover_the_alphabet() {
        // 200 secrets * 43 chars: every one of the 62 symbols shows up (sanity check of the
        // rejection sampler; the chance of a miss is ~62 * (61/62)^8600, i.e. zero).
        let mut seen = [false; 128];
        for _ in 0..200 {
            let (token, _) = generate().unwrap();
            for b in parse(&token).unwrap().secret.bytes() {
                seen[usize::from(b)] = true;
            }
        }
        assert!(ALPHABET.iter().all(|&b| seen[usize::from(b)]));
    }

    #[test]
    fn checksum_is_fixed_width_base62() {
        assert_eq!(&encode_checksum(0), b"000000");
        assert_eq!(&encode_checksum(61), b"00000z");
        assert_eq!(&encode_checksum(62), b"000010");
        assert_eq!(&encode_checksum(u32::MAX), b"4gfFC3");
    }

    #[test]
    fn refusals_name_the_problem() {
        let (token, _) = generate().unwrap();
        assert_eq!(parse("Bearer abc"), Err(TokenError::Prefix));
        assert_eq!(parse(""), Err(TokenError::Prefix));
        assert_eq!(
            parse(&token[..40]),
            Err(TokenError::Length {
                expected: 73,
                actual: 40
            })
        );
        let mut bad = token.clone().into_bytes();
        bad[30] = b'-';
        assert_eq!(parse_bytes(&bad), Err(TokenError::Charset { position: 30 }));
        let mut bad = token.clone().into_bytes();
        bad[SEP_POS] = b'a';
        assert_eq!(
            parse_bytes(&bad),
            Err(TokenError::Charset { position: SEP_POS })
        );
        let mut bad = token.clone().into_bytes();
        bad[40] = if bad[40] == b'a' { b'b' } else { b'a' };
        assert_eq!(parse_bytes(&bad), Err(TokenError::Checksum));
    }

    #[test]
    fn huge_input_is_refused_by_length() {
        let mut huge = String::from(TOKEN_PREFIX);
        huge.push_str(&"a".repeat(1 << 20));
        assert!(matches!(parse(&huge), Err(TokenError::Length { .. })));
    }

    #[test]
    fn errors_never_contain_the_token() {
        let (token, _) = generate().unwrap();
        let secret = parse(&token).unwrap().secret.to_owned();
        let mut inputs = vec![token[..50].to_owned(), format!("{token}x")];
        for i in KID_START..TOKEN_LEN {
            let mut b = token.clone().into_bytes();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            inputs.push(String::from_utf8(b).unwrap());
        }
        for input in inputs {
            if let Err(e) = parse(&input) {
                let msg = format!("{e} {e:?}");
                assert!(!msg.contains(&secret[..10]), "{msg}");
                assert!(!msg.contains(&input[KID_START..KID_START + 8]), "{msg}");
            }
        }
        let dbg = format!("{:?}", parse(&token).unwrap());
        assert!(!dbg.contains(&secret), "{dbg}");
    }

    #[test]
    fn public_part_forms() {
        let (token, key_id) = generate().unwrap();
        let kid = &key_id[KEY_ID_PREFIX.len()..];
        assert_eq!(key_id_from_public_part(&key_id).as_deref(), Some(&*key_id));
        assert_eq!(key_id_from_public_part(kid).as_deref(), Some(&*key_id));
        assert_eq!(key_id_from_public_part(&token).as_deref(), Some(&*key_id));
        assert_eq!(
            key_id_from_public_part(&token[..SEP_POS]).as_deref(),
            Some(&*key_id)
        );
        assert_eq!(
            key_id_from_public_part(&format!("  {key_id}\n")).as_deref(),
            Some(&*key_id)
        );
        assert_eq!(key_id_from_public_part(&token[..SEP_POS - 1]), None);
        assert_eq!(key_id_from_public_part(&format!("{kid}x")), None);
        assert_eq!(key_id_from_public_part(&format!("fmg_sk_{kid}x")), None);
        assert_eq!(key_id_from_public_part("fmg_key_"), None);
        assert_eq!(key_id_from_public_part("fmg_sk_ééééééééé"), None);
        assert_eq!(key_id_from_public_part(""), None);
    }

    #[test]
    fn routing_by_prefix() {
        assert!(looks_like_guard_token("fmg_sk_whatever"));
        assert!(!looks_like_guard_token("eyJhbGciOi"));
        assert!(!looks_like_guard_token("fmg_key_abc"));
    }

    #[test]
    fn legacy_token_of_0_2_parses() {
        // A token as fastmcp-guard 0.2 printed it (selector: token_hex(8); secret:
        // token_urlsafe(32)).
        let t = "fmg_sk_3f9a0c1d2e4b5a69.YAjNHrl6-yQ65F2NTlnLQO-xuYLqE2diutM6MBFJGUs";
        assert_eq!(t.len(), LEGACY_TOKEN_LEN);
        assert_eq!(LEGACY_TOKEN_LEN, 67);
        let l = parse_legacy(t).unwrap();
        assert_eq!(l.selector, "3f9a0c1d2e4b5a69");
        assert_eq!(l.token, t);
        assert_eq!(l.public_part(), "fmg_sk_3f9a0c1d2e4b5a69");
        assert_eq!(parse_any(t), Ok(AnyToken::Legacy(l)));
        assert_eq!(parse_any(t).unwrap().token(), t);
        // The current parser keeps refusing it, and routing still sees a guard token.
        assert!(parse(t).is_err());
        assert!(looks_like_guard_token(t));
        let dbg = format!("{l:?}");
        assert!(
            dbg.contains("3f9a0c1d2e4b5a69") && !dbg.contains("YAjNHrl6"),
            "{dbg}"
        );
    }

    #[test]
    fn legacy_refusals_name_the_problem() {
        let (t, _) = generate_legacy().unwrap();
        assert_eq!(parse_legacy("Bearer x"), Err(TokenError::Prefix));
        assert_eq!(
            parse_legacy(&t[..66]),
            Err(TokenError::Length {
                expected: 67,
                actual: 66
            })
        );
        assert!(matches!(
            parse_legacy(&format!("{t}A")),
            Err(TokenError::Length { actual: 68, .. })
        ));
        let at = |pos: usize, c: char| {
            let mut b = t.clone().into_bytes();
            let mut buf = [0u8; 4];
            b.splice(pos..=pos, c.encode_utf8(&mut buf).bytes());
            String::from_utf8(b).unwrap()
        };
        // Upper-case hex, a missing separator, `+`, `/` and `=` (standard base64) are refused.
        assert_eq!(
            parse_legacy(&at(7, 'A')),
            Err(TokenError::Charset { position: 7 })
        );
        assert_eq!(
            parse_legacy(&at(22, 'g')),
            Err(TokenError::Charset { position: 22 })
        );
        assert_eq!(
            parse_legacy(&at(LEGACY_SEP_POS, '_')),
            Err(TokenError::Charset {
                position: LEGACY_SEP_POS
            })
        );
        for c in ['+', '/', '=', ' ', '.'] {
            assert_eq!(
                parse_legacy(&at(40, c)),
                Err(TokenError::Charset { position: 40 }),
                "{c:?}"
            );
        }
        // A multi-byte character changes the length first.
        assert!(matches!(
            parse_legacy(&at(40, 'é')),
            Err(TokenError::Length { actual: 68, .. })
        ));
        // A current token is not a legacy one, and vice versa through `parse_any`.
        let (current, _) = generate().unwrap();
        assert!(matches!(
            parse_legacy(&current),
            Err(TokenError::Length { expected: 67, .. })
        ));
        assert!(matches!(parse_any(&current), Ok(AnyToken::Current(_))));
        // `parse_any` reports the error of the format the input was meant to be in.
        assert!(matches!(
            parse_any(&t[..60]),
            Err(TokenError::Length { expected: 67, .. })
        ));
        assert!(matches!(
            parse_any(&current[..60]),
            Err(TokenError::Length { expected: 73, .. })
        ));
    }

    #[test]
    fn legacy_huge_input_is_refused_by_length() {
        let mut huge = format!("{TOKEN_PREFIX}0123456789abcdef.");
        huge.push_str(&"a".repeat(1 << 20));
        assert!(matches!(
            parse_legacy(&huge),
            Err(TokenError::Length { .. })
        ));
        assert!(matches!(parse_any(&huge), Err(TokenError::Length { .. })));
    }

    #[test]
    fn legacy_selector_forms() {
        let (t, sel) = generate_legacy().unwrap();
        assert_eq!(legacy_selector_from_public_part(&t), Some(sel.as_str()));
        assert_eq!(
            legacy_selector_from_public_part(&t[..24]),
            Some(sel.as_str())
        );
        assert_eq!(
            legacy_selector_from_public_part(&format!(" fmg_sk_{sel}\n")),
            Some(sel.as_str())
        );
        assert_eq!(legacy_selector_from_public_part(&t[..22]), None);
        assert_eq!(legacy_selector_from_public_part(&sel), None);
        assert_eq!(
            legacy_selector_from_public_part("fmg_sk_0123456789ABCDEF"),
            None
        );
        assert_eq!(
            legacy_selector_from_public_part("fmg_sk_0123456789abcdef_x"),
            None
        );
        assert_eq!(legacy_selector_from_public_part("fmg_sk_éééééééé"), None);
    }

    /// The 0.2 shape, written out plainly, as the reference for the property tests.
    fn is_legacy_shape(s: &str) -> bool {
        let b = s.as_bytes();
        b.len() == 67
            && s.starts_with("fmg_sk_")
            && b[7..23].iter().all(|c| b"0123456789abcdef".contains(c))
            && b[23] == b'.'
            && b[24..]
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    }

    proptest! {
        #[test]
        fn legacy_tokens_parse_and_current_parse_refuses_them(_seed in 0u8..16) {
            let (t, sel) = generate_legacy().unwrap();
            let l = parse_legacy(&t).unwrap();
            prop_assert_eq!(l.selector, sel.as_str());
            prop_assert!(parse(&t).is_err());
            prop_assert!(parse_bytes(t.as_bytes()).is_err());
            prop_assert!(matches!(parse_any(&t), Ok(AnyToken::Legacy(_))));
            prop_assert_eq!(key_id_from_public_part(&t), None);
        }

        #[test]
        fn legacy_parse_matches_the_reference_shape(
            pos in 0usize..LEGACY_TOKEN_LEN,
            c in prop_oneof![
                any::<char>(),
                "[0-9a-fA-F._+/=-]".prop_map(|s| s.chars().next().unwrap_or('a')),
            ],
            cut in 0usize..3,
        ) {
            let (t, _) = generate_legacy().unwrap();
            let mut chars: Vec<char> = t.chars().collect();
            chars[pos] = c;
            let mutated: String = chars.into_iter().collect();
            let mutated = match cut {
                1 => mutated.chars().skip(1).collect(),
                2 => format!("{mutated}a"),
                _ => mutated,
            };
            prop_assert_eq!(parse_legacy(&mutated).is_ok(), is_legacy_shape(&mutated));
            prop_assert!(parse(&mutated).is_err() || !is_legacy_shape(&mutated));
            if let Ok(AnyToken::Legacy(l)) = parse_any(&mutated) {
                prop_assert!(is_legacy_shape(l.token));
            }
        }

        #[test]
        fn legacy_arbitrary_input_never_panics(s in ".*", tail in "\\PC{0,70}") {
            let _ = parse_legacy(&s);
            let _ = parse_any(&s);
            let _ = legacy_selector_from_public_part(&s);
            let t = format!("{TOKEN_PREFIX}{tail}");
            prop_assert_eq!(parse_legacy(&t).is_ok(), is_legacy_shape(&t));
            let _ = parse_any(&t);
            let _ = legacy_selector_from_public_part(&t);
        }

        #[test]
        fn round_trip_keeps_the_key_id(_seed in 0u8..8) {
            let (token, key_id) = generate().unwrap();
            let parsed = parse(&token).unwrap();
            prop_assert_eq!(parsed.key_id(), key_id.clone());
            prop_assert_eq!(key_id_from_public_part(&token), Some(key_id));
        }

        #[test]
        fn any_single_char_mutation_is_refused(pos in 0usize..TOKEN_LEN, c in any::<char>()) {
            let (token, _) = generate().unwrap();
            let mut chars: Vec<char> = token.chars().collect();
            prop_assume!(chars[pos] != c);
            chars[pos] = c;
            let mutated: String = chars.into_iter().collect();
            prop_assert!(parse(&mutated).is_err());
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".*") {
            let _ = parse(&s);
            let _ = key_id_from_public_part(&s);
            let _ = looks_like_guard_token(&s);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_bytes(&b);
        }

        #[test]
        fn prefixed_garbage_never_panics(
            rest in proptest::collection::vec(any::<u8>(), 60..80),
            s in "\\PC{0,80}",
        ) {
            let mut b = TOKEN_PREFIX.as_bytes().to_vec();
            b.extend_from_slice(&rest);
            let _ = parse_bytes(&b);
            let t = format!("{TOKEN_PREFIX}{s}");
            let _ = parse(&t);
            let _ = key_id_from_public_part(&t);
            let _ = key_id_from_public_part(&format!("{KEY_ID_PREFIX}{s}"));
        }

        #[test]
        fn multibyte_near_boundaries_never_panics(
            pos in 0usize..TOKEN_LEN,
            c in "[é€😀]",
        ) {
            let (token, _) = generate().unwrap();
            // Replace one byte by a multi-byte character: the result may keep the length 73
            // only by accident; either way it must be refused, never panic.
            let mut s = String::new();
            for (i, ch) in token.chars().enumerate() {
                if i == pos { s.push_str(&c) } else { s.push(ch) }
            }
            prop_assert!(parse(&s).is_err());
            let _ = key_id_from_public_part(&s);
            // Same-length variant: drop trailing bytes so the total stays 73.
            let cut: String = s.chars().take(TOKEN_LEN - (c.len() - 1)).collect();
            prop_assert!(parse(&cut).is_err());
        }

        #[test]
        fn huge_inputs_never_panic(n in 0usize..4, fill in any::<u8>()) {
            let mut b = TOKEN_PREFIX.as_bytes().to_vec();
            b.resize(TOKEN_LEN + n * 100_000, fill);
            prop_assert!(parse_bytes(&b).is_err() || n == 0);
        }
    }
}
