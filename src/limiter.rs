//! Rate strings and the in-process GCRA rate limiter.
//!
//! # Rate strings
//!
//! [`parse_rate`] is the one parser for rate strings, shared by `RateLimit`, `@rate_limit`
//! and the CLI. A rate is a whole count of calls per period. Accepted spellings
//! (case-insensitive; surrounding and inner whitespace is ignored):
//!
//! | form                         | examples                                   |
//! |------------------------------|--------------------------------------------|
//! | `<count>/<unit>`             | `10/minute`, `10 / min`, `10/m`            |
//! | `<count> per <unit>`         | `10 per minute`, `3 PER HOUR`              |
//! | `<count>/<k> <unit>`         | `100/5 minutes`, `100/5minutes`            |
//! | `<count> per <k> <unit>`     | `100 per 5 minutes`                        |
//!
//! Units: `second`, `sec`, `s`; `minute`, `min`, `m`; `hour`, `hr`, `h`; `day`, `d`; the
//! plurals `seconds`, `secs`, `minutes`, `mins`, `hours`, `hrs`, `days`.
//! The count and the multiplier `k` are whole numbers >= 1; the period `k * unit` must fit in
//! `u64` nanoseconds (about 584 years). Everything else is refused with a [`RateError`]
//! that quotes the input and states the expected form.
//!
//! [`Rate`]'s `Display` is the canonical spelling (`10/minute`, `100/5 minutes`,
//! `7/90 seconds`): the largest unit that divides the period exactly, so
//! `parse_rate(&rate.to_string()) == Ok(rate)` for every rate the parser can produce.
//!
//! # Limiter
//!
//! [`Limiter`] implements "capacity N, refill N per period" as GCRA (the generic cell rate
//! algorithm): each bucket is one timestamp, the theoretical arrival time (TAT), in
//! nanoseconds of a monotonic clock. With emission interval `T = ceil(period / N)` and
//! tolerance `tau = (N - 1) * T`, a call at `now` conforms when `max(TAT, now) - now <= tau`
//! and then moves TAT to `max(TAT, now) + T`. A fresh bucket therefore admits exactly N
//! calls at once, then one every `T`. Rounding `T` up means the long-run rate can be a hair
//! *below* `N / period` (never above): in any interval of length `w` a bucket admits at most
//! `N + floor(w * N / period)` calls. (Rates above 10^9 per second degrade to one call per
//! nanosecond after the burst.)
//!
//! A call touches up to four buckets: per key, global, per (key, tool) when the tool has a
//! rate, and the loop breaker's per (key, tool, argument hash) when one applies. It is
//! admitted only if every touched enforced bucket admits it; a refused call consumes from
//! none.
//!
//! # Cost
//!
//! A call has a cost `n >= 1` ([`Limiter::check_call_at`]; [`Limiter::check`] is cost 1).
//! With quantity, a call at `now` on a bucket whose TAT is `tat` conforms when
//! `max(tat, now) + n*T - now <= limit*T` (for `n = 1`: `max(tat, now) - now <= tau`), and
//! then moves the TAT to `max(tat, now) + n*T`: a cost-5 call consumes 5 units from the
//! per-key, global and tool buckets alike. A cost above a bucket's limit never conforms: it
//! is refused with `retry_after = reset_after` (see [`Gcra::admit_n`]). `remaining` is
//! always in calls of cost 1. The loop breaker counts repetitions: it charges 1 whatever the
//! cost.
//!
//! # Shadow rules
//!
//! Each rule (per key, global, each tool's rate, the loop breaker) is enforced or in shadow
//! ([`Limiter::set_modes`], [`Limiter::set_tool_rate`], [`Limiter::set_loop_breaker`]). A
//! shadow bucket decides as usual but never refuses. When the call is admitted (no enforced
//! bucket refused), every bucket advances exactly as an enforcing one would: a shadow bucket
//! that admits consumes, a shadow bucket that would refuse consumes nothing (enforcement
//! would not have consumed either), so its would-be refusals are the refusals enforcement
//! would have made, and its status the enforcing bucket's. When an enforced bucket refuses,
//! nothing is consumed anywhere. An admitted call reports the shadow bucket that would have
//! refused it ([`Decision::Allowed`]'s `shadow`: the largest `retry_after`), so the caller
//! can audit it as `would_refuse`.
//!
//! # Loop breaker
//!
//! A bucket per (caller key, tool, argument hash), of the rate given by
//! [`Limiter::set_loop_breaker`] (limiter-wide; none by default) or the tool's own
//! ([`Limiter::set_tool_loop_breaker`], `None` = off for that tool; undone with
//! [`Limiter::clear_tool_loop_breaker`]); scope [`Scope::Loop`]. It applies only to tool
//! calls whose arguments are given, and the argument hash is computed only then
//! ([`Limiter::check_call_with`]). A rate of `N/period` admits N identical calls at once,
//! then one per `period / N`.
//!
//! Loop buckets live in the caller's key state, next to its per-key and tool buckets: the
//! key's lock already held by every call guards them too (the commit stays all-or-none, no
//! second map or shard lock), the lookup is one probe of a small per-key hash map keyed by
//! (tool digest, argument hash), and [`Limiter::reset`] and eviction drop them with the key.
//!
//! Memory bound: a loop bucket is created only by an admitted call, and is idle (and
//! dropped) once its TAT passes, at most one loop window after its last admitted call (one
//! emission interval after it for a bucket used once). A key's loop map is pruned of idle
//! buckets when an insertion finds it at twice its size after the last pruning (at least 16),
//! so it holds at most `max(16, 2 * W)` buckets, where `W` is the number of the key's calls
//! admitted within one loop window: an attacker varying the arguments grows memory only as
//! far as the limits that admit his calls allow (under 80 bytes per bucket). Idle keys go
//! with all their loop buckets in the key sweep below.
//!
//! # Argument hash
//!
//! [`ArgsHasher`] hashes a canonical JSON text of the arguments: blake3, first 8 bytes,
//! shown as 16 lowercase hex digits ([`args_hash_hex`]). The text is what Python's
//! `json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)` writes for
//! JSON values: objects with keys sorted by code point, no whitespace, strings in UTF-8 with
//! only `"`, `\`, and control characters escaped, integers in decimal, finite floats in
//! Python's `repr`, `true`/`false`/`null`; non-finite floats `NaN`, `Infinity`, `-Infinity`.
//! Beyond JSON (the Python walker in `src/py/limiter.rs`): tuples are lists, non-string keys
//! are written as `json.dumps` writes them (`1` -> `"1"`, `True` -> `"true"`) and other
//! objects as the JSON string of their `str()` (or `<unprintable TYPE>` if that raises).
//! Values nested deeper than [`ARGS_MAX_DEPTH`] are written as [`ARGS_DEPTH_MARKER`], and a
//! text longer than [`ARGS_MAX_BYTES`] (1 MiB) is hashed up to that length followed by
//! [`ARGS_TRUNCATED_MARKER`]; both markers contain a NUL byte, which no canonical text does. The per-key and per-(key, tool) buckets of one key live under one small mutex
//! (held while the shard read lock of the key map is held, so eviction and reset never race a
//! check); the global bucket is a single atomic updated by compare-and-swap while that mutex
//! is held, so commit is all-or-none and exact under any number of threads.
//!
//! Buckets whose TAT is in the past are indistinguishable from fresh ones and are evicted:
//! explicitly with [`Limiter::evict_idle`], and automatically when new keys arrive (a sweep
//! runs once the number of keys inserted since the last sweep exceeds
//! `max(1024, keys alive after the last sweep)`, so the cost is amortised O(1) per new key and
//! zero for checks of known keys).
//!
//! Limits are per process: with several worker processes they multiply.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use dashmap::mapref::one::Ref;
use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};

const NANOS_PER_SEC: u64 = 1_000_000_000;
/// Longest period whose nanoseconds fit in a `u64`.
const MAX_PERIOD_SECS: u64 = u64::MAX / NANOS_PER_SEC;
/// Minimum number of key insertions between two automatic sweeps.
const MIN_SWEEP_INTERVAL: usize = 1024;

const EXPECTED: &str = "expected \"<count>/<unit>\" or \"<count> per <unit>\" with a whole \
count >= 1 and an optional whole multiplier (e.g. \"10/minute\", \"100/5 minutes\"); units: \
second (s, sec), minute (m, min), hour (h, hr), day (d), plurals allowed";

/// Unit spellings and their length in seconds.
const UNITS: &[(&str, u64)] = &[
    ("s", 1),
    ("sec", 1),
    ("secs", 1),
    ("second", 1),
    ("seconds", 1),
    ("m", 60),
    ("min", 60),
    ("mins", 60),
    ("minute", 60),
    ("minutes", 60),
    ("h", 3600),
    ("hr", 3600),
    ("hrs", 3600),
    ("hour", 3600),
    ("hours", 3600),
    ("d", 86_400),
    ("day", 86_400),
    ("days", 86_400),
];

/// Canonical units, largest first, used by `Display`.
const CANONICAL_UNITS: &[(&str, u64)] = &[
    ("day", 86_400),
    ("hour", 3600),
    ("minute", 60),
    ("second", 1),
];

/// Why a rate string was refused. Every message quotes the input and states the expected form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    /// The string was empty or only whitespace.
    #[error("empty rate string; {}", EXPECTED)]
    Empty,
    /// The string lacks a count, a separator (`/` or `per`) or a unit.
    #[error("invalid rate {input:?}: {detail}; {}", EXPECTED)]
    Malformed {
        /// The rejected input.
        input: String,
        /// What is missing or extra.
        detail: &'static str,
    },
    /// The count is not a whole number (e.g. `abc/minute`).
    #[error(
        "invalid rate {input:?}: the count {count:?} is not a whole number; {}",
        EXPECTED
    )]
    InvalidCount {
        /// The rejected input.
        input: String,
        /// The part that should have been the count.
        count: String,
    },
    /// The count is negative (e.g. `-1/minute`).
    #[error("invalid rate {input:?}: the count must not be negative; {}", EXPECTED)]
    NegativeCount {
        /// The rejected input.
        input: String,
    },
    /// The count has a fractional part (e.g. `1.5/minute`); use a longer period instead.
    #[error(
        "invalid rate {input:?}: the count must be a whole number (for 1.5/minute write \
         3/2 minutes); {}",
        EXPECTED
    )]
    FractionalCount {
        /// The rejected input.
        input: String,
    },
    /// The count is zero.
    #[error("invalid rate {input:?}: the count must be at least 1; {}", EXPECTED)]
    ZeroCount {
        /// The rejected input.
        input: String,
    },
    /// The period multiplier is zero, negative or not a whole number (e.g. `10/0 minutes`).
    #[error(
        "invalid rate {input:?}: the period multiplier {multiplier:?} must be a whole number \
         >= 1; {}",
        EXPECTED
    )]
    InvalidMultiplier {
        /// The rejected input.
        input: String,
        /// The multiplier as written.
        multiplier: String,
    },
    /// The unit is not one of the known spellings.
    #[error("invalid rate {input:?}: unknown unit {unit:?}; {}", EXPECTED)]
    UnknownUnit {
        /// The rejected input.
        input: String,
        /// The unit as written (lower-cased).
        unit: String,
    },
    /// The count exceeds `u64` or the period exceeds about 584 years.
    #[error(
        "invalid rate {input:?}: number too large (the count must fit in 64 bits and the \
         period must be at most {} seconds, about 584 years); {}",
        MAX_PERIOD_SECS,
        EXPECTED
    )]
    Overflow {
        /// The rejected input.
        input: String,
    },
}

/// A rate: `count` calls per `period`.
///
/// Rates produced by [`parse_rate`] have `count >= 1` and a whole number of seconds as
/// period. The fields are public; the limiter treats a `count` of 0 as 1 and a zero period
/// as 1 ns rather than failing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    /// Number of calls allowed per period (also the burst capacity).
    pub count: u64,
    /// Length of the period.
    pub period: Duration,
}

impl Rate {
    /// `count` calls per `period`, unchecked (see the type's notes on degenerate values).
    #[must_use]
    pub const fn new(count: u64, period: Duration) -> Rate {
        Rate { count, period }
    }

    /// Average admitted calls per second (`count / period`); infinite for a zero period.
    #[must_use]
    #[allow(
        clippy::cast_precision_loss,
        reason = "a rate as f64 is for display and headers"
    )]
    pub fn per_second(&self) -> f64 {
        self.count as f64 / self.period.as_secs_f64()
    }

    /// The period in seconds.
    #[must_use]
    pub fn window_seconds(&self) -> f64 {
        self.period.as_secs_f64()
    }
}

impl fmt::Display for Rate {
    /// Canonical spelling: `10/minute`, `100/5 minutes`, `7/90 seconds`. A period with a
    /// sub-second part (never produced by the parser) prints as `N/1.5 seconds`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.period.as_secs();
        let nanos = self.period.subsec_nanos();
        if nanos != 0 || secs == 0 {
            let frac = format!("{nanos:09}");
            let frac = frac.trim_end_matches('0');
            return if frac.is_empty() {
                write!(f, "{}/{secs} seconds", self.count)
            } else {
                write!(f, "{}/{secs}.{frac} seconds", self.count)
            };
        }
        for &(unit, size) in CANONICAL_UNITS {
            if secs % size == 0 {
                let k = secs / size;
                return if k == 1 {
                    write!(f, "{}/{unit}", self.count)
                } else {
                    write!(f, "{}/{k} {unit}s", self.count)
                };
            }
        }
        // Unreachable: every whole number of seconds is divisible by 1.
        write!(f, "{}/{secs} seconds", self.count)
    }
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(s: &str) -> Result<Rate, RateError> {
        parse_rate(s)
    }
}

/// Parse a rate string such as `10/minute`, `100 per 5 minutes` or `5/10s`.
///
/// See the module documentation for every accepted spelling.
///
/// # Errors
///
/// A [`RateError`] variant naming what is wrong: empty input, missing parts, a count that is
/// not a whole number >= 1, a bad multiplier, an unknown unit, or numbers too large.
pub fn parse_rate(s: &str) -> Result<Rate, RateError> {
    let input = || s.to_owned();
    let malformed = |detail| RateError::Malformed {
        input: input(),
        detail,
    };
    let norm = s
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_lowercase();
    if norm.is_empty() {
        return Err(RateError::Empty);
    }
    let (count_part, period_part) = norm
        .split_once('/')
        .or_else(|| norm.split_once(" per "))
        .ok_or_else(|| malformed("no \"/\" or \" per \" between the count and the unit"))?;
    let (count_part, period_part) = (count_part.trim(), period_part.trim());
    if count_part.is_empty() {
        return Err(malformed("the count is missing"));
    }
    if period_part.is_empty() {
        return Err(malformed("the unit is missing"));
    }
    if period_part.contains('/') {
        return Err(malformed("more than one \"/\""));
    }
    let count = parse_count(s, count_part)?;

    // Optional multiplier: the leading number-like run of the period part.
    let num_end = period_part
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | ',' | '-' | '+' | '_')))
        .unwrap_or(period_part.len());
    let (mult_part, unit_part) = period_part.split_at(num_end);
    let unit_part = unit_part.trim();
    let multiplier = if mult_part.is_empty() {
        1
    } else if mult_part.bytes().all(|b| b.is_ascii_digit()) {
        match mult_part.parse::<u64>() {
            Ok(0) => {
                return Err(RateError::InvalidMultiplier {
                    input: input(),
                    multiplier: mult_part.to_owned(),
                })
            }
            Ok(k) => k,
            Err(_) => return Err(RateError::Overflow { input: input() }),
        }
    } else {
        return Err(RateError::InvalidMultiplier {
            input: input(),
            multiplier: mult_part.to_owned(),
        });
    };
    if unit_part.is_empty() {
        return Err(malformed("the unit is missing"));
    }
    let unit_secs = UNITS
        .iter()
        .find(|(name, _)| *name == unit_part)
        .map(|&(_, secs)| secs)
        .ok_or_else(|| RateError::UnknownUnit {
            input: input(),
            unit: unit_part.to_owned(),
        })?;
    let period_secs = multiplier
        .checked_mul(unit_secs)
        .filter(|&p| p <= MAX_PERIOD_SECS)
        .ok_or_else(|| RateError::Overflow { input: input() })?;
    Ok(Rate {
        count,
        period: Duration::from_secs(period_secs),
    })
}

fn parse_count(input: &str, part: &str) -> Result<u64, RateError> {
    let input = || input.to_owned();
    let numberish = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if part.bytes().all(|b| b.is_ascii_digit()) {
        return match part.parse::<u64>() {
            Ok(0) => Err(RateError::ZeroCount { input: input() }),
            Ok(n) => Ok(n),
            Err(_) => Err(RateError::Overflow { input: input() }),
        };
    }
    if let Some(rest) = part.strip_prefix('-') {
        if numberish(rest.trim_start()) {
            return Err(RateError::NegativeCount { input: input() });
        }
    }
    if numberish(part) && part.bytes().filter(|&b| b == b'.').count() == 1 && part != "." {
        return Err(RateError::FractionalCount { input: input() });
    }
    Err(RateError::InvalidCount {
        input: input(),
        count: part.to_owned(),
    })
}

/// Nanoseconds on the process-wide monotonic clock used by [`Limiter::check`]: time elapsed
/// since a fixed origin (the first call in this process).
#[must_use]
pub fn monotonic_nanos() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[allow(
    clippy::cast_precision_loss,
    reason = "seconds as f64 for retry-after values"
)]
fn nanos_to_secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Which bucket refused a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The caller's own per-key limit.
    PerKey,
    /// The limit shared by all callers.
    Global,
    /// The per-(key, tool) limit of the called tool.
    Tool,
    /// The loop breaker: the per-(key, tool, arguments) limit on identical calls.
    Loop,
}

impl Scope {
    /// `"per_key"`, `"global"`, `"tool"` or `"loop"`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Scope::PerKey => "per_key",
            Scope::Global => "global",
            Scope::Tool => "tool",
            Scope::Loop => "loop",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The would-be refusal of a bucket in shadow mode, on an admitted call: what enforcing
/// that rule would have answered.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShadowHit {
    /// The shadow bucket that would have refused.
    pub scope: Scope,
    /// That bucket's rate.
    pub rate: Rate,
    /// Seconds until the call would have been admitted.
    pub retry_after: f64,
    /// Seconds until that bucket is full again.
    pub reset_after: f64,
}

/// The outcome of [`Limiter::check`] and [`Limiter::check_call_at`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decision {
    /// The call was admitted and consumed its cost from every touched bucket (a shadow
    /// bucket that would have refused consumed nothing: see the module notes).
    Allowed {
        /// Calls of cost 1 still admissible right now by the caller's tightest enforced
        /// bucket, per key or per tool (the fewest remaining; on a tie the longest
        /// `reset_after`); never the global bucket, which would tell every caller the
        /// others' traffic; `u64::MAX` when none applies.
        remaining: u64,
        /// Seconds until that bucket is full again (0 when no enforced bucket applies).
        reset_after: f64,
        /// That bucket's rate (`None` when no enforced bucket applies).
        limit: Option<Rate>,
        /// The shadow bucket that would have refused this call (the largest
        /// `retry_after` among them), if any.
        shadow: Option<ShadowHit>,
    },
    /// The call was refused by an enforced bucket and consumed nothing. When several
    /// enforced buckets refuse, this is the one with the largest `retry_after`.
    Limited {
        /// The refusing bucket.
        scope: Scope,
        /// That bucket's rate.
        rate: Rate,
        /// Seconds until this call would be admitted (if nothing else consumes meanwhile).
        retry_after: f64,
        /// Seconds until the refusing bucket is full again.
        reset_after: f64,
    },
}

impl Decision {
    /// True for [`Decision::Allowed`].
    #[must_use]
    pub const fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allowed { .. })
    }

    /// `remaining` of an admitted call, `None` for a refused one.
    #[must_use]
    pub const fn remaining(&self) -> Option<u64> {
        match self {
            Decision::Allowed { remaining, .. } => Some(*remaining),
            Decision::Limited { .. } => None,
        }
    }

    /// The shadow hit of an admitted call.
    #[must_use]
    pub const fn shadow(&self) -> Option<ShadowHit> {
        match self {
            Decision::Allowed { shadow, .. } => *shadow,
            Decision::Limited { .. } => None,
        }
    }
}

/// State of one bucket as seen by [`Limiter::status`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BucketStatus {
    /// The rate's count (burst capacity).
    pub limit: u64,
    /// `limit - remaining`.
    pub used: u64,
    /// Calls that would be admitted right now.
    pub remaining: u64,
    /// The rate's period in seconds.
    pub window_seconds: f64,
    /// Seconds until the bucket is full again (0 when full).
    pub reset_after: f64,
}

/// Every bucket that applies to one key, from [`Limiter::status`].
#[derive(Clone, Debug, PartialEq)]
pub struct LimiterStatus {
    /// The key's own bucket, if a per-key rate is configured.
    pub per_key: Option<BucketStatus>,
    /// The global bucket, if a global rate is configured.
    pub global: Option<BucketStatus>,
    /// One entry per tool that currently has a rate, sorted by tool name.
    pub tools: Vec<(String, BucketStatus)>,
}

/// The GCRA strategy of one rate: its constants, and the decision and status a stored
/// TAT (theoretical arrival time, ns) gives at `now`. Storages keep the TATs: the
/// in-process [`Limiter`] in its cells, the Redis limiter (Python) in Redis, where its
/// Lua script applies [`Gcra::admit_n`]'s arithmetic to the `emission_ns` and `tau_ns`
/// this gives it.
#[derive(Clone, Copy, Debug)]
pub struct Gcra {
    rate: Rate,
    /// Emission interval `T = ceil(period / count)`, >= 1 ns.
    emission: u64,
    /// Tolerance `(count - 1) * T`.
    tau: u64,
    /// `count`, at least 1.
    limit: u64,
}

/// A refusal from one bucket, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketRefusal {
    /// Until the call would conform.
    pub retry: u64,
    /// Until the bucket is full again.
    pub reset: u64,
}

impl Gcra {
    /// The constants of `rate`.
    #[must_use]
    pub fn new(rate: Rate) -> Gcra {
        let limit = rate.count.max(1);
        let period = u64::try_from(rate.period.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        let emission = period.div_ceil(limit).max(1);
        let tau = emission.saturating_mul(limit - 1);
        Gcra {
            rate,
            emission,
            tau,
            limit,
        }
    }

    /// The rate.
    #[must_use]
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Calls a full bucket admits at once (the rate's count, at least 1).
    #[must_use]
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Emission interval `T` in nanoseconds.
    #[must_use]
    pub fn emission_ns(&self) -> u64 {
        self.emission
    }

    /// Tolerance `tau = (limit - 1) * T` in nanoseconds.
    #[must_use]
    pub fn tau_ns(&self) -> u64 {
        self.tau
    }

    /// The new TAT if a call of cost 1 at `now` conforms to a bucket whose TAT is `tat`,
    /// else how long to wait.
    ///
    /// # Errors
    /// [`BucketRefusal`] when the call does not conform.
    pub fn admit(&self, tat: u64, now: u64) -> Result<u64, BucketRefusal> {
        self.admit_n(tat, now, 1)
    }

    /// The new TAT if a call of cost `n` (0 counts as 1) at `now` conforms to a bucket
    /// whose TAT is `tat`, else how long to wait.
    ///
    /// The call conforms when `max(tat, now) + n*T - now <= limit*T`, i.e. when
    /// `max(tat, now) - now <= tau - (n - 1)*T`; the TAT then moves to
    /// `max(tat, now) + n*T`. For `n = 1` this is the plain GCRA test.
    ///
    /// A cost above the bucket's limit can never conform, however long the caller waits:
    /// it is refused with `retry` equal to `reset` (the time until the bucket is full,
    /// which is 0 for a fresh bucket), since the formula's wait would promise an admission
    /// that never comes. The Python side refuses such configurations at set-up.
    ///
    /// # Errors
    /// [`BucketRefusal`] when the call does not conform.
    pub fn admit_n(&self, tat: u64, now: u64, n: u64) -> Result<u64, BucketRefusal> {
        let n = n.max(1);
        let tat = tat.max(now);
        let ahead = tat - now;
        if n > self.limit {
            return Err(BucketRefusal {
                retry: ahead,
                reset: ahead,
            });
        }
        let tolerance = self.tau.saturating_sub(self.emission.saturating_mul(n - 1));
        if ahead <= tolerance {
            Ok(tat.saturating_add(self.emission.saturating_mul(n)))
        } else {
            Err(BucketRefusal {
                retry: ahead - tolerance,
                reset: ahead,
            })
        }
    }

    /// Calls of cost 1 that would conform at `now`.
    #[must_use]
    pub fn remaining(&self, tat: u64, now: u64) -> u64 {
        let ahead = tat.saturating_sub(now);
        if ahead > self.tau {
            0
        } else {
            ((self.tau - ahead) / self.emission)
                .saturating_add(1)
                .min(self.limit)
        }
    }

    /// The bucket whose TAT is `tat`, seen at `now`.
    #[must_use]
    pub fn status(&self, tat: u64, now: u64) -> BucketStatus {
        let remaining = self.remaining(tat, now);
        BucketStatus {
            limit: self.limit,
            used: self.limit - remaining,
            remaining,
            window_seconds: self.rate.window_seconds(),
            reset_after: nanos_to_secs(tat.saturating_sub(now)),
        }
    }
}

/// One configured rule: its GCRA constants and whether it only runs in shadow.
#[derive(Clone, Copy, Debug)]
struct Rule {
    gcra: Gcra,
    shadow: bool,
}

impl Rule {
    fn new(rate: Rate, shadow: bool) -> Rule {
        Rule {
            gcra: Gcra::new(rate),
            shadow,
        }
    }
}

/// What is configured for one tool: its per-(key, tool) rate, and its loop breaker
/// override (`None`: the limiter-wide default; `Some(None)`: off for this tool).
#[derive(Clone, Copy, Debug, Default)]
struct ToolConfig {
    rate: Option<Rule>,
    loop_override: Option<Option<Rule>>,
}

impl ToolConfig {
    const fn is_empty(&self) -> bool {
        self.rate.is_none() && self.loop_override.is_none()
    }
}

/// A key's loop-breaker buckets: TAT by (tool digest, argument hash).
#[derive(Debug, Default)]
struct LoopBuckets {
    tats: HashMap<u128, u64>,
    /// Size at which the next insertion first drops idle buckets (amortised O(1)).
    prune_at: usize,
}

/// Minimum size of a key's loop map before an insertion prunes it.
const MIN_LOOP_PRUNE: usize = 16;

impl LoopBuckets {
    fn insert(&mut self, id: u128, tat: u64, now: u64) {
        if self.tats.len() >= self.prune_at.max(MIN_LOOP_PRUNE) && !self.tats.contains_key(&id) {
            self.tats.retain(|_, t| *t > now);
            self.prune_at = (2 * self.tats.len()).max(MIN_LOOP_PRUNE);
        }
        self.tats.insert(id, tat);
    }
}

/// The buckets of one key: its per-key TAT, its per-(key, tool) TATs and its loop-breaker
/// TATs.
#[derive(Default, Debug)]
struct KeyState {
    /// Per-key TAT (unused, and 0, when no per-key rate is configured).
    tat: u64,
    /// Per-(key, tool) TATs; small, scanned linearly.
    tools: Vec<(Box<str>, u64)>,
    /// Loop-breaker TATs, allocated on the key's first call under a loop breaker.
    loops: Option<Box<LoopBuckets>>,
}

/// Keeps the worst refusal seen so far (largest retry; the first on a tie).
fn note_refusal(
    worst: &mut Option<(Scope, Gcra, BucketRefusal)>,
    scope: Scope,
    gcra: Gcra,
    r: BucketRefusal,
) {
    if worst.is_none_or(|(_, _, w)| r.retry > w.retry) {
        *worst = Some((scope, gcra, r));
    }
}

/// What the buckets of one call said so far.
#[derive(Default)]
struct Tally {
    /// The worst refusal of an enforced bucket: the call is refused.
    refused: Option<(Scope, Gcra, BucketRefusal)>,
    /// The worst would-be refusal of a shadow bucket.
    shadow: Option<(Scope, Gcra, BucketRefusal)>,
    /// The tightest enforced bucket after the call: (remaining, ns until full, rate).
    tightest: Option<(u64, u64, Rate)>,
}

impl Tally {
    /// Applies `rule` to a bucket at `tat`: the new TAT if it admits the call.
    fn bucket(&mut self, scope: Scope, rule: Rule, tat: u64, now: u64, n: u64) -> Option<u64> {
        match rule.gcra.admit_n(tat, now, n) {
            Ok(new) => {
                // The agent's view (`remaining`): its own enforced buckets only. The
                // global bucket counts every caller's calls, so showing it would tell
                // each caller everybody's traffic.
                if !rule.shadow && scope != Scope::Loop && scope != Scope::Global {
                    self.tighten(rule.gcra, new, now);
                }
                Some(new)
            }
            Err(r) => {
                let slot = if rule.shadow {
                    &mut self.shadow
                } else {
                    &mut self.refused
                };
                note_refusal(slot, scope, rule.gcra, r);
                None
            }
        }
    }

    fn tighten(&mut self, g: Gcra, tat: u64, now: u64) {
        self.tighten_to((g.remaining(tat, now), tat.saturating_sub(now), g.rate));
    }

    fn tighten_to(&mut self, (remaining, reset, rate): (u64, u64, Rate)) {
        if self
            .tightest
            .is_none_or(|(r, s, _)| remaining < r || (remaining == r && reset > s))
        {
            self.tightest = Some((remaining, reset, rate));
        }
    }

    /// Adds the global bucket's tally (evaluated last) to this one.
    fn merge(&mut self, other: Tally) {
        if let Some((scope, g, r)) = other.refused {
            note_refusal(&mut self.refused, scope, g, r);
        }
        if let Some((scope, g, r)) = other.shadow {
            note_refusal(&mut self.shadow, scope, g, r);
        }
        if let Some(t) = other.tightest {
            self.tighten_to(t);
        }
    }

    fn decision(&self) -> Decision {
        if let Some((scope, g, r)) = self.refused {
            return limited(scope, g, r);
        }
        let (remaining, reset, limit) = match self.tightest {
            Some((remaining, reset, rate)) => (remaining, nanos_to_secs(reset), Some(rate)),
            None => (u64::MAX, 0.0, None),
        };
        Decision::Allowed {
            remaining,
            reset_after: reset,
            limit,
            shadow: self.shadow.map(|(scope, g, r)| ShadowHit {
                scope,
                rate: g.rate,
                retry_after: nanos_to_secs(r.retry),
                reset_after: nanos_to_secs(r.reset),
            }),
        }
    }
}

/// A 64-bit digest of a tool name for the loop map (FNV-1a; tool names are the server's,
/// not the caller's).
fn tool_digest(tool: &str) -> u64 {
    tool.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The loop bucket of one call: its rule and its id in the key's loop map.
#[derive(Clone, Copy)]
struct LoopCall {
    rule: Rule,
    id: u128,
}

/// In-process GCRA rate limiter with per-key, global, per-(key, tool) and loop-breaker
/// buckets.
///
/// `Send + Sync`; all methods take `&self`. See the module documentation for the algorithm
/// and the concurrency design.
#[derive(Debug)]
pub struct Limiter {
    per_key: Option<Gcra>,
    per_key_shadow: AtomicBool,
    global: Option<Gcra>,
    global_shadow: AtomicBool,
    global_tat: AtomicU64,
    tools: DashMap<Box<str>, ToolConfig>,
    /// Number of entries in `tools`, so checks skip the lookup when there are none.
    tool_count: AtomicUsize,
    /// The limiter-wide loop breaker (`None`: off unless a tool sets its own).
    loop_default: RwLock<Option<Rule>>,
    /// Whether any loop breaker is configured (default or per tool), so calls skip the
    /// loop logic entirely otherwise.
    loop_any: AtomicBool,
    /// Serialises configuration changes (so `tool_count` and `loop_any` stay exact).
    config: Mutex<()>,
    keys: DashMap<Box<str>, Mutex<KeyState>>,
    inserts_since_sweep: AtomicUsize,
    sweep_threshold: AtomicUsize,
    sweeping: AtomicBool,
}

impl Limiter {
    /// A limiter with an optional per-key rate and an optional global rate, both enforced.
    /// Per-tool rates are added with [`Limiter::set_tool_rate`], modes changed with
    /// [`Limiter::set_modes`], loop breakers with [`Limiter::set_loop_breaker`].
    #[must_use]
    pub fn new(per_key: Option<Rate>, global: Option<Rate>) -> Limiter {
        Limiter {
            per_key: per_key.map(Gcra::new),
            per_key_shadow: AtomicBool::new(false),
            global: global.map(Gcra::new),
            global_shadow: AtomicBool::new(false),
            global_tat: AtomicU64::new(0),
            tools: DashMap::new(),
            tool_count: AtomicUsize::new(0),
            loop_default: RwLock::new(None),
            loop_any: AtomicBool::new(false),
            config: Mutex::new(()),
            keys: DashMap::new(),
            inserts_since_sweep: AtomicUsize::new(0),
            sweep_threshold: AtomicUsize::new(MIN_SWEEP_INTERVAL),
            sweeping: AtomicBool::new(false),
        }
    }

    /// Whether the per-key and the global rules run in shadow (decide, never refuse).
    pub fn set_modes(&self, per_key_shadow: bool, global_shadow: bool) {
        self.per_key_shadow.store(per_key_shadow, Ordering::Release);
        self.global_shadow.store(global_shadow, Ordering::Release);
    }

    /// The configured per-key rate.
    #[must_use]
    pub fn per_key_rate(&self) -> Option<Rate> {
        self.per_key.map(|g| g.rate)
    }

    /// The configured global rate.
    #[must_use]
    pub fn global_rate(&self) -> Option<Rate> {
        self.global.map(|g| g.rate)
    }

    fn per_key_rule(&self) -> Option<Rule> {
        self.per_key.map(|gcra| Rule {
            gcra,
            shadow: self.per_key_shadow.load(Ordering::Relaxed),
        })
    }

    fn global_rule(&self) -> Option<Rule> {
        self.global.map(|gcra| Rule {
            gcra,
            shadow: self.global_shadow.load(Ordering::Relaxed),
        })
    }

    /// Changes `tool`'s configuration with `f`, keeping `tool_count` in step.
    fn update_tool(&self, tool: &str, f: impl FnOnce(&mut ToolConfig)) {
        let _config = self.config.lock();
        let mut entry = self.tools.entry(Box::from(tool)).or_insert_with(|| {
            self.tool_count.fetch_add(1, Ordering::AcqRel);
            ToolConfig::default()
        });
        f(&mut entry);
        let empty = entry.is_empty();
        drop(entry);
        if empty && self.tools.remove_if(tool, |_, c| c.is_empty()).is_some() {
            self.tool_count.fetch_sub(1, Ordering::AcqRel);
        }
        self.refresh_loop_any();
    }

    /// Set (`Some`) or clear (`None`) the per-(key, tool) rate of `tool`, enforced or in
    /// shadow. Existing buckets keep their state and are read with the new rate; buckets
    /// of a cleared tool are dropped by the next eviction.
    pub fn set_tool_rate(&self, tool: &str, rate: Option<Rate>, shadow: bool) {
        self.update_tool(tool, |c| c.rate = rate.map(|r| Rule::new(r, shadow)));
    }

    /// The per-(key, tool) rate of `tool` and whether it runs in shadow.
    #[must_use]
    pub fn tool_rate(&self, tool: &str) -> Option<(Rate, bool)> {
        self.tools
            .get(tool)
            .and_then(|c| c.rate)
            .map(|r| (r.gcra.rate, r.shadow))
    }

    /// Recomputes `loop_any`; called with the `config` lock held.
    fn refresh_loop_any(&self) {
        let any = self.loop_default.read().is_some()
            || self
                .tools
                .iter()
                .any(|c| matches!(c.loop_override, Some(Some(_))));
        self.loop_any.store(any, Ordering::Release);
    }

    /// The limiter-wide loop breaker: at most `rate` identical calls (same key, tool and
    /// argument hash) per period, enforced or in shadow; `None` turns it off (tools with
    /// their own loop breaker keep it).
    pub fn set_loop_breaker(&self, rate: Option<Rate>, shadow: bool) {
        let _config = self.config.lock();
        *self.loop_default.write() = rate.map(|r| Rule::new(r, shadow));
        self.refresh_loop_any();
    }

    /// `tool`'s own loop breaker, in place of the limiter-wide one: `None` turns it off
    /// for this tool.
    pub fn set_tool_loop_breaker(&self, tool: &str, rate: Option<Rate>, shadow: bool) {
        self.update_tool(tool, |c| {
            c.loop_override = Some(rate.map(|r| Rule::new(r, shadow)));
        });
    }

    /// Drops `tool`'s own loop breaker: the limiter-wide one applies again.
    pub fn clear_tool_loop_breaker(&self, tool: &str) {
        if self.tools.contains_key(tool) {
            self.update_tool(tool, |c| c.loop_override = None);
        }
    }

    /// The loop breaker that applies to `tool` (rate and shadow), if any.
    #[must_use]
    pub fn loop_breaker(&self, tool: &str) -> Option<(Rate, bool)> {
        let own = self.tools.get(tool).and_then(|c| c.loop_override);
        own.unwrap_or_else(|| *self.loop_default.read())
            .map(|r| (r.gcra.rate, r.shadow))
    }

    /// Check (and on success consume) one call of cost 1 by `key` to `tool` now, on the
    /// process-wide monotonic clock ([`monotonic_nanos`]). No loop breaker applies (no
    /// arguments).
    pub fn check(&self, key: &str, tool: Option<&str>) -> Decision {
        self.check_at(key, tool, monotonic_nanos())
    }

    /// [`Limiter::check`] at an explicit time `now_nanos` (nanoseconds of a monotonic clock;
    /// callers must not mix clocks within one limiter).
    pub fn check_at(&self, key: &str, tool: Option<&str>, now_nanos: u64) -> Decision {
        self.check_call_with(key, tool, 1, None::<fn() -> u64>, now_nanos)
            .0
    }

    /// Check (and on success consume) one call of cost `cost` (0 counts as 1) by `key` to
    /// `tool` with arguments hashed to `args_hash` (see [`ArgsHasher`]), at `now_nanos`.
    /// The loop breaker applies when `tool` and `args_hash` are given and the tool has one.
    pub fn check_call_at(
        &self,
        key: &str,
        tool: Option<&str>,
        cost: u64,
        args_hash: Option<u64>,
        now_nanos: u64,
    ) -> Decision {
        self.check_call_with(key, tool, cost, args_hash.map(|h| move || h), now_nanos)
            .0
    }

    /// [`Limiter::check_call_at`] with the argument hash computed by `args` only when a
    /// loop breaker applies to the tool (before any lock is taken, so `args` may run
    /// arbitrary code). Returns the decision and the hash, if it was computed.
    pub fn check_call_with<F: FnOnce() -> u64>(
        &self,
        key: &str,
        tool: Option<&str>,
        cost: u64,
        args: Option<F>,
        now_nanos: u64,
    ) -> (Decision, Option<u64>) {
        let now = now_nanos;
        let n = cost.max(1);
        let config = match tool {
            Some(name) if self.tool_count.load(Ordering::Acquire) > 0 => {
                self.tools.get(name).map(|c| *c)
            }
            _ => None,
        };
        let tool_rule = match (tool, config.and_then(|c| c.rate)) {
            (Some(name), Some(rule)) => Some((name, rule)),
            _ => None,
        };
        let mut hash = None;
        let mut loop_call = None;
        if let (Some(name), Some(args)) = (tool, args) {
            if self.loop_any.load(Ordering::Acquire) {
                let rule = match config.and_then(|c| c.loop_override) {
                    Some(own) => own,
                    None => *self.loop_default.read(),
                };
                if let Some(rule) = rule {
                    let h = args();
                    hash = Some(h);
                    loop_call = Some(LoopCall {
                        rule,
                        id: (u128::from(tool_digest(name)) << 64) | u128::from(h),
                    });
                }
            }
        }
        let per_key = self.per_key_rule();
        let decision = if per_key.is_none() && tool_rule.is_none() && loop_call.is_none() {
            self.check_global_only(now, n)
        } else {
            self.check_key(key, per_key, tool_rule, loop_call, now, n)
        };
        (decision, hash)
    }

    fn check_global_only(&self, now: u64, n: u64) -> Decision {
        match self.global_rule() {
            Some(rule) => self.global_bucket(rule, now, n).decision(),
            None => Tally::default().decision(),
        }
    }

    /// The global bucket's part of a call whose other buckets all admit it: CAS loop on
    /// the global TAT, consuming unless the bucket refuses. Returns its own tally.
    fn global_bucket(&self, rule: Rule, now: u64, n: u64) -> Tally {
        let mut cur = self.global_tat.load(Ordering::Acquire);
        loop {
            let mut tally = Tally::default();
            let Some(new) = tally.bucket(Scope::Global, rule, cur, now, n) else {
                return tally;
            };
            match self.global_tat.compare_exchange_weak(
                cur,
                new,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return tally,
                Err(actual) => cur = actual,
            }
        }
    }

    fn check_key(
        &self,
        key: &str,
        per_key: Option<Rule>,
        tool: Option<(&str, Rule)>,
        loop_call: Option<LoopCall>,
        now: u64,
        n: u64,
    ) -> Decision {
        let entry = self.key_entry(key, now);
        let mut state = entry.lock();
        let mut tally = Tally::default();

        let new_key_tat =
            per_key.and_then(|rule| tally.bucket(Scope::PerKey, rule, state.tat, now, n));

        let mut new_tool = None;
        if let Some((name, rule)) = tool {
            let idx = state.tools.iter().position(|(t, _)| **t == *name);
            let tat = idx.and_then(|i| state.tools.get(i)).map_or(0, |(_, t)| *t);
            new_tool = tally
                .bucket(Scope::Tool, rule, tat, now, n)
                .map(|tat| (idx, tat));
        }

        let new_loop = loop_call.and_then(|lc| {
            let tat = state
                .loops
                .as_ref()
                .and_then(|l| l.tats.get(&lc.id).copied())
                .unwrap_or(0);
            tally.bucket(Scope::Loop, lc.rule, tat, now, 1)
        });

        if let Some(rule) = self.global_rule() {
            if tally.refused.is_some() {
                // Refused anyway: only look, to report the largest retry.
                if !rule.shadow {
                    if let Err(r) =
                        rule.gcra
                            .admit_n(self.global_tat.load(Ordering::Acquire), now, n)
                    {
                        note_refusal(&mut tally.refused, Scope::Global, rule.gcra, r);
                    }
                }
            } else {
                // Every key bucket's verdict is final and cannot change while we hold the
                // key's lock, so a successful CAS here commits the call.
                let global = self.global_bucket(rule, now, n);
                tally.merge(global);
            }
        }

        if tally.refused.is_some() {
            return tally.decision();
        }
        if let Some(tat) = new_key_tat {
            state.tat = tat;
        }
        match (new_tool, tool) {
            (Some((Some(i), tat)), _) => {
                if let Some(slot) = state.tools.get_mut(i) {
                    slot.1 = tat;
                }
            }
            (Some((None, tat)), Some((name, _))) => {
                state.tools.retain(|(_, t)| *t > now);
                state.tools.push((Box::from(name), tat));
            }
            _ => {}
        }
        if let (Some(tat), Some(lc)) = (new_loop, loop_call) {
            state
                .loops
                .get_or_insert_with(Box::default)
                .insert(lc.id, tat, now);
        }
        tally.decision()
    }

    /// The key's entry, inserted if missing. The returned guard holds the shard's read lock,
    /// which keeps eviction and reset from removing the entry while the caller uses it.
    fn key_entry(&self, key: &str, now: u64) -> Ref<'_, Box<str>, Mutex<KeyState>> {
        if let Some(entry) = self.keys.get(key) {
            return entry;
        }
        self.maybe_sweep(now);
        self.keys.entry(Box::from(key)).or_default().downgrade()
    }

    /// Amortised automatic eviction, run on the insertion path only (no locks held).
    fn maybe_sweep(&self, now: u64) {
        let inserted = self.inserts_since_sweep.fetch_add(1, Ordering::Relaxed) + 1;
        if inserted < self.sweep_threshold.load(Ordering::Relaxed) {
            return;
        }
        if self.sweeping.swap(true, Ordering::Acquire) {
            return;
        }
        self.evict_idle_at(now);
        self.sweep_threshold
            .store(self.keys.len().max(MIN_SWEEP_INTERVAL), Ordering::Relaxed);
        self.inserts_since_sweep.store(0, Ordering::Relaxed);
        self.sweeping.store(false, Ordering::Release);
    }

    /// Every bucket that applies to `key`, now.
    #[must_use]
    pub fn status(&self, key: &str) -> LimiterStatus {
        self.status_at(key, monotonic_nanos())
    }

    /// [`Limiter::status`] at an explicit time. Read-only: consumes nothing. Loop-breaker
    /// buckets are not listed (one per distinct arguments).
    #[must_use]
    pub fn status_at(&self, key: &str, now_nanos: u64) -> LimiterStatus {
        let now = now_nanos;
        let (key_tat, tool_tats) = match self.keys.get(key) {
            Some(entry) => {
                let state = entry.lock();
                (state.tat, state.tools.clone())
            }
            None => (0, Vec::new()),
        };
        let mut tools: Vec<(String, BucketStatus)> = self
            .tools
            .iter()
            .filter_map(|item| {
                let rule = item.value().rate?;
                let tat = tool_tats
                    .iter()
                    .find(|(n, _)| n == item.key())
                    .map_or(0, |(_, t)| *t);
                Some((item.key().to_string(), rule.gcra.status(tat, now)))
            })
            .collect();
        tools.sort_by(|a, b| a.0.cmp(&b.0));
        LimiterStatus {
            per_key: self.per_key.map(|g| g.status(key_tat, now)),
            global: self
                .global
                .map(|g| g.status(self.global_tat.load(Ordering::Acquire), now)),
            tools,
        }
    }

    /// Forget `key`'s per-key bucket, all its per-(key, tool) buckets and its loop-breaker
    /// buckets (not the global one).
    pub fn reset(&self, key: &str) {
        self.keys.remove(key);
    }

    /// Forget every bucket, the global one included (tests).
    #[cfg(test)]
    pub fn reset_all(&self) {
        self.keys.clear();
        self.global_tat.store(0, Ordering::Release);
    }

    /// Forget the global bucket only.
    pub fn reset_global(&self) {
        self.global_tat.store(0, Ordering::Release);
    }

    /// Remove idle buckets (TAT <= now: indistinguishable from fresh), on the process clock.
    /// Returns how many buckets were removed.
    pub fn evict_idle(&self) -> usize {
        self.evict_idle_at(monotonic_nanos())
    }

    /// [`Limiter::evict_idle`] at an explicit time. Also drops buckets of tools whose rate
    /// was cleared. Returns the number of per-key, per-(key, tool) and loop-breaker buckets
    /// removed.
    pub fn evict_idle_at(&self, now_nanos: u64) -> usize {
        let now = now_nanos;
        let per_key = usize::from(self.per_key.is_some());
        let mut removed = 0;
        self.keys.retain(|_, state| {
            // `retain` holds the shard's write lock: no check holds this entry.
            let state = state.get_mut();
            let before = state.tools.len();
            state.tools.retain(|(name, tat)| {
                *tat > now && self.tools.get(&**name).is_some_and(|c| c.rate.is_some())
            });
            removed += before - state.tools.len();
            if let Some(loops) = &mut state.loops {
                let before = loops.tats.len();
                loops.tats.retain(|_, t| *t > now);
                removed += before - loops.tats.len();
                if loops.tats.is_empty() {
                    state.loops = None;
                } else {
                    loops.prune_at = (2 * loops.tats.len()).max(MIN_LOOP_PRUNE);
                }
            }
            let keep = state.tat > now || !state.tools.is_empty() || state.loops.is_some();
            if !keep {
                removed += per_key;
            }
            keep
        });
        removed
    }

    /// The keys that have buckets now (callers seen and not yet evicted as idle),
    /// sorted. For `rate status` without a key.
    #[must_use]
    pub fn tracked_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.keys.iter().map(|e| e.key().to_string()).collect();
        keys.sort_unstable();
        keys
    }

    /// Number of stored per-key, per-(key, tool) and loop-breaker buckets (the global
    /// bucket is not counted). For tests; locks every entry.
    #[cfg(test)]
    #[must_use]
    pub fn bucket_count(&self) -> usize {
        let per_key = usize::from(self.per_key.is_some());
        self.keys
            .iter()
            .map(|entry| {
                let state = entry.lock();
                per_key + state.tools.len() + state.loops.as_ref().map_or(0, |l| l.tats.len())
            })
            .sum()
    }

    /// Number of loop-breaker buckets stored for `key` (tests).
    #[cfg(test)]
    #[must_use]
    pub fn loop_bucket_count(&self, key: &str) -> usize {
        self.keys
            .get(key)
            .map_or(0, |e| e.lock().loops.as_ref().map_or(0, |l| l.tats.len()))
    }
}

fn limited(scope: Scope, g: Gcra, r: BucketRefusal) -> Decision {
    Decision::Limited {
        scope,
        rate: g.rate,
        retry_after: nanos_to_secs(r.retry),
        reset_after: nanos_to_secs(r.reset),
    }
}

// ---------------------------------------------------------------------------------------
// Argument hash

/// Deepest nesting [`ArgsHasher`] callers descend into; deeper values hash as
/// [`ARGS_DEPTH_MARKER`].
pub const ARGS_MAX_DEPTH: usize = 64;
/// Most canonical text hashed; the rest is cut and [`ARGS_TRUNCATED_MARKER`] appended.
pub const ARGS_MAX_BYTES: usize = 1 << 20;
/// Stands for a value nested deeper than [`ARGS_MAX_DEPTH`] (a NUL byte never occurs in
/// canonical JSON, so no complete text can look like it).
pub const ARGS_DEPTH_MARKER: &str = "\0depth";
/// Appended after the first [`ARGS_MAX_BYTES`] of a longer canonical text.
pub const ARGS_TRUNCATED_MARKER: &str = "\0truncated";

/// Streams a canonical JSON text into blake3, within [`ARGS_MAX_BYTES`]; the argument
/// hash is the first 8 bytes of the digest. The walker over the values (Python objects,
/// in `src/py/limiter.rs`) decides the text; this type writes it: raw tokens, and strings
/// escaped as Python's `json.dumps(..., ensure_ascii=False)` escapes them.
#[derive(Debug, Default)]
pub struct ArgsHasher {
    hasher: blake3::Hasher,
    /// Text not yet hashed: small writes are batched (one `update` per chunk).
    buf: Vec<u8>,
    written: usize,
    truncated: bool,
}

/// Bytes gathered before they are fed to blake3.
const ARGS_CHUNK: usize = 16 * 1024;
/// The buffer's first capacity: most calls' canonical arguments fit.
const ARGS_INITIAL_BUF: usize = 512;

impl ArgsHasher {
    /// An empty text, with room for a typical call's arguments (one allocation, not a
    /// growth step per doubling).
    #[must_use]
    pub fn new() -> ArgsHasher {
        ArgsHasher {
            buf: Vec::with_capacity(ARGS_INITIAL_BUF),
            ..ArgsHasher::default()
        }
    }

    /// True once the byte budget is spent: callers stop walking.
    #[must_use]
    pub fn is_full(&self) -> bool {
        self.truncated
    }

    /// Appends `bytes` as they are, up to the budget.
    pub fn raw(&mut self, bytes: &[u8]) {
        if self.truncated {
            return;
        }
        let room = ARGS_MAX_BYTES - self.written;
        let bytes = if bytes.len() > room {
            self.truncated = true;
            &bytes[..room]
        } else {
            bytes
        };
        self.written += bytes.len();
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= ARGS_CHUNK {
            self.hasher.update(&self.buf);
            self.buf.clear();
        }
    }

    /// Appends a value nested too deep.
    pub fn depth_marker(&mut self) {
        self.raw(ARGS_DEPTH_MARKER.as_bytes());
    }

    /// Appends a whole number in decimal.
    pub fn int(&mut self, v: i64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut n = v.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + u8::try_from(n % 10).unwrap_or(0);
            n /= 10;
            if n == 0 {
                break;
            }
        }
        if v < 0 {
            self.raw(b"-");
        }
        self.raw(&digits[i..]);
    }

    /// Appends `s` as a JSON string: `"` and `\` escaped, `\n \r \t \b \f` as such, other
    /// control characters as `\u00xx`, everything else (non-ASCII too) as UTF-8.
    pub fn string(&mut self, s: &str) {
        self.raw(b"\"");
        let bytes = s.as_bytes();
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let esc: &[u8] = match b {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0x08 => b"\\b",
                0x0c => b"\\f",
                0..=0x1f => b"",
                _ => continue,
            };
            self.raw(&bytes[start..i]);
            if esc.is_empty() {
                self.raw(format!("\\u{b:04x}").as_bytes());
            } else {
                self.raw(esc);
            }
            start = i + 1;
        }
        self.raw(&bytes[start..]);
        self.raw(b"\"");
    }

    /// The argument hash: the first 8 bytes of the digest, big-endian (so its 16-digit
    /// lowercase hex is the digest's first 16 hex digits).
    #[must_use]
    pub fn finish(mut self) -> u64 {
        self.hasher.update(&self.buf);
        if self.truncated {
            self.hasher.update(ARGS_TRUNCATED_MARKER.as_bytes());
        }
        let digest = self.hasher.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest.as_bytes()[..8]);
        u64::from_be_bytes(first)
    }
}

/// The 16 lowercase hex digits of an argument hash.
#[must_use]
pub fn args_hash_hex(hash: u64) -> String {
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::sync::Arc;

    const SEC: u64 = NANOS_PER_SEC;

    fn rate(count: u64, secs: u64) -> Rate {
        Rate::new(count, Duration::from_secs(secs))
    }

    fn r(s: &str) -> Rate {
        match parse_rate(s) {
            Ok(rate) => rate,
            Err(e) => panic!("{s:?} should parse: {e}"),
        }
    }

    // ---------------------------------------------------------------- parser

    #[test]
    fn parser_accepts_documented_spellings() {
        let cases: &[(&str, u64, u64)] = &[
            ("10/second", 10, 1),
            ("10/sec", 10, 1),
            ("10/s", 10, 1),
            ("10/seconds", 10, 1),
            ("10/secs", 10, 1),
            ("10/minute", 10, 60),
            ("10/min", 10, 60),
            ("10/m", 10, 60),
            ("10/minutes", 10, 60),
            ("10/hour", 10, 3600),
            ("10/hr", 10, 3600),
            ("10/h", 10, 3600),
            ("10/hours", 10, 3600),
            ("10/day", 10, 86_400),
            ("10/d", 10, 86_400),
            ("10/days", 10, 86_400),
            ("  10/Minute  ", 10, 60),
            ("10 / MINUTE", 10, 60),
            ("10 per minute", 10, 60),
            ("10   PER\tminute", 10, 60),
            ("100/5 minutes", 100, 300),
            ("100/5minutes", 100, 300),
            ("100 per 5 minutes", 100, 300),
            ("5/10s", 5, 10),
            ("5/10 seconds", 5, 10),
            ("1/1 day", 1, 86_400),
            ("007/minute", 7, 60),
            ("18446744073709551615/second", u64::MAX, 1),
            ("1/18446744073 seconds", 1, 18_446_744_073),
        ];
        for &(s, count, secs) in cases {
            assert_eq!(parse_rate(s), Ok(rate(count, secs)), "{s:?}");
            assert_eq!(s.parse::<Rate>(), Ok(rate(count, secs)), "{s:?}");
        }
    }

    #[test]
    fn parser_refuses_with_specific_errors() {
        let inp = |s: &str| s.to_owned();
        assert_eq!(parse_rate(""), Err(RateError::Empty));
        assert_eq!(parse_rate("   "), Err(RateError::Empty));
        assert!(matches!(
            parse_rate("abc"),
            Err(RateError::Malformed { .. })
        ));
        assert!(matches!(parse_rate("10"), Err(RateError::Malformed { .. })));
        assert!(matches!(
            parse_rate("/minute"),
            Err(RateError::Malformed { .. })
        ));
        assert!(matches!(
            parse_rate("10/"),
            Err(RateError::Malformed { .. })
        ));
        assert!(matches!(
            parse_rate("10/5"),
            Err(RateError::Malformed { .. })
        ));
        assert!(matches!(
            parse_rate("10/minute/2"),
            Err(RateError::Malformed { .. })
        ));
        assert_eq!(
            parse_rate("0/minute"),
            Err(RateError::ZeroCount {
                input: inp("0/minute")
            })
        );
        assert_eq!(
            parse_rate("-1/minute"),
            Err(RateError::NegativeCount {
                input: inp("-1/minute")
            })
        );
        assert_eq!(
            parse_rate("1.5/minute"),
            Err(RateError::FractionalCount {
                input: inp("1.5/minute")
            })
        );
        assert_eq!(
            parse_rate("abc/minute"),
            Err(RateError::InvalidCount {
                input: inp("abc/minute"),
                count: inp("abc")
            })
        );
        assert!(matches!(
            parse_rate("1e3/minute"),
            Err(RateError::InvalidCount { .. })
        ));
        assert!(matches!(
            parse_rate("+5/minute"),
            Err(RateError::InvalidCount { .. })
        ));
        assert_eq!(
            parse_rate("10/fortnight"),
            Err(RateError::UnknownUnit {
                input: inp("10/fortnight"),
                unit: inp("fortnight")
            })
        );
        assert!(matches!(
            parse_rate("10/minute5"),
            Err(RateError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_rate("10/0 minutes"),
            Err(RateError::InvalidMultiplier { .. })
        ));
        assert!(matches!(
            parse_rate("10/-5 minutes"),
            Err(RateError::InvalidMultiplier { .. })
        ));
        assert!(matches!(
            parse_rate("10/1.5 minutes"),
            Err(RateError::InvalidMultiplier { .. })
        ));
        assert_eq!(
            parse_rate("18446744073709551616/minute"),
            Err(RateError::Overflow {
                input: inp("18446744073709551616/minute")
            })
        );
        assert!(matches!(
            parse_rate("1/18446744074 seconds"),
            Err(RateError::Overflow { .. })
        ));
        assert!(matches!(
            parse_rate("1/999999999999 days"),
            Err(RateError::Overflow { .. })
        ));
        assert!(matches!(
            parse_rate("1/99999999999999999999 days"),
            Err(RateError::Overflow { .. })
        ));
    }

    #[test]
    fn error_messages_quote_input_and_expected_form() {
        for s in [
            "abc",
            "0/minute",
            "-1/minute",
            "10/fortnight",
            "1.5/minute",
            "99999999999999999999/s",
        ] {
            let msg = match parse_rate(s) {
                Ok(rate) => panic!("{s:?} parsed as {rate}"),
                Err(e) => e.to_string(),
            };
            assert!(msg.contains(&format!("{s:?}")), "{msg}");
            assert!(msg.contains("\"<count>/<unit>\""), "{msg}");
        }
        let msg = parse_rate("10/fortnight").map_or_else(|e| e.to_string(), |_| String::new());
        for unit in ["fortnight", "second", "minute", "hour", "day"] {
            assert!(msg.contains(unit), "{msg}");
        }
        assert!(parse_rate("0/minute")
            .map_or_else(|e| e.to_string(), |_| String::new())
            .contains("at least 1"));
        assert!(RateError::Empty.to_string().contains("empty"));
    }

    #[test]
    fn display_is_canonical() {
        assert_eq!(rate(10, 60).to_string(), "10/minute");
        assert_eq!(rate(10, 1).to_string(), "10/second");
        assert_eq!(rate(10, 3600).to_string(), "10/hour");
        assert_eq!(rate(10, 86_400).to_string(), "10/day");
        assert_eq!(rate(100, 300).to_string(), "100/5 minutes");
        assert_eq!(rate(7, 90).to_string(), "7/90 seconds");
        assert_eq!(rate(7, 7200).to_string(), "7/2 hours");
        assert_eq!(r("3 per 120 seconds").to_string(), "3/2 minutes");
        assert_eq!(
            Rate::new(1, Duration::from_millis(1500)).to_string(),
            "1/1.5 seconds"
        );
        assert!((rate(10, 60).per_second() - 10.0 / 60.0).abs() < 1e-12);
        assert!((rate(10, 60).window_seconds() - 60.0).abs() < f64::EPSILON);
    }

    fn unit_spelling() -> impl Strategy<Value = (&'static str, u64)> {
        proptest::sample::select(UNITS)
    }

    proptest! {
        #[test]
        fn display_round_trips(count in 1u64.., secs in 1u64..=MAX_PERIOD_SECS) {
            let rate = Rate::new(count, Duration::from_secs(secs));
            prop_assert_eq!(parse_rate(&rate.to_string()), Ok(rate));
        }

        #[test]
        fn display_round_trips_round_periods(
            count in 1u64..1_000_000,
            k in 1u64..1000,
            (_, unit) in unit_spelling(),
        ) {
            let rate = Rate::new(count, Duration::from_secs(k * unit));
            prop_assert_eq!(parse_rate(&rate.to_string()), Ok(rate));
        }

        #[test]
        fn any_spelling_parses(
            count in 1u64..1_000_000,
            k in proptest::option::of(1u64..1000),
            (unit_name, unit) in unit_spelling(),
            per in any::<bool>(),
            upper in any::<bool>(),
            pad in 0usize..3,
        ) {
            let sep = if per { " per " } else { "/" };
            let mult = k.map_or(String::new(), |k| format!("{k} "));
            let mut s = format!("{}{count}{sep}{mult}{unit_name}{}", " ".repeat(pad), " ".repeat(pad));
            if upper { s = s.to_uppercase(); }
            let expected = Rate::new(count, Duration::from_secs(k.unwrap_or(1) * unit));
            prop_assert_eq!(parse_rate(&s), Ok(expected));
        }

        #[test]
        fn parser_never_panics(s in "\\PC{0,24}") {
            let _ = parse_rate(&s);
        }
    }

    // ---------------------------------------------------------------- GCRA basics

    #[test]
    fn fresh_bucket_admits_burst_then_one_per_emission() {
        let lim = Limiter::new(Some(rate(3, 3)), None);
        let t0 = 10 * SEC;
        for expected_remaining in [2, 1, 0] {
            assert_eq!(
                lim.check_at("k", None, t0).remaining(),
                Some(expected_remaining)
            );
        }
        match lim.check_at("k", None, t0) {
            Decision::Limited {
                scope,
                rate: got,
                retry_after,
                reset_after,
            } => {
                assert_eq!(scope, Scope::PerKey);
                assert_eq!(got, rate(3, 3));
                assert!((retry_after - 1.0).abs() < 1e-9, "{retry_after}");
                assert!((reset_after - 3.0).abs() < 1e-9, "{reset_after}");
            }
            d @ Decision::Allowed { .. } => panic!("expected refusal, got {d:?}"),
        }
        // One emission interval later exactly one more call.
        assert!(!lim.check_at("k", None, t0 + SEC - 1).is_allowed());
        assert_eq!(lim.check_at("k", None, t0 + SEC).remaining(), Some(0));
        assert!(!lim.check_at("k", None, t0 + SEC).is_allowed());
        // Other keys are independent.
        assert!(lim.check_at("other", None, t0).is_allowed());
    }

    #[test]
    fn non_divisible_period_still_admits_full_burst() {
        // 3/second: T = ceil(1e9 / 3) = 333_333_334 ns; the burst must still be 3.
        let lim = Limiter::new(Some(r("3/second")), None);
        assert_eq!(
            (0..10)
                .filter(|_| lim.check_at("k", None, 0).is_allowed())
                .count(),
            3
        );
        let lim = Limiter::new(Some(r("1000000/second")), None);
        assert_eq!(
            (0..1_000_010)
                .filter(|_| lim.check_at("k", None, 5).is_allowed())
                .count(),
            1_000_000
        );
    }

    #[test]
    fn no_limits_allows_everything() {
        let lim = Limiter::new(None, None);
        assert_eq!(lim.check_at("k", Some("t"), 0).remaining(), Some(u64::MAX));
        assert_eq!(lim.bucket_count(), 0);
    }

    #[test]
    fn refused_tool_call_leaves_per_key_budget_intact() {
        let lim = Limiter::new(Some(rate(5, 60)), None);
        lim.set_tool_rate("search", Some(rate(2, 60)), false);
        assert_eq!(lim.tool_rate("search"), Some((rate(2, 60), false)));
        assert_eq!(lim.tool_rate("other"), None);
        assert_eq!(lim.check_at("k", Some("search"), 0).remaining(), Some(1));
        assert_eq!(lim.check_at("k", Some("search"), 0).remaining(), Some(0));
        for _ in 0..5 {
            match lim.check_at("k", Some("search"), 0) {
                Decision::Limited { scope, .. } => assert_eq!(scope, Scope::Tool),
                d @ Decision::Allowed { .. } => panic!("{d:?}"),
            }
        }
        // 5 - 2 calls left for other tools.
        let admitted = (0..10)
            .filter(|_| lim.check_at("k", Some("other"), 0).is_allowed())
            .count();
        assert_eq!(admitted, 3);
        let st = lim.status_at("k", 0);
        assert_eq!(st.per_key.map(|b| (b.used, b.remaining)), Some((5, 0)));
        assert_eq!(st.tools.len(), 1);
        assert_eq!(st.tools[0].0, "search");
        assert_eq!((st.tools[0].1.used, st.tools[0].1.remaining), (2, 0));
    }

    #[test]
    fn refused_by_global_consumes_no_key_budget() {
        let lim = Limiter::new(Some(rate(3, 60)), Some(rate(2, 60)));
        assert!(lim.check_at("a", None, 0).is_allowed());
        assert!(lim.check_at("b", None, 0).is_allowed());
        match lim.check_at("a", None, 0) {
            Decision::Limited { scope, .. } => assert_eq!(scope, Scope::Global),
            d @ Decision::Allowed { .. } => panic!("{d:?}"),
        }
        let st = lim.status_at("a", 0);
        assert_eq!(st.per_key.map(|b| b.remaining), Some(2));
        assert_eq!(st.global.map(|b| b.remaining), Some(0));
        // Once the global bucket refills, `a` still has its 2 calls.
        lim.reset_global();
        assert!(lim.check_at("a", None, 0).is_allowed());
        assert!(lim.check_at("a", None, 0).is_allowed());
        assert_eq!(lim.status_at("a", 0).per_key.map(|b| b.remaining), Some(0));
        lim.reset_global();
        match lim.check_at("a", None, 0) {
            Decision::Limited { scope, .. } => assert_eq!(scope, Scope::PerKey),
            d @ Decision::Allowed { .. } => panic!("{d:?}"),
        }
    }

    #[test]
    fn reports_the_refusal_with_the_largest_retry() {
        let lim = Limiter::new(Some(rate(1, 60)), Some(rate(1, 10)));
        lim.set_tool_rate("slow", Some(rate(1, 3600)), false);
        assert!(lim.check_at("k", Some("slow"), 0).is_allowed());
        match lim.check_at("k", Some("slow"), 0) {
            Decision::Limited {
                scope, retry_after, ..
            } => {
                assert_eq!(scope, Scope::Tool);
                assert!((retry_after - 3600.0).abs() < 1e-6);
            }
            d @ Decision::Allowed { .. } => panic!("{d:?}"),
        }
        match lim.check_at("k", None, 0) {
            Decision::Limited {
                scope, retry_after, ..
            } => {
                assert_eq!(scope, Scope::PerKey);
                assert!((retry_after - 60.0).abs() < 1e-6);
            }
            d @ Decision::Allowed { .. } => panic!("{d:?}"),
        }
        match lim.check_at("fresh", None, 0) {
            Decision::Limited { scope, .. } => assert_eq!(scope, Scope::Global),
            d @ Decision::Allowed { .. } => panic!("{d:?}"),
        }
    }

    #[test]
    fn allowed_remaining_is_min_over_buckets() {
        let lim = Limiter::new(Some(rate(10, 60)), Some(rate(100, 60)));
        lim.set_tool_rate("t", Some(rate(3, 60)), false);
        assert_eq!(lim.check_at("k", Some("t"), 0).remaining(), Some(2));
        assert_eq!(lim.check_at("k", None, 0).remaining(), Some(8));
        assert_eq!(Scope::PerKey.as_str(), "per_key");
        assert_eq!(Scope::Global.to_string(), "global");
        assert_eq!(Scope::Tool.as_str(), "tool");
    }

    #[test]
    fn status_of_unknown_key_is_full() {
        let lim = Limiter::new(Some(rate(10, 60)), None);
        lim.set_tool_rate("b", Some(rate(2, 1)), false);
        lim.set_tool_rate("a", Some(rate(1, 1)), false);
        let st = lim.status_at("nobody", 5 * SEC);
        let full = |limit, window| BucketStatus {
            limit,
            used: 0,
            remaining: limit,
            window_seconds: window,
            reset_after: 0.0,
        };
        assert_eq!(
            st,
            LimiterStatus {
                per_key: Some(full(10, 60.0)),
                global: None,
                tools: vec![
                    ("a".to_owned(), full(1, 1.0)),
                    ("b".to_owned(), full(2, 1.0))
                ],
            }
        );
        assert_eq!(lim.bucket_count(), 0, "status must not create buckets");
    }

    #[test]
    fn status_reports_used_and_reset() {
        let lim = Limiter::new(Some(rate(4, 4)), None);
        for _ in 0..3 {
            assert!(lim.check_at("k", None, 0).is_allowed());
        }
        let b = lim
            .status_at("k", 0)
            .per_key
            .unwrap_or_else(|| panic!("per-key status"));
        assert_eq!((b.limit, b.used, b.remaining), (4, 3, 1));
        assert!((b.reset_after - 3.0).abs() < 1e-9);
        let b = lim
            .status_at("k", 2 * SEC)
            .per_key
            .unwrap_or_else(|| panic!("per-key status"));
        assert_eq!((b.used, b.remaining), (1, 3));
        let b = lim
            .status_at("k", 10 * SEC)
            .per_key
            .unwrap_or_else(|| panic!("per-key status"));
        assert_eq!((b.used, b.remaining, b.reset_after), (0, 4, 0.0));
    }

    #[test]
    fn reset_clears_key_and_its_tools_but_not_global() {
        let lim = Limiter::new(Some(rate(1, 60)), Some(rate(10, 60)));
        lim.set_tool_rate("t", Some(rate(1, 60)), false);
        assert!(lim.check_at("k", Some("t"), 0).is_allowed());
        assert!(lim.check_at("j", None, 0).is_allowed());
        assert!(!lim.check_at("k", Some("t"), 0).is_allowed());
        assert_eq!(lim.bucket_count(), 3);
        assert_eq!(lim.tracked_keys(), ["j", "k"]);
        lim.reset("k");
        assert_eq!(lim.bucket_count(), 1);
        assert_eq!(lim.tracked_keys(), ["j"]);
        assert_eq!(lim.status_at("k", 0).global.map(|g| g.used), Some(2));
        assert!(lim.check_at("k", Some("t"), 0).is_allowed());
        assert!(
            !lim.check_at("j", None, 0).is_allowed(),
            "other keys keep their state"
        );
        lim.reset_all();
        assert_eq!(lim.bucket_count(), 0);
        assert_eq!(lim.status_at("k", 0).global.map(|g| g.used), Some(0));
        assert!(lim.check_at("j", None, 0).is_allowed());
    }

    #[test]
    fn clearing_a_tool_rate_stops_limiting_it() {
        let lim = Limiter::new(None, None);
        lim.set_tool_rate("t", Some(rate(1, 60)), false);
        assert!(lim.check_at("k", Some("t"), 0).is_allowed());
        assert!(!lim.check_at("k", Some("t"), 0).is_allowed());
        lim.set_tool_rate("t", None, false);
        assert_eq!(lim.tool_rate("t"), None);
        assert!(lim.check_at("k", Some("t"), 0).is_allowed());
        assert_eq!(
            lim.evict_idle_at(0),
            1,
            "the cleared tool's bucket is dropped"
        );
        assert_eq!(lim.bucket_count(), 0);
    }

    #[test]
    fn eviction_removes_only_idle_buckets() {
        let lim = Limiter::new(Some(rate(2, 10)), None);
        lim.set_tool_rate("t", Some(rate(1, 100)), false);
        assert!(lim.check_at("a", None, 0).is_allowed()); // TAT 5 s
        assert!(lim.check_at("b", Some("t"), 0).is_allowed()); // key TAT 5 s, tool TAT 100 s
        assert_eq!(lim.bucket_count(), 3);
        assert_eq!(lim.evict_idle_at(4 * SEC), 0);
        assert_eq!(
            lim.evict_idle_at(5 * SEC),
            1,
            "a's bucket is idle at its TAT"
        );
        assert_eq!(lim.bucket_count(), 2, "b stays: its tool bucket is busy");
        assert!(!lim.check_at("b", Some("t"), 50 * SEC).is_allowed());
        assert_eq!(lim.evict_idle_at(100 * SEC), 2);
        assert_eq!(lim.bucket_count(), 0);
        assert!(lim.check_at("b", Some("t"), 100 * SEC).is_allowed());
    }

    #[test]
    fn automatic_sweep_bounds_the_map() {
        let lim = Limiter::new(Some(rate(1, 1)), None);
        for i in 0..20_000u64 {
            // Each key's bucket is idle one second after its call.
            assert!(lim.check_at(&format!("k{i}"), None, i * SEC).is_allowed());
        }
        let n = lim.bucket_count();
        assert!(n <= 2 * MIN_SWEEP_INTERVAL + 1, "{n} buckets kept");
        assert!(lim.evict_idle() <= n);
    }

    #[test]
    fn check_uses_the_monotonic_clock() {
        let lim = Limiter::new(Some(rate(2, 3600)), None);
        assert!(lim.check("k", None).is_allowed());
        assert!(lim.check("k", None).is_allowed());
        assert!(!lim.check("k", None).is_allowed());
        let b = lim
            .status("k")
            .per_key
            .unwrap_or_else(|| panic!("per-key status"));
        assert_eq!(b.remaining, 0);
        assert!(monotonic_nanos() <= monotonic_nanos());
    }

    #[test]
    fn degenerate_rates_do_not_panic() {
        let lim = Limiter::new(
            Some(Rate::new(0, Duration::ZERO)),
            Some(Rate::new(u64::MAX, Duration::MAX)),
        );
        assert!(lim.check_at("k", None, 0).is_allowed());
        let _ = lim.check_at("k", None, u64::MAX);
        let _ = lim.status_at("k", u64::MAX);
        let _ = Rate::new(0, Duration::ZERO).to_string();
    }

    // ---------------------------------------------------------------- cost, shadow, loop

    fn used(lim: &Limiter, key: &str, now: u64) -> (Option<u64>, Option<u64>, Vec<u64>) {
        let st = lim.status_at(key, now);
        (
            st.per_key.map(|b| b.used),
            st.global.map(|b| b.used),
            st.tools.iter().map(|(_, b)| b.used).collect(),
        )
    }

    #[test]
    fn a_call_consumes_its_cost_from_every_bucket() {
        let lim = Limiter::new(Some(rate(10, 60)), Some(rate(20, 60)));
        lim.set_tool_rate("t", Some(rate(8, 60)), false);
        let d = lim.check_call_at("k", Some("t"), 5, None, 0);
        assert_eq!(
            d.remaining(),
            Some(3),
            "the tool bucket is the tightest: 8 - 5"
        );
        assert_eq!(used(&lim, "k", 0), (Some(5), Some(5), vec![5]));
        match d {
            Decision::Allowed {
                limit, reset_after, ..
            } => {
                assert_eq!(limit, Some(rate(8, 60)));
                assert!((reset_after - 37.5).abs() < 1e-9, "{reset_after}");
            }
            Decision::Limited { .. } => panic!("{d:?}"),
        }
        // 3 left in the tool bucket: a cost-4 call is refused and consumes nothing.
        match lim.check_call_at("k", Some("t"), 4, None, 0) {
            Decision::Limited {
                scope,
                retry_after,
                reset_after,
                ..
            } => {
                assert_eq!(scope, Scope::Tool);
                // T = 7.5 s; one unit short: retry after one emission interval.
                assert!((retry_after - 7.5).abs() < 1e-9, "{retry_after}");
                assert!((reset_after - 37.5).abs() < 1e-9, "{reset_after}");
            }
            d @ Decision::Allowed { .. } => panic!("{d:?}"),
        }
        assert_eq!(used(&lim, "k", 0), (Some(5), Some(5), vec![5]));
        assert!(lim.check_call_at("k", Some("t"), 3, None, 0).is_allowed());
        assert_eq!(used(&lim, "k", 0), (Some(8), Some(8), vec![8]));
        // After one tool emission interval (7.5 s) the tool bucket admits one unit again.
        assert!(!lim
            .check_call_at("k", Some("t"), 2, None, 7_500_000_000)
            .is_allowed());
        assert!(lim
            .check_call_at("k", Some("t"), 1, None, 7_500_000_000)
            .is_allowed());
        // Cost 0 counts as 1.
        assert_eq!(
            lim.check_call_at("j", None, 0, None, 0).remaining(),
            Some(9)
        );
    }

    #[test]
    fn a_cost_above_the_limit_is_refused_with_retry_equal_to_reset() {
        let lim = Limiter::new(Some(rate(4, 60)), None);
        match lim.check_call_at("k", None, 5, None, 0) {
            Decision::Limited {
                scope,
                retry_after,
                reset_after,
                ..
            } => {
                assert_eq!(scope, Scope::PerKey);
                assert!(retry_after == 0.0 && reset_after == 0.0, "a fresh bucket");
            }
            d @ Decision::Allowed { .. } => panic!("{d:?}"),
        }
        assert!(lim.check_call_at("k", None, 2, None, 0).is_allowed());
        match lim.check_call_at("k", None, 5, None, 0) {
            Decision::Limited {
                retry_after,
                reset_after,
                ..
            } => assert!((retry_after - 30.0).abs() < 1e-9 && retry_after == reset_after),
            d @ Decision::Allowed { .. } => panic!("{d:?}"),
        }
        assert_eq!(used(&lim, "k", 0).0, Some(2));
        let g = Gcra::new(rate(4, 60));
        assert_eq!(g.admit_n(0, 0, 4), Ok(60 * SEC));
        assert!(g.admit_n(0, 0, 5).is_err());
        assert_eq!(g.admit(0, 0), g.admit_n(0, 0, 1));
    }

    #[test]
    fn a_shadow_rule_never_refuses_and_counts_what_enforcement_would_refuse() {
        let shadow = Limiter::new(Some(rate(10, 60)), None);
        shadow.set_modes(true, false);
        let enforced = Limiter::new(Some(rate(10, 60)), None);
        let mut would_refuse = 0;
        for i in 0..15 {
            let d = shadow.check_at("k", None, i);
            assert!(d.is_allowed(), "a shadow rule never refuses");
            if let Some(hit) = d.shadow() {
                assert_eq!((hit.scope, hit.rate), (Scope::PerKey, rate(10, 60)));
                would_refuse += 1;
            }
            match d {
                Decision::Allowed {
                    remaining, limit, ..
                } => assert_eq!((remaining, limit), (u64::MAX, None), "no enforced bucket"),
                Decision::Limited { .. } => unreachable!(),
            }
            let _ = enforced.check_at("k", None, i);
        }
        assert_eq!(would_refuse, 5);
        assert_eq!(
            shadow.status_at("k", 20),
            enforced.status_at("k", 20),
            "the shadow bucket advanced exactly as the enforcing one"
        );
        assert_eq!(shadow.status_at("k", 20).per_key.map(|b| b.used), Some(10));
    }

    #[test]
    fn an_enforced_refusal_consumes_nothing_from_shadow_buckets() {
        let lim = Limiter::new(Some(rate(5, 60)), Some(rate(1, 60)));
        lim.set_modes(true, false); // per key in shadow, global enforced
        lim.set_tool_rate("t", Some(rate(5, 60)), true);
        assert!(lim.check_at("a", Some("t"), 0).is_allowed());
        match lim.check_at("b", Some("t"), 0) {
            Decision::Limited { scope, .. } => assert_eq!(scope, Scope::Global),
            d @ Decision::Allowed { .. } => panic!("{d:?}"),
        }
        assert_eq!(used(&lim, "b", 0), (Some(0), Some(1), vec![0]));
        assert_eq!(used(&lim, "a", 0), (Some(1), Some(1), vec![1]));
    }

    #[test]
    fn the_shadow_hit_reported_is_the_largest_retry() {
        let lim = Limiter::new(Some(rate(1, 60)), Some(rate(1, 10)));
        lim.set_modes(true, true);
        lim.set_tool_rate("t", Some(rate(1, 3600)), true);
        lim.set_tool_rate("e", Some(rate(100, 60)), false);
        assert!(lim.check_at("k", Some("t"), 0).shadow().is_none());
        let hit = lim
            .check_at("k", Some("t"), 0)
            .shadow()
            .unwrap_or_else(|| panic!("a shadow hit"));
        assert_eq!((hit.scope, hit.rate), (Scope::Tool, rate(1, 3600)));
        assert!((hit.retry_after - 3600.0).abs() < 1e-9);
        let d = lim.check_at("k", Some("e"), 0);
        assert_eq!(d.shadow().map(|h| h.scope), Some(Scope::PerKey));
        match d {
            Decision::Allowed {
                remaining, limit, ..
            } => assert_eq!((remaining, limit), (99, Some(rate(100, 60)))),
            Decision::Limited { .. } => panic!("{d:?}"),
        }
        // The global bucket (shadow) would refuse a new key's call.
        assert_eq!(
            lim.check_at("fresh", None, 0).shadow().map(|h| h.scope),
            Some(Scope::Global)
        );
        assert_eq!(Scope::Loop.as_str(), "loop");
    }

    #[test]
    fn the_loop_breaker_trips_at_n_plus_one_identical_calls_and_releases() {
        let lim = Limiter::new(Some(rate(1000, 60)), None);
        lim.set_loop_breaker(Some(rate(3, 60)), false);
        let call = |args: u64, now: u64| lim.check_call_at("k", Some("t"), 1, Some(args), now);
        for _ in 0..3 {
            assert!(call(7, 0).is_allowed());
        }
        match call(7, 0) {
            Decision::Limited {
                scope,
                rate: got,
                retry_after,
                ..
            } => {
                assert_eq!((scope, got), (Scope::Loop, rate(3, 60)));
                assert!((retry_after - 20.0).abs() < 1e-9);
            }
            d @ Decision::Allowed { .. } => panic!("{d:?}"),
        }
        assert_eq!(
            lim.status_at("k", 0).per_key.map(|b| b.used),
            Some(3),
            "the refused repetition consumed nothing"
        );
        assert!(call(8, 0).is_allowed(), "changed arguments pass");
        assert!(
            lim.check_call_at("k", Some("u"), 1, Some(7), 0)
                .is_allowed(),
            "another tool"
        );
        assert!(
            lim.check_call_at("j", Some("t"), 1, Some(7), 0)
                .is_allowed(),
            "another key"
        );
        assert!(
            lim.check_at("k", Some("t"), 0).is_allowed(),
            "no arguments: no loop breaker"
        );
        assert!(
            lim.check_call_at("k", None, 1, Some(7), 0).is_allowed(),
            "no tool: no loop breaker"
        );
        assert!(!call(7, 20 * SEC - 1).is_allowed());
        assert!(
            call(7, 20 * SEC).is_allowed(),
            "released after one emission interval"
        );
        // The loop bucket counts repetitions: cost does not matter.
        let lim = Limiter::new(None, None);
        lim.set_loop_breaker(Some(rate(2, 60)), false);
        assert!(lim
            .check_call_at("k", Some("t"), 50, Some(1), 0)
            .is_allowed());
        assert!(lim
            .check_call_at("k", Some("t"), 50, Some(1), 0)
            .is_allowed());
        assert!(!lim
            .check_call_at("k", Some("t"), 50, Some(1), 0)
            .is_allowed());
        lim.reset("k");
        assert_eq!(lim.loop_bucket_count("k"), 0);
        assert!(
            lim.check_call_at("k", Some("t"), 1, Some(1), 0)
                .is_allowed(),
            "reset forgets the loop buckets"
        );
    }

    #[test]
    fn the_loop_breaker_in_shadow_reports_and_tool_overrides_apply() {
        let lim = Limiter::new(None, None);
        assert_eq!(lim.loop_breaker("t"), None, "none configured by default");
        lim.set_loop_breaker(Some(rate(2, 60)), true);
        let call = |tool: &str, now: u64| lim.check_call_with("k", Some(tool), 1, Some(|| 42), now);
        assert_eq!(
            call("t", 0),
            (
                Decision::Allowed {
                    remaining: u64::MAX,
                    reset_after: 0.0,
                    limit: None,
                    shadow: None
                },
                Some(42)
            )
        );
        assert!(call("t", 0).0.shadow().is_none());
        let (d, hash) = call("t", 0);
        assert_eq!(hash, Some(42));
        assert!(d.is_allowed());
        assert_eq!(
            d.shadow().map(|h| (h.scope, h.rate)),
            Some((Scope::Loop, rate(2, 60)))
        );
        // Off for one tool: the hash is not even computed.
        lim.set_tool_loop_breaker("off", None, false);
        assert_eq!(lim.loop_breaker("off"), None);
        let (d, hash) = lim.check_call_with(
            "k",
            Some("off"),
            1,
            Some(|| -> u64 { panic!("computed") }),
            0,
        );
        assert!(d.is_allowed() && hash.is_none());
        // Enforced for another.
        lim.set_tool_loop_breaker("strict", Some(rate(1, 60)), false);
        assert_eq!(lim.loop_breaker("strict"), Some((rate(1, 60), false)));
        assert!(call("strict", 0).0.is_allowed());
        assert!(!call("strict", 0).0.is_allowed());
        lim.clear_tool_loop_breaker("strict");
        assert_eq!(lim.loop_breaker("strict"), Some((rate(2, 60), true)));
        lim.clear_tool_loop_breaker("never-set");
        lim.set_loop_breaker(None, false);
        assert_eq!(lim.loop_breaker("t"), None);
        let (_, hash) =
            lim.check_call_with("k", Some("t"), 1, Some(|| -> u64 { panic!("computed") }), 0);
        assert!(hash.is_none(), "no loop breaker: no hashing");
        assert_eq!(lim.loop_breaker("off"), None);
    }

    #[test]
    fn loop_buckets_stay_bounded_by_the_admitted_calls_of_one_window() {
        // An attacker varying the arguments: 20/minute loop breaker (T = 3 s), a per-key
        // limit of 600/minute, one call every 10 ms for 100 s (10,000 calls).
        let lim = Limiter::new(Some(rate(600, 60)), None);
        lim.set_loop_breaker(Some(rate(20, 60)), false);
        let mut admitted = Vec::new();
        let mut peak = 0;
        for i in 0..10_000u64 {
            let now = i * 10_000_000;
            if lim
                .check_call_at("k", Some("t"), 1, Some(i), now)
                .is_allowed()
            {
                admitted.push(now);
            }
            peak = peak.max(lim.loop_bucket_count("k"));
        }
        // A loop bucket with one call lives one emission interval (3 s); each is created by
        // an admitted call, so at most the calls admitted in 3 s are live, and the map
        // holds at most max(16, twice that).
        let window = 3 * SEC;
        let most_live = admitted
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                admitted[i..]
                    .iter()
                    .take_while(|&&u| u < t + window)
                    .count()
            })
            .max()
            .unwrap_or(0);
        assert!(most_live <= 600 + 30, "{most_live}");
        assert!(
            peak <= (2 * most_live).max(MIN_LOOP_PRUNE) + 1,
            "peak {peak}, live {most_live}"
        );
        let stored = lim.bucket_count();
        assert!(stored > 0);
        assert_eq!(lim.evict_idle_at(200 * SEC), stored);
        assert_eq!(lim.bucket_count(), 0);
        assert!(
            lim.tracked_keys().is_empty(),
            "an idle key's loop buckets go with it"
        );
    }

    #[test]
    fn loop_only_keys_are_tracked_and_evicted() {
        let lim = Limiter::new(None, None);
        lim.set_loop_breaker(Some(rate(2, 10)), false);
        assert!(lim
            .check_call_at("k", Some("t"), 1, Some(1), 0)
            .is_allowed());
        assert!(lim
            .check_call_at("k", Some("t"), 1, Some(2), 0)
            .is_allowed());
        assert_eq!(lim.tracked_keys(), ["k"]);
        assert_eq!(lim.bucket_count(), 2);
        assert_eq!(lim.evict_idle_at(5 * SEC - 1), 0);
        assert_eq!(lim.evict_idle_at(5 * SEC), 2);
        assert!(lim.tracked_keys().is_empty());
    }

    #[test]
    fn tool_configuration_keeps_its_count() {
        let lim = Limiter::new(None, None);
        lim.set_tool_rate("t", Some(rate(1, 60)), true);
        lim.set_tool_loop_breaker("t", Some(rate(1, 60)), false);
        lim.set_tool_rate("t", None, false);
        assert_eq!(
            lim.tool_count.load(Ordering::Acquire),
            1,
            "the loop override stays"
        );
        assert_eq!(lim.tool_rate("t"), None);
        lim.clear_tool_loop_breaker("t");
        assert_eq!(lim.tool_count.load(Ordering::Acquire), 0);
        assert!(lim.tools.is_empty());
        lim.set_tool_rate("u", Some(rate(1, 60)), true);
        assert_eq!(lim.tool_rate("u"), Some((rate(1, 60), true)));
    }

    // ---------------------------------------------------------------- argument hash

    fn hash_text(text: &str) -> u64 {
        let mut h = ArgsHasher::new();
        h.raw(text.as_bytes());
        h.finish()
    }

    #[test]
    fn the_args_hash_is_the_first_8_bytes_of_blake3() {
        let text = r#"{"a":[1.5,"x"],"b":1}"#;
        let digest = blake3::hash(text.as_bytes()).to_hex();
        assert_eq!(args_hash_hex(hash_text(text)), &digest.as_str()[..16]);
        // The same vector is checked from Python (tests/unit/test_limiter_budgets.py).
        assert_eq!(args_hash_hex(hash_text(text)), KNOWN_VECTOR);
        assert_eq!(args_hash_hex(1), "0000000000000001");
    }

    const KNOWN_VECTOR: &str = "e0443edcc28e27e4";

    #[test]
    fn strings_are_escaped_as_python_json_does() {
        let escaped = |s: &str| {
            let mut h = ArgsHasher::new();
            h.string(s);
            h.finish()
        };
        for (raw, json) in [
            ("plain", r#""plain""#),
            ("q\"b\\", r#""q\"b\\""#),
            ("\n\r\t\u{8}\u{c}", r#""\n\r\t\b\f""#),
            ("\u{1}\u{1f}\u{7f}", "\"\\u0001\\u001f\u{7f}\""),
            ("é漢😀", "\"é漢😀\""),
        ] {
            assert_eq!(escaped(raw), hash_text(json), "{raw:?}");
        }
    }

    #[test]
    fn the_hashed_text_is_cut_at_the_budget_with_a_marker() {
        let mut h = ArgsHasher::new();
        let chunk = vec![b'a'; 1000];
        while !h.is_full() {
            h.raw(&chunk);
        }
        let mut want = blake3::Hasher::new();
        want.update(&vec![b'a'; ARGS_MAX_BYTES]);
        want.update(ARGS_TRUNCATED_MARKER.as_bytes());
        let digest = want.finalize();
        assert_eq!(args_hash_hex(h.finish()), &digest.to_hex().as_str()[..16]);
        let mut exact = ArgsHasher::new();
        exact.raw(&vec![b'a'; ARGS_MAX_BYTES]);
        assert!(!exact.is_full(), "exactly the budget is not truncated");
        exact.depth_marker();
        assert!(exact.is_full());
        for v in [0, 7, -42, i64::MAX, i64::MIN] {
            let mut n = ArgsHasher::new();
            n.int(v);
            assert_eq!(n.finish(), hash_text(&v.to_string()), "{v}");
        }
    }

    #[test]
    fn limiter_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Limiter>();
    }

    // ---------------------------------------------------------------- concurrency

    fn hammer(
        lim: &Arc<Limiter>,
        threads: usize,
        calls: usize,
        f: fn(&Limiter, usize, usize) -> bool,
    ) -> usize {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let lim = Arc::clone(lim);
                std::thread::spawn(move || (0..calls).filter(|&i| f(&lim, t, i)).count())
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| panic!("thread panicked")))
            .sum()
    }

    #[test]
    fn sixteen_threads_one_key_admit_exactly_the_limit() {
        let lim = Arc::new(Limiter::new(Some(rate(100, 60)), None));
        let admitted = hammer(&lim, 16, 2000, |l, _, _| {
            l.check_at("k", None, 7 * SEC).is_allowed()
        });
        assert_eq!(admitted, 100);
    }

    #[test]
    fn sixteen_threads_many_keys_admit_exactly_the_global_limit() {
        let lim = Arc::new(Limiter::new(Some(rate(1000, 60)), Some(rate(500, 60))));
        let admitted = hammer(&lim, 16, 2000, |l, t, i| {
            l.check_at(&format!("k{}", (t * 7 + i) % 50), None, 7 * SEC)
                .is_allowed()
        });
        assert_eq!(admitted, 500);
    }

    #[test]
    fn sixteen_threads_all_three_buckets_stay_exact() {
        let lim = Arc::new(Limiter::new(Some(rate(100, 60)), Some(rate(150, 60))));
        lim.set_tool_rate("t", Some(rate(30, 60)), false);
        let admitted = hammer(&lim, 16, 1000, |l, t, i| {
            let key = if t % 2 == 0 { "a" } else { "b" };
            let tool = (i % 2 == 0).then_some("t");
            l.check_at(key, tool, 7 * SEC).is_allowed()
        });
        assert_eq!(admitted, 150, "global binds: 2 keys x 100 > 150");
        let (a, b) = (lim.status_at("a", 7 * SEC), lim.status_at("b", 7 * SEC));
        let used = |s: &LimiterStatus| s.per_key.map_or(0, |p| p.used);
        assert_eq!(used(&a) + used(&b), 150);
        assert!(a.tools[0].1.used <= 30 && b.tools[0].1.used <= 30);
    }

    #[test]
    fn sixteen_threads_with_cost_and_shadow_stay_exact() {
        // Per key 100 enforced, global 50 in shadow, cost 3: exactly 33 calls (99 units).
        let lim = Arc::new(Limiter::new(Some(rate(100, 60)), Some(rate(50, 60))));
        lim.set_modes(false, true);
        lim.set_loop_breaker(Some(rate(1000, 60)), true);
        let admitted = hammer(&lim, 16, 500, |l, t, i| {
            l.check_call_at("k", Some("t"), 3, Some(((t * 500 + i) % 7) as u64), 7 * SEC)
                .is_allowed()
        });
        assert_eq!(admitted, 33);
        let st = lim.status_at("k", 7 * SEC);
        assert_eq!(st.per_key.map(|b| b.used), Some(99));
        assert_eq!(
            st.global.map(|b| b.used),
            Some(48),
            "the shadow global bucket took what enforcement would have: 16 calls of 3"
        );
    }

    #[test]
    fn concurrent_eviction_and_reset_never_lose_consumption() {
        // Eviction at a far-future `now` would drop any bucket; checks at t=0 must still
        // never admit more than the limit in total per key life (reset aside).
        let lim = Arc::new(Limiter::new(Some(rate(50, 60)), None));
        let evictor = {
            let lim = Arc::clone(&lim);
            std::thread::spawn(move || {
                let mut removed = 0;
                for _ in 0..2000 {
                    removed += lim.evict_idle_at(0);
                }
                removed
            })
        };
        let admitted = hammer(&lim, 8, 2000, |l, _, _| {
            l.check_at("k", None, 0).is_allowed()
        });
        assert_eq!(
            evictor
                .join()
                .unwrap_or_else(|_| panic!("evictor panicked")),
            0
        );
        assert_eq!(admitted, 50, "a busy bucket is never evicted");
    }

    // ---------------------------------------------------------------- reference model

    /// A rule of the model: its rate and whether it runs in shadow.
    type MRule = (Rate, bool);

    /// Independent sequential model: u128 arithmetic, one map of TATs. Covers cost,
    /// shadow rules and the loop breaker.
    struct Model {
        per_key: Option<MRule>,
        global: Option<MRule>,
        tools: HashMap<String, MRule>,
        loop_rule: Option<MRule>,
        tats: HashMap<(u8, String, String), u128>,
    }

    /// (scope, retry, reset) in ns.
    type MRefusal = (Scope, u128, u128);

    #[derive(Debug, PartialEq)]
    enum ModelDecision {
        /// remaining, reset ns, limit of the tightest enforced bucket; the shadow hit.
        Allowed(u64, u128, Option<Rate>, Option<MRefusal>),
        Limited(MRefusal),
    }

    impl Model {
        fn consts(rate: Rate) -> (u128, u128, u128) {
            let n = u128::from(rate.count);
            let p = rate.period.as_nanos();
            let t = p.div_ceil(n);
            (n, t, t * (n - 1))
        }

        fn worst(list: &[MRefusal]) -> Option<MRefusal> {
            // Largest retry; ties: the first in touch order per-key, tool, loop, global.
            let mut best: Option<MRefusal> = None;
            for &r in list {
                if best.is_none_or(|b| r.1 > b.1) {
                    best = Some(r);
                }
            }
            best
        }

        fn check(
            &mut self,
            key: &str,
            tool: Option<&str>,
            cost: u64,
            args: Option<u64>,
            now: u64,
        ) -> ModelDecision {
            let now = u128::from(now);
            let mut touched = Vec::new();
            if let Some(rule) = self.per_key {
                touched.push((
                    Scope::PerKey,
                    (0u8, key.to_owned(), String::new()),
                    rule,
                    cost,
                ));
            }
            if let Some(t) = tool {
                if let Some(&rule) = self.tools.get(t) {
                    touched.push((Scope::Tool, (2u8, key.to_owned(), t.to_owned()), rule, cost));
                }
                if let (Some(rule), Some(h)) = (self.loop_rule, args) {
                    touched.push((
                        Scope::Loop,
                        (3u8, key.to_owned(), format!("{t}/{h}")),
                        rule,
                        1,
                    ));
                }
            }
            if let Some(rule) = self.global {
                touched.push((
                    Scope::Global,
                    (1u8, String::new(), String::new()),
                    rule,
                    cost,
                ));
            }
            let mut refusals = Vec::new();
            let mut shadows = Vec::new();
            let mut updates = Vec::new();
            let mut tightest: Option<(u128, u128, Rate)> = None;
            for (scope, id, (rate, shadow), cost) in &touched {
                let (limit, t, tau) = Self::consts(*rate);
                let n = u128::from(*cost);
                let tat = self.tats.get(id).copied().unwrap_or(0).max(now);
                let ahead = tat - now;
                let outcome = if n > limit {
                    Err((*scope, ahead, ahead))
                } else if ahead <= tau - (n - 1) * t {
                    Ok(tat + n * t)
                } else {
                    Err((*scope, ahead - (tau - (n - 1) * t), ahead))
                };
                match outcome {
                    Ok(new) => {
                        if !shadow && *scope != Scope::Loop && *scope != Scope::Global {
                            let ahead = new - now;
                            let remaining = if ahead > tau {
                                0
                            } else {
                                ((tau - ahead) / t + 1).min(limit)
                            };
                            if tightest.is_none_or(|(r, s, _)| {
                                remaining < r || (remaining == r && ahead > s)
                            }) {
                                tightest = Some((remaining, ahead, *rate));
                            }
                        }
                        updates.push((id.clone(), new));
                    }
                    Err(r) if *shadow => shadows.push(r),
                    Err(r) => refusals.push(r),
                }
            }
            if let Some(r) = Self::worst(&refusals) {
                return ModelDecision::Limited(r);
            }
            self.tats.extend(updates);
            match tightest {
                Some((remaining, reset, rate)) => ModelDecision::Allowed(
                    u64::try_from(remaining).unwrap_or(u64::MAX),
                    reset,
                    Some(rate),
                    Self::worst(&shadows),
                ),
                None => ModelDecision::Allowed(u64::MAX, 0, None, Self::worst(&shadows)),
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Check {
            key: usize,
            tool: Option<usize>,
            cost: u64,
            args: Option<u64>,
            advance: u64,
        },
        Reset(usize),
        Evict,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            20 => (0usize..3, proptest::option::of(0usize..3), 1u64..4,
                   proptest::option::of(0u64..3), 0u64..3 * SEC)
                .prop_map(|(key, tool, cost, args, advance)| Op::Check { key, tool, cost, args, advance }),
            1 => (0usize..3).prop_map(Op::Reset),
            2 => Just(Op::Evict),
        ]
    }

    fn small_rate() -> impl Strategy<Value = Rate> {
        (1u64..6, 1u64..8).prop_map(|(n, s)| rate(n, s))
    }

    fn small_rule() -> impl Strategy<Value = MRule> {
        (small_rate(), proptest::bool::weighted(0.3))
    }

    #[allow(clippy::cast_precision_loss, reason = "test tolerance")]
    fn secs_close(a: f64, ns: u128) -> bool {
        (a - ns as f64 / 1e9).abs() < 1e-9
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn limiter_matches_reference_model(
            per_key in proptest::option::of(small_rule()),
            global in proptest::option::of(small_rule()),
            tool_rates in proptest::collection::vec(proptest::option::of(small_rule()), 3),
            loop_rule in proptest::option::of(small_rule()),
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let lim = Limiter::new(per_key.map(|r| r.0), global.map(|r| r.0));
            lim.set_modes(per_key.is_some_and(|r| r.1), global.is_some_and(|r| r.1));
            lim.set_loop_breaker(loop_rule.map(|r| r.0), loop_rule.is_some_and(|r| r.1));
            let mut model = Model { per_key, global, tools: HashMap::new(), loop_rule, tats: HashMap::new() };
            for (i, tr) in tool_rates.iter().enumerate() {
                lim.set_tool_rate(&format!("t{i}"), tr.map(|r| r.0), tr.is_some_and(|r| r.1));
                if let Some(tr) = tr {
                    model.tools.insert(format!("t{i}"), *tr);
                }
            }
            let mut now = 1_000u64;
            for op in ops {
                match op {
                    Op::Check { key, tool, cost, args, advance } => {
                        now += advance;
                        let key = format!("k{key}");
                        let tool = tool.map(|t| format!("t{t}"));
                        let got = lim.check_call_at(&key, tool.as_deref(), cost, args, now);
                        let want = model.check(&key, tool.as_deref(), cost, args, now);
                        match (got, &want) {
                            (Decision::Allowed { remaining, reset_after, limit, shadow },
                             ModelDecision::Allowed(r, reset, l, s)) => {
                                prop_assert_eq!(remaining, *r);
                                prop_assert!(secs_close(reset_after, *reset), "{} vs {}", reset_after, reset);
                                prop_assert_eq!(limit, *l);
                                match (shadow, s) {
                                    (None, None) => {}
                                    (Some(hit), Some((scope, retry, reset))) => {
                                        prop_assert_eq!(hit.scope, *scope);
                                        prop_assert!(secs_close(hit.retry_after, *retry));
                                        prop_assert!(secs_close(hit.reset_after, *reset));
                                    }
                                    (a, b) => prop_assert!(false, "shadow {:?} vs model {:?}", a, b),
                                }
                            }
                            (Decision::Limited { scope, retry_after, reset_after, .. },
                             ModelDecision::Limited((s, retry, reset))) => {
                                prop_assert_eq!(scope, *s);
                                prop_assert!(secs_close(retry_after, *retry));
                                prop_assert!(secs_close(reset_after, *reset));
                            }
                            (got, want) => prop_assert!(false, "limiter {:?} vs model {:?}", got, want),
                        }
                    }
                    Op::Reset(key) => {
                        let key = format!("k{key}");
                        lim.reset(&key);
                        model.tats.retain(|(scope, k, _), _| *scope == 1 || *k != key);
                    }
                    Op::Evict => {
                        lim.evict_idle_at(now);
                    }
                }
            }
        }

        #[test]
        fn never_over_admits_in_any_window(
            count in 1u64..20,
            secs in 1u64..30,
            advances in proptest::collection::vec(0u64..2 * SEC, 1..300),
        ) {
            let lim = Limiter::new(Some(rate(count, secs)), None);
            let period = u128::from(secs * SEC);
            let mut now = 0u64;
            let mut admitted = Vec::new();
            for a in advances {
                now += a;
                if lim.check_at("k", None, now).is_allowed() {
                    admitted.push(now);
                }
            }
            // For every pair of admitted calls i <= j: the calls in [t_i, t_j] number at most
            // N + floor((t_j - t_i) * N / period) -- a precise token bucket's bound.
            for i in 0..admitted.len() {
                for j in i..admitted.len() {
                    let span = u128::from(admitted[j] - admitted[i]);
                    let bound = u128::from(count) + span * u128::from(count) / period;
                    prop_assert!((j - i + 1) as u128 <= bound,
                        "{} calls in {} ns with {}/{}s", j - i + 1, span, count, secs);
                }
            }
        }
    }
}
