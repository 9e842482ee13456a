//! The generator's frames: Ethernet / IPv4 or IPv6 / UDP carrying a 16-byte probe.
//!
//! Frames are built once per (flow, size) with the wire crate's emitters ([`Template::build`];
//! etherparse re-reads them in the tests); per packet only
//! the probe's sequence number and send timestamp are written ([`Template::write`]) and the UDP
//! checksum is finished from a partial sum kept with the template (the template's checksum was
//! computed with both fields zero, so adding their 16-bit words is the whole update, RFC 1624).
//! No allocation and no formatting per packet; [`parse`] is the receiver's side.
//!
//! Probe layout, at the start of the UDP payload (all big-endian, every field 16-bit aligned
//! relative to the UDP header so the checksum update works on whole words):
//!
//! ```text
//!  0..2   magic 0x4d47 ("MG")
//!  2..4   flow id
//!  4..8   sequence number within the flow (wraps; the receiver unwraps it)
//!  8..16  send time, CLOCK_MONOTONIC nanoseconds
//! ```
//!
//! Frame sizes follow RFC 2544: a "64-byte frame" counts the 4-byte FCS the NIC appends, so its
//! buffer is 60 bytes. 60 bytes hold Ethernet (14) + IPv4 (20) + UDP (8) + the probe (16) with 2
//! bytes to spare; IPv6 (40-byte header) needs at least 82.

use std::net::IpAddr;

use mimiq_dataplane::wire::checksum::{PseudoHeader, Sum};
use mimiq_dataplane::wire::ethernet::HEADER_LEN as ETH_LEN;
use mimiq_dataplane::wire::ipv4::MIN_HEADER_LEN as IPV4_LEN;
use mimiq_dataplane::wire::ipv6::HEADER_LEN as IPV6_LEN;
use mimiq_dataplane::wire::udp::HEADER_LEN as UDP_LEN;
use mimiq_dataplane::wire::{
    EtherType, EthernetAddress, EthernetFrame, EthernetRepr, IpProtocol, Ipv4Packet, Ipv4Repr,
    Ipv6Packet, Ipv6Repr, UdpPacket, UdpRepr,
};

/// Magic number at the start of every probe.
pub const MAGIC: u16 = 0x4d47;
/// Bytes of the probe.
pub const PROBE_LEN: usize = 16;
/// The FCS the NIC appends, counted in frame sizes but not in buffers.
pub const FCS_LEN: usize = 4;
/// Largest frame (with FCS) on a 1500-byte MTU link.
pub const MAX_FRAME_LEN: usize = 1518;

const UDP_CHECKSUM_OFFSET: usize = 6;
const PROBE_SEQ_OFFSET: usize = 4;
const PROBE_TIME_OFFSET: usize = 8;

/// The smallest frame (with FCS) that carries a probe.
pub fn min_frame_len(ipv6: bool) -> usize {
    let ip = if ipv6 { IPV6_LEN } else { IPV4_LEN };
    (ETH_LEN + ip + UDP_LEN + PROBE_LEN + FCS_LEN).max(64)
}

/// The addresses and ports of one flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowAddrs {
    /// Ethernet source.
    pub src_mac: [u8; 6],
    /// Ethernet destination.
    pub dst_mac: [u8; 6],
    /// IP source (same family as `dst_ip`).
    pub src_ip: IpAddr,
    /// IP destination.
    pub dst_ip: IpAddr,
    /// UDP source port.
    pub src_port: u16,
    /// UDP destination port.
    pub dst_port: u16,
}

/// Why a template could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// Source and destination of different families.
    #[error("source {0} and destination {1} are not of the same IP version")]
    MixedFamilies(IpAddr, IpAddr),
    /// The frame size cannot hold the headers and the probe, or exceeds the MTU.
    #[error("frame size {len} bytes is outside {min}..={max} for {family}")]
    BadSize {
        len: usize,
        min: usize,
        max: usize,
        family: &'static str,
    },
}

/// A prebuilt frame of one flow and one size.
#[derive(Debug, Clone)]
pub struct Template {
    /// Headers and the probe (sequence number and time zero); the rest of the frame is zeros.
    head: Vec<u8>,
    /// Buffer length of the frame (without FCS).
    len: usize,
    /// Offset of the UDP header.
    udp: usize,
    /// One's-complement sum of the pseudo-header and segment with sequence and time zero.
    partial: Sum,
}

impl Template {
    /// Builds the frame of `flow` (written into the probe) with `frame_len` bytes including FCS.
    pub fn build(
        addrs: &FlowAddrs,
        flow: u16,
        frame_len: usize,
    ) -> Result<Template, TemplateError> {
        let ipv6 = addrs.dst_ip.is_ipv6();
        let (min, max) = (min_frame_len(ipv6), MAX_FRAME_LEN);
        if !(min..=max).contains(&frame_len) {
            return Err(TemplateError::BadSize {
                len: frame_len,
                min,
                max,
                family: if ipv6 { "IPv6" } else { "IPv4" },
            });
        }
        let len = frame_len - FCS_LEN;
        let (ethertype, udp, pseudo) = match (addrs.src_ip, addrs.dst_ip) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => (
                EtherType::Ipv4,
                ETH_LEN + IPV4_LEN,
                PseudoHeader::V4 { src, dst },
            ),
            (IpAddr::V6(src), IpAddr::V6(dst)) => (
                EtherType::Ipv6,
                ETH_LEN + IPV6_LEN,
                PseudoHeader::V6 { src, dst },
            ),
            (s, d) => return Err(TemplateError::MixedFamilies(s, d)),
        };
        // The sizes were checked above, so every emit below has room and fits its length
        // fields; the buffer is sized exactly.
        let mut frame = vec![0u8; len];
        let (eth, rest) = frame.split_at_mut(ETH_LEN);
        let eth_repr = EthernetRepr {
            src_addr: EthernetAddress(addrs.src_mac),
            dst_addr: EthernetAddress(addrs.dst_mac),
            vlan_tci: None,
            ethertype,
        };
        let _ = eth_repr.emit(&mut EthernetFrame::new_unchecked(eth));
        let (ip, datagram) = rest.split_at_mut(udp - ETH_LEN);
        let udp_len = datagram.len() as u16;
        match pseudo {
            PseudoHeader::V4 { src, dst } => {
                let repr = Ipv4Repr {
                    src_addr: src,
                    dst_addr: dst,
                    next_header: IpProtocol::Udp,
                    payload_len: udp_len,
                    ttl: 64,
                    dscp: 0,
                    ecn: 0,
                    ident: 0,
                    dont_frag: true,
                };
                let _ = repr.emit(&mut Ipv4Packet::new_unchecked(ip));
            }
            PseudoHeader::V6 { src, dst } => {
                let repr = Ipv6Repr {
                    src_addr: src,
                    dst_addr: dst,
                    next_header: IpProtocol::Udp,
                    payload_len: udp_len,
                    hop_limit: 64,
                    traffic_class: 0,
                    flow_label: 0,
                };
                let _ = repr.emit(&mut Ipv6Packet::new_unchecked(ip));
            }
        }
        let mut datagram = UdpPacket::new_unchecked(datagram);
        let repr = UdpRepr {
            src_port: addrs.src_port,
            dst_port: addrs.dst_port,
            payload_len: udp_len - UDP_LEN as u16,
        };
        let _ = repr.emit(&mut datagram);
        let payload = datagram.payload_mut();
        payload[0..2].copy_from_slice(&MAGIC.to_be_bytes());
        payload[2..4].copy_from_slice(&flow.to_be_bytes());
        // The sum with sequence and time zero: what `write` finishes per packet.
        let partial = pseudo
            .sum(IpProtocol::Udp, u32::from(udp_len))
            .add_bytes(datagram.into_inner());
        frame.truncate(udp + UDP_LEN + PROBE_LEN);
        Ok(Template {
            head: frame,
            len,
            udp,
            partial,
        })
    }

    /// Buffer length of the frame, without FCS.
    #[allow(clippy::len_without_is_empty)] // a frame is never empty
    pub fn len(&self) -> usize {
        self.len
    }

    /// Frame length with FCS, as sizes are counted.
    pub fn frame_len(&self) -> usize {
        self.len + FCS_LEN
    }

    /// Writes the frame into `buf` (exactly [`Template::len`] bytes) with `seq` and `time_ns`
    /// in the probe and a valid UDP checksum.
    #[inline]
    pub fn write(&self, buf: &mut [u8], seq: u32, time_ns: u64) {
        let head = self.head.len();
        buf[..head].copy_from_slice(&self.head);
        buf[head..self.len].fill(0);
        let probe = self.udp + UDP_LEN;
        buf[probe + PROBE_SEQ_OFFSET..probe + PROBE_SEQ_OFFSET + 4]
            .copy_from_slice(&seq.to_be_bytes());
        buf[probe + PROBE_TIME_OFFSET..probe + PROBE_TIME_OFFSET + 8]
            .copy_from_slice(&time_ns.to_be_bytes());
        let sum = self
            .partial
            .add_u32(seq)
            .add_u32((time_ns >> 32) as u32)
            .add_u32(time_ns as u32);
        // A computed 0 is sent as 0xffff (RFC 768; for IPv6 0 would mean "no checksum", which
        // RFC 8200 §8.1 forbids).
        let checksum = match sum.checksum() {
            0 => 0xffff,
            c => c,
        };
        let at = self.udp + UDP_CHECKSUM_OFFSET;
        buf[at..at + 2].copy_from_slice(&checksum.to_be_bytes());
    }
}

/// What the receiver reads from a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Flow id.
    pub flow: u16,
    /// Sequence number within the flow.
    pub seq: u32,
    /// Send time, CLOCK_MONOTONIC ns.
    pub time_ns: u64,
}

/// The probe in `frame`, if it is a generator frame (Ethernet, IPv4 without fragmentation or
/// IPv6 without extension headers, UDP, magic). Never panics, whatever the bytes.
#[inline]
pub fn parse(frame: &[u8]) -> Option<Probe> {
    let packet = frame.get(ETH_LEN..)?;
    let udp = match EthernetFrame::new_unchecked(frame).ethertype() {
        EtherType::Ipv4 => {
            let ip = Ipv4Packet::new_unchecked(packet);
            let header_len = usize::from(ip.header_len());
            // A fragment (more fragments, or an offset) holds no whole probe where one would be.
            if packet.len() < IPV4_LEN
                || header_len < IPV4_LEN
                || ip.is_fragment()
                || ip.next_header() != IpProtocol::Udp
            {
                return None;
            }
            ETH_LEN + header_len
        }
        EtherType::Ipv6 => {
            if packet.len() < IPV6_LEN
                || Ipv6Packet::new_unchecked(packet).next_header() != IpProtocol::Udp
            {
                return None;
            }
            ETH_LEN + IPV6_LEN
        }
        _ => return None,
    };
    let p = frame.get(udp + UDP_LEN..udp + UDP_LEN + PROBE_LEN)?;
    if u16::from_be_bytes([p[0], p[1]]) != MAGIC {
        return None;
    }
    Some(Probe {
        flow: u16::from_be_bytes([p[2], p[3]]),
        seq: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
        time_ns: u64::from_be_bytes([p[8], p[9], p[10], p[11], p[12], p[13], p[14], p[15]]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    fn addrs(v6: bool) -> FlowAddrs {
        let (src_ip, dst_ip) = if v6 {
            ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap())
        } else {
            ("198.18.0.1".parse().unwrap(), "198.18.0.2".parse().unwrap())
        };
        FlowAddrs {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_ip,
            dst_ip,
            src_port: 10000,
            dst_port: 20000,
        }
    }

    /// The UDP checksum etherparse computes over the frame as it is.
    fn recomputed_checksum(frame: &[u8]) -> (u16, u16) {
        let p = SlicedPacket::from_ethernet(frame).unwrap();
        let Some(TransportSlice::Udp(udp)) = p.transport else {
            panic!("not UDP")
        };
        let header = udp.to_header();
        let want = match p.net.unwrap() {
            NetSlice::Ipv4(ip) => header
                .calc_checksum_ipv4_raw(
                    ip.header().source(),
                    ip.header().destination(),
                    udp.payload(),
                )
                .unwrap(),
            NetSlice::Ipv6(ip) => header
                .calc_checksum_ipv6_raw(
                    ip.header().source(),
                    ip.header().destination(),
                    udp.payload(),
                )
                .unwrap(),
            _ => panic!("no IP"),
        };
        (udp.checksum(), want)
    }

    #[test]
    fn written_frames_carry_the_probe_and_a_valid_udp_checksum_for_both_families() {
        for v6 in [false, true] {
            for size in [min_frame_len(v6), 64.max(min_frame_len(v6)), 576, 1518] {
                let t = Template::build(&addrs(v6), 7, size).unwrap();
                assert_eq!(t.frame_len(), size);
                // Poisoned buffer: the padding must come out zero.
                let mut buf = vec![0xa5u8; t.len()];
                for (seq, time) in [
                    (0, 0),
                    (1, 1),
                    (0xffff_ffff, u64::MAX),
                    (0x1234_5678, 0xdead_beef_0bad_f00d),
                ] {
                    t.write(&mut buf, seq, time);
                    let (got, want) = recomputed_checksum(&buf);
                    assert_eq!(
                        got,
                        if want == 0 { 0xffff } else { want },
                        "v6={v6} size={size} seq={seq}"
                    );
                    assert_eq!(
                        parse(&buf),
                        Some(Probe {
                            flow: 7,
                            seq,
                            time_ns: time
                        })
                    );
                }
            }
        }
    }

    #[test]
    fn sizes_outside_the_family_range_and_mixed_families_are_refused() {
        assert!(Template::build(&addrs(false), 0, 63).is_err());
        assert!(Template::build(&addrs(true), 0, 81).is_err());
        assert!(Template::build(&addrs(true), 0, 82).is_ok());
        assert!(Template::build(&addrs(false), 0, 1519).is_err());
        let mut mixed = addrs(false);
        mixed.dst_ip = "fd00::2".parse().unwrap();
        assert!(matches!(
            Template::build(&mixed, 0, 128),
            Err(TemplateError::MixedFamilies(..))
        ));
    }

    #[test]
    fn parse_never_panics_on_truncated_or_foreign_frames() {
        let t = Template::build(&addrs(false), 1, 64).unwrap();
        let mut buf = vec![0u8; t.len()];
        t.write(&mut buf, 5, 6);
        for n in 0..buf.len() {
            let got = parse(&buf[..n]);
            assert!(got.is_none() || n >= 58, "truncated at {n}: {got:?}");
        }
        let mut other = buf.clone();
        other[14 + 20 + 8] ^= 1; // magic
        assert_eq!(parse(&other), None);
        let mut tcp = buf.clone();
        tcp[14 + 9] = 6;
        assert_eq!(parse(&tcp), None);
        for frag in [0x2000u16, 0x0001, 0x1fff] {
            // More fragments, or an offset: a fragment, not a probe.
            let mut f = buf.clone();
            f[14 + 6..14 + 8].copy_from_slice(&frag.to_be_bytes());
            assert_eq!(parse(&f), None, "{frag:#x}");
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let n = (seed % 100) as usize;
            let bytes: Vec<u8> = (0..n).map(|i| (seed >> (i % 8 * 8)) as u8).collect();
            let _ = parse(&bytes);
        }
    }
}
