//! IP-in-IP encapsulation between the edge and the access switch (ARCHITECTURE.md §4):
//! an outer IPv6 header (next header 41 for an IPv6 inner packet, 4 for IPv4; RFC 2473) or an
//! outer IPv4 header (protocol 4 or 41; RFC 2003, RFC 4213) in front of the inner packet.
//!
//! Frames are never copied. Encapsulation writes the outer header into the headroom in front
//! of the frame and moves only the 14-byte Ethernet header forward; decapsulation moves the
//! Ethernet header back over the outer header and advances the frame's start. The functions
//! work on a buffer and a `start..end` span within it (a UMEM frame and its descriptor), and
//! return the new span.
//!
//! The outer header is written as one zerocopy struct (`IntoBytes`), checked at compile time to
//! be exactly the header's size, rather than field by field.
//!
//! Outer header fields: traffic class / DSCP+ECN copied from the inner packet (RFC 6040's
//! normal mode, §4.1); on decapsulation the outer ECN field is merged into the inner one
//! ([`decap_ecn`], RFC 6040 §4.2). Flow label 0, hop limit / TTL as given (64 by default). An outer IPv4 header
//! has DF set and identification 0 (an atomic datagram, RFC 6864 §4.1): internal links carry
//! inner MTU + 40 (§4), so the outer packet is never fragmented.

use std::net::{Ipv4Addr, Ipv6Addr};

use zerocopy::byteorder::network_endian::{U16, U32};
use zerocopy::{Immutable, IntoBytes, KnownLayout, Unaligned};

use super::checksum;
use super::ethernet::{self, EtherType, EthernetFrame};
use super::ipv4::{self, Ipv4Packet};
use super::ipv6::{self, Ipv6Packet};
use super::{Error, IpProtocol, Result};

/// The default outer hop limit / TTL (ARCHITECTURE.md §4).
pub const DEFAULT_OUTER_HOP_LIMIT: u8 = 64;

/// The outer header to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outer {
    /// An outer IPv6 header (40 bytes).
    V6 {
        /// The encapsulating switch's internal address.
        src: Ipv6Addr,
        /// The decapsulating switch's internal address.
        dst: Ipv6Addr,
        /// Hop limit.
        hop_limit: u8,
    },
    /// An outer IPv4 header (20 bytes), for IPv4-only internal networks.
    V4 {
        /// The encapsulating switch's internal address.
        src: Ipv4Addr,
        /// The decapsulating switch's internal address.
        dst: Ipv4Addr,
        /// TTL.
        ttl: u8,
    },
}

impl Outer {
    /// Bytes the outer header adds.
    pub const fn header_len(&self) -> usize {
        match self {
            Outer::V6 { .. } => ipv6::HEADER_LEN,
            Outer::V4 { .. } => ipv4::MIN_HEADER_LEN,
        }
    }

    const fn ethertype(&self) -> EtherType {
        match self {
            Outer::V6 { .. } => EtherType::Ipv6,
            Outer::V4 { .. } => EtherType::Ipv4,
        }
    }
}

/// A frame's position within its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// First byte of the frame.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

impl Span {
    /// The frame's length (0 for an inverted span).
    pub const fn len(&self) -> usize {
        self.end.saturating_sub(self.start)
    }

    /// True for an empty span.
    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// The inner packet's protocol number as an outer header names it, from its version nibble.
pub fn inner_protocol(inner: &[u8]) -> Result<IpProtocol> {
    match inner.first().map(|b| b >> 4) {
        Some(4) => Ok(IpProtocol::Ipv4),
        Some(6) => Ok(IpProtocol::Ipv6),
        Some(_) => Err(Error::Malformed),
        None => Err(Error::Truncated),
    }
}

/// Writes `outer` in front of the IP packet at `buf[start..end]`; returns the start of the
/// outer header. The inner packet is not touched.
///
/// Errors: [`Error::NoHeadroom`] if `start` < the outer header's length; [`Error::Truncated`]
/// or [`Error::Malformed`] if the span is empty, out of the buffer, or not IPv4/IPv6;
/// [`Error::TooLong`] if the result exceeds a 16-bit length.
pub fn encap(buf: &mut [u8], start: usize, end: usize, outer: &Outer) -> Result<usize> {
    let inner = buf.get(start..end).ok_or(Error::Truncated)?;
    let protocol = inner_protocol(inner)?;
    let tclass = match protocol {
        IpProtocol::Ipv4 => {
            Ipv4Packet::new_unchecked(inner).dscp() << 2 | Ipv4Packet::new_unchecked(inner).ecn()
        }
        _ => Ipv6Packet::new_unchecked(inner).traffic_class(),
    };
    let inner_len = end - start;
    let outer_start = start
        .checked_sub(outer.header_len())
        .ok_or(Error::NoHeadroom)?;
    let dst = buf.get_mut(outer_start..start).ok_or(Error::NoHeadroom)?;
    match *outer {
        Outer::V6 {
            src,
            dst: to,
            hop_limit,
        } => {
            let header = OuterIpv6Header {
                ver_tc_flow: U32::new((6 << 28) | (u32::from(tclass) << 20)),
                payload_len: U16::new(u16::try_from(inner_len).map_err(|_| Error::TooLong)?),
                next_header: protocol.into(),
                hop_limit,
                src: src.octets(),
                dst: to.octets(),
            };
            header.write_to(dst).map_err(|_| Error::NoHeadroom)?;
        }
        Outer::V4 { src, dst: to, ttl } => {
            let total =
                u16::try_from(inner_len + ipv4::MIN_HEADER_LEN).map_err(|_| Error::TooLong)?;
            let mut header = OuterIpv4Header {
                ver_ihl: 0x45,
                tos: tclass,
                total_len: U16::new(total),
                ident: U16::new(0),
                flags_frag: U16::new(IPV4_DF),
                ttl,
                protocol: protocol.into(),
                checksum: U16::new(0),
                src: src.octets(),
                dst: to.octets(),
            };
            header.checksum = U16::new(checksum::checksum(header.as_bytes()));
            header.write_to(dst).map_err(|_| Error::NoHeadroom)?;
        }
    }
    Ok(outer_start)
}

/// Where the inner packet of an IP-in-IP packet starts, and what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inner {
    /// Offset of the inner packet from the start of the outer header.
    pub offset: usize,
    /// Length of the inner packet (the outer header's length field minus the header; any
    /// link padding after it is excluded).
    pub len: usize,
    /// [`IpProtocol::Ipv4`] or [`IpProtocol::Ipv6`].
    pub protocol: IpProtocol,
}

/// Validates an outer header at the start of `packet` and finds the inner packet.
///
/// Accepts an outer IPv6 header with next header 4 or 41 (no extension headers:
/// [`Error::Unsupported`]) or an outer IPv4 header (checksum verified, not a fragment) with
/// protocol 4 or 41. The inner version must match what the outer header says
/// ([`Error::Malformed`] otherwise).
pub fn decap(packet: &[u8]) -> Result<Inner> {
    let (offset, end, protocol) = match packet.first().map(|b| b >> 4) {
        None => return Err(Error::Truncated),
        Some(6) => {
            let outer = Ipv6Packet::new_checked(packet)?;
            (
                ipv6::HEADER_LEN,
                ipv6::HEADER_LEN + usize::from(outer.payload_len()),
                outer.next_header(),
            )
        }
        Some(4) => {
            let outer = Ipv4Packet::new_checked(packet)?;
            if !outer.verify_checksum() {
                return Err(Error::Checksum);
            }
            if outer.is_fragment() {
                return Err(Error::Unsupported);
            }
            (
                usize::from(outer.header_len()),
                usize::from(outer.total_len()),
                outer.next_header(),
            )
        }
        Some(_) => return Err(Error::Malformed),
    };
    if !matches!(protocol, IpProtocol::Ipv4 | IpProtocol::Ipv6) {
        return Err(Error::Unsupported);
    }
    let inner = packet.get(offset..end).ok_or(Error::Truncated)?;
    if inner_protocol(inner)? != protocol {
        return Err(Error::Malformed);
    }
    Ok(Inner {
        offset,
        len: end - offset,
        protocol,
    })
}

/// Encapsulates the untagged Ethernet frame at `buf[frame]`: moves its Ethernet header
/// `outer.header_len()` bytes towards the front (into the headroom), sets its EtherType to the
/// outer family, and writes the outer header between it and the inner packet. The caller then
/// rewrites the MAC addresses for the next hop. Returns the new span; on error the frame is
/// unchanged.
pub fn encap_frame(buf: &mut [u8], frame: Span, outer: &Outer) -> Result<Span> {
    let bytes = buf.get(frame.start..frame.end).ok_or(Error::Truncated)?;
    let eth = EthernetFrame::new_checked(bytes)?;
    if !matches!(eth.ethertype(), EtherType::Ipv4 | EtherType::Ipv6) {
        return Err(Error::Unsupported);
    }
    let ip_start = frame.start + ethernet::HEADER_LEN;
    let new_start = frame
        .start
        .checked_sub(outer.header_len())
        .ok_or(Error::NoHeadroom)?;
    // The Ethernet header moves into the headroom first: [new_start, new_start + 14) lies
    // before the frame (the outer header is longer than 14 bytes), so if `encap` then fails
    // the frame itself is unchanged. `encap` writes the outer header right after it, over the
    // old Ethernet header's place.
    buf.copy_within(frame.start..ip_start, new_start);
    encap(buf, ip_start, frame.end, outer)?;
    let mut eth =
        EthernetFrame::new_unchecked(buf.get_mut(new_start..frame.end).ok_or(Error::Truncated)?);
    eth.set_ethertype(outer.ethertype());
    Ok(Span {
        start: new_start,
        end: frame.end,
    })
}

/// Decapsulates the untagged Ethernet frame at `buf[frame]` carrying IP-in-IP: validates the
/// outer header ([`decap`]), moves the Ethernet header forward over it, sets its EtherType to
/// the inner family, and trims link padding. Returns the new span; on error the frame is
/// unchanged.
pub fn decap_frame(buf: &mut [u8], frame: Span) -> Result<Span> {
    let bytes = buf.get(frame.start..frame.end).ok_or(Error::Truncated)?;
    let eth = EthernetFrame::new_checked(bytes)?;
    if !matches!(eth.ethertype(), EtherType::Ipv4 | EtherType::Ipv6) {
        return Err(Error::Unsupported);
    }
    let inner = decap(eth.payload())?;
    let ip_start = frame.start + ethernet::HEADER_LEN;
    let outer_ecn = ecn_of(&buf[ip_start..]);
    merge_ecn(&mut buf[ip_start + inner.offset..], outer_ecn)?;
    let new_start = frame.start + inner.offset;
    let new_end = new_start + ethernet::HEADER_LEN + inner.len;
    buf.copy_within(frame.start..frame.start + ethernet::HEADER_LEN, new_start);
    let ethertype = match inner.protocol {
        IpProtocol::Ipv4 => EtherType::Ipv4,
        _ => EtherType::Ipv6,
    };
    let mut eth =
        EthernetFrame::new_unchecked(buf.get_mut(new_start..new_end).ok_or(Error::Truncated)?);
    eth.set_ethertype(ethertype);
    Ok(Span {
        start: new_start,
        end: new_end,
    })
}

/// ECN codepoints (RFC 3168 §5): the low two bits of the IPv4 TOS byte and of the IPv6
/// traffic class.
const NOT_ECT: u8 = 0b00;
const ECT1: u8 = 0b01;
const ECT0: u8 = 0b10;
const CE: u8 = 0b11;

/// The inner packet's ECN field after decapsulation, from the arriving inner and outer ECN
/// fields (RFC 6040 §4.2, Figure 4); [`Error::CeOnNotEct`]: drop the packet.
pub const fn decap_ecn(inner: u8, outer: u8) -> Result<u8> {
    match (inner & CE, outer & CE) {
        (NOT_ECT, CE) => Err(Error::CeOnNotEct),
        (_, CE) => Ok(CE),
        (ECT0, ECT1) => Ok(ECT1),
        (inner, _) => Ok(inner),
    }
}

/// The ECN field of the IP packet at the start of `packet` (0 if it is too short to say).
pub fn ecn_of(packet: &[u8]) -> u8 {
    match (packet.first().map(|b| b >> 4), packet.get(1)) {
        (Some(4), Some(tos)) => tos & CE,
        (Some(6), Some(b1)) => (b1 >> 4) & CE,
        _ => NOT_ECT,
    }
}

/// Merges the outer header's ECN field `outer` into the inner IP packet at the start of
/// `inner` ([`decap_ecn`]); an IPv4 header's checksum is updated incrementally (RFC 1624).
pub fn merge_ecn(inner: &mut [u8], outer: u8) -> Result<()> {
    let ecn = ecn_of(inner);
    let merged = decap_ecn(ecn, outer)?;
    if merged == ecn {
        return Ok(());
    }
    match inner.first().map(|b| b >> 4) {
        Some(4) if inner.len() >= ipv4::MIN_HEADER_LEN => {
            let old = u16::from_be_bytes([inner[0], inner[1]]);
            inner[1] = (inner[1] & !CE) | merged;
            let new = u16::from_be_bytes([inner[0], inner[1]]);
            let sum = u16::from_be_bytes([inner[10], inner[11]]);
            inner[10..12].copy_from_slice(&checksum::update(sum, old, new).to_be_bytes());
        }
        Some(6) if inner.len() >= 2 => inner[1] = (inner[1] & !(CE << 4)) | (merged << 4),
        _ => return Err(Error::Malformed),
    }
    Ok(())
}

const IPV4_DF: u16 = 0x4000;

/// The fixed IPv6 header as written by [`encap`].
#[derive(IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct OuterIpv6Header {
    ver_tc_flow: U32,
    payload_len: U16,
    next_header: u8,
    hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

/// An IPv4 header without options as written by [`encap`].
#[derive(IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct OuterIpv4Header {
    ver_ihl: u8,
    tos: u8,
    total_len: U16,
    ident: U16,
    flags_frag: U16,
    ttl: u8,
    protocol: u8,
    checksum: U16,
    src: [u8; 4],
    dst: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<OuterIpv6Header>() == ipv6::HEADER_LEN);
const _: () = assert!(core::mem::size_of::<OuterIpv4Header>() == ipv4::MIN_HEADER_LEN);

#[cfg(test)]
mod tests {

    #[test]
    fn decapsulation_merges_ecn_as_rfc_6040_figure_4_says() {
        use super::{decap_ecn, CE, ECT0, ECT1, NOT_ECT};
        // Rows: arriving inner; columns: arriving outer Not-ECT, ECT(0), ECT(1), CE.
        let table = [
            (NOT_ECT, [Some(NOT_ECT), Some(NOT_ECT), Some(NOT_ECT), None]),
            (ECT0, [Some(ECT0), Some(ECT0), Some(ECT1), Some(CE)]),
            (ECT1, [Some(ECT1), Some(ECT1), Some(ECT1), Some(CE)]),
            (CE, [Some(CE), Some(CE), Some(CE), Some(CE)]),
        ];
        for (inner, row) in table {
            for (outer, want) in [NOT_ECT, ECT0, ECT1, CE].into_iter().zip(row) {
                assert_eq!(
                    decap_ecn(inner, outer).ok(),
                    want,
                    "{inner:02b} in {outer:02b}"
                );
            }
        }
    }

    use super::*;
    use crate::testutil::POISON;
    use proptest::prelude::*;

    const HEADROOM: usize = 64;

    /// An Ethernet frame carrying the IPv4/UDP DNS query of the ipv4 tests.
    fn ipv4_frame() -> Vec<u8> {
        let mut f = vec![
            0x02, 0, 0, 0, 0, 0x01, // destination
            0x02, 0, 0, 0, 0, 0x02, // source
            0x08, 0x00, // IPv4
        ];
        let builder =
            etherparse::PacketBuilder::ipv4([192, 168, 1, 10], [192, 168, 1, 1], 64).udp(54321, 53);
        let payload = [0xab, 0xcd, 0x01, 0x00];
        let mut ip = Vec::new();
        builder.write(&mut ip, &payload).unwrap();
        f.extend_from_slice(&ip);
        f
    }

    fn edge() -> Outer {
        Outer::V6 {
            src: "fd00::e".parse().unwrap(),
            dst: "fd00::a".parse().unwrap(),
            hop_limit: DEFAULT_OUTER_HOP_LIMIT,
        }
    }

    /// `frame` in a buffer behind `headroom` poison bytes; returns the buffer and the span.
    fn with_headroom(frame: &[u8], headroom: usize) -> (Vec<u8>, Span) {
        let mut buf = vec![POISON; headroom];
        buf.extend_from_slice(frame);
        (
            buf,
            Span {
                start: headroom,
                end: headroom + frame.len(),
            },
        )
    }

    #[test]
    fn ipv6_encap_writes_an_outer_header_that_etherparse_reads() {
        let frame = ipv4_frame();
        let (mut buf, span) = with_headroom(&frame, HEADROOM);
        let out = encap_frame(&mut buf, span, &edge()).unwrap();
        assert_eq!(
            out,
            Span {
                start: HEADROOM - 40,
                end: span.end
            }
        );
        assert!(
            buf[..out.start].iter().all(|&b| b == POISON),
            "nothing written before the frame"
        );
        let encapped = &buf[out.start..out.end];
        assert_eq!(
            &encapped[..12],
            &frame[..12],
            "MACs kept for the caller to rewrite"
        );
        assert_eq!(&encapped[12..14], &[0x86, 0xdd]);
        let outer = &encapped[14..54];
        assert_eq!(outer[0], 0x60);
        assert_eq!(
            u16::from_be_bytes([outer[4], outer[5]]) as usize,
            frame.len() - 14
        );
        assert_eq!(outer[6], 4, "next header: IPv4");
        assert_eq!(outer[7], 64);
        assert_eq!(&encapped[54..], &frame[14..], "inner packet untouched");
        let (ip, rest) = etherparse::Ipv6Header::from_slice(outer).unwrap();
        assert_eq!(ip.next_header, etherparse::IpNumber::IPV4);
        assert_eq!(ip.source, "fd00::e".parse::<Ipv6Addr>().unwrap().octets());
        assert!(rest.is_empty());
        let inner = etherparse::SlicedPacket::from_ip(&encapped[14..]).unwrap();
        assert!(matches!(inner.net, Some(etherparse::NetSlice::Ipv6(_))));
    }

    #[test]
    fn ipv4_outer_header_has_a_valid_checksum_and_df() {
        let frame = ipv4_frame();
        let (mut buf, span) = with_headroom(&frame, HEADROOM);
        let outer = Outer::V4 {
            src: Ipv4Addr::new(10, 255, 0, 1),
            dst: Ipv4Addr::new(10, 255, 0, 2),
            ttl: 64,
        };
        let out = encap_frame(&mut buf, span, &outer).unwrap();
        let p = Ipv4Packet::new_checked(&buf[out.start + 14..out.end]).unwrap();
        assert!(p.verify_checksum());
        assert!(p.dont_frag());
        assert_eq!(p.next_header(), IpProtocol::Ipv4);
        assert_eq!(usize::from(p.total_len()), frame.len() - 14 + 20);
        let (h, _) = etherparse::Ipv4Header::from_slice(&buf[out.start + 14..]).unwrap();
        assert_eq!(h.header_checksum, h.calc_header_checksum());
    }

    #[test]
    fn decap_undoes_encap_for_both_outer_families() {
        let frame = ipv4_frame();
        for outer in [
            edge(),
            Outer::V4 {
                src: Ipv4Addr::new(10, 0, 0, 1),
                dst: Ipv4Addr::new(10, 0, 0, 2),
                ttl: 9,
            },
        ] {
            let (mut buf, span) = with_headroom(&frame, HEADROOM);
            let out = encap_frame(&mut buf, span, &outer).unwrap();
            let back = decap_frame(&mut buf, out).unwrap();
            assert_eq!(back, span);
            assert_eq!(&buf[back.start..back.end], &frame[..]);
        }
    }

    #[test]
    fn no_headroom_is_an_error_and_leaves_the_frame_unchanged() {
        let frame = ipv4_frame();
        let (mut buf, span) = with_headroom(&frame, 39);
        assert_eq!(encap_frame(&mut buf, span, &edge()), Err(Error::NoHeadroom));
        assert_eq!(&buf[39..], &frame[..]);
        assert!(buf[..39].iter().all(|&b| b == POISON));
    }

    #[test]
    fn decap_refuses_what_is_not_ip_in_ip() {
        let frame = ipv4_frame();
        // Plain IPv4/UDP is not IP-in-IP.
        assert_eq!(decap(&frame[14..]), Err(Error::Unsupported));
        let (mut buf, span) = with_headroom(&frame, HEADROOM);
        let out = encap_frame(&mut buf, span, &edge()).unwrap();
        // The outer header says IPv6 inside, the inner packet is IPv4.
        let mut lie = buf[out.start..out.end].to_vec();
        lie[14 + 6] = 41;
        assert_eq!(decap(&lie[14..]), Err(Error::Malformed));
        // A corrupted outer IPv4 checksum.
        let (mut buf, span) = with_headroom(&frame, HEADROOM);
        let outer = Outer::V4 {
            src: Ipv4Addr::new(10, 0, 0, 1),
            dst: Ipv4Addr::new(10, 0, 0, 2),
            ttl: 9,
        };
        let out = encap_frame(&mut buf, span, &outer).unwrap();
        buf[out.start + 14 + 8] ^= 1;
        let before = buf.clone();
        assert_eq!(decap_frame(&mut buf, out), Err(Error::Checksum));
        assert_eq!(buf, before, "unchanged on error");
    }

    #[test]
    fn truncated_encapsulated_frames_are_errors_at_every_length() {
        let frame = ipv4_frame();
        let (mut buf, span) = with_headroom(&frame, HEADROOM);
        let out = encap_frame(&mut buf, span, &edge()).unwrap();
        for len in 0..out.len() {
            let mut b = buf.clone();
            assert!(
                decap_frame(
                    &mut b,
                    Span {
                        start: out.start,
                        end: out.start + len
                    }
                )
                .is_err(),
                "len {len}"
            );
        }
    }

    proptest! {
        #[test]
        fn encap_then_decap_is_the_identity(
            six_inner in any::<bool>(), six_outer in any::<bool>(),
            payload in proptest::collection::vec(any::<u8>(), 0..200usize),
            tclass in any::<u8>(),
        ) {
            let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0, 0];
            let mut ip = Vec::new();
            if six_inner {
                frame[12..14].copy_from_slice(&[0x86, 0xdd]);
                let b = etherparse::PacketBuilder::ipv6([1; 16], [2; 16], 64).udp(1, 2);
                b.write(&mut ip, &payload).unwrap();
                ip[0] = 0x60 | (tclass >> 4);
                ip[1] = (tclass << 4) | (ip[1] & 0x0f);
            } else {
                frame[12..14].copy_from_slice(&[0x08, 0x00]);
                etherparse::PacketBuilder::ipv4([1; 4], [2; 4], 64).udp(1, 2).write(&mut ip, &payload).unwrap();
            }
            frame.extend_from_slice(&ip);
            let outer = if six_outer { edge() } else {
                Outer::V4 { src: Ipv4Addr::new(10, 0, 0, 1), dst: Ipv4Addr::new(10, 0, 0, 2), ttl: 64 }
            };
            let (mut buf, span) = with_headroom(&frame, HEADROOM);
            let out = encap_frame(&mut buf, span, &outer).unwrap();
            prop_assert_eq!(out.len(), frame.len() + outer.header_len());
            if six_inner && six_outer {
                prop_assert_eq!(Ipv6Packet::new_unchecked(&buf[out.start + 14..]).traffic_class(), tclass);
            }
            let back = decap_frame(&mut buf, out).unwrap();
            prop_assert_eq!(&buf[back.start..back.end], &frame[..]);
        }

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..120usize), start in 0usize..130, end in 0usize..130) {
            let _ = decap(&data);
            let mut b = data.clone();
            let _ = decap_frame(&mut b, Span { start, end });
            let mut b = data.clone();
            let _ = encap_frame(&mut b, Span { start, end }, &edge());
            let mut b = data.clone();
            let _ = encap(&mut b, start, end, &edge());
            let _ = inner_protocol(&data);
        }
    }
}
