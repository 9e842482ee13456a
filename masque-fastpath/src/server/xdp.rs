//! The AF_XDP datapath (`datapath = "xdp"`): a worker's QUIC datagrams through an AF_XDP socket
//! on one receive queue of the NIC, with its own UMEM (the engine's `XskPort`,
//! `dataplane/src/port/xsk.rs`). mimiq's XDP program (`dataplane/bpf/xdp_mimiq.c`) in UDP-port
//! mode sends only UDP datagrams to the proxy's port to the sockets; ARP, neighbour discovery,
//! ICMP and everything else stay with the kernel.
//!
//! The worker parses Ethernet, IPv4 or IPv6 and UDP in place and copies the payload out (quiche
//! takes a contiguous buffer); it builds the headers of what it sends, with the addresses
//! swapped from what the client last sent: the client's MAC address, and the proxy's, are those
//! of the client's last frame (the next hop back is the one the datagram came through), so a
//! reply never waits for a neighbour lookup. A datagram is only ever sent to an address a
//! datagram came from (QUIC servers answer; they do not start paths).
//!
//! The NIC picks a queue by 4-tuple, so after a hop a client's datagrams often arrive on another
//! worker's queue: that worker hands them to the owner (`server/handoff.rs`), counted as
//! `handoffs` (and not as `misrouted`, which counts what the socket datapath's steering missed).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;

use mimiq_dataplane::port::xsk::{self, XskConfig, XskMemory, XskPort};
use mimiq_dataplane::port::{FrameMemory, Port};
use mimiq_wire::checksum::PseudoHeader;
use mimiq_wire::{
    EtherType, EthernetAddress, EthernetFrame, EthernetRepr, IpProtocol, Ipv4Packet, Ipv4Repr,
    Ipv6Packet, Ipv6Repr, UdpPacket, UdpRepr,
};

use super::endpoints::{Datagrams, EndpointCounters};

/// Frames read per burst.
const BURST: usize = 64;

type Frame = <XskPort as Port>::Frame;

/// One worker's AF_XDP socket as a [`Datagrams`] endpoint.
pub(crate) struct XdpDatagrams {
    port: XskPort,
    mem: XskMemory,
    free: Vec<Frame>,
    /// The frames of the last burst (given back at the next).
    frames: Vec<Frame>,
    /// The last burst's payloads, one after another, and where each is.
    rx: Vec<u8>,
    dgrams: Vec<(usize, usize, SocketAddr, SocketAddr)>,
    rx_full: bool,
    /// The datagram being written ([`Datagrams::send_buf`]).
    out: Vec<u8>,
    tx: Vec<Frame>,
    /// The proxy's UDP port.
    port_number: u16,
    local: SocketAddr,
    /// Client address → (its MAC, ours), from its last frame.
    macs: HashMap<IpAddr, (EthernetAddress, EthernetAddress)>,
    /// Datagrams not sent: no frame free, no MAC known for the address, a full TX ring.
    send_dropped: u64,
    /// Frames the program gave the socket that were no datagram to the port (malformed).
    rx_malformed: u64,
}

impl XdpDatagrams {
    /// Opens an AF_XDP socket on queue `queue` of `iface` for datagrams to `port`; `local` is
    /// what [`Datagrams::local_addr`] reports.
    pub fn open(
        iface: &str,
        queue: u32,
        port: u16,
        local: SocketAddr,
        config: &XskConfig,
        max_payload: usize,
    ) -> Result<XdpDatagrams, String> {
        let (mut ports, mem, free) =
            xsk::open(&[(iface.to_owned(), queue)], config).map_err(|e| e.to_string())?;
        let port_handle = ports.pop().ok_or("AF_XDP: no socket opened")?;
        let mut x = XdpDatagrams {
            port: port_handle,
            mem,
            free,
            frames: Vec::with_capacity(BURST),
            rx: Vec::with_capacity(BURST * 2048),
            dgrams: Vec::with_capacity(BURST),
            rx_full: false,
            out: vec![0; max_payload],
            tx: Vec::with_capacity(BURST),
            port_number: port,
            local,
            macs: HashMap::new(),
            send_dropped: 0,
            rx_malformed: 0,
        };
        x.port.reclaim(&mut x.free);
        Ok(x)
    }

    /// Parses one received frame; the datagram's payload range, sender and destination.
    fn parse(
        bytes: &[u8],
        port: u16,
    ) -> Option<(
        std::ops::Range<usize>,
        SocketAddr,
        SocketAddr,
        EthernetAddress,
        EthernetAddress,
    )> {
        let eth = EthernetFrame::new_checked(bytes).ok()?;
        let l2 = EthernetRepr::parse(&eth).ok()?;
        let l3_at = l2.buffer_len();
        let (src, dst, l4, l4_at) = match l2.ethertype {
            EtherType::Ipv4 => {
                let ip = Ipv4Packet::new_checked(&bytes[l3_at..]).ok()?;
                let r = Ipv4Repr::parse(&ip).ok()?;
                let hl = usize::from(ip.header_len());
                let end = hl + usize::from(r.payload_len);
                (
                    IpAddr::V4(r.src_addr),
                    IpAddr::V4(r.dst_addr),
                    bytes.get(l3_at + hl..l3_at + end)?,
                    l3_at + hl,
                )
            }
            EtherType::Ipv6 => {
                let ip = Ipv6Packet::new_checked(&bytes[l3_at..]).ok()?;
                let r = Ipv6Repr::parse(&ip).ok()?;
                let end = 40 + usize::from(r.payload_len);
                (
                    IpAddr::V6(r.src_addr),
                    IpAddr::V6(r.dst_addr),
                    bytes.get(l3_at + 40..l3_at + end)?,
                    l3_at + 40,
                )
            }
            _ => return None,
        };
        let udp = UdpPacket::new_checked(l4).ok()?;
        if udp.dst_port() != port {
            return None;
        }
        let len = udp.payload().len();
        let start = l4_at + 8;
        Some((
            start..start + len,
            SocketAddr::new(src, udp.src_port()),
            SocketAddr::new(dst, port),
            l2.src_addr,
            l2.dst_addr,
        ))
    }

    /// Writes Ethernet, IP and UDP headers for `payload_len` bytes from `from` to `to` into
    /// the start of `frame` (which holds the payload after [`header_len`]); the frame's length.
    fn headers(
        frame: &mut [u8],
        payload_len: usize,
        from: SocketAddr,
        to: SocketAddr,
        macs: (EthernetAddress, EthernetAddress),
    ) -> Option<usize> {
        let (peer_mac, our_mac) = macs;
        let l3 = header_len(to) - 14 - 8;
        let udp_len = 8 + payload_len;
        let eth = EthernetRepr {
            src_addr: our_mac,
            dst_addr: peer_mac,
            vlan_tci: None,
            ethertype: if to.is_ipv4() {
                EtherType::Ipv4
            } else {
                EtherType::Ipv6
            },
        };
        eth.emit(&mut EthernetFrame::new_unchecked(&mut frame[..14]))
            .ok()?;
        let pseudo = match (from.ip(), to.ip()) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let ip = Ipv4Repr {
                    src_addr: src,
                    dst_addr: dst,
                    next_header: IpProtocol::Udp,
                    payload_len: u16::try_from(udp_len).ok()?,
                    ttl: 64,
                    dscp: 0,
                    ecn: 0,
                    ident: 0,
                    dont_frag: true,
                };
                ip.emit(&mut Ipv4Packet::new_unchecked(&mut frame[14..14 + l3]))
                    .ok()?;
                PseudoHeader::V4 { src, dst }
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let ip = Ipv6Repr {
                    src_addr: src,
                    dst_addr: dst,
                    next_header: IpProtocol::Udp,
                    payload_len: u16::try_from(udp_len).ok()?,
                    hop_limit: 64,
                    traffic_class: 0,
                    flow_label: 0,
                };
                ip.emit(&mut Ipv6Packet::new_unchecked(&mut frame[14..14 + l3]))
                    .ok()?;
                PseudoHeader::V6 { src, dst }
            }
            _ => return None,
        };
        let at = 14 + l3;
        let mut udp = UdpPacket::new_unchecked(&mut frame[at..at + udp_len]);
        UdpRepr {
            src_port: from.port(),
            dst_port: to.port(),
            payload_len: u16::try_from(payload_len).ok()?,
        }
        .emit(&mut udp)
        .ok()?;
        udp.fill_checksum(&pseudo);
        Some(at + udp_len)
    }
}

/// Bytes of Ethernet, IP and UDP header in front of a datagram to `to`.
fn header_len(to: SocketAddr) -> usize {
    14 + if to.is_ipv4() { 20 } else { 40 } + 8
}

impl Datagrams for XdpDatagrams {
    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn recv_burst(&mut self) -> io::Result<usize> {
        self.free.append(&mut self.frames);
        self.rx.clear();
        self.dgrams.clear();
        let n = self.port.rx_burst(&mut self.frames, BURST);
        self.rx_full = n == BURST;
        for f in self.frames.iter_mut() {
            let bytes = self.mem.data_mut(f);
            match Self::parse(&bytes, self.port_number) {
                Some((range, from, to, peer_mac, our_mac)) => {
                    let at = self.rx.len();
                    self.rx.extend_from_slice(&bytes[range.clone()]);
                    self.dgrams.push((at, range.len(), from, to));
                    self.macs.insert(from.ip(), (peer_mac, our_mac));
                }
                None => self.rx_malformed += 1,
            }
        }
        self.port.reclaim(&mut self.free);
        Ok(self.dgrams.len())
    }

    fn burst_full(&self) -> bool {
        self.rx_full
    }

    fn datagram(&mut self, i: usize) -> (&mut [u8], SocketAddr, SocketAddr) {
        let (at, len, from, to) = self.dgrams[i];
        (&mut self.rx[at..at + len], from, to)
    }

    fn send_buf(&mut self) -> &mut [u8] {
        &mut self.out
    }

    fn commit(&mut self, len: usize, from: SocketAddr, to: SocketAddr) {
        let (Some(&macs), Some(mut frame)) = (self.macs.get(&to.ip()), self.free.pop()) else {
            self.send_dropped += 1;
            return;
        };
        let hl = header_len(to);
        if self.mem.set_len(&mut frame, hl + len) < hl + len {
            self.free.push(frame);
            self.send_dropped += 1;
            return;
        }
        let built = {
            let mut bytes = self.mem.data_mut(&mut frame);
            bytes[hl..hl + len].copy_from_slice(&self.out[..len]);
            Self::headers(&mut bytes, len, from, to, macs)
        };
        if built.is_none() {
            self.free.push(frame);
            self.send_dropped += 1;
            return;
        }
        self.tx.push(frame);
        if self.tx.len() >= BURST {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if !self.tx.is_empty() {
            self.port.tx_burst(&mut self.tx);
            // What did not fit in the TX ring is dropped (QUIC recovers it).
            self.send_dropped += self.tx.len() as u64;
            self.free.append(&mut self.tx);
        }
        self.port.reclaim(&mut self.free);
    }

    fn counters(&self) -> EndpointCounters {
        EndpointCounters {
            send_dropped: self.send_dropped,
            rx_malformed: self.rx_malformed,
            ..EndpointCounters::default()
        }
    }

    fn poll_fd(&self) -> RawFd {
        self.port.rx_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_built_parse_back_with_their_addresses_and_payload() {
        let macs = (
            EthernetAddress([2, 0, 0, 0, 0, 1]),
            EthernetAddress([2, 0, 0, 0, 0, 2]),
        );
        for (from, to) in [
            ("198.18.10.1:4433", "198.18.10.2:50000"),
            ("[fd00:10::1]:4433", "[fd00:10::2]:50000"),
        ] {
            let (from, to): (SocketAddr, SocketAddr) = (from.parse().unwrap(), to.parse().unwrap());
            let payload: Vec<u8> = (0..300u16).map(|i| i as u8).collect();
            let hl = header_len(to);
            let mut frame = vec![0u8; hl + payload.len()];
            frame[hl..].copy_from_slice(&payload);
            let n = XdpDatagrams::headers(&mut frame, payload.len(), from, to, macs).unwrap();
            assert_eq!(n, frame.len());
            // The receiver's view: what the client sees is what the worker parses the other
            // way round (the checksum is checked by the wire crate's parse).
            let p = etherparse::SlicedPacket::from_ethernet(&frame).unwrap();
            let Some(etherparse::TransportSlice::Udp(u)) = p.transport else {
                panic!("not UDP");
            };
            assert_eq!(u.payload(), &payload[..]);
            // Parsed as a datagram to the client's port.
            let (range, src, dst, peer, ours) = XdpDatagrams::parse(&frame, to.port()).unwrap();
            assert_eq!((src, dst), (from, to));
            assert_eq!((peer, ours), (macs.1, macs.0));
            assert_eq!(&frame[range], &payload[..]);
            // A datagram to another port, a truncated frame, garbage: no datagram.
            assert!(XdpDatagrams::parse(&frame, 9).is_none());
            assert!(XdpDatagrams::parse(&frame[..hl - 1], to.port()).is_none());
            assert!(XdpDatagrams::parse(&[0xff; 60], to.port()).is_none());
        }
    }
}
