//! UDP (RFC 768) datagrams, with the IPv4/IPv6 pseudo-header checksum.
//!
//! Over IPv4 a checksum of 0 means "none" (RFC 768); over IPv6 it is mandatory and 0 is invalid
//! (RFC 8200 §8.1). A computed checksum of 0 is sent as 0xffff.

use super::checksum::PseudoHeader;
use super::field::{set_u16_at, slice, slice_mut, u16_at};
use super::{Error, IpProtocol, Result};

mod offsets {
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const LENGTH: usize = 4;
    pub const CHECKSUM: usize = 6;
}

/// Bytes of the header.
pub const HEADER_LEN: usize = 8;

/// A zero-copy view of a UDP datagram.
#[derive(Debug, Clone)]
pub struct UdpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    /// A view without any check; accessors return zeros on a short buffer (never panic).
    pub const fn new_unchecked(buffer: T) -> Self {
        UdpPacket { buffer }
    }

    /// A view of a buffer that holds the header and `length` bytes.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// [`Error::Truncated`] if the buffer is shorter than the header or than `length`;
    /// [`Error::Malformed`] if `length` < 8.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let field = usize::from(self.len());
        if field < HEADER_LEN {
            return Err(Error::Malformed);
        }
        if len < field {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Source port.
    pub fn src_port(&self) -> u16 {
        u16_at(self.buffer.as_ref(), offsets::SRC_PORT)
    }

    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        u16_at(self.buffer.as_ref(), offsets::DST_PORT)
    }

    /// The length field (header and payload).
    pub fn len(&self) -> u16 {
        u16_at(self.buffer.as_ref(), offsets::LENGTH)
    }

    /// True if the length field says there is no payload.
    pub fn is_empty(&self) -> bool {
        usize::from(self.len()) <= HEADER_LEN
    }

    /// The checksum field.
    pub fn checksum(&self) -> u16 {
        u16_at(self.buffer.as_ref(), offsets::CHECKSUM)
    }

    /// The payload (up to `length`).
    pub fn payload(&self) -> &[u8] {
        slice(self.buffer.as_ref(), HEADER_LEN..usize::from(self.len()))
    }

    /// True if the checksum is right for this pseudo-header (or absent over IPv4).
    pub fn verify_checksum(&self, pseudo: &PseudoHeader) -> bool {
        let checksum = self.checksum();
        if checksum == 0 {
            return !pseudo.is_v6();
        }
        let datagram = slice(self.buffer.as_ref(), 0..usize::from(self.len()));
        pseudo
            .sum(IpProtocol::Udp, u32::from(self.len()))
            .add_bytes(datagram)
            .fold()
            == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    /// Sets the source port.
    pub fn set_src_port(&mut self, port: u16) {
        set_u16_at(self.buffer.as_mut(), offsets::SRC_PORT, port);
    }

    /// Sets the destination port.
    pub fn set_dst_port(&mut self, port: u16) {
        set_u16_at(self.buffer.as_mut(), offsets::DST_PORT, port);
    }

    /// Sets the length field.
    pub fn set_len(&mut self, len: u16) {
        set_u16_at(self.buffer.as_mut(), offsets::LENGTH, len);
    }

    /// Sets the checksum field.
    pub fn set_checksum(&mut self, checksum: u16) {
        set_u16_at(self.buffer.as_mut(), offsets::CHECKSUM, checksum);
    }

    /// Computes the checksum over pseudo-header, header and payload, and writes it
    /// (0 is written as 0xffff).
    pub fn fill_checksum(&mut self, pseudo: &PseudoHeader) {
        self.set_checksum(0);
        let len = self.len();
        let datagram = slice(self.buffer.as_ref(), 0..usize::from(len));
        let sum = pseudo
            .sum(IpProtocol::Udp, u32::from(len))
            .add_bytes(datagram)
            .checksum();
        self.set_checksum(if sum == 0 { 0xffff } else { sum });
    }

    /// The payload, mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = usize::from(self.len());
        slice_mut(self.buffer.as_mut(), HEADER_LEN..end)
    }
}

/// The structured form of a UDP header. The payload stays in the buffer: `emit` writes the
/// header, the caller writes (or already has) the payload, then [`UdpPacket::fill_checksum`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpRepr {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Payload bytes.
    pub payload_len: u16,
}

impl UdpRepr {
    /// Parses a datagram and checks its checksum against `pseudo`. Port 0 is allowed (as a
    /// source it means "no reply"; as a destination the policy is the caller's).
    pub fn parse<T: AsRef<[u8]>>(packet: &UdpPacket<T>, pseudo: &PseudoHeader) -> Result<UdpRepr> {
        packet.check_len()?;
        if !packet.verify_checksum(pseudo) {
            return Err(Error::Checksum);
        }
        Ok(UdpRepr {
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            payload_len: packet.len() - HEADER_LEN as u16,
        })
    }

    /// Bytes of the header this writes.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes the header with the checksum field zero; [`Error::TooLong`] if the datagram would
    /// exceed 65535 bytes.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut UdpPacket<T>) -> Result<()> {
        if packet.buffer.as_ref().len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let len = u16::try_from(HEADER_LEN + usize::from(self.payload_len))
            .map_err(|_| Error::TooLong)?;
        packet.set_src_port(self.src_port);
        packet.set_dst_port(self.dst_port);
        packet.set_len(len);
        packet.set_checksum(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{poisoned, POISON};
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// The UDP part of the DNS query in the ipv4 tests (192.168.1.10 → 192.168.1.1).
    const DNS_QUERY: [u8; 37] = [
        0xd4, 0x31, // source port 54321
        0x00, 0x35, // destination port 53
        0x00, 0x25, // length 37
        0x00, 0x00, // checksum: none (valid over IPv4 only)
        0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // DNS header
        0x07, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 0x03, b'c', b'o', b'm', 0x00, // QNAME
        0x00, 0x01, 0x00, 0x01, // QTYPE A, QCLASS IN
    ];

    fn v4() -> PseudoHeader {
        PseudoHeader::V4 {
            src: Ipv4Addr::new(192, 168, 1, 10),
            dst: Ipv4Addr::new(192, 168, 1, 1),
        }
    }

    fn v6() -> PseudoHeader {
        PseudoHeader::V6 {
            src: "2001:db8::1".parse().unwrap(),
            dst: "2001:db8::2".parse().unwrap(),
        }
    }

    #[test]
    fn captured_datagram_parses_every_field() {
        let p = UdpPacket::new_checked(&DNS_QUERY[..]).unwrap();
        assert_eq!(
            (p.src_port(), p.dst_port(), p.len(), p.checksum()),
            (54321, 53, 37, 0)
        );
        assert_eq!(p.payload(), &DNS_QUERY[8..]);
        assert!(p.verify_checksum(&v4()), "no checksum is fine over IPv4");
        assert!(!p.verify_checksum(&v6()), "but not over IPv6");
        let repr = UdpRepr::parse(&p, &v4()).unwrap();
        assert_eq!(
            repr,
            UdpRepr {
                src_port: 54321,
                dst_port: 53,
                payload_len: 29
            }
        );
    }

    #[test]
    fn filled_checksum_verifies_and_matches_etherparse() {
        let mut b = DNS_QUERY;
        let mut p = UdpPacket::new_checked(&mut b[..]).unwrap();
        p.fill_checksum(&v4());
        assert!(p.verify_checksum(&v4()));
        let reference = etherparse::UdpHeader {
            source_port: 54321,
            destination_port: 53,
            length: 37,
            checksum: 0,
        }
        .calc_checksum_ipv4_raw([192, 168, 1, 10], [192, 168, 1, 1], &DNS_QUERY[8..])
        .unwrap();
        assert_eq!(p.checksum(), reference);
        p.fill_checksum(&v6());
        assert!(p.verify_checksum(&v6()));
        let src: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8::2".parse().unwrap();
        let reference6 = etherparse::UdpHeader {
            source_port: 54321,
            destination_port: 53,
            length: 37,
            checksum: 0,
        }
        .calc_checksum_ipv6_raw(src.octets(), dst.octets(), &DNS_QUERY[8..])
        .unwrap();
        assert_eq!(p.checksum(), reference6);
        b[20] ^= 0x40;
        assert_eq!(
            UdpRepr::parse(&UdpPacket::new_unchecked(&b[..]), &v6()),
            Err(Error::Checksum)
        );
    }

    #[test]
    fn emit_writes_every_header_byte() {
        let repr = UdpRepr {
            src_port: 54321,
            dst_port: 53,
            payload_len: 29,
        };
        let mut buf = poisoned(12);
        repr.emit(&mut UdpPacket::new_unchecked(&mut buf[..]))
            .unwrap();
        assert_eq!(&buf[..8], &DNS_QUERY[..8]);
        assert!(buf[8..].iter().all(|&b| b == POISON));
    }

    #[test]
    fn truncated_and_bad_lengths_are_errors() {
        for len in 0..DNS_QUERY.len() {
            assert_eq!(
                UdpPacket::new_checked(&DNS_QUERY[..len]).err(),
                Some(Error::Truncated)
            );
        }
        let mut b = DNS_QUERY;
        b[4..6].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(UdpPacket::new_checked(&b[..]).err(), Some(Error::Malformed));
    }

    proptest! {
        #[test]
        fn repr_round_trips_with_checksum(
            src_port in any::<u16>(), dst_port in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..64usize),
            six in any::<bool>(),
        ) {
            let repr = UdpRepr { src_port, dst_port, payload_len: payload.len() as u16 };
            let mut buf = poisoned(8 + payload.len());
            let mut p = UdpPacket::new_unchecked(&mut buf[..]);
            repr.emit(&mut p).unwrap();
            p.payload_mut().copy_from_slice(&payload);
            let pseudo = if six { v6() } else { v4() };
            p.fill_checksum(&pseudo);
            prop_assert_eq!(UdpRepr::parse(&UdpPacket::new_checked(&buf[..]).unwrap(), &pseudo), Ok(repr));
            let (h, rest) = etherparse::UdpHeader::from_slice(&buf).unwrap();
            prop_assert_eq!((h.source_port, h.destination_port), (src_port, dst_port));
            prop_assert_eq!(rest, &payload[..]);
        }

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..40usize)) {
            let p = UdpPacket::new_unchecked(&data[..]);
            let _ = (p.src_port(), p.dst_port(), p.len(), p.checksum(), p.payload().len());
            let _ = p.verify_checksum(&v4());
            if let Ok(p) = UdpPacket::new_checked(&data[..]) {
                prop_assert_eq!(p.payload().len() + 8, usize::from(p.len()));
                let _ = UdpRepr::parse(&p, &v6());
            }
        }
    }
}
