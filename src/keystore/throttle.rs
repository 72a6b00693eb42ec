//! Failure budgets: how many failed hash verifications an unproven token may cost.
//!
//! Budgets are fixed windows that start at their first attempt. Two notions of where an
//! attempt comes from are used:
//!
//! * the client **address** ([`client_bucket`]): an IPv4 address, or an IPv6 /64 (one host
//!   usually owns a whole /64, so counting single IPv6 addresses would give it 2^64
//!   budgets); other strings count as given;
//! * the client **network** ([`client_network`]): an IPv4 address, or an IPv6 /48 (a
//!   site's usual allocation, so that a /56 or /48 holder cannot mint clean networks
//!   cheaply); other strings count as given.
//!
//! The budgets:
//!
//! * per (address, key id): `max_failures` (default 10 per minute).
//! * per key id, across all addresses: `key_budget` (default 100 per minute). Past it, an
//!   attempt for that key id is hashed only as a *first try*: from a network with no
//!   failure (and no attempt in flight) for that key id in its window, and at most
//!   `key_budget` such first tries per window. So a key under attack from many addresses
//!   costs at most `2 × key_budget` hash runs per window, and a legitimate client whose
//!   network has not been failing still gets its new token checked, unless the attacker
//!   holds more than `key_budget` networks (then it waits for the window: 429).
//! * per server: `global_budget` failed hash runs per window across all keys (default 600
//!   per minute: with the default argon2 cost, about 21 ms of one core each on the machine
//!   of `benches/core.rs`, failed hashing uses about a fifth of one core). Past it, an
//!   attempt is still hashed as a *first try* when its network has no failure and no
//!   attempt in flight (for any key) in the window, at most `global_budget` such first
//!   tries per window: failed hashing stays within `2 × global_budget` per window, and
//!   failures from some networks never refuse a clean network's first try, unless the
//!   attacker holds more than `global_budget` networks.
//! * per client network, for key ids the store does not have: `unknown_budget` store reads
//!   that found nothing (default 20 per minute). Past it, that network's unproven tokens
//!   naming ids *not known to exist* are refused before the store is read; an id the
//!   manager knows exists (see `KnownIds` in the parent module) is never refused by this
//!   budget. (A repeated unknown id is answered by the negative cache without a read, and
//!   does not count.)
//!
//! An attempt *reserves* its place in every budget before hashing, atomically (one lock),
//! so parallel attempts never get more hash runs than sequential ones; the reservation
//! becomes a failure if the secret was wrong, and is released otherwise (a match, or no
//! hash ran: unknown key, revoked, busy). Tokens already proven on this node never come
//! here (see [`crate::hashing::ProvenDigests`]): the budgets only ever stop unproven tokens.
//!
//! Memory: a slot exists only for an attempt in flight or a failure in its window (and for
//! a network's unknown-id reads); since failures are bounded by the budgets, so are the
//! slots. Slots whose window ended are swept when a map grows past [`SWEEP_AT`] entries
//! (and then only again once it has doubled, so a sweep costs amortised O(1) per attempt).

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::Hash;
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
    /// clean networks are hashed (at most as many again).
    pub key_budget: u32,
    /// Failed hash runs per window on this server, across all keys; past it only first
    /// tries from clean networks are hashed (at most as many again).
    pub global_budget: u32,
    /// Store reads per client network and window that found no key.
    pub unknown_budget: u32,
}

impl Default for FailThrottle {
    /// Per minute: 10 per (address, key id), 100 (+100 first tries) per key id, 600 (+600
    /// first tries) in all; 20 unknown key ids per network.
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
    /// The client network, for naming key ids the store does not have.
    UnknownKeys,
}

impl ThrottleScope {
    /// `"client"`, `"key"`, `"server"` or `"unknown_keys"`.
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

/// Above this many slots in a map, slots whose window ended are swept on the next
/// reservation (and then again only once the map has doubled).
pub const SWEEP_AT: usize = 100_000;

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

/// Whether the slot at `key` (if any) has no failure and nothing in flight in its window.
fn clean<K: Hash + Eq>(
    map: &mut HashMap<K, Slot>,
    key: &K,
    now: Instant,
    window: Duration,
) -> bool {
    map.get_mut(key).is_none_or(|s| {
        s.roll(now, window);
        s.used() == 0
    })
}

/// Counts one attempt in flight in the slot at `key`.
fn hold<K: Hash + Eq>(map: &mut HashMap<K, Slot>, key: K, now: Instant) {
    map.entry(key).or_insert_with(|| Slot::new(now)).pending += 1;
}

/// Ends one attempt in flight in the slot at `key` (a failure if `failed`), and drops
/// the slot once it holds nothing.
fn release<K: Hash + Eq>(
    map: &mut HashMap<K, Slot>,
    key: &K,
    failed: bool,
    now: Instant,
    window: Duration,
) {
    if let Some(s) = map.get_mut(key) {
        s.pending = s.pending.saturating_sub(1);
        if failed {
            s.roll(now, window);
            s.failures = s.failures.saturating_add(1);
        }
        if s.idle(now, window) {
            map.remove(key);
        }
    }
}

/// A budget with a first-try lane: `all` counts every attempt (failures and in flight),
/// `first` / `first_pending` the first tries admitted past the budget.
#[derive(Debug, Clone, Copy)]
struct Lane {
    all: Slot,
    first: u32,
    first_pending: u32,
}

impl Lane {
    fn new(now: Instant) -> Self {
        Self {
            all: Slot::new(now),
            first: 0,
            first_pending: 0,
        }
    }

    fn roll(&mut self, now: Instant, window: Duration) {
        if self.all.roll(now, window) {
            self.first = 0;
        }
    }

    /// Whether an attempt may be hashed: `Ok(false)` within the budget, `Ok(true)` as a
    /// first try (past the budget, from a clean origin, with first tries left), or the
    /// time until the window ends.
    fn admit(
        &mut self,
        budget: u32,
        clean: bool,
        now: Instant,
        window: Duration,
    ) -> Result<bool, Duration> {
        self.roll(now, window);
        if self.all.used() < budget {
            Ok(false)
        } else if clean && self.first.saturating_add(self.first_pending) < budget {
            Ok(true)
        } else {
            Err(self.all.retry_after(now, window))
        }
    }

    fn hold(&mut self, first_try: bool) {
        self.all.pending += 1;
        if first_try {
            self.first_pending += 1;
        }
    }

    fn release(&mut self, first_try: bool, failed: bool, now: Instant, window: Duration) {
        self.all.pending = self.all.pending.saturating_sub(1);
        if first_try {
            self.first_pending = self.first_pending.saturating_sub(1);
        }
        if failed {
            self.roll(now, window);
            self.all.failures = self.all.failures.saturating_add(1);
            if first_try {
                self.first = self.first.saturating_add(1);
            }
        }
    }

    fn idle(&self, now: Instant, window: Duration) -> bool {
        self.all.idle(now, window) && self.first_pending == 0
    }
}

#[derive(Debug)]
struct State {
    /// Per (address, key id): `max_failures`.
    pairs: HashMap<(String, String), Slot>,
    /// Per key id: `key_budget` and its first-try lane.
    keys: HashMap<String, Lane>,
    /// Per (network, key id): whether an attempt is a clean first try for the key's lane.
    net_keys: HashMap<(String, String), Slot>,
    /// Per network, across keys: whether an attempt is a clean first try for the server's.
    nets: HashMap<String, Slot>,
    /// The server: `global_budget` and its first-try lane.
    global: Lane,
    /// Per network: store reads that found no key (`pending` unused).
    unknown: HashMap<String, Slot>,
    /// Maps larger than this are swept on the next reservation.
    sweep_at: usize,
}

impl State {
    fn largest(&self) -> usize {
        [
            self.pairs.len(),
            self.keys.len(),
            self.net_keys.len(),
            self.nets.len(),
            self.unknown.len(),
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }

    /// Drops slots whose window ended once a map is past `sweep_at`; the next sweep waits
    /// until a map is twice as large as the largest one left (amortised O(1)).
    fn sweep(&mut self, now: Instant, window: Duration) {
        if self.largest() <= self.sweep_at {
            return;
        }
        self.pairs.retain(|_, s| !s.idle(now, window));
        self.keys.retain(|_, s| !s.idle(now, window));
        self.net_keys.retain(|_, s| !s.idle(now, window));
        self.nets.retain(|_, s| !s.idle(now, window));
        self.unknown.retain(|_, s| !s.idle(now, window));
        self.sweep_at = SWEEP_AT.max(self.largest().saturating_mul(2));
    }
}

/// The budgets' counters behind one lock (a reservation touches up to five at once).
#[derive(Debug)]
pub(crate) struct Throttle {
    limits: FailThrottle,
    state: Mutex<State>,
}

/// The IPv4 address of an IPv4 or IPv4-mapped IPv6 address, else the IPv6 address.
fn parse_ip(client: &str) -> Option<IpAddr> {
    match client.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)),
        Ok(v4) => Some(v4),
        Err(_) => None,
    }
}

/// The address a client string is counted under per (address, key id): an IPv4 address
/// as is (also written as an IPv4-mapped IPv6 address), an IPv6 address as its /64,
/// anything else as given.
#[must_use]
pub fn client_bucket(client: &str) -> Cow<'_, str> {
    match parse_ip(client) {
        Some(IpAddr::V6(v6)) => {
            let s = v6.segments();
            Cow::Owned(format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3]))
        }
        Some(IpAddr::V4(v4)) => Cow::Owned(v4.to_string()),
        None => Cow::Borrowed(client),
    }
}

/// The network a client string is counted under for the first-try lanes and unknown key
/// ids: an IPv4 address as is (also written as an IPv4-mapped IPv6 address), an IPv6
/// address as its /48, anything else as given.
#[must_use]
pub fn client_network(client: &str) -> Cow<'_, str> {
    match parse_ip(client) {
        Some(IpAddr::V6(v6)) => {
            let s = v6.segments();
            Cow::Owned(format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2]))
        }
        Some(IpAddr::V4(v4)) => Cow::Owned(v4.to_string()),
        None => Cow::Borrowed(client),
    }
}

impl Throttle {
    pub(crate) fn new(limits: FailThrottle) -> Self {
        Self {
            limits,
            state: Mutex::new(State {
                pairs: HashMap::new(),
                keys: HashMap::new(),
                net_keys: HashMap::new(),
                nets: HashMap::new(),
                global: Lane::new(Instant::now()),
                unknown: HashMap::new(),
                sweep_at: SWEEP_AT,
            }),
        }
    }

    /// Reserves one hash run for `client` (an address, or any string) against `key`, or
    /// says which budget refuses it and for how long. `may_exist`: whether `key` may name
    /// a key in the store (known to exist, or not known not to): such attempts are never
    /// refused by the unknown-id budget.
    pub(crate) fn reserve(
        &self,
        client: &str,
        key: &str,
        may_exist: bool,
        now: Instant,
    ) -> Result<Reservation<'_>, Refused> {
        let l = self.limits;
        let w = l.window;
        let addr = client_bucket(client).into_owned();
        let net = client_network(client).into_owned();
        // Made only once every check passed: dropping a reservation releases its places.
        let reservation =
            |addr: String, net: String, key_first: bool, server_first: bool, settled: bool| {
                Reservation {
                    throttle: self,
                    addr,
                    net,
                    key: key.to_owned(),
                    key_first,
                    server_first,
                    settled,
                }
            };
        if l.max_failures == 0 && l.key_budget == 0 && l.global_budget == 0 && l.unknown_budget == 0
        {
            return Ok(reservation(addr, net, false, false, true)); // nothing to count
        }
        let mut st = self.state.lock();
        st.sweep(now, w);
        if l.unknown_budget > 0 && !may_exist {
            if let Some(u) = st.unknown.get_mut(&net) {
                u.roll(now, w);
                if u.failures >= l.unknown_budget {
                    return Err(Refused {
                        scope: ThrottleScope::UnknownKeys,
                        retry_after: u.retry_after(now, w),
                    });
                }
            }
        }
        let pair_key = (addr, key.to_owned());
        if l.max_failures > 0 {
            if let Some(p) = st.pairs.get_mut(&pair_key) {
                p.roll(now, w);
                if p.used() >= l.max_failures {
                    return Err(Refused {
                        scope: ThrottleScope::Client,
                        retry_after: p.retry_after(now, w),
                    });
                }
            }
        }
        let net_key = (net, key.to_owned());
        let mut key_first = false;
        if l.key_budget > 0 {
            let clean = clean(&mut st.net_keys, &net_key, now, w);
            if let Some(k) = st.keys.get_mut(key) {
                key_first = k
                    .admit(l.key_budget, clean, now, w)
                    .map_err(|retry_after| Refused {
                        scope: ThrottleScope::Key,
                        retry_after,
                    })?;
            }
        }
        let mut server_first = false;
        if l.global_budget > 0 {
            let clean = clean(&mut st.nets, &net_key.0, now, w);
            server_first =
                st.global
                    .admit(l.global_budget, clean, now, w)
                    .map_err(|retry_after| Refused {
                        scope: ThrottleScope::Server,
                        retry_after,
                    })?;
        }
        // Every check passed: count the attempt in flight everywhere.
        let (addr, net) = (pair_key.0.clone(), net_key.0.clone());
        if l.max_failures > 0 {
            hold(&mut st.pairs, pair_key, now);
        }
        if l.key_budget > 0 {
            st.keys
                .entry(key.to_owned())
                .or_insert_with(|| Lane::new(now))
                .hold(key_first);
            hold(&mut st.net_keys, net_key, now);
        }
        if l.global_budget > 0 {
            st.global.hold(server_first);
            hold(&mut st.nets, net.clone(), now);
        }
        Ok(reservation(addr, net, key_first, server_first, false))
    }

    /// Settles a reservation: a failure (counted in each budget) or a release.
    fn settle(&self, r: &Reservation<'_>, failed: bool, now: Instant) {
        let l = self.limits;
        let w = l.window;
        let mut st = self.state.lock();
        if l.max_failures > 0 {
            release(
                &mut st.pairs,
                &(r.addr.clone(), r.key.clone()),
                failed,
                now,
                w,
            );
        }
        if l.key_budget > 0 {
            if let Some(k) = st.keys.get_mut(&r.key) {
                k.release(r.key_first, failed, now, w);
                if k.idle(now, w) {
                    st.keys.remove(&r.key);
                }
            }
            release(
                &mut st.net_keys,
                &(r.net.clone(), r.key.clone()),
                failed,
                now,
                w,
            );
        }
        if l.global_budget > 0 {
            st.global.release(r.server_first, failed, now, w);
            release(&mut st.nets, &r.net, failed, now, w);
        }
    }

    /// Counts a store read by `net` that found no key.
    fn note_unknown(&self, net: &str, now: Instant) {
        let l = self.limits;
        if l.unknown_budget == 0 {
            return;
        }
        let mut st = self.state.lock();
        let slot = st
            .unknown
            .entry(net.to_owned())
            .or_insert_with(|| Slot::new(now));
        slot.roll(now, l.window);
        slot.failures = slot.failures.saturating_add(1);
    }

    /// Slots held: (address, key id) pairs, key ids, and network slots (per network and
    /// per (network, key id)). Tests: the maps stay bounded.
    #[cfg(test)]
    fn slots(&self) -> (usize, usize, usize) {
        let st = self.state.lock();
        (
            st.pairs.len(),
            st.keys.len(),
            st.nets.len() + st.net_keys.len(),
        )
    }
}

/// One reserved hash run. [`Reservation::failed`] counts it as a failure; dropping it
/// otherwise releases it (the secret matched, or no hash ran).
#[derive(Debug)]
pub(crate) struct Reservation<'a> {
    throttle: &'a Throttle,
    addr: String,
    net: String,
    key: String,
    /// Admitted as a first try past the key's budget.
    key_first: bool,
    /// Admitted as a first try past the server's budget.
    server_first: bool,
    settled: bool,
}

impl Reservation<'_> {
    /// The store has no such key: released, and counted against the network's budget of
    /// unknown key ids.
    pub(crate) fn unknown_key(self, now: Instant) {
        self.throttle.note_unknown(&self.net, now);
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

    /// A reservation for a key id that may exist.
    fn res<'a>(
        t: &'a Throttle,
        client: &str,
        key: &str,
        now: Instant,
    ) -> Result<Reservation<'a>, Refused> {
        t.reserve(client, key, true, now)
    }

    fn fail(t: &Throttle, client: &str, key: &str, now: Instant) -> Result<(), Refused> {
        res(t, client, key, now).map(|r| r.failed(now))
    }

    #[test]
    fn a_network_naming_unknown_key_ids_is_stopped_before_the_store_for_unknown_ids_only() {
        let t = Throttle::new(FailThrottle {
            unknown_budget: 3,
            ..FailThrottle::default()
        });
        let now = Instant::now();
        for i in 0..3 {
            t.reserve("2001:db8::1", &format!("k{i}"), false, now)
                .unwrap()
                .unknown_key(now);
        }
        // An id not known to exist, from anywhere in that /48: refused; other networks
        // are not.
        let r = t
            .reserve("2001:db8:0:ff::2", "made-up", false, now)
            .unwrap_err();
        assert_eq!(r.scope, ThrottleScope::UnknownKeys);
        drop(t.reserve("2001:db9::1", "made-up", false, now).unwrap());
        // An id that may exist is never refused by this budget.
        drop(t.reserve("2001:db8::2", "real", true, now).unwrap());
        // A reservation ended as unknown held no other place.
        assert_eq!(t.slots(), (0, 0, 0));
        drop(
            t.reserve(
                "2001:db8::2",
                "made-up",
                false,
                now + Duration::from_secs(60),
            )
            .unwrap(),
        );
    }

    #[test]
    fn ipv6_counts_per_64_per_address_and_per_48_per_network() {
        assert_eq!(client_bucket("10.0.0.1"), "10.0.0.1");
        assert_eq!(client_bucket("::ffff:10.0.0.1"), "10.0.0.1");
        assert_eq!(client_bucket("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64");
        assert_eq!(client_bucket("2001:db8:1:2::9"), "2001:db8:1:2::/64");
        assert_eq!(client_bucket("2001:DB8:1:3::1"), "2001:db8:1:3::/64");
        assert_eq!(client_bucket("not an address"), "not an address");
        assert_eq!(client_bucket(""), "");
        assert_eq!(client_network("10.0.0.1"), "10.0.0.1");
        assert_eq!(client_network("::ffff:10.0.0.1"), "10.0.0.1");
        assert_eq!(client_network("2001:db8:1:2:3:4:5:6"), "2001:db8:1::/48");
        assert_eq!(client_network("2001:DB8:1:ffff::1"), "2001:db8:1::/48");
        assert_eq!(client_network("not an address"), "not an address");

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
        let held: Vec<_> = (0..3).map(|_| res(&t, "a", "k", now).unwrap()).collect();
        let r = res(&t, "a", "k", now).unwrap_err();
        assert_eq!(r.scope, ThrottleScope::Client);
        assert_eq!(r.retry_after, Duration::from_secs(60));
        // Refusals reserve nothing, and release nothing either.
        for _ in 0..10 {
            assert!(res(&t, "a", "k", now).is_err());
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
    fn past_the_key_budget_only_first_tries_from_clean_networks_are_hashed() {
        // Per key: 4, then at most 4 first tries; per address: 2.
        let t = throttle(2, 4, 0);
        let now = Instant::now();
        for addr in ["a", "a", "b", "b"] {
            fail(&t, addr, "k", now).unwrap();
        }
        // Budget spent: a dirty address is refused (by its own budget).
        let dirty = fail(&t, "b", "k", now).unwrap_err();
        assert_eq!(dirty.scope, ThrottleScope::Client);
        // Clean networks: one first try each, four in all.
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
        drop(res(&t, "b", "k", now).unwrap()); // first try, matched
        drop(res(&t, "c", "k", now).unwrap());
        // A first try in flight makes its network unclean for a parallel attempt.
        let inflight = res(&t, "d", "k", now).unwrap();
        assert_eq!(
            res(&t, "d", "k", now).unwrap_err().scope,
            ThrottleScope::Key
        );
        drop(inflight);
    }

    #[test]
    fn many_64s_of_one_48_get_one_first_try_per_key_between_them() {
        // Per key: 5 (then 5 first tries); per address: 10.
        let t = throttle(10, 5, 0);
        let now = Instant::now();
        for i in 0..5 {
            fail(&t, &format!("2001:db8:1:{i:x}::1"), "k", now).unwrap();
        }
        // The budget is spent; 120 /64s of that /48 (one /56 of them): one first try.
        let taken = (0..120)
            .filter(|i| fail(&t, &format!("2001:db8:1:{:x}::1", 0x100 + i), "k", now).is_ok())
            .count();
        assert_eq!(taken, 0, "the /48 has failed for the key: not clean");
        // Another /48 still gets its first try, and its right token would pass.
        drop(res(&t, "2001:db8:2::1", "k", now).unwrap());
        fail(&t, "2001:db8:3::1", "k", now).unwrap();
    }

    #[test]
    fn past_the_server_budget_clean_networks_still_get_a_first_try() {
        let t = throttle(0, 0, 5);
        let now = Instant::now();
        // 5 failures from one address, across keys: the budget is spent.
        for i in 0..5 {
            fail(&t, "10.0.0.1", &format!("k{i}"), now).unwrap();
        }
        let r = fail(&t, "10.0.0.1", "fresh", now).unwrap_err();
        assert_eq!(r.scope, ThrottleScope::Server);
        assert!(r.retry_after <= Duration::from_secs(60));
        // A clean network: a first try (any key); once it failed, it is not clean.
        drop(res(&t, "10.9.9.9", "fresh", now).unwrap());
        fail(&t, "10.9.9.9", "fresh", now).unwrap();
        assert_eq!(
            fail(&t, "10.9.9.9", "other", now).unwrap_err().scope,
            ThrottleScope::Server
        );
        // At most 5 failed first tries in the window: 4 more clean networks, then none.
        for i in 0..4 {
            fail(&t, &format!("10.8.0.{i}"), "x", now).unwrap();
        }
        let r = fail(&t, "10.7.0.1", "y", now).unwrap_err();
        assert_eq!(r.scope, ThrottleScope::Server);
        // A first try in flight makes its network unclean for a parallel attempt.
        let t = throttle(0, 0, 1);
        fail(&t, "a", "k", now).unwrap();
        let inflight = res(&t, "b", "k", now).unwrap();
        assert!(res(&t, "b", "j", now).is_err());
        drop(inflight);
        // Successes do not use the budget up.
        let t = throttle(0, 0, 1);
        for _ in 0..10 {
            drop(res(&t, "a", "k", now).unwrap());
        }
        fail(&t, "a", "k", now).unwrap();
        assert!(fail(&t, "a", "j", now).is_err());
        assert!(fail(&t, "a", "j", now + Duration::from_secs(61)).is_ok());
    }

    #[test]
    fn failed_runs_stay_within_twice_each_budget_whatever_the_networks() {
        let t = throttle(10, 20, 50);
        let now = Instant::now();
        let mut per_key = HashMap::<String, u32>::new();
        let mut all = 0;
        // 10,000 distinct IPv4 addresses, 40 keys, each address trying every key.
        for a in 0..10_000u32 {
            for k in 0..40 {
                let key = format!("k{k}");
                let client = format!("10.{}.{}.{}", a >> 16 & 255, a >> 8 & 255, a & 255);
                if fail(&t, &client, &key, now).is_ok() {
                    all += 1;
                    *per_key.entry(key).or_default() += 1;
                }
            }
        }
        assert_eq!(all, 100, "2 x the server budget");
        assert!(per_key.values().all(|&n| n <= 40), "{per_key:?}");
        // A new window: the budgets are back.
        fail(&t, "10.0.0.0", "k0", now + Duration::from_secs(60)).unwrap();
    }

    #[test]
    fn disabled_budgets_count_nothing() {
        let t = throttle(0, 0, 0);
        let now = Instant::now();
        for _ in 0..1000 {
            fail(&t, "a", "k", now).unwrap();
        }
        assert_eq!(t.slots(), (0, 0, 0));
    }

    #[test]
    fn slots_are_dropped_when_released_and_swept_when_expired() {
        let t = throttle(3, 10, 10);
        let now = Instant::now();
        drop(res(&t, "a", "k", now).unwrap());
        assert_eq!(t.slots(), (0, 0, 0), "a released attempt leaves nothing");
        fail(&t, "a", "k", now).unwrap();
        assert_eq!(t.slots(), (1, 1, 2));
        // A release after the window ended also clears the old failures' slots.
        let later = now + Duration::from_secs(61);
        drop(res(&t, "a", "k", later).unwrap());
        assert_eq!(t.slots(), (0, 0, 0));
        // Past SWEEP_AT slots, expired ones are swept, then not again until it doubled.
        let t = Throttle::new(FailThrottle {
            unknown_budget: 1,
            ..FailThrottle::default()
        });
        for i in 0..=SWEEP_AT {
            t.note_unknown(&format!("n{i}"), now);
        }
        drop(res(&t, "x", "k", later).unwrap());
        let st = t.state.lock();
        assert_eq!(st.unknown.len(), 0);
        assert_eq!(st.sweep_at, SWEEP_AT);
    }
}
