//! The extended CONNECT request of both protocols: what a client sends, and how the proxy checks
//! what it receives (RFC 9298 §3, RFC 9484 §4, RFC 9220 §3), with the HTTP status for each
//! failure.

use quiche::h3::{Header, NameValue};

use crate::template::{IpScope, UdpTarget, UriTemplate};

/// The `:protocol` of CONNECT-UDP.
pub const PROTOCOL_UDP: &str = "connect-udp";
/// The `:protocol` of CONNECT-IP.
pub const PROTOCOL_IP: &str = "connect-ip";
/// The header carrying the proxy credential: `proxy-authorization: Bearer <token>`.
pub const AUTH_HEADER: &str = "proxy-authorization";

/// A valid request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// CONNECT-IP with this scope.
    Ip(IpScope),
    /// CONNECT-UDP to this target.
    Udp(UdpTarget),
}

/// Why a request is refused: the HTTP status to answer and a reason for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// The HTTP status code.
    pub status: u16,
    /// What was wrong.
    pub reason: &'static str,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.status, self.reason)
    }
}

const fn reject(status: u16, reason: &'static str) -> Rejection {
    Rejection { status, reason }
}

/// The request headers a client sends, the `:path` expanded from `template` (the protocol's
/// default when `None`).
pub fn request_headers(
    target: &Target,
    authority: &str,
    token: Option<&str>,
    template: Option<&UriTemplate>,
) -> Vec<Header> {
    let (protocol, path) = match (target, template) {
        (Target::Ip(scope), Some(t)) => (PROTOCOL_IP, scope.expand(t)),
        (Target::Ip(scope), None) => (PROTOCOL_IP, scope.to_path()),
        (Target::Udp(u), Some(t)) => (PROTOCOL_UDP, u.expand(t)),
        (Target::Udp(u), None) => (PROTOCOL_UDP, u.to_path()),
    };
    let path = path.unwrap_or_default();
    let mut h = vec![
        Header::new(b":method", b"CONNECT"),
        Header::new(b":protocol", protocol.as_bytes()),
        Header::new(b":scheme", b"https"),
        Header::new(b":authority", authority.as_bytes()),
        Header::new(b":path", path.as_bytes()),
        Header::new(b"capsule-protocol", b"?1"),
    ];
    if let Some(t) = token {
        h.push(Header::new(
            AUTH_HEADER.as_bytes(),
            format!("Bearer {t}").as_bytes(),
        ));
    }
    h
}

/// The URI templates a proxy serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Templates {
    /// CONNECT-UDP.
    pub udp: UriTemplate,
    /// CONNECT-IP.
    pub ip: UriTemplate,
}

impl Default for Templates {
    fn default() -> Self {
        Templates {
            udp: UriTemplate::udp_default(),
            ip: UriTemplate::ip_default(),
        }
    }
}

/// Checks a request against the served `templates`. `tokens` lists the accepted bearer tokens;
/// empty means no authentication.
pub fn validate(
    headers: &[Header],
    tokens: &[String],
    templates: &Templates,
) -> Result<Target, Rejection> {
    let get = |name: &str| {
        headers
            .iter()
            .find(|h| h.name() == name.as_bytes())
            .map(|h| h.value())
    };
    //= https://www.rfc-editor.org/rfc/rfc9298#section-3.4
    //# The :method pseudo-header field SHALL be "CONNECT".
    if get(":method") != Some(b"CONNECT") {
        return Err(reject(405, "method is not CONNECT"));
    }
    //= https://www.rfc-editor.org/rfc/rfc9110#section-15.6.2
    //# The 501 (Not Implemented) status code indicates that the server does
    //# not support the functionality required to fulfill the request.
    let Some(protocol) = get(":protocol") else {
        return Err(reject(
            501,
            "CONNECT without :protocol (classic CONNECT is not served)",
        ));
    };
    //= https://www.rfc-editor.org/rfc/rfc9298#section-3.4
    //# The :scheme and :path pseudo-header fields SHALL NOT be empty.
    if get(":scheme") != Some(b"https") {
        return Err(reject(400, ":scheme is not https"));
    }
    if get(":authority").is_none_or(|a| a.is_empty()) {
        return Err(reject(400, "missing :authority"));
    }
    let Some(path) = get(":path").and_then(|p| std::str::from_utf8(p).ok()) else {
        return Err(reject(400, "missing or non-UTF-8 :path"));
    };
    //= https://www.rfc-editor.org/rfc/rfc9298#section-3.4
    //# The request SHALL include a Capsule-Protocol header field with a value of ?1
    if get("capsule-protocol") != Some(b"?1") {
        return Err(reject(400, "capsule-protocol is not ?1"));
    }
    if !tokens.is_empty() {
        let Some(cred) = get(AUTH_HEADER) else {
            return Err(reject(407, "missing proxy-authorization"));
        };
        let ok = cred
            .strip_prefix(b"Bearer ")
            .is_some_and(|t| tokens.iter().any(|k| constant_time_eq(k.as_bytes(), t)));
        if !ok {
            return Err(reject(403, "wrong proxy-authorization token"));
        }
    }
    match protocol {
        b"connect-ip" => IpScope::match_path(&templates.ip, path)
            .map(Target::Ip)
            .map_err(|_| reject(404, "path does not match the CONNECT-IP template")),
        b"connect-udp" => UdpTarget::match_path(&templates.udp, path)
            .map(Target::Udp)
            .map_err(|_| reject(404, "path does not match the CONNECT-UDP template")),
        _ => Err(reject(501, "unsupported :protocol")),
    }
}

/// The bearer token a request carries (`proxy-authorization: Bearer <token>`), if any.
pub fn bearer_token(headers: &[Header]) -> Option<&[u8]> {
    headers
        .iter()
        .find(|h| h.name() == AUTH_HEADER.as_bytes())
        .and_then(|h| h.value().strip_prefix(b"Bearer "))
}

/// Compares without an early exit, so the time taken does not tell how much of a token matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The `:status` of a response, if it is a valid three-digit code.
pub fn response_status(headers: &[Header]) -> Option<u16> {
    headers
        .iter()
        .find(|h| h.name() == b":status")
        .and_then(|h| std::str::from_utf8(h.value()).ok())
        .and_then(|s| s.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::{Host, IP_VARIABLES, UDP_VARIABLES};

    fn toks() -> Vec<String> {
        vec!["s3cret".into()]
    }

    #[test]
    fn client_headers_validate() {
        let t = Target::Udp(UdpTarget {
            host: Host::Ip("198.18.0.9".parse().unwrap()),
            port: 4433,
        });
        let served = Templates::default();
        let h = request_headers(&t, "proxy", Some("s3cret"), None);
        assert_eq!(validate(&h, &toks(), &served), Ok(t.clone()));
        let ip = Target::Ip(IpScope::ANY);
        let h = request_headers(&ip, "proxy", None, None);
        assert_eq!(validate(&h, &[], &served), Ok(ip.clone()));
        // A proxy with other templates, and a client configured with them.
        let other = Templates {
            udp: UriTemplate::parse("/u{?target_host,target_port}", UDP_VARIABLES).unwrap(),
            ip: UriTemplate::parse("/vpn/{target}/{ipproto}", IP_VARIABLES).unwrap(),
        };
        let h = request_headers(&t, "proxy", None, Some(&other.udp));
        assert_eq!(validate(&h, &[], &other), Ok(t.clone()));
        assert_eq!(validate(&h, &[], &served).map_err(|r| r.status), Err(404));
        let h = request_headers(&ip, "proxy", None, Some(&other.ip));
        assert_eq!(validate(&h, &[], &other), Ok(ip));
        let h = request_headers(&t, "proxy", None, None);
        assert_eq!(validate(&h, &[], &other).map_err(|r| r.status), Err(404));
    }

    fn with(h: &[Header], name: &str, value: Option<&str>) -> Vec<Header> {
        let mut v: Vec<Header> = h
            .iter()
            .filter(|x| x.name() != name.as_bytes())
            .cloned()
            .collect();
        if let Some(val) = value {
            v.push(Header::new(name.as_bytes(), val.as_bytes()));
        }
        v
    }

    #[test]
    fn each_defect_gets_its_status() {
        let good = request_headers(&Target::Ip(IpScope::ANY), "proxy", Some("s3cret"), None);
        let cases: [(&str, Option<&str>, u16); 10] = [
            (":method", Some("GET"), 405),
            // A plain CONNECT (RFC 9110 §9.3.6): the proxy does not implement it.
            (":protocol", None, 501),
            (":protocol", Some("websocket"), 501),
            (":scheme", Some("http"), 400),
            (":authority", None, 400),
            (":path", None, 400),
            (":path", Some("/elsewhere"), 404),
            ("capsule-protocol", None, 400),
            (AUTH_HEADER, None, 407),
            (AUTH_HEADER, Some("Bearer wrong"), 403),
        ];
        for (name, value, status) in cases {
            let h = with(&good, name, value);
            assert_eq!(
                validate(&h, &toks(), &Templates::default()).map_err(|r| r.status),
                Err(status),
                "{name}={value:?}"
            );
        }
        // A token sent without the scheme is wrong, not missing.
        let h = with(&good, AUTH_HEADER, Some("s3cret"));
        assert_eq!(
            validate(&h, &toks(), &Templates::default()).map_err(|r| r.status),
            Err(403)
        );
    }
}
