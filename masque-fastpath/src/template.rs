//! The URI templates of CONNECT-UDP (RFC 9298 §2) and CONNECT-IP (RFC 9484 §4.6). The
//! well-known defaults are
//!
//! ```text
//! /.well-known/masque/udp/{target_host}/{target_port}/
//! /.well-known/masque/ip/{target}/{ipproto}/
//! ```
//!
//! and a proxy may use any other template with the same variables (RFC 9298 §3, RFC 9484 §3: the
//! client is configured with it): [`UriTemplate`] takes literal text, simple variables and a
//! form-style query (RFC 6570 levels 1 and 3), e.g. `/masque/udp/{target_host}/{target_port}`
//! or `/masque{?target_host,target_port}`. A path is matched with or without the template's
//! trailing slash, so clients that build paths either way are served.
//!
//! A client expands a [`UdpTarget`] or an [`IpScope`] into a `:path` (IPv6 colons written as
//! `%3A`, a prefix's slash as `%2F`); a proxy parses the `:path` of an extended CONNECT back into
//! the same types, or gets a typed [`Error`] it can turn into a 400. CONNECT-IP scoping: `*` (or
//! an empty variable) is the wildcard; a target is an IPv4 or IPv6 address or prefix, or a
//! hostname; ipproto is a protocol number 0–255.
//!
//! Control path (once per request): expansion allocates the returned `String`; parsing allocates
//! only for hostnames. Nothing here panics on any input.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::capsule::IpPrefix;

/// The path of the default CONNECT-UDP template up to its first variable.
pub const UDP_PATH_PREFIX: &str = "/.well-known/masque/udp/";
/// The path of the default CONNECT-IP template up to its first variable.
pub const IP_PATH_PREFIX: &str = "/.well-known/masque/ip/";

/// The default CONNECT-UDP template (RFC 9298 §3).
pub const DEFAULT_UDP_TEMPLATE: &str = "/.well-known/masque/udp/{target_host}/{target_port}/";
/// The default CONNECT-IP template (RFC 9484 §3).
pub const DEFAULT_IP_TEMPLATE: &str = "/.well-known/masque/ip/{target}/{ipproto}/";
/// The variables of the CONNECT-UDP template.
pub const UDP_VARIABLES: [&str; 2] = ["target_host", "target_port"];
/// The variables of the CONNECT-IP template.
pub const IP_VARIABLES: [&str; 2] = ["target", "ipproto"];

/// The longest hostname accepted (the DNS limit on a name's text form).
pub const MAX_HOSTNAME_LEN: usize = 253;

/// Why a path does not match a template, or a value cannot be expanded into one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The path does not start with the template's well-known prefix.
    WrongPrefix,
    /// The path has a query or fragment, which the default templates do not.
    QueryOrFragment,
    /// The path does not have exactly two variable segments each followed by `/`.
    WrongSegments,
    /// A `%` not followed by two hex digits, or a character a path segment cannot hold.
    BadPercentEncoding,
    /// An IPv6 literal whose colons are not percent-encoded.
    UnencodedColon,
    /// An IPv6 zone identifier (`%25...`), which neither RFC supports.
    ZoneIdUnsupported,
    /// A host with a colon that is not an IPv6 address.
    InvalidIpLiteral,
    /// An empty host, or a hostname with characters a DNS name cannot hold, or too long.
    InvalidHostname,
    /// A wildcard where the template needs a value (CONNECT-UDP target_host).
    WildcardNotAllowed,
    /// A port that is not a decimal number from 1 to 65535.
    InvalidPort,
    /// A prefix length that is not decimal, too long for its address, or on a hostname.
    InvalidPrefixLength,
    /// Address bits beyond the prefix length are not zero.
    HostBitsSet,
    /// An ipproto that is not a decimal number from 0 to 255 or `*`.
    InvalidIpProtocol,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Error::WrongPrefix => "path does not match the template prefix",
            Error::QueryOrFragment => "path has a query or fragment",
            Error::WrongSegments => "path does not have the template segments",
            Error::BadPercentEncoding => "bad percent-encoding or character in a path segment",
            Error::UnencodedColon => "IPv6 colon not percent-encoded",
            Error::ZoneIdUnsupported => "IPv6 zone identifiers are not supported",
            Error::InvalidIpLiteral => "invalid IP literal",
            Error::InvalidHostname => "invalid hostname",
            Error::WildcardNotAllowed => "wildcard where a host is required",
            Error::InvalidPort => "port not a number from 1 to 65535",
            Error::InvalidPrefixLength => "invalid prefix length",
            Error::HostBitsSet => "address bits past the prefix length are set",
            Error::InvalidIpProtocol => "ipproto not a number from 0 to 255 or *",
        })
    }
}

impl std::error::Error for Error {}

/// A CONNECT-UDP or CONNECT-IP host: an IP address or a DNS name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// An IPv4 or IPv6 literal.
    Ip(IpAddr),
    /// A DNS name (ASCII letters, digits, `-`, `_` and `.`; at most 253 bytes).
    Name(String),
}

/// The target of a CONNECT-UDP request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UdpTarget {
    /// The UDP target's host.
    pub host: Host,
    /// The UDP target's port, 1–65535.
    pub port: u16,
}

impl UdpTarget {
    /// Expands the default template into a `:path`.
    pub fn to_path(&self) -> Result<String, Error> {
        self.expand(&UriTemplate::udp_default())
    }

    /// Expands `template` (with [`UDP_VARIABLES`]) into a `:path`.
    pub fn expand(&self, template: &UriTemplate) -> Result<String, Error> {
        if self.port == 0 {
            return Err(Error::InvalidPort);
        }
        let mut host = String::new();
        push_host(&mut host, &self.host)?;
        Ok(template.expand(&[host, self.port.to_string()]))
    }

    /// Matches a `:path` against the default template.
    pub fn parse_path(path: &str) -> Result<Self, Error> {
        Self::match_path(&UriTemplate::udp_default(), path)
    }

    /// Matches a `:path` against `template`.
    pub fn match_path(template: &UriTemplate, path: &str) -> Result<Self, Error> {
        let [host, port] = template.capture(path)?;
        if host == "*" || host.is_empty() {
            return Err(Error::WildcardNotAllowed);
        }
        let host = parse_host(host)?;
        Ok(UdpTarget {
            host,
            port: parse_port(port)?,
        })
    }
}

/// The `{target}` of a CONNECT-IP request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IpTarget {
    /// `*` or absent: any allowable host.
    Any,
    /// One address (a full-length prefix) or a prefix.
    Prefix(IpPrefix),
    /// A hostname for the proxy to resolve.
    Name(String),
}

/// The `{ipproto}` of a CONNECT-IP request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpProtocolScope {
    /// `*` or absent: any IP protocol.
    Any,
    /// One IP protocol number.
    Protocol(u8),
}

/// The scope of a CONNECT-IP request (RFC 9484 §4.6).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IpScope {
    /// Which hosts the client may reach.
    pub target: IpTarget,
    /// Which IP protocol it may use.
    pub ipproto: IpProtocolScope,
}

impl IpScope {
    /// The unscoped request, `/.well-known/masque/ip/*/*/`.
    pub const ANY: IpScope = IpScope {
        target: IpTarget::Any,
        ipproto: IpProtocolScope::Any,
    };

    /// Expands the default template into a `:path`.
    pub fn to_path(&self) -> Result<String, Error> {
        self.expand(&UriTemplate::ip_default())
    }

    /// Expands `template` (with [`IP_VARIABLES`]) into a `:path`.
    pub fn expand(&self, template: &UriTemplate) -> Result<String, Error> {
        let mut target = String::new();
        match &self.target {
            IpTarget::Any => target.push('*'),
            IpTarget::Prefix(p) => {
                push_host(&mut target, &Host::Ip(p.addr()))?;
                if u32::from(p.prefix_len()) < addr_bits(p.addr()) {
                    let _ = write!(target, "%2F{}", p.prefix_len());
                }
            }
            IpTarget::Name(name) => push_host(&mut target, &Host::Name(name.clone()))?,
        }
        let ipproto = match self.ipproto {
            IpProtocolScope::Any => "*".to_string(),
            IpProtocolScope::Protocol(n) => n.to_string(),
        };
        Ok(template.expand(&[target, ipproto]))
    }

    /// Matches a `:path` against the default template.
    pub fn parse_path(path: &str) -> Result<Self, Error> {
        Self::match_path(&UriTemplate::ip_default(), path)
    }

    /// Matches a `:path` against `template`.
    pub fn match_path(template: &UriTemplate, path: &str) -> Result<Self, Error> {
        let [target, ipproto] = template.capture(path)?;
        Ok(IpScope {
            target: parse_ip_target(target)?,
            ipproto: parse_ipproto(ipproto)?,
        })
    }

    /// Whether a packet with this destination and (upper-layer) protocol is inside the scope;
    /// `None` when the target is a hostname, which only the proxy's resolution can answer.
    pub fn allows(&self, destination: IpAddr, protocol: u8) -> Option<bool> {
        let proto_ok = match self.ipproto {
            IpProtocolScope::Any => true,
            IpProtocolScope::Protocol(p) => p == protocol,
        };
        match &self.target {
            IpTarget::Any => Some(proto_ok),
            IpTarget::Prefix(p) => Some(proto_ok && p.contains(destination)),
            IpTarget::Name(_) => None,
        }
    }
}

// ---- helpers ----

/// A URI template of the two variables of one protocol, as the proxy serves it or a client
/// expands it: literal text, `{var}` (a value up to the next literal text, never holding `/`,
/// `?` or `#`) and, at the end, a form-style query `{?var,var}` (`?var=value&var=value`, in any
/// order). Parsed once from the configuration; matching allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriTemplate {
    parts: Vec<Part>,
    /// The protocol's variable names ([`UDP_VARIABLES`] or [`IP_VARIABLES`]).
    names: [&'static str; 2],
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// Index of the variable in the protocol's list.
    Var(usize),
    /// A form-style query of these variables.
    Query(Vec<usize>),
}

impl UriTemplate {
    /// Parses `text` with the variables `names` (each exactly once; [`UDP_VARIABLES`] or
    /// [`IP_VARIABLES`]); the message says what is wrong.
    pub fn parse(text: &str, names: [&'static str; 2]) -> Result<UriTemplate, String> {
        if !text.starts_with('/') {
            return Err(format!("template {text:?} does not start with '/'"));
        }
        let mut parts = Vec::new();
        let mut seen = [false; 2];
        let mut rest = text;
        while !rest.is_empty() {
            let Some(open) = rest.find('{') else {
                parts.push(Part::Literal(rest.to_string()));
                break;
            };
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("template {text:?}: '{{' without '}}'"))?;
            let expr = &rest[open + 1..open + close];
            rest = &rest[open + close + 1..];
            let (query, vars) = match expr.strip_prefix('?') {
                Some(list) => (true, list),
                None => (false, expr),
            };
            let mut indices = Vec::new();
            for name in vars.split(',') {
                let i = names.iter().position(|n| *n == name).ok_or_else(|| {
                    format!(
                        "template {text:?}: unknown variable {name:?} (expected {} and {})",
                        names[0], names[1]
                    )
                })?;
                if std::mem::replace(&mut seen[i], true) {
                    return Err(format!("template {text:?}: {name} appears twice"));
                }
                indices.push(i);
            }
            if query {
                if !rest.is_empty() {
                    return Err(format!(
                        "template {text:?}: a query {{?...}} must come last"
                    ));
                }
                parts.push(Part::Query(indices));
            } else {
                if indices.len() != 1 {
                    return Err(format!(
                        "template {text:?}: one variable per {{...}} outside a query"
                    ));
                }
                if matches!(parts.last(), Some(Part::Var(_))) {
                    return Err(format!(
                        "template {text:?}: two variables need literal text between them"
                    ));
                }
                parts.push(Part::Var(indices[0]));
            }
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            return Err(format!("template {text:?}: no {{{}}}", names[i]));
        }
        Ok(UriTemplate { parts, names })
    }

    /// The default CONNECT-UDP template.
    pub fn udp_default() -> UriTemplate {
        UriTemplate::parse(DEFAULT_UDP_TEMPLATE, UDP_VARIABLES).expect("the default is valid")
    }

    /// The default CONNECT-IP template.
    pub fn ip_default() -> UriTemplate {
        UriTemplate::parse(DEFAULT_IP_TEMPLATE, IP_VARIABLES).expect("the default is valid")
    }

    /// The path with `values` (already percent-encoded, in the variables' order) filled in.
    fn expand(&self, values: &[String; 2]) -> String {
        let mut path = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(l) => path.push_str(l),
                Part::Var(i) => path.push_str(&values[*i]),
                Part::Query(vars) => {
                    for (n, i) in vars.iter().enumerate() {
                        path.push(if n == 0 { '?' } else { '&' });
                        let _ = write!(path, "{}={}", self.names[*i], values[*i]);
                    }
                }
            }
        }
        path
    }

    /// The two raw (still percent-encoded) values of `path`, in the variables' order.
    fn capture<'a>(&self, path: &'a str) -> Result<[&'a str; 2], Error> {
        if path.contains('#') {
            return Err(Error::QueryOrFragment);
        }
        let has_query = self.parts.iter().any(|p| match p {
            Part::Literal(l) => l.contains('?'),
            Part::Query(_) => true,
            Part::Var(_) => false,
        });
        if !has_query && path.contains('?') {
            return Err(Error::QueryOrFragment);
        }
        let mut values = [""; 2];
        let mut rest = path;
        for (n, part) in self.parts.iter().enumerate() {
            let last = n + 1 == self.parts.len();
            match part {
                Part::Literal(l) => {
                    // The template's trailing slash is optional in the path, and the other
                    // way round.
                    let l = if last {
                        l.strip_suffix('/').unwrap_or(l)
                    } else {
                        l
                    };
                    rest = rest.strip_prefix(l).ok_or(if n == 0 {
                        Error::WrongPrefix
                    } else {
                        Error::WrongSegments
                    })?;
                    if last && !(rest.is_empty() || rest == "/") {
                        return Err(Error::WrongSegments);
                    }
                }
                Part::Var(i) => {
                    let end = match self.parts.get(n + 1) {
                        Some(Part::Literal(next)) => {
                            let next = if n + 2 == self.parts.len() {
                                next.strip_suffix('/').unwrap_or(next)
                            } else {
                                next
                            };
                            if next.is_empty() {
                                rest.strip_suffix('/').unwrap_or(rest).len()
                            } else {
                                rest.find(next).ok_or(Error::WrongSegments)?
                            }
                        }
                        Some(Part::Query(_)) => rest.find('?').unwrap_or(rest.len()),
                        _ => rest.strip_suffix('/').unwrap_or(rest).len(),
                    };
                    let value = &rest[..end];
                    if value.contains(['/', '?']) {
                        return Err(Error::WrongSegments);
                    }
                    values[*i] = value;
                    rest = &rest[end..];
                    if last && !(rest.is_empty() || rest == "/") {
                        return Err(Error::WrongSegments);
                    }
                }
                Part::Query(vars) => {
                    let query = match rest.strip_prefix('?') {
                        Some(q) => q,
                        None if rest.is_empty() || rest == "/" => "",
                        None => return Err(Error::WrongSegments),
                    };
                    let names = self.names;
                    for pair in query.split('&').filter(|p| !p.is_empty()) {
                        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                        if let Some(&i) = vars.iter().find(|&&i| names[i] == name) {
                            values[i] = value;
                        }
                    }
                }
            }
        }
        Ok(values)
    }
}

/// Characters RFC 3986 lets a path segment hold unencoded (pchar minus pct-encoded).
fn is_pchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&c)
}

/// Percent-decodes a segment into `out`; rejects characters a segment cannot hold.
fn percent_decode(segment: &str, out: &mut Vec<u8>) -> Result<(), Error> {
    let bytes = segment.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'%' {
            let hi = bytes.get(i + 1).and_then(|&h| hex(h));
            let lo = bytes.get(i + 2).and_then(|&l| hex(l));
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(Error::BadPercentEncoding);
            };
            out.push(hi << 4 | lo);
            i += 3;
        } else if is_pchar(c) {
            out.push(c);
            i += 1;
        } else {
            return Err(Error::BadPercentEncoding);
        }
    }
    Ok(())
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

fn parse_host(raw: &str) -> Result<Host, Error> {
    //= https://www.rfc-editor.org/rfc/rfc9484#section-4.6
    //# if "target" contains an IPv6 literal or prefix, the colons (":") MUST be
    //# percent-encoded.
    // RFC 9298 §2 asks the same of target_host.
    if raw.contains(':') {
        return Err(Error::UnencodedColon);
    }
    let mut decoded = Vec::with_capacity(raw.len());
    percent_decode(raw, &mut decoded)?;
    if decoded.contains(&b':') {
        //= https://www.rfc-editor.org/rfc/rfc9484#section-4.6
        //# Note that IPv6 scoped addressing zone identifiers ([RFC6874]) are
        //# not supported.
        if decoded.contains(&b'%') {
            return Err(Error::ZoneIdUnsupported);
        }
        let text = std::str::from_utf8(&decoded).map_err(|_| Error::InvalidIpLiteral)?;
        return text
            .parse::<Ipv6Addr>()
            .map(|a| Host::Ip(IpAddr::V6(a)))
            .map_err(|_| Error::InvalidIpLiteral);
    }
    if let Ok(a) = std::str::from_utf8(&decoded)
        .unwrap_or("")
        .parse::<Ipv4Addr>()
    {
        return Ok(Host::Ip(IpAddr::V4(a)));
    }
    if !is_hostname(&decoded) {
        return Err(Error::InvalidHostname);
    }
    // Every byte is ASCII, checked just above.
    Ok(Host::Name(decoded.iter().map(|&c| c as char).collect()))
}

/// A DNS name in text form: 1–253 bytes of labels of 1–63 letters, digits, `-` or `_`, separated
/// by dots, the last label not all digits (so `010.0.0.1`, which `Ipv4Addr` refuses, is not
/// handed to a resolver that might read it as an address).
fn is_hostname(name: &[u8]) -> bool {
    if name.is_empty() || name.len() > MAX_HOSTNAME_LEN {
        return false;
    }
    let labels_ok = name.split(|&c| c == b'.').all(|label| {
        (1..=63).contains(&label.len())
            && label
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    });
    let last_numeric = name
        .rsplit(|&c| c == b'.')
        .next()
        .is_some_and(|last| last.iter().all(u8::is_ascii_digit));
    labels_ok && !last_numeric
}

fn parse_port(raw: &str) -> Result<u16, Error> {
    if raw.is_empty() || raw.len() > 5 || !raw.bytes().all(|c| c.is_ascii_digit()) {
        return Err(Error::InvalidPort);
    }
    match raw.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(Error::InvalidPort),
    }
}

fn parse_ip_target(raw: &str) -> Result<IpTarget, Error> {
    //= https://www.rfc-editor.org/rfc/rfc9484#section-4.6
    //# Both the "target" and "ipproto" variables are optional; if they are not
    //# included, they are considered to carry the wildcard value "*".
    if raw.is_empty() || raw == "*" {
        return Ok(IpTarget::Any);
    }
    //= https://www.rfc-editor.org/rfc/rfc9484#section-4.6
    //# If present, the IP prefix length in "target" SHALL be preceded by a
    //# percent-encoded slash ("/"): "%2F".
    let slash = raw.find("%2F").or_else(|| raw.find("%2f"));
    let (addr_part, len_part) = match slash {
        Some(i) => (&raw[..i], Some(&raw[i + 3..])),
        None => (raw, None),
    };
    let host = parse_host(addr_part)?;
    let Some(len_part) = len_part else {
        return Ok(match host {
            Host::Ip(addr) => IpTarget::Prefix(IpPrefix::host(addr)),
            Host::Name(name) => IpTarget::Name(name),
        });
    };
    let Host::Ip(addr) = host else {
        return Err(Error::InvalidPrefixLength);
    };
    //= https://www.rfc-editor.org/rfc/rfc9484#section-4.6
    //# The IP prefix length MUST represent a
    //# decimal integer between 0 and the length of the IP address in bits, inclusive.
    // ABNF: IPv6prefix = IPv6address ["%2F" 1*3DIGIT], IPv4prefix = IPv4address ["%2F" 1*2DIGIT].
    let max_digits = if addr.is_ipv4() { 2 } else { 3 };
    if len_part.is_empty()
        || len_part.len() > max_digits
        || !len_part.bytes().all(|c| c.is_ascii_digit())
    {
        return Err(Error::InvalidPrefixLength);
    }
    let len: u8 = len_part.parse().map_err(|_| Error::InvalidPrefixLength)?;
    //= https://www.rfc-editor.org/rfc/rfc9484#section-4.6
    //# If "target" contains an IP prefix and the prefix length is strictly less than
    //# the length of the IP address in bits, the lower bits of the IP address that
    //# are not covered by the prefix length MUST all be set to 0.
    match IpPrefix::new(addr, len) {
        Ok(p) => Ok(IpTarget::Prefix(p)),
        Err(crate::capsule::Error::HostBitsSet) => Err(Error::HostBitsSet),
        Err(_) => Err(Error::InvalidPrefixLength),
    }
}

fn parse_ipproto(raw: &str) -> Result<IpProtocolScope, Error> {
    if raw.is_empty() || raw == "*" {
        return Ok(IpProtocolScope::Any);
    }
    //= https://www.rfc-editor.org/rfc/rfc9484#section-4.6
    //# "ipproto" MUST represent a decimal integer between 0 and 255 inclusive, or
    //# the wildcard value "*".
    if raw.len() > 3 || !raw.bytes().all(|c| c.is_ascii_digit()) {
        return Err(Error::InvalidIpProtocol);
    }
    raw.parse::<u8>()
        .map(IpProtocolScope::Protocol)
        .map_err(|_| Error::InvalidIpProtocol)
}

/// Writes a host into a path segment: IPv6 colons as `%3A`; a hostname must be valid.
fn push_host(path: &mut String, host: &Host) -> Result<(), Error> {
    match host {
        Host::Ip(IpAddr::V4(a)) => {
            let _ = write!(path, "{a}");
        }
        Host::Ip(IpAddr::V6(a)) => {
            for c in a.to_string().chars() {
                if c == ':' {
                    path.push_str("%3A")
                } else {
                    path.push(c)
                }
            }
        }
        Host::Name(name) => {
            // A valid hostname holds only unreserved characters: nothing to percent-encode.
            if !is_hostname(name.as_bytes()) {
                return Err(Error::InvalidHostname);
            }
            path.push_str(name);
        }
    }
    Ok(())
}

fn addr_bits(addr: IpAddr) -> u32 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn udp_ipv4_target_round_trips() {
        let path = "/.well-known/masque/udp/192.0.2.6/443/";
        let t = UdpTarget::parse_path(path).unwrap();
        assert_eq!(
            t,
            UdpTarget {
                host: Host::Ip(ip("192.0.2.6")),
                port: 443
            }
        );
        assert_eq!(t.to_path().unwrap(), path);
    }

    //= https://www.rfc-editor.org/rfc/rfc9484#section-4.6
    //# For example, if the target host is "2001:db8::42", it will
    //# be encoded in the URI as "2001%3Adb8%3A%3A42".
    #[test]
    fn udp_ipv6_target_is_percent_encoded() {
        let t = UdpTarget {
            host: Host::Ip(ip("2001:db8::42")),
            port: 53,
        };
        let path = t.to_path().unwrap();
        assert_eq!(path, "/.well-known/masque/udp/2001%3Adb8%3A%3A42/53/");
        assert_eq!(UdpTarget::parse_path(&path), Ok(t.clone()));
        // Lower-case hex in the escape is the same character.
        assert_eq!(
            UdpTarget::parse_path("/.well-known/masque/udp/2001%3adb8%3a%3a42/53/"),
            Ok(t)
        );
    }

    #[test]
    fn a_path_matches_with_or_without_the_templates_trailing_slash() {
        let want = UdpTarget {
            host: Host::Ip(ip("192.0.2.6")),
            port: 443,
        };
        let no_slash =
            UriTemplate::parse("/masque/udp/{target_host}/{target_port}", UDP_VARIABLES).unwrap();
        for path in [
            "/.well-known/masque/udp/192.0.2.6/443/",
            "/.well-known/masque/udp/192.0.2.6/443",
        ] {
            assert_eq!(UdpTarget::parse_path(path), Ok(want.clone()), "{path}");
        }
        for path in ["/masque/udp/192.0.2.6/443", "/masque/udp/192.0.2.6/443/"] {
            assert_eq!(
                UdpTarget::match_path(&no_slash, path),
                Ok(want.clone()),
                "{path}"
            );
        }
        assert_eq!(want.expand(&no_slash).unwrap(), "/masque/udp/192.0.2.6/443");
        assert_eq!(
            UdpTarget::match_path(&no_slash, "/masque/udp/192.0.2.6/443//"),
            Err(Error::WrongSegments)
        );
    }

    #[test]
    fn templates_with_the_variables_in_the_query_expand_and_match_in_any_order() {
        let form = UriTemplate::parse("/masque{?target_host,target_port}", UDP_VARIABLES).unwrap();
        let t = UdpTarget {
            host: Host::Ip(ip("2001:db8::42")),
            port: 53,
        };
        let path = t.expand(&form).unwrap();
        assert_eq!(
            path,
            "/masque?target_host=2001%3Adb8%3A%3A42&target_port=53"
        );
        assert_eq!(UdpTarget::match_path(&form, &path), Ok(t.clone()));
        assert_eq!(
            UdpTarget::match_path(
                &form,
                "/masque?target_port=53&x=1&target_host=2001%3Adb8%3A%3A42"
            ),
            Ok(t.clone())
        );
        assert_eq!(
            UdpTarget::match_path(&form, "/masque?target_port=53"),
            Err(Error::WildcardNotAllowed),
            "a missing variable is empty"
        );
        let literal =
            UriTemplate::parse("/proxy?h={target_host}&p={target_port}", UDP_VARIABLES).unwrap();
        let path = t.expand(&literal).unwrap();
        assert_eq!(path, "/proxy?h=2001%3Adb8%3A%3A42&p=53");
        assert_eq!(UdpTarget::match_path(&literal, &path), Ok(t));
        let ip = UriTemplate::parse("/vpn{?target,ipproto}", IP_VARIABLES).unwrap();
        assert_eq!(
            IpScope::match_path(&ip, "/vpn?ipproto=17"),
            Ok(IpScope {
                target: IpTarget::Any,
                ipproto: IpProtocolScope::Protocol(17)
            }),
            "an absent CONNECT-IP variable is the wildcard (RFC 9484 §4.6)"
        );
        assert_eq!(IpScope::ANY.expand(&ip).unwrap(), "/vpn?target=*&ipproto=*");
        // A query where the template has none is refused, as before.
        assert_eq!(
            UdpTarget::parse_path("/.well-known/masque/udp/192.0.2.6/443/?a=b"),
            Err(Error::QueryOrFragment)
        );
    }

    #[test]
    fn bad_templates_are_refused_with_what_is_wrong() {
        for (text, want) in [
            (
                "masque/{target_host}/{target_port}",
                "does not start with '/'",
            ),
            ("/m/{target_host}/{port}", "unknown variable \"port\""),
            ("/m/{target_host}/{target_host}", "appears twice"),
            ("/m/{target_host}", "no {target_port}"),
            ("/m/{target_host}{target_port}", "literal text between them"),
            ("/m{?target_host}/{target_port}", "must come last"),
            ("/m/{target_host/{target_port}", "unknown variable"),
            ("/m/{target_host", "without '}'"),
        ] {
            let err = UriTemplate::parse(text, UDP_VARIABLES).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn udp_hostname_round_trips() {
        let path = "/.well-known/masque/udp/target.example.com/8443/";
        let t = UdpTarget::parse_path(path).unwrap();
        assert_eq!(t.host, Host::Name("target.example.com".into()));
        assert_eq!(t.to_path().unwrap(), path);
    }

    #[test]
    fn udp_malformed_paths_get_typed_errors() {
        let cases: &[(&str, Error)] = &[
            ("/.well-known/masque/ip/192.0.2.6/443/", Error::WrongPrefix),
            ("/.well-known/masque/udp/192.0.2.6/", Error::InvalidPort),
            ("/.well-known/masque/udp/192.0.2.6", Error::WrongSegments),
            (
                "/.well-known/masque/udp/192.0.2.6/443/x/",
                Error::WrongSegments,
            ),
            (
                "/.well-known/masque/udp/192.0.2.6/443/?a=b",
                Error::QueryOrFragment,
            ),
            (
                "/.well-known/masque/udp/2001:db8::42/443/",
                Error::UnencodedColon,
            ),
            (
                "/.well-known/masque/udp/fe80%3A%3A1%25eth0/443/",
                Error::ZoneIdUnsupported,
            ),
            (
                "/.well-known/masque/udp/2001%3Azz%3A%3A1/443/",
                Error::InvalidIpLiteral,
            ),
            (
                "/.well-known/masque/udp/bad%2host/443/",
                Error::BadPercentEncoding,
            ),
            (
                "/.well-known/masque/udp/bad%/443/",
                Error::BadPercentEncoding,
            ),
            (
                "/.well-known/masque/udp/a b/443/",
                Error::BadPercentEncoding,
            ),
            (
                "/.well-known/masque/udp/exa%20mple/443/",
                Error::InvalidHostname,
            ),
            (
                "/.well-known/masque/udp/010.0.0.1/443/",
                Error::InvalidHostname,
            ),
            (
                "/.well-known/masque/udp/10.0.0.256/443/",
                Error::InvalidHostname,
            ),
            (
                "/.well-known/masque/udp/a..example/443/",
                Error::InvalidHostname,
            ),
            (
                "/.well-known/masque/udp/.example/443/",
                Error::InvalidHostname,
            ),
            (
                "/.well-known/masque/udp/%C3%A9.example/443/",
                Error::InvalidHostname,
            ),
            ("/.well-known/masque/udp/%2A/443/", Error::InvalidHostname),
            ("/.well-known/masque/udp/*/443/", Error::WildcardNotAllowed),
            ("/.well-known/masque/udp//443/", Error::WildcardNotAllowed),
            ("/.well-known/masque/udp/192.0.2.6/0/", Error::InvalidPort),
            (
                "/.well-known/masque/udp/192.0.2.6/65536/",
                Error::InvalidPort,
            ),
            (
                "/.well-known/masque/udp/192.0.2.6/+443/",
                Error::InvalidPort,
            ),
            (
                "/.well-known/masque/udp/192.0.2.6/000443/",
                Error::InvalidPort,
            ),
            ("/.well-known/masque/udp/192.0.2.6//", Error::InvalidPort),
        ];
        for (path, want) in cases {
            assert_eq!(UdpTarget::parse_path(path), Err(*want), "{path}");
        }
        let t = UdpTarget {
            host: Host::Ip(ip("192.0.2.6")),
            port: 0,
        };
        assert_eq!(t.to_path(), Err(Error::InvalidPort));
        let spaced = UdpTarget {
            host: Host::Name("a b".into()),
            port: 1,
        };
        assert_eq!(spaced.to_path(), Err(Error::InvalidHostname));
        let too_long = UdpTarget {
            host: Host::Name("a".repeat(254)),
            port: 1,
        };
        assert_eq!(too_long.to_path(), Err(Error::InvalidHostname));
    }

    #[test]
    fn ip_unscoped_request_is_the_rfc_example() {
        assert_eq!(
            IpScope::ANY.to_path().unwrap(),
            "/.well-known/masque/ip/*/*/"
        );
        assert_eq!(
            IpScope::parse_path("/.well-known/masque/ip/*/*/"),
            Ok(IpScope::ANY)
        );
        // Absent variables expand to empty segments and mean the wildcard.
        assert_eq!(
            IpScope::parse_path("/.well-known/masque/ip///"),
            Ok(IpScope::ANY)
        );
    }

    #[test]
    fn ip_scoped_requests_round_trip() {
        let cases = [
            (
                "/.well-known/masque/ip/192.0.2.0%2F24/17/",
                IpTarget::Prefix(IpPrefix::new(ip("192.0.2.0"), 24).unwrap()),
                IpProtocolScope::Protocol(17),
            ),
            (
                "/.well-known/masque/ip/2001%3Adb8%3A%3A%2F32/*/",
                IpTarget::Prefix(IpPrefix::new(ip("2001:db8::"), 32).unwrap()),
                IpProtocolScope::Any,
            ),
            (
                "/.well-known/masque/ip/2001%3Adb8%3A%3A42/6/",
                IpTarget::Prefix(IpPrefix::host(ip("2001:db8::42"))),
                IpProtocolScope::Protocol(6),
            ),
            (
                "/.well-known/masque/ip/target.example.com/0/",
                IpTarget::Name("target.example.com".into()),
                IpProtocolScope::Protocol(0),
            ),
        ];
        for (path, target, ipproto) in cases {
            let scope = IpScope { target, ipproto };
            assert_eq!(IpScope::parse_path(path), Ok(scope.clone()), "{path}");
            assert_eq!(scope.to_path().unwrap(), path);
        }
        // A full-length prefix written out is the single address.
        assert_eq!(
            IpScope::parse_path("/.well-known/masque/ip/192.0.2.1%2f32/*/")
                .unwrap()
                .target,
            IpTarget::Prefix(IpPrefix::host(ip("192.0.2.1")))
        );
    }

    #[test]
    fn ip_malformed_paths_get_typed_errors() {
        let cases: &[(&str, Error)] = &[
            ("/.well-known/masque/udp/*/*/", Error::WrongPrefix),
            ("/.well-known/masque/ip/*/*/*/", Error::WrongSegments),
            (
                "/.well-known/masque/ip/192.0.2.0/24/*/",
                Error::WrongSegments,
            ),
            (
                "/.well-known/masque/ip/192.0.2.0%2F33/*/",
                Error::InvalidPrefixLength,
            ),
            (
                "/.well-known/masque/ip/192.0.2.0%2F024/*/",
                Error::InvalidPrefixLength,
            ),
            (
                "/.well-known/masque/ip/2001%3Adb8%3A%3A%2F129/*/",
                Error::InvalidPrefixLength,
            ),
            (
                "/.well-known/masque/ip/192.0.2.0%2F/*/",
                Error::InvalidPrefixLength,
            ),
            (
                "/.well-known/masque/ip/example.com%2F24/*/",
                Error::InvalidPrefixLength,
            ),
            (
                "/.well-known/masque/ip/192.0.2.1%2F24/*/",
                Error::HostBitsSet,
            ),
            (
                "/.well-known/masque/ip/2001%3Adb8%3A%3A1%2F64/*/",
                Error::HostBitsSet,
            ),
            (
                "/.well-known/masque/ip/2001:db8::1/*/",
                Error::UnencodedColon,
            ),
            ("/.well-known/masque/ip/*/256/", Error::InvalidIpProtocol),
            ("/.well-known/masque/ip/*/0017/", Error::InvalidIpProtocol),
            ("/.well-known/masque/ip/*/udp/", Error::InvalidIpProtocol),
            ("/.well-known/masque/ip/*/-1/", Error::InvalidIpProtocol),
        ];
        for (path, want) in cases {
            assert_eq!(IpScope::parse_path(path), Err(*want), "{path}");
        }
    }

    #[test]
    fn scope_allows_destinations_inside_the_prefix_and_protocol() {
        let scope = IpScope::parse_path("/.well-known/masque/ip/192.0.2.0%2F24/17/").unwrap();
        assert_eq!(scope.allows(ip("192.0.2.9"), 17), Some(true));
        assert_eq!(scope.allows(ip("192.0.2.9"), 6), Some(false));
        assert_eq!(scope.allows(ip("198.51.100.1"), 17), Some(false));
        assert_eq!(scope.allows(ip("2001:db8::1"), 17), Some(false));
        assert_eq!(IpScope::ANY.allows(ip("2001:db8::1"), 58), Some(true));
        let named = IpScope::parse_path("/.well-known/masque/ip/example.com/*/").unwrap();
        assert_eq!(named.allows(ip("192.0.2.9"), 17), None);
    }

    fn arb_host() -> impl Strategy<Value = Host> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|b| Host::Ip(IpAddr::from(b))),
            any::<[u8; 16]>().prop_map(|b| Host::Ip(IpAddr::from(b))),
            "[a-z0-9_-]{1,20}(\\.[a-z0-9_-]{1,20}){0,3}".prop_filter_map("looks like IPv4", |s| {
                if s.rsplit('.')
                    .next()
                    .is_some_and(|l| l.bytes().all(|c| c.is_ascii_digit()))
                {
                    None
                } else {
                    Some(Host::Name(s))
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn udp_round_trip(host in arb_host(), port in 1u16..) {
            let t = UdpTarget { host, port };
            prop_assert_eq!(UdpTarget::parse_path(&t.to_path().unwrap()), Ok(t));
        }

        #[test]
        fn ip_round_trip(addr in any::<[u8; 16]>(), v4 in any::<bool>(), len in any::<u8>(),
                         proto in proptest::option::of(any::<u8>())) {
            let addr = if v4 { IpAddr::from([addr[0], addr[1], addr[2], addr[3]]) } else { IpAddr::from(addr) };
            let bits = addr_bits(addr);
            let len = (u32::from(len) % (bits + 1)) as u8;
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) };
            let addr = match addr {
                IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & (mask >> 96) as u32)),
                IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask)),
            };
            let scope = IpScope {
                target: IpTarget::Prefix(IpPrefix::new(addr, len).unwrap()),
                ipproto: proto.map_or(IpProtocolScope::Any, IpProtocolScope::Protocol),
            };
            prop_assert_eq!(IpScope::parse_path(&scope.to_path().unwrap()), Ok(scope));
        }

        #[test]
        fn random_paths_never_panic(tail in "[%0-9a-fA-F:/*.?#~ -]{0,40}", bytes in "\\PC{0,30}") {
            for path in [format!("{UDP_PATH_PREFIX}{tail}"), format!("{IP_PATH_PREFIX}{tail}"), bytes] {
                let _ = UdpTarget::parse_path(&path);
                let _ = IpScope::parse_path(&path);
            }
        }
    }
}
