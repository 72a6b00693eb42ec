//! Refusals made before there is an identity (`unauthorized`, `ip_denied`, a
//! throttled attempt) are aggregated, so that a flood of them costs counts, not
//! disk ([`RefusalAggregator`]).
//!
//! Refusals are grouped per interval by (status, reason, claimed key id, client
//! address), an IPv6 address counting as its /64 network. In each group the first
//! [`RefusalOptions::burst`] refusals of an interval are written as usual lines,
//! and at most [`RefusalOptions::max_lines`] across all groups; the others are
//! only counted. When the interval ends (the writer thread looks at every tick),
//! and on flush and close, each group that had refusals counted becomes one
//! **summary event** ([`summary_event`]) carrying their number in a `count` field.
//! So every attempt is accounted for: written lines plus the `count` of the
//! summaries equal the refusals logged.
//!
//! Memory and disk are bounded: past [`RefusalOptions::max_groups`] groups in an
//! interval, a new (address, key id) pair joins an overflow group per (status,
//! reason) (written with no address and `"overflow": true`); past
//! [`MAX_OVERFLOW_GROUPS`] of those, per status only (reason `"*"`). So an interval
//! writes at most `max_lines` refusal lines and `max_groups + MAX_OVERFLOW_GROUPS +
//! 9` summaries. Every string of a group, of a summary and (cut by the binding with
//! [`cut_field`] before it renders) of a written refusal line is cut at
//! [`MAX_FIELD_BYTES`], so each line is bounded too.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde_json::{Map, Value};

use super::{format_ts, AuditError, AuditEvent, RawJson, Status};

/// Most overflow groups (per status and reason) in an interval; past it, per status.
pub const MAX_OVERFLOW_GROUPS: usize = 64;
/// Longest address, reason, key id, error or other string of a refusal line or
/// summary: bytes it takes in the JSON line, escapes included (cut at a character
/// boundary by [`cut_field`]).
pub const MAX_FIELD_BYTES: usize = 256;

/// How refusals are aggregated (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusalOptions {
    /// Refusals of a group written one by one per interval (default 5; 0 writes
    /// only summaries).
    pub burst: u32,
    /// Length of an interval (default 60 s; from 1 ms to 1 hour).
    pub interval: Duration,
    /// Most groups per interval before new ones go to the overflow groups
    /// (default 1024; from 1 to 1,000,000).
    pub max_groups: usize,
    /// Most refusal lines written per interval across all groups (default 1000;
    /// at most 1,000,000; 0 writes only summaries). Past it, refusals are only
    /// counted, and their groups' summaries carry them.
    pub max_lines: u32,
}

impl Default for RefusalOptions {
    fn default() -> Self {
        RefusalOptions {
            burst: 5,
            interval: Duration::from_secs(60),
            max_groups: 1024,
            max_lines: 1000,
        }
    }
}

impl RefusalOptions {
    /// Checks the bounds.
    ///
    /// # Errors
    /// [`AuditError::InvalidOption`] naming the field.
    pub fn validate(&self) -> Result<(), AuditError> {
        if self.interval < Duration::from_millis(1) || self.interval > Duration::from_secs(3600) {
            return Err(AuditError::InvalidOption {
                name: "refusal_interval",
                value: format!("{:?}", self.interval),
                fix: "use an interval from 1 ms to 1 hour (default 60 s)",
            });
        }
        if self.max_groups == 0 || self.max_groups > 1_000_000 {
            return Err(AuditError::InvalidOption {
                name: "refusal_max_groups",
                value: self.max_groups.to_string(),
                fix: "use from 1 to 1000000 groups (default 1024)",
            });
        }
        if self.max_lines > 1_000_000 {
            return Err(AuditError::InvalidOption {
                name: "refusal_max_lines",
                value: self.max_lines.to_string(),
                fix: "use from 0 to 1000000 lines per interval (default 1000)",
            });
        }
        Ok(())
    }
}

/// One refusal as the caller describes it (borrowed).
#[derive(Debug, Clone, Copy)]
pub struct Refusal<'a> {
    /// The refusal's status (`unauthorized`, `ip_denied`, `rate_limited`...).
    pub status: Status,
    /// The client address, if known.
    pub client_ip: Option<&'a str>,
    /// Why, in a word (`bad_secret`, `throttled`, `missing_token`...).
    pub reason: &'a str,
    /// The key id the token claimed (a real key's), or `""`.
    pub key_id: &'a str,
    /// The error text of the refusal, if any.
    pub error: Option<&'a str>,
}

/// The counts of one group in the current interval.
#[derive(Debug)]
struct Group {
    status: Status,
    reason: String,
    key_id: String,
    /// The grouped address (an IPv6 /64 as `net::/64`); `None` for the overflow.
    client: Option<String>,
    /// One of the overflow groups (no address, no key id).
    overflow: bool,
    /// Refusals seen this interval.
    seen: u64,
    /// Of them, written one by one.
    written: u64,
    /// The error of the first refusal that was counted, not written.
    error: Option<String>,
}

/// The state of one interval.
#[derive(Debug)]
struct Window {
    started: DateTime<Utc>,
    started_at: Instant,
    groups: HashMap<String, Group>,
    overflow: HashMap<String, Group>,
    /// Refusal lines written this interval, across groups.
    lines: u32,
}

impl Window {
    fn new() -> Self {
        Window {
            started: Utc::now(),
            started_at: Instant::now(),
            groups: HashMap::new(),
            overflow: HashMap::new(),
            lines: 0,
        }
    }
}

/// Counters of a [`RefusalAggregator`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefusalCounts {
    /// Refusals admitted to be written one by one.
    pub written: u64,
    /// Refusals only counted (their summaries carry them).
    pub suppressed: u64,
    /// Summary events produced.
    pub summaries: u64,
}

/// Decides which refusals are written and produces the summaries (see the module
/// docs). `Send + Sync`: producers call [`admit`](Self::admit), the writer
/// thread [`take_summaries`](Self::take_summaries).
#[derive(Debug)]
pub struct RefusalAggregator {
    opts: RefusalOptions,
    window: Mutex<Window>,
    counts: Mutex<RefusalCounts>,
}

impl RefusalAggregator {
    /// An aggregator with `opts`.
    ///
    /// # Errors
    /// [`AuditError::InvalidOption`] for options out of bounds.
    pub fn new(opts: RefusalOptions) -> Result<Self, AuditError> {
        opts.validate()?;
        Ok(RefusalAggregator {
            opts,
            window: Mutex::new(Window::new()),
            counts: Mutex::new(RefusalCounts::default()),
        })
    }

    /// The options.
    #[must_use]
    pub fn options(&self) -> RefusalOptions {
        self.opts
    }

    /// Counts `r` in its group: `true` if it is to be written as a line (one of the
    /// first `burst` of its group in this interval, and within `max_lines` across
    /// groups), `false` if it was only counted (a later summary carries it).
    pub fn admit(&self, r: &Refusal<'_>) -> bool {
        let client = r.client_ip.map(group_address);
        let reason = cut_field(r.reason);
        let key_id = cut_field(r.key_id);
        let mut key = String::with_capacity(
            16 + reason.len() + key_id.len() + client.as_ref().map_or(0, String::len),
        );
        key.push_str(r.status.as_str());
        key.push('\u{1f}');
        key.push_str(reason);
        key.push('\u{1f}');
        key.push_str(key_id);
        key.push('\u{1f}');
        if let Some(c) = &client {
            key.push('@');
            key.push_str(c);
        }
        let burst = u64::from(self.opts.burst);
        let mut guard = self.window.lock();
        let w = &mut *guard;
        let lines_left = w.lines < self.opts.max_lines;
        let at_cap = w.groups.len() >= self.opts.max_groups;
        let group = if let Some(g) = w.groups.get_mut(&key) {
            g
        } else if !at_cap {
            w.groups.entry(key).or_insert_with(|| Group {
                status: r.status,
                reason: reason.to_owned(),
                key_id: key_id.to_owned(),
                client,
                overflow: false,
                seen: 0,
                written: 0,
                error: None,
            })
        } else {
            let full = w.overflow.len() >= MAX_OVERFLOW_GROUPS;
            let reason = if full { "*" } else { reason };
            // Past the cap of overflow groups, a refusal joins its status's catch-all
            // group (reason "*"), always let in: there are only 13 statuses.
            let okey = format!("{}\u{1f}{reason}", r.status.as_str());
            w.overflow.entry(okey).or_insert_with(|| Group {
                status: r.status,
                reason: reason.to_owned(),
                key_id: String::new(),
                client: None,
                overflow: true,
                seen: 0,
                written: 0,
                error: None,
            })
        };
        group.seen += 1;
        let write = group.written < burst && lines_left;
        if write {
            group.written += 1;
            w.lines += 1;
        } else if group.error.is_none() {
            group.error = r.error.map(|e| cut_field(e).to_owned());
        }
        drop(guard);
        let mut c = self.counts.lock();
        if write {
            c.written += 1;
        } else {
            c.suppressed += 1;
        }
        write
    }

    /// Whether the current interval has ended.
    #[must_use]
    pub fn due(&self) -> bool {
        self.window.lock().started_at.elapsed() >= self.opts.interval
    }

    /// Ends the interval if it is over (or whatever its age with `force`: flush and
    /// close) and returns one summary event per group that had refusals counted
    /// but not written, stamped `now`.
    pub fn take_summaries(&self, force: bool) -> Vec<AuditEvent> {
        let ended = {
            let mut w = self.window.lock();
            if !force && w.started_at.elapsed() < self.opts.interval {
                return Vec::new();
            }
            std::mem::replace(&mut *w, Window::new())
        };
        let now = Utc::now();
        let mut out: Vec<AuditEvent> = ended
            .groups
            .into_values()
            .chain(ended.overflow.into_values())
            .filter(|g| g.seen > g.written)
            .map(|g| summary_event(&g, g.seen - g.written, ended.started, now))
            .collect();
        // A stable order: by status, then the group's fields.
        out.sort_by(|a, b| {
            (a.status.as_str(), &a.client_ip, &a.key_id).cmp(&(
                b.status.as_str(),
                &b.client_ip,
                &b.key_id,
            ))
        });
        self.counts.lock().summaries += out.len() as u64;
        out
    }

    /// The counters so far.
    #[must_use]
    pub fn counts(&self) -> RefusalCounts {
        *self.counts.lock()
    }

    /// Groups held now (at most `max_groups` + the overflow groups).
    #[must_use]
    pub fn groups(&self) -> usize {
        let w = self.window.lock();
        w.groups.len() + w.overflow.len()
    }
}

/// The summary of a group: an event of the group's status, key id and address
/// (none for an overflow group), the first counted refusal's error, and the extra
/// fields `reason`, `summary: true`, `count` (refusals not written one by one),
/// `since` (when the interval started) and, for an overflow group, `overflow: true`.
fn summary_event(g: &Group, count: u64, since: DateTime<Utc>, now: DateTime<Utc>) -> AuditEvent {
    let mut extra = Map::new();
    extra.insert("reason".to_owned(), Value::from(g.reason.clone()));
    extra.insert("summary".to_owned(), Value::Bool(true));
    extra.insert("count".to_owned(), Value::from(count));
    extra.insert("since".to_owned(), Value::from(format_ts(&since)));
    if g.overflow {
        extra.insert("overflow".to_owned(), Value::Bool(true));
    }
    let mut ev = AuditEvent::new(g.key_id.clone(), "", "", g.status);
    ev.ts = now;
    ev.error.clone_from(&g.error);
    ev.client_ip.clone_from(&g.client);
    ev.extra = RawJson::extra(&extra);
    ev
}

/// The address a refusal is grouped by: an IPv6 address's /64 network
/// (`2001:db8:1:2::/64`), an IPv4 address (also one written as IPv4-mapped IPv6)
/// as is, anything else (not an address) cut at [`MAX_FIELD_BYTES`].
fn group_address(ip: &str) -> String {
    match ip.trim().parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.to_string(),
        Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let net = u128::from(v6) & !((1u128 << 64) - 1);
                format!("{}/64", Ipv6Addr::from(net))
            }
        },
        Err(_) => cut_field(ip).to_owned(),
    }
}

/// `s` cut so that it takes at most [`MAX_FIELD_BYTES`] bytes in a JSON line, its
/// escapes counted (`"` and `\\` take 2 bytes, a control character up to 6), at a
/// character boundary: what every string of a refusal line or summary is cut to.
#[must_use]
pub fn cut_field(s: &str) -> &str {
    // Fast path: no character takes more than 6 bytes per byte of text.
    if s.len().saturating_mul(6) <= MAX_FIELD_BYTES {
        return s;
    }
    let mut used = 0usize;
    for (i, c) in s.char_indices() {
        let cost = match c {
            '"' | '\\' => 2,
            c if u32::from(c) < 0x20 => 6,
            c => c.len_utf8(),
        };
        used += cost;
        if used > MAX_FIELD_BYTES {
            return &s[..i];
        }
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing unwrap is a failing test")]
mod tests {
    use super::*;

    fn refusal<'a>(ip: &'a str, reason: &'a str) -> Refusal<'a> {
        Refusal {
            status: Status::Unauthorized,
            client_ip: Some(ip),
            reason,
            key_id: "",
            error: Some("missing or invalid token"),
        }
    }

    fn agg(burst: u32, max_groups: usize) -> RefusalAggregator {
        RefusalAggregator::new(RefusalOptions {
            burst,
            interval: Duration::from_secs(3600),
            max_groups,
            max_lines: 1000,
        })
        .unwrap()
    }

    fn count_of(ev: &AuditEvent) -> u64 {
        ev.extra.as_ref().unwrap().to_value()["count"]
            .as_u64()
            .unwrap()
    }

    #[test]
    fn the_first_burst_is_written_the_rest_counted_in_one_summary() {
        let a = agg(5, 16);
        let written = (0..1000)
            .filter(|_| a.admit(&refusal("10.0.0.1", "missing_token")))
            .count();
        assert_eq!(written, 5);
        assert!(
            a.take_summaries(false).is_empty(),
            "the interval is not over"
        );
        let s = a.take_summaries(true);
        assert_eq!(s.len(), 1);
        assert_eq!(count_of(&s[0]), 995);
        assert_eq!(s[0].client_ip.as_deref(), Some("10.0.0.1"));
        assert_eq!(s[0].status, Status::Unauthorized);
        let extra = s[0].extra.as_ref().unwrap().to_value();
        assert_eq!(extra["reason"], "missing_token");
        assert_eq!(extra["summary"], true);
        assert!(extra.get("overflow").is_none());
        assert_eq!(s[0].error.as_deref(), Some("missing or invalid token"));
        assert_eq!(
            a.counts(),
            RefusalCounts {
                written: 5,
                suppressed: 995,
                summaries: 1
            }
        );
        // A new interval starts from zero.
        assert!(a.admit(&refusal("10.0.0.1", "missing_token")));
        assert_eq!(a.groups(), 1);
    }

    #[test]
    fn groups_split_by_address_status_reason_and_key_id() {
        let a = agg(1, 64);
        for ip in ["10.0.0.1", "10.0.0.2"] {
            for reason in ["bad_secret", "throttled"] {
                for key in ["", "fmg_key_a"] {
                    let mut r = refusal(ip, reason);
                    r.key_id = key;
                    assert!(a.admit(&r));
                    assert!(!a.admit(&r));
                }
            }
        }
        let mut denied = refusal("10.0.0.1", "bad_secret");
        denied.status = Status::IpDenied;
        assert!(a.admit(&denied));
        assert_eq!(a.groups(), 9);
        let s = a.take_summaries(true);
        assert_eq!(s.len(), 8);
        assert!(s.iter().all(|e| count_of(e) == 1));
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let a = agg(2, 64);
        for i in 0..50 {
            a.admit(&refusal(&format!("2001:db8:1:2::{i:x}"), "r"));
            a.admit(&refusal(&format!("2001:db8:1:2:ffff::{i:x}"), "r"));
        }
        a.admit(&refusal("::ffff:10.0.0.9", "r"));
        a.admit(&refusal("10.0.0.9", "r"));
        a.admit(&refusal("10.0.0.9", "r"));
        assert_eq!(a.groups(), 2);
        let s = a.take_summaries(true);
        let v6 = s
            .iter()
            .find(|e| e.client_ip.as_deref() == Some("2001:db8:1:2::/64"))
            .unwrap();
        assert_eq!(count_of(v6), 98);
        let v4 = s
            .iter()
            .find(|e| e.client_ip.as_deref() == Some("10.0.0.9"))
            .unwrap();
        assert_eq!(count_of(v4), 1);
    }

    #[test]
    fn a_flood_from_many_addresses_is_bounded_and_fully_counted() {
        let a = agg(5, 100);
        let mut written = 0u64;
        let n = 50_000u64;
        for i in 0..n {
            let ip = format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255);
            let reason = if i % 2 == 0 {
                "missing_token"
            } else {
                "bad_secret"
            };
            if a.admit(&refusal(&ip, reason)) {
                written += 1;
            }
        }
        // 100 groups plus one overflow group per reason.
        assert_eq!(a.groups(), 102);
        let s = a.take_summaries(true);
        let counted: u64 = s.iter().map(count_of).sum();
        assert_eq!(written + counted, n);
        let overflow: Vec<_> = s
            .iter()
            .filter(|e| {
                e.extra
                    .as_ref()
                    .unwrap()
                    .to_value()
                    .get("overflow")
                    .is_some()
            })
            .collect();
        assert_eq!(overflow.len(), 2);
        assert!(overflow.iter().all(|e| e.client_ip.is_none()));
        // Written: at most the burst per group (the overflow groups' included).
        assert!(written <= 5 * 102, "{written}");
    }

    #[test]
    fn past_the_overflow_cap_reasons_fold_into_one_group_per_status() {
        let a = agg(0, 1);
        a.admit(&refusal("10.0.0.1", "first"));
        for i in 0..1000 {
            a.admit(&refusal(
                &format!("10.1.0.{}", i % 250),
                &format!("reason{i}"),
            ));
        }
        assert_eq!(a.groups(), 1 + MAX_OVERFLOW_GROUPS + 1);
        let s = a.take_summaries(true);
        assert_eq!(s.iter().map(count_of).sum::<u64>(), 1001);
        assert!(s
            .iter()
            .any(|e| e.extra.as_ref().unwrap().to_value()["reason"] == "*"));
    }

    #[test]
    fn long_strings_are_cut_and_non_addresses_kept_as_text() {
        let a = agg(0, 4);
        let long = "é".repeat(1000);
        a.admit(&refusal(&long, &long));
        let s = a.take_summaries(true);
        assert!(s[0].client_ip.as_ref().unwrap().len() <= MAX_FIELD_BYTES);
        assert_eq!(group_address(" 10.0.0.1 "), "10.0.0.1");
        assert_eq!(group_address("unknown"), "unknown");
    }

    #[test]
    fn lines_are_bounded_across_groups_and_the_rest_is_counted() {
        let a = RefusalAggregator::new(RefusalOptions {
            burst: 5,
            interval: Duration::from_secs(3600),
            max_groups: 1024,
            max_lines: 100,
        })
        .unwrap();
        let n = 40 * 6 * 10;
        let mut written = 0u64;
        // 40 /64s, 6 groups each (status x reason), 10 refusals per group.
        for i in 0..n {
            let ip = format!("2001:db8:{:x}::1", i % 40);
            let mut r = refusal(&ip, ["a", "b", "c"][i / 40 % 3]);
            if i / 120 % 2 == 1 {
                r.status = Status::IpDenied;
            }
            written += u64::from(a.admit(&r));
        }
        assert_eq!(written, 100, "the line cap, not 240 x 5");
        let s = a.take_summaries(true);
        assert_eq!(s.len(), 240, "every group that had refusals counted");
        assert_eq!(written + s.iter().map(count_of).sum::<u64>(), n as u64);
        assert_eq!(
            a.counts(),
            RefusalCounts {
                written: 100,
                suppressed: n as u64 - 100,
                summaries: 240
            }
        );
        // The next interval starts with the whole allowance again; 0 writes summaries only.
        assert!(a.admit(&refusal("10.0.0.1", "a")));
        let none = RefusalAggregator::new(RefusalOptions {
            max_lines: 0,
            ..RefusalOptions::default()
        })
        .unwrap();
        assert!(!none.admit(&refusal("10.0.0.1", "a")));
        assert_eq!(count_of(&none.take_summaries(true)[0]), 1);
    }

    #[test]
    fn summaries_carry_only_cut_strings() {
        let a = agg(0, 4);
        let long = "x".repeat(60_000);
        let r = Refusal {
            status: Status::IpDenied,
            client_ip: Some(&long),
            reason: &long,
            key_id: &long,
            error: Some(&long),
        };
        a.admit(&r);
        let s = a.take_summaries(true);
        let ev = &s[0];
        assert_eq!(ev.key_id.len(), MAX_FIELD_BYTES);
        assert_eq!(ev.client_ip.as_ref().unwrap().len(), MAX_FIELD_BYTES);
        assert_eq!(ev.error.as_ref().unwrap().len(), MAX_FIELD_BYTES);
        assert_eq!(
            ev.extra.as_ref().unwrap().to_value()["reason"]
                .as_str()
                .unwrap()
                .len(),
            MAX_FIELD_BYTES
        );
        assert_eq!(cut_field("é".repeat(200).as_str()).len(), 256);
        assert_eq!(cut_field("ab"), "ab");
    }

    #[test]
    fn options_are_bounded() {
        let bad = [
            RefusalOptions {
                interval: Duration::ZERO,
                ..RefusalOptions::default()
            },
            RefusalOptions {
                interval: Duration::from_secs(7200),
                ..RefusalOptions::default()
            },
            RefusalOptions {
                max_groups: 0,
                ..RefusalOptions::default()
            },
            RefusalOptions {
                max_lines: 1_000_001,
                ..RefusalOptions::default()
            },
        ];
        for o in bad {
            assert!(RefusalAggregator::new(o).is_err(), "{o:?}");
        }
    }
}
