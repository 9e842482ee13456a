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
//! Per packet (CONNECT-IP) a check is a few comparisons and a walk of the (short) lists; no
//! allocation.

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

/// One policy, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetPolicy {
    allow_private: bool,
    allow: Vec<IpPrefix>,
    deny: Vec<IpPrefix>,
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
                .map(|p| parse_prefix(p).map_err(|e| format!("{field}.{name}: {p:?}: {e}")))
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
    pub fn check_addr(&self, addr: IpAddr, own: &[IpAddr]) -> Result<(), Refusal> {
        let addr = canonical(addr);
        if self.deny.iter().any(|p| p.contains(addr)) {
            return Err(Refusal::Denied);
        }
        if is_special(addr) {
            return Err(Refusal::SpecialAddress);
        }
        if own.contains(&addr) {
            return Err(Refusal::OwnAddress);
        }
        if is_private(addr) && !self.allow_private && !self.allow.iter().any(|p| p.contains(addr)) {
            return Err(Refusal::Private);
        }
        Ok(())
    }

    /// Whether a CONNECT-UDP target `addr`:`port` may be reached.
    pub fn check_udp(&self, addr: IpAddr, port: u16, own: &[IpAddr]) -> Result<(), Refusal> {
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
    pub own: Vec<IpAddr>,
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

/// Never reachable through the proxy, whatever the lists say.
fn is_special(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => {
            a.is_loopback()
                || a.is_unspecified()
                || a.is_link_local()
                || a.is_multicast()
                || a.is_broadcast()
                || a.octets()[0] == 0
        }
        IpAddr::V6(a) => {
            a.is_loopback() || a.is_unspecified() || a.is_unicast_link_local() || a.is_multicast()
        }
    }
}

/// Private and other non-global ranges (IANA special-purpose registries, RFC 6890).
fn is_private(addr: IpAddr) -> bool {
    const V4: [(Ipv4Addr, u8); 6] = [
        (Ipv4Addr::new(10, 0, 0, 0), 8),     // RFC 1918
        (Ipv4Addr::new(172, 16, 0, 0), 12),  // RFC 1918
        (Ipv4Addr::new(192, 168, 0, 0), 16), // RFC 1918
        (Ipv4Addr::new(100, 64, 0, 0), 10),  // RFC 6598 shared address space
        (Ipv4Addr::new(198, 18, 0, 0), 15),  // RFC 2544 benchmarking
        (Ipv4Addr::new(192, 0, 0, 0), 24),   // RFC 6890 IETF protocol assignments
    ];
    const V6: [(Ipv6Addr, u8); 1] = [
        (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7), // RFC 4193 unique local
    ];
    match addr {
        IpAddr::V4(a) => V4.iter().any(|&(net, len)| {
            let mask = u32::MAX << (32 - len);
            u32::from(a) & mask == u32::from(net)
        }),
        IpAddr::V6(a) => V6.iter().any(|&(net, len)| {
            let mask = u128::MAX << (128 - len);
            u128::from(a) & mask == u128::from(net)
        }),
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

/// The addresses of every interface of this network namespace (getifaddrs(3)).
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
        let own = [ip("203.0.113.5"), ip("2001:db8::5")];
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
        assert_eq!(d.check_addr(ip("198.18.20.2"), &[]), Ok(()));
        assert_eq!(d.check_addr(ip("198.18.21.2"), &[]), Err(Refusal::Private));
        assert_eq!(d.check_addr(ip("8.8.8.8"), &[]), Err(Refusal::Denied));
        assert_eq!(d.check_addr(ip("2606:4700::1"), &[]), Err(Refusal::Denied));
        assert_eq!(d.check_udp(ip("1.1.1.1"), 53, &[]), Ok(()));
        assert_eq!(d.check_udp(ip("1.1.1.1"), 1024, &[]), Ok(()));
        assert_eq!(d.check_udp(ip("1.1.1.1"), 123, &[]), Err(Refusal::Port));
        let lab = p.for_token(Some(b"lab"));
        assert_eq!(lab.check_addr(ip("10.0.0.1"), &[]), Ok(()));
        assert_eq!(lab.check_udp(ip("10.0.0.1"), 123, &[]), Ok(()));
        assert_eq!(
            lab.check_addr(ip("127.0.0.1"), &[]),
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
    }
}
