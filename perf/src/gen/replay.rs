//! A load tester's own traffic: the Ethernet frames of a pcap file, for `gen send --pcap`,
//! sent in order, looped, at the sender's rate, with their addresses rewritten on request.
//!
//! Sans-IO apart from reading the file: [`Capture::load`] reads every frame into memory once
//! (frames that are not Ethernet, or longer than a frame of the sender's UMEM holds, are counted
//! and left out), [`Rewrite::apply`] changes MAC and IP addresses in place and fixes the IPv4
//! header checksum and the UDP or TCP checksum incrementally (RFC 1624), so a capture taken
//! elsewhere can be aimed at the testbed's hosts.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use mimiq_dataplane::wire::checksum::update_u32;
use pcap_file::pcap::PcapReader;
use pcap_file::DataLink;

use super::probe::FCS_LEN;

/// The frames of a capture.
#[derive(Debug, Clone, Default)]
pub struct Capture {
    /// Ethernet frames (without FCS), in capture order.
    pub frames: Vec<Vec<u8>>,
    /// Frames left out: truncated by the capture's snap length, shorter than an Ethernet
    /// header, or longer than `max_len`.
    pub skipped: u64,
}

/// Why a capture could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The file could not be opened.
    #[error("cannot open {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    /// Not a pcap file, or a damaged one.
    #[error("{path} is not a readable pcap file: {reason}")]
    Format { path: PathBuf, reason: String },
    /// Frames of another link layer than Ethernet.
    #[error("{path} holds {link} frames; only Ethernet (link type 1) can be sent")]
    LinkType { path: PathBuf, link: String },
    /// Nothing left to send.
    #[error("{path} holds no Ethernet frame of 14 to {max_len} bytes ({skipped} left out)")]
    Empty {
        path: PathBuf,
        max_len: usize,
        skipped: u64,
    },
}

/// Bytes of an Ethernet header.
const ETH_LEN: usize = 14;

impl Capture {
    /// Reads the frames of the pcap file at `path` that fit `max_len` bytes.
    pub fn load(path: &Path, max_len: usize) -> Result<Capture, CaptureError> {
        let file = std::fs::File::open(path).map_err(|e| CaptureError::Open {
            path: path.into(),
            reason: e.to_string(),
        })?;
        let format = |e: &dyn std::fmt::Display| CaptureError::Format {
            path: path.into(),
            reason: e.to_string(),
        };
        let mut reader = PcapReader::new(std::io::BufReader::new(file)).map_err(|e| format(&e))?;
        let link = reader.header().datalink;
        if link != DataLink::ETHERNET {
            return Err(CaptureError::LinkType {
                path: path.into(),
                link: format!("{link:?}"),
            });
        }
        let mut capture = Capture::default();
        while let Some(packet) = reader.next_packet() {
            let packet = packet.map_err(|e| format(&e))?;
            let len = packet.data.len();
            if len < ETH_LEN || len > max_len || len < packet.orig_len as usize {
                capture.skipped += 1;
                continue;
            }
            capture.frames.push(packet.data.into_owned());
        }
        if capture.frames.is_empty() {
            return Err(CaptureError::Empty {
                path: path.into(),
                max_len,
                skipped: capture.skipped,
            });
        }
        Ok(capture)
    }

    /// Bytes of one pass over the capture, frames counted with FCS.
    pub fn pass_bytes(&self) -> u64 {
        self.frames.iter().map(|f| (f.len() + FCS_LEN) as u64).sum()
    }
}

/// Addresses to write into every frame (none: left as captured).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rewrite {
    /// Ethernet source.
    pub src_mac: Option<[u8; 6]>,
    /// Ethernet destination.
    pub dst_mac: Option<[u8; 6]>,
    /// IP source, in frames of its family.
    pub src_ip: Option<IpAddr>,
    /// IP destination, in frames of its family.
    pub dst_ip: Option<IpAddr>,
}

/// Offsets in an IPv4 header.
const V4_PROTO: usize = 9;
const V4_CHECKSUM: usize = 10;
const V4_SRC: usize = 12;
/// Offsets in an IPv6 header.
const V6_NEXT: usize = 6;
const V6_SRC: usize = 8;
const V6_LEN: usize = 40;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

impl Rewrite {
    /// Rewrites `frame` in place. IP addresses change only in an IPv4 or IPv6 packet of their
    /// family whose header is whole; the IPv4 header checksum and the checksum of a UDP or TCP
    /// header right after the IP header (not in a later IPv4 fragment) follow the change. A
    /// UDP checksum of 0 (none, over IPv4) stays 0.
    pub fn apply(&self, frame: &mut [u8]) {
        if frame.len() < ETH_LEN {
            return;
        }
        if let Some(mac) = self.dst_mac {
            frame[0..6].copy_from_slice(&mac);
        }
        if let Some(mac) = self.src_mac {
            frame[6..12].copy_from_slice(&mac);
        }
        match (frame.get(ETH_LEN).map(|b| b >> 4), [frame[12], frame[13]]) {
            (Some(4), [0x08, 0x00]) => self.v4(&mut frame[ETH_LEN..]),
            (Some(6), [0x86, 0xdd]) => self.v6(&mut frame[ETH_LEN..]),
            _ => {}
        }
    }

    fn v4(&self, ip: &mut [u8]) {
        let header_len = usize::from(ip[0] & 0x0f) * 4;
        if header_len < 20 || ip.len() < header_len {
            return;
        }
        let first_fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff == 0;
        let l4 = transport_checksum(ip[V4_PROTO], header_len, first_fragment, ip.len());
        for (at, new) in [(V4_SRC, self.src_ip), (V4_SRC + 4, self.dst_ip)] {
            let Some(IpAddr::V4(new)) = new else { continue };
            let old = u32::from_be_bytes([ip[at], ip[at + 1], ip[at + 2], ip[at + 3]]);
            let new = u32::from(new);
            ip[at..at + 4].copy_from_slice(&new.to_be_bytes());
            let header = u16::from_be_bytes([ip[V4_CHECKSUM], ip[V4_CHECKSUM + 1]]);
            ip[V4_CHECKSUM..V4_CHECKSUM + 2]
                .copy_from_slice(&update_u32(header, old, new).to_be_bytes());
            if let Some(c) = l4 {
                update_at(ip, c, ip[V4_PROTO] == PROTO_UDP, &[(old, new)]);
            }
        }
    }

    fn v6(&self, ip: &mut [u8]) {
        if ip.len() < V6_LEN {
            return;
        }
        let l4 = transport_checksum(ip[V6_NEXT], V6_LEN, true, ip.len());
        for (at, new) in [(V6_SRC, self.src_ip), (V6_SRC + 16, self.dst_ip)] {
            let Some(IpAddr::V6(new)) = new else { continue };
            let mut changes = [(0u32, 0u32); 4];
            for (i, change) in changes.iter_mut().enumerate() {
                let w = at + 4 * i;
                let old = u32::from_be_bytes([ip[w], ip[w + 1], ip[w + 2], ip[w + 3]]);
                let octets = new.octets();
                let new = u32::from_be_bytes([
                    octets[4 * i],
                    octets[4 * i + 1],
                    octets[4 * i + 2],
                    octets[4 * i + 3],
                ]);
                *change = (old, new);
            }
            ip[at..at + 16].copy_from_slice(&new.octets());
            if let Some(c) = l4 {
                update_at(ip, c, ip[V6_NEXT] == PROTO_UDP, &changes);
            }
        }
    }
}

/// Where the UDP or TCP checksum of a packet is (its offset in `ip`), if the transport
/// header follows the IP header, is whole, and (UDP over IPv4) carries a checksum at all.
fn transport_checksum(
    proto: u8,
    header_len: usize,
    first_fragment: bool,
    len: usize,
) -> Option<usize> {
    let at = match proto {
        PROTO_UDP => header_len + 6,
        PROTO_TCP => header_len + 16,
        _ => return None,
    };
    (first_fragment && len >= at + 2).then_some(at)
}

/// Applies address changes to the transport checksum at `at` (the pseudo-header covers the
/// addresses); `udp`: a UDP checksum, where 0 means none and a computed 0 is sent as 0xffff
/// (RFC 768).
fn update_at(ip: &mut [u8], at: usize, udp: bool, changes: &[(u32, u32)]) {
    let mut c = u16::from_be_bytes([ip[at], ip[at + 1]]);
    if udp && c == 0 {
        return;
    }
    for &(old, new) in changes {
        c = update_u32(c, old, new);
    }
    if udp && c == 0 {
        c = 0xffff;
    }
    ip[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    fn checksums_valid(frame: &[u8]) -> bool {
        let p = SlicedPacket::from_ethernet(frame).unwrap();
        let payload_ok = match (&p.net, &p.transport) {
            (Some(etherparse::NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(u))) => {
                let h = u.to_header();
                h.checksum
                    == h.calc_checksum_ipv4(&ip.header().to_header(), u.payload())
                        .unwrap()
            }
            (Some(etherparse::NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(t))) => {
                let h = t.to_header();
                h.checksum
                    == h.calc_checksum_ipv4(&ip.header().to_header(), t.payload())
                        .unwrap()
            }
            (Some(etherparse::NetSlice::Ipv6(ip)), Some(TransportSlice::Udp(u))) => {
                let h = u.to_header();
                h.checksum
                    == h.calc_checksum_ipv6(&ip.header().to_header(), u.payload())
                        .unwrap()
            }
            (Some(etherparse::NetSlice::Ipv6(ip)), Some(TransportSlice::Tcp(t))) => {
                let h = t.to_header();
                h.checksum
                    == h.calc_checksum_ipv6(&ip.header().to_header(), t.payload())
                        .unwrap()
            }
            _ => panic!("not UDP or TCP over IP"),
        };
        let header_ok = match &p.net {
            Some(etherparse::NetSlice::Ipv4(ip)) => {
                let h = ip.header().to_header();
                h.header_checksum == h.calc_header_checksum()
            }
            _ => true,
        };
        payload_ok && header_ok
    }

    #[test]
    fn rewritten_addresses_keep_every_checksum_valid_udp_and_tcp_v4_and_v6() {
        let (mac_a, mac_b) = ([2, 0, 0, 0, 0, 0xa], [2, 0, 0, 0, 0, 0xb]);
        let mut frames = Vec::new();
        let v4 = PacketBuilder::ethernet2([1; 6], [3; 6]).ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64);
        let mut f = Vec::new();
        v4.udp(1000, 2000).write(&mut f, b"some payload").unwrap();
        frames.push(f);
        let v4 = PacketBuilder::ethernet2([1; 6], [3; 6]).ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64);
        let mut f = Vec::new();
        v4.tcp(1000, 2000, 7, 1024)
            .write(&mut f, b"tcp bytes")
            .unwrap();
        frames.push(f);
        let v6 = PacketBuilder::ethernet2([1; 6], [3; 6]).ipv6([0xfd; 16], [0xfe; 16], 64);
        let mut f = Vec::new();
        v6.udp(1000, 2000).write(&mut f, b"v6 payload").unwrap();
        frames.push(f);
        let v6 = PacketBuilder::ethernet2([1; 6], [3; 6]).ipv6([0xfd; 16], [0xfe; 16], 64);
        let mut f = Vec::new();
        v6.tcp(1000, 2000, 7, 1024)
            .write(&mut f, b"v6 tcp")
            .unwrap();
        frames.push(f);
        let rewrites = [
            Rewrite {
                src_mac: Some(mac_a),
                dst_mac: Some(mac_b),
                src_ip: Some("198.18.0.1".parse().unwrap()),
                dst_ip: Some("198.18.0.2".parse().unwrap()),
            },
            Rewrite {
                src_ip: Some("fd00::1".parse().unwrap()),
                dst_ip: Some("2001:db8::42".parse().unwrap()),
                ..Rewrite::default()
            },
        ];
        for frame in &frames {
            for r in &rewrites {
                let mut f = frame.clone();
                r.apply(&mut f);
                assert!(checksums_valid(&f), "{r:?} on {frame:02x?}");
                let p = SlicedPacket::from_ethernet(&f).unwrap();
                match p.net {
                    Some(etherparse::NetSlice::Ipv4(ip)) => {
                        let want = |a: Option<IpAddr>, was| match a {
                            Some(IpAddr::V4(a)) => a,
                            _ => was,
                        };
                        let h = ip.header();
                        assert_eq!(h.source_addr(), want(r.src_ip, [10, 0, 0, 1].into()));
                        assert_eq!(h.destination_addr(), want(r.dst_ip, [10, 0, 0, 2].into()));
                    }
                    Some(etherparse::NetSlice::Ipv6(ip)) => {
                        let want = |a: Option<IpAddr>, was| match a {
                            Some(IpAddr::V6(a)) => a,
                            _ => was,
                        };
                        let h = ip.header();
                        assert_eq!(h.source_addr(), want(r.src_ip, [0xfd; 16].into()));
                        assert_eq!(h.destination_addr(), want(r.dst_ip, [0xfe; 16].into()));
                    }
                    _ => panic!(),
                }
                assert_eq!(&f[0..6], r.dst_mac.as_ref().unwrap_or(&[3; 6]));
                assert_eq!(&f[6..12], r.src_mac.as_ref().unwrap_or(&[1; 6]));
            }
        }
    }

    #[test]
    fn frames_that_are_not_ip_or_are_cut_short_are_left_alone_apart_from_their_macs() {
        let r = Rewrite {
            src_mac: Some([2; 6]),
            dst_mac: None,
            src_ip: Some("198.18.0.1".parse().unwrap()),
            dst_ip: None,
        };
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let before = arp.clone();
        r.apply(&mut arp);
        assert_eq!(arp[12..], before[12..]);
        assert_eq!(arp[6..12], [2; 6]);
        for len in 0..40 {
            let mut short = vec![0x45u8; len];
            if len >= 14 {
                short[12..14].copy_from_slice(&[0x08, 0x00]);
            }
            r.apply(&mut short); // no panic
        }
    }

    #[test]
    fn a_capture_is_read_with_its_unusable_frames_counted_and_bad_files_are_clear_errors() {
        use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.pcap");
        let mut w = PcapWriter::new(std::fs::File::create(&path).unwrap()).unwrap();
        for (len, orig) in [
            (60usize, 60u32),
            (1514, 1514),
            (10, 10),
            (100, 200),
            (2000, 2000),
        ] {
            let data = vec![0xabu8; len];
            w.write_packet(&PcapPacket::new(Duration::ZERO, orig, &data))
                .unwrap();
        }
        drop(w);
        let c = Capture::load(&path, 1514).unwrap();
        assert_eq!(
            c.frames.iter().map(Vec::len).collect::<Vec<_>>(),
            [60, 1514]
        );
        assert_eq!(
            c.skipped, 3,
            "a runt, a frame cut by the snap length, one too long"
        );
        assert_eq!(c.pass_bytes(), 64 + 1518);

        let missing = Capture::load(&dir.path().join("none.pcap"), 1514).unwrap_err();
        assert!(missing.to_string().starts_with("cannot open "), "{missing}");
        std::fs::write(dir.path().join("junk.pcap"), b"not a capture at all").unwrap();
        let junk = Capture::load(&dir.path().join("junk.pcap"), 1514).unwrap_err();
        assert!(
            junk.to_string().contains("is not a readable pcap file"),
            "{junk}"
        );
        let raw = dir.path().join("raw.pcap");
        let header = PcapHeader {
            datalink: pcap_file::DataLink::RAW,
            ..PcapHeader::default()
        };
        let mut w = PcapWriter::with_header(std::fs::File::create(&raw).unwrap(), header).unwrap();
        w.write_packet(&PcapPacket::new(Duration::ZERO, 40, &[0x45; 40]))
            .unwrap();
        drop(w);
        let link = Capture::load(&raw, 1514).unwrap_err();
        assert!(link.to_string().contains("only Ethernet"), "{link}");
        let small = Capture::load(&path, 59).unwrap_err();
        assert!(
            small.to_string().contains("holds no Ethernet frame"),
            "{small}"
        );
    }
}
