//! The access switch's slow-path thread: the virtual gateway's ARP/ND answers, and the relay
//! between clients and the allocator (ARCHITECTURE §5).
//!
//! Frames arrive over the worker's slow-path ring, owned; they go back over the return ring,
//! to be transmitted (answers) or freed. A client's allocator request (UDP to the gateway, port
//! 6363) is wrapped in an authenticated `Relay` with the SID, the observed MAC and port, and sent
//! to the allocator; the allocator's `RelayReply` is written into a frame the thread keeps from
//! earlier requests and sent to the client's address and port. A reply with no frame to carry it
//! is dropped and counted: the client retries.
//!
//! The worker reports the first packet it forwarded from each binding over a ring; the thread
//! tells the allocator in `Seen` messages (allocator/src/proto.rs), sent again until answered,
//! so that a client that has sent something is never reclaimed as silent.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mimiq_allocator::proto::{self, ClientMsg, MsgType, Relay, RelayInfo, RelayReply};
use mimiq_allocator::Family;
use mimiq_allocator::{Mac, Sid};

use crate::engine::{SlowPathFrame, SlowPathReturn, SPARE_FRAME};
use crate::pipeline::gateway::{Answer, Gateway};
use crate::pipeline::mimiq::{SwitchUpdate, ALLOC_PORT};
use crate::port::{FrameMemory, PortId};
use crate::wire::checksum::PseudoHeader;
use crate::wire::{
    ArpOperation, ArpPacket, ArpRepr, EtherType, EthernetAddress, EthernetFrame, EthernetRepr,
    Icmpv6Packet, Icmpv6Repr, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, NdiscRepr,
    UdpPacket, UdpRepr,
};

/// Bytes of an IPv6 fixed header.
const IPV6_HEADER_LEN: usize = 40;

/// Frames kept to carry allocator replies.
const STASH: usize = 64;
/// Requests remembered (for the client's address) at most, and for how long.
const PENDING_MAX: usize = 4096;
const PENDING_TTL: Duration = Duration::from_secs(10);
/// `Seen` reports awaiting the allocator's answer at most (more wait in the worker's ring), and
/// how long before one is sent again.
const REPORTS_MAX: usize = 256;
const REPORT_RESEND: Duration = Duration::from_millis(500);

/// The relay's settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Our SID (also our ID at the allocator).
    pub sid: Sid,
    /// The allocator's relay address (`relay_listen`).
    pub allocator: SocketAddr,
    /// The key shared with the allocator.
    pub key: Vec<u8>,
}

/// Counters of the slow path, shared with the telemetry (`crate::telemetry`).
#[derive(Debug, Default)]
pub struct SlowPathStats {
    /// ARP replies and neighbour advertisements sent.
    pub gateway_answers: AtomicU64,
    /// Requests relayed to the allocator.
    pub relayed: AtomicU64,
    /// Replies delivered to clients.
    pub replies: AtomicU64,
    /// Frames freed unanswered because they were malformed: an ARP or neighbour discovery
    /// message, or an allocator request, that does not parse.
    pub ignored_malformed: AtomicU64,
    /// Frames freed unanswered because they were for someone else: ARP or neighbour discovery
    /// for another address, IP not for the allocator.
    pub ignored_not_for_us: AtomicU64,
    /// Replies dropped: bad tag, unknown transaction, or no frame to carry them.
    pub replies_dropped: AtomicU64,
    /// Addresses the allocator acknowledged as seen (first packet forwarded from each).
    pub seen_reported: AtomicU64,
    /// `Seen` messages sent again for want of an answer.
    pub seen_resent: AtomicU64,
}

/// [`SlowPathStats`] read at one moment (the stats file's `slow_path`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SlowPathCounters {
    /// ARP replies and neighbour advertisements sent.
    pub gateway_answers: u64,
    /// Requests relayed to the allocator.
    pub relayed: u64,
    /// Replies delivered to clients.
    pub replies: u64,
    /// Frames freed unanswered: malformed.
    pub ignored_malformed: u64,
    /// Frames freed unanswered: for someone else.
    pub ignored_not_for_us: u64,
    /// Allocator replies dropped.
    pub replies_dropped: u64,
    /// Addresses acknowledged as seen.
    pub seen_reported: u64,
    /// `Seen` messages sent again.
    pub seen_resent: u64,
}

impl SlowPathStats {
    /// The counters now.
    pub fn snapshot(&self) -> SlowPathCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SlowPathCounters {
            gateway_answers: get(&self.gateway_answers),
            relayed: get(&self.relayed),
            replies: get(&self.replies),
            ignored_malformed: get(&self.ignored_malformed),
            ignored_not_for_us: get(&self.ignored_not_for_us),
            replies_dropped: get(&self.replies_dropped),
            seen_reported: get(&self.seen_reported),
            seen_resent: get(&self.seen_resent),
        }
    }

    fn ignored(&self, why: Ignored) {
        match why {
            Ignored::Malformed => &self.ignored_malformed,
            Ignored::NotForUs => &self.ignored_not_for_us,
        }
        .fetch_add(1, Ordering::Relaxed);
    }
}

/// Why the slow path had no use for a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ignored {
    Malformed,
    NotForUs,
}

/// Runs the access slow path until `stop` is set.
pub fn run_access<M: FrameMemory>(
    mut memory: M,
    gateway: Gateway,
    relay: RelayConfig,
    mut from_worker: rtrb::Consumer<SlowPathFrame<M::Frame>>,
    mut to_worker: rtrb::Producer<SlowPathReturn<M::Frame>>,
    mut seen: rtrb::Consumer<IpAddr>,
    stop: Arc<AtomicBool>,
    stats: Arc<SlowPathStats>,
) -> std::io::Result<()> {
    let bind: SocketAddr = if relay.allocator.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("constant");
    let socket = UdpSocket::bind(bind)?;
    socket.connect(relay.allocator)?;
    socket.set_nonblocking(true)?;
    let key = proto::key(&relay.key);
    let mut stash: Vec<M::Frame> = Vec::new();
    let mut pending: HashMap<u32, (IpAddr, PortId, Instant)> = HashMap::new();
    let mut buf = vec![0u8; 2048];
    let mut out = Vec::with_capacity(2048);
    // Unanswered `Seen` reports by transaction ID: the addresses and when last sent.
    let mut reports: HashMap<u32, (Family, Vec<IpAddr>, Instant)> = HashMap::new();
    let mut report_txid = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.subsec_nanos());
    while !stop.load(Ordering::Relaxed) {
        let mut idle = true;
        if reports.len() < REPORTS_MAX && !seen.is_empty() {
            idle = false;
            let mut batch: [Vec<IpAddr>; 2] = Default::default();
            while let Ok(ip) = seen.pop() {
                let list = &mut batch[usize::from(ip.is_ipv6())];
                list.push(ip);
                if list.len() == usize::from(u8::MAX) {
                    break;
                }
            }
            for (family, addrs) in [Family::V4, Family::V6].into_iter().zip(batch) {
                if addrs.is_empty() {
                    continue;
                }
                report_txid = report_txid.wrapping_add(1);
                if seen_relay(relay.sid, &key, report_txid, family, &addrs, &mut out).is_ok() {
                    let _ = socket.send(&out);
                    reports.insert(report_txid, (family, addrs, Instant::now()));
                }
            }
        }
        for (txid, (family, addrs, at)) in &mut reports {
            if at.elapsed() >= REPORT_RESEND
                && seen_relay(relay.sid, &key, *txid, *family, addrs, &mut out).is_ok()
            {
                let _ = socket.send(&out);
                *at = Instant::now();
                stats.seen_resent.fetch_add(1, Ordering::Relaxed);
            }
        }
        while let Ok(SlowPathFrame { mut frame, in_port }) = from_worker.pop() {
            idle = false;
            let len = memory.len(&frame);
            let room = memory.set_len(&mut frame, 128.max(len));
            let answer = gateway.answer(&mut memory.data_mut(&mut frame)[..room], len);
            if let Ok(Answer::Reply(n)) = answer {
                memory.set_len(&mut frame, n);
                stats.gateway_answers.fetch_add(1, Ordering::Relaxed);
                give_back(&mut to_worker, SlowPathReturn::Transmit(frame, in_port));
                continue;
            }
            let query_malformed = answer.is_err();
            memory.set_len(&mut frame, len);
            let relayed = relay_request(
                &memory.data_mut(&mut frame)[..len],
                relay.sid,
                in_port,
                &key,
                &mut out,
            );
            if let Ok((txid, client)) = relayed {
                if socket.send(&out).is_ok() {
                    stats.relayed.fetch_add(1, Ordering::Relaxed);
                    if pending.len() >= PENDING_MAX {
                        pending.retain(|_, (_, _, at)| at.elapsed() < PENDING_TTL);
                    }
                    if pending.len() < PENDING_MAX {
                        pending.insert(txid, (client, in_port, Instant::now()));
                    }
                }
            } else if query_malformed {
                stats.ignored(Ignored::Malformed);
            } else if let Err(why) = relayed {
                stats.ignored(why);
            }
            // Keep the frame to carry a reply later, or give it back.
            if stash.len() < STASH {
                stash.push(frame);
            } else {
                give_back(&mut to_worker, SlowPathReturn::Free(frame));
            }
        }
        while let Ok(n) = socket.recv(&mut buf) {
            idle = false;
            let Ok(reply) = RelayReply::parse(&buf[..n], &key) else {
                stats.replies_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if let Some((_, addrs, _)) = reports.remove(&reply.txid) {
                let n = addrs.len() as u64;
                stats.seen_reported.fetch_add(n, Ordering::Relaxed);
                continue;
            }
            let (Some((client, port, _)), Some(mut frame)) =
                (pending.remove(&reply.txid), stash.pop())
            else {
                stats.replies_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let Some(bytes) = reply_frame(&gateway, &reply, client) else {
                stash.push(frame);
                stats.replies_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let room = memory.set_len(&mut frame, bytes.len());
            if room < bytes.len() {
                stash.push(frame);
                stats.replies_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            memory.data_mut(&mut frame)[..bytes.len()].copy_from_slice(&bytes);
            stats.replies.fetch_add(1, Ordering::Relaxed);
            give_back(&mut to_worker, SlowPathReturn::Transmit(frame, port));
        }
        if idle {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    for frame in stash {
        give_back(&mut to_worker, SlowPathReturn::Free(frame));
    }
    Ok(())
}

/// The edge's neighbours: its own outside addresses (answered like a gateway) and the outside
/// next hop it resolves.
#[derive(Debug, Clone)]
pub struct EdgeNeighbors {
    /// The edge's outside MAC and addresses; ARP and NS for them are answered.
    pub own: Gateway,
    /// The outside port.
    pub outside: PortId,
    /// The next hop to resolve, by ARP or neighbour solicitation (none: configured statically).
    pub next_hop: Option<IpAddr>,
    /// Where the edge slow paths of all workers share the next hop's MAC: a reply reaches
    /// the worker of whichever queue the neighbour's kernel picked.
    pub shared: Arc<SharedNeighbor>,
    /// This slow path sends the probes (one of the workers' does).
    pub probe: bool,
}

/// A MAC address that any thread can publish and every thread read.
#[derive(Debug, Default)]
pub struct SharedNeighbor(AtomicU64);

impl SharedNeighbor {
    /// Bit set once a MAC (the low 48 bits) is known.
    const KNOWN: u64 = 1 << 63;

    /// The MAC last published, if any.
    pub fn get(&self) -> Option<[u8; 6]> {
        let v = self.0.load(Ordering::Acquire);
        (v & Self::KNOWN != 0).then(|| {
            let b = v.to_be_bytes();
            [b[2], b[3], b[4], b[5], b[6], b[7]]
        })
    }

    /// Publishes `mac`.
    pub fn set(&self, mac: [u8; 6]) {
        let [a, b, c, d, e, f] = mac;
        self.0.store(
            Self::KNOWN | u64::from_be_bytes([0, 0, a, b, c, d, e, f]),
            Ordering::Release,
        );
    }
}

/// How often the next hop is asked for while unknown, and refreshed once known.
const PROBE_UNKNOWN: Duration = Duration::from_secs(1);
const PROBE_KNOWN: Duration = Duration::from_secs(30);

/// Runs the edge slow path until `stop` is set: answers ARP/ND for the edge's own outside
/// addresses, resolves the outside next hop (from its ARP replies, or any ARP it sends; probes
/// only if `neighbors.probe`), publishes it to the other workers' slow paths and tells its own
/// worker over `learned` whatever any of them heard.
pub fn run_edge<M: FrameMemory>(
    mut memory: M,
    neighbors: EdgeNeighbors,
    mut from_worker: rtrb::Consumer<SlowPathFrame<M::Frame>>,
    mut to_worker: rtrb::Producer<SlowPathReturn<M::Frame>>,
    mut learned: rtrb::Producer<SwitchUpdate>,
    stop: Arc<AtomicBool>,
    stats: Arc<SlowPathStats>,
) {
    let mut spare: Vec<M::Frame> = Vec::new();
    let mut known: Option<[u8; 6]> = None;
    let mut next_probe = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let mut idle = true;
        while let Ok(SlowPathFrame { mut frame, in_port }) = from_worker.pop() {
            idle = false;
            if in_port == SPARE_FRAME {
                spare.push(frame);
                continue;
            }
            let len = memory.len(&frame);
            if let Some(next_hop) = neighbors.next_hop {
                let bytes = &memory.data_mut(&mut frame)[..len];
                let heard = match next_hop {
                    IpAddr::V4(v4) => arp_sender(bytes, v4),
                    IpAddr::V6(v6) => nd_sender(bytes, v6),
                };
                if let Some(mac) = heard {
                    if neighbors.shared.get() != Some(mac) {
                        tracing::info!("outside next hop {next_hop} is at {mac:02x?}");
                        neighbors.shared.set(mac);
                    }
                }
            }
            if in_port == neighbors.outside {
                let room = memory.set_len(&mut frame, 128.max(len));
                let answer = neighbors
                    .own
                    .answer(&mut memory.data_mut(&mut frame)[..room], len);
                if let Ok(Answer::Reply(n)) = answer {
                    memory.set_len(&mut frame, n);
                    stats.gateway_answers.fetch_add(1, Ordering::Relaxed);
                    give_back(&mut to_worker, SlowPathReturn::Transmit(frame, in_port));
                    continue;
                }
                memory.set_len(&mut frame, len);
                if answer.is_err() {
                    stats.ignored(Ignored::Malformed);
                } else {
                    stats.ignored(Ignored::NotForUs);
                }
            } else {
                stats.ignored(Ignored::NotForUs);
            }
            if spare.len() < STASH {
                spare.push(frame);
            } else {
                give_back(&mut to_worker, SlowPathReturn::Free(frame));
            }
        }
        if let Some(mac) = neighbors.shared.get().filter(|mac| known != Some(*mac)) {
            if learned.push(SwitchUpdate::NextHopMac(mac)).is_ok() {
                if known.is_none() {
                    next_probe = Instant::now() + PROBE_KNOWN;
                }
                known = Some(mac);
            }
        }
        if let Some(next_hop) = neighbors.next_hop.filter(|_| neighbors.probe) {
            if Instant::now() >= next_probe {
                if let Some(mut frame) = spare.pop() {
                    let room = memory.set_len(&mut frame, NS_FRAME_LEN);
                    let own = &neighbors.own;
                    let written = match (next_hop, own.v4, own.v6.first()) {
                        (IpAddr::V4(target), Some(from), _) if room >= ARP_FRAME_LEN => {
                            arp_request(
                                &mut memory.data_mut(&mut frame)[..ARP_FRAME_LEN],
                                own.mac,
                                from,
                                target,
                            );
                            Some(ARP_FRAME_LEN)
                        }
                        (IpAddr::V6(target), _, Some(from)) if room >= NS_FRAME_LEN => {
                            neighbor_solicitation(
                                &mut memory.data_mut(&mut frame)[..NS_FRAME_LEN],
                                own.mac,
                                *from,
                                target,
                            )
                        }
                        _ => None,
                    };
                    match written {
                        Some(n) => {
                            memory.set_len(&mut frame, n);
                            give_back(
                                &mut to_worker,
                                SlowPathReturn::Transmit(frame, neighbors.outside),
                            );
                        }
                        None => give_back(&mut to_worker, SlowPathReturn::Free(frame)),
                    }
                    next_probe = Instant::now()
                        + if known.is_some() {
                            PROBE_KNOWN
                        } else {
                            PROBE_UNKNOWN
                        };
                }
            }
        }
        if idle {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    for frame in spare {
        give_back(&mut to_worker, SlowPathReturn::Free(frame));
    }
}

/// Bytes of an Ethernet frame carrying ARP, padded to the minimum.
const ARP_FRAME_LEN: usize = 60;
/// Bytes of a neighbour solicitation with a source link-layer address option.
const NS_FRAME_LEN: usize = 14 + 40 + 32;

/// The MAC a neighbour advertisement for `of` gives (or a solicitation `of` sends).
fn nd_sender(frame: &[u8], of: Ipv6Addr) -> Option<[u8; 6]> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EtherType::Ipv6 {
        return None;
    }
    let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
    let ip_repr = Ipv6Repr::parse(&ip).ok()?;
    if ip_repr.next_header != IpProtocol::Icmpv6 || ip_repr.hop_limit != 255 {
        return None;
    }
    let pseudo = PseudoHeader::V6 {
        src: ip_repr.src_addr,
        dst: ip_repr.dst_addr,
    };
    let icmp = Icmpv6Packet::new_checked(ip.payload()).ok()?;
    match Icmpv6Repr::parse(&icmp, &pseudo).ok()? {
        Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            target_addr,
            lladdr,
            ..
        }) if target_addr == of => Some(lladdr.unwrap_or(eth.src_addr()).0),
        Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
            lladdr: Some(mac), ..
        }) if ip_repr.src_addr == of => Some(mac.0),
        _ => None,
    }
}

/// Writes a neighbour solicitation for `target` from `ip` (with our MAC as the source
/// link-layer option) into `frame` (NS_FRAME_LEN bytes); returns its length.
fn neighbor_solicitation(
    frame: &mut [u8],
    mac: EthernetAddress,
    ip: Ipv6Addr,
    target: Ipv6Addr,
) -> Option<usize> {
    let t = target.octets();
    // RFC 4861 §4.3: to the solicited-node multicast address of the target.
    let dst = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(t[13]),
        u16::from_be_bytes([t[14], t[15]]),
    );
    let ns = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
        target_addr: target,
        lladdr: Some(mac),
    });
    let icmp_len = ns.buffer_len();
    let total = 14 + 40 + icmp_len;
    let frame = frame.get_mut(..total)?;
    EthernetRepr {
        src_addr: mac,
        dst_addr: EthernetAddress::ipv6_multicast(&dst),
        vlan_tci: None,
        ethertype: EtherType::Ipv6,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut frame[..]))
    .ok()?;
    Ipv6Repr {
        src_addr: ip,
        dst_addr: dst,
        next_header: IpProtocol::Icmpv6,
        payload_len: icmp_len as u16,
        hop_limit: 255,
        traffic_class: 0,
        flow_label: 0,
    }
    .emit(&mut Ipv6Packet::new_unchecked(&mut frame[14..54]))
    .ok()?;
    ns.emit(
        &mut Icmpv6Packet::new_unchecked(&mut frame[54..total]),
        &PseudoHeader::V6 { src: ip, dst },
    )
    .ok()?;
    Some(total)
}

/// The sender MAC of an ARP packet (request or reply) sent by `from`.
fn arp_sender(frame: &[u8], from: Ipv4Addr) -> Option<[u8; 6]> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EtherType::Arp {
        return None;
    }
    let arp = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).ok()?).ok()?;
    (arp.source_protocol_addr == from).then_some(arp.source_hardware_addr.0)
}

/// Writes a broadcast ARP request for `target` into `frame` (ARP_FRAME_LEN bytes).
fn arp_request(frame: &mut [u8], mac: EthernetAddress, ip: Ipv4Addr, target: Ipv4Addr) {
    frame.fill(0);
    frame[0..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&mac.0);
    frame[12..14].copy_from_slice(&[0x08, 0x06]);
    let request = ArpRepr {
        operation: ArpOperation::Request,
        source_hardware_addr: mac,
        source_protocol_addr: ip,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    // 28 bytes of ARP after the Ethernet header; the frame is ARP_FRAME_LEN ≥ 42 bytes.
    let _ = request.emit(&mut ArpPacket::new_unchecked(&mut frame[14..42]));
}

fn give_back<F>(ring: &mut rtrb::Producer<SlowPathReturn<F>>, mut ret: SlowPathReturn<F>) {
    // The return ring is as large as the slow-path ring, so it has room for every frame the
    // slow path holds; waiting here is the slow path waiting, never the worker.
    loop {
        match ring.push(ret) {
            Ok(()) => return,
            Err(rtrb::PushError::Full(back)) => {
                ret = back;
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
}

/// If `frame` is a UDP datagram to the allocator port, writes its `Relay` into `out` and
/// returns the transaction ID and the client's address; else says why not.
fn relay_request(
    frame: &[u8],
    sid: Sid,
    in_port: PortId,
    key: &ring::hmac::Key,
    out: &mut Vec<u8>,
) -> Result<(u32, IpAddr), Ignored> {
    use Ignored::{Malformed, NotForUs};
    let eth = EthernetFrame::new_checked(frame).map_err(|_| Malformed)?;
    let l2 = eth.l2_header().map_err(|_| Malformed)?;
    let src_mac = eth.src_addr().0;
    let ip = &frame[l2.payload_offset..];
    let (client, next_header, l4): (IpAddr, _, _) = match l2.ethertype {
        EtherType::Ipv4 => {
            let p = Ipv4Packet::new_checked(ip).map_err(|_| Malformed)?;
            if p.is_fragment() {
                return Err(NotForUs);
            }
            // Within the buffer: new_checked checked both lengths.
            let payload = usize::from(p.header_len())..usize::from(p.total_len());
            (p.src_addr().into(), p.next_header(), &ip[payload])
        }
        EtherType::Ipv6 => {
            let p = Ipv6Packet::new_checked(ip).map_err(|_| Malformed)?;
            let payload = IPV6_HEADER_LEN..IPV6_HEADER_LEN + usize::from(p.payload_len());
            (p.src_addr().into(), p.next_header(), &ip[payload])
        }
        _ => return Err(NotForUs),
    };
    if next_header != IpProtocol::Udp {
        return Err(NotForUs);
    }
    let udp = UdpPacket::new_checked(l4).map_err(|_| Malformed)?;
    if udp.dst_port() != ALLOC_PORT {
        return Err(NotForUs);
    }
    let inner = udp.payload();
    let header = proto::check_len(inner).map_err(|_| Malformed)?;
    // Reports of what the switch saw are the switch's own, never a client's.
    if header.msg_type == MsgType::Seen {
        return Err(NotForUs);
    }
    let relay = Relay {
        txid: header.txid,
        info: RelayInfo {
            sid,
            ingress_port: in_port,
            mac: Mac(src_mac),
            client_port: udp.src_port(),
        },
        timestamp_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        inner,
    };
    out.clear();
    relay.emit(key, out).map_err(|_| Malformed)?;
    Ok((header.txid, client))
}

/// Writes into `out` the `Relay` of a `Seen` report of `addrs` (at most 255, of `family`).
fn seen_relay(
    sid: Sid,
    key: &ring::hmac::Key,
    txid: u32,
    family: Family,
    addrs: &[IpAddr],
    out: &mut Vec<u8>,
) -> Result<(), proto::EmitError> {
    let mut inner = Vec::with_capacity(8 + 2 + addrs.len() * 16);
    ClientMsg::Seen(proto::Release {
        family,
        addrs: addrs.to_vec(),
    })
    .emit(txid, &mut inner)?;
    out.clear();
    Relay {
        txid,
        info: RelayInfo {
            sid,
            ingress_port: 0,
            mac: Mac([0; 6]),
            client_port: 0,
        },
        timestamp_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        inner: &inner,
    }
    .emit(key, out)
}

/// The frame that carries an allocator reply from the gateway to the client.
fn reply_frame(gateway: &Gateway, reply: &RelayReply<'_>, client: IpAddr) -> Option<Vec<u8>> {
    const ETH: usize = 14;
    const UDP: usize = 8;
    let payload = reply.inner;
    let udp_len = UDP + payload.len();
    let (ethertype, ip_len, pseudo) = match client {
        IpAddr::V4(c) => {
            // A client without an address yet asked from 0.0.0.0: answer by broadcast.
            let dst = if c.is_unspecified() {
                Ipv4Addr::BROADCAST
            } else {
                c
            };
            let src = gateway.v4?;
            (EtherType::Ipv4, 20, PseudoHeader::V4 { src, dst })
        }
        IpAddr::V6(dst) => {
            let src = *gateway.v6.first()?;
            (EtherType::Ipv6, 40, PseudoHeader::V6 { src, dst })
        }
    };
    let mut out = vec![0u8; ETH + ip_len + udp_len];
    let eth = EthernetRepr {
        src_addr: gateway.mac,
        dst_addr: EthernetAddress(reply.info.mac.0),
        vlan_tci: None,
        ethertype,
    };
    eth.emit(&mut EthernetFrame::new_unchecked(&mut out[..]))
        .ok()?;
    let payload_len = u16::try_from(udp_len).ok()?;
    let ip = &mut out[ETH..];
    match pseudo {
        PseudoHeader::V4 { src, dst } => Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Udp,
            payload_len,
            ttl: 64,
            dscp: 0,
            ecn: 0,
            ident: 0,
            dont_frag: true,
        }
        .emit(&mut Ipv4Packet::new_unchecked(ip)),
        PseudoHeader::V6 { src, dst } => Ipv6Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Udp,
            payload_len,
            hop_limit: 64,
            traffic_class: 0,
            flow_label: 0,
        }
        .emit(&mut Ipv6Packet::new_unchecked(ip)),
    }
    .ok()?;
    let mut udp = UdpPacket::new_unchecked(&mut out[ETH + ip_len..]);
    UdpRepr {
        src_port: ALLOC_PORT,
        dst_port: reply.info.client_port,
        payload_len: u16::try_from(payload.len()).ok()?,
    }
    .emit(&mut udp)
    .ok()?;
    udp.payload_mut().copy_from_slice(payload);
    udp.fill_checksum(&pseudo);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port::mem::{MemFrame, MemMemory};
    use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

    #[test]
    fn a_next_hop_heard_by_any_worker_s_edge_slow_path_reaches_every_worker() {
        const NEXT_HOP_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x99];
        let next_hop = Ipv4Addr::new(198, 18, 200, 2);
        let shared = Arc::new(SharedNeighbor::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for probe in [true, false] {
            let neighbors = EdgeNeighbors {
                own: Gateway {
                    mac: EthernetAddress([2, 0, 0, 0, 0, 0xe2]),
                    v4: Some(Ipv4Addr::new(198, 18, 200, 1)),
                    v6: Vec::new(),
                },
                outside: 1,
                next_hop: Some(IpAddr::V4(next_hop)),
                shared: Arc::clone(&shared),
                probe,
            };
            let (to_slow, from_worker) = rtrb::RingBuffer::new(16);
            let (to_worker, back) = rtrb::RingBuffer::new(16);
            let (learned_tx, learned) = rtrb::RingBuffer::new(16);
            let (stop, stats) = (Arc::clone(&stop), Arc::default());
            let thread = std::thread::spawn(move || {
                run_edge(
                    MemMemory,
                    neighbors,
                    from_worker,
                    to_worker,
                    learned_tx,
                    stop,
                    stats,
                )
            });
            workers.push((to_slow, back, learned, thread));
        }
        // The neighbour's ARP reaches the worker that does not probe.
        let mut arp = vec![0u8; ARP_FRAME_LEN];
        let target = Ipv4Addr::new(198, 18, 200, 1);
        arp_request(&mut arp, EthernetAddress(NEXT_HOP_MAC), next_hop, target);
        let heard = SlowPathFrame {
            frame: MemFrame::from_bytes(&arp),
            in_port: 1,
        };
        assert!(workers[1].0.push(heard).is_ok());
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut learned = [None, None];
        while learned.contains(&None) && Instant::now() < deadline {
            for (i, (_, _, ring, _)) in workers.iter_mut().enumerate() {
                if let Ok(SwitchUpdate::NextHopMac(mac)) = ring.pop() {
                    learned[i] = Some(mac);
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(learned, [Some(NEXT_HOP_MAC); 2]);
        stop.store(true, Ordering::Relaxed);
        for (_, _, _, thread) in workers {
            thread.join().unwrap();
        }
    }

    const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x42];
    const GW_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const SECRET: &[u8] = b"access-switch-7-key-0123456789abcdef";

    /// The access slow path of SID 7 (gateway 198.18.1.1 and fe80::1) on its own thread,
    /// relaying to `allocator`: the worker's ends of its rings, and how to stop it.
    struct Running {
        to_slow: rtrb::Producer<SlowPathFrame<MemFrame>>,
        back: rtrb::Consumer<SlowPathReturn<MemFrame>>,
        seen: rtrb::Producer<IpAddr>,
        stop: Arc<AtomicBool>,
        stats: Arc<SlowPathStats>,
        thread: std::thread::JoinHandle<std::io::Result<()>>,
    }

    fn start_access(allocator: SocketAddr) -> Running {
        let gateway = Gateway {
            mac: EthernetAddress(GW_MAC),
            v4: Some(Ipv4Addr::new(198, 18, 1, 1)),
            v6: vec!["fe80::1".parse().unwrap()],
        };
        let relay = RelayConfig {
            sid: 7,
            allocator,
            key: SECRET.to_vec(),
        };
        let (to_slow, from_worker) = rtrb::RingBuffer::new(64);
        let (to_worker, back) = rtrb::RingBuffer::new(64);
        let (seen, seen_rx) = rtrb::RingBuffer::new(64);
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(SlowPathStats::default());
        let thread = {
            let (stop, stats) = (Arc::clone(&stop), Arc::clone(&stats));
            std::thread::spawn(move || {
                run_access(
                    MemMemory,
                    gateway,
                    relay,
                    from_worker,
                    to_worker,
                    seen_rx,
                    stop,
                    stats,
                )
            })
        };
        Running {
            to_slow,
            back,
            seen,
            stop,
            stats,
            thread,
        }
    }

    #[test]
    fn frames_the_access_slow_path_has_no_use_for_are_counted_by_why() {
        // Nothing listens there: nothing is relayed in this test.
        let Running {
            mut to_slow,
            back: _back,
            stop,
            stats,
            thread,
            ..
        } = start_access("127.0.0.1:9".parse().unwrap());
        let arp = |target: [u8; 4], len: usize| {
            let mut f = vec![0xff; 6];
            f.extend_from_slice(&CLIENT_MAC);
            f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
            f.extend_from_slice(&CLIENT_MAC);
            f.extend_from_slice(&[198, 18, 1, 10, 0, 0, 0, 0, 0, 0]);
            f.extend_from_slice(&target);
            f.truncate(len);
            f
        };
        let udp = |port: u16, payload: &[u8]| {
            let mut f = Vec::new();
            PacketBuilder::ethernet2(CLIENT_MAC, GW_MAC)
                .ipv4([198, 18, 1, 10], [198, 18, 1, 1], 64)
                .udp(41000, port)
                .write(&mut f, payload)
                .unwrap();
            f
        };
        let frames = [
            // Malformed: an ARP cut short, an allocator request too short for its header.
            arp([198, 18, 1, 1], 30),
            udp(ALLOC_PORT, b"MQ"),
            // For someone else: ARP for another address, UDP to another port.
            arp([198, 18, 1, 77], 42),
            udp(53, b"query"),
        ];
        for f in &frames {
            to_slow
                .push(SlowPathFrame {
                    frame: MemFrame::from_bytes(f),
                    in_port: 0,
                })
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let counted = loop {
            let c = stats.snapshot();
            if c.ignored_malformed + c.ignored_not_for_us >= 4 || Instant::now() > deadline {
                break c;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        stop.store(true, Ordering::Relaxed);
        thread.join().unwrap().unwrap();
        assert_eq!(
            counted,
            SlowPathCounters {
                ignored_malformed: 2,
                ignored_not_for_us: 2,
                ..SlowPathCounters::default()
            }
        );
    }

    #[test]
    fn first_packets_are_reported_as_seen_again_until_the_allocator_answers() {
        let allocator = UdpSocket::bind("127.0.0.1:0").unwrap();
        allocator
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let Running {
            mut seen,
            stop,
            stats,
            thread,
            ..
        } = start_access(allocator.local_addr().unwrap());
        let ips: [IpAddr; 3] = [
            "198.18.1.10".parse().unwrap(),
            "fd00:1::10".parse().unwrap(),
            "198.18.1.11".parse().unwrap(),
        ];
        ips.iter().for_each(|ip| seen.push(*ip).unwrap());
        let key = proto::key(SECRET);
        let mut buf = [0u8; 2048];
        let mut receive = || {
            let (n, from) = allocator.recv_from(&mut buf).unwrap();
            let relay = Relay::parse(&buf[..n], |sid| (sid == 7).then_some(&key)).unwrap();
            let Ok((_, ClientMsg::Seen(m))) = ClientMsg::parse(relay.inner) else {
                panic!("a Seen report, not {:?}", relay.inner)
            };
            (relay.txid, relay.info, relay.timestamp_ms, m, from)
        };
        // One report per family; neither answered, so both come again.
        let mut first = [receive(), receive()];
        first.sort_by_key(|r| r.3.addrs.len());
        assert_eq!(first[0].3.addrs, [ips[1]]);
        assert_eq!(first[1].3.addrs, [ips[0], ips[2]]);
        let again = receive();
        assert!(first.iter().any(|f| f.0 == again.0 && f.3 == again.3));
        // Each sending is a fresh relay (the allocator's replay cache keys on the timestamp).
        let original = first.iter().find(|f| f.0 == again.0).unwrap();
        assert!(again.2 >= original.2);
        for (txid, info, _, _, from) in &first {
            let mut reply = Vec::new();
            RelayReply {
                txid: *txid,
                info: *info,
                inner: b"ack",
            }
            .emit(&key, &mut reply)
            .unwrap();
            allocator.send_to(&reply, from).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while stats.seen_reported.load(Ordering::Relaxed) < 3 {
            assert!(Instant::now() < deadline, "{:?}", stats.snapshot());
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        thread.join().unwrap().unwrap();
        let s = stats.snapshot();
        assert_eq!(s.seen_reported, 3);
        assert!(s.seen_resent >= 1, "{s:?}");
        assert_eq!(s.replies_dropped, 0, "{s:?}");
    }

    #[test]
    fn a_client_cannot_report_itself_seen() {
        let mut frame = Vec::new();
        let mut inner = Vec::new();
        ClientMsg::Seen(proto::Release {
            family: Family::V4,
            addrs: vec!["198.18.1.10".parse().unwrap()],
        })
        .emit(1, &mut inner)
        .unwrap();
        PacketBuilder::ethernet2(CLIENT_MAC, GW_MAC)
            .ipv4([198, 18, 1, 10], [198, 18, 1, 1], 64)
            .udp(41000, ALLOC_PORT)
            .write(&mut frame, &inner)
            .unwrap();
        let key = proto::key(SECRET);
        assert_eq!(
            relay_request(&frame, 7, 0, &key, &mut Vec::new()),
            Err(Ignored::NotForUs)
        );
    }

    #[test]
    fn requests_are_relayed_with_sid_mac_and_port_and_replies_reach_the_client() {
        let allocator = UdpSocket::bind("127.0.0.1:0").unwrap();
        let Running {
            mut to_slow,
            mut back,
            stop,
            stats,
            thread,
            ..
        } = start_access(allocator.local_addr().unwrap());

        // A client message as the agent sends it: header magic "MQ", version, type, txid.
        let inner = [
            b'M', b'Q', 1, 0x01, 0xde, 0xad, 0xbe, 0xef, 4, 1, 0, 0, 0, 0, 0, 0, 0, 9,
        ];
        let mut request = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, GW_MAC)
            .ipv4([0, 0, 0, 0], [198, 18, 1, 1], 64)
            .udp(41000, ALLOC_PORT)
            .write(&mut request, &inner)
            .unwrap();
        to_slow
            .push(SlowPathFrame {
                frame: MemFrame::from_bytes(&request),
                in_port: 0,
            })
            .unwrap();

        // The allocator side: one relayed request, authenticated with the switch's key.
        allocator
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 2048];
        let (n, from) = allocator.recv_from(&mut buf).unwrap();
        let key = proto::key(SECRET);
        let relayed = Relay::parse(&buf[..n], |sid| (sid == 7).then_some(&key)).unwrap();
        assert_eq!(relayed.txid, 0xdeadbeef);
        assert_eq!(
            relayed.info,
            RelayInfo {
                sid: 7,
                ingress_port: 0,
                mac: Mac(CLIENT_MAC),
                client_port: 41000
            }
        );
        assert_eq!(relayed.inner, &inner);
        let mut reply = Vec::new();
        RelayReply {
            txid: relayed.txid,
            info: relayed.info,
            inner: b"MQ-reply-bytes",
        }
        .emit(&key, &mut reply)
        .unwrap();
        allocator.send_to(&reply, from).unwrap();
        // A forged reply (wrong key) is dropped.
        let mut forged = Vec::new();
        RelayReply {
            txid: relayed.txid,
            info: relayed.info,
            inner: b"evil",
        }
        .emit(
            &proto::key(b"some-other-key-some-other-key-1234"),
            &mut forged,
        )
        .unwrap();
        allocator.send_to(&forged, from).unwrap();

        let deadline = Instant::now() + Duration::from_secs(5);
        let delivered = loop {
            if let Ok(SlowPathReturn::Transmit(frame, port)) = back.pop() {
                break (frame, port);
            }
            assert!(Instant::now() < deadline, "no reply delivered");
            std::thread::sleep(Duration::from_millis(5));
        };
        stop.store(true, Ordering::Relaxed);
        thread.join().unwrap().unwrap();
        let (frame, port) = delivered;
        assert_eq!(port, 0, "back out of the client port");
        let p = SlicedPacket::from_ethernet(frame.bytes()).unwrap();
        assert_eq!(&frame.bytes()[0..6], &CLIENT_MAC);
        let Some(NetSlice::Ipv4(ip)) = p.net else {
            panic!("IPv4")
        };
        assert_eq!(
            ip.header().destination_addr(),
            Ipv4Addr::BROADCAST,
            "the client had no address"
        );
        assert_eq!(ip.header().source_addr(), Ipv4Addr::new(198, 18, 1, 1));
        let Some(TransportSlice::Udp(udp)) = p.transport else {
            panic!("UDP")
        };
        assert_eq!(
            (udp.source_port(), udp.destination_port()),
            (ALLOC_PORT, 41000)
        );
        assert_eq!(udp.payload(), b"MQ-reply-bytes");
        // Header and UDP checksums as an independent implementation computes them.
        let h = ip.header().to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        let u = udp.to_header();
        let want = u.calc_checksum_ipv4(&h, udp.payload()).unwrap();
        assert_eq!(u.checksum, want, "UDP checksum");
        assert_eq!((h.time_to_live, h.dont_fragment), (64, true));
        assert_eq!(stats.relayed.load(Ordering::Relaxed), 1);
        assert_eq!(stats.replies.load(Ordering::Relaxed), 1);
        assert!(
            stats.replies_dropped.load(Ordering::Relaxed) >= 1,
            "the forged reply"
        );
    }

    #[test]
    fn a_solicitation_for_the_next_hop_is_answered_and_the_answer_names_its_mac() {
        let me = EthernetAddress([2, 0, 0, 0, 0, 0xe2]);
        let router_mac = [2, 0, 0, 0, 0, 0x99];
        let (mine, router): (Ipv6Addr, Ipv6Addr) = (
            "fd00:200::1".parse().unwrap(),
            "fd00:200::2".parse().unwrap(),
        );
        let mut frame = vec![0u8; 128];
        let n = neighbor_solicitation(&mut frame, me, mine, router).unwrap();
        assert_eq!(n, NS_FRAME_LEN);
        assert_eq!(
            &frame[0..6],
            &[0x33, 0x33, 0xff, 0, 0, 2],
            "solicited-node multicast"
        );
        // The router (played by a gateway that owns the address) answers it ...
        let router_side = Gateway {
            mac: EthernetAddress(router_mac),
            v4: None,
            v6: vec![router],
        };
        let Ok(Answer::Reply(m)) = router_side.answer(&mut frame, n) else {
            panic!("not answered")
        };
        // ... and the answer gives the edge the router's MAC; nothing else does.
        assert_eq!(nd_sender(&frame[..m], router), Some(router_mac));
        assert_eq!(nd_sender(&frame[..m], mine), None);
        assert_eq!(nd_sender(&frame[..20], router), None, "truncated");
    }
}
