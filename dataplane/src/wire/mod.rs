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
pub(crate) mod testutil {
    //! Shared helpers of the wire tests.

    /// The byte every emit test pre-fills its buffer with, so a byte the emitter forgot shows.
    pub const POISON: u8 = 0xA5;

    /// A buffer of `len` poison bytes.
    pub fn poisoned(len: usize) -> Vec<u8> {
        vec![POISON; len]
    }
}
