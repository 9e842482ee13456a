//! Where a proxy in front of the internet lets its clients go (`[policy]`): RFC 9298 §7 and
//! RFC 9484 §12 warn that a proxy can be used to reach what only it can reach (its own
//! services, its loopback, its private networks). By default a CONNECT-UDP target and a
//! CONNECT-IP packet's destination may not be a loopback, unspecified, link-local, multicast or
//! broadcast address, or one of the proxy's own addresses; private and other non-global ranges
//! (RFC 1918, RFC 6598, RFC 2544 benchmarking, RFC 4193 unique local, IETF protocol
//! assignments) only when allowed. Operators add allow and deny lists of prefixes and of
//! CONNECT-UDP ports, for everyone or per bearer token. IPv4-mapped IPv6 addresses are judged as
//! the IPv4 address they carry.
//!
//! Per packet (CONNECT-IP) a check is a few integer comparisons and a walk of the (short)
//! lists, on the address as one integer; no allocation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;

use serde::Deserialize;

use crate::capsule::IpPrefix;

/// `[policy]` and each `[[policy.tokens]]`, as written.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Allow private and other non-global ranges.
    pub allow_private: bool,
    /// Prefixes allowed even when private ("10.1.0.0/16", "fd00:20::/64").
    pub allow: Vec<String>,
    /// Prefixes always refused.
    pub deny: Vec<String>,
    /// CONNECT-UDP target ports allowed ("53", "1024-65535"); empty: every port.
    pub udp_ports: Vec<String>,
    /// Policies for requests carrying one bearer token, instead of this one.
    pub tokens: Vec<TokenPolicyConfig>,
}

/// `[[policy.tokens]]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenPolicyConfig {
    /// The bearer token (one of `tokens`).
    pub token: String,
    /// As in `[policy]`.
    #[serde(default)]
    pub allow_private: bool,
    /// As in `[policy]`.
    #[serde(default)]
    pub allow: Vec<String>,
    /// As in `[policy]`.
    #[serde(default)]
    pub deny: Vec<String>,
    /// As in `[policy]`.
    #[serde(default)]
    pub udp_ports: Vec<String>,
}

/// Why a destination is refused (a counter and a log reason each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Loopback, unspecified, link-local, multicast or broadcast.
    SpecialAddress,
    /// One of the proxy's own addresses.
    OwnAddress,
    /// A private or other non-global range, not allowed.
    Private,
    /// In a `deny` prefix.
    Denied,
    /// A CONNECT-UDP port not in `udp_ports`.
    Port,
}

impl Refusal {
    /// The counter's name.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::SpecialAddress => "special_address",
            Refusal::OwnAddress => "own_address",
            Refusal::Private => "private",
            Refusal::Denied => "denied",
            Refusal::Port => "port",
        }
    }
}

/// An address as one integer (IPv4 in the low 32 bits) with its family: what the checks compare.
type Key = (bool, u128);

fn key(addr: IpAddr) -> Key {
    match canonical(addr) {
        IpAddr::V4(a) => (true, u128::from(u32::from(a))),
        IpAddr::V6(a) => (false, u128::from(a)),
    }
}

/// A prefix as a masked integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Net {
    v4: bool,
    net: u128,
    mask: u128,
}

impl Net {
    fn of(p: &IpPrefix) -> Net {
        let (v4, x) = key(p.addr());
        let bits = if v4 { 32 } else { 128 };
        let len = u32::from(p.prefix_len());
        let mask = if len == 0 {
            0
        } else {
            (u128::MAX << (128 - len)) >> (128 - bits)
        };
        Net {
            v4,
            net: x & mask,
            mask,
        }
    }

    #[inline]
    fn contains(&self, (v4, x): Key) -> bool {
        self.v4 == v4 && x & self.mask == self.net
    }
}

/// The proxy's own addresses, as the checks compare them: one list per family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnAddresses {
    v4: Vec<u32>,
    v6: Vec<u128>,
}

impl OwnAddresses {
    /// These addresses.
    pub fn new(addrs: &[IpAddr]) -> OwnAddresses {
        let mut own = OwnAddresses::default();
        for &a in addrs {
            match key(a) {
                (true, x) => own.v4.push(x as u32),
                (false, x) => own.v6.push(x),
            }
        }
        own
    }

    #[inline]
    fn contains(&self, (v4, x): Key) -> bool {
        if v4 {
            self.v4.contains(&(x as u32))
        } else {
            self.v6.contains(&x)
        }
    }

    /// The addresses of every interface of this network namespace (getifaddrs(3)).
    pub fn read() -> OwnAddresses {
        OwnAddresses::new(&own_addresses())
    }
}

/// One policy, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetPolicy {
    allow_private: bool,
    allow: Vec<Net>,
    deny: Vec<Net>,
    ports: Vec<RangeInclusive<u16>>,
}

impl TargetPolicy {
    /// Everything allowed but the always-refused addresses (in-memory tests of sessions).
    pub fn permissive() -> TargetPolicy {
        TargetPolicy {
            allow_private: true,
            allow: Vec::new(),
            deny: Vec::new(),
            ports: Vec::new(),
        }
    }

    fn parse(
        allow_private: bool,
        allow: &[String],
        deny: &[String],
        ports: &[String],
        field: &str,
    ) -> Result<TargetPolicy, String> {
        let prefixes = |list: &[String], name: &str| {
            list.iter()
                .map(|p| {
                    parse_prefix(p)
                        .map(|p| Net::of(&p))
                        .map_err(|e| format!("{field}.{name}: {p:?}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let ports = ports
            .iter()
            .map(|p| parse_ports(p).map_err(|e| format!("{field}.udp_ports: {p:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TargetPolicy {
            allow_private,
            allow: prefixes(allow, "allow")?,
            deny: prefixes(deny, "deny")?,
            ports,
        })
    }

    /// Whether `addr` may be reached, with `own` the proxy's addresses.
    #[inline]
    pub fn check_addr(&self, addr: IpAddr, own: &OwnAddresses) -> Result<(), Refusal> {
        let k = key(addr);
        if self.deny.iter().any(|p| p.contains(k)) {
            return Err(Refusal::Denied);
        }
        if is_special(k) {
            return Err(Refusal::SpecialAddress);
        }
        if own.contains(k) {
            return Err(Refusal::OwnAddress);
        }
        if !self.allow_private && is_private(k) && !self.allow.iter().any(|p| p.contains(k)) {
            return Err(Refusal::Private);
        }
        Ok(())
    }

    /// Whether a CONNECT-UDP target `addr`:`port` may be reached.
    pub fn check_udp(&self, addr: IpAddr, port: u16, own: &OwnAddresses) -> Result<(), Refusal> {
        self.check_addr(addr, own)?;
        if !self.ports.is_empty() && !self.ports.iter().any(|r| r.contains(&port)) {
            return Err(Refusal::Port);
        }
        Ok(())
    }
}

/// A policy with the proxy's addresses it is checked against: what a CONNECT-IP session holds
/// to check each packet's destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    /// The request's policy.
    pub policy: TargetPolicy,
    /// The proxy's own addresses when the session started.
    pub own: OwnAddresses,
}

impl Guard {
    /// Whether a packet may go to `addr`.
    #[inline]
    pub fn check(&self, addr: IpAddr) -> Result<(), Refusal> {
        self.policy.check_addr(addr, &self.own)
    }
}

/// `[policy]` checked: the default policy and the per-token ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policies {
    default: TargetPolicy,
    by_token: Vec<(String, TargetPolicy)>,
}

impl Policies {
    /// Checks the configuration; every error names the field.
    pub fn from_config(c: &PolicyConfig) -> Result<Policies, String> {
        let default =
            TargetPolicy::parse(c.allow_private, &c.allow, &c.deny, &c.udp_ports, "policy")?;
        let by_token = c
            .tokens
            .iter()
            .map(|t| {
                TargetPolicy::parse(
                    t.allow_private,
                    &t.allow,
                    &t.deny,
                    &t.udp_ports,
                    "policy.tokens",
                )
                .map(|p| (t.token.clone(), p))
            })
            .collect::<Result<_, _>>()?;
        Ok(Policies { default, by_token })
    }

    /// The policy for a request that authenticated with `token` (or none).
    pub fn for_token(&self, token: Option<&[u8]>) -> &TargetPolicy {
        token
            .and_then(|t| {
                self.by_token
                    .iter()
                    .find(|(k, _)| k.as_bytes() == t)
                    .map(|(_, p)| p)
            })
            .unwrap_or(&self.default)
    }
}

/// An IPv4-mapped IPv6 address as its IPv4 address.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Never reachable through the proxy, whatever the lists say: loopback, unspecified (and
/// 0.0.0.0/8), link-local, multicast, the IPv4 broadcast address.
#[inline]
fn is_special((v4, x): Key) -> bool {
    if v4 {
        let x = x as u32;
        let first = x >> 24;
        first == 127 || first == 0 || x >> 16 == 0xa9fe || x >> 28 == 0xe || x == u32::MAX
    } else {
        x <= 1 || x >> 118 == 0x3fa || x >> 120 == 0xff
    }
}

/// Private and other non-global ranges (IANA special-purpose registries, RFC 6890): 10/8,
/// 172.16/12, 192.168/16 (RFC 1918), 100.64/10 (RFC 6598 shared address space), 198.18/15
/// (RFC 2544 benchmarking), 192.0.0.0/24 (RFC 6890 IETF protocol assignments), fc00::/7
/// (RFC 4193 unique local). By the first octet: a jump, not a walk of the list.
#[inline]
fn is_private((v4, x): Key) -> bool {
    if !v4 {
        return x >> 121 == 0xfc >> 1;
    }
    let x = x as u32;
    match x >> 24 {
        10 => true,
        172 => x >> 20 & 0xf == 1,
        192 => x >> 16 & 0xff == 168 || x >> 8 & 0xffff == 0,
        100 => x >> 22 & 0x3 == 1,
        198 => x >> 17 & 0x7f == 18 >> 1,
        _ => false,
    }
}

fn parse_prefix(text: &str) -> Result<IpPrefix, String> {
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text, None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| "not an IP address or prefix".to_string())?;
    let bits = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|&l| u32::from(l) <= bits)
            .ok_or_else(|| format!("prefix length must be 0..={bits}"))?,
        None => bits as u8,
    };
    IpPrefix::new(addr, len).map_err(|_| "address bits past the prefix length are set".into())
}

fn parse_ports(text: &str) -> Result<RangeInclusive<u16>, String> {
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| "ports are 1..=65535".to_string())
    };
    let range = match text.split_once('-') {
        Some((lo, hi)) => port(lo)?..=port(hi)?,
        None => port(text)?..=port(text)?,
    };
    if range.is_empty() {
        return Err("the range is empty".into());
    }
    Ok(range)
}

/// The addresses of every interface of this network namespace (getifaddrs(3)); the calling
/// thread's, for a thread moved into another namespace.
pub fn own_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list it allocates, freed below with freeifaddrs;
    // every node and its address are read only while the list lives, and each address is read
    // as the family it says it is.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut node = head;
        while !node.is_null() {
            let sa = (*node).ifa_addr;
            if !sa.is_null() {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(sa as *const libc::sockaddr_in);
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(sa as *const libc::sockaddr_in6);
                        out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            node = (*node).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn policies(toml_text: &str) -> Result<Policies, String> {
        let c: PolicyConfig = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        Policies::from_config(&c)
    }

    #[test]
    fn by_default_special_own_and_private_destinations_are_refused_and_public_ones_allowed() {
        let p = policies("").unwrap();
        let p = p.for_token(None);
        let own = OwnAddresses::new(&[ip("203.0.113.5"), ip("2001:db8::5")]);
        for (addr, want) in [
            ("127.0.0.1", Err(Refusal::SpecialAddress)),
            ("127.0.0.53", Err(Refusal::SpecialAddress)),
            ("::1", Err(Refusal::SpecialAddress)),
            ("::ffff:127.0.0.1", Err(Refusal::SpecialAddress)),
            ("0.0.0.0", Err(Refusal::SpecialAddress)),
            ("::", Err(Refusal::SpecialAddress)),
            ("169.254.169.254", Err(Refusal::SpecialAddress)),
            ("fe80::1", Err(Refusal::SpecialAddress)),
            ("224.0.0.251", Err(Refusal::SpecialAddress)),
            ("ff02::1", Err(Refusal::SpecialAddress)),
            ("255.255.255.255", Err(Refusal::SpecialAddress)),
            ("203.0.113.5", Err(Refusal::OwnAddress)),
            ("::ffff:203.0.113.5", Err(Refusal::OwnAddress)),
            ("2001:db8::5", Err(Refusal::OwnAddress)),
            ("10.1.2.3", Err(Refusal::Private)),
            ("172.20.0.1", Err(Refusal::Private)),
            ("192.168.1.1", Err(Refusal::Private)),
            ("100.64.0.1", Err(Refusal::Private)),
            ("198.18.20.2", Err(Refusal::Private)),
            ("fd00:20::2", Err(Refusal::Private)),
            ("8.8.8.8", Ok(())),
            ("2606:4700::1111", Ok(())),
            ("203.0.113.6", Ok(())),
        ] {
            assert_eq!(p.check_addr(ip(addr), &own), want, "{addr}");
        }
    }

    #[test]
    fn allow_deny_and_ports_apply_and_tokens_get_their_own_policy() {
        let p = policies(
            r#"
            allow = ["198.18.20.0/24"]
            deny = ["8.8.0.0/16", "2606:4700::/32"]
            udp_ports = ["53", "1024-65535"]
            [[tokens]]
            token = "lab"
            allow_private = true
            "#,
        )
        .unwrap();
        let d = p.for_token(None);
        let none = OwnAddresses::default();
        assert_eq!(d.check_addr(ip("198.18.20.2"), &none), Ok(()));
        assert_eq!(
            d.check_addr(ip("198.18.21.2"), &none),
            Err(Refusal::Private)
        );
        assert_eq!(d.check_addr(ip("8.8.8.8"), &none), Err(Refusal::Denied));
        assert_eq!(
            d.check_addr(ip("2606:4700::1"), &none),
            Err(Refusal::Denied)
        );
        assert_eq!(d.check_udp(ip("1.1.1.1"), 53, &none), Ok(()));
        assert_eq!(d.check_udp(ip("1.1.1.1"), 1024, &none), Ok(()));
        assert_eq!(d.check_udp(ip("1.1.1.1"), 123, &none), Err(Refusal::Port));
        let lab = p.for_token(Some(b"lab"));
        assert_eq!(lab.check_addr(ip("10.0.0.1"), &none), Ok(()));
        assert_eq!(lab.check_udp(ip("10.0.0.1"), 123, &none), Ok(()));
        assert_eq!(
            lab.check_addr(ip("127.0.0.1"), &none),
            Err(Refusal::SpecialAddress),
            "no list opens the loopback"
        );
        assert_eq!(p.for_token(Some(b"other")), d);
    }

    #[test]
    fn bad_policies_are_one_line_errors_naming_the_field() {
        for (text, want) in [
            (
                r#"allow = ["10.0.0.0/33"]"#,
                "policy.allow: \"10.0.0.0/33\": prefix length",
            ),
            (
                r#"deny = ["example.com"]"#,
                "policy.deny: \"example.com\": not an IP",
            ),
            (r#"deny = ["10.0.0.1/8"]"#, "bits past the prefix length"),
            (
                r#"udp_ports = ["0"]"#,
                "policy.udp_ports: \"0\": ports are 1..=65535",
            ),
            (r#"udp_ports = ["90-80"]"#, "the range is empty"),
            (r#"udp_ports = ["http"]"#, "ports are"),
            (
                "[[tokens]]\ntoken = \"t\"\nallow = [\"x\"]",
                "policy.tokens.allow",
            ),
        ] {
            let err = policies(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn own_addresses_include_the_loopback() {
        assert!(own_addresses().contains(&ip("127.0.0.1")));
        assert!(OwnAddresses::read().contains(key(ip("127.0.0.1"))));
    }

    #[test]
    fn the_private_ranges_are_exactly_their_prefixes() {
        let ranges = [
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",
            "198.18.0.0/15",
            "192.0.0.0/24",
            "fc00::/7",
        ]
        .map(|p| Net::of(&parse_prefix(p).unwrap()));
        let mut probe = 0x9e37_79b9_7f4a_7c15_u64;
        let check = |k: Key| {
            let want = ranges.iter().any(|n| n.contains(k));
            assert_eq!(is_private(k), want, "{k:x?}");
        };
        for n in ranges {
            // Each range's first and last address, and the ones just outside.
            let last = n.net | (!n.mask & if n.v4 { u32::MAX as u128 } else { u128::MAX });
            for x in [n.net, last, n.net.wrapping_sub(1), last.wrapping_add(1)] {
                check((n.v4, x & if n.v4 { u32::MAX as u128 } else { u128::MAX }));
            }
        }
        for _ in 0..100_000 {
            probe ^= probe << 13;
            probe ^= probe >> 7;
            probe ^= probe << 17;
            check((true, u128::from(probe as u32)));
            check((false, u128::from(probe) << 64 | u128::from(probe)));
        }
    }

    #[test]
    fn prefixes_as_integers_contain_what_ip_prefix_contains() {
        for (prefix, inside, outside) in [
            ("10.0.0.0/8", "10.255.0.1", "11.0.0.1"),
            ("0.0.0.0/0", "8.8.8.8", "::1"),
            ("198.18.20.99/32", "198.18.20.99", "198.18.20.98"),
            ("fd00:20::/64", "fd00:20::2", "fd00:21::2"),
            ("::/0", "2001:db8::1", "1.2.3.4"),
            ("2001:db8::1/128", "2001:db8::1", "2001:db8::2"),
        ] {
            let net = Net::of(&parse_prefix(prefix).unwrap());
            assert!(net.contains(key(ip(inside))), "{prefix} {inside}");
            assert!(!net.contains(key(ip(outside))), "{prefix} {outside}");
        }
    }
}
