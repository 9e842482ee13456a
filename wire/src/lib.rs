//! Zero-copy packet views and emitters, one protocol per file (smoltcp's `wire`).
//!
//! Every protocol has the same three parts:
//!
//! - a **view** (`EthernetFrame<T>`, `Ipv4Packet<T>`, …) over any `T: AsRef<[u8]>`, with the
//!   field offsets as named constants. `new_checked` (= `new_unchecked` + `check_len`) is the
//!   only entry that accepts bytes from the network; after it, no accessor can panic, whatever
//!   the bytes are. Setters exist for `T: AsMut<[u8]>` and rewrite in place (MAC rewrite, TTL
//!   decrement, checksum update) without copying the packet.
//! - a **`Repr`**, the structured form, with `parse` (checks semantics: versions, lengths,
//!   checksums), `emit` (writes every byte of the header it owns) and `buffer_len`.
//! - **registry enums** (`EtherType`, `IpProtocol`, ICMP types, ARP operations, ND options) with
//!   an `Unknown(..)` variant, so unknown values round-trip unchanged.
//!
//! Errors are one small `Copy` enum, [`Error`]: no allocation, no formatting, no panic on any
//! input. A failed parse becomes a verdict and a drop counter in the pipeline.
//!
//! # What comes from crates and what is hand-written, and why
//!
//! - [`zerocopy`] gives [`ethernet::EthernetAddress`] its byte-layout guarantees
//!   (`FromBytes`/`IntoBytes`/`Unaligned`), so a MAC is read from and written to a frame as a
//!   plain 6-byte copy, and it checks the fixed 40-byte layout of the outer IPv6 header that
//!   [`ipip`] writes into headroom (one struct store instead of field-by-field writes).
//! - The **views are hand-written**, not zerocopy structs, for three reasons: (1) IPv4 has a
//!   variable header (IHL), ICMPv6 has options and ARP has variable address lengths, so the
//!   bounds are only known at run time — `check_len` checks them once and the accessors then
//!   index within them; (2) the smoltcp shape (named offsets, `new_checked`, setters on
//!   `AsMut`) is the project's style, and one shape for every protocol keeps reviews cheap;
//!   (3) the hot path reads three fields and rewrites four, which a view does with no copy at
//!   all, where a `Ref<_, Header>` would add nothing.
//! - **etherparse is the independent reference in the tests**: the property tests re-read
//!   what our emitters write with etherparse's header parsers (Ethernet II, ARP, IPv4, IPv6,
//!   UDP, ICMPv4/ICMPv6 checksums) and compare fields and checksums, and the IP-in-IP tests
//!   build their inner packets with its `PacketBuilder`. It is not used on the hot path: its slicing validates and records every layer
//!   (VLANs, extension headers, lengths) where the switch needs two, and it has no in-place
//!   rewrite; the pipeline benchmark measures it as the naive baseline
//!   (`dataplane/benches/pipeline.rs`, figures in `docs/PERFORMANCE.md`).
//! - The **internet checksum and RFC 1624 incremental update are hand-written**
//!   ([`checksum`]): etherparse computes full checksums over its own header structs only, and
//!   the fast path needs the one-field incremental update (TTL decrement) on bytes in place.
//! - **IPv6 neighbour discovery** ([`icmpv6`]) is hand-written: etherparse parses ICMPv6 type
//!   and code but not the ND bodies and options (source/target link-layer address, prefix
//!   information, MTU) that the access switch answers.
//!
//! Threading: plain data; nothing here shares state. Panics: none on input — every parser is
//! property-tested over random bytes and over every truncation of real captures.

#![forbid(unsafe_code)]

pub mod arp;
pub mod checksum;
pub mod ethernet;
pub mod icmpv4;
pub mod icmpv6;
pub mod ipip;
pub mod ipv4;
pub mod ipv6;
pub mod udp;

pub use arp::{ArpOperation, ArpPacket, ArpRepr};
pub use ethernet::{EtherType, EthernetAddress, EthernetFrame, EthernetRepr, L2Header};
pub use icmpv4::{Icmpv4Message, Icmpv4Packet, Icmpv4Repr};
pub use icmpv6::{Icmpv6Message, Icmpv6Packet, Icmpv6Repr, NdiscRepr};
pub use ipv4::{Ipv4Packet, Ipv4Repr};
pub use ipv6::{Ipv6Packet, Ipv6Repr};
pub use udp::{UdpPacket, UdpRepr};

/// Why bytes could not be viewed, parsed or written as a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Error {
    /// The buffer is shorter than the header, or than a length field says.
    Truncated,
    /// A field has a value the protocol forbids (version, header length, option length, …).
    Malformed,
    /// The checksum does not match the contents.
    Checksum,
    /// Well-formed, but not something this module handles (e.g. ARP for a non-Ethernet
    /// hardware type, two VLAN tags in a `Repr`, IPv6 extension headers before an inner packet).
    Unsupported,
    /// There is not enough room in front of the packet to write an outer header.
    NoHeadroom,
    /// The result would not fit in a 16-bit length field.
    TooLong,
    /// A TTL or hop limit would reach zero: the packet must not be forwarded.
    HopLimitExceeded,
    /// A tunnel's outer header says Congestion Experienced but the inner packet is not
    /// ECN-capable: RFC 6040 §4.2 has the decapsulator drop it.
    CeOnNotEct,
}

impl Error {
    /// A short, stable name for counters and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Error::Truncated => "truncated",
            Error::Malformed => "malformed",
            Error::Checksum => "checksum",
            Error::Unsupported => "unsupported",
            Error::NoHeadroom => "no_headroom",
            Error::TooLong => "too_long",
            Error::HopLimitExceeded => "hop_limit_exceeded",
            Error::CeOnNotEct => "ce_on_not_ect",
        }
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::error::Error for Error {}

/// The result of every fallible operation here.
pub type Result<T> = core::result::Result<T, Error>;

/// An IP protocol number (IPv4 `protocol`, IPv6 `next header`), IANA "Assigned Internet
/// Protocol Numbers".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpProtocol {
    /// 0: IPv6 hop-by-hop options.
    HopByHop,
    /// 1: ICMP for IPv4.
    Icmp,
    /// 4: IPv4 encapsulated (IP-in-IP).
    Ipv4,
    /// 6: TCP.
    Tcp,
    /// 17: UDP.
    Udp,
    /// 41: IPv6 encapsulated.
    Ipv6,
    /// 44: IPv6 fragment header.
    Ipv6Fragment,
    /// 58: ICMP for IPv6.
    Icmpv6,
    /// 59: no next header.
    Ipv6NoNext,
    /// Any other value, kept as is.
    Unknown(u8),
}

impl From<u8> for IpProtocol {
    fn from(value: u8) -> Self {
        match value {
            0 => IpProtocol::HopByHop,
            1 => IpProtocol::Icmp,
            4 => IpProtocol::Ipv4,
            6 => IpProtocol::Tcp,
            17 => IpProtocol::Udp,
            41 => IpProtocol::Ipv6,
            44 => IpProtocol::Ipv6Fragment,
            58 => IpProtocol::Icmpv6,
            59 => IpProtocol::Ipv6NoNext,
            other => IpProtocol::Unknown(other),
        }
    }
}

impl From<IpProtocol> for u8 {
    fn from(value: IpProtocol) -> Self {
        match value {
            IpProtocol::HopByHop => 0,
            IpProtocol::Icmp => 1,
            IpProtocol::Ipv4 => 4,
            IpProtocol::Tcp => 6,
            IpProtocol::Udp => 17,
            IpProtocol::Ipv6 => 41,
            IpProtocol::Ipv6Fragment => 44,
            IpProtocol::Icmpv6 => 58,
            IpProtocol::Ipv6NoNext => 59,
            IpProtocol::Unknown(other) => other,
        }
    }
}

/// Big-endian field access on slices whose length the caller has checked. Each helper is
/// total: on a short slice it returns 0 / writes nothing instead of panicking, so a bug in a
/// `check_len` shows up as a wrong value in a test, never as a panic on the packet path.
pub(crate) mod field {
    use core::ops::Range;

    /// A field's byte range within its header.
    pub type Field = Range<usize>;

    #[inline(always)]
    pub fn u16_at(data: &[u8], at: usize) -> u16 {
        match data.get(at..at + 2) {
            Some(&[a, b]) => u16::from_be_bytes([a, b]),
            _ => 0,
        }
    }

    #[inline(always)]
    pub fn u32_at(data: &[u8], at: usize) -> u32 {
        match data.get(at..at + 4) {
            Some(&[a, b, c, d]) => u32::from_be_bytes([a, b, c, d]),
            _ => 0,
        }
    }

    #[inline(always)]
    pub fn u8_at(data: &[u8], at: usize) -> u8 {
        data.get(at).copied().unwrap_or(0)
    }

    #[inline(always)]
    pub fn set_u16_at(data: &mut [u8], at: usize, value: u16) {
        if let Some(dst) = data.get_mut(at..at + 2) {
            dst.copy_from_slice(&value.to_be_bytes());
        }
    }

    #[inline(always)]
    pub fn set_u32_at(data: &mut [u8], at: usize, value: u32) {
        if let Some(dst) = data.get_mut(at..at + 4) {
            dst.copy_from_slice(&value.to_be_bytes());
        }
    }

    #[inline(always)]
    pub fn set_u8_at(data: &mut [u8], at: usize, value: u8) {
        if let Some(dst) = data.get_mut(at) {
            *dst = value;
        }
    }

    /// `N` bytes at `at`, zeros if the slice is short.
    #[inline(always)]
    pub fn array_at<const N: usize>(data: &[u8], at: usize) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some(src) = data.get(at..at + N) {
            out.copy_from_slice(src);
        }
        out
    }

    #[inline(always)]
    pub fn set_bytes_at(data: &mut [u8], at: usize, value: &[u8]) {
        if let Some(dst) = data.get_mut(at..at + value.len()) {
            dst.copy_from_slice(value);
        }
    }

    /// `data[range]`, empty if out of bounds.
    #[inline(always)]
    pub fn slice(data: &[u8], range: Field) -> &[u8] {
        data.get(range).unwrap_or(&[])
    }

    /// `data[range]`, empty if out of bounds.
    #[inline(always)]
    pub fn slice_mut(data: &mut [u8], range: Field) -> &mut [u8] {
        data.get_mut(range).unwrap_or(&mut [])
    }
}

#[cfg(test)]
mod tests {
    //! Whole frames built by etherparse (an independent implementation), parsed layer by
    //! layer here: every field agrees, and every checksum etherparse wrote verifies here.

    use super::checksum::PseudoHeader;
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[derive(Debug, Clone)]
    struct Case {
        vlan: Option<u16>,
        six: bool,
        udp: bool,
        v4: ([u8; 4], [u8; 4]),
        v6: ([u8; 16], [u8; 16]),
        ports: (u16, u16),
        echo: (u16, u16),
        hop_limit: u8,
        payload: Vec<u8>,
    }

    fn arb_case() -> impl Strategy<Value = Case> {
        (
            proptest::option::of(0u16..4095),
            any::<(bool, bool)>(),
            any::<([u8; 4], [u8; 4])>(),
            any::<([u8; 16], [u8; 16])>(),
            any::<((u16, u16), (u16, u16))>(),
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..120usize),
        )
            .prop_map(
                |(vlan, (six, udp), v4, v6, (ports, echo), hop_limit, payload)| Case {
                    vlan,
                    six,
                    udp,
                    v4,
                    v6,
                    ports,
                    echo,
                    hop_limit,
                    payload,
                },
            )
    }

    fn build(c: &Case) -> Vec<u8> {
        use etherparse::PacketBuilder;
        let mut out = Vec::new();
        let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        macro_rules! finish {
            ($ip:expr) => {
                if c.udp {
                    $ip.udp(c.ports.0, c.ports.1).write(&mut out, &c.payload)
                } else if c.six {
                    $ip.icmpv6_echo_request(c.echo.0, c.echo.1)
                        .write(&mut out, &c.payload)
                } else {
                    $ip.icmpv4_echo_request(c.echo.0, c.echo.1)
                        .write(&mut out, &c.payload)
                }
            };
        }
        let written = match (c.vlan, c.six) {
            (None, false) => finish!(eth.ipv4(c.v4.0, c.v4.1, c.hop_limit)),
            (None, true) => finish!(eth.ipv6(c.v6.0, c.v6.1, c.hop_limit)),
            (Some(id), false) => {
                let vlan = eth.single_vlan(etherparse::VlanId::try_new(id).unwrap());
                finish!(vlan.ipv4(c.v4.0, c.v4.1, c.hop_limit))
            }
            (Some(id), true) => {
                let vlan = eth.single_vlan(etherparse::VlanId::try_new(id).unwrap());
                finish!(vlan.ipv6(c.v6.0, c.v6.1, c.hop_limit))
            }
        };
        written.unwrap();
        out
    }

    proptest! {
        #[test]
        fn frames_built_by_etherparse_parse_field_for_field(c in arb_case()) {
            let frame = build(&c);
            let eth = EthernetFrame::new_checked(&frame[..]).unwrap();
            let l2 = eth.l2_header().unwrap();
            prop_assert_eq!(l2.vlan_id(), c.vlan);
            prop_assert_eq!(eth.src_addr(), EthernetAddress([2, 0, 0, 0, 0, 1]));
            prop_assert_eq!(eth.dst_addr(), EthernetAddress([2, 0, 0, 0, 0, 2]));
            let ip = &frame[l2.payload_offset..];
            let (pseudo, protocol, l4) = if c.six {
                prop_assert_eq!(l2.ethertype, EtherType::Ipv6);
                let p = Ipv6Packet::new_checked(ip).unwrap();
                let r = Ipv6Repr::parse(&p).unwrap();
                prop_assert_eq!(r.src_addr, Ipv6Addr::from(c.v6.0));
                prop_assert_eq!(r.dst_addr, Ipv6Addr::from(c.v6.1));
                prop_assert_eq!(r.hop_limit, c.hop_limit);
                let pseudo = PseudoHeader::V6 { src: r.src_addr, dst: r.dst_addr };
                (pseudo, r.next_header, &ip[40..40 + usize::from(r.payload_len)])
            } else {
                prop_assert_eq!(l2.ethertype, EtherType::Ipv4);
                let p = Ipv4Packet::new_checked(ip).unwrap();
                let r = Ipv4Repr::parse(&p).unwrap();
                prop_assert_eq!(r.src_addr, Ipv4Addr::from(c.v4.0));
                prop_assert_eq!(r.dst_addr, Ipv4Addr::from(c.v4.1));
                prop_assert_eq!(r.ttl, c.hop_limit);
                let pseudo = PseudoHeader::V4 { src: r.src_addr, dst: r.dst_addr };
                let header_len = usize::from(p.header_len());
                (pseudo, r.next_header, &ip[header_len..header_len + usize::from(r.payload_len)])
            };
            if c.udp {
                prop_assert_eq!(protocol, IpProtocol::Udp);
                let p = UdpPacket::new_checked(l4).unwrap();
                let r = UdpRepr::parse(&p, &pseudo).unwrap();
                prop_assert_eq!((r.src_port, r.dst_port), c.ports);
                prop_assert_eq!(p.payload(), &c.payload[..]);
            } else if c.six {
                prop_assert_eq!(protocol, IpProtocol::Icmpv6);
                let p = Icmpv6Packet::new_checked(l4).unwrap();
                prop_assert_eq!(
                    Icmpv6Repr::parse(&p, &pseudo).unwrap(),
                    Icmpv6Repr::EchoRequest { ident: c.echo.0, seq_no: c.echo.1, data: &c.payload }
                );
            } else {
                prop_assert_eq!(protocol, IpProtocol::Icmp);
                let p = Icmpv4Packet::new_checked(l4).unwrap();
                prop_assert_eq!(
                    Icmpv4Repr::parse(&p).unwrap(),
                    Icmpv4Repr::EchoRequest { ident: c.echo.0, seq_no: c.echo.1, data: &c.payload }
                );
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Shared helpers of the wire tests.

    /// The byte every emit test pre-fills its buffer with, so a byte the emitter forgot shows.
    pub const POISON: u8 = 0xA5;

    /// A buffer of `len` poison bytes.
    pub fn poisoned(len: usize) -> Vec<u8> {
        vec![POISON; len]
    }
}
