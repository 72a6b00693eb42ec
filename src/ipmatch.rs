//! IP allow/deny lists and client-address resolution behind trusted proxies.
//!
//! Entries are IPv4 or IPv6 addresses or CIDRs (`203.0.113.7`, `10.0.0.0/8`,
//! `2001:db8::/32`, `[::1]`). A bare address is a /32 or /128. A CIDR with host bits set
//! (`10.0.0.1/8`) is refused, naming the network that was probably meant (`10.0.0.0/8`), like
//! Python's `ip_network(strict=True)`: it is a typo or a misunderstanding either way.
//! IPv4-mapped IPv6 (`::ffff:10.0.0.1`) is normalised to IPv4, both in entries (a mapped
//! CIDR with prefix >= 96 becomes the IPv4 CIDR with prefix - 96) and in checked addresses.
//! An IPv6 CIDR shorter than /96 stays IPv6-only: `::/0` does not match IPv4 clients.
//!
//! Rules: deny wins; an empty allow list allows everyone not denied; a non-empty allow list
//! allows only the addresses it contains.
//!
//! Each list is stored per family as sorted, non-overlapping `(network, mask)` integers
//! (entries covered by a broader entry are dropped), so a check is one binary search.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// A list entry that is not an address or CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpError {
    /// One entry of `allow`, `deny` or `trusted_proxies` could not be parsed.
    #[error(
        "invalid {list} entry {entry:?}: {reason}; expected an IPv4 or IPv6 address or CIDR \
         such as \"203.0.113.7\", \"10.0.0.0/8\" or \"2001:db8::/32\""
    )]
    InvalidEntry {
        /// `"allow"`, `"deny"` or `"trusted_proxies"`.
        list: &'static str,
        /// The entry as given.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Why an address was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// The address is in the deny list.
    DenyListed,
    /// The allow list is non-empty and does not contain the address.
    NotAllowListed,
    /// The client is not an address at all (see [`IpMatcher::check_str`]).
    Unparsable,
}

impl DenyReason {
    /// `"deny_listed"`, `"not_allow_listed"` or `"unparsable"`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            DenyReason::DenyListed => "deny_listed",
            DenyReason::NotAllowListed => "not_allow_listed",
            DenyReason::Unparsable => "unparsable",
        }
    }
}

/// The outcome of [`IpMatcher::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpDecision {
    /// The address may proceed.
    Allowed,
    /// The address is refused, with the reason.
    Denied(DenyReason),
}

impl IpDecision {
    /// True for [`IpDecision::Allowed`].
    #[must_use]
    pub const fn is_allowed(self) -> bool {
        matches!(self, IpDecision::Allowed)
    }
}

/// Sorted, non-overlapping networks of one list, per family.
#[derive(Clone, Debug, Default)]
struct NetSet {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

/// One parsed entry.
enum Net {
    V4(Ipv4Net),
    V6(Ipv6Net),
}

impl NetSet {
    fn build(list: &'static str, entries: &[impl AsRef<str>]) -> Result<NetSet, IpError> {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for entry in entries {
            match parse_entry(list, entry.as_ref())? {
                Net::V4(n) => v4.push((u32::from(n.network()), u32::from(n.netmask()))),
                Net::V6(n) => v6.push((u128::from(n.network()), u128::from(n.netmask()))),
            }
        }
        Ok(NetSet {
            v4: collapse(v4),
            v6: collapse(v6),
        })
    }

    fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    fn contains(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => lookup(&self.v4, u32::from(a)),
            IpAddr::V6(a) => lookup(&self.v6, u128::from(a)),
        }
    }
}

/// Sort by (network, broader first) and drop networks covered by an earlier kept one. CIDRs
/// are nested or disjoint, so only the last kept network can cover the next one.
fn collapse<T>(mut nets: Vec<(T, T)>) -> Vec<(T, T)>
where
    T: Copy + Ord + std::ops::BitAnd<Output = T>,
{
    nets.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut kept: Vec<(T, T)> = Vec::with_capacity(nets.len());
    for (net, mask) in nets {
        if kept
            .last()
            .is_some_and(|&(k_net, k_mask)| net & k_mask == k_net)
        {
            continue;
        }
        kept.push((net, mask));
    }
    kept
}

/// The last network starting at or below `x` is the only candidate.
fn lookup<T>(nets: &[(T, T)], x: T) -> bool
where
    T: Copy + Ord + std::ops::BitAnd<Output = T>,
{
    let i = nets.partition_point(|&(net, _)| net <= x);
    i > 0 && nets.get(i - 1).is_some_and(|&(net, mask)| x & mask == net)
}

fn parse_entry(list: &'static str, raw: &str) -> Result<Net, IpError> {
    let bad = |reason: String| IpError::InvalidEntry {
        list,
        entry: raw.to_owned(),
        reason,
    };
    let s = raw.trim();
    if s.is_empty() {
        return Err(bad("the entry is empty".to_owned()));
    }
    let (addr_part, prefix_part) = match s.split_once('/') {
        Some((a, p)) => (a.trim(), Some(p.trim())),
        None => (s, None),
    };
    if prefix_part.is_some_and(|p| p.contains('/')) {
        return Err(bad("more than one \"/\"".to_owned()));
    }
    let addr_part = addr_part
        .strip_prefix('[')
        .and_then(|a| a.strip_suffix(']'))
        .unwrap_or(addr_part);
    let addr: IpAddr = addr_part
        .parse()
        .map_err(|_| bad(format!("{addr_part:?} is not an IP address")))?;
    let prefix =
        match prefix_part {
            None => None,
            Some(p) => {
                let digits = !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit());
                let parsed = if digits { p.parse::<u8>().ok() } else { None };
                Some(parsed.ok_or_else(|| {
                    bad(format!("prefix length {p:?} is not a number from 0 to 128"))
                })?)
            }
        };
    let too_long = |p: u8, max: u8, family: &str| {
        bad(format!(
            "prefix length /{p} is larger than {max}, the {family} maximum"
        ))
    };
    match addr {
        IpAddr::V4(a) => {
            let p = prefix.unwrap_or(32);
            let n = Ipv4Net::new(a, p).map_err(|_| too_long(p, 32, "IPv4"))?;
            strict(n.addr(), n.network(), p, &bad).map(|()| Net::V4(n))
        }
        IpAddr::V6(a) => {
            let p = prefix.unwrap_or(128);
            match a.to_ipv4_mapped() {
                Some(v4) if p >= 96 => {
                    let n = Ipv4Net::new(v4, p - 96).map_err(|_| too_long(p, 128, "IPv6"))?;
                    strict(n.addr(), n.network(), p - 96, &bad).map(|()| Net::V4(n))
                }
                _ => {
                    let n = Ipv6Net::new(a, p).map_err(|_| too_long(p, 128, "IPv6"))?;
                    strict(n.addr(), n.network(), p, &bad).map(|()| Net::V6(n))
                }
            }
        }
    }
}

/// Refuses a CIDR whose address has bits set past its prefix (`10.0.0.1/8`): the entry
/// means either the network (`10.0.0.0/8`) or the one address (`10.0.0.1`), and guessing
/// would silently widen or narrow a security list.
fn strict<A: std::fmt::Display + PartialEq>(
    addr: A,
    network: A,
    prefix: u8,
    bad: &dyn Fn(String) -> IpError,
) -> Result<(), IpError> {
    if addr == network {
        return Ok(());
    }
    Err(bad(format!(
        "host bits are set after the /{prefix} prefix; write \"{network}/{prefix}\" for the \
         network, or \"{addr}\" for the one address"
    )))
}

/// Map IPv4-mapped IPv6 (`::ffff:a.b.c.d`) to IPv4; other addresses are unchanged.
#[must_use]
pub fn normalize(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        IpAddr::V4(_) => addr,
    }
}

fn is_port(s: &str) -> bool {
    !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit())
}

fn parse_plain(s: &str) -> Option<IpAddr> {
    if let Ok(a) = s.parse() {
        return Some(a);
    }
    // `fe80::1%eth0`: the zone does not take part in matching.
    let (a, zone) = s.split_once('%')?;
    if zone.is_empty() {
        return None;
    }
    a.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
}

/// Parse an address as it appears in a peer address or an `X-Forwarded-For` hop, normalising
/// IPv4-mapped IPv6 to IPv4.
///
/// Accepts, with surrounding whitespace: `203.0.113.7`, `2001:db8::1`, `fe80::1%eth0`
/// (zone dropped), `[2001:db8::1]`, `[2001:db8::1]:443` and `203.0.113.7:443` (port
/// dropped). Anything else (including CIDRs, host names and `unknown`) is `None`.
#[must_use]
pub fn parse_addr(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    let addr = if let Some(rest) = s.strip_prefix('[') {
        let (inner, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        parse_plain(inner)?
    } else if let Some(a) = parse_plain(s) {
        a
    } else {
        let (host, port) = s.split_once(':')?;
        if !is_port(port) {
            return None;
        }
        IpAddr::V4(host.parse::<Ipv4Addr>().ok()?)
    };
    Some(normalize(addr))
}

/// IP allow/deny lists plus the set of trusted reverse proxies. Immutable after
/// construction; `Send + Sync`.
#[derive(Clone, Debug)]
pub struct IpMatcher {
    allow: NetSet,
    deny: NetSet,
    trusted: NetSet,
}

impl IpMatcher {
    /// Build a matcher from address/CIDR strings.
    ///
    /// # Errors
    ///
    /// [`IpError::InvalidEntry`] naming the list and the first entry that is not an address
    /// or CIDR (empty, bad address, prefix too long, more than one `/`).
    pub fn new(
        allow: &[impl AsRef<str>],
        deny: &[impl AsRef<str>],
        trusted_proxies: &[impl AsRef<str>],
    ) -> Result<IpMatcher, IpError> {
        Ok(IpMatcher {
            allow: NetSet::build("allow", allow)?,
            deny: NetSet::build("deny", deny)?,
            trusted: NetSet::build("trusted_proxies", trusted_proxies)?,
        })
    }

    /// Decide for `addr` (IPv4-mapped IPv6 is treated as IPv4). Deny wins; an empty allow
    /// list allows everyone not denied.
    #[must_use]
    pub fn check(&self, addr: IpAddr) -> IpDecision {
        let addr = normalize(addr);
        if self.deny.contains(addr) {
            IpDecision::Denied(DenyReason::DenyListed)
        } else if self.allow.is_empty() || self.allow.contains(addr) {
            IpDecision::Allowed
        } else {
            IpDecision::Denied(DenyReason::NotAllowListed)
        }
    }

    /// [`IpMatcher::check`] on a string (see [`parse_addr`] for accepted forms): a string
    /// that is not an address (an unparsable client, see [`ClientAddr::text`]) is refused
    /// as [`DenyReason::Unparsable`].
    #[must_use]
    pub fn check_str(&self, s: &str) -> IpDecision {
        match parse_addr(s) {
            Some(addr) => self.check(addr),
            None => IpDecision::Denied(DenyReason::Unparsable),
        }
    }

    /// [`IpMatcher::check`] on a string (see [`parse_addr`] for accepted forms); false when
    /// the string is not an address.
    #[must_use]
    pub fn is_allowed_str(&self, s: &str) -> bool {
        parse_addr(s).is_some_and(|a| self.check(a).is_allowed())
    }

    /// True when `addr` is in the trusted-proxy list.
    #[must_use]
    pub fn is_trusted_proxy(&self, addr: IpAddr) -> bool {
        self.trusted.contains(normalize(addr))
    }

    /// True when the allow list is empty (everyone not denied is allowed).
    #[must_use]
    pub fn allows_all(&self) -> bool {
        self.allow.is_empty()
    }

    /// The client of a connection from `peer` carrying `X-Forwarded-For` (every header line
    /// joined with commas, in order, by the caller: HTTP list semantics).
    ///
    /// - `peer` unparsable: [`ClientAddr::Unparsable`] with the peer.
    /// - `peer` not a trusted proxy: `peer`; the header is ignored (only trusted proxies'
    ///   headers are honoured, so a client cannot spoof its address).
    /// - Otherwise walk the header from the right, skipping hops that are trusted proxies:
    ///   the first untrusted hop is the client. If every hop is trusted, the left-most one.
    ///   An unparsable hop (`unknown`, garbage) ends the walk and *is* the client
    ///   ([`ClientAddr::Unparsable`]): it is never replaced by a proxy's own address, which
    ///   would let whatever the proxy could not name pass as the proxy (often allow-listed).
    ///   Empty hops (`a,,b`) are skipped.
    #[must_use]
    pub fn resolve_client<'a>(
        &self,
        peer: &'a str,
        x_forwarded_for: Option<&'a str>,
    ) -> ClientAddr<'a> {
        let Some(peer_ip) = parse_addr(peer) else {
            return ClientAddr::Unparsable(peer.trim());
        };
        if !self.trusted.contains(peer_ip) {
            return ClientAddr::Ip(peer_ip);
        }
        let Some(xff) = x_forwarded_for else {
            return ClientAddr::Ip(peer_ip);
        };
        let mut last_good = peer_ip;
        for hop in xff.rsplit(',') {
            let hop = hop.trim();
            if hop.is_empty() {
                continue;
            }
            let Some(ip) = parse_addr(hop) else {
                return ClientAddr::Unparsable(hop);
            };
            if !self.trusted.contains(ip) {
                return ClientAddr::Ip(ip);
            }
            last_good = ip;
        }
        ClientAddr::Ip(last_good)
    }

    /// [`IpMatcher::resolve_client`] when it is an address; `None` when the client is
    /// unparsable.
    #[must_use]
    pub fn client_ip(&self, peer: &str, x_forwarded_for: Option<&str>) -> Option<IpAddr> {
        match self.resolve_client(peer, x_forwarded_for) {
            ClientAddr::Ip(ip) => Some(ip),
            ClientAddr::Unparsable(_) => None,
        }
    }
}

/// The client of a request, as [`IpMatcher::resolve_client`] finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAddr<'a> {
    /// An address (IPv4-mapped IPv6 normalised to IPv4).
    Ip(IpAddr),
    /// The peer or forwarded hop that is not an address: it is the client, matches no list
    /// entry, and any IP policy refuses it.
    Unparsable(&'a str),
}

impl ClientAddr<'_> {
    /// Longest unparsable client text kept (the rest is cut, with `…`): it reaches audit
    /// lines and rate-limit keys.
    pub const MAX_TEXT: usize = 64;

    /// The address as text, or the unparsable text cut to [`ClientAddr::MAX_TEXT`]
    /// characters with control characters replaced by `?`.
    #[must_use]
    pub fn text(&self) -> String {
        match self {
            ClientAddr::Ip(ip) => ip.to_string(),
            ClientAddr::Unparsable(s) => {
                let mut out: String = s
                    .chars()
                    .take(Self::MAX_TEXT)
                    .map(|c| if c.is_control() { '?' } else { c })
                    .collect();
                if s.chars().nth(Self::MAX_TEXT).is_some() {
                    out.push('…');
                }
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;
    use proptest::prelude::*;

    const NONE: &[&str] = &[];

    fn m(allow: &[&str], deny: &[&str], trusted: &[&str]) -> IpMatcher {
        IpMatcher::new(allow, deny, trusted).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse()
            .unwrap_or_else(|_| panic!("{s:?} is not an address"))
    }

    #[test]
    fn empty_lists_allow_everyone() {
        let matcher = m(NONE, NONE, NONE);
        assert!(matcher.allows_all());
        for a in ["1.2.3.4", "::1", "0.0.0.0", "ffff::"] {
            assert_eq!(matcher.check(ip(a)), IpDecision::Allowed, "{a}");
        }
    }

    #[test]
    fn allow_and_deny_table() {
        let matcher = m(
            &[
                "10.0.0.0/8",
                "192.168.1.7",
                "2001:db8::/32",
                " 172.16.0.0/12 ",
            ],
            &["10.9.0.0/16", "2001:db8:bad::/48", "192.168.1.7"],
            NONE,
        );
        let cases: &[(&str, IpDecision)] = &[
            ("10.1.2.3", IpDecision::Allowed),
            ("10.9.1.1", IpDecision::Denied(DenyReason::DenyListed)),
            ("10.255.255.255", IpDecision::Allowed),
            ("11.0.0.0", IpDecision::Denied(DenyReason::NotAllowListed)),
            ("192.168.1.7", IpDecision::Denied(DenyReason::DenyListed)),
            (
                "192.168.1.8",
                IpDecision::Denied(DenyReason::NotAllowListed),
            ),
            ("172.31.255.255", IpDecision::Allowed),
            ("172.32.0.0", IpDecision::Denied(DenyReason::NotAllowListed)),
            ("2001:db8::1", IpDecision::Allowed),
            (
                "2001:db8:bad::1",
                IpDecision::Denied(DenyReason::DenyListed),
            ),
            (
                "2001:db9::1",
                IpDecision::Denied(DenyReason::NotAllowListed),
            ),
            ("::ffff:10.1.2.3", IpDecision::Allowed),
            (
                "::ffff:10.9.0.1",
                IpDecision::Denied(DenyReason::DenyListed),
            ),
            ("::1", IpDecision::Denied(DenyReason::NotAllowListed)),
        ];
        for &(a, want) in cases {
            assert_eq!(matcher.check(ip(a)), want, "{a}");
            assert_eq!(matcher.is_allowed_str(a), want.is_allowed(), "{a}");
        }
        assert_eq!(DenyReason::DenyListed.as_str(), "deny_listed");
        assert_eq!(DenyReason::NotAllowListed.as_str(), "not_allow_listed");
    }

    #[test]
    fn deny_only_list() {
        let matcher = m(NONE, &["203.0.113.0/24", "::/0"], NONE);
        assert!(!matcher.is_allowed_str("203.0.113.9"));
        assert!(matcher.is_allowed_str("203.0.114.9"));
        assert!(!matcher.is_allowed_str("2001:db8::1"));
        // ::/0 is IPv6-only: IPv4 and IPv4-mapped clients are not matched.
        assert!(matcher.is_allowed_str("8.8.8.8"));
        assert!(matcher.is_allowed_str("::ffff:8.8.8.8"));
    }

    #[test]
    fn entries_are_mapped() {
        let matcher = m(
            &[
                "10.0.0.0/8",
                "::ffff:192.0.2.0/120",
                "::ffff:198.51.100.1",
                "[2001:db8::1]",
            ],
            NONE,
            NONE,
        );
        assert!(matcher.is_allowed_str("10.200.0.1"));
        assert!(matcher.is_allowed_str("192.0.2.77"));
        assert!(matcher.is_allowed_str("::ffff:192.0.2.77"));
        assert!(matcher.is_allowed_str("198.51.100.1"));
        assert!(!matcher.is_allowed_str("198.51.100.2"));
        assert!(matcher.is_allowed_str("2001:db8::1"));
        assert!(!matcher.is_allowed_str("2001:db8::2"));
        assert!(!matcher.is_allowed_str("11.0.0.1"));
    }

    #[test]
    fn bad_entries_are_refused_with_list_and_entry() {
        let cases: &[(&str, &str)] = &[
            ("10.0.0.0/33", "larger than 32"),
            ("2001:db8::/129", "larger than 128"),
            ("not-an-ip", "not an IP address"),
            ("", "empty"),
            ("   ", "empty"),
            ("10.0.0.0/8/1", "more than one"),
            ("10.0.0.0/", "not a number"),
            ("10.0.0.0/abc", "not a number"),
            ("10.0.0.0/-1", "not a number"),
            ("10.0.0.0/1000", "not a number"),
            ("10.0.0.0/300", "not a number"),
            ("10.0.0.0/255", "larger than 32"),
            ("::ffff:10.0.0.0/255", "larger than 128"),
            ("10.0.0/8", "not an IP address"),
            ("example.com", "not an IP address"),
        ];
        for &(entry, reason) in cases {
            let err = IpMatcher::new(NONE, &[entry], NONE)
                .map_or_else(|e| e, |_| panic!("{entry:?} accepted"));
            let IpError::InvalidEntry {
                list,
                entry: got,
                reason: why,
            } = &err;
            assert_eq!(*list, "deny");
            assert_eq!(got, entry);
            assert!(why.contains(reason), "{entry:?}: {why}");
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("{entry:?}")) && msg.contains("10.0.0.0/8"),
                "{msg}"
            );
        }
        let err = IpMatcher::new(&["10.0.0.0/8"], NONE, &["bogus"])
            .map_or_else(|e| e, |_| panic!("accepted"));
        assert!(
            err.to_string()
                .starts_with("invalid trusted_proxies entry \"bogus\""),
            "{err}"
        );
        let err = IpMatcher::new(&["x"], NONE, NONE).map_or_else(|e| e, |_| panic!("accepted"));
        assert!(err.to_string().starts_with("invalid allow entry"), "{err}");
    }

    #[test]
    fn parse_addr_forms() {
        let cases: &[(&str, Option<&str>)] = &[
            ("1.2.3.4", Some("1.2.3.4")),
            (" 1.2.3.4 ", Some("1.2.3.4")),
            ("1.2.3.4:8080", Some("1.2.3.4")),
            ("::1", Some("::1")),
            ("[::1]", Some("::1")),
            ("[::1]:443", Some("::1")),
            ("fe80::1%eth0", Some("fe80::1")),
            ("[fe80::1%eth0]:80", Some("fe80::1")),
            ("::ffff:10.0.0.1", Some("10.0.0.1")),
            ("[::ffff:10.0.0.1]:1", Some("10.0.0.1")),
            ("", None),
            ("unknown", None),
            ("1.2.3.4/32", None),
            ("1.2.3.4:", None),
            ("1.2.3.4:port", None),
            ("[::1", None),
            ("[::1]x", None),
            ("fe80::1%", None),
            ("1.2.3.4%eth0", None),
            ("999.1.1.1", None),
        ];
        for &(s, want) in cases {
            assert_eq!(parse_addr(s), want.map(ip), "{s:?}");
        }
        let matcher = m(NONE, NONE, NONE);
        assert!(!matcher.is_allowed_str("garbage"));
        assert!(matcher.is_allowed_str("[::1]"));
    }

    #[test]
    fn client_ip_table() {
        let matcher = m(NONE, NONE, &["10.0.0.0/8", "::1"]);
        let cases: &[(&str, Option<&str>, Option<&str>)] = &[
            // Untrusted peer: XFF is ignored, whatever it says.
            ("203.0.113.5", Some("1.1.1.1"), Some("203.0.113.5")),
            (
                "203.0.113.5",
                Some("10.0.0.1, 1.1.1.1"),
                Some("203.0.113.5"),
            ),
            ("203.0.113.5", None, Some("203.0.113.5")),
            // Trusted peer without XFF: the peer.
            ("10.0.0.1", None, Some("10.0.0.1")),
            ("10.0.0.1", Some(""), Some("10.0.0.1")),
            // Trusted peer: right-most untrusted hop.
            ("10.0.0.1", Some("198.51.100.7"), Some("198.51.100.7")),
            (
                "10.0.0.1",
                Some("6.6.6.6, 198.51.100.7"),
                Some("198.51.100.7"),
            ),
            (
                "10.0.0.1",
                Some("6.6.6.6, 198.51.100.7, 10.2.3.4"),
                Some("198.51.100.7"),
            ),
            (
                "::1",
                Some("198.51.100.7,10.2.3.4,10.5.5.5"),
                Some("198.51.100.7"),
            ),
            (
                "::ffff:10.0.0.1",
                Some("198.51.100.7"),
                Some("198.51.100.7"),
            ),
            ("10.0.0.1", Some("[2001:db8::5]:1234"), Some("2001:db8::5")),
            ("10.0.0.1", Some("198.51.100.7:5555"), Some("198.51.100.7")),
            // All hops trusted: the left-most.
            ("10.0.0.1", Some("10.0.0.9, 10.0.0.8"), Some("10.0.0.9")),
            // Unparsable hop: it is the client (None here; see resolve_client), never the
            // proxy in front of it.
            ("10.0.0.1", Some("6.6.6.6, unknown"), None),
            ("10.0.0.1", Some("6.6.6.6, garbage, 10.0.0.2"), None),
            // Empty hops are skipped.
            (
                "10.0.0.1",
                Some("198.51.100.7,, 10.0.0.2,"),
                Some("198.51.100.7"),
            ),
            // Unparsable peer.
            ("testclient", Some("1.1.1.1"), None),
        ];
        for &(peer, xff, want) in cases {
            assert_eq!(
                matcher.client_ip(peer, xff),
                want.map(ip),
                "{peer} / {xff:?}"
            );
        }
        assert!(matcher.is_trusted_proxy(ip("::ffff:10.1.1.1")));
        assert!(!matcher.is_trusted_proxy(ip("11.1.1.1")));
        // Nobody trusted: always the peer.
        assert_eq!(
            m(NONE, NONE, NONE).client_ip("10.0.0.1", Some("1.1.1.1")),
            Some(ip("10.0.0.1"))
        );
    }

    #[test]
    fn host_bits_in_a_cidr_are_refused_naming_the_network_meant() {
        for (entry, meant) in [
            ("10.0.0.1/8", "10.0.0.0/8"),
            ("192.168.1.7/24", "192.168.1.0/24"),
            ("2001:db8::1/32", "2001:db8::/32"),
            ("::ffff:10.1.2.3/104", "10.0.0.0/8"),
        ] {
            let err = IpMatcher::new(&[entry], NONE, NONE)
                .err()
                .unwrap_or_else(|| panic!("{entry} was accepted"));
            let msg = err.to_string();
            assert!(msg.contains(meant), "{entry}: {msg}");
            assert!(msg.contains("host bits"), "{entry}: {msg}");
            // Every list refuses it, not only allow.
            assert!(IpMatcher::new(NONE, &[entry], NONE).is_err());
            assert!(IpMatcher::new(NONE, NONE, &[entry]).is_err());
        }
        // Exact networks and bare addresses still parse.
        for ok in [
            "10.0.0.0/8",
            "10.0.0.1/32",
            "10.0.0.1",
            "0.0.0.0/0",
            "2001:db8::/32",
            "::/0",
        ] {
            assert!(IpMatcher::new(&[ok], NONE, NONE).is_ok(), "{ok}");
        }
    }

    #[test]
    fn check_str_refuses_what_is_not_an_address_as_unparsable() {
        let open = m(NONE, NONE, NONE);
        for text in ["unknown", "", "10.0.0.300", "garbage…"] {
            assert_eq!(
                open.check_str(text),
                IpDecision::Denied(DenyReason::Unparsable),
                "{text:?}"
            );
        }
        assert_eq!(DenyReason::Unparsable.as_str(), "unparsable");
        // An address gets the decision of `check`, in any accepted spelling.
        let matcher = m(&["10.0.0.0/8"], &["10.9.0.0/16"], NONE);
        assert_eq!(matcher.check_str("10.1.2.3"), IpDecision::Allowed);
        assert_eq!(
            matcher.check_str("::ffff:10.9.1.1"),
            IpDecision::Denied(DenyReason::DenyListed)
        );
        assert_eq!(
            matcher.check_str("11.0.0.1"),
            IpDecision::Denied(DenyReason::NotAllowListed)
        );
    }

    #[test]
    fn an_unparsable_hop_is_the_client_not_the_proxy() {
        let matcher = m(NONE, NONE, &["10.0.0.0/8"]);
        assert_eq!(
            matcher.resolve_client("10.0.0.1", Some("6.6.6.6, unknown")),
            ClientAddr::Unparsable("unknown")
        );
        assert_eq!(
            matcher.resolve_client("10.0.0.1", Some("6.6.6.6, garbage , 10.0.0.2")),
            ClientAddr::Unparsable("garbage")
        );
        // Left of an untrusted hop nothing is read, garbage or not.
        assert_eq!(
            matcher.resolve_client("10.0.0.1", Some("garbage, 8.8.8.8")),
            ClientAddr::Ip(ip("8.8.8.8"))
        );
        assert_eq!(
            matcher.resolve_client("testclient", None),
            ClientAddr::Unparsable("testclient")
        );
        let long = "x".repeat(500);
        let text = matcher.resolve_client("10.0.0.1", Some(&long)).text();
        assert_eq!(text.chars().count(), ClientAddr::MAX_TEXT + 1);
        assert_eq!(
            matcher
                .resolve_client("10.0.0.1", Some("a\u{0}b\nc"))
                .text(),
            "a?b?c"
        );
    }

    #[test]
    fn every_forwarded_line_counts_right_to_left() {
        // HAProxy adds its own line: the lines joined in order (HTTP list semantics) are read
        // from the right, so the address the trusted proxy wrote wins over the client's.
        let matcher = m(NONE, &["10.99.0.0/16"], &["127.0.0.1"]);
        let joined = ["8.8.8.8", "10.99.0.1"].join(",");
        let client = matcher.client_ip("127.0.0.1", Some(&joined));
        assert_eq!(client, Some(ip("10.99.0.1")));
        assert!(!matcher.check(ip("10.99.0.1")).is_allowed());
    }

    #[test]
    fn collapse_drops_covered_networks() {
        let matcher = m(
            &[
                "10.0.0.0/8",
                "10.1.0.0/16",
                "10.1.2.3",
                "10.0.0.0/8",
                "11.0.0.0/8",
            ],
            NONE,
            NONE,
        );
        assert_eq!(matcher.allow.v4.len(), 2);
        let matcher = m(&["0.0.0.0/0", "1.2.3.4"], NONE, NONE);
        assert_eq!(matcher.allow.v4, vec![(0, 0)]);
    }

    #[test]
    fn matcher_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<IpMatcher>();
    }

    // ---------------------------------------------------------------- property tests

    /// A list entry: the (normalised) network the model uses and the string we feed in.
    #[derive(Debug, Clone)]
    struct Entry {
        net: IpNet,
        text: String,
    }

    fn entry() -> impl Strategy<Value = Entry> {
        prop_oneof![
            // IPv4 networks of any prefix.
            (any::<u32>(), 0u8..=32).prop_map(|(a, p)| {
                let net = IpNet::V4(
                    Ipv4Net::new(Ipv4Addr::from(a), p)
                        .unwrap_or_default()
                        .trunc(),
                );
                Entry {
                    text: net.to_string(),
                    net,
                }
            }),
            // Short prefixes on a few fixed bases so that random addresses hit them.
            (0u32..4, 8u8..=24).prop_map(|(a, p)| {
                let net = IpNet::V4(
                    Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 | (a << 16)), p)
                        .unwrap_or_default()
                        .trunc(),
                );
                Entry {
                    text: net.to_string(),
                    net,
                }
            }),
            // IPv4 written as IPv4-mapped IPv6.
            (any::<u32>(), 0u8..=32).prop_map(|(a, p)| {
                let n = Ipv4Net::new(Ipv4Addr::from(a), p)
                    .unwrap_or_default()
                    .trunc();
                Entry {
                    net: IpNet::V4(n),
                    text: format!("{}/{}", n.network().to_ipv6_mapped(), u32::from(p) + 96),
                }
            }),
            // IPv6 under 2001:db8::/32 mostly.
            (any::<u128>(), 0u8..=128, any::<bool>()).prop_map(|(a, p, doc)| {
                let a = if doc {
                    (a & !(u128::MAX << 96)) | (0x2001_0db8u128 << 96)
                } else {
                    a
                };
                let net = IpNet::V6(
                    Ipv6Net::new(Ipv6Addr::from(a), p)
                        .unwrap_or_default()
                        .trunc(),
                );
                Entry {
                    text: net.to_string(),
                    net,
                }
            }),
        ]
    }

    /// An address: the normalised one for the model and the one passed to `check`.
    fn address() -> impl Strategy<Value = (IpAddr, IpAddr)> {
        prop_oneof![
            any::<u32>().prop_map(|a| (IpAddr::V4(a.into()), IpAddr::V4(a.into()))),
            (0u32..4, any::<u16>()).prop_map(|(a, h)| {
                let v4 = Ipv4Addr::from(0x0a00_0000 | (a << 16) | u32::from(h));
                (IpAddr::V4(v4), IpAddr::V4(v4))
            }),
            any::<u32>().prop_map(|a| {
                let v4 = Ipv4Addr::from(a);
                (IpAddr::V4(v4), IpAddr::V6(v4.to_ipv6_mapped()))
            }),
            (any::<u128>(), any::<bool>()).prop_map(|(a, doc)| {
                let a = if doc {
                    (a & !(u128::MAX << 96)) | (0x2001_0db8u128 << 96)
                } else {
                    a
                };
                let v6 = Ipv6Addr::from(a);
                // Random IPv6 is almost never v4-mapped; normalise just in case.
                (normalize(IpAddr::V6(v6)), IpAddr::V6(v6))
            }),
        ]
    }

    proptest! {
        #[test]
        fn check_agrees_with_naive_model(
            allow in proptest::collection::vec(entry(), 0..8),
            deny in proptest::collection::vec(entry(), 0..8),
            addrs in proptest::collection::vec(address(), 1..32),
        ) {
            let texts = |v: &[Entry]| v.iter().map(|e| e.text.clone()).collect::<Vec<_>>();
            let matcher = IpMatcher::new(&texts(&allow), &texts(&deny), NONE)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            for (model_addr, addr) in addrs {
                let denied = deny.iter().any(|e| e.net.contains(&model_addr));
                let allowed = allow.is_empty() || allow.iter().any(|e| e.net.contains(&model_addr));
                let want = if denied {
                    IpDecision::Denied(DenyReason::DenyListed)
                } else if allowed {
                    IpDecision::Allowed
                } else {
                    IpDecision::Denied(DenyReason::NotAllowListed)
                };
                prop_assert_eq!(matcher.check(addr), want, "{} ({})", addr, model_addr);
                prop_assert_eq!(matcher.is_allowed_str(&addr.to_string()), want.is_allowed());
            }
        }

        #[test]
        fn spoofed_xff_from_untrusted_peer_is_ignored(peer in any::<u32>(), xff in "\\PC{0,40}") {
            let matcher = m(NONE, NONE, &["10.0.0.0/8"]);
            let peer = Ipv4Addr::from(peer);
            prop_assume!(peer.octets()[0] != 10);
            prop_assert_eq!(matcher.client_ip(&peer.to_string(), Some(&xff)), Some(IpAddr::V4(peer)));
        }

        #[test]
        fn parsers_never_panic(s in "\\PC{0,40}") {
            let _ = parse_addr(&s);
            let _ = IpMatcher::new(&[s.as_str()], NONE, NONE);
            let _ = m(NONE, NONE, &["0.0.0.0/0"]).client_ip("10.0.0.1", Some(&s));
        }
    }
}
