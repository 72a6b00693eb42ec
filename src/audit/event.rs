//! The audit event ([`AuditEvent`], its [`Status`], the [`RawJson`] of its free-form
//! values) and its rendering as one JSON line: the fixed field order ([`FIXED_FIELDS`]),
//! the serialiser the writer thread runs ([`write_line`]), timestamps ([`format_ts`]) and
//! the one JSON string escaper ([`write_json_str`]).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use serde_json::{Map, Value};

use super::{mask, AuditError};

// ---------------------------------------------------------------------------
// Event
// ---------------------------------------------------------------------------

/// Outcome recorded by an audit event: request decisions and key lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The call was allowed and succeeded.
    Ok,
    /// The call was allowed and the tool failed.
    Error,
    /// Refused by a rate limit.
    RateLimited,
    /// No valid credentials.
    Unauthorized,
    /// Valid credentials without the needed scope.
    Forbidden,
    /// Refused by the IP policy.
    IpDenied,
    /// Key lifecycle: a key was created.
    Created,
    /// Key lifecycle: a key was rotated.
    Rotated,
    /// Key lifecycle: a key was revoked.
    Revoked,
    /// Admitted, but a rule in shadow mode would have refused it (the event names the rule).
    WouldRefuse,
    /// Refused by the loop breaker: the same caller repeated the same call.
    LoopDetected,
    /// Refused: the key's credits ran out (also the budget event when they do).
    CreditsExhausted,
    /// Budget event: the key's credits fell below 10% of their base.
    CreditsLow,
}

impl Status {
    /// Every status, in declaration order.
    pub const ALL: [Status; 13] = [
        Status::Ok,
        Status::Error,
        Status::RateLimited,
        Status::Unauthorized,
        Status::Forbidden,
        Status::IpDenied,
        Status::Created,
        Status::Rotated,
        Status::Revoked,
        Status::WouldRefuse,
        Status::LoopDetected,
        Status::CreditsExhausted,
        Status::CreditsLow,
    ];

    /// The wire name (`"ok"`, `"rate_limited"`, ...).
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Error => "error",
            Status::RateLimited => "rate_limited",
            Status::Unauthorized => "unauthorized",
            Status::Forbidden => "forbidden",
            Status::IpDenied => "ip_denied",
            Status::Created => "created",
            Status::Rotated => "rotated",
            Status::Revoked => "revoked",
            Status::WouldRefuse => "would_refuse",
            Status::LoopDetected => "loop_detected",
            Status::CreditsExhausted => "credits_exhausted",
            Status::CreditsLow => "credits_low",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = AuditError;

    /// Parses a wire name exactly (case-sensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| AuditError::InvalidStatus {
                value: s.to_owned(),
            })
    }
}

/// A JSON value already rendered as compact text: how an event carries the caller's
/// free-form values (tool arguments, metadata, extra fields). They are converted once,
/// where they are produced (the Python binding renders Python objects straight into one),
/// and every sink uses the text as it is: the JSONL sink copies it into the line, the
/// `SQLite` sink binds it to its column.
///
/// Invariant: the bytes are one valid JSON value with no raw newline (strings escaped
/// by [`write_json_str`]). [`RawJson::write_with`] leaves that to its caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawJson(Vec<u8>);

impl RawJson {
    /// `v` rendered by `serde_json`.
    #[must_use]
    pub fn from_value(v: &Value) -> Self {
        let mut buf = Vec::new();
        write_value(&mut buf, v);
        RawJson(buf)
    }

    /// The extra fields of an event as one JSON object, without those a line cannot
    /// carry ([`is_reserved_field`]); `None` when none is left.
    #[must_use]
    pub fn extra(fields: &Map<String, Value>) -> Option<Self> {
        let mut buf = Vec::new();
        for (k, v) in fields {
            if is_reserved_field(k) {
                continue;
            }
            buf.push(if buf.is_empty() { b'{' } else { b',' });
            write_json_str(&mut buf, k);
            buf.push(b':');
            write_value(&mut buf, v);
        }
        if buf.is_empty() {
            return None;
        }
        buf.push(b'}');
        Some(RawJson(buf))
    }

    /// Replaces the text with what `write` appends to the (cleared) buffer, keeping its
    /// capacity. `write` must append exactly one valid JSON value with no raw newline.
    pub fn write_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        self.0.clear();
        write(&mut self.0);
    }

    /// The JSON text.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The JSON text as `&str` (`None` if a writer broke the invariant with invalid
    /// UTF-8: never the case for [`from_value`](Self::from_value) / [`extra`](Self::extra)).
    #[must_use]
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    /// The value parsed back (`Null` if the text is not JSON).
    #[must_use]
    pub fn to_value(&self) -> Value {
        serde_json::from_slice(&self.0).unwrap_or(Value::Null)
    }

    /// Bytes held, for batch sizing.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no text is held (never a valid value: a cleared buffer).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Value> for RawJson {
    fn from(v: Value) -> Self {
        RawJson::from_value(&v)
    }
}

/// One audit event: the one type every producer fills (the Python binding, the
/// refusal summaries, Rust callers) and every sink takes. Serialised by [`write_line`]
/// as one JSON object per line; the `SQLite` sink binds its fields to columns.
///
/// Events travel to the writer thread in boxes that come back for reuse: a producer
/// refills one in place ([`AuditEvent::set`] and friends keep the strings' capacity),
/// so a steady stream of events allocates nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    /// When the decision was made (UTC; written with millisecond precision).
    pub ts: DateTime<Utc>,
    /// Public key id (`fmg_key_...`) or other client id; empty if unknown.
    pub key_id: String,
    /// Human name of the key.
    pub key_name: String,
    /// Tool, resource or prompt name (or the lifecycle operation).
    pub tool: String,
    /// Scopes of the caller.
    pub scopes: Vec<String>,
    /// Time spent, in milliseconds (written rounded to 3 decimals).
    pub duration_ms: f64,
    /// Outcome.
    pub status: Status,
    /// Error message, if any.
    pub error: Option<String>,
    /// Tool arguments (only when input logging is on; already redacted).
    pub input_args: Option<RawJson>,
    /// Start of the output (only when output logging is on; already cut).
    pub output_preview: Option<String>,
    /// Client address.
    pub client_ip: Option<String>,
    /// Free-form metadata; written as `{}` when `None`.
    pub metadata: Option<RawJson>,
    /// Extra top-level fields (e.g. `actor`, `method`, `retry_after`) as one JSON
    /// object, written after the fixed ones. Built by [`RawJson::extra`] (or the
    /// binding's equivalent), which leaves out names equal to a fixed field or to one
    /// the JSONL writer adds (`id`, `prev`, `chain`): extras never shadow or duplicate
    /// those ([`is_reserved_field`]).
    pub extra: Option<RawJson>,
}

impl AuditEvent {
    /// An event stamped now, with empty scopes, zero duration and no optional fields.
    #[must_use]
    pub fn new(
        key_id: impl Into<String>,
        key_name: impl Into<String>,
        tool: impl Into<String>,
        status: Status,
    ) -> Self {
        AuditEvent {
            ts: Utc::now(),
            key_id: key_id.into(),
            key_name: key_name.into(),
            tool: tool.into(),
            scopes: Vec::new(),
            duration_ms: 0.0,
            status,
            error: None,
            input_args: None,
            output_preview: None,
            client_ip: None,
            metadata: None,
            extra: None,
        }
    }

    /// An empty event (a fresh queue box before its first fill).
    #[must_use]
    pub fn blank() -> Self {
        AuditEvent::new(String::new(), String::new(), String::new(), Status::Ok)
    }

    /// Bytes the event's text takes (about its line's length), for batch sizing.
    #[must_use]
    pub fn size_hint(&self) -> usize {
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        let raw = |s: &Option<RawJson>| s.as_ref().map_or(0, RawJson::len);
        200 + self.key_id.len()
            + self.key_name.len()
            + self.tool.len()
            + self.scopes.iter().map(|s| s.len() + 3).sum::<usize>()
            + opt(&self.error)
            + opt(&self.output_preview)
            + opt(&self.client_ip)
            + raw(&self.input_args)
            + raw(&self.metadata)
            + raw(&self.extra)
    }

    /// Sets `dst` to `src`, reusing `dst`'s buffer.
    pub fn set(dst: &mut String, src: &str) {
        dst.clear();
        dst.push_str(src);
    }

    /// Sets an optional field, reusing its buffer when it holds one.
    pub fn set_opt(dst: &mut Option<String>, src: Option<&str>) {
        match (dst.as_mut(), src) {
            (Some(d), Some(s)) => AuditEvent::set(d, s),
            (None, Some(s)) => *dst = Some(s.to_owned()),
            (_, None) => *dst = None,
        }
    }

    /// Sets the scopes, reusing the list's strings.
    pub fn set_scopes<'a>(&mut self, scopes: impl IntoIterator<Item = &'a str>) {
        let mut n = 0;
        for s in scopes {
            match self.scopes.get_mut(n) {
                Some(d) => AuditEvent::set(d, s),
                None => self.scopes.push(s.to_owned()),
            }
            n += 1;
        }
        self.scopes.truncate(n);
    }

    /// Sets an optional JSON field with what `write` renders, reusing its buffer;
    /// `write` returns `false` to leave the field `None`.
    pub fn set_json(dst: &mut Option<RawJson>, write: impl FnOnce(&mut Vec<u8>) -> bool) {
        let mut raw = dst.take().unwrap_or_default();
        let mut keep = false;
        raw.write_with(|buf| keep = write(buf));
        if keep {
            *dst = Some(raw);
        }
    }
}

// ---------------------------------------------------------------------------
// Serialiser (hot loop)
// ---------------------------------------------------------------------------

/// Names of the fixed fields, in output order.
pub const FIXED_FIELDS: [&str; 12] = [
    "ts",
    "key_id",
    "key_name",
    "tool",
    "scopes",
    "duration_ms",
    "status",
    "error",
    "input_args",
    "output_preview",
    "client_ip",
    "metadata",
];

/// Appends `ev` to `buf` as one JSON object followed by `\n`.
///
/// Fields come in [`FIXED_FIELDS`] order, then the extras. Every string is
/// escaped (quotes, backslashes, all control characters), so the only raw
/// newline is the terminating one. Never fails: a value that cannot be
/// represented (a non-finite `duration_ms`) is written as `null`.
///
/// The finished line goes through [`mask_tokens`](super::mask_tokens): a token-shaped
/// string in any field (a value, a key, the error, the tool name) is masked before the
/// line leaves this function, whoever filled the field.
pub fn write_line(buf: &mut Vec<u8>, ev: &AuditEvent) {
    let start = buf.len();
    buf.reserve(ev.size_hint());
    buf.extend_from_slice(b"{\"ts\":\"");
    write_ts(buf, &ev.ts);
    buf.extend_from_slice(b"\",\"key_id\":");
    write_json_str(buf, &ev.key_id);
    buf.extend_from_slice(b",\"key_name\":");
    write_json_str(buf, &ev.key_name);
    buf.extend_from_slice(b",\"tool\":");
    write_json_str(buf, &ev.tool);
    buf.extend_from_slice(b",\"scopes\":[");
    for (i, scope) in ev.scopes.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        write_json_str(buf, scope);
    }
    buf.extend_from_slice(b"],\"duration_ms\":");
    write_duration(buf, ev.duration_ms);
    buf.extend_from_slice(b",\"status\":\"");
    buf.extend_from_slice(ev.status.as_str().as_bytes());
    buf.extend_from_slice(b"\",\"error\":");
    write_opt_str(buf, ev.error.as_deref());
    buf.extend_from_slice(b",\"input_args\":");
    write_raw(buf, ev.input_args.as_ref(), b"null");
    buf.extend_from_slice(b",\"output_preview\":");
    write_opt_str(buf, ev.output_preview.as_deref());
    buf.extend_from_slice(b",\"client_ip\":");
    write_opt_str(buf, ev.client_ip.as_deref());
    buf.extend_from_slice(b",\"metadata\":");
    write_raw(buf, ev.metadata.as_ref(), b"{}");
    if let Some(extra) = &ev.extra {
        // The object's members, spliced in after the fixed fields.
        let body = extra.as_bytes();
        if body.len() > 2 && body[0] == b'{' {
            buf.push(b',');
            buf.extend_from_slice(&body[1..body.len() - 1]);
        }
    }
    buf.extend_from_slice(b"}\n");
    mask::mask_tail(buf, start);
}

/// Writes `raw`'s text, or `absent` when there is none (or it is empty).
fn write_raw(buf: &mut Vec<u8>, raw: Option<&RawJson>, absent: &[u8]) {
    match raw {
        Some(r) if !r.is_empty() => buf.extend_from_slice(r.as_bytes()),
        _ => buf.extend_from_slice(absent),
    }
}

/// Whether `name` is one of [`FIXED_FIELDS`].
#[must_use]
pub fn is_fixed_field(name: &str) -> bool {
    FIXED_FIELDS.contains(&name)
}

/// Fields the JSONL writer adds after all others (see [`chain`](super::chain)).
pub const SEAL_FIELDS: [&str; 3] = ["id", "prev", "chain"];

/// Whether an extra field called `name` is skipped: a fixed field or one of
/// [`SEAL_FIELDS`], so extras can never shadow or duplicate either.
#[must_use]
pub fn is_reserved_field(name: &str) -> bool {
    is_fixed_field(name) || SEAL_FIELDS.contains(&name)
}

/// Formats `ts` as RFC 3339 UTC with milliseconds and `Z`
/// (`2026-03-09T14:00:00.123Z`), truncating sub-millisecond digits, exactly as
/// chrono's `to_rfc3339_opts(SecondsFormat::Millis, true)`.
#[must_use]
pub fn format_ts(ts: &DateTime<Utc>) -> String {
    let mut buf = Vec::with_capacity(24);
    write_ts(&mut buf, ts);
    // write_ts emits ASCII only.
    String::from_utf8(buf).unwrap_or_else(|_| ts.to_rfc3339_opts(SecondsFormat::Millis, true))
}

#[allow(
    clippy::cast_possible_truncation,
    reason = "every value is < 10 before the cast"
)]
pub(super) fn write_ts(buf: &mut Vec<u8>, ts: &DateTime<Utc>) {
    let naive = ts.naive_utc();
    let Ok(year) = u32::try_from(naive.year()) else {
        buf.extend_from_slice(ts.to_rfc3339_opts(SecondsFormat::Millis, true).as_bytes());
        return;
    };
    if year > 9999 {
        buf.extend_from_slice(ts.to_rfc3339_opts(SecondsFormat::Millis, true).as_bytes());
        return;
    }
    let secs = naive.num_seconds_from_midnight();
    let (hour, minute, mut second) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut millis = naive.nanosecond() / 1_000_000;
    if millis >= 1000 {
        // A leap second: chrono keeps it as nanoseconds >= 1e9 and prints `:60`.
        second += 1;
        millis -= 1000;
    }
    let d = |n: u32| b'0' + (n % 10) as u8;
    let (month, day) = (naive.month(), naive.day());
    buf.extend_from_slice(&[
        d(year / 1000),
        d(year / 100),
        d(year / 10),
        d(year),
        b'-',
        d(month / 10),
        d(month),
        b'-',
        d(day / 10),
        d(day),
        b'T',
        d(hour / 10),
        d(hour),
        b':',
        d(minute / 10),
        d(minute),
        b':',
        d(second / 10),
        d(second),
        b'.',
        d(millis / 100),
        d(millis / 10),
        d(millis),
        b'Z',
    ]);
}

#[allow(clippy::cast_possible_truncation, reason = "n % 10 < 10")]
fn write_u64(buf: &mut Vec<u8>, mut n: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&tmp[i..]);
}

/// Writes `d` rounded to 3 decimals as a JSON number with a fraction
/// (`12.5`, `3.0`, `0.001`); `null` if not finite.
fn write_duration(buf: &mut Vec<u8>, d: f64) {
    /// Below 2^53, so the rounded value is an exact integer in f64 and i64.
    const EXACT: f64 = 9.0e15;
    if !d.is_finite() {
        buf.extend_from_slice(b"null");
        return;
    }
    let scaled = (d * 1000.0).round();
    if scaled.abs() < EXACT {
        #[allow(
            clippy::cast_possible_truncation,
            reason = "|scaled| < 2^53 and integral"
        )]
        let m = scaled as i64;
        if m < 0 {
            buf.push(b'-');
        }
        let a = m.unsigned_abs();
        write_u64(buf, a / 1000);
        #[allow(clippy::cast_possible_truncation, reason = "< 1000")]
        let frac = (a % 1000) as u16;
        let digit = |n: u16| b'0' + (n % 10) as u8;
        let digits = [digit(frac / 100), digit(frac / 10), digit(frac)];
        let len = if frac % 100 == 0 {
            1
        } else if frac % 10 == 0 {
            2
        } else {
            3
        };
        buf.push(b'.');
        buf.extend_from_slice(&digits[..len]);
    } else {
        // Huge values: rare, so the standard (shortest round-trip) formatter is fine.
        let r = scaled / 1000.0;
        let v = if r.is_finite() { r } else { d };
        buf.extend_from_slice(v.to_string().as_bytes());
    }
}

/// JSON escape per byte: 0 = copy, `u` = `\u00XX`, else the char after `\`.
const ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = b'u';
        i += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0a] = b'n';
    t[0x0c] = b'f';
    t[0x0d] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

/// Appends `s` as a JSON string. Non-ASCII passes through as UTF-8 (valid JSON);
/// only ASCII bytes are escaped, so slicing never splits a character.
pub fn write_json_str(buf: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    buf.reserve(bytes.len() + 2);
    buf.push(b'"');
    // Most strings need no escape: find the first byte that does, 8 at a time.
    let clean = clean_prefix(bytes);
    buf.extend_from_slice(&bytes[..clean]);
    if clean < bytes.len() {
        write_escaped(buf, &bytes[clean..]);
    }
    buf.push(b'"');
}

/// Length of the longest prefix of `bytes` with no byte JSON must escape
/// (a control character, `"` or `\\`), checked a word at a time.
fn clean_prefix(bytes: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // High bit set in each byte of `x` that is zero (exact for the first such byte).
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let mut i = 0;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        // A byte < 0x20: (b - 0x20) borrows into its high bit while b's own is clear.
        let control = w.wrapping_sub(ONES * 0x20) & !w & HIGHS;
        let quote = zero(w ^ (ONES * u64::from(b'"')));
        let backslash = zero(w ^ (ONES * u64::from(b'\\')));
        if control | quote | backslash != 0 {
            break;
        }
        i += 8;
    }
    while i < bytes.len() && ESCAPE[usize::from(bytes[i])] == 0 {
        i += 1;
    }
    i
}

/// Writes `bytes` escaped (the body of a JSON string, without quotes).
fn write_escaped(buf: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc = ESCAPE[usize::from(b)];
        if esc == 0 {
            continue;
        }
        buf.extend_from_slice(&bytes[start..i]);
        if esc == b'u' {
            buf.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]);
        } else {
            buf.extend_from_slice(&[b'\\', esc]);
        }
        start = i + 1;
    }
    buf.extend_from_slice(&bytes[start..]);
}

fn write_opt_str(buf: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => write_json_str(buf, s),
        None => buf.extend_from_slice(b"null"),
    }
}

pub(super) fn write_value(buf: &mut Vec<u8>, v: &Value) {
    let mark = buf.len();
    // Serialising a `Value` into a Vec cannot fail; keep the line valid regardless.
    if serde_json::to_writer(&mut *buf, v).is_err() {
        buf.truncate(mark);
        buf.extend_from_slice(b"null");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::audit::testing::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    #[test]
    fn status_names_round_trip() {
        let names: Vec<_> = Status::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "ok",
                "error",
                "rate_limited",
                "unauthorized",
                "forbidden",
                "ip_denied",
                "created",
                "rotated",
                "revoked",
                "would_refuse",
                "loop_detected",
                "credits_exhausted",
                "credits_low"
            ]
        );
        for st in Status::ALL {
            assert_eq!(st.as_str().parse::<Status>().unwrap(), st);
            assert_eq!(st.to_string(), st.as_str());
            assert_eq!(
                serde_json::to_string(&st).unwrap(),
                format!("\"{}\"", st.as_str())
            );
        }
    }

    #[test]
    fn status_parse_error_names_valid_values() {
        let err = "OK".parse::<Status>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("\"OK\""), "{msg}");
        assert!(
            msg.contains("ok, error, rate_limited, unauthorized, forbidden, ip_denied"),
            "{msg}"
        );
        assert!(msg.contains("revoked"), "{msg}");
    }

    // ---- serialiser ----

    #[test]
    fn line_matches_golden_with_fixed_field_order() {
        let line = line_of(&sample());
        assert_eq!(
            line,
            "{\"ts\":\"2026-03-09T14:00:00.123Z\",\"key_id\":\"fmg_key_abc\",\"key_name\":\"ci bot\",\
             \"tool\":\"search\",\"scopes\":[\"read\",\"write\"],\"duration_ms\":12.346,\"status\":\"ok\",\
             \"error\":null,\"input_args\":{\"limit\":10,\"q\":\"x\"},\"output_preview\":\"result\",\
             \"client_ip\":\"10.0.0.1\",\"metadata\":{}}\n"
        );
    }

    #[test]
    fn absent_fields_are_null_and_metadata_empty_object() {
        let ev = AuditEvent::new("", "", "t", Status::Unauthorized);
        let v: Value = serde_json::from_str(&line_of(&ev)).unwrap();
        for f in ["error", "input_args", "output_preview", "client_ip"] {
            assert_eq!(v[f], Value::Null, "{f}");
        }
        assert_eq!(v["metadata"], serde_json::json!({}));
        assert_eq!(v["scopes"], serde_json::json!([]));
        assert_eq!(v["status"], "unauthorized");
        assert_eq!(v["duration_ms"].as_f64(), Some(0.0));
    }

    #[test]
    fn extra_fields_follow_fixed_ones_and_cannot_shadow_them() {
        let mut ev = sample();
        ev.status = Status::RateLimited;
        ev.metadata = Some(serde_json::json!({"k": [1, 2]}).into());
        let mut extra = Map::new();
        extra.insert("retry_after".into(), serde_json::json!(1.5));
        extra.insert("actor".into(), serde_json::json!("admin"));
        extra.insert("status".into(), serde_json::json!("ok"));
        extra.insert("ts".into(), serde_json::json!(0));
        ev.extra = RawJson::extra(&extra);
        let line = line_of(&ev);
        let tail = line.split("\"metadata\":{\"k\":[1,2]}").nth(1).unwrap();
        assert_eq!(tail, ",\"actor\":\"admin\",\"retry_after\":1.5}\n");
        assert_eq!(line.matches("\"status\":").count(), 1);
        assert_eq!(line.matches("\"ts\":").count(), 1);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["status"], "rate_limited");
    }

    #[test]
    fn extra_without_a_field_left_is_none_and_reserved_names_are_dropped() {
        let only_reserved = Map::from_iter([
            ("status".to_owned(), Value::from("ok")),
            ("chain".to_owned(), Value::from("x")),
        ]);
        assert_eq!(RawJson::extra(&only_reserved), None);
        let mixed = Map::from_iter([
            ("id".to_owned(), Value::from(1)),
            ("reason".to_owned(), Value::from("bad")),
        ]);
        assert_eq!(
            RawJson::extra(&mixed).unwrap().as_str(),
            Some("{\"reason\":\"bad\"}")
        );
    }

    #[test]
    fn refilling_an_event_in_place_leaves_nothing_of_the_last_one() {
        let mut ev = sample();
        ev.error = Some("long error text".into());
        ev.extra = RawJson::extra(&Map::from_iter([("a".to_owned(), Value::from(1))]));
        AuditEvent::set(&mut ev.key_id, "k2");
        AuditEvent::set_opt(&mut ev.error, Some("e"));
        AuditEvent::set_opt(&mut ev.client_ip, None);
        ev.set_scopes(["only"]);
        AuditEvent::set_json(&mut ev.input_args, |buf| {
            buf.extend_from_slice(b"[1]");
            true
        });
        AuditEvent::set_json(&mut ev.extra, |_| false);
        let v: Value = serde_json::from_str(&line_of(&ev)).unwrap();
        assert_eq!(v["key_id"], "k2");
        assert_eq!(v["error"], "e");
        assert_eq!(v["client_ip"], Value::Null);
        assert_eq!(v["scopes"], serde_json::json!(["only"]));
        assert_eq!(v["input_args"], serde_json::json!([1]));
        assert!(v.get("a").is_none(), "{v}");
    }

    #[test]
    fn keys_appear_in_the_documented_order() {
        let mut ev = sample();
        ev.extra = RawJson::extra(&Map::from_iter([(
            "method".to_owned(),
            Value::from("tools/call"),
        )]));
        let line = line_of(&ev);
        let mut last = 0;
        for key in FIXED_FIELDS.iter().chain(&["method"]) {
            let pos = line.find(&format!("\"{key}\":")).unwrap();
            assert!(pos >= last, "{key} out of order in {line}");
            last = pos;
        }
    }

    #[test]
    fn ts_format_examples() {
        assert_eq!(format_ts(&ts(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_ts(&ts(1_773_064_800_123)),
            "2026-03-09T14:00:00.123Z"
        );
        // Sub-millisecond digits are truncated, not rounded.
        let t = Utc
            .timestamp_opt(1_773_064_800, 123_999_999)
            .single()
            .unwrap();
        assert_eq!(format_ts(&t), "2026-03-09T14:00:00.123Z");
        let early = Utc.with_ymd_and_hms(5, 1, 2, 3, 4, 5).unwrap();
        assert_eq!(format_ts(&early), "0005-01-02T03:04:05.000Z");
        let far = Utc.with_ymd_and_hms(12_000, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(
            format_ts(&far),
            far.to_rfc3339_opts(SecondsFormat::Millis, true)
        );
        let neg = Utc.with_ymd_and_hms(-3, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(
            format_ts(&neg),
            neg.to_rfc3339_opts(SecondsFormat::Millis, true)
        );
    }

    #[test]
    fn ts_leap_second_matches_chrono() {
        let t = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_milli_opt(23, 59, 59, 1_250)
            .unwrap()
            .and_utc();
        assert_eq!(format_ts(&t), "2016-12-31T23:59:60.250Z");
        assert_eq!(
            format_ts(&t),
            t.to_rfc3339_opts(SecondsFormat::Millis, true)
        );
    }

    #[test]
    fn duration_rounding_and_shape() {
        let cases: &[(f64, &str)] = &[
            (0.0, "0.0"),
            (-0.0, "0.0"),
            (2.0, "2.0"),
            (1.5, "1.5"),
            (0.001, "0.001"),
            (0.0004, "0.0"),
            (0.0006, "0.001"),
            (12.345_67, "12.346"),
            (3.05, "3.05"),
            (100.100, "100.1"),
            (-1.25, "-1.25"),
            (-0.0004, "0.0"),
            (f64::NAN, "null"),
            (f64::INFINITY, "null"),
        ];
        for &(d, want) in cases {
            let mut buf = Vec::new();
            write_duration(&mut buf, d);
            assert_eq!(std::str::from_utf8(&buf).unwrap(), want, "{d}");
        }
        let mut buf = Vec::new();
        write_duration(&mut buf, 1e300);
        let back: f64 = serde_json::from_slice(&buf).unwrap();
        assert!((back - 1e300).abs() / 1e300 < 1e-12);
    }

    #[test]
    fn nasty_strings_are_escaped_on_one_line() {
        let nasty = "q\"uo\\te\n\r\t\u{0}\u{1f}\u{7f} é 日本 🦀 \u{2028}</script>";
        let mut ev = sample();
        ev.key_id = nasty.into();
        ev.key_name = nasty.into();
        ev.tool = nasty.into();
        ev.scopes = vec![nasty.into(), String::new()];
        ev.error = Some(nasty.into());
        ev.output_preview = Some(nasty.into());
        ev.client_ip = Some(nasty.into());
        ev.input_args = Some(serde_json::json!({ nasty: nasty }).into());
        ev.extra = RawJson::extra(&Map::from_iter([(nasty.to_owned(), Value::from(nasty))]));
        let line = line_of(&ev);
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.ends_with('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        for f in [
            "key_id",
            "key_name",
            "tool",
            "error",
            "output_preview",
            "client_ip",
        ] {
            assert_eq!(v[f], nasty, "{f}");
        }
        assert_eq!(v["scopes"][0], nasty);
        assert_eq!(v["input_args"][nasty], nasty);
        assert_eq!(v[nasty], nasty);
    }

    fn arb_status() -> impl Strategy<Value = Status> {
        (0..Status::ALL.len()).prop_map(|i| Status::ALL[i])
    }

    proptest! {
        /// The word-at-a-time scan finds every byte to escape wherever it sits
        /// (strings of mostly plain text with a few specials, at any offset).
        #[test]
        fn json_str_matches_serde(
            s in "([a-z0-9 é日]{0,20}[\x00-\x1f\"\\\x7f]?){0,4}[a-z]{0,9}",
        ) {
            let mut buf = Vec::new();
            write_json_str(&mut buf, &s);
            prop_assert_eq!(String::from_utf8(buf).unwrap(), serde_json::to_string(&s).unwrap());
        }
    }

    proptest! {
        #[test]
        fn every_line_parses_and_round_trips(
            key_id in any::<String>(),
            key_name in any::<String>(),
            tool in "(\\PC|[\\x00-\\x1f\"\\\\])*",
            scopes in proptest::collection::vec(any::<String>(), 0..4),
            error in proptest::option::of(any::<String>()),
            preview in proptest::option::of(any::<String>()),
            ip in proptest::option::of(any::<String>()),
            extra_key in "[a-z_]{1,8}",
            extra_val in any::<String>(),
            ms in -1_000_000_000_000i64..300_000_000_000_000,
            duration in -1e9f64..1e9,
            status in arb_status(),
        ) {
            let ev = AuditEvent {
                ts: ts(ms),
                key_id, key_name, tool, scopes,
                duration_ms: duration,
                status,
                error,
                input_args: Some(serde_json::json!({"s": extra_val.clone()}).into()),
                output_preview: preview,
                client_ip: ip,
                metadata: Some(serde_json::json!([extra_val.clone()]).into()),
                extra: RawJson::extra(&Map::from_iter([(extra_key.clone(), Value::from(extra_val.clone()))])),
            };
            let line = line_of(&ev);
            prop_assert_eq!(line.find('\n'), Some(line.len() - 1));
            let v: Map<String, Value> = serde_json::from_str(&line).unwrap();
            let keys: Vec<&str> = v.keys().map(String::as_str).collect();
            for f in FIXED_FIELDS { prop_assert!(keys.contains(&f)); }
            prop_assert_eq!(&v["ts"], &Value::from(ev.ts.to_rfc3339_opts(SecondsFormat::Millis, true)));
            prop_assert_eq!(&v["key_id"], &Value::from(ev.key_id.clone()));
            prop_assert_eq!(&v["key_name"], &Value::from(ev.key_name.clone()));
            prop_assert_eq!(&v["tool"], &Value::from(ev.tool.clone()));
            prop_assert_eq!(&v["scopes"], &Value::from(ev.scopes.clone()));
            let d = v["duration_ms"].as_f64().unwrap();
            prop_assert!((d - duration).abs() <= 0.000_500_1 + duration.abs() * 1e-15);
            // Exactly the nearest f64 to the 3-decimal rounding (sign of zero aside).
            prop_assert!((d - (duration * 1000.0).round() / 1000.0).abs() <= 0.0);
            prop_assert_eq!(v["status"].as_str().unwrap().parse::<Status>().unwrap(), status);
            prop_assert_eq!(&v["error"], &ev.error.clone().map_or(Value::Null, Value::from));
            prop_assert_eq!(&v["output_preview"], &ev.output_preview.clone().map_or(Value::Null, Value::from));
            prop_assert_eq!(&v["client_ip"], &ev.client_ip.clone().map_or(Value::Null, Value::from));
            prop_assert_eq!(Some(v["input_args"].clone()), ev.input_args.as_ref().map(RawJson::to_value));
            prop_assert_eq!(Some(v["metadata"].clone()), ev.metadata.as_ref().map(RawJson::to_value));
            if !FIXED_FIELDS.contains(&extra_key.as_str()) {
                prop_assert_eq!(&v[&extra_key], &Value::from(extra_val));
            }
        }

        #[test]
        fn ts_matches_chrono(secs in -62_167_219_200i64..253_402_300_799, nanos in 0u32..2_000_000_000) {
            if let Some(t) = DateTime::<Utc>::from_timestamp(secs, nanos) {
                prop_assert_eq!(format_ts(&t), t.to_rfc3339_opts(SecondsFormat::Millis, true));
            }
        }
    }
}
