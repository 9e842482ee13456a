//! IPv4 (RFC 791) headers.
//!
//! `check_len` validates the header length (IHL) and total length against the buffer, so the
//! view's `payload()` is exactly the IP payload even when the frame carries Ethernet padding.
//! The fast path uses [`Ipv4Packet::decrement_ttl`], which updates the header checksum
//! incrementally (RFC 1624) instead of recomputing it.

use std::net::Ipv4Addr;

use super::checksum;
use super::field::{
    array_at, set_bytes_at, set_u16_at, set_u8_at, slice, slice_mut, u16_at, u8_at,
};
use super::{Error, IpProtocol, Result};

mod offsets {
    pub const VER_IHL: usize = 0;
    pub const DSCP_ECN: usize = 1;
    pub const TOTAL_LEN: usize = 2;
    pub const IDENT: usize = 4;
    pub const FLAGS_FRAG: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: usize = 10;
    pub const SRC_ADDR: usize = 12;
    pub const DST_ADDR: usize = 16;
}

/// Bytes of a header without options.
pub const MIN_HEADER_LEN: usize = 20;
/// The "don't fragment" flag in the flags/fragment-offset word.
const FLAG_DF: u16 = 0x4000;
/// The "more fragments" flag.
const FLAG_MF: u16 = 0x2000;
/// The fragment offset bits (in 8-byte units).
const FRAG_OFFSET_MASK: u16 = 0x1fff;

/// A zero-copy view of an IPv4 packet.
#[derive(Debug, Clone)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// A view without any check; accessors return zeros on a short buffer (never panic).
    pub const fn new_unchecked(buffer: T) -> Self {
        Ipv4Packet { buffer }
    }

    /// A view of a buffer that holds the whole header and `total_len` bytes.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks that the buffer holds the fixed header, the options (IHL) and the total length,
    /// and that IHL ≥ 5 and total length ≥ header length. The version is checked by
    /// [`Ipv4Repr::parse`] and the fast path (it is not a length).
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < MIN_HEADER_LEN {
            return Err(Error::Truncated);
        }
        let header_len = usize::from(self.header_len());
        if header_len < MIN_HEADER_LEN {
            return Err(Error::Malformed);
        }
        let total_len = usize::from(self.total_len());
        if total_len < header_len {
            return Err(Error::Malformed);
        }
        if len < header_len || len < total_len {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The version field (4 for IPv4).
    #[inline]
    pub fn version(&self) -> u8 {
        u8_at(self.buffer.as_ref(), offsets::VER_IHL) >> 4
    }

    /// Header length in bytes (IHL × 4).
    #[inline]
    pub fn header_len(&self) -> u8 {
        (u8_at(self.buffer.as_ref(), offsets::VER_IHL) & 0x0f) * 4
    }

    /// DSCP (6 bits).
    pub fn dscp(&self) -> u8 {
        u8_at(self.buffer.as_ref(), offsets::DSCP_ECN) >> 2
    }

    /// DSCP and ECN: the byte RFC 6040 copies into an outer header.
    #[inline]
    pub fn dscp_ecn(&self) -> u8 {
        u8_at(self.buffer.as_ref(), offsets::DSCP_ECN)
    }

    /// ECN (2 bits).
    pub fn ecn(&self) -> u8 {
        u8_at(self.buffer.as_ref(), offsets::DSCP_ECN) & 0x03
    }

    /// Total length (header and payload) in bytes.
    #[inline]
    pub fn total_len(&self) -> u16 {
        u16_at(self.buffer.as_ref(), offsets::TOTAL_LEN)
    }

    /// Identification.
    pub fn ident(&self) -> u16 {
        u16_at(self.buffer.as_ref(), offsets::IDENT)
    }

    /// The DF flag.
    pub fn dont_frag(&self) -> bool {
        u16_at(self.buffer.as_ref(), offsets::FLAGS_FRAG) & FLAG_DF != 0
    }

    /// The MF flag.
    pub fn more_frags(&self) -> bool {
        u16_at(self.buffer.as_ref(), offsets::FLAGS_FRAG) & FLAG_MF != 0
    }

    /// Fragment offset in bytes.
    pub fn frag_offset(&self) -> u16 {
        (u16_at(self.buffer.as_ref(), offsets::FLAGS_FRAG) & FRAG_OFFSET_MASK) << 3
    }

    /// True if this is a fragment (MF set or offset non-zero).
    pub fn is_fragment(&self) -> bool {
        u16_at(self.buffer.as_ref(), offsets::FLAGS_FRAG) & (FLAG_MF | FRAG_OFFSET_MASK) != 0
    }

    /// Time to live.
    #[inline]
    pub fn ttl(&self) -> u8 {
        u8_at(self.buffer.as_ref(), offsets::TTL)
    }

    /// The payload's protocol.
    #[inline]
    pub fn next_header(&self) -> IpProtocol {
        IpProtocol::from(u8_at(self.buffer.as_ref(), offsets::PROTOCOL))
    }

    /// The header checksum field.
    pub fn checksum(&self) -> u16 {
        u16_at(self.buffer.as_ref(), offsets::CHECKSUM)
    }

    /// Source address.
    #[inline]
    pub fn src_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(array_at::<4>(self.buffer.as_ref(), offsets::SRC_ADDR))
    }

    /// Destination address.
    #[inline]
    pub fn dst_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(array_at::<4>(self.buffer.as_ref(), offsets::DST_ADDR))
    }

    /// The options (empty without options).
    pub fn options(&self) -> &[u8] {
        slice(
            self.buffer.as_ref(),
            MIN_HEADER_LEN..usize::from(self.header_len()),
        )
    }

    /// True if the header checksum is correct.
    pub fn verify_checksum(&self) -> bool {
        checksum::verify(slice(
            self.buffer.as_ref(),
            0..usize::from(self.header_len()),
        ))
    }

    /// The payload: from the end of the header to `total_len` (Ethernet padding excluded).
    #[inline]
    pub fn payload(&self) -> &[u8] {
        slice(
            self.buffer.as_ref(),
            usize::from(self.header_len())..usize::from(self.total_len()),
        )
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    /// Sets version 4 and the header length in bytes (a multiple of 4).
    pub fn set_version_and_header_len(&mut self, header_len: u8) {
        set_u8_at(
            self.buffer.as_mut(),
            offsets::VER_IHL,
            0x40 | ((header_len / 4) & 0x0f),
        );
    }

    /// Sets DSCP and ECN.
    pub fn set_dscp_ecn(&mut self, dscp: u8, ecn: u8) {
        set_u8_at(
            self.buffer.as_mut(),
            offsets::DSCP_ECN,
            (dscp << 2) | (ecn & 0x03),
        );
    }

    /// Sets the total length.
    pub fn set_total_len(&mut self, len: u16) {
        set_u16_at(self.buffer.as_mut(), offsets::TOTAL_LEN, len);
    }

    /// Sets the identification.
    pub fn set_ident(&mut self, ident: u16) {
        set_u16_at(self.buffer.as_mut(), offsets::IDENT, ident);
    }

    /// Sets flags and fragment offset: DF as given, MF clear, offset 0.
    pub fn set_unfragmented(&mut self, dont_frag: bool) {
        let word = if dont_frag { FLAG_DF } else { 0 };
        set_u16_at(self.buffer.as_mut(), offsets::FLAGS_FRAG, word);
    }

    /// Sets the TTL (the checksum is not updated; see [`Self::decrement_ttl`]).
    pub fn set_ttl(&mut self, ttl: u8) {
        set_u8_at(self.buffer.as_mut(), offsets::TTL, ttl);
    }

    /// Sets the protocol.
    pub fn set_next_header(&mut self, protocol: IpProtocol) {
        set_u8_at(self.buffer.as_mut(), offsets::PROTOCOL, protocol.into());
    }

    /// Sets the checksum field.
    pub fn set_checksum(&mut self, value: u16) {
        set_u16_at(self.buffer.as_mut(), offsets::CHECKSUM, value);
    }

    /// Sets the source address.
    pub fn set_src_addr(&mut self, addr: Ipv4Addr) {
        set_bytes_at(self.buffer.as_mut(), offsets::SRC_ADDR, &addr.octets());
    }

    /// Sets the destination address.
    pub fn set_dst_addr(&mut self, addr: Ipv4Addr) {
        set_bytes_at(self.buffer.as_mut(), offsets::DST_ADDR, &addr.octets());
    }

    /// Computes and writes the header checksum.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let header_len = usize::from(self.header_len());
        let sum = checksum::checksum(slice(self.buffer.as_ref(), 0..header_len));
        self.set_checksum(sum);
    }

    /// Decrements the TTL and updates the checksum incrementally (RFC 1624). Returns the new
    /// TTL; [`Error::HopLimitExceeded`] (header unchanged) if the TTL is 0 or 1.
    ///
    /// Cost, with the Ethernet/IPv4 parse and MAC rewrite around it: ≈ 4 ns and 51
    /// instructions per packet (`benches/pipeline.rs` `rewrite/fast`,
    /// `examples/rewrite_callgrind.rs`; docs/PERFORMANCE.md).
    #[inline]
    pub fn decrement_ttl(&mut self) -> Result<u8> {
        checksum::decrement_ipv4_ttl(self.buffer.as_mut())
    }

    /// The payload, mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let range = usize::from(self.header_len())..usize::from(self.total_len());
        slice_mut(self.buffer.as_mut(), range)
    }
}

/// The structured form of an IPv4 header (options are not carried; `emit` writes none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Repr {
    /// Source address.
    pub src_addr: Ipv4Addr,
    /// Destination address.
    pub dst_addr: Ipv4Addr,
    /// The payload's protocol.
    pub next_header: IpProtocol,
    /// Payload bytes (total length minus header length).
    pub payload_len: u16,
    /// Time to live.
    pub ttl: u8,
    /// DSCP (6 bits).
    pub dscp: u8,
    /// ECN (2 bits).
    pub ecn: u8,
    /// Identification.
    pub ident: u16,
    /// The DF flag.
    pub dont_frag: bool,
}

impl Ipv4Repr {
    /// Parses a checked packet: version 4, correct checksum, not a fragment (fragments are
    /// forwarded by the fast path as they are, never reassembled or parsed further).
    pub fn parse<T: AsRef<[u8]>>(packet: &Ipv4Packet<T>) -> Result<Ipv4Repr> {
        packet.check_len()?;
        if packet.version() != 4 {
            return Err(Error::Malformed);
        }
        if !packet.verify_checksum() {
            return Err(Error::Checksum);
        }
        if packet.is_fragment() {
            return Err(Error::Unsupported);
        }
        Ok(Ipv4Repr {
            src_addr: packet.src_addr(),
            dst_addr: packet.dst_addr(),
            next_header: packet.next_header(),
            payload_len: packet.total_len() - u16::from(packet.header_len()),
            ttl: packet.ttl(),
            dscp: packet.dscp(),
            ecn: packet.ecn(),
            ident: packet.ident(),
            dont_frag: packet.dont_frag(),
        })
    }

    /// Bytes of the header this writes.
    pub const fn buffer_len(&self) -> usize {
        MIN_HEADER_LEN
    }

    /// Writes the 20-byte header, checksum included, at the start of `packet`.
    ///
    /// Errors: [`Error::Truncated`] if the buffer is shorter than the header;
    /// [`Error::TooLong`] if header plus payload exceed 65535 bytes.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Ipv4Packet<T>) -> Result<()> {
        if packet.buffer.as_ref().len() < MIN_HEADER_LEN {
            return Err(Error::Truncated);
        }
        let total = u16::try_from(MIN_HEADER_LEN + usize::from(self.payload_len))
            .map_err(|_| Error::TooLong)?;
        packet.set_version_and_header_len(MIN_HEADER_LEN as u8);
        packet.set_dscp_ecn(self.dscp, self.ecn);
        packet.set_total_len(total);
        packet.set_ident(self.ident);
        packet.set_unfragmented(self.dont_frag);
        packet.set_ttl(self.ttl);
        packet.set_next_header(self.next_header);
        packet.set_src_addr(self.src_addr);
        packet.set_dst_addr(self.dst_addr);
        packet.fill_checksum();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{poisoned, POISON};
    use proptest::prelude::*;

    /// A real IPv4/UDP packet: a DNS query from 192.168.1.10 to 192.168.1.1 (dig example.com).
    pub(crate) const IPV4_UDP: [u8; 57] = [
        0x45, // version 4, IHL 5 (20 bytes)
        0x00, // DSCP 0, ECN 0
        0x00, 0x39, // total length 57
        0x1c, 0x46, // identification 0x1c46
        0x40, 0x00, // flags DF, fragment offset 0
        0x40, // TTL 64
        0x11, // protocol UDP
        0x9b, 0x12, // header checksum
        0xc0, 0xa8, 0x01, 0x0a, // source 192.168.1.10
        0xc0, 0xa8, 0x01, 0x01, // destination 192.168.1.1
        // UDP
        0xd4, 0x31, // source port 54321
        0x00, 0x35, // destination port 53
        0x00, 0x25, // length 37
        0x00, 0x00, // checksum (filled by the udp tests; 0 = none over IPv4)
        // DNS query: id 0xabcd, RD, 1 question: example.com A IN
        0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x07, b'e', b'x',
        b'a', b'm', b'p', b'l', b'e', 0x03, b'c', b'o', b'm', 0x00, 0x00, 0x01, 0x00, 0x01,
    ];

    #[test]
    fn captured_packet_parses_every_field() {
        let p = Ipv4Packet::new_checked(&IPV4_UDP[..]).unwrap();
        assert_eq!(p.version(), 4);
        assert_eq!(p.header_len(), 20);
        assert_eq!((p.dscp(), p.ecn()), (0, 0));
        assert_eq!(p.total_len(), 57);
        assert_eq!(p.ident(), 0x1c46);
        assert!(p.dont_frag() && !p.more_frags() && !p.is_fragment());
        assert_eq!(p.frag_offset(), 0);
        assert_eq!(p.ttl(), 64);
        assert_eq!(p.next_header(), IpProtocol::Udp);
        assert_eq!(p.checksum(), 0x9b12);
        assert!(p.verify_checksum());
        assert_eq!(p.src_addr(), Ipv4Addr::new(192, 168, 1, 10));
        assert_eq!(p.dst_addr(), Ipv4Addr::new(192, 168, 1, 1));
        assert!(p.options().is_empty());
        assert_eq!(p.payload().len(), 37);
        let repr = Ipv4Repr::parse(&p).unwrap();
        assert_eq!(repr.payload_len, 37);
        assert_eq!(repr.next_header, IpProtocol::Udp);
        // etherparse reads the same header.
        let (h, _) = etherparse::Ipv4Header::from_slice(&IPV4_UDP).unwrap();
        assert_eq!(h.header_checksum, 0x9b12);
        assert_eq!(h.calc_header_checksum(), 0x9b12);
    }

    #[test]
    fn emit_writes_every_header_byte_and_the_checksum() {
        let repr = Ipv4Repr::parse(&Ipv4Packet::new_checked(&IPV4_UDP[..]).unwrap()).unwrap();
        let mut buf = poisoned(24);
        repr.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]))
            .unwrap();
        assert_eq!(&buf[..20], &IPV4_UDP[..20]);
        assert!(buf[20..].iter().all(|&b| b == POISON));
    }

    #[test]
    fn ethernet_padding_is_not_payload() {
        let mut padded = IPV4_UDP.to_vec();
        padded.extend_from_slice(&[0; 7]);
        let p = Ipv4Packet::new_checked(&padded[..]).unwrap();
        assert_eq!(p.payload(), &IPV4_UDP[20..]);
    }

    #[test]
    fn truncated_inputs_are_errors_at_every_length() {
        for len in 0..IPV4_UDP.len() {
            assert_eq!(
                Ipv4Packet::new_checked(&IPV4_UDP[..len]).err(),
                Some(Error::Truncated),
                "len {len}"
            );
        }
    }

    #[test]
    fn bad_header_fields_are_rejected() {
        let mut b = IPV4_UDP;
        b[0] = 0x44; // IHL 4 < 5
        assert_eq!(
            Ipv4Packet::new_checked(&b[..]).err(),
            Some(Error::Malformed)
        );
        let mut b = IPV4_UDP;
        b[2..4].copy_from_slice(&19u16.to_be_bytes()); // total length < header
        assert_eq!(
            Ipv4Packet::new_checked(&b[..]).err(),
            Some(Error::Malformed)
        );
        let mut b = IPV4_UDP;
        b[0] = 0x65; // version 6
        let p = Ipv4Packet::new_checked(&b[..]).unwrap();
        assert_eq!(Ipv4Repr::parse(&p), Err(Error::Malformed));
        let mut b = IPV4_UDP;
        b[11] ^= 1;
        assert_eq!(
            Ipv4Repr::parse(&Ipv4Packet::new_unchecked(&b[..])),
            Err(Error::Checksum)
        );
        let mut b = IPV4_UDP;
        b[6] = 0x20; // MF
        let mut p = Ipv4Packet::new_unchecked(&mut b[..]);
        p.fill_checksum();
        assert!(p.is_fragment());
        assert_eq!(Ipv4Repr::parse(&p), Err(Error::Unsupported));
    }

    #[test]
    fn decrement_ttl_keeps_the_checksum_valid() {
        let mut b = IPV4_UDP;
        let mut p = Ipv4Packet::new_checked(&mut b[..]).unwrap();
        assert_eq!(p.decrement_ttl(), Ok(63));
        assert_eq!(p.ttl(), 63);
        assert!(p.verify_checksum());
        p.set_ttl(1);
        p.fill_checksum();
        assert_eq!(p.decrement_ttl(), Err(Error::HopLimitExceeded));
    }

    pub(crate) fn arb_repr() -> impl Strategy<Value = Ipv4Repr> {
        (
            any::<[u8; 4]>(),
            any::<[u8; 4]>(),
            any::<u8>(),
            0u16..=(u16::MAX - 20),
            any::<u8>(),
            0u8..64,
            0u8..4,
            any::<u16>(),
            any::<bool>(),
        )
            .prop_map(
                |(s, d, proto, payload_len, ttl, dscp, ecn, ident, df)| Ipv4Repr {
                    src_addr: s.into(),
                    dst_addr: d.into(),
                    next_header: IpProtocol::from(proto),
                    payload_len,
                    ttl,
                    dscp,
                    ecn,
                    ident,
                    dont_frag: df,
                },
            )
    }

    proptest! {
        #[test]
        fn repr_round_trips_and_etherparse_agrees(repr in arb_repr()) {
            let mut buf = poisoned(20 + usize::from(repr.payload_len));
            repr.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..])).unwrap();
            let parsed = Ipv4Repr::parse(&Ipv4Packet::new_checked(&buf[..]).unwrap()).unwrap();
            prop_assert_eq!(parsed, repr);
            let (h, _) = etherparse::Ipv4Header::from_slice(&buf).unwrap();
            prop_assert_eq!(h.header_checksum, h.calc_header_checksum());
            prop_assert_eq!(h.source, repr.src_addr.octets());
            prop_assert_eq!(h.time_to_live, repr.ttl);
            prop_assert_eq!(h.protocol.0, u8::from(repr.next_header));
        }

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..80usize)) {
            let p = Ipv4Packet::new_unchecked(&data[..]);
            let _ = (p.version(), p.header_len(), p.total_len(), p.ttl(), p.src_addr(), p.dst_addr());
            let _ = (p.options().len(), p.payload().len(), p.verify_checksum(), p.frag_offset());
            if let Ok(p) = Ipv4Packet::new_checked(&data[..]) {
                prop_assert!(p.payload().len() + usize::from(p.header_len()) == usize::from(p.total_len()));
                if Ipv4Repr::parse(&p).is_ok() {
                    // etherparse accepts what we accept.
                    prop_assert!(etherparse::Ipv4Slice::from_slice(&data).is_ok());
                }
            }
            let mut copy = data.clone();
            let _ = Ipv4Packet::new_unchecked(&mut copy[..]).decrement_ttl();
        }
    }
}
