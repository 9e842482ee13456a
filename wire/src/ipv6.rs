//! IPv6 (RFC 8200) fixed headers.
//!
//! Extension headers are not walked: `next_header()` is the fixed header's field, and the
//! payload starts after the 40 bytes. The switch forwards packets with extension headers
//! unchanged; the slow path looks further where it must.

use std::net::Ipv6Addr;

use super::checksum;
use super::field::{
    array_at, set_bytes_at, set_u16_at, set_u32_at, set_u8_at, slice, slice_mut, u16_at, u32_at,
    u8_at,
};
use super::{Error, IpProtocol, Result};

mod offsets {
    /// Version (4 bits), traffic class (8), flow label (20).
    pub const VER_TC_FLOW: usize = 0;
    pub const PAYLOAD_LEN: usize = 4;
    pub const NEXT_HEADER: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC_ADDR: usize = 8;
    pub const DST_ADDR: usize = 24;
}

/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 40;

/// A zero-copy view of an IPv6 packet.
#[derive(Debug, Clone)]
pub struct Ipv6Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv6Packet<T> {
    /// A view without any check; accessors return zeros on a short buffer (never panic).
    pub const fn new_unchecked(buffer: T) -> Self {
        Ipv6Packet { buffer }
    }

    /// A view of a buffer that holds the fixed header and `payload_len` bytes after it.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// [`Error::Truncated`] if the buffer is shorter than 40 bytes plus the payload length.
    /// (A jumbogram's payload length of 0, RFC 2675, is treated as an empty payload.)
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN || len < HEADER_LEN + usize::from(self.payload_len()) {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The version field (6 for IPv6).
    #[inline]
    pub fn version(&self) -> u8 {
        u8_at(self.buffer.as_ref(), offsets::VER_TC_FLOW) >> 4
    }

    /// Traffic class.
    pub fn traffic_class(&self) -> u8 {
        (u16_at(self.buffer.as_ref(), offsets::VER_TC_FLOW) >> 4) as u8
    }

    /// Flow label (20 bits).
    pub fn flow_label(&self) -> u32 {
        u32_at(self.buffer.as_ref(), offsets::VER_TC_FLOW) & 0x000f_ffff
    }

    /// Payload length (bytes after the fixed header).
    #[inline]
    pub fn payload_len(&self) -> u16 {
        u16_at(self.buffer.as_ref(), offsets::PAYLOAD_LEN)
    }

    /// Next header.
    #[inline]
    pub fn next_header(&self) -> IpProtocol {
        IpProtocol::from(u8_at(self.buffer.as_ref(), offsets::NEXT_HEADER))
    }

    /// Hop limit.
    #[inline]
    pub fn hop_limit(&self) -> u8 {
        u8_at(self.buffer.as_ref(), offsets::HOP_LIMIT)
    }

    /// Source address.
    #[inline]
    pub fn src_addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(array_at::<16>(self.buffer.as_ref(), offsets::SRC_ADDR))
    }

    /// Destination address.
    #[inline]
    pub fn dst_addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(array_at::<16>(self.buffer.as_ref(), offsets::DST_ADDR))
    }

    /// The payload: `payload_len` bytes after the fixed header (padding excluded).
    #[inline]
    pub fn payload(&self) -> &[u8] {
        slice(
            self.buffer.as_ref(),
            HEADER_LEN..HEADER_LEN + usize::from(self.payload_len()),
        )
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv6Packet<T> {
    /// Sets version 6, traffic class and flow label.
    pub fn set_version_tc_flow(&mut self, traffic_class: u8, flow_label: u32) {
        let word = (6 << 28) | (u32::from(traffic_class) << 20) | (flow_label & 0x000f_ffff);
        set_u32_at(self.buffer.as_mut(), offsets::VER_TC_FLOW, word);
    }

    /// Sets the payload length.
    pub fn set_payload_len(&mut self, len: u16) {
        set_u16_at(self.buffer.as_mut(), offsets::PAYLOAD_LEN, len);
    }

    /// Sets the next header.
    pub fn set_next_header(&mut self, next: IpProtocol) {
        set_u8_at(self.buffer.as_mut(), offsets::NEXT_HEADER, next.into());
    }

    /// Sets the hop limit.
    pub fn set_hop_limit(&mut self, hop_limit: u8) {
        set_u8_at(self.buffer.as_mut(), offsets::HOP_LIMIT, hop_limit);
    }

    /// Sets the source address.
    pub fn set_src_addr(&mut self, addr: Ipv6Addr) {
        set_bytes_at(self.buffer.as_mut(), offsets::SRC_ADDR, &addr.octets());
    }

    /// Sets the destination address.
    pub fn set_dst_addr(&mut self, addr: Ipv6Addr) {
        set_bytes_at(self.buffer.as_mut(), offsets::DST_ADDR, &addr.octets());
    }

    /// Decrements the hop limit; [`Error::HopLimitExceeded`] (unchanged) if it is 0 or 1.
    #[inline]
    pub fn decrement_hop_limit(&mut self) -> Result<u8> {
        checksum::decrement_ipv6_hop_limit(self.buffer.as_mut())
    }

    /// The payload, mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = HEADER_LEN + usize::from(self.payload_len());
        slice_mut(self.buffer.as_mut(), HEADER_LEN..end)
    }
}

/// The structured form of an IPv6 fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Repr {
    /// Source address.
    pub src_addr: Ipv6Addr,
    /// Destination address.
    pub dst_addr: Ipv6Addr,
    /// Next header.
    pub next_header: IpProtocol,
    /// Payload length.
    pub payload_len: u16,
    /// Hop limit.
    pub hop_limit: u8,
    /// Traffic class.
    pub traffic_class: u8,
    /// Flow label (20 bits).
    pub flow_label: u32,
}

impl Ipv6Repr {
    /// Parses a checked packet: version 6.
    pub fn parse<T: AsRef<[u8]>>(packet: &Ipv6Packet<T>) -> Result<Ipv6Repr> {
        packet.check_len()?;
        if packet.version() != 6 {
            return Err(Error::Malformed);
        }
        Ok(Ipv6Repr {
            src_addr: packet.src_addr(),
            dst_addr: packet.dst_addr(),
            next_header: packet.next_header(),
            payload_len: packet.payload_len(),
            hop_limit: packet.hop_limit(),
            traffic_class: packet.traffic_class(),
            flow_label: packet.flow_label(),
        })
    }

    /// Bytes of the header this writes.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes the 40-byte header at the start of `packet`.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Ipv6Packet<T>) -> Result<()> {
        if packet.buffer.as_ref().len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        packet.set_version_tc_flow(self.traffic_class, self.flow_label);
        packet.set_payload_len(self.payload_len);
        packet.set_next_header(self.next_header);
        packet.set_hop_limit(self.hop_limit);
        packet.set_src_addr(self.src_addr);
        packet.set_dst_addr(self.dst_addr);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{poisoned, POISON};
    use proptest::prelude::*;

    /// The IPv6 header of a neighbour solicitation (the full packet is in the icmpv6 tests).
    const NS_HEADER: [u8; 40] = [
        0x60, 0x00, 0x00, 0x00, // version 6, traffic class 0, flow label 0
        0x00, 0x20, // payload length 32
        0x3a, // next header ICMPv6
        0xff, // hop limit 255
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x50, 0x54, 0x00, 0xff, 0xfe, 0x12, 0x34,
        0x56, // source fe80::5054:ff:fe12:3456
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0xff, 0x00, 0x00,
        0x01, // destination ff02::1:ff00:1
    ];

    #[test]
    fn captured_header_parses_every_field() {
        let mut b = NS_HEADER.to_vec();
        b.extend_from_slice(&[0; 32]);
        let p = Ipv6Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.version(), 6);
        assert_eq!((p.traffic_class(), p.flow_label()), (0, 0));
        assert_eq!(p.payload_len(), 32);
        assert_eq!(p.next_header(), IpProtocol::Icmpv6);
        assert_eq!(p.hop_limit(), 255);
        assert_eq!(
            p.src_addr(),
            "fe80::5054:ff:fe12:3456".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(p.dst_addr(), "ff02::1:ff00:1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.payload().len(), 32);
    }

    #[test]
    fn traffic_class_and_flow_label_are_split_right() {
        let mut b = NS_HEADER;
        b[..4].copy_from_slice(&[0x6a, 0xbc, 0xde, 0xf1]);
        b[4..6].fill(0);
        let p = Ipv6Packet::new_checked(&b[..]).unwrap();
        assert_eq!(
            (p.version(), p.traffic_class(), p.flow_label()),
            (6, 0xab, 0xcdef1)
        );
    }

    #[test]
    fn emit_writes_every_header_byte() {
        let mut b = NS_HEADER.to_vec();
        b.extend_from_slice(&[0; 32]);
        let repr = Ipv6Repr::parse(&Ipv6Packet::new_checked(&b[..]).unwrap()).unwrap();
        let mut buf = poisoned(44);
        repr.emit(&mut Ipv6Packet::new_unchecked(&mut buf[..]))
            .unwrap();
        assert_eq!(&buf[..40], &NS_HEADER[..]);
        assert!(buf[40..].iter().all(|&b| b == POISON));
    }

    #[test]
    fn truncated_inputs_are_errors_at_every_length() {
        let mut b = NS_HEADER.to_vec();
        b.extend_from_slice(&[0; 32]);
        for len in 0..b.len() {
            assert_eq!(
                Ipv6Packet::new_checked(&b[..len]).err(),
                Some(Error::Truncated)
            );
        }
    }

    #[test]
    fn hop_limit_decrements_until_one() {
        let mut b = NS_HEADER;
        b[4..6].fill(0);
        let mut p = Ipv6Packet::new_checked(&mut b[..]).unwrap();
        assert_eq!(p.decrement_hop_limit(), Ok(254));
        p.set_hop_limit(1);
        assert_eq!(p.decrement_hop_limit(), Err(Error::HopLimitExceeded));
        assert_eq!(p.hop_limit(), 1);
    }

    pub(crate) fn arb_repr() -> impl Strategy<Value = Ipv6Repr> {
        (
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any::<u8>(),
            0u16..512,
            any::<u8>(),
            any::<u8>(),
            0u32..(1 << 20),
        )
            .prop_map(|(s, d, nh, len, hl, tc, fl)| Ipv6Repr {
                src_addr: s.into(),
                dst_addr: d.into(),
                next_header: IpProtocol::from(nh),
                payload_len: len,
                hop_limit: hl,
                traffic_class: tc,
                flow_label: fl,
            })
    }

    proptest! {
        #[test]
        fn repr_round_trips_and_etherparse_agrees(repr in arb_repr()) {
            let mut buf = poisoned(40 + usize::from(repr.payload_len));
            repr.emit(&mut Ipv6Packet::new_unchecked(&mut buf[..])).unwrap();
            let parsed = Ipv6Repr::parse(&Ipv6Packet::new_checked(&buf[..]).unwrap()).unwrap();
            prop_assert_eq!(parsed, repr);
            let (h, _) = etherparse::Ipv6Header::from_slice(&buf).unwrap();
            prop_assert_eq!(h.source, repr.src_addr.octets());
            prop_assert_eq!(h.destination, repr.dst_addr.octets());
            prop_assert_eq!(h.traffic_class, repr.traffic_class);
            prop_assert_eq!(h.flow_label.value(), repr.flow_label);
            prop_assert_eq!(h.payload_length, repr.payload_len);
            prop_assert_eq!(h.hop_limit, repr.hop_limit);
        }

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..80usize)) {
            let p = Ipv6Packet::new_unchecked(&data[..]);
            let _ = (p.version(), p.traffic_class(), p.flow_label(), p.payload_len(), p.hop_limit());
            let _ = (p.src_addr(), p.dst_addr(), p.payload().len(), p.next_header());
            if let Ok(p) = Ipv6Packet::new_checked(&data[..]) {
                prop_assert_eq!(p.payload().len(), usize::from(p.payload_len()));
                if Ipv6Repr::parse(&p).is_ok() {
                    prop_assert!(etherparse::Ipv6Header::from_slice(&data).is_ok());
                }
            }
        }
    }
}
