//! Ethernet II frames (IEEE 802.3 clause 3.2.6 type field) with 802.1Q / 802.1ad tag
//! awareness.
//!
//! The view covers the untagged 14-byte header. [`EthernetFrame::l2_header`] walks up to two
//! VLAN tags (802.1ad S-tag 0x88a8 or 802.1Q 0x8100, then 802.1Q C-tag) to find the network
//! layer's EtherType and offset, which is all the switch needs to classify a tagged frame.
//! [`EthernetRepr`] carries at most one 802.1Q tag; a double-tagged frame parses as
//! [`Error::Unsupported`].

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::field::{array_at, set_bytes_at, set_u16_at, slice, slice_mut, u16_at, Field};
use super::{Error, Result};

/// A MAC address. The zerocopy derives make it a plain 6-byte value with alignment 1, so it is
/// read from and written into frames with one copy.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(transparent)]
pub struct EthernetAddress(pub [u8; 6]);

impl EthernetAddress {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: EthernetAddress = EthernetAddress([0xff; 6]);

    /// The address in the first 6 bytes of `bytes`, if there are 6.
    pub fn from_bytes(bytes: &[u8]) -> Option<EthernetAddress> {
        EthernetAddress::read_from_prefix(bytes)
            .ok()
            .map(|(a, _)| a)
    }

    /// The address's bytes.
    pub const fn as_bytes(&self) -> &[u8; 6] {
        &self.0
    }

    /// True for a group (multicast or broadcast) address: I/G bit set.
    pub const fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    /// True for ff:ff:ff:ff:ff:ff.
    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }

    /// True for a unicast address.
    pub const fn is_unicast(&self) -> bool {
        !self.is_multicast()
    }

    /// The IPv6 multicast MAC for `addr` (RFC 2464 §7: 33:33 and the low 32 bits).
    pub fn ipv6_multicast(addr: &std::net::Ipv6Addr) -> EthernetAddress {
        let o = addr.octets();
        EthernetAddress([0x33, 0x33, o[12], o[13], o[14], o[15]])
    }
}

impl core::fmt::Display for EthernetAddress {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// An EtherType (IEEE registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EtherType {
    /// 0x0800.
    Ipv4,
    /// 0x0806.
    Arp,
    /// 0x86dd.
    Ipv6,
    /// 0x8100: an 802.1Q customer tag follows.
    Vlan,
    /// 0x88a8: an 802.1ad service tag follows.
    QinQ,
    /// Anything else (including 802.3 length values ≤ 1500), kept as is.
    Unknown(u16),
}

impl From<u16> for EtherType {
    fn from(value: u16) -> Self {
        match value {
            0x0800 => EtherType::Ipv4,
            0x0806 => EtherType::Arp,
            0x86dd => EtherType::Ipv6,
            0x8100 => EtherType::Vlan,
            0x88a8 => EtherType::QinQ,
            other => EtherType::Unknown(other),
        }
    }
}

impl From<EtherType> for u16 {
    fn from(value: EtherType) -> Self {
        match value {
            EtherType::Ipv4 => 0x0800,
            EtherType::Arp => 0x0806,
            EtherType::Ipv6 => 0x86dd,
            EtherType::Vlan => 0x8100,
            EtherType::QinQ => 0x88a8,
            EtherType::Unknown(other) => other,
        }
    }
}

impl EtherType {
    /// True for the tag protocol identifiers this module walks (0x8100, 0x88a8).
    pub const fn is_vlan_tag(self) -> bool {
        matches!(self, EtherType::Vlan | EtherType::QinQ)
    }
}

mod offsets {
    use super::Field;
    pub const DESTINATION: Field = 0..6;
    pub const SOURCE: Field = 6..12;
    pub const ETHERTYPE: usize = 12;
    pub const PAYLOAD: usize = 14;
    /// Within a VLAN tag (which follows a TPID in the EtherType position): TCI, then the
    /// next EtherType.
    pub const TAG_TCI: usize = 0;
    pub const TAG_ETHERTYPE: usize = 2;
}

/// Bytes of an untagged Ethernet header.
pub const HEADER_LEN: usize = offsets::PAYLOAD;
/// Bytes one VLAN tag adds.
pub const VLAN_TAG_LEN: usize = 4;
/// The most VLAN tags [`EthernetFrame::l2_header`] walks.
pub const MAX_VLAN_TAGS: usize = 2;

/// A zero-copy view of an Ethernet II frame.
#[derive(Debug, Clone)]
pub struct EthernetFrame<T: AsRef<[u8]>> {
    buffer: T,
}

/// What the L2 header says about the network layer, VLAN tags walked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Header {
    /// The network layer's EtherType (after any VLAN tags).
    pub ethertype: EtherType,
    /// Offset of the network-layer header from the start of the frame.
    pub payload_offset: usize,
    /// The outer tag's TCI (PCP/DEI/VID), if the frame is tagged.
    pub outer_tci: Option<u16>,
    /// The inner tag's TCI, if the frame is double-tagged.
    pub inner_tci: Option<u16>,
}

impl L2Header {
    /// The outermost VLAN ID, if tagged.
    pub fn vlan_id(&self) -> Option<u16> {
        self.outer_tci.map(|tci| tci & 0x0fff)
    }
}

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    /// A view without any check; accessors return zeros on a short buffer (never panic).
    pub const fn new_unchecked(buffer: T) -> Self {
        EthernetFrame { buffer }
    }

    /// A view of a buffer holding at least the 14-byte header.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let frame = Self::new_unchecked(buffer);
        frame.check_len()?;
        Ok(frame)
    }

    /// [`Error::Truncated`] if the buffer is shorter than the header.
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            Err(Error::Truncated)
        } else {
            Ok(())
        }
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Destination address.
    #[inline]
    pub fn dst_addr(&self) -> EthernetAddress {
        EthernetAddress(array_at(self.buffer.as_ref(), offsets::DESTINATION.start))
    }

    /// Source address.
    #[inline]
    pub fn src_addr(&self) -> EthernetAddress {
        EthernetAddress(array_at(self.buffer.as_ref(), offsets::SOURCE.start))
    }

    /// The EtherType field (a TPID if the frame is tagged).
    #[inline]
    pub fn ethertype(&self) -> EtherType {
        EtherType::from(u16_at(self.buffer.as_ref(), offsets::ETHERTYPE))
    }

    /// Everything after the 14-byte header (tags included, if any).
    #[inline]
    pub fn payload(&self) -> &[u8] {
        let data = self.buffer.as_ref();
        slice(data, offsets::PAYLOAD..data.len())
    }

    /// Walks up to [`MAX_VLAN_TAGS`] VLAN tags to the network layer.
    ///
    /// Errors: [`Error::Truncated`] if a tag is cut short; [`Error::Unsupported`] for a third
    /// tag.
    pub fn l2_header(&self) -> Result<L2Header> {
        let data = self.buffer.as_ref();
        self.check_len()?;
        let mut ethertype = self.ethertype();
        let mut offset = HEADER_LEN;
        let mut tcis = [None; MAX_VLAN_TAGS];
        let mut tags = 0;
        while ethertype.is_vlan_tag() {
            if tags == MAX_VLAN_TAGS {
                return Err(Error::Unsupported);
            }
            if data.len() < offset + VLAN_TAG_LEN {
                return Err(Error::Truncated);
            }
            tcis[tags] = Some(u16_at(data, offset + offsets::TAG_TCI));
            ethertype = EtherType::from(u16_at(data, offset + offsets::TAG_ETHERTYPE));
            offset += VLAN_TAG_LEN;
            tags += 1;
        }
        Ok(L2Header {
            ethertype,
            payload_offset: offset,
            outer_tci: tcis[0],
            inner_tci: tcis[1],
        })
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> EthernetFrame<T> {
    /// Sets the destination address.
    #[inline]
    pub fn set_dst_addr(&mut self, addr: EthernetAddress) {
        set_bytes_at(
            self.buffer.as_mut(),
            offsets::DESTINATION.start,
            addr.as_bytes(),
        );
    }

    /// Sets the source address.
    #[inline]
    pub fn set_src_addr(&mut self, addr: EthernetAddress) {
        set_bytes_at(self.buffer.as_mut(), offsets::SOURCE.start, addr.as_bytes());
    }

    /// Sets the EtherType field.
    #[inline]
    pub fn set_ethertype(&mut self, ethertype: EtherType) {
        set_u16_at(self.buffer.as_mut(), offsets::ETHERTYPE, ethertype.into());
    }

    /// Everything after the 14-byte header, mutable.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let data = self.buffer.as_mut();
        let len = data.len();
        slice_mut(data, offsets::PAYLOAD..len)
    }
}

/// The structured form of an Ethernet header, with at most one 802.1Q tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthernetRepr {
    /// Source address.
    pub src_addr: EthernetAddress,
    /// Destination address.
    pub dst_addr: EthernetAddress,
    /// The 802.1Q TCI, if tagged.
    pub vlan_tci: Option<u16>,
    /// The network layer's EtherType.
    pub ethertype: EtherType,
}

impl EthernetRepr {
    /// Parses the header (and one 802.1Q tag) of `frame`.
    pub fn parse<T: AsRef<[u8]>>(frame: &EthernetFrame<T>) -> Result<EthernetRepr> {
        let l2 = frame.l2_header()?;
        if l2.inner_tci.is_some() {
            return Err(Error::Unsupported);
        }
        if l2.outer_tci.is_some() && frame.ethertype() != EtherType::Vlan {
            // A lone 802.1ad S-tag: valid, but not what a Repr carries.
            return Err(Error::Unsupported);
        }
        Ok(EthernetRepr {
            src_addr: frame.src_addr(),
            dst_addr: frame.dst_addr(),
            vlan_tci: l2.outer_tci,
            ethertype: l2.ethertype,
        })
    }

    /// Bytes of the header this writes (14, or 18 with a tag).
    pub const fn buffer_len(&self) -> usize {
        match self.vlan_tci {
            Some(_) => HEADER_LEN + VLAN_TAG_LEN,
            None => HEADER_LEN,
        }
    }

    /// Writes the header into the start of `frame`, which must hold [`Self::buffer_len`] bytes.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, frame: &mut EthernetFrame<T>) -> Result<()> {
        if frame.buffer.as_ref().len() < self.buffer_len() {
            return Err(Error::Truncated);
        }
        frame.set_dst_addr(self.dst_addr);
        frame.set_src_addr(self.src_addr);
        match self.vlan_tci {
            Some(tci) => {
                frame.set_ethertype(EtherType::Vlan);
                let data = frame.buffer.as_mut();
                set_u16_at(data, HEADER_LEN + offsets::TAG_TCI, tci);
                set_u16_at(
                    data,
                    HEADER_LEN + offsets::TAG_ETHERTYPE,
                    self.ethertype.into(),
                );
            }
            None => frame.set_ethertype(self.ethertype),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{poisoned, POISON};
    use proptest::prelude::*;

    /// The Ethernet header of a real ARP request (Linux host asking for its gateway).
    const UNTAGGED: [u8; 14] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // destination: broadcast
        0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // source: 52:54:00:12:34:56 (a QEMU NIC)
        0x08, 0x06, // EtherType: ARP
    ];

    /// A frame with an 802.1Q tag, VID 100, PCP 5, carrying IPv6.
    const TAGGED: [u8; 18] = [
        0x02, 0x00, 0x00, 0x00, 0x00, 0x01, // destination: 02:00:00:00:00:01
        0x02, 0x00, 0x00, 0x00, 0x00, 0x02, // source: 02:00:00:00:00:02
        0x81, 0x00, // TPID: 802.1Q
        0xa0, 0x64, // TCI: PCP 5, DEI 0, VID 100
        0x86, 0xdd, // EtherType: IPv6
    ];

    /// Double-tagged (802.1ad S-tag VID 10, 802.1Q C-tag VID 20) IPv4.
    const QINQ: [u8; 22] = [
        0x02, 0, 0, 0, 0, 1, // destination
        0x02, 0, 0, 0, 0, 2, // source
        0x88, 0xa8, // TPID: 802.1ad
        0x00, 0x0a, // S-tag TCI: VID 10
        0x81, 0x00, // TPID: 802.1Q
        0x00, 0x14, // C-tag TCI: VID 20
        0x08, 0x00, // EtherType: IPv4
    ];

    #[test]
    fn untagged_header_parses_every_field() {
        let f = EthernetFrame::new_checked(&UNTAGGED[..]).unwrap();
        assert_eq!(f.dst_addr(), EthernetAddress::BROADCAST);
        assert!(f.dst_addr().is_broadcast() && f.dst_addr().is_multicast());
        assert_eq!(
            f.src_addr(),
            EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        assert!(f.src_addr().is_unicast());
        assert_eq!(f.ethertype(), EtherType::Arp);
        assert!(f.payload().is_empty());
        let l2 = f.l2_header().unwrap();
        assert_eq!(
            (l2.ethertype, l2.payload_offset, l2.vlan_id()),
            (EtherType::Arp, 14, None)
        );
        assert_eq!(f.src_addr().to_string(), "52:54:00:12:34:56");
    }

    #[test]
    fn tagged_header_is_classified_by_its_inner_ethertype() {
        let f = EthernetFrame::new_checked(&TAGGED[..]).unwrap();
        assert_eq!(f.ethertype(), EtherType::Vlan);
        let l2 = f.l2_header().unwrap();
        assert_eq!(l2.ethertype, EtherType::Ipv6);
        assert_eq!(l2.payload_offset, 18);
        assert_eq!(l2.outer_tci, Some(0xa064));
        assert_eq!(l2.vlan_id(), Some(100));
        let repr = EthernetRepr::parse(&f).unwrap();
        assert_eq!(repr.vlan_tci, Some(0xa064));
        assert_eq!(repr.ethertype, EtherType::Ipv6);
    }

    #[test]
    fn double_tagged_frame_classifies_but_has_no_repr() {
        let f = EthernetFrame::new_checked(&QINQ[..]).unwrap();
        let l2 = f.l2_header().unwrap();
        assert_eq!(l2.ethertype, EtherType::Ipv4);
        assert_eq!(l2.payload_offset, 22);
        assert_eq!((l2.vlan_id(), l2.inner_tci), (Some(10), Some(20)));
        assert_eq!(EthernetRepr::parse(&f), Err(Error::Unsupported));
        // A third tag is refused.
        let mut triple = QINQ.to_vec();
        triple[20..22].copy_from_slice(&[0x81, 0x00]);
        triple.extend_from_slice(&[0, 30, 0x08, 0x00]);
        assert_eq!(
            EthernetFrame::new_unchecked(&triple[..]).l2_header(),
            Err(Error::Unsupported)
        );
    }

    #[test]
    fn emit_writes_every_header_byte() {
        for capture in [&UNTAGGED[..], &TAGGED[..]] {
            let repr = EthernetRepr::parse(&EthernetFrame::new_checked(capture).unwrap()).unwrap();
            assert_eq!(repr.buffer_len(), capture.len());
            let mut buf = poisoned(repr.buffer_len() + 3);
            repr.emit(&mut EthernetFrame::new_unchecked(&mut buf[..]))
                .unwrap();
            assert_eq!(&buf[..capture.len()], capture);
            assert!(buf[capture.len()..].iter().all(|&b| b == POISON));
        }
    }

    #[test]
    fn truncated_headers_are_errors_at_every_length() {
        for capture in [&UNTAGGED[..], &TAGGED[..], &QINQ[..]] {
            for len in 0..capture.len() {
                let f = EthernetFrame::new_unchecked(&capture[..len]);
                assert!(f.l2_header().is_err(), "len {len}");
                if len < HEADER_LEN {
                    assert_eq!(
                        EthernetFrame::new_checked(&capture[..len]).err(),
                        Some(Error::Truncated)
                    );
                }
            }
        }
    }

    #[test]
    fn setters_rewrite_in_place() {
        let mut buf = UNTAGGED;
        let mut f = EthernetFrame::new_checked(&mut buf[..]).unwrap();
        f.set_dst_addr(EthernetAddress([1, 2, 3, 4, 5, 6]));
        f.set_src_addr(EthernetAddress([7, 8, 9, 10, 11, 12]));
        f.set_ethertype(EtherType::Unknown(0x88b5));
        assert_eq!(buf, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0x88, 0xb5]);
    }

    #[test]
    fn ethertypes_round_trip_including_unknown_values() {
        for v in [
            0x0800, 0x0806, 0x86dd, 0x8100, 0x88a8, 0x88b5, 0x0000, 0xffff,
        ] {
            assert_eq!(u16::from(EtherType::from(v)), v);
        }
        let mcast = EthernetAddress::ipv6_multicast(&"ff02::1:ff00:2".parse().unwrap());
        assert_eq!(mcast, EthernetAddress([0x33, 0x33, 0xff, 0x00, 0x00, 0x02]));
    }

    fn arb_repr() -> impl Strategy<Value = EthernetRepr> {
        (
            any::<[u8; 6]>(),
            any::<[u8; 6]>(),
            any::<Option<u16>>(),
            any::<u16>(),
        )
            .prop_map(|(s, d, tci, et)| {
                let mut ethertype = EtherType::from(et);
                if ethertype.is_vlan_tag() {
                    ethertype = EtherType::Ipv4;
                }
                EthernetRepr {
                    src_addr: EthernetAddress(s),
                    dst_addr: EthernetAddress(d),
                    vlan_tci: tci,
                    ethertype,
                }
            })
    }

    proptest! {
        #[test]
        fn repr_round_trips(repr in arb_repr()) {
            let mut buf = poisoned(repr.buffer_len());
            repr.emit(&mut EthernetFrame::new_unchecked(&mut buf[..])).unwrap();
            let parsed = EthernetRepr::parse(&EthernetFrame::new_checked(&buf[..]).unwrap()).unwrap();
            prop_assert_eq!(parsed, repr);
            // etherparse, as an independent reference, reads the same header.
            let (eth, _) = etherparse::Ethernet2Header::from_slice(&buf).unwrap();
            prop_assert_eq!(eth.source, repr.src_addr.0);
            prop_assert_eq!(eth.destination, repr.dst_addr.0);
        }

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64usize)) {
            let f = EthernetFrame::new_unchecked(&data[..]);
            let _ = (f.dst_addr(), f.src_addr(), f.ethertype(), f.payload().len());
            if let Ok(l2) = f.l2_header() {
                prop_assert!(l2.payload_offset <= data.len());
            }
            // etherparse, as an independent reference, reads the same 14-byte header.
            if let Ok((eth, _)) = etherparse::Ethernet2Header::from_slice(&data) {
                prop_assert_eq!(eth.destination, f.dst_addr().0);
                prop_assert_eq!(eth.source, f.src_addr().0);
                prop_assert_eq!(eth.ether_type.0, u16::from(f.ethertype()));
            } else {
                prop_assert!(f.check_len().is_err());
            }
            let _ = EthernetRepr::parse(&f);
        }
    }
}
