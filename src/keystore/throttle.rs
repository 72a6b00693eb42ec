//! Failure budgets: how many failed hash verifications an unproven token may cost.
//!
//! Three budgets, each a fixed window that starts at its first attempt:
//!
//! * per (client address, key id): `max_failures` (default 10 per minute). The address is
//!   the IPv4 address, or the IPv6 /64 (one host usually owns a whole /64, so counting
//!   single IPv6 addresses would give it 2^64 budgets); other strings count as given.
//! * per key id, across all addresses: `key_budget` (default 100 per minute). Past it, an
//!   attempt for that key id is hashed only as a *first try*: from an address with no
//!   failure (and no attempt in flight) for that key id in its window, and at most
//!   `key_budget` such first tries per window. So a key under attack from many addresses
//!   costs at most `2 × key_budget` hash runs per window, and a legitimate client whose
//!   address has not been failing still gets its new token checked, unless the attacker
//!   holds more than `key_budget` addresses (then it waits for the window: 429).
//! * per server: `global_budget` failed hash runs per window across all keys (default 600
//!   per minute: with the default argon2 cost, about 21 ms of one core each on the machine
//!   of `benches/core.rs`, failed hashing uses at most about a fifth of one core).
//! * per client address, for key ids the store does not have: `unknown_budget` store reads
//!   that found nothing (default 20 per minute). Past it, that address's unproven tokens are
//!   refused before the store is read. (A repeated unknown id is answered by the negative
//!   cache without a read, and does not count.)
//!
//! An attempt *reserves* its place in every budget before hashing, atomically (one lock),
//! so parallel attempts never get more hash runs than sequential ones; the reservation
//! becomes a failure if the secret was wrong, and is released otherwise (a match, or no
//! hash ran: unknown key, revoked, busy). Tokens already proven on this node never come
//! here (see [`crate::hashing::ProvenDigests`]): the budgets only ever stop unproven tokens.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The failure budgets of a [`super::KeyManager`] (see the module docs). A value of 0
/// disables that budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailThrottle {
    /// Failures allowed per (client address, key id) and window.
    pub max_failures: u32,
    /// Window length of every budget, starting at its first attempt.
    pub window: Duration,
    /// Failures per key id and window across all addresses; past it only first tries from
    /// clean addresses are hashed (at most as many again).
    pub key_budget: u32,
    /// Failed hash runs per window on this server, across all keys.
    pub global_budget: u32,
    /// Store reads per client address and window that found no key.
    pub unknown_budget: u32,
}

impl Default for FailThrottle {
    /// Per minute: 10 per (address, key id), 100 (+100 first tries) per key id, 600 in all;
    /// 20 unknown key ids per address.
    fn default() -> Self {
        Self {
            max_failures: 10,
            window: Duration::from_secs(60),
            key_budget: 100,
            global_budget: 600,
            unknown_budget: 20,
        }
    }
}

/// Which budget refused an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottleScope {
    /// The (client address, key id) pair.
    Client,
    /// The key id, across all addresses.
    Key,
    /// The whole server.
    Server,
    /// The client address, for naming key ids the store does not have.
    UnknownKeys,
}

impl ThrottleScope {
    /// `"client"`, `"key"` or `"server"`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Key => "key",
            Self::Server => "server",
            Self::UnknownKeys => "unknown_keys",
        }
    }
}

/// An attempt refused without hashing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused {
    pub(crate) scope: ThrottleScope,
    pub(crate) retry_after: Duration,
}

/// Above this many slots, slots whose window ended are swept on the next reservation.
const SWEEP_AT: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Slot {
    failures: u32,
    pending: u32,
    start: Instant,
}

impl Slot {
    fn new(now: Instant) -> Self {
        Self {
            failures: 0,
            pending: 0,
            start: now,
        }
    }

    /// Starts a new window if this one has ended; returns whether it did.
    fn roll(&mut self, now: Instant, window: Duration) -> bool {
        if now.saturating_duration_since(self.start) >= window {
            self.failures = 0;
            self.start = now;
            true
        } else {
            false
        }
    }

    fn used(&self) -> u32 {
        self.failures.saturating_add(self.pending)
    }

    fn retry_after(&self, now: Instant, window: Duration) -> Duration {
        window.saturating_sub(now.saturating_duration_since(self.start))
    }

    fn idle(&self, now: Instant, window: Duration) -> bool {
        self.pending == 0
            && (self.failures == 0 || now.saturating_duration_since(self.start) >= window)
    }
}

#[derive(Debug, Clone, Copy)]
struct KeySlot {
    all: Slot,
    /// First tries past the budget: failures and attempts in flight.
    first: u32,
    first_pending: u32,
}

#[derive(Debug)]
struct State {
    pairs: HashMap<(String, String), Slot>,
    keys: HashMap<String, KeySlot>,
    global: Slot,
    /// Per address: store reads that found no key (`pending` unused).
    unknown: HashMap<String, Slot>,
}

/// The budgets' counters behind one lock (reservations touch up to three at once).
#[derive(Debug)]
pub(crate) struct Throttle {
    limits: FailThrottle,
    state: Mutex<State>,
}

/// The address a client string is counted under: an IPv4 address as is (also written as
/// an IPv4-mapped IPv6 address), an IPv6 address as its /64, anything else as given.
#[must_use]
pub fn client_bucket(client: &str) -> Cow<'_, str> {
    match client.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => Cow::Owned(v4.to_string()),
            None => {
                let s = v6.segments();
                Cow::Owned(format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3]))
            }
        },
        Ok(IpAddr::V4(_)) | Err(_) => Cow::Borrowed(client),
    }
}

impl Throttle {
    pub(crate) fn new(limits: FailThrottle) -> Self {
        Self {
            limits,
            state: Mutex::new(State {
                pairs: HashMap::new(),
                keys: HashMap::new(),
                global: Slot::new(Instant::now()),
                unknown: HashMap::new(),
            }),
        }
    }

    /// Reserves one hash run for `client` (an address, or any string) against `key`, or
    /// says which budget refuses it and for how long.
    pub(crate) fn reserve(
        &self,
        client: &str,
        key: &str,
        now: Instant,
    ) -> Result<Reservation<'_>, Refused> {
        let l = self.limits;
        let addr = client_bucket(client).into_owned();
        // Made only once every check passed: dropping a reservation releases its places.
        let reservation = |addr: String, first_try: bool, settled: bool| Reservation {
            throttle: self,
            addr,
            key: key.to_owned(),
            first_try,
            settled,
        };
        if l.max_failures == 0 && l.key_budget == 0 && l.global_budget == 0 && l.unknown_budget == 0
        {
            return Ok(reservation(addr, false, true)); // nothing to count
        }
        let mut first_try = false;
        let mut st = self.state.lock();
        if st.pairs.len() > SWEEP_AT {
            st.pairs.retain(|_, s| !s.idle(now, l.window));
        }
        if st.keys.len() > SWEEP_AT {
            st.keys.retain(|_, s| !s.all.idle(now, l.window));
        }
        if st.unknown.len() > SWEEP_AT {
            st.unknown.retain(|_, s| !s.idle(now, l.window));
        }
        if l.unknown_budget > 0 {
            if let Some(u) = st.unknown.get_mut(&addr) {
                u.roll(now, l.window);
                if u.failures >= l.unknown_budget {
                    return Err(Refused {
                        scope: ThrottleScope::UnknownKeys,
                        retry_after: u.retry_after(now, l.window),
                    });
                }
            }
        }
        let pair_key = (addr, key.to_owned());
        let pair = st.pairs.get_mut(&pair_key).map(|s| {
            s.roll(now, l.window);
            *s
        });
        let clean = pair.is_none_or(|p| p.used() == 0);
        if let Some(p) = pair {
            if l.max_failures > 0 && p.used() >= l.max_failures {
                return Err(Refused {
                    scope: ThrottleScope::Client,
                    retry_after: p.retry_after(now, l.window),
                });
            }
        }
        if l.key_budget > 0 {
            if let Some(k) = st.keys.get_mut(key) {
                if k.all.roll(now, l.window) {
                    k.first = 0;
                }
                if k.all.used() >= l.key_budget {
                    if clean && k.first.saturating_add(k.first_pending) < l.key_budget {
                        first_try = true;
                    } else {
                        return Err(Refused {
                            scope: ThrottleScope::Key,
                            retry_after: k.all.retry_after(now, l.window),
                        });
                    }
                }
            }
        }
        if l.global_budget > 0 {
            st.global.roll(now, l.window);
            if st.global.used() >= l.global_budget {
                return Err(Refused {
                    scope: ThrottleScope::Server,
                    retry_after: st.global.retry_after(now, l.window),
                });
            }
        }
        // Every check passed: count the attempt in flight everywhere.
        let addr = pair_key.0.clone();
        if l.max_failures > 0 {
            st.pairs
                .entry(pair_key)
                .or_insert_with(|| Slot::new(now))
                .pending += 1;
        }
        if l.key_budget > 0 {
            let k = st.keys.entry(key.to_owned()).or_insert_with(|| KeySlot {
                all: Slot::new(now),
                first: 0,
                first_pending: 0,
            });
            k.all.pending += 1;
            if first_try {
                k.first_pending += 1;
            }
        }
        if l.global_budget > 0 {
            st.global.pending += 1;
        }
        Ok(reservation(addr, first_try, false))
    }

    /// Settles a reservation: a failure (counted in each budget) or a release.
    fn settle(&self, r: &Reservation<'_>, failed: bool, now: Instant) {
        let l = self.limits;
        let mut st = self.state.lock();
        if l.max_failures > 0 {
            let pair_key = (r.addr.clone(), r.key.clone());
            if let Some(s) = st.pairs.get_mut(&pair_key) {
                s.pending = s.pending.saturating_sub(1);
                if failed {
                    s.roll(now, l.window);
                    s.failures = s.failures.saturating_add(1);
                }
                if s.idle(now, l.window) {
                    st.pairs.remove(&pair_key);
                }
            }
        }
        if l.key_budget > 0 {
            if let Some(k) = st.keys.get_mut(&r.key) {
                k.all.pending = k.all.pending.saturating_sub(1);
                if r.first_try {
                    k.first_pending = k.first_pending.saturating_sub(1);
                }
                if failed {
                    if k.all.roll(now, l.window) {
                        k.first = 0;
                    }
                    k.all.failures = k.all.failures.saturating_add(1);
                    if r.first_try {
                        k.first = k.first.saturating_add(1);
                    }
                }
                if k.all.idle(now, l.window) && k.first_pending == 0 {
                    st.keys.remove(&r.key);
                }
            }
        }
        if l.global_budget > 0 {
            st.global.pending = st.global.pending.saturating_sub(1);
            if failed {
                st.global.roll(now, l.window);
                st.global.failures = st.global.failures.saturating_add(1);
            }
        }
    }

    /// Counts a store read by `addr` that found no key.
    fn note_unknown(&self, addr: &str, now: Instant) {
        let l = self.limits;
        if l.unknown_budget == 0 {
            return;
        }
        let mut st = self.state.lock();
        let slot = st
            .unknown
            .entry(addr.to_owned())
            .or_insert_with(|| Slot::new(now));
        slot.roll(now, l.window);
        slot.failures = slot.failures.saturating_add(1);
    }

    /// Number of (address, key id) and key-id slots held (tests: the maps stay bounded).
    #[cfg(test)]
    fn slots(&self) -> (usize, usize) {
        let st = self.state.lock();
        (st.pairs.len(), st.keys.len())
    }
}

/// One reserved hash run. [`Reservation::failed`] counts it as a failure; dropping it
/// otherwise releases it (the secret matched, or no hash ran).
#[derive(Debug)]
pub(crate) struct Reservation<'a> {
    throttle: &'a Throttle,
    addr: String,
    key: String,
    first_try: bool,
    settled: bool,
}

impl Reservation<'_> {
    /// The store has no such key: released, and counted against the address's budget of
    /// unknown key ids.
    pub(crate) fn unknown_key(self, now: Instant) {
        self.throttle.note_unknown(&self.addr, now);
    }

    /// The hash ran and the secret was wrong.
    pub(crate) fn failed(mut self, now: Instant) {
        if !self.settled {
            self.settled = true;
            self.throttle.settle(&self, true, now);
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.settled = true;
            self.throttle.settle(self, false, Instant::now());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn throttle(max_failures: u32, key_budget: u32, global_budget: u32) -> Throttle {
        Throttle::new(FailThrottle {
            max_failures,
            window: Duration::from_secs(60),
            key_budget,
            global_budget,
            unknown_budget: 0,
        })
    }

    #[test]
    fn an_address_naming_unknown_key_ids_is_stopped_before_the_store() {
        let t = Throttle::new(FailThrottle {
            unknown_budget: 3,
            ..FailThrottle::default()
        });
        let now = Instant::now();
        for i in 0..3 {
            t.reserve("2001:db8::1", &format!("k{i}"), now)
                .unwrap()
                .unknown_key(now);
        }
        // Any key id, from anywhere in that /64: refused; other addresses are not.
        let r = t.reserve("2001:db8::2", "real", now).unwrap_err();
        assert_eq!(r.scope, ThrottleScope::UnknownKeys);
        drop(t.reserve("2001:db8:0:1::1", "real", now).unwrap());
        // A reservation ended as unknown held no other place.
        assert_eq!(t.slots(), (0, 0));
        drop(
            t.reserve("2001:db8::2", "real", now + Duration::from_secs(60))
                .unwrap(),
        );
    }

    fn fail(t: &Throttle, client: &str, key: &str, now: Instant) -> Result<(), Refused> {
        t.reserve(client, key, now).map(|r| r.failed(now))
    }

    #[test]
    fn ipv6_counts_per_64_and_ipv4_per_address() {
        assert_eq!(client_bucket("10.0.0.1"), "10.0.0.1");
        assert_eq!(client_bucket("::ffff:10.0.0.1"), "10.0.0.1");
        assert_eq!(client_bucket("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64");
        assert_eq!(client_bucket("2001:db8:1:2::9"), "2001:db8:1:2::/64");
        assert_eq!(client_bucket("2001:DB8:1:3::1"), "2001:db8:1:3::/64");
        assert_eq!(client_bucket("not an address"), "not an address");
        assert_eq!(client_bucket(""), "");

        let t = throttle(3, 0, 0);
        let now = Instant::now();
        for host in ["2001:db8::1", "2001:db8::2", "2001:db8::ffff:1"] {
            fail(&t, host, "k", now).unwrap();
        }
        let r = fail(&t, "2001:db8::99", "k", now).unwrap_err();
        assert_eq!(r.scope, ThrottleScope::Client);
        fail(&t, "2001:db8:0:1::1", "k", now).unwrap(); // another /64
        fail(&t, "10.0.0.1", "k", now).unwrap();
        fail(&t, "10.0.0.2", "k", now).unwrap(); // IPv4: each address its own
    }

    #[test]
    fn reservations_in_flight_count_so_parallel_attempts_never_overshoot() {
        let t = throttle(3, 0, 0);
        let now = Instant::now();
        let held: Vec<_> = (0..3).map(|_| t.reserve("a", "k", now).unwrap()).collect();
        let r = t.reserve("a", "k", now).unwrap_err();
        assert_eq!(r.scope, ThrottleScope::Client);
        assert_eq!(r.retry_after, Duration::from_secs(60));
        // Refusals reserve nothing, and release nothing either.
        for _ in 0..10 {
            assert!(t.reserve("a", "k", now).is_err());
        }
        // Two matched (released), one failed: two places free again.
        let mut held = held.into_iter();
        held.next().unwrap().failed(now);
        drop(held);
        fail(&t, "a", "k", now).unwrap();
        fail(&t, "a", "k", now).unwrap();
        assert!(fail(&t, "a", "k", now).is_err());
        // The window ends 60 s after its first attempt.
        let later = now + Duration::from_secs(60);
        fail(&t, "a", "k", later).unwrap();
    }

    #[test]
    fn past_the_key_budget_only_first_tries_from_clean_addresses_are_hashed() {
        // Per key: 4, then at most 4 first tries; per address: 2.
        let t = throttle(2, 4, 0);
        let now = Instant::now();
        for addr in ["a", "a", "b", "b"] {
            fail(&t, addr, "k", now).unwrap();
        }
        // Budget spent: a dirty address is refused (by the key budget, not its own).
        let dirty = fail(&t, "b", "k", now).unwrap_err();
        assert_eq!(dirty.scope, ThrottleScope::Client);
        // Clean addresses: one first try each, four in all.
        for addr in ["c", "d", "e", "f"] {
            fail(&t, addr, "k", now).unwrap();
            let again = fail(&t, addr, "k", now).unwrap_err();
            assert_eq!(again.scope, ThrottleScope::Key, "{addr}");
        }
        let r = fail(&t, "g", "k", now).unwrap_err();
        assert_eq!(r.scope, ThrottleScope::Key);
        // Another key id is not affected; a first try that matches frees its place.
        fail(&t, "g", "other", now).unwrap();
        let t = throttle(2, 1, 0);
        fail(&t, "a", "k", now).unwrap();
        drop(t.reserve("b", "k", now).unwrap()); // first try, matched
        drop(t.reserve("c", "k", now).unwrap());
        // A first try in flight makes its address unclean for a parallel attempt.
        let inflight = t.reserve("d", "k", now).unwrap();
        assert_eq!(
            t.reserve("d", "k", now).unwrap_err().scope,
            ThrottleScope::Key
        );
        drop(inflight);
    }

    #[test]
    fn the_global_budget_caps_failed_runs_across_keys_and_addresses() {
        let t = throttle(0, 0, 5);
        let now = Instant::now();
        for i in 0..5 {
            fail(&t, &format!("10.0.0.{i}"), &format!("k{i}"), now).unwrap();
        }
        let r = fail(&t, "10.9.9.9", "fresh", now).unwrap_err();
        assert_eq!(r.scope, ThrottleScope::Server);
        // Successes do not use it up.
        let t = throttle(0, 0, 1);
        for _ in 0..10 {
            drop(t.reserve("a", "k", now).unwrap());
        }
        fail(&t, "a", "k", now).unwrap();
        assert!(fail(&t, "b", "j", now).is_err());
        assert!(fail(&t, "b", "j", now + Duration::from_secs(61)).is_ok());
    }

    #[test]
    fn disabled_budgets_count_nothing() {
        let t = throttle(0, 0, 0);
        let now = Instant::now();
        for _ in 0..1000 {
            fail(&t, "a", "k", now).unwrap();
        }
        assert_eq!(t.slots(), (0, 0));
    }

    #[test]
    fn slots_are_dropped_when_released_and_swept_when_expired() {
        let t = throttle(3, 10, 0);
        let now = Instant::now();
        drop(t.reserve("a", "k", now).unwrap());
        assert_eq!(t.slots(), (0, 0), "a released attempt leaves nothing");
        fail(&t, "a", "k", now).unwrap();
        assert_eq!(t.slots(), (1, 1));
        // A release after the window ended also clears the old failures' slot.
        let later = now + Duration::from_secs(61);
        drop(t.reserve("a", "k", later).unwrap());
        assert_eq!(t.slots(), (0, 0));
    }
}
