//! Test-only helpers shared by the audit event and writer tests: sample events and
//! reading written lines back.
#![allow(clippy::unwrap_used, reason = "a failing unwrap is a failing test")]

use std::fs::File;
use std::io::{self, BufRead};
use std::path::Path;

use chrono::{DateTime, TimeZone, Utc};

use super::{write_line, AuditEvent, Status};

pub(super) fn ts(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap()
}

pub(super) fn sample() -> AuditEvent {
    AuditEvent {
        ts: Utc.with_ymd_and_hms(2026, 3, 9, 14, 0, 0).unwrap()
            + chrono::Duration::milliseconds(123),
        key_id: "fmg_key_abc".into(),
        key_name: "ci bot".into(),
        tool: "search".into(),
        scopes: vec!["read".into(), "write".into()],
        duration_ms: 12.345_67,
        status: Status::Ok,
        error: None,
        input_args: Some(serde_json::json!({"q": "x", "limit": 10}).into()),
        output_preview: Some("result".into()),
        client_ip: Some("10.0.0.1".into()),
        metadata: None,
        extra: None,
    }
}

pub(super) fn line_of(ev: &AuditEvent) -> String {
    let mut buf = Vec::new();
    write_line(&mut buf, ev);
    String::from_utf8(buf).unwrap()
}

pub(super) fn read_lines(path: &Path) -> Vec<String> {
    let f = File::open(path).unwrap();
    io::BufReader::new(f).lines().map(Result::unwrap).collect()
}

pub(super) fn numbered(i: usize) -> AuditEvent {
    let mut ev = sample();
    ev.key_id = format!("k{i}");
    ev
}

/// A written line without the fields the chain adds (`id`, `prev`, `chain`), with its `\n`.
pub(super) fn unsealed(line: &str) -> String {
    let at = line.rfind(",\"id\":\"").unwrap();
    format!("{}}}\n", &line[..at])
}
