//! A layer-3 TUN device (no packet-information header), non-blocking, for the proxy's CONNECT-IP
//! egress and the client's tunnel. Opening and configuring it is the `tun` crate's job; addresses
//! and routes go through [`crate::netcfg`].
//!
//! The proxy opens its device with a virtio-net header ([`TunDevice::create_with_vnet_hdr`]) so
//! that [`TcpCoalescer`] can hand the kernel consecutive TCP segments of one flow as one GSO
//! write (the kernel segments it again on the way out): one `write(2)` and one pass through the
//! proxy host's forwarding for up to 64 KB instead of per packet. Threading: none; a device and
//! a coalescer belong to one event loop. Panics: none (every length is checked before use).

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use mimiq_wire::checksum::{checksum, Sum};

/// An open TUN device.
pub struct TunDevice {
    dev: tun::Device,
    name: String,
}

impl TunDevice {
    /// Creates (or attaches to) the TUN device `name`, sets its MTU and brings it up.
    pub fn create(name: &str, mtu: usize) -> io::Result<TunDevice> {
        Self::open(name, mtu, false)
    }

    /// Like [`TunDevice::create`], with `IFF_VNET_HDR`: every packet read or written starts with
    /// a [`VNET_HDR_LEN`]-byte virtio-net header. Without `TUNSETOFFLOAD` the kernel still hands
    /// over whole packets with their checksums done (header all zero); writes may be GSO
    /// packets ([`TcpCoalescer`]).
    pub fn create_with_vnet_hdr(name: &str, mtu: usize) -> io::Result<TunDevice> {
        Self::open(name, mtu, true)
    }

    fn open(name: &str, mtu: usize, vnet_hdr: bool) -> io::Result<TunDevice> {
        let mtu16 = u16::try_from(mtu).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("TUN MTU {mtu} > 65535"),
            )
        })?;
        let mut cfg = tun::Configuration::default();
        cfg.tun_name(name).mtu(mtu16).up();
        if vnet_hdr {
            cfg.platform_config(|p| {
                p.vnet_hdr(true);
            });
        }
        let dev = tun::create(&cfg)
            .map_err(|e| io::Error::other(format!("create TUN device {name}: {e}")))?;
        dev.set_nonblock()?;
        Ok(TunDevice {
            dev,
            name: name.to_owned(),
        })
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one packet (with a vnet header first, if the device has one); `WouldBlock` when none
    /// is waiting.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.dev.recv(buf)
    }

    /// Writes one packet (with a vnet header first, if the device has one).
    pub fn send(&self, pkt: &[u8]) -> io::Result<usize> {
        self.dev.send(pkt)
    }
}

impl AsRawFd for TunDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.dev.as_raw_fd()
    }
}

/// `struct virtio_net_hdr` (include/uapi/linux/virtio_net.h), the header of an `IFF_VNET_HDR`
/// device: flags, gso_type (u8 each), hdr_len, gso_size, csum_start, csum_offset (u16 each, host
/// byte order: the device is not switched to `TUNSETVNETLE`/`BE`).
pub const VNET_HDR_LEN: usize = 10;
const VNET_F_NEEDS_CSUM: u8 = 1;
const VNET_GSO_TCPV4: u8 = 1;
const VNET_GSO_TCPV6: u8 = 4;
/// Where the flags and the checksum sit in the TCP header.
const TCP_FLAGS_OFFSET: usize = 13;
const TCP_CHECK_OFFSET: usize = 16;
/// The largest IP packet a batch grows to (the IPv4 total length and IPv6 payload length are
/// 16 bits).
const MAX_BATCH_BYTES: usize = 65_535;
/// TCP flags a segment in a batch may carry: ACK, and PSH on the last one (the kernel's GRO rules,
/// `tcp_gro_receive`). Anything else (SYN, FIN, RST, URG, ECE, CWR) is written on its own.
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

/// Coalesces consecutive TCP segments of one flow into one GSO packet for a TUN device with a
/// vnet header, the way the kernel's GRO would: same addresses, ports, IP TOS/TTL (IPv4 DF),
/// flow label and hop limit (IPv6), ACK number, window and TCP options; each segment's sequence
/// number follows the last; all have the first one's payload length except a shorter last one;
/// only ACK (PSH ends the batch, and the batch's header takes it: the kernel's segmentation puts
/// it back on the last segment only). Sans-IO: the caller writes [`TcpCoalescer::take`]'s bytes.
pub struct TcpCoalescer {
    /// vnet header + the batch's IP packet (the first segment's headers, then every payload).
    buf: Vec<u8>,
    /// IP packet bytes in `buf` after the vnet header; 0 when empty.
    len: usize,
    segments: usize,
    ip_header_len: usize,
    tcp_header_len: usize,
    payload_len: usize,
    next_seq: u32,
    /// The last segment was short or had PSH: nothing may follow it.
    closed: bool,
}

impl Default for TcpCoalescer {
    fn default() -> Self {
        TcpCoalescer {
            buf: vec![0; VNET_HDR_LEN + MAX_BATCH_BYTES],
            len: 0,
            segments: 0,
            ip_header_len: 0,
            tcp_header_len: 0,
            payload_len: 0,
            next_seq: 0,
            closed: false,
        }
    }
}

impl TcpCoalescer {
    /// Segments in the pending batch (0: none).
    pub fn segments(&self) -> usize {
        self.segments
    }

    /// Adds `pkt` (an IP packet) to the pending batch, or starts one when none is pending.
    /// `false` when it cannot join: the caller writes [`TcpCoalescer::take`] and pushes again; a
    /// packet refused by an empty coalescer (not plain TCP data) is written on its own.
    pub fn push(&mut self, pkt: &[u8]) -> bool {
        let Some(seg) = Segment::parse(pkt) else {
            return false;
        };
        let flags_ok = seg.flags == TCP_ACK || seg.flags == TCP_ACK | TCP_PSH;
        if !flags_ok || pkt.len() > MAX_BATCH_BYTES {
            return false;
        }
        let payload = &pkt[seg.ip_header_len + seg.tcp_header_len..];
        if self.len == 0 {
            self.buf[VNET_HDR_LEN..VNET_HDR_LEN + pkt.len()].copy_from_slice(pkt);
            self.len = pkt.len();
            self.segments = 1;
            self.ip_header_len = seg.ip_header_len;
            self.tcp_header_len = seg.tcp_header_len;
            self.payload_len = payload.len();
            self.next_seq = seg.seq.wrapping_add(payload.len() as u32);
            self.closed = seg.flags & TCP_PSH != 0;
            return true;
        }
        let first =
            &self.buf[VNET_HDR_LEN..VNET_HDR_LEN + self.ip_header_len + self.tcp_header_len];
        if self.closed
            || seg.ip_header_len != self.ip_header_len
            || seg.tcp_header_len != self.tcp_header_len
            || seg.seq != self.next_seq
            || payload.len() > self.payload_len
            || self.len + payload.len() > MAX_BATCH_BYTES
            || !same_flow(first, pkt, self.ip_header_len, self.tcp_header_len)
        {
            return false;
        }
        self.buf[VNET_HDR_LEN + self.len..VNET_HDR_LEN + self.len + payload.len()]
            .copy_from_slice(payload);
        if seg.flags & TCP_PSH != 0 {
            // The batch carries the first segment's header: it takes the last one's PSH, as GRO
            // does (`tcp_gro_receive`), and `tcp_gso_segment` leaves PSH on the last segment.
            self.buf[VNET_HDR_LEN + self.ip_header_len + TCP_FLAGS_OFFSET] |= TCP_PSH;
        }
        self.len += payload.len();
        self.segments += 1;
        self.next_seq = seg.seq.wrapping_add(payload.len() as u32);
        self.closed = payload.len() < self.payload_len || seg.flags & TCP_PSH != 0;
        true
    }

    /// The pending batch as one write (vnet header + IP packet), and empties the coalescer;
    /// `None` when nothing is pending. One segment is written as it came (header all zero); more
    /// become a GSO packet: IP length and IPv4 header checksum rewritten, the TCP checksum field
    /// set to the pseudo-header sum and left to the kernel (`VIRTIO_NET_HDR_F_NEEDS_CSUM`).
    pub fn take(&mut self) -> Option<&[u8]> {
        if self.len == 0 {
            return None;
        }
        let (len, ihl, thl) = (self.len, self.ip_header_len, self.tcp_header_len);
        let segments = self.segments;
        self.len = 0;
        self.segments = 0;
        let (hdr, pkt) = self.buf.split_at_mut(VNET_HDR_LEN);
        let pkt = &mut pkt[..len];
        hdr.fill(0);
        if segments > 1 {
            let v4 = pkt[0] >> 4 == 4;
            let tcp_len = len - ihl;
            let addresses = if v4 {
                pkt[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                pkt[10..12].fill(0);
                let check = checksum(&pkt[..ihl]);
                pkt[10..12].copy_from_slice(&check.to_be_bytes());
                &pkt[12..20]
            } else {
                pkt[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
                &pkt[8..40]
            };
            // The pseudo header's addresses, protocol and TCP length, folded and not
            // complemented: the kernel adds the segments' sums and adjusts the length per
            // segment (`tcp_gso_segment`).
            let pseudo = Sum::ZERO
                .add_bytes(addresses)
                .add_u32(6 + tcp_len as u32)
                .fold();
            pkt[ihl + TCP_CHECK_OFFSET..ihl + TCP_CHECK_OFFSET + 2]
                .copy_from_slice(&pseudo.to_be_bytes());
            hdr[0] = VNET_F_NEEDS_CSUM;
            hdr[1] = if v4 { VNET_GSO_TCPV4 } else { VNET_GSO_TCPV6 };
            hdr[2..4].copy_from_slice(&((ihl + thl) as u16).to_ne_bytes());
            hdr[4..6].copy_from_slice(&(self.payload_len as u16).to_ne_bytes());
            hdr[6..8].copy_from_slice(&(ihl as u16).to_ne_bytes());
            hdr[8..10].copy_from_slice(&(TCP_CHECK_OFFSET as u16).to_ne_bytes());
        }
        Some(&self.buf[..VNET_HDR_LEN + len])
    }
}

/// The fields of a TCP segment [`TcpCoalescer`] looks at; `None` for anything else (IPv4 with
/// options or fragmented, IPv6 with extension headers, no payload, lengths that disagree).
struct Segment {
    ip_header_len: usize,
    tcp_header_len: usize,
    seq: u32,
    flags: u8,
}

impl Segment {
    fn parse(pkt: &[u8]) -> Option<Segment> {
        let ip_header_len = match pkt.first()? >> 4 {
            4 => {
                let total = usize::from(u16::from_be_bytes([*pkt.get(2)?, *pkt.get(3)?]));
                let frag = u16::from_be_bytes([*pkt.get(6)?, *pkt.get(7)?]);
                // IHL 5 (no options), protocol TCP, not a fragment (MF clear, offset 0).
                if pkt[0] & 0x0f != 5
                    || *pkt.get(9)? != 6
                    || frag & 0x3fff != 0
                    || total != pkt.len()
                {
                    return None;
                }
                20
            }
            6 => {
                let payload = usize::from(u16::from_be_bytes([*pkt.get(4)?, *pkt.get(5)?]));
                if *pkt.get(6)? != 6 || 40 + payload != pkt.len() {
                    return None;
                }
                40
            }
            _ => return None,
        };
        let tcp = pkt.get(ip_header_len..)?;
        let tcp_header_len = usize::from(tcp.get(12)? >> 4) * 4;
        // Data offset at least 5 words, the NS bit clear, and some payload.
        if tcp_header_len < 20 || tcp[12] & 0x01 != 0 || tcp.len() <= tcp_header_len {
            return None;
        }
        Some(Segment {
            ip_header_len,
            tcp_header_len,
            seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
            flags: tcp[13],
        })
    }
}

/// Whether `pkt` belongs to the batch whose first segment's headers are `first`: both were
/// parsed by [`Segment::parse`] with these header lengths.
fn same_flow(first: &[u8], pkt: &[u8], ihl: usize, thl: usize) -> bool {
    let ip_same = if ihl == 20 {
        // TOS, DF, TTL and the addresses (the ID and checksum differ per segment).
        first[1] == pkt[1]
            && first[6] & 0x40 == pkt[6] & 0x40
            && first[8] == pkt[8]
            && first[12..20] == pkt[12..20]
    } else {
        // Version, traffic class, flow label; hop limit; the addresses.
        first[..4] == pkt[..4] && first[7] == pkt[7] && first[8..40] == pkt[8..40]
    };
    let (a, b) = (&first[ihl..ihl + thl], &pkt[ihl..ihl + thl]);
    // Ports, ACK number, window and every option (timestamps included) as GRO requires.
    ip_same
        && a[..4] == b[..4]
        && a[8..12] == b[8..12]
        && a[14..16] == b[14..16]
        && a[20..] == b[20..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use mimiq_wire::checksum::verify;

    /// An IPv4 TCP segment 10.0.0.1:1000 → 10.0.0.2:2000, ACK, with a 12-byte timestamp option
    /// and `payload` bytes of `fill`, checksums valid.
    fn v4_segment(seq: u32, payload: usize, flags: u8, fill: u8) -> Vec<u8> {
        let (ihl, thl) = (20, 32);
        let mut p = vec![0u8; ihl + thl + payload];
        let total = p.len() as u16;
        p[0] = 0x45;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[4..6].copy_from_slice(&(seq as u16).to_be_bytes()); // IP ID, differs per segment
        p[6] = 0x40; // DF
        p[8] = 64; // TTL
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let check = checksum(&p[..20]);
        p[10..12].copy_from_slice(&check.to_be_bytes());
        let t = &mut p[ihl..];
        t[0..2].copy_from_slice(&1000u16.to_be_bytes());
        t[2..4].copy_from_slice(&2000u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&7u32.to_be_bytes()); // ACK number
        t[12] = ((thl / 4) as u8) << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&512u16.to_be_bytes()); // window
        t[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3]); // NOP NOP TS
        t[thl..].fill(fill);
        let pseudo = Sum::ZERO
            .add_bytes(&p[12..20])
            .add_u32(6 + (thl + payload) as u32);
        let check = pseudo.add_bytes(&p[ihl..]).checksum();
        p[ihl + 16..ihl + 18].copy_from_slice(&check.to_be_bytes());
        p
    }

    fn ne16(b: &[u8]) -> u16 {
        u16::from_ne_bytes([b[0], b[1]])
    }

    #[test]
    fn consecutive_segments_become_one_gso_packet_with_a_pseudo_header_checksum() {
        let mut c = TcpCoalescer::default();
        assert!(c.push(&v4_segment(100, 1000, TCP_ACK, 0xa1)));
        assert!(c.push(&v4_segment(1100, 1000, TCP_ACK, 0xa2)));
        assert!(c.push(&v4_segment(2100, 400, TCP_ACK | TCP_PSH, 0xa3)));
        assert_eq!(c.segments(), 3);
        let out = c.take().unwrap().to_vec();
        let (hdr, pkt) = out.split_at(VNET_HDR_LEN);
        // flags NEEDS_CSUM, gso_type TCPV4, hdr_len 52, gso_size 1000, csum_start 20, offset 16.
        assert_eq!((hdr[0], hdr[1]), (VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4));
        assert_eq!(
            (
                ne16(&hdr[2..]),
                ne16(&hdr[4..]),
                ne16(&hdr[6..]),
                ne16(&hdr[8..])
            ),
            (52, 1000, 20, 16)
        );
        assert_eq!(pkt.len(), 52 + 2400);
        assert_eq!(usize::from(u16::from_be_bytes([pkt[2], pkt[3]])), pkt.len());
        assert!(verify(&pkt[..20]), "IPv4 header checksum");
        assert_eq!(&pkt[52..1052], &[0xa1; 1000][..]);
        assert_eq!(&pkt[1052..2052], &[0xa2; 1000][..]);
        assert_eq!(&pkt[2052..], &[0xa3; 400][..]);
        // The last segment's PSH, which the kernel puts back on the last segment it makes.
        assert_eq!(pkt[20 + TCP_FLAGS_OFFSET], TCP_ACK | TCP_PSH);
        // The TCP checksum field holds the folded pseudo-header sum over the whole TCP length.
        let pseudo = Sum::ZERO
            .add_bytes(&pkt[12..20])
            .add_u32(6 + (pkt.len() - 20) as u32)
            .fold();
        assert_eq!(u16::from_be_bytes([pkt[36], pkt[37]]), pseudo);
        assert!(c.take().is_none());
    }

    #[test]
    fn one_segment_is_written_unchanged_with_a_zero_header() {
        let mut c = TcpCoalescer::default();
        let s = v4_segment(100, 1000, TCP_ACK, 1);
        assert!(c.push(&s));
        let out = c.take().unwrap();
        assert_eq!(&out[..VNET_HDR_LEN], &[0; VNET_HDR_LEN]);
        assert_eq!(&out[VNET_HDR_LEN..], &s[..]);
    }

    #[test]
    fn a_gap_a_longer_segment_other_flags_or_a_closed_batch_are_refused() {
        let mut c = TcpCoalescer::default();
        assert!(c.push(&v4_segment(100, 1000, TCP_ACK, 1)));
        assert!(!c.push(&v4_segment(1200, 1000, TCP_ACK, 1)), "sequence gap");
        assert!(
            !c.push(&v4_segment(1100, 1001, TCP_ACK, 1)),
            "longer than gso_size"
        );
        assert!(!c.push(&v4_segment(1100, 1000, TCP_ACK | 0x01, 1)), "FIN");
        let mut other_port = v4_segment(1100, 1000, TCP_ACK, 1);
        other_port[20] ^= 1;
        assert!(!c.push(&other_port), "another flow");
        let mut other_ts = v4_segment(1100, 1000, TCP_ACK, 1);
        other_ts[20 + 27] ^= 1;
        assert!(!c.push(&other_ts), "other TCP options");
        assert!(
            c.push(&v4_segment(1100, 500, TCP_ACK, 1)),
            "short last segment"
        );
        assert!(
            !c.push(&v4_segment(1600, 500, TCP_ACK, 1)),
            "nothing after a short one"
        );
        assert_eq!(c.segments(), 2);
    }

    #[test]
    fn non_tcp_and_truncated_packets_are_refused_at_every_length() {
        let mut c = TcpCoalescer::default();
        let s = v4_segment(100, 10, TCP_ACK, 1);
        for n in 0..s.len() {
            assert!(!c.push(&s[..n]), "{n}");
        }
        let mut udp = s.clone();
        udp[9] = 17;
        assert!(!c.push(&udp));
        let mut syn = v4_segment(100, 10, 0x02, 1);
        assert!(!c.push(&syn));
        syn[33] = TCP_ACK; // byte 13 of the TCP header
        assert!(c.push(&syn));
    }

    #[test]
    fn batches_stop_below_64k() {
        let mut c = TcpCoalescer::default();
        let mut seq = 0u32;
        let mut n = 0;
        while c.push(&v4_segment(seq, 1400, TCP_ACK, 1)) {
            seq += 1400;
            n += 1;
        }
        // (65535 − 52) / 1400 = 46 payloads fit.
        assert_eq!(n, 46);
        assert!(c.take().unwrap().len() <= VNET_HDR_LEN + MAX_BATCH_BYTES);
    }
}
