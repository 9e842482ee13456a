//! ICMP for IPv4 (RFC 792): echo, destination unreachable (with the RFC 1191 next-hop MTU),
//! time exceeded; every other type round-trips as [`Icmpv4Repr::Other`].
//!
//! The view's buffer is the whole ICMP message (the IPv4 payload): the checksum covers all of it.

use super::checksum;
use super::field::{set_bytes_at, set_u16_at, set_u32_at, set_u8_at, slice, u16_at, u32_at, u8_at};
use super::{Error, Result};

mod offsets {
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: usize = 2;
    /// Echo: identifier; the 32-bit "rest of header" starts here for every type.
    pub const REST: usize = 4;
    /// Echo: sequence number; destination unreachable code 4: next-hop MTU.
    pub const SEQ_OR_MTU: usize = 6;
    pub const DATA: usize = 8;
}

/// Bytes of the header (type, code, checksum, rest of header).
pub const HEADER_LEN: usize = offsets::DATA;

/// An ICMPv4 message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Icmpv4Message {
    /// 0.
    EchoReply,
    /// 3.
    DstUnreachable,
    /// 5.
    Redirect,
    /// 8.
    EchoRequest,
    /// 11.
    TimeExceeded,
    /// 12.
    ParamProblem,
    /// Anything else, kept as is.
    Unknown(u8),
}

impl From<u8> for Icmpv4Message {
    fn from(value: u8) -> Self {
        match value {
            0 => Icmpv4Message::EchoReply,
            3 => Icmpv4Message::DstUnreachable,
            5 => Icmpv4Message::Redirect,
            8 => Icmpv4Message::EchoRequest,
            11 => Icmpv4Message::TimeExceeded,
            12 => Icmpv4Message::ParamProblem,
            other => Icmpv4Message::Unknown(other),
        }
    }
}

impl From<Icmpv4Message> for u8 {
    fn from(value: Icmpv4Message) -> Self {
        match value {
            Icmpv4Message::EchoReply => 0,
            Icmpv4Message::DstUnreachable => 3,
            Icmpv4Message::Redirect => 5,
            Icmpv4Message::EchoRequest => 8,
            Icmpv4Message::TimeExceeded => 11,
            Icmpv4Message::ParamProblem => 12,
            Icmpv4Message::Unknown(other) => other,
        }
    }
}

/// Destination unreachable code 4: fragmentation needed and DF set (carries the next-hop MTU).
pub const CODE_FRAG_NEEDED: u8 = 4;
/// Time exceeded code 0: TTL exceeded in transit.
pub const CODE_TTL_EXCEEDED: u8 = 0;

/// A zero-copy view of an ICMPv4 message.
#[derive(Debug, Clone)]
pub struct Icmpv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Icmpv4Packet<T> {
    /// A view without any check; accessors return zeros on a short buffer (never panic).
    pub const fn new_unchecked(buffer: T) -> Self {
        Icmpv4Packet { buffer }
    }

    /// A view of a buffer holding at least the 8-byte header.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// [`Error::Truncated`] if shorter than the header.
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

    /// Message type.
    pub fn msg_type(&self) -> Icmpv4Message {
        Icmpv4Message::from(u8_at(self.buffer.as_ref(), offsets::TYPE))
    }

    /// Code.
    pub fn code(&self) -> u8 {
        u8_at(self.buffer.as_ref(), offsets::CODE)
    }

    /// Checksum field.
    pub fn checksum(&self) -> u16 {
        u16_at(self.buffer.as_ref(), offsets::CHECKSUM)
    }

    /// Echo identifier.
    pub fn echo_ident(&self) -> u16 {
        u16_at(self.buffer.as_ref(), offsets::REST)
    }

    /// Echo sequence number.
    pub fn echo_seq_no(&self) -> u16 {
        u16_at(self.buffer.as_ref(), offsets::SEQ_OR_MTU)
    }

    /// Next-hop MTU of a "fragmentation needed" message (RFC 1191 §4).
    pub fn next_hop_mtu(&self) -> u16 {
        u16_at(self.buffer.as_ref(), offsets::SEQ_OR_MTU)
    }

    /// The 32-bit rest of header.
    pub fn rest_of_header(&self) -> u32 {
        u32_at(self.buffer.as_ref(), offsets::REST)
    }

    /// Everything after the header.
    pub fn data(&self) -> &[u8] {
        let data = self.buffer.as_ref();
        slice(data, offsets::DATA..data.len())
    }

    /// True if the checksum over the whole message is right.
    pub fn verify_checksum(&self) -> bool {
        checksum::verify(self.buffer.as_ref())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Icmpv4Packet<T> {
    /// Sets the type.
    pub fn set_msg_type(&mut self, t: Icmpv4Message) {
        set_u8_at(self.buffer.as_mut(), offsets::TYPE, t.into());
    }

    /// Sets the code.
    pub fn set_code(&mut self, code: u8) {
        set_u8_at(self.buffer.as_mut(), offsets::CODE, code);
    }

    /// Sets the checksum field.
    pub fn set_checksum(&mut self, value: u16) {
        set_u16_at(self.buffer.as_mut(), offsets::CHECKSUM, value);
    }

    /// Sets the rest of header.
    pub fn set_rest_of_header(&mut self, value: u32) {
        set_u32_at(self.buffer.as_mut(), offsets::REST, value);
    }

    /// Computes and writes the checksum over the whole buffer.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let c = checksum::checksum(self.buffer.as_ref());
        self.set_checksum(c);
    }
}

/// The structured form of an ICMPv4 message; `data` borrows from the parsed buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Icmpv4Repr<'a> {
    /// Echo request.
    EchoRequest {
        /// Identifier.
        ident: u16,
        /// Sequence number.
        seq_no: u16,
        /// Payload.
        data: &'a [u8],
    },
    /// Echo reply.
    EchoReply {
        /// Identifier.
        ident: u16,
        /// Sequence number.
        seq_no: u16,
        /// Payload.
        data: &'a [u8],
    },
    /// Destination unreachable.
    DstUnreachable {
        /// Code (4: fragmentation needed).
        code: u8,
        /// Next-hop MTU (code 4; must be 0 for other codes).
        next_hop_mtu: u16,
        /// The offending packet's IP header and at least 8 bytes of its payload.
        data: &'a [u8],
    },
    /// Time exceeded.
    TimeExceeded {
        /// Code (0: TTL exceeded in transit).
        code: u8,
        /// The offending packet's IP header and at least 8 bytes of its payload.
        data: &'a [u8],
    },
    /// Any other message, kept as is.
    Other {
        /// Type.
        msg_type: Icmpv4Message,
        /// Code.
        code: u8,
        /// The 32-bit rest of header.
        rest_of_header: u32,
        /// Everything after the header.
        data: &'a [u8],
    },
}

impl<'a> Icmpv4Repr<'a> {
    /// Parses a message and checks its checksum.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Icmpv4Packet<&'a T>) -> Result<Icmpv4Repr<'a>> {
        packet.check_len()?;
        if !packet.verify_checksum() {
            return Err(Error::Checksum);
        }
        let buf: &'a [u8] = packet.buffer.as_ref();
        let data = slice(buf, offsets::DATA..buf.len());
        let (ident, seq_no) = (packet.echo_ident(), packet.echo_seq_no());
        Ok(match (packet.msg_type(), packet.code()) {
            (Icmpv4Message::EchoRequest, 0) => Icmpv4Repr::EchoRequest {
                ident,
                seq_no,
                data,
            },
            (Icmpv4Message::EchoReply, 0) => Icmpv4Repr::EchoReply {
                ident,
                seq_no,
                data,
            },
            // The rest of header is unused (zero) except for "fragmentation needed", whose
            // low 16 bits are the next-hop MTU (RFC 1191 §4); anything else stays `Other`.
            (Icmpv4Message::DstUnreachable, code)
                if packet.rest_of_header() == 0
                    || (code == CODE_FRAG_NEEDED && packet.rest_of_header() >> 16 == 0) =>
            {
                Icmpv4Repr::DstUnreachable {
                    code,
                    next_hop_mtu: packet.next_hop_mtu(),
                    data,
                }
            }
            (Icmpv4Message::TimeExceeded, code) if packet.rest_of_header() == 0 => {
                Icmpv4Repr::TimeExceeded { code, data }
            }
            (msg_type, code) => Icmpv4Repr::Other {
                msg_type,
                code,
                rest_of_header: packet.rest_of_header(),
                data,
            },
        })
    }

    fn data(&self) -> &'a [u8] {
        match *self {
            Icmpv4Repr::EchoRequest { data, .. }
            | Icmpv4Repr::EchoReply { data, .. }
            | Icmpv4Repr::DstUnreachable { data, .. }
            | Icmpv4Repr::TimeExceeded { data, .. }
            | Icmpv4Repr::Other { data, .. } => data,
        }
    }

    /// Bytes this writes: header and data.
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN + self.data().len()
    }

    /// Writes the message, checksum included, into `packet`, whose buffer must be exactly
    /// [`Self::buffer_len`] bytes (the checksum covers the whole buffer).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Icmpv4Packet<T>) -> Result<()> {
        if packet.buffer.as_ref().len() != self.buffer_len() {
            return Err(if packet.buffer.as_ref().len() < self.buffer_len() {
                Error::Truncated
            } else {
                Error::Malformed
            });
        }
        let (msg_type, code, rest) = match *self {
            Icmpv4Repr::EchoRequest { ident, seq_no, .. } => (
                Icmpv4Message::EchoRequest,
                0,
                (u32::from(ident) << 16) | u32::from(seq_no),
            ),
            Icmpv4Repr::EchoReply { ident, seq_no, .. } => (
                Icmpv4Message::EchoReply,
                0,
                (u32::from(ident) << 16) | u32::from(seq_no),
            ),
            Icmpv4Repr::DstUnreachable {
                code, next_hop_mtu, ..
            } => (Icmpv4Message::DstUnreachable, code, u32::from(next_hop_mtu)),
            Icmpv4Repr::TimeExceeded { code, .. } => (Icmpv4Message::TimeExceeded, code, 0),
            Icmpv4Repr::Other {
                msg_type,
                code,
                rest_of_header,
                ..
            } => (msg_type, code, rest_of_header),
        };
        packet.set_msg_type(msg_type);
        packet.set_code(code);
        packet.set_rest_of_header(rest);
        set_bytes_at(packet.buffer.as_mut(), offsets::DATA, self.data());
        packet.fill_checksum();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{poisoned, POISON};
    use proptest::prelude::*;

    /// The ICMP part of a Linux `ping` echo request (id 0x1a2b, seq 1, 16 bytes of data).
    const ECHO_REQUEST: [u8; 24] = [
        0x08, // type: echo request
        0x00, // code 0
        0x25, 0x13, // checksum
        0x1a, 0x2b, // identifier
        0x00, 0x01, // sequence number
        0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e,
        0x1f, // data
    ];

    #[test]
    fn captured_echo_request_parses_every_field() {
        let p = Icmpv4Packet::new_checked(&ECHO_REQUEST[..]).unwrap();
        assert_eq!(p.msg_type(), Icmpv4Message::EchoRequest);
        assert_eq!(p.code(), 0);
        assert_eq!(p.checksum(), 0x2513);
        assert!(p.verify_checksum());
        assert_eq!((p.echo_ident(), p.echo_seq_no()), (0x1a2b, 1));
        assert_eq!(p.data(), &ECHO_REQUEST[8..]);
        assert_eq!(
            Icmpv4Repr::parse(&p),
            Ok(Icmpv4Repr::EchoRequest {
                ident: 0x1a2b,
                seq_no: 1,
                data: &ECHO_REQUEST[8..]
            })
        );
        let (h, _) = etherparse::Icmpv4Header::from_slice(&ECHO_REQUEST).unwrap();
        assert_eq!(h.checksum, 0x2513);
        assert_eq!(h.icmp_type.calc_checksum(&ECHO_REQUEST[8..]), 0x2513);
    }

    #[test]
    fn emit_reproduces_the_capture_into_a_poisoned_buffer() {
        let repr =
            Icmpv4Repr::parse(&Icmpv4Packet::new_checked(&ECHO_REQUEST[..]).unwrap()).unwrap();
        let mut buf = poisoned(repr.buffer_len() + 4);
        let (msg, tail) = buf.split_at_mut(repr.buffer_len());
        repr.emit(&mut Icmpv4Packet::new_unchecked(&mut *msg))
            .unwrap();
        assert_eq!(&*msg, &ECHO_REQUEST[..]);
        assert!(tail.iter().all(|&b| b == POISON));
    }

    #[test]
    fn frag_needed_carries_the_next_hop_mtu() {
        let inner = [0x45u8; 28];
        let repr = Icmpv4Repr::DstUnreachable {
            code: CODE_FRAG_NEEDED,
            next_hop_mtu: 1400,
            data: &inner,
        };
        let mut buf = poisoned(repr.buffer_len());
        repr.emit(&mut Icmpv4Packet::new_unchecked(&mut buf[..]))
            .unwrap();
        assert_eq!(&buf[..8], &[3, 4, buf[2], buf[3], 0, 0, 0x05, 0x78]);
        let p = Icmpv4Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.next_hop_mtu(), 1400);
        assert_eq!(Icmpv4Repr::parse(&p), Ok(repr));
    }

    #[test]
    fn truncated_and_corrupt_messages_are_errors() {
        for len in 0..HEADER_LEN {
            assert_eq!(
                Icmpv4Packet::new_checked(&ECHO_REQUEST[..len]).err(),
                Some(Error::Truncated)
            );
        }
        for len in HEADER_LEN..ECHO_REQUEST.len() {
            // A cut message no longer sums right.
            let p = Icmpv4Packet::new_checked(&ECHO_REQUEST[..len]).unwrap();
            assert_eq!(Icmpv4Repr::parse(&p), Err(Error::Checksum), "len {len}");
        }
    }

    /// The non-borrowing parts of a repr: (variant, a, b, code, type, rest of header).
    type Params = (u8, u16, u16, u8, u8, u32);

    fn build(p: Params, data: &[u8]) -> Icmpv4Repr<'_> {
        let (kind, a, b, code, t, rest) = p;
        match kind {
            0 => Icmpv4Repr::EchoRequest {
                ident: a,
                seq_no: b,
                data,
            },
            1 => Icmpv4Repr::EchoReply {
                ident: a,
                seq_no: b,
                data,
            },
            2 => Icmpv4Repr::DstUnreachable {
                code,
                next_hop_mtu: if code == CODE_FRAG_NEEDED { a } else { 0 },
                data,
            },
            3 => Icmpv4Repr::TimeExceeded { code, data },
            _ => Icmpv4Repr::Other {
                // Avoided here: the types the parser maps to a named variant, and those that
                // etherparse (the checksum's oracle below) reads with a fixed length
                // (timestamp, 13 and 14) or keeps only part of the header's rest of (parameter
                // problem, 12: the pointer byte).
                msg_type: Icmpv4Message::from(if matches!(t, 0 | 3 | 8 | 11 | 12 | 13 | 14) {
                    19
                } else {
                    t
                }),
                code,
                rest_of_header: rest,
                data,
            },
        }
    }

    proptest! {
        #[test]
        fn repr_round_trips(
            params in (0u8..5, any::<u16>(), any::<u16>(), any::<u8>(), any::<u8>(), any::<u32>()),
            data in proptest::collection::vec(any::<u8>(), 0..48usize),
        ) {
            let repr = build(params, &data);
            let mut buf = poisoned(repr.buffer_len());
            repr.emit(&mut Icmpv4Packet::new_unchecked(&mut buf[..])).unwrap();
            prop_assert_eq!(Icmpv4Repr::parse(&Icmpv4Packet::new_checked(&buf[..]).unwrap()), Ok(repr));
            let (h, rest) = etherparse::Icmpv4Header::from_slice(&buf).unwrap();
            prop_assert_eq!(h.icmp_type.calc_checksum(rest), h.checksum);
        }

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..48usize)) {
            let p = Icmpv4Packet::new_unchecked(&data[..]);
            let _ = (p.msg_type(), p.code(), p.checksum(), p.rest_of_header(), p.data().len());
            if let Ok(p) = Icmpv4Packet::new_checked(&data[..]) {
                if let Ok(repr) = Icmpv4Repr::parse(&p) {
                    prop_assert_eq!(repr.buffer_len(), data.len());
                }
            }
        }
    }
}
