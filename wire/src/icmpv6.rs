//! ICMPv6 (RFC 4443) and neighbour discovery (RFC 4861).
//!
//! Echo, destination unreachable, packet too big and time exceeded are structured; router
//! solicitation/advertisement and neighbour solicitation/advertisement are parsed with their
//! options (source/target link-layer address, prefix information, MTU). Unknown messages
//! round-trip as [`Icmpv6Repr::Other`]; unknown ND options are skipped (RFC 4861 §4.6: "Receivers
//! MUST silently ignore any options they do not recognize").
//!
//! Hand-written rather than taken from etherparse, which stops at ICMPv6 type and code: the ND
//! bodies and options are what the access switch reads (passive learning) and writes (answers
//! for the virtual gateway).
//!
//! The view's buffer is the whole ICMPv6 message (the IPv6 payload); the checksum covers it and
//! the IPv6 pseudo-header (RFC 4443 §2.3), so `parse` and `emit` take a [`PseudoHeader`].
//! The RFC 4861 check that ND messages arrive with hop limit 255 is the caller's (it is an IP
//! header field): see [`NDISC_HOP_LIMIT`].

use std::net::Ipv6Addr;

use super::checksum::PseudoHeader;
use super::ethernet::EthernetAddress;
use super::field::{
    array_at, set_bytes_at, set_u16_at, set_u32_at, set_u8_at, slice, u16_at, u32_at, u8_at,
};
use super::{Error, IpProtocol, Result};

mod offsets {
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: usize = 2;
    /// The 32-bit message body start: echo identifier, packet-too-big MTU, RA hop limit/flags,
    /// NA flags.
    pub const REST: usize = 4;
    pub const ECHO_SEQ: usize = 6;
    pub const DATA: usize = 8;
    // Router advertisement.
    pub const RA_HOP_LIMIT: usize = 4;
    pub const RA_FLAGS: usize = 5;
    pub const RA_ROUTER_LIFETIME: usize = 6;
    pub const RA_REACHABLE_TIME: usize = 8;
    pub const RA_RETRANS_TIME: usize = 12;
    pub const RA_OPTIONS: usize = 16;
    // Router solicitation.
    pub const RS_OPTIONS: usize = 8;
    // Neighbour solicitation/advertisement.
    pub const NA_FLAGS: usize = 4;
    pub const ND_TARGET: usize = 8;
    pub const ND_OPTIONS: usize = 24;
}

/// Bytes of the ICMPv6 header (type, code, checksum, 32-bit body start).
pub const HEADER_LEN: usize = offsets::DATA;
/// The IP hop limit every ND message must arrive with (RFC 4861 §6.1, §7.1).
pub const NDISC_HOP_LIMIT: u8 = 255;

/// An ICMPv6 message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Icmpv6Message {
    /// 1.
    DstUnreachable,
    /// 2.
    PacketTooBig,
    /// 3.
    TimeExceeded,
    /// 4.
    ParamProblem,
    /// 128.
    EchoRequest,
    /// 129.
    EchoReply,
    /// 133.
    RouterSolicit,
    /// 134.
    RouterAdvert,
    /// 135.
    NeighborSolicit,
    /// 136.
    NeighborAdvert,
    /// 137.
    Redirect,
    /// Anything else, kept as is.
    Unknown(u8),
}

impl From<u8> for Icmpv6Message {
    fn from(value: u8) -> Self {
        match value {
            1 => Icmpv6Message::DstUnreachable,
            2 => Icmpv6Message::PacketTooBig,
            3 => Icmpv6Message::TimeExceeded,
            4 => Icmpv6Message::ParamProblem,
            128 => Icmpv6Message::EchoRequest,
            129 => Icmpv6Message::EchoReply,
            133 => Icmpv6Message::RouterSolicit,
            134 => Icmpv6Message::RouterAdvert,
            135 => Icmpv6Message::NeighborSolicit,
            136 => Icmpv6Message::NeighborAdvert,
            137 => Icmpv6Message::Redirect,
            other => Icmpv6Message::Unknown(other),
        }
    }
}

impl From<Icmpv6Message> for u8 {
    fn from(value: Icmpv6Message) -> Self {
        match value {
            Icmpv6Message::DstUnreachable => 1,
            Icmpv6Message::PacketTooBig => 2,
            Icmpv6Message::TimeExceeded => 3,
            Icmpv6Message::ParamProblem => 4,
            Icmpv6Message::EchoRequest => 128,
            Icmpv6Message::EchoReply => 129,
            Icmpv6Message::RouterSolicit => 133,
            Icmpv6Message::RouterAdvert => 134,
            Icmpv6Message::NeighborSolicit => 135,
            Icmpv6Message::NeighborAdvert => 136,
            Icmpv6Message::Redirect => 137,
            Icmpv6Message::Unknown(other) => other,
        }
    }
}

/// A zero-copy view of an ICMPv6 message.
#[derive(Debug, Clone)]
pub struct Icmpv6Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Icmpv6Packet<T> {
    /// A view without any check; accessors return zeros on a short buffer (never panic).
    pub const fn new_unchecked(buffer: T) -> Self {
        Icmpv6Packet { buffer }
    }

    /// A view of a buffer holding at least the 8-byte header and, for the ND messages, their
    /// fixed body (RS 8, RA 16, NS/NA 24 bytes).
    pub fn new_checked(buffer: T) -> Result<Self> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// [`Error::Truncated`] if shorter than the header or the type's fixed body.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN || len < self.fixed_len() {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// Bytes before the options of an ND message; the header length otherwise.
    fn fixed_len(&self) -> usize {
        match self.msg_type() {
            Icmpv6Message::RouterSolicit => offsets::RS_OPTIONS,
            Icmpv6Message::RouterAdvert => offsets::RA_OPTIONS,
            Icmpv6Message::NeighborSolicit | Icmpv6Message::NeighborAdvert => offsets::ND_OPTIONS,
            _ => HEADER_LEN,
        }
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Message type.
    pub fn msg_type(&self) -> Icmpv6Message {
        Icmpv6Message::from(u8_at(self.buffer.as_ref(), offsets::TYPE))
    }

    /// Code.
    pub fn code(&self) -> u8 {
        u8_at(self.buffer.as_ref(), offsets::CODE)
    }

    /// Checksum field.
    pub fn checksum(&self) -> u16 {
        u16_at(self.buffer.as_ref(), offsets::CHECKSUM)
    }

    /// The 32 bits after the checksum.
    pub fn rest_of_header(&self) -> u32 {
        u32_at(self.buffer.as_ref(), offsets::REST)
    }

    /// Echo identifier.
    pub fn echo_ident(&self) -> u16 {
        u16_at(self.buffer.as_ref(), offsets::REST)
    }

    /// Echo sequence number.
    pub fn echo_seq_no(&self) -> u16 {
        u16_at(self.buffer.as_ref(), offsets::ECHO_SEQ)
    }

    /// Packet-too-big MTU.
    pub fn mtu(&self) -> u32 {
        u32_at(self.buffer.as_ref(), offsets::REST)
    }

    /// Everything after the 8-byte header.
    pub fn data(&self) -> &[u8] {
        let data = self.buffer.as_ref();
        slice(data, offsets::DATA..data.len())
    }

    /// RA: current hop limit.
    pub fn ra_hop_limit(&self) -> u8 {
        u8_at(self.buffer.as_ref(), offsets::RA_HOP_LIMIT)
    }

    /// RA: flags (M = 0x80, O = 0x40).
    pub fn ra_flags(&self) -> u8 {
        u8_at(self.buffer.as_ref(), offsets::RA_FLAGS)
    }

    /// RA: router lifetime in seconds.
    pub fn ra_router_lifetime_s(&self) -> u16 {
        u16_at(self.buffer.as_ref(), offsets::RA_ROUTER_LIFETIME)
    }

    /// RA: reachable time in ms.
    pub fn ra_reachable_time_ms(&self) -> u32 {
        u32_at(self.buffer.as_ref(), offsets::RA_REACHABLE_TIME)
    }

    /// RA: retransmission timer in ms.
    pub fn ra_retrans_time_ms(&self) -> u32 {
        u32_at(self.buffer.as_ref(), offsets::RA_RETRANS_TIME)
    }

    /// NA: flags (R = 0x80, S = 0x40, O = 0x20).
    pub fn na_flags(&self) -> u8 {
        u8_at(self.buffer.as_ref(), offsets::NA_FLAGS)
    }

    /// NS/NA: target address.
    pub fn target_addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(array_at::<16>(self.buffer.as_ref(), offsets::ND_TARGET))
    }

    /// The options of an ND message (empty for other types).
    pub fn options(&self) -> NdiscOptions<'_> {
        let data = self.buffer.as_ref();
        let start = match self.msg_type() {
            Icmpv6Message::RouterSolicit
            | Icmpv6Message::RouterAdvert
            | Icmpv6Message::NeighborSolicit
            | Icmpv6Message::NeighborAdvert => self.fixed_len(),
            _ => data.len(),
        };
        NdiscOptions {
            rest: slice(data, start..data.len()),
        }
    }

    /// True if the checksum is right for `pseudo`.
    pub fn verify_checksum(&self, pseudo: &PseudoHeader) -> bool {
        let data = self.buffer.as_ref();
        let Ok(len) = u32::try_from(data.len()) else {
            return false;
        };
        pseudo.sum(IpProtocol::Icmpv6, len).add_bytes(data).fold() == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Icmpv6Packet<T> {
    /// Sets the type.
    pub fn set_msg_type(&mut self, t: Icmpv6Message) {
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

    /// Sets the 32 bits after the checksum.
    pub fn set_rest_of_header(&mut self, value: u32) {
        set_u32_at(self.buffer.as_mut(), offsets::REST, value);
    }

    /// Computes and writes the checksum over the pseudo-header and the whole buffer.
    pub fn fill_checksum(&mut self, pseudo: &PseudoHeader) {
        self.set_checksum(0);
        let data = self.buffer.as_ref();
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let c = pseudo
            .sum(IpProtocol::Icmpv6, len)
            .add_bytes(data)
            .checksum();
        self.set_checksum(c);
    }
}

/// An ND option type (RFC 4861 §4.6, IANA "IPv6 Neighbor Discovery Option Formats").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NdiscOptionType {
    /// 1.
    SourceLinkLayerAddr,
    /// 2.
    TargetLinkLayerAddr,
    /// 3.
    PrefixInformation,
    /// 4.
    RedirectedHeader,
    /// 5.
    Mtu,
    /// Anything else.
    Unknown(u8),
}

impl From<u8> for NdiscOptionType {
    fn from(value: u8) -> Self {
        match value {
            1 => NdiscOptionType::SourceLinkLayerAddr,
            2 => NdiscOptionType::TargetLinkLayerAddr,
            3 => NdiscOptionType::PrefixInformation,
            4 => NdiscOptionType::RedirectedHeader,
            5 => NdiscOptionType::Mtu,
            other => NdiscOptionType::Unknown(other),
        }
    }
}

impl From<NdiscOptionType> for u8 {
    fn from(value: NdiscOptionType) -> Self {
        match value {
            NdiscOptionType::SourceLinkLayerAddr => 1,
            NdiscOptionType::TargetLinkLayerAddr => 2,
            NdiscOptionType::PrefixInformation => 3,
            NdiscOptionType::RedirectedHeader => 4,
            NdiscOptionType::Mtu => 5,
            NdiscOptionType::Unknown(other) => other,
        }
    }
}

/// A prefix information option (RFC 4861 §4.6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixInfo {
    /// Prefix length in bits.
    pub prefix_len: u8,
    /// On-link flag (L).
    pub on_link: bool,
    /// Autonomous address-configuration flag (A).
    pub autonomous: bool,
    /// Valid lifetime, seconds (0xffffffff = infinity).
    pub valid_lifetime_s: u32,
    /// Preferred lifetime, seconds.
    pub preferred_lifetime_s: u32,
    /// The prefix.
    pub prefix: Ipv6Addr,
}

/// One ND option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NdiscOption<'a> {
    /// Source link-layer address (Ethernet: option length 1).
    SourceLinkLayerAddr(EthernetAddress),
    /// Target link-layer address.
    TargetLinkLayerAddr(EthernetAddress),
    /// Prefix information.
    PrefixInformation(PrefixInfo),
    /// MTU.
    Mtu(u32),
    /// Any other option (or a link-layer option of a non-Ethernet length), skipped by `Repr`s.
    Unknown {
        /// Type.
        kind: NdiscOptionType,
        /// The option's bytes after type and length.
        data: &'a [u8],
    },
}

mod option_offsets {
    pub const TYPE: usize = 0;
    pub const LEN: usize = 1;
    pub const BODY: usize = 2;
    // Prefix information.
    pub const PI_PREFIX_LEN: usize = 2;
    pub const PI_FLAGS: usize = 3;
    pub const PI_VALID: usize = 4;
    pub const PI_PREFERRED: usize = 8;
    pub const PI_PREFIX: usize = 16;
    // MTU.
    pub const MTU: usize = 4;
}

/// Bytes of an Ethernet link-layer address option.
const LLADDR_OPTION_LEN: usize = 8;
/// Bytes of a prefix information option.
const PREFIX_OPTION_LEN: usize = 32;
/// Bytes of an MTU option.
const MTU_OPTION_LEN: usize = 8;
const PI_FLAG_ON_LINK: u8 = 0x80;
const PI_FLAG_AUTONOMOUS: u8 = 0x40;

/// Iterator over the options of an ND message. Yields an error (then stops) for an option of
/// length 0 ([`Error::Malformed`], RFC 4861 §4.6: "Nodes MUST silently discard an ND packet
/// that contains an option with length zero") or one that runs past the end
/// ([`Error::Truncated`]).
#[derive(Debug, Clone)]
pub struct NdiscOptions<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for NdiscOptions<'a> {
    type Item = Result<NdiscOption<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let result = parse_option(self.rest);
        match result {
            Ok((option, len)) => {
                self.rest = slice(self.rest, len..self.rest.len());
                Some(Ok(option))
            }
            Err(e) => {
                self.rest = &[];
                Some(Err(e))
            }
        }
    }
}

/// One option at the start of `data`, and its length in bytes.
fn parse_option(data: &[u8]) -> Result<(NdiscOption<'_>, usize)> {
    if data.len() < 2 {
        return Err(Error::Truncated);
    }
    let kind = NdiscOptionType::from(u8_at(data, option_offsets::TYPE));
    let len = usize::from(u8_at(data, option_offsets::LEN)) * 8;
    if len == 0 {
        return Err(Error::Malformed);
    }
    let Some(opt) = data.get(..len) else {
        return Err(Error::Truncated);
    };
    let option = match (kind, len) {
        (NdiscOptionType::SourceLinkLayerAddr, LLADDR_OPTION_LEN) => {
            NdiscOption::SourceLinkLayerAddr(EthernetAddress(array_at(opt, option_offsets::BODY)))
        }
        (NdiscOptionType::TargetLinkLayerAddr, LLADDR_OPTION_LEN) => {
            NdiscOption::TargetLinkLayerAddr(EthernetAddress(array_at(opt, option_offsets::BODY)))
        }
        (NdiscOptionType::PrefixInformation, PREFIX_OPTION_LEN) => {
            let flags = u8_at(opt, option_offsets::PI_FLAGS);
            NdiscOption::PrefixInformation(PrefixInfo {
                prefix_len: u8_at(opt, option_offsets::PI_PREFIX_LEN),
                on_link: flags & PI_FLAG_ON_LINK != 0,
                autonomous: flags & PI_FLAG_AUTONOMOUS != 0,
                valid_lifetime_s: u32_at(opt, option_offsets::PI_VALID),
                preferred_lifetime_s: u32_at(opt, option_offsets::PI_PREFERRED),
                prefix: Ipv6Addr::from(array_at::<16>(opt, option_offsets::PI_PREFIX)),
            })
        }
        (NdiscOptionType::PrefixInformation, _) => return Err(Error::Malformed),
        (NdiscOptionType::Mtu, MTU_OPTION_LEN) => {
            NdiscOption::Mtu(u32_at(opt, option_offsets::MTU))
        }
        (NdiscOptionType::Mtu, _) => return Err(Error::Malformed),
        (kind, _) => NdiscOption::Unknown {
            kind,
            data: slice(opt, option_offsets::BODY..len),
        },
    };
    Ok((option, len))
}

/// Flags of a neighbour advertisement (RFC 4861 §4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NeighborFlags {
    /// R: the sender is a router.
    pub router: bool,
    /// S: sent in response to a solicitation.
    pub solicited: bool,
    /// O: override an existing cache entry.
    pub override_: bool,
}

const NA_FLAG_ROUTER: u8 = 0x80;
const NA_FLAG_SOLICITED: u8 = 0x40;
const NA_FLAG_OVERRIDE: u8 = 0x20;
const RA_FLAG_MANAGED: u8 = 0x80;
const RA_FLAG_OTHER: u8 = 0x40;

/// Flags of a router advertisement (RFC 4861 §4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RouterFlags {
    /// M: addresses are available via DHCPv6.
    pub managed: bool,
    /// O: other configuration is available via DHCPv6.
    pub other: bool,
}

/// A neighbour discovery message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NdiscRepr {
    /// Router solicitation (§4.1).
    RouterSolicit {
        /// Source link-layer address option.
        lladdr: Option<EthernetAddress>,
    },
    /// Router advertisement (§4.2). Of several prefix options, the first is kept.
    RouterAdvert {
        /// Current hop limit (0 = unspecified).
        hop_limit: u8,
        /// M and O flags.
        flags: RouterFlags,
        /// Router lifetime, seconds.
        router_lifetime_s: u16,
        /// Reachable time, ms.
        reachable_time_ms: u32,
        /// Retransmission timer, ms.
        retrans_time_ms: u32,
        /// Source link-layer address option.
        lladdr: Option<EthernetAddress>,
        /// MTU option.
        mtu: Option<u32>,
        /// First prefix information option.
        prefix_info: Option<PrefixInfo>,
    },
    /// Neighbour solicitation (§4.3).
    NeighborSolicit {
        /// The address being resolved.
        target_addr: Ipv6Addr,
        /// Source link-layer address option.
        lladdr: Option<EthernetAddress>,
    },
    /// Neighbour advertisement (§4.4).
    NeighborAdvert {
        /// R, S, O flags.
        flags: NeighborFlags,
        /// The address advertised.
        target_addr: Ipv6Addr,
        /// Target link-layer address option.
        lladdr: Option<EthernetAddress>,
    },
}

impl NdiscRepr {
    fn parse<T: AsRef<[u8]>>(packet: &Icmpv6Packet<T>, pseudo: &PseudoHeader) -> Result<NdiscRepr> {
        // RFC 4861 §6.1.1, §6.1.2, §7.1.1, §7.1.2: "ICMP Code is 0."
        if packet.code() != 0 {
            return Err(Error::Malformed);
        }
        let mut source_ll = None;
        let mut target_ll = None;
        let mut mtu = None;
        let mut prefix_info = None;
        for option in packet.options() {
            match option? {
                NdiscOption::SourceLinkLayerAddr(a) => source_ll = Some(a),
                NdiscOption::TargetLinkLayerAddr(a) => target_ll = Some(a),
                NdiscOption::Mtu(m) => mtu = Some(m),
                NdiscOption::PrefixInformation(p) if prefix_info.is_none() => prefix_info = Some(p),
                NdiscOption::PrefixInformation(_) | NdiscOption::Unknown { .. } => {}
            }
        }
        let src_unspecified =
            matches!(pseudo, PseudoHeader::V6 { src, .. } if src.is_unspecified());
        Ok(match packet.msg_type() {
            Icmpv6Message::RouterSolicit => {
                // §6.1.1: "If the IP source address is the unspecified address, there is no
                // source link-layer address option in the message."
                if src_unspecified && source_ll.is_some() {
                    return Err(Error::Malformed);
                }
                NdiscRepr::RouterSolicit { lladdr: source_ll }
            }
            Icmpv6Message::RouterAdvert => {
                let flags = packet.ra_flags();
                NdiscRepr::RouterAdvert {
                    hop_limit: packet.ra_hop_limit(),
                    flags: RouterFlags {
                        managed: flags & RA_FLAG_MANAGED != 0,
                        other: flags & RA_FLAG_OTHER != 0,
                    },
                    router_lifetime_s: packet.ra_router_lifetime_s(),
                    reachable_time_ms: packet.ra_reachable_time_ms(),
                    retrans_time_ms: packet.ra_retrans_time_ms(),
                    lladdr: source_ll,
                    mtu,
                    prefix_info,
                }
            }
            Icmpv6Message::NeighborSolicit => {
                let target_addr = packet.target_addr();
                // §7.1.1: "Target Address is not a multicast address." and, from the
                // unspecified address, no source link-layer address option.
                if target_addr.is_multicast() || (src_unspecified && source_ll.is_some()) {
                    return Err(Error::Malformed);
                }
                NdiscRepr::NeighborSolicit {
                    target_addr,
                    lladdr: source_ll,
                }
            }
            Icmpv6Message::NeighborAdvert => {
                let target_addr = packet.target_addr();
                let f = packet.na_flags();
                let flags = NeighborFlags {
                    router: f & NA_FLAG_ROUTER != 0,
                    solicited: f & NA_FLAG_SOLICITED != 0,
                    override_: f & NA_FLAG_OVERRIDE != 0,
                };
                // §7.1.2: "Target Address is not a multicast address." and "If the IP
                // Destination Address is a multicast address the Solicited flag is zero."
                let dst_multicast =
                    matches!(pseudo, PseudoHeader::V6 { dst, .. } if dst.is_multicast());
                if target_addr.is_multicast() || (dst_multicast && flags.solicited) {
                    return Err(Error::Malformed);
                }
                NdiscRepr::NeighborAdvert {
                    flags,
                    target_addr,
                    lladdr: target_ll,
                }
            }
            _ => return Err(Error::Unsupported),
        })
    }

    fn msg_type(&self) -> Icmpv6Message {
        match self {
            NdiscRepr::RouterSolicit { .. } => Icmpv6Message::RouterSolicit,
            NdiscRepr::RouterAdvert { .. } => Icmpv6Message::RouterAdvert,
            NdiscRepr::NeighborSolicit { .. } => Icmpv6Message::NeighborSolicit,
            NdiscRepr::NeighborAdvert { .. } => Icmpv6Message::NeighborAdvert,
        }
    }

    /// Bytes of the message: header, fixed body and options.
    pub fn buffer_len(&self) -> usize {
        let ll = |a: &Option<EthernetAddress>| if a.is_some() { LLADDR_OPTION_LEN } else { 0 };
        match self {
            NdiscRepr::RouterSolicit { lladdr } => offsets::RS_OPTIONS + ll(lladdr),
            NdiscRepr::RouterAdvert {
                lladdr,
                mtu,
                prefix_info,
                ..
            } => {
                offsets::RA_OPTIONS
                    + ll(lladdr)
                    + if mtu.is_some() { MTU_OPTION_LEN } else { 0 }
                    + if prefix_info.is_some() {
                        PREFIX_OPTION_LEN
                    } else {
                        0
                    }
            }
            NdiscRepr::NeighborSolicit { lladdr, .. }
            | NdiscRepr::NeighborAdvert { lladdr, .. } => offsets::ND_OPTIONS + ll(lladdr),
        }
    }

    /// Writes everything but the checksum into `data` (exactly [`Self::buffer_len`] bytes).
    fn emit_body(&self, data: &mut [u8]) {
        set_u8_at(data, offsets::TYPE, self.msg_type().into());
        set_u8_at(data, offsets::CODE, 0);
        set_u32_at(data, offsets::REST, 0);
        let mut at = match *self {
            NdiscRepr::RouterSolicit { .. } => offsets::RS_OPTIONS,
            NdiscRepr::RouterAdvert {
                hop_limit,
                flags,
                router_lifetime_s,
                reachable_time_ms,
                retrans_time_ms,
                ..
            } => {
                set_u8_at(data, offsets::RA_HOP_LIMIT, hop_limit);
                let f = if flags.managed { RA_FLAG_MANAGED } else { 0 }
                    | if flags.other { RA_FLAG_OTHER } else { 0 };
                set_u8_at(data, offsets::RA_FLAGS, f);
                set_u16_at(data, offsets::RA_ROUTER_LIFETIME, router_lifetime_s);
                set_u32_at(data, offsets::RA_REACHABLE_TIME, reachable_time_ms);
                set_u32_at(data, offsets::RA_RETRANS_TIME, retrans_time_ms);
                offsets::RA_OPTIONS
            }
            NdiscRepr::NeighborSolicit { target_addr, .. } => {
                set_bytes_at(data, offsets::ND_TARGET, &target_addr.octets());
                offsets::ND_OPTIONS
            }
            NdiscRepr::NeighborAdvert {
                flags, target_addr, ..
            } => {
                let f = if flags.router { NA_FLAG_ROUTER } else { 0 }
                    | if flags.solicited {
                        NA_FLAG_SOLICITED
                    } else {
                        0
                    }
                    | if flags.override_ { NA_FLAG_OVERRIDE } else { 0 };
                set_u8_at(data, offsets::NA_FLAGS, f);
                set_bytes_at(data, offsets::ND_TARGET, &target_addr.octets());
                offsets::ND_OPTIONS
            }
        };
        let (lladdr, lltype, mtu, prefix_info) = match *self {
            NdiscRepr::RouterSolicit { lladdr } | NdiscRepr::NeighborSolicit { lladdr, .. } => {
                (lladdr, NdiscOptionType::SourceLinkLayerAddr, None, None)
            }
            NdiscRepr::RouterAdvert {
                lladdr,
                mtu,
                prefix_info,
                ..
            } => (
                lladdr,
                NdiscOptionType::SourceLinkLayerAddr,
                mtu,
                prefix_info,
            ),
            NdiscRepr::NeighborAdvert { lladdr, .. } => {
                (lladdr, NdiscOptionType::TargetLinkLayerAddr, None, None)
            }
        };
        if let Some(addr) = lladdr {
            set_u8_at(data, at + option_offsets::TYPE, lltype.into());
            set_u8_at(
                data,
                at + option_offsets::LEN,
                (LLADDR_OPTION_LEN / 8) as u8,
            );
            set_bytes_at(data, at + option_offsets::BODY, addr.as_bytes());
            at += LLADDR_OPTION_LEN;
        }
        if let Some(mtu) = mtu {
            set_u8_at(data, at + option_offsets::TYPE, NdiscOptionType::Mtu.into());
            set_u8_at(data, at + option_offsets::LEN, (MTU_OPTION_LEN / 8) as u8);
            set_u16_at(data, at + option_offsets::BODY, 0);
            set_u32_at(data, at + option_offsets::MTU, mtu);
            at += MTU_OPTION_LEN;
        }
        if let Some(p) = prefix_info {
            set_u8_at(
                data,
                at + option_offsets::TYPE,
                NdiscOptionType::PrefixInformation.into(),
            );
            set_u8_at(
                data,
                at + option_offsets::LEN,
                (PREFIX_OPTION_LEN / 8) as u8,
            );
            set_u8_at(data, at + option_offsets::PI_PREFIX_LEN, p.prefix_len);
            let f = if p.on_link { PI_FLAG_ON_LINK } else { 0 }
                | if p.autonomous { PI_FLAG_AUTONOMOUS } else { 0 };
            set_u8_at(data, at + option_offsets::PI_FLAGS, f);
            set_u32_at(data, at + option_offsets::PI_VALID, p.valid_lifetime_s);
            set_u32_at(
                data,
                at + option_offsets::PI_PREFERRED,
                p.preferred_lifetime_s,
            );
            set_u32_at(data, at + option_offsets::PI_PREFERRED + 4, 0);
            set_bytes_at(data, at + option_offsets::PI_PREFIX, &p.prefix.octets());
        }
    }
}

/// The structured form of an ICMPv6 message; `data` borrows from the parsed buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Icmpv6Repr<'a> {
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
        /// Code.
        code: u8,
        /// As much of the offending packet as fits.
        data: &'a [u8],
    },
    /// Packet too big.
    PacketTooBig {
        /// The next hop's MTU.
        mtu: u32,
        /// As much of the offending packet as fits.
        data: &'a [u8],
    },
    /// Time exceeded.
    TimeExceeded {
        /// Code (0: hop limit exceeded in transit).
        code: u8,
        /// As much of the offending packet as fits.
        data: &'a [u8],
    },
    /// A neighbour discovery message.
    Ndisc(NdiscRepr),
    /// Any other message, kept as is.
    Other {
        /// Type.
        msg_type: Icmpv6Message,
        /// Code.
        code: u8,
        /// The 32 bits after the checksum.
        rest_of_header: u32,
        /// Everything after the 8-byte header.
        data: &'a [u8],
    },
}

impl<'a> Icmpv6Repr<'a> {
    /// Parses a message and checks its checksum against `pseudo`.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(
        packet: &Icmpv6Packet<&'a T>,
        pseudo: &PseudoHeader,
    ) -> Result<Icmpv6Repr<'a>> {
        packet.check_len()?;
        if !packet.verify_checksum(pseudo) {
            return Err(Error::Checksum);
        }
        let buf: &'a [u8] = packet.buffer.as_ref();
        let data = slice(buf, offsets::DATA..buf.len());
        let (ident, seq_no) = (packet.echo_ident(), packet.echo_seq_no());
        let rest = packet.rest_of_header();
        Ok(match (packet.msg_type(), packet.code()) {
            (Icmpv6Message::EchoRequest, 0) => Icmpv6Repr::EchoRequest {
                ident,
                seq_no,
                data,
            },
            (Icmpv6Message::EchoReply, 0) => Icmpv6Repr::EchoReply {
                ident,
                seq_no,
                data,
            },
            (Icmpv6Message::DstUnreachable, code) if rest == 0 => {
                Icmpv6Repr::DstUnreachable { code, data }
            }
            (Icmpv6Message::PacketTooBig, 0) => Icmpv6Repr::PacketTooBig { mtu: rest, data },
            (Icmpv6Message::TimeExceeded, code) if rest == 0 => {
                Icmpv6Repr::TimeExceeded { code, data }
            }
            (
                Icmpv6Message::RouterSolicit
                | Icmpv6Message::RouterAdvert
                | Icmpv6Message::NeighborSolicit
                | Icmpv6Message::NeighborAdvert,
                _,
            ) => Icmpv6Repr::Ndisc(NdiscRepr::parse(packet, pseudo)?),
            (msg_type, code) => Icmpv6Repr::Other {
                msg_type,
                code,
                rest_of_header: rest,
                data,
            },
        })
    }

    /// Bytes this writes.
    pub fn buffer_len(&self) -> usize {
        match self {
            Icmpv6Repr::Ndisc(nd) => nd.buffer_len(),
            Icmpv6Repr::EchoRequest { data, .. }
            | Icmpv6Repr::EchoReply { data, .. }
            | Icmpv6Repr::DstUnreachable { data, .. }
            | Icmpv6Repr::PacketTooBig { data, .. }
            | Icmpv6Repr::TimeExceeded { data, .. }
            | Icmpv6Repr::Other { data, .. } => HEADER_LEN + data.len(),
        }
    }

    /// Writes the message, checksum included, into `packet`, whose buffer must be exactly
    /// [`Self::buffer_len`] bytes.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        packet: &mut Icmpv6Packet<T>,
        pseudo: &PseudoHeader,
    ) -> Result<()> {
        let len = packet.buffer.as_ref().len();
        if len < self.buffer_len() {
            return Err(Error::Truncated);
        }
        if len > self.buffer_len() {
            return Err(Error::Malformed);
        }
        let simple =
            |t: Icmpv6Message, code: u8, rest: u32, data: &[u8], p: &mut Icmpv6Packet<T>| {
                p.set_msg_type(t);
                p.set_code(code);
                p.set_rest_of_header(rest);
                set_bytes_at(p.buffer.as_mut(), offsets::DATA, data);
            };
        let echo = |ident: u16, seq: u16| (u32::from(ident) << 16) | u32::from(seq);
        match *self {
            Icmpv6Repr::EchoRequest {
                ident,
                seq_no,
                data,
            } => simple(
                Icmpv6Message::EchoRequest,
                0,
                echo(ident, seq_no),
                data,
                packet,
            ),
            Icmpv6Repr::EchoReply {
                ident,
                seq_no,
                data,
            } => simple(
                Icmpv6Message::EchoReply,
                0,
                echo(ident, seq_no),
                data,
                packet,
            ),
            Icmpv6Repr::DstUnreachable { code, data } => {
                simple(Icmpv6Message::DstUnreachable, code, 0, data, packet)
            }
            Icmpv6Repr::PacketTooBig { mtu, data } => {
                simple(Icmpv6Message::PacketTooBig, 0, mtu, data, packet)
            }
            Icmpv6Repr::TimeExceeded { code, data } => {
                simple(Icmpv6Message::TimeExceeded, code, 0, data, packet)
            }
            Icmpv6Repr::Other {
                msg_type,
                code,
                rest_of_header,
                data,
            } => simple(msg_type, code, rest_of_header, data, packet),
            Icmpv6Repr::Ndisc(nd) => nd.emit_body(packet.buffer.as_mut()),
        }
        packet.fill_checksum(pseudo);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipv6::{Ipv6Packet, Ipv6Repr};
    use crate::testutil::{poisoned, POISON};
    use proptest::prelude::*;

    /// A neighbour solicitation as Linux sends it to resolve fe80::1 (IPv6 header + ICMPv6).
    const NS_PACKET: [u8; 72] = [
        // IPv6
        0x60, 0x00, 0x00, 0x00, // version 6, traffic class 0, flow label 0
        0x00, 0x20, // payload length 32
        0x3a, // next header: ICMPv6
        0xff, // hop limit 255
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x50, 0x54, 0x00, 0xff, 0xfe, 0x12, 0x34,
        0x56, // src fe80::5054:ff:fe12:3456
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0xff, 0x00, 0x00,
        0x01, // dst ff02::1:ff00:1 (solicited-node)
        // ICMPv6
        0x87, // type 135: neighbour solicitation
        0x00, // code 0
        0x00, 0x00, // checksum (filled in by `ns_packet()`)
        0x00, 0x00, 0x00, 0x00, // reserved
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // target fe80::1
        0x01, // option: source link-layer address
        0x01, // length 1 (8 bytes)
        0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // 52:54:00:12:34:56
    ];

    fn ns_pseudo() -> PseudoHeader {
        PseudoHeader::V6 {
            src: "fe80::5054:ff:fe12:3456".parse().unwrap(),
            dst: "ff02::1:ff00:1".parse().unwrap(),
        }
    }

    /// The capture with its checksum, computed independently by etherparse.
    fn ns_packet() -> [u8; 72] {
        let mut b = NS_PACKET;
        let ip = etherparse::Ipv6Header::from_slice(&b).unwrap().0;
        let icmp = etherparse::Icmpv6Header::from_slice(&b[40..]).unwrap().0;
        let c = icmp
            .icmp_type
            .calc_checksum(ip.source, ip.destination, &b[48..])
            .unwrap();
        b[42..44].copy_from_slice(&c.to_be_bytes());
        b
    }

    #[test]
    fn captured_neighbor_solicitation_parses_every_field() {
        let b = ns_packet();
        let ip = Ipv6Packet::new_checked(&b[..]).unwrap();
        let ip_repr = Ipv6Repr::parse(&ip).unwrap();
        assert_eq!(ip_repr.hop_limit, NDISC_HOP_LIMIT);
        assert_eq!(ip_repr.next_header, IpProtocol::Icmpv6);
        let p = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(p.msg_type(), Icmpv6Message::NeighborSolicit);
        assert_eq!(p.code(), 0);
        assert!(p.verify_checksum(&ns_pseudo()));
        assert_eq!(p.target_addr(), "fe80::1".parse::<Ipv6Addr>().unwrap());
        let options: Vec<_> = p.options().collect();
        let mac = EthernetAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        assert_eq!(options, vec![Ok(NdiscOption::SourceLinkLayerAddr(mac))]);
        assert_eq!(
            Icmpv6Repr::parse(&p, &ns_pseudo()),
            Ok(Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
                target_addr: "fe80::1".parse().unwrap(),
                lladdr: Some(mac),
            }))
        );
    }

    #[test]
    fn emit_reproduces_the_capture_into_a_poisoned_buffer() {
        let b = ns_packet();
        let repr =
            Icmpv6Repr::parse(&Icmpv6Packet::new_checked(&b[40..]).unwrap(), &ns_pseudo()).unwrap();
        let mut buf = poisoned(repr.buffer_len() + 5);
        let (msg, tail) = buf.split_at_mut(repr.buffer_len());
        repr.emit(&mut Icmpv6Packet::new_unchecked(&mut *msg), &ns_pseudo())
            .unwrap();
        assert_eq!(&*msg, &b[40..]);
        assert!(tail.iter().all(|&x| x == POISON));
    }

    /// A router advertisement with source link-layer address, MTU and prefix options.
    const RA: [u8; 64] = [
        0x86, 0x00, 0x00, 0x00, // type 134, code 0, checksum (filled in)
        0x40, // current hop limit 64
        0xc0, // flags M, O
        0x07, 0x08, // router lifetime 1800 s
        0x00, 0x00, 0x75, 0x30, // reachable time 30000 ms
        0x00, 0x00, 0x03, 0xe8, // retrans timer 1000 ms
        0x01, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00,
        0x01, // source link-layer address 02:00:00:00:00:01
        0x05, 0x01, 0x00, 0x00, 0x00, 0x00, 0x05, 0xdc, // MTU 1500
        0x03, 0x04, // prefix information, length 4 (32 bytes)
        0x40, // prefix length 64
        0xc0, // flags L, A
        0x00, 0x27, 0x8d, 0x00, // valid lifetime 2592000 s
        0x00, 0x09, 0x3a, 0x80, // preferred lifetime 604800 s
        0x00, 0x00, 0x00, 0x00, // reserved
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // prefix 2001:db8::
    ];

    fn ra_pseudo() -> PseudoHeader {
        PseudoHeader::V6 {
            src: "fe80::1".parse().unwrap(),
            dst: "ff02::1".parse().unwrap(),
        }
    }

    #[test]
    fn router_advertisement_parses_with_all_its_options() {
        let mut b = RA;
        Icmpv6Packet::new_unchecked(&mut b[..]).fill_checksum(&ra_pseudo());
        let p = Icmpv6Packet::new_checked(&b[..]).unwrap();
        assert_eq!(
            (p.ra_hop_limit(), p.ra_flags(), p.ra_router_lifetime_s()),
            (64, 0xc0, 1800)
        );
        assert_eq!(
            (p.ra_reachable_time_ms(), p.ra_retrans_time_ms()),
            (30000, 1000)
        );
        let repr = Icmpv6Repr::parse(&p, &ra_pseudo()).unwrap();
        let expected = Icmpv6Repr::Ndisc(NdiscRepr::RouterAdvert {
            hop_limit: 64,
            flags: RouterFlags {
                managed: true,
                other: true,
            },
            router_lifetime_s: 1800,
            reachable_time_ms: 30000,
            retrans_time_ms: 1000,
            lladdr: Some(EthernetAddress([2, 0, 0, 0, 0, 1])),
            mtu: Some(1500),
            prefix_info: Some(PrefixInfo {
                prefix_len: 64,
                on_link: true,
                autonomous: true,
                valid_lifetime_s: 2_592_000,
                preferred_lifetime_s: 604_800,
                prefix: "2001:db8::".parse().unwrap(),
            }),
        });
        assert_eq!(repr, expected);
        let mut out = poisoned(repr.buffer_len());
        repr.emit(&mut Icmpv6Packet::new_unchecked(&mut out[..]), &ra_pseudo())
            .unwrap();
        assert_eq!(out, b);
    }

    #[test]
    fn router_solicitation_and_neighbor_advertisement_parse() {
        let rs = Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit { lladdr: None });
        let pseudo = PseudoHeader::V6 {
            src: Ipv6Addr::UNSPECIFIED,
            dst: "ff02::2".parse().unwrap(),
        };
        let mut b = poisoned(rs.buffer_len());
        rs.emit(&mut Icmpv6Packet::new_unchecked(&mut b[..]), &pseudo)
            .unwrap();
        assert_eq!(&b[..8], &[133, 0, b[2], b[3], 0, 0, 0, 0]);
        assert_eq!(
            Icmpv6Repr::parse(&Icmpv6Packet::new_checked(&b[..]).unwrap(), &pseudo),
            Ok(rs)
        );

        let na = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            flags: NeighborFlags {
                router: true,
                solicited: true,
                override_: false,
            },
            target_addr: "2001:db8::1".parse().unwrap(),
            lladdr: Some(EthernetAddress([2, 0, 0, 0, 0, 9])),
        });
        let pseudo = PseudoHeader::V6 {
            src: "2001:db8::1".parse().unwrap(),
            dst: "2001:db8::2".parse().unwrap(),
        };
        let mut b = poisoned(na.buffer_len());
        na.emit(&mut Icmpv6Packet::new_unchecked(&mut b[..]), &pseudo)
            .unwrap();
        assert_eq!(b[4], 0xc0, "R and S");
        assert_eq!(&b[24..26], &[2, 1], "target link-layer address option");
        assert_eq!(
            Icmpv6Repr::parse(&Icmpv6Packet::new_checked(&b[..]).unwrap(), &pseudo),
            Ok(na)
        );
        // Solicited NA to a multicast destination is invalid (RFC 4861 §7.1.2).
        let mcast = PseudoHeader::V6 {
            src: "2001:db8::1".parse().unwrap(),
            dst: "ff02::1".parse().unwrap(),
        };
        na.emit(&mut Icmpv6Packet::new_unchecked(&mut b[..]), &mcast)
            .unwrap();
        assert_eq!(
            Icmpv6Repr::parse(&Icmpv6Packet::new_checked(&b[..]).unwrap(), &mcast),
            Err(Error::Malformed)
        );
    }

    #[test]
    fn bad_nd_messages_are_rejected() {
        // An option of length zero (RFC 4861 §4.6).
        let mut b = ns_packet()[40..].to_vec();
        b[25] = 0;
        Icmpv6Packet::new_unchecked(&mut b[..]).fill_checksum(&ns_pseudo());
        assert_eq!(
            Icmpv6Repr::parse(&Icmpv6Packet::new_checked(&b[..]).unwrap(), &ns_pseudo()),
            Err(Error::Malformed)
        );
        // A non-zero code.
        let mut b = ns_packet()[40..].to_vec();
        b[1] = 1;
        Icmpv6Packet::new_unchecked(&mut b[..]).fill_checksum(&ns_pseudo());
        assert_eq!(
            Icmpv6Repr::parse(&Icmpv6Packet::new_checked(&b[..]).unwrap(), &ns_pseudo()),
            Err(Error::Malformed)
        );
        // A multicast target.
        let mut b = ns_packet()[40..].to_vec();
        b[8] = 0xff;
        Icmpv6Packet::new_unchecked(&mut b[..]).fill_checksum(&ns_pseudo());
        assert_eq!(
            Icmpv6Repr::parse(&Icmpv6Packet::new_checked(&b[..]).unwrap(), &ns_pseudo()),
            Err(Error::Malformed)
        );
        // A source link-layer address from the unspecified address (DAD).
        let dad = PseudoHeader::V6 {
            src: Ipv6Addr::UNSPECIFIED,
            dst: "ff02::1:ff00:1".parse().unwrap(),
        };
        let mut b = ns_packet()[40..].to_vec();
        Icmpv6Packet::new_unchecked(&mut b[..]).fill_checksum(&dad);
        assert_eq!(
            Icmpv6Repr::parse(&Icmpv6Packet::new_checked(&b[..]).unwrap(), &dad),
            Err(Error::Malformed)
        );
        // A wrong checksum.
        let mut b = ns_packet()[40..].to_vec();
        b[30] ^= 1;
        assert_eq!(
            Icmpv6Repr::parse(&Icmpv6Packet::new_checked(&b[..]).unwrap(), &ns_pseudo()),
            Err(Error::Checksum)
        );
    }

    #[test]
    fn truncated_inputs_are_errors_at_every_length() {
        let b = ns_packet();
        for len in 0..32 {
            let msg = &b[40..40 + len];
            let result =
                Icmpv6Packet::new_checked(msg).and_then(|p| Icmpv6Repr::parse(&p, &ns_pseudo()));
            assert!(result.is_err(), "len {len}");
            if len < 24 {
                assert_eq!(Icmpv6Packet::new_checked(msg).err(), Some(Error::Truncated));
            }
        }
        // An option cut short is Truncated even with a right checksum.
        let mut cut = b[40..70].to_vec();
        Icmpv6Packet::new_unchecked(&mut cut[..]).fill_checksum(&ns_pseudo());
        assert_eq!(
            Icmpv6Repr::parse(&Icmpv6Packet::new_checked(&cut[..]).unwrap(), &ns_pseudo()),
            Err(Error::Truncated)
        );
    }

    #[test]
    fn echo_and_errors_round_trip_and_etherparse_agrees() {
        let pseudo = PseudoHeader::V6 {
            src: "2001:db8::1".parse().unwrap(),
            dst: "2001:db8::2".parse().unwrap(),
        };
        let payload = [0xab; 20];
        for repr in [
            Icmpv6Repr::EchoRequest {
                ident: 7,
                seq_no: 9,
                data: &payload,
            },
            Icmpv6Repr::EchoReply {
                ident: 7,
                seq_no: 9,
                data: &payload,
            },
            Icmpv6Repr::PacketTooBig {
                mtu: 1280,
                data: &payload,
            },
            Icmpv6Repr::DstUnreachable {
                code: 4,
                data: &payload,
            },
            Icmpv6Repr::TimeExceeded {
                code: 0,
                data: &payload,
            },
        ] {
            let mut b = poisoned(repr.buffer_len());
            repr.emit(&mut Icmpv6Packet::new_unchecked(&mut b[..]), &pseudo)
                .unwrap();
            assert_eq!(
                Icmpv6Repr::parse(&Icmpv6Packet::new_checked(&b[..]).unwrap(), &pseudo),
                Ok(repr)
            );
            let (h, rest) = etherparse::Icmpv6Header::from_slice(&b).unwrap();
            let PseudoHeader::V6 { src, dst } = pseudo else {
                unreachable!()
            };
            assert_eq!(
                h.icmp_type
                    .calc_checksum(src.octets(), dst.octets(), rest)
                    .unwrap(),
                h.checksum
            );
        }
    }

    fn arb_ndisc() -> impl Strategy<Value = NdiscRepr> {
        let mac = proptest::option::of(any::<[u8; 6]>().prop_map(EthernetAddress));
        let unicast = any::<[u8; 16]>().prop_map(|mut a| {
            a[0] &= 0xfe; // never 0xff: not multicast
            Ipv6Addr::from(a)
        });
        let prefix = proptest::option::of(
            (
                any::<u8>(),
                any::<bool>(),
                any::<bool>(),
                any::<u32>(),
                any::<u32>(),
                any::<[u8; 16]>(),
            )
                .prop_map(
                    |(
                        prefix_len,
                        on_link,
                        autonomous,
                        valid_lifetime_s,
                        preferred_lifetime_s,
                        p,
                    )| PrefixInfo {
                        prefix_len,
                        on_link,
                        autonomous,
                        valid_lifetime_s,
                        preferred_lifetime_s,
                        prefix: p.into(),
                    },
                ),
        );
        prop_oneof![
            mac.clone()
                .prop_map(|lladdr| NdiscRepr::RouterSolicit { lladdr }),
            (
                any::<u8>(),
                any::<(bool, bool)>(),
                any::<u16>(),
                any::<u32>(),
                any::<u32>(),
                mac.clone(),
                any::<Option<u32>>(),
                prefix
            )
                .prop_map(
                    |(hop_limit, (m, o), rl, rt, rx, lladdr, mtu, prefix_info)| {
                        NdiscRepr::RouterAdvert {
                            hop_limit,
                            flags: RouterFlags {
                                managed: m,
                                other: o,
                            },
                            router_lifetime_s: rl,
                            reachable_time_ms: rt,
                            retrans_time_ms: rx,
                            lladdr,
                            mtu,
                            prefix_info,
                        }
                    }
                ),
            (unicast.clone(), mac.clone()).prop_map(|(target_addr, lladdr)| {
                NdiscRepr::NeighborSolicit {
                    target_addr,
                    lladdr,
                }
            }),
            (any::<(bool, bool, bool)>(), unicast, mac).prop_map(
                |((r, s, o), target_addr, lladdr)| NdiscRepr::NeighborAdvert {
                    flags: NeighborFlags {
                        router: r,
                        solicited: s,
                        override_: o
                    },
                    target_addr,
                    lladdr,
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn ndisc_reprs_round_trip(nd in arb_ndisc()) {
            let pseudo = PseudoHeader::V6 { src: "fe80::1".parse().unwrap(), dst: "fe80::2".parse().unwrap() };
            let repr = Icmpv6Repr::Ndisc(nd);
            let mut b = poisoned(repr.buffer_len());
            repr.emit(&mut Icmpv6Packet::new_unchecked(&mut b[..]), &pseudo).unwrap();
            // Every byte is written: a zeroed buffer comes out the same as a poisoned one.
            let mut z = vec![0u8; repr.buffer_len()];
            repr.emit(&mut Icmpv6Packet::new_unchecked(&mut z[..]), &pseudo).unwrap();
            prop_assert_eq!(&z, &b);
            prop_assert_eq!(Icmpv6Repr::parse(&Icmpv6Packet::new_checked(&b[..]).unwrap(), &pseudo), Ok(repr));
        }

        #[test]
        fn other_messages_round_trip(t in any::<u8>(), code in any::<u8>(), rest in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..40usize)) {
            prop_assume!(!matches!(t, 1..=3 | 128 | 129 | 133..=136));
            let pseudo = PseudoHeader::V6 { src: "2001:db8::1".parse().unwrap(), dst: "2001:db8::2".parse().unwrap() };
            let repr = Icmpv6Repr::Other { msg_type: Icmpv6Message::from(t), code, rest_of_header: rest, data: &data };
            let mut b = poisoned(repr.buffer_len());
            repr.emit(&mut Icmpv6Packet::new_unchecked(&mut b[..]), &pseudo).unwrap();
            prop_assert_eq!(Icmpv6Repr::parse(&Icmpv6Packet::new_checked(&b[..]).unwrap(), &pseudo), Ok(repr));
        }

        #[test]
        fn random_bytes_never_panic(mut data in proptest::collection::vec(any::<u8>(), 0..96usize), t in prop::sample::select(vec![1u8, 2, 3, 128, 129, 133, 134, 135, 136, 137, 200])) {
            if let Some(first) = data.first_mut() { *first = t; }
            let pseudo = PseudoHeader::V6 { src: "fe80::1".parse().unwrap(), dst: "ff02::1".parse().unwrap() };
            // With a right checksum, so the parser gets past it and into the bodies and options.
            if data.len() >= 4 { Icmpv6Packet::new_unchecked(&mut data[..]).fill_checksum(&pseudo); }
            let p = Icmpv6Packet::new_unchecked(&data[..]);
            let _ = (p.msg_type(), p.code(), p.rest_of_header(), p.target_addr(), p.ra_flags(), p.mtu());
            for o in p.options() { let _ = o; }
            if let Ok(p) = Icmpv6Packet::new_checked(&data[..]) {
                if let Ok(repr) = Icmpv6Repr::parse(&p, &pseudo) {
                    // What parses re-emits to a valid message of its own size.
                    let mut b = vec![0; repr.buffer_len()];
                    repr.emit(&mut Icmpv6Packet::new_unchecked(&mut b[..]), &pseudo).unwrap();
                    prop_assert!(Icmpv6Packet::new_unchecked(&b[..]).verify_checksum(&pseudo));
                }
            }
        }
    }
}
