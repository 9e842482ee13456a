//! ARP (RFC 826) packets.
//!
//! The view handles any hardware/protocol address lengths (the offsets of the four addresses
//! follow from `hlen` and `plen`); [`ArpRepr`] is the Ethernet/IPv4 case, the only one the
//! access switch answers (passive ARP learning and gateway replies).

use std::net::Ipv4Addr;

use super::ethernet::{EtherType, EthernetAddress};
use super::field::{set_bytes_at, set_u16_at, set_u8_at, slice, u16_at, u8_at};
use super::{Error, Result};

mod offsets {
    pub const HTYPE: usize = 0;
    pub const PTYPE: usize = 2;
    pub const HLEN: usize = 4;
    pub const PLEN: usize = 5;
    pub const OPER: usize = 6;
    /// The sender hardware address; the other three follow at offsets computed from hlen/plen.
    pub const SHA: usize = 8;
}

/// Bytes of the fixed part (before the addresses).
pub const FIXED_LEN: usize = offsets::SHA;
/// Bytes of an Ethernet/IPv4 ARP packet.
pub const ETHERNET_IPV4_LEN: usize = FIXED_LEN + 2 * (6 + 4);
/// Hardware type for Ethernet.
pub const HTYPE_ETHERNET: u16 = 1;

/// An ARP operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArpOperation {
    /// 1.
    Request,
    /// 2.
    Reply,
    /// Anything else (RARP, InARP, …), kept as is.
    Unknown(u16),
}

impl From<u16> for ArpOperation {
    fn from(value: u16) -> Self {
        match value {
            1 => ArpOperation::Request,
            2 => ArpOperation::Reply,
            other => ArpOperation::Unknown(other),
        }
    }
}

impl From<ArpOperation> for u16 {
    fn from(value: ArpOperation) -> Self {
        match value {
            ArpOperation::Request => 1,
            ArpOperation::Reply => 2,
            ArpOperation::Unknown(other) => other,
        }
    }
}

/// A zero-copy view of an ARP packet.
#[derive(Debug, Clone)]
pub struct ArpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> ArpPacket<T> {
    /// A view without any check; accessors return zeros/empty slices on a short buffer.
    pub const fn new_unchecked(buffer: T) -> Self {
        ArpPacket { buffer }
    }

    /// A view of a buffer that holds the fixed part and all four addresses.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// [`Error::Truncated`] if the buffer is shorter than 8 + 2·(hlen + plen) bytes.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < FIXED_LEN || len < self.packet_len() {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// 8 + 2·(hlen + plen).
    fn packet_len(&self) -> usize {
        FIXED_LEN + 2 * (usize::from(self.hardware_len()) + usize::from(self.protocol_len()))
    }

    /// Hardware type (1 = Ethernet).
    pub fn hardware_type(&self) -> u16 {
        u16_at(self.buffer.as_ref(), offsets::HTYPE)
    }

    /// Protocol type (an EtherType; 0x0800 = IPv4).
    pub fn protocol_type(&self) -> EtherType {
        EtherType::from(u16_at(self.buffer.as_ref(), offsets::PTYPE))
    }

    /// Hardware address length.
    pub fn hardware_len(&self) -> u8 {
        u8_at(self.buffer.as_ref(), offsets::HLEN)
    }

    /// Protocol address length.
    pub fn protocol_len(&self) -> u8 {
        u8_at(self.buffer.as_ref(), offsets::PLEN)
    }

    /// Operation.
    pub fn operation(&self) -> ArpOperation {
        ArpOperation::from(u16_at(self.buffer.as_ref(), offsets::OPER))
    }

    fn spa_at(&self) -> usize {
        offsets::SHA + usize::from(self.hardware_len())
    }

    fn tha_at(&self) -> usize {
        self.spa_at() + usize::from(self.protocol_len())
    }

    fn tpa_at(&self) -> usize {
        self.tha_at() + usize::from(self.hardware_len())
    }

    /// Sender hardware address.
    pub fn source_hardware_addr(&self) -> &[u8] {
        slice(self.buffer.as_ref(), offsets::SHA..self.spa_at())
    }

    /// Sender protocol address.
    pub fn source_protocol_addr(&self) -> &[u8] {
        slice(self.buffer.as_ref(), self.spa_at()..self.tha_at())
    }

    /// Target hardware address.
    pub fn target_hardware_addr(&self) -> &[u8] {
        slice(self.buffer.as_ref(), self.tha_at()..self.tpa_at())
    }

    /// Target protocol address.
    pub fn target_protocol_addr(&self) -> &[u8] {
        let end = self.tpa_at() + usize::from(self.protocol_len());
        slice(self.buffer.as_ref(), self.tpa_at()..end)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> ArpPacket<T> {
    /// Sets the fixed part for Ethernet/IPv4 and the operation.
    pub fn set_ethernet_ipv4(&mut self, operation: ArpOperation) {
        let data = self.buffer.as_mut();
        set_u16_at(data, offsets::HTYPE, HTYPE_ETHERNET);
        set_u16_at(data, offsets::PTYPE, EtherType::Ipv4.into());
        set_u8_at(data, offsets::HLEN, 6);
        set_u8_at(data, offsets::PLEN, 4);
        set_u16_at(data, offsets::OPER, operation.into());
    }

    /// Sets the sender hardware address (length `hlen`).
    pub fn set_source_hardware_addr(&mut self, addr: &[u8]) {
        let at = offsets::SHA;
        set_bytes_at(self.buffer.as_mut(), at, addr);
    }

    /// Sets the sender protocol address (length `plen`).
    pub fn set_source_protocol_addr(&mut self, addr: &[u8]) {
        let at = self.spa_at();
        set_bytes_at(self.buffer.as_mut(), at, addr);
    }

    /// Sets the target hardware address.
    pub fn set_target_hardware_addr(&mut self, addr: &[u8]) {
        let at = self.tha_at();
        set_bytes_at(self.buffer.as_mut(), at, addr);
    }

    /// Sets the target protocol address.
    pub fn set_target_protocol_addr(&mut self, addr: &[u8]) {
        let at = self.tpa_at();
        set_bytes_at(self.buffer.as_mut(), at, addr);
    }
}

/// An Ethernet/IPv4 ARP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpRepr {
    /// Operation.
    pub operation: ArpOperation,
    /// Sender MAC.
    pub source_hardware_addr: EthernetAddress,
    /// Sender IPv4 address.
    pub source_protocol_addr: Ipv4Addr,
    /// Target MAC (zero in a request).
    pub target_hardware_addr: EthernetAddress,
    /// Target IPv4 address.
    pub target_protocol_addr: Ipv4Addr,
}

impl ArpRepr {
    /// Parses an Ethernet/IPv4 ARP packet; [`Error::Unsupported`] for other address types.
    pub fn parse<T: AsRef<[u8]>>(packet: &ArpPacket<T>) -> Result<ArpRepr> {
        packet.check_len()?;
        if packet.hardware_type() != HTYPE_ETHERNET
            || packet.protocol_type() != EtherType::Ipv4
            || packet.hardware_len() != 6
            || packet.protocol_len() != 4
        {
            return Err(Error::Unsupported);
        }
        let ip = |b: &[u8]| -> Result<Ipv4Addr> {
            <[u8; 4]>::try_from(b)
                .map(Ipv4Addr::from)
                .map_err(|_| Error::Truncated)
        };
        Ok(ArpRepr {
            operation: packet.operation(),
            source_hardware_addr: EthernetAddress::from_bytes(packet.source_hardware_addr())
                .ok_or(Error::Truncated)?,
            source_protocol_addr: ip(packet.source_protocol_addr())?,
            target_hardware_addr: EthernetAddress::from_bytes(packet.target_hardware_addr())
                .ok_or(Error::Truncated)?,
            target_protocol_addr: ip(packet.target_protocol_addr())?,
        })
    }

    /// Bytes this writes (28).
    pub const fn buffer_len(&self) -> usize {
        ETHERNET_IPV4_LEN
    }

    /// Writes the packet at the start of `packet`.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut ArpPacket<T>) -> Result<()> {
        if packet.buffer.as_ref().len() < ETHERNET_IPV4_LEN {
            return Err(Error::Truncated);
        }
        packet.set_ethernet_ipv4(self.operation);
        packet.set_source_hardware_addr(self.source_hardware_addr.as_bytes());
        packet.set_source_protocol_addr(&self.source_protocol_addr.octets());
        packet.set_target_hardware_addr(self.target_hardware_addr.as_bytes());
        packet.set_target_protocol_addr(&self.target_protocol_addr.octets());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ethernet::{EthernetFrame, EthernetRepr};
    use crate::testutil::{poisoned, POISON};
    use proptest::prelude::*;

    /// A real ARP request as captured on a LAN (Ethernet header, then ARP, then padding to 60).
    const ARP_REQUEST_FRAME: [u8; 60] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // Ethernet destination: broadcast
        0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // Ethernet source
        0x08, 0x06, // EtherType ARP
        0x00, 0x01, // hardware type: Ethernet
        0x08, 0x00, // protocol type: IPv4
        0x06, // hardware address length
        0x04, // protocol address length
        0x00, 0x01, // operation: request
        0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // sender MAC
        0x0a, 0x00, 0x02, 0x0f, // sender IP 10.0.2.15
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // target MAC: unknown
        0x0a, 0x00, 0x02, 0x02, // target IP 10.0.2.2 (the gateway)
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // padding to 60 bytes
    ];

    #[test]
    fn captured_request_parses_every_field() {
        let eth = EthernetFrame::new_checked(&ARP_REQUEST_FRAME[..]).unwrap();
        assert_eq!(eth.ethertype(), EtherType::Arp);
        let p = ArpPacket::new_checked(eth.payload()).unwrap();
        assert_eq!(p.hardware_type(), 1);
        assert_eq!(p.protocol_type(), EtherType::Ipv4);
        assert_eq!((p.hardware_len(), p.protocol_len()), (6, 4));
        assert_eq!(p.operation(), ArpOperation::Request);
        assert_eq!(
            p.source_hardware_addr(),
            &[0x52, 0x54, 0x00, 0x12, 0x34, 0x56]
        );
        assert_eq!(p.source_protocol_addr(), &[10, 0, 2, 15]);
        assert_eq!(p.target_hardware_addr(), &[0; 6]);
        assert_eq!(p.target_protocol_addr(), &[10, 0, 2, 2]);
        let repr = ArpRepr::parse(&p).unwrap();
        assert_eq!(repr.source_protocol_addr, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(repr.target_protocol_addr, Ipv4Addr::new(10, 0, 2, 2));
        // etherparse reads the same.
        let sliced = etherparse::SlicedPacket::from_ethernet(&ARP_REQUEST_FRAME).unwrap();
        match sliced.net {
            Some(etherparse::NetSlice::Arp(arp)) => {
                assert_eq!(arp.sender_hw_addr(), &repr.source_hardware_addr.0);
                assert_eq!(arp.target_protocol_addr(), &[10, 0, 2, 2]);
                assert_eq!(arp.operation(), etherparse::ArpOperation::REQUEST);
            }
            _ => panic!("etherparse did not see ARP"),
        }
    }

    #[test]
    fn emit_reproduces_the_capture_byte_for_byte() {
        let p = ArpPacket::new_checked(&ARP_REQUEST_FRAME[14..]).unwrap();
        let repr = ArpRepr::parse(&p).unwrap();
        let mut buf = poisoned(14 + repr.buffer_len() + 2);
        let eth = EthernetRepr::parse(&EthernetFrame::new_checked(&ARP_REQUEST_FRAME[..]).unwrap())
            .unwrap();
        eth.emit(&mut EthernetFrame::new_unchecked(&mut buf[..]))
            .unwrap();
        repr.emit(&mut ArpPacket::new_unchecked(&mut buf[14..]))
            .unwrap();
        assert_eq!(&buf[..42], &ARP_REQUEST_FRAME[..42]);
        assert!(buf[42..].iter().all(|&b| b == POISON));
    }

    #[test]
    fn truncated_inputs_are_errors_at_every_length() {
        for len in 0..ETHERNET_IPV4_LEN {
            assert_eq!(
                ArpPacket::new_checked(&ARP_REQUEST_FRAME[14..14 + len]).err(),
                Some(Error::Truncated)
            );
        }
    }

    #[test]
    fn non_ethernet_ipv4_arp_is_viewable_but_unsupported() {
        let mut b = ARP_REQUEST_FRAME[14..].to_vec();
        b[5] = 16; // plen 16: 8 + 2·22 = 52 bytes
        b.resize(52, 0);
        let p = ArpPacket::new_checked(&b[..]).unwrap();
        assert_eq!(p.target_protocol_addr().len(), 16);
        assert_eq!(ArpRepr::parse(&p), Err(Error::Unsupported));
        assert_eq!(u16::from(ArpOperation::from(8)), 8);
    }

    proptest! {
        #[test]
        fn repr_round_trips(op in any::<u16>(), sha in any::<[u8; 6]>(), spa in any::<[u8; 4]>(), tha in any::<[u8; 6]>(), tpa in any::<[u8; 4]>()) {
            let repr = ArpRepr {
                operation: ArpOperation::from(op),
                source_hardware_addr: EthernetAddress(sha),
                source_protocol_addr: spa.into(),
                target_hardware_addr: EthernetAddress(tha),
                target_protocol_addr: tpa.into(),
            };
            let mut buf = poisoned(repr.buffer_len());
            repr.emit(&mut ArpPacket::new_unchecked(&mut buf[..])).unwrap();
            prop_assert_eq!(ArpRepr::parse(&ArpPacket::new_checked(&buf[..]).unwrap()), Ok(repr));
            let arp = etherparse::ArpPacketSlice::from_slice(&buf).unwrap();
            prop_assert_eq!(arp.sender_protocol_addr(), &spa);
            prop_assert_eq!(arp.target_hw_addr(), &tha);
        }

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64usize)) {
            let p = ArpPacket::new_unchecked(&data[..]);
            let _ = (p.operation(), p.source_hardware_addr(), p.source_protocol_addr());
            let _ = (p.target_hardware_addr(), p.target_protocol_addr());
            if let Ok(p) = ArpPacket::new_checked(&data[..]) {
                prop_assert_eq!(p.target_protocol_addr().len(), usize::from(p.protocol_len()));
                let _ = ArpRepr::parse(&p);
            }
        }
    }
}
