//! The proxy side of a CONNECT-UDP session (RFC 9298), sans-IO: which datagrams carry a UDP
//! payload, which the proxy drops, and the counters. The caller owns the UDP socket connected to
//! the target.

use crate::datagram::{ContextPayload, CONTEXT_ID_PAYLOAD};

/// Why a datagram was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The HTTP Datagram Payload is too short to hold a Context ID.
    TruncatedContextId,
    /// A Context ID this session never registered (dropped, RFC 9298 §4).
    UnknownContext,
    /// A UDP payload larger than a UDP datagram can carry.
    TooBig,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 3] = [
        DropReason::TruncatedContextId,
        DropReason::UnknownContext,
        DropReason::TooBig,
    ];

    /// A stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::TruncatedContextId => "truncated_context_id",
            DropReason::UnknownContext => "unknown_context",
            DropReason::TooBig => "too_big",
        }
    }
}

/// Largest UDP payload (65535 − 8 bytes of UDP header − 20 of IPv4 header).
pub const MAX_UDP_PAYLOAD: usize = 65_507;

/// Per-session counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Payloads sent to the target.
    pub to_target: u64,
    /// Payloads received from the target and sent to the client.
    pub to_client: u64,
    /// Drops by reason, in [`DropReason::ALL`] order.
    pub drops: [u64; 3],
}

/// One CONNECT-UDP session.
#[derive(Debug, Default, Clone)]
pub struct ConnectUdpSession {
    counters: Counters,
}

impl ConnectUdpSession {
    /// A new session.
    pub fn new() -> Self {
        Self::default()
    }

    /// The UDP payload to send to the target for this HTTP Datagram Payload, or why not.
    pub fn on_datagram<'a>(&mut self, http_payload: &'a [u8]) -> Result<&'a [u8], DropReason> {
        let r = match ContextPayload::parse(http_payload) {
            Err(_) => Err(DropReason::TruncatedContextId),
            //= https://www.rfc-editor.org/rfc/rfc9298#section-4
            //# If an HTTP Datagram with an unknown
            //# Context ID is received, it MUST be dropped or buffered
            Ok(c) if c.context_id != CONTEXT_ID_PAYLOAD => Err(DropReason::UnknownContext),
            Ok(c) if c.payload.len() > MAX_UDP_PAYLOAD => Err(DropReason::TooBig),
            Ok(c) => Ok(c.payload),
        };
        match r {
            Ok(_) => self.counters.to_target += 1,
            Err(d) => self.counters.drops[d as usize] += 1,
        }
        r
    }

    /// Counts a payload from the target framed for the client.
    pub fn on_target_payload(&mut self) {
        self.counters.to_client += 1;
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_and_drops() {
        let mut s = ConnectUdpSession::new();
        assert_eq!(s.on_datagram(&[0x00, 1, 2, 3]), Ok(&[1u8, 2, 3][..]));
        // Context ID 2 (registered by no one): dropped.
        assert_eq!(s.on_datagram(&[0x02, 1]), Err(DropReason::UnknownContext));
        // Empty: no Context ID.
        assert_eq!(s.on_datagram(&[]), Err(DropReason::TruncatedContextId));
        // A two-byte varint cut short.
        assert_eq!(s.on_datagram(&[0x40]), Err(DropReason::TruncatedContextId));
        let big = vec![0u8; MAX_UDP_PAYLOAD + 2];
        assert_eq!(s.on_datagram(&big), Err(DropReason::TooBig));
        // An empty UDP payload is legal.
        assert_eq!(s.on_datagram(&[0x00]), Ok(&[][..]));
        let c = s.counters();
        assert_eq!(c.to_target, 2);
        assert_eq!(c.drops, [2, 1, 1]);
    }
}
