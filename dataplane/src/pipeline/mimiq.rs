//! The MIMIQ switch roles (seed 000 §3.3, ARCHITECTURE §1, §4): the edge switch and the access
//! switch, as pipelines over bursts. Both look addresses up in [`Tables`], which the allocator's
//! rule updates change between bursts, and both take time from [`Pipeline::tick`].
//!
//! Edge, downstream (outside → inside): IPv6 destination → alias bits → SID, IPv4 destination →
//! exact binding → SID; the packet is encapsulated in an outer IPv6 header from the edge's
//! internal address to that access switch's and sent inside. Upstream (inside → outside): MAC
//! rewrite to the outside next hop, TTL/hop-limit decrement.
//!
//! Access, upstream (clients → uplink): allocator requests to the gateway (UDP 6363) and ARP/ND
//! go to the slow path; anything else must come from a live binding — the (source MAC, source
//! IP) pair the allocator bound to this SID — or it is dropped as spoofed; then MAC rewrite
//! towards the edge and TTL decrement. Downstream (uplink → clients): only IP-in-IP from the
//! edge's internal address to ours is accepted; it is decapsulated, the inner destination's
//! binding gives the client's MAC (passive learning: the switch never resolves clients), L2 is
//! rewritten and the packet goes to the client port.
//!
//! No copy: encapsulation writes the outer header in front of the packet, in the frame's
//! headroom, and decapsulation moves the frame's start past it ([`FrameMemory::adjust_head`];
//! vendor/xsk-rs/MIMIQ-PATCH.md); the payload stays where the NIC put it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use mimiq_allocator::lease::Sequenced;
use mimiq_allocator::Sid;

use super::{DropReason, Pipeline, Verdict};
use crate::port::{FrameMemory, PortId};
use crate::tables::Tables;
use crate::wire::checksum::{decrement_ipv4_ttl, decrement_ipv6_hop_limit};
use crate::wire::ethernet::HEADER_LEN as ETH_LEN;
use crate::wire::ipv4::MIN_HEADER_LEN as IPV4_MIN;
use crate::wire::ipv6::HEADER_LEN as IPV6_LEN;
use crate::wire::{
    EtherType, EthernetAddress, EthernetFrame, IpProtocol, Ipv4Packet, Ipv6Packet, UdpPacket,
};

/// UDP port of allocator requests to the gateway (ARCHITECTURE §5).
pub const ALLOC_PORT: u16 = 6363;

/// A change to a MIMIQ switch's state, applied by its worker between bursts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwitchUpdate {
    /// A rule from the allocator's stream.
    Rule(Sequenced),
    /// The slow path resolved the (outside) next hop to this MAC.
    NextHopMac([u8; 6]),
}

impl From<Sequenced> for SwitchUpdate {
    fn from(s: Sequenced) -> Self {
        SwitchUpdate::Rule(s)
    }
}

/// An IPv4 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V4Prefix {
    /// Network address.
    pub addr: Ipv4Addr,
    /// Prefix length.
    pub len: u8,
}

impl V4Prefix {
    fn contains(&self, a: u32) -> bool {
        let mask = if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len.min(32)))
        };
        a & mask == u32::from(self.addr) & mask
    }
}

/// An access switch as the edge sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessSwitch {
    /// Its SID.
    pub sid: Sid,
    /// Its internal address (outer destination; its family picks the outer header).
    pub internal: IpAddr,
    /// Its MAC on the internal link.
    pub mac: [u8; 6],
}

/// The edge switch's configuration.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// Port towards the access switches.
    pub inside: PortId,
    /// Port towards the outside.
    pub outside: PortId,
    /// Our MAC on the inside link.
    pub inside_mac: [u8; 6],
    /// Our MAC on the outside link.
    pub outside_mac: [u8; 6],
    /// The outside next hop's MAC, if known from the config; else the slow path resolves it
    /// and upstream traffic is dropped (`no_neighbor`) until it has.
    pub outside_next_hop_mac: Option<[u8; 6]>,
    /// Our internal address (outer source): IPv6 by default, IPv4 for IPv4-only internal
    /// networks (ARCHITECTURE §4); the access switches' addresses are of the same family.
    pub internal: IpAddr,
    /// The access switches.
    pub access: Vec<AccessSwitch>,
    /// The IPv6 client pool prefix.
    pub v6_prefix: Ipv6Addr,
    /// Its length (the alias bits follow it).
    pub v6_prefix_len: u8,
    /// Alias bits.
    pub alias_bits: u8,
    /// Alias epochs stay valid for this many rotations.
    pub alias_k: u64,
    /// The IPv4 client pools.
    pub v4_pools: Vec<V4Prefix>,
}

/// No tunnel for this SID in [`Edge`]'s index (larger than any index into its tunnels).
const NO_TUNNEL: u16 = u16::MAX;

/// The edge switch pipeline.
pub struct Edge {
    cfg: EdgeConfig,
    tables: Tables,
    now_ms: u64,
    /// Index by SID into `tunnels` ([`NO_TUNNEL`]: none): 128 KiB, where a table of
    /// `Option<usize>` took 1 MiB of cache.
    by_sid: Vec<u16>,
    /// Per access switch: its MAC and the outer header towards it, prebuilt.
    tunnels: Vec<Tunnel>,
    v6_prefix: u128,
    v6_mask: u128,
}

impl Edge {
    /// An edge switch with empty tables (they fill from a snapshot).
    pub fn new(cfg: EdgeConfig) -> Self {
        let mut by_sid = vec![NO_TUNNEL; 1 << 16];
        // Configurations list fewer than `NO_TUNNEL` access switches (config.rs validates it).
        for (i, a) in cfg.access.iter().enumerate().take(usize::from(NO_TUNNEL)) {
            by_sid[usize::from(a.sid)] = i as u16;
        }
        let plen = u32::from(cfg.v6_prefix_len.min(128));
        let v6_mask = if plen == 0 {
            0
        } else {
            u128::MAX << (128 - plen)
        };
        Edge {
            tables: Tables::new(plen, u32::from(cfg.alias_bits), cfg.alias_k),
            now_ms: 0,
            by_sid,
            tunnels: cfg
                .access
                .iter()
                .map(|a| Tunnel::new(cfg.internal, a))
                .collect(),
            v6_prefix: u128::from(cfg.v6_prefix) & v6_mask,
            v6_mask,
            cfg,
        }
    }

    /// The tables (for tests and the control thread's checks).
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// Routes a packet from outside: its tunnel, the inner protocol (4 or 41) and the traffic
    /// class the outer header carries; the inner packet has had its hop.
    fn downstream(
        &self,
        data: &mut [u8],
        len: usize,
    ) -> Result<(&Tunnel, IpProtocol, u8), DropReason> {
        let packet = data.get(ETH_LEN..len).ok_or(DropReason::Malformed)?;
        let (sid, inner) = match ethertype(data) {
            EtherType::Ipv6 => {
                let ip = ipv6_header(packet).ok_or(DropReason::Malformed)?;
                if is_neighbor_discovery(packet) {
                    // Resolution of the edge's own outside addresses: the slow path's.
                    return Err(DropReason::NotIp);
                }
                let dst = u128::from(ip.dst_addr());
                if dst & self.v6_mask != self.v6_prefix {
                    return Err(DropReason::NotInPool);
                }
                (
                    self.tables
                        .alias_sid(dst, self.now_ms)
                        .ok_or(DropReason::NoRoute)?,
                    IpProtocol::Ipv6,
                )
            }
            EtherType::Ipv4 => {
                let ip = ipv4_header(packet).ok_or(DropReason::Malformed)?;
                let dst = u32::from(ip.dst_addr());
                if !self.cfg.v4_pools.iter().any(|p| p.contains(dst)) {
                    return Err(DropReason::NotInPool);
                }
                let b = self
                    .tables
                    .binding_v4(dst, self.now_ms)
                    .ok_or(DropReason::NoRoute)?;
                (b.sid, IpProtocol::Ipv4)
            }
            _ => return Err(DropReason::NotIp),
        };
        let tunnel = self
            .tunnels
            .get(usize::from(self.by_sid[usize::from(sid)]))
            .ok_or(DropReason::NoRoute)?;
        if len - ETH_LEN + tunnel.len > usize::from(u16::MAX) {
            return Err(DropReason::TooBig);
        }
        let packet = &mut data[ETH_LEN..len];
        hop(packet, inner)?;
        // RFC 6040 §4.1 (normal mode): the outer header carries the inner DSCP and ECN.
        let tclass = if inner == IpProtocol::Ipv4 {
            Ipv4Packet::new_unchecked(&*packet).dscp_ecn()
        } else {
            Ipv6Packet::new_unchecked(&*packet).traffic_class()
        };
        Ok((tunnel, inner, tclass))
    }

    fn upstream(&self, data: &mut [u8], len: usize) -> Result<(), DropReason> {
        let (version, ethertype) = match ethertype(data) {
            EtherType::Ipv4 => (IpProtocol::Ipv4, EtherType::Ipv4),
            EtherType::Ipv6 => (IpProtocol::Ipv6, EtherType::Ipv6),
            _ => return Err(DropReason::NotIp),
        };
        let next_hop = self
            .cfg
            .outside_next_hop_mac
            .ok_or(DropReason::NoNeighbor)?;
        hop(&mut data[ETH_LEN..len], version)?;
        write_eth(data, next_hop, self.cfg.outside_mac, ethertype);
        Ok(())
    }
}

impl Pipeline for Edge {
    type Update = SwitchUpdate;

    fn apply(&mut self, update: SwitchUpdate) {
        match update {
            SwitchUpdate::Rule(rule) => {
                self.tables.apply(&rule);
            }
            SwitchUpdate::NextHopMac(mac) => self.cfg.outside_next_hop_mac = Some(mac),
        }
    }

    fn tick(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
    }

    fn process<M: FrameMemory>(
        &mut self,
        in_port: PortId,
        memory: &mut M,
        frames: &mut [M::Frame],
        verdicts: &mut Vec<Verdict>,
    ) {
        let this = &*self;
        if in_port == this.cfg.outside {
            // Every lookup of the burst starts loading before the first one waits: with a
            // million bindings, each is a cache miss (tables/map.rs).
            for frame in frames.iter_mut() {
                let len = memory.len(frame);
                this.prefetch_downstream(&memory.data_mut(frame), len);
            }
        }
        each_frame(memory, frames, verdicts, |memory, frame, len| {
            this.verdict(in_port, memory, frame, len)
        });
    }
}

impl Edge {
    /// Starts loading the binding an IPv4 frame from outside will be routed by. (IPv6 goes by
    /// the alias table, 2^alias_bits small slots: at 16 bits it stays in the caches, and its
    /// prefetch measured no gain for 41 more instructions per packet.)
    #[inline(always)]
    fn prefetch_downstream(&self, data: &[u8], len: usize) {
        if ethertype(data) == EtherType::Ipv4 {
            if let Some(ip) = data.get(ETH_LEN..len).and_then(ipv4_header) {
                self.tables.prefetch_v4(u32::from(ip.dst_addr()));
            }
        }
    }

    /// One frame of length `len` (at least an Ethernet header) received on `in_port`.
    pub(super) fn verdict<M: FrameMemory>(
        &self,
        in_port: PortId,
        memory: &mut M,
        frame: &mut M::Frame,
        len: usize,
    ) -> Verdict {
        if in_port == self.cfg.outside {
            let result = self.downstream(&mut memory.data_mut(frame), len);
            let (tunnel, inner_proto, tclass) = match result {
                Ok(route) => route,
                Err(reason) => return non_ip_to_slow_path(&memory.data_mut(frame), reason),
            };
            // The outer header goes in front of the packet, in the frame's headroom: the new
            // start gets the Ethernet header, the old one's place the outer IP header's end.
            if !memory.adjust_head(frame, -(tunnel.len as isize)) {
                return Verdict::Drop(DropReason::NoHeadroom);
            }
            let data = &mut memory.data_mut(frame);
            tunnel.write(
                &mut data[ETH_LEN..ETH_LEN + tunnel.len],
                (len - ETH_LEN) as u16,
                inner_proto,
                tclass,
            );
            write_eth(data, tunnel.mac, self.cfg.inside_mac, tunnel.ethertype);
            Verdict::Forward(self.cfg.inside)
        } else if in_port == self.cfg.inside {
            let result = self.upstream(&mut memory.data_mut(frame), len);
            match result {
                Ok(()) => Verdict::Forward(self.cfg.outside),
                Err(reason) => non_ip_to_slow_path(&memory.data_mut(frame), reason),
            }
        } else {
            Verdict::Drop(DropReason::NoSuchPort)
        }
    }
}

/// The access switch's configuration.
#[derive(Debug, Clone)]
pub struct AccessConfig {
    /// Our SID.
    pub sid: Sid,
    /// Ports towards the clients: 0 to `client_ports - 1`, the port numbers the allocator
    /// records with each lease. A client's traffic is accepted from, and delivered to, only
    /// the port its binding names.
    pub client_ports: PortId,
    /// Port towards the edge.
    pub uplink: PortId,
    /// The gateway's MAC (what clients send to, and the source of what they receive).
    pub gateway_mac: [u8; 6],
    /// The gateway's IPv4 address.
    pub gateway_v4: Option<Ipv4Addr>,
    /// The gateway's IPv6 addresses.
    pub gateway_v6: Vec<Ipv6Addr>,
    /// Our MAC on the uplink.
    pub uplink_mac: [u8; 6],
    /// The edge's MAC on the uplink (next hop upstream).
    pub edge_mac: [u8; 6],
    /// Our internal address (outer destination of what the edge sends us).
    pub internal: IpAddr,
    /// The edge's internal address (the only accepted outer source), of the same family.
    pub edge_internal: IpAddr,
    /// IPv6 pool prefix length and alias bits (for the tables' alias index; unused here).
    pub v6_prefix_len: u8,
    /// Alias bits.
    pub alias_bits: u8,
}

/// The access switch pipeline.
pub struct Access {
    cfg: AccessConfig,
    tables: Tables,
    now_ms: u64,
    /// Our and the edge's internal addresses as 16 bytes (IPv4 as IPv4-mapped: the last four).
    internal: [u8; 16],
    edge_internal: [u8; 16],
    /// The outer header is IPv4 (IPv4-only internal network).
    outer_v4: bool,
    /// Where the first packet forwarded from each binding is reported (the slow path tells
    /// the allocator, for `reclaim_silent_after_ms`).
    seen_tx: Option<rtrb::Producer<IpAddr>>,
    /// Sources of this burst whose binding was not seen yet.
    first_seen: Vec<IpAddr>,
}

impl Access {
    /// An access switch with empty tables (they fill from a snapshot).
    pub fn new(cfg: AccessConfig) -> Self {
        Access {
            tables: Tables::new(u32::from(cfg.v6_prefix_len), u32::from(cfg.alias_bits), 1),
            now_ms: 0,
            internal: as_16(cfg.internal),
            edge_internal: as_16(cfg.edge_internal),
            outer_v4: cfg.internal.is_ipv4(),
            cfg,
            seen_tx: None,
            first_seen: Vec::new(),
        }
    }

    /// Reports the source of the first packet forwarded from each binding on `tx`. A report
    /// the ring has no room for is made at the binding's next packet.
    pub fn report_seen_to(mut self, tx: rtrb::Producer<IpAddr>) -> Self {
        self.seen_tx = Some(tx);
        self
    }

    /// The tables.
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// Marks the binding of `ip` seen, as its first forwarded packet does (benches start from
    /// the steady state this way); false if there is none or it was seen already.
    pub fn mark_seen(&mut self, ip: IpAddr) -> bool {
        self.tables.mark_seen(ip)
    }

    /// A client's frame; the source of a binding not seen yet goes to `first_seen`.
    fn upstream(
        &self,
        port: PortId,
        data: &mut [u8],
        len: usize,
        first_seen: &mut Vec<IpAddr>,
    ) -> Result<Verdict, DropReason> {
        let src_mac = EthernetFrame::new_unchecked(&*data).src_addr().0;
        let packet = data.get(ETH_LEN..len).ok_or(DropReason::Malformed)?;
        let (version, ethertype) = match ethertype(data) {
            EtherType::Ipv4 => {
                if packet.len() < IPV4_MIN {
                    return Err(DropReason::Malformed);
                }
                let ip = Ipv4Packet::new_unchecked(packet);
                if ip.next_header() == IpProtocol::Udp
                    && Some(ip.dst_addr()) == self.cfg.gateway_v4
                    && udp_dst_port(packet, usize::from(ip.header_len())) == ALLOC_PORT
                {
                    return Ok(Verdict::ToSlowPath);
                }
                let src = u32::from(ip.src_addr());
                match self.tables.binding_v4(src, self.now_ms) {
                    Some(b) if b.mac == src_mac && b.sid == self.cfg.sid && b.port == port => {
                        if !b.seen {
                            first_seen.push(Ipv4Addr::from(src).into());
                        }
                    }
                    _ => return Err(DropReason::SpoofedSource),
                }
                (IpProtocol::Ipv4, EtherType::Ipv4)
            }
            EtherType::Ipv6 => {
                if packet.len() < IPV6_LEN {
                    return Err(DropReason::Malformed);
                }
                let ip = Ipv6Packet::new_unchecked(packet);
                let dst = ip.dst_addr();
                // Neighbour discovery and allocator requests are the slow path's, whatever the
                // source (a client has no bound address before its first allocation).
                let to_gateway = self.cfg.gateway_v6.contains(&dst) || dst.segments()[0] == 0xff02;
                let next = ip.next_header();
                if to_gateway
                    && (next == IpProtocol::Icmpv6
                        || (next == IpProtocol::Udp
                            && udp_dst_port(packet, IPV6_LEN) == ALLOC_PORT))
                {
                    return Ok(Verdict::ToSlowPath);
                }
                // Link-local sources and multicast destinations (MLD reports, router
                // solicitations with extension headers...) stay on the link: not forwarded,
                // and not spoofing either.
                let src = ip.src_addr();
                if src.is_unicast_link_local() || dst.is_multicast() {
                    return Err(DropReason::LinkLocal);
                }
                let src = u128::from(src);
                match self.tables.binding_v6(src, self.now_ms) {
                    Some(b) if b.mac == src_mac && b.sid == self.cfg.sid && b.port == port => {
                        if !b.seen {
                            first_seen.push(Ipv6Addr::from(src).into());
                        }
                    }
                    _ => return Err(DropReason::SpoofedSource),
                }
                (IpProtocol::Ipv6, EtherType::Ipv6)
            }
            EtherType::Arp => return Ok(Verdict::ToSlowPath), // for the gateway
            _ => return Err(DropReason::NotIp),
        };
        hop(&mut data[ETH_LEN..len], version)?;
        write_eth(data, self.cfg.edge_mac, self.cfg.uplink_mac, ethertype);
        Ok(Verdict::Forward(self.cfg.uplink))
    }

    /// Checks and routes a tunnelled packet from the edge and gives the inner packet its hop
    /// and the tunnel's congestion marks; returns the outer header's length and the client's
    /// port, with the Ethernet header for the client written in the 14 bytes before the inner
    /// packet (the outer header's end), where the frame will start.
    fn downstream(&self, data: &mut [u8], len: usize) -> Result<(usize, PortId), DropReason> {
        let outer = data.get(ETH_LEN..len).ok_or(DropReason::Malformed)?;
        let (outer_len, inner_proto, outer_ecn) = match ethertype(data) {
            EtherType::Ipv6 if !self.outer_v4 => {
                // A fixed-size view: the field reads below are a few vector compares, with
                // no bounds checks and no memcmp call.
                let h: &[u8; IPV6_LEN] = outer.first_chunk().ok_or(DropReason::Malformed)?;
                let ip = Ipv6Packet::new_unchecked(h);
                let inner = ip.next_header();
                if !is_tunnel(inner) {
                    return Err(DropReason::NotIp);
                }
                if ip.src_addr().octets() != self.edge_internal
                    || ip.dst_addr().octets() != self.internal
                {
                    return Err(DropReason::NotFromEdge);
                }
                (IPV6_LEN, inner, ip.traffic_class() & 0b11)
            }
            EtherType::Ipv4 if self.outer_v4 => {
                let h: &[u8; IPV4_MIN] = outer.first_chunk().ok_or(DropReason::Malformed)?;
                let ip = Ipv4Packet::new_unchecked(h);
                let inner = ip.next_header();
                if !is_tunnel(inner) {
                    return Err(DropReason::NotIp);
                }
                let header_len = usize::from(ip.header_len());
                if ip.version() != 4 || header_len < IPV4_MIN || outer.len() < header_len {
                    return Err(DropReason::Malformed);
                }
                if ip.src_addr().octets() != self.edge_internal[12..]
                    || ip.dst_addr().octets() != self.internal[12..]
                {
                    return Err(DropReason::NotFromEdge);
                }
                (header_len, inner, ip.ecn())
            }
            _ => return Err(DropReason::NotIp),
        };
        let inner = &outer[outer_len..];
        let binding = if inner_proto == IpProtocol::Ipv4 {
            let ip = ipv4_header(inner).ok_or(DropReason::Malformed)?;
            self.tables
                .binding_v4(u32::from(ip.dst_addr()), self.now_ms)
        } else {
            let ip = ipv6_header(inner).ok_or(DropReason::Malformed)?;
            self.tables
                .binding_v6(u128::from(ip.dst_addr()), self.now_ms)
        };
        let binding = binding
            .filter(|b| b.sid == self.cfg.sid && b.port < self.cfg.client_ports)
            .ok_or(DropReason::NoRoute)?;
        let (mac, port) = (binding.mac, binding.port);
        // RFC 6040 §4.2: congestion marked on the tunnel reaches the inner packet. The edge
        // copies the inner ECN field out, so only CE and ECT(1) (low bit set) can change it.
        if outer_ecn & 0b01 != 0 {
            crate::wire::ipip::merge_ecn(&mut data[ETH_LEN + outer_len..len], outer_ecn).map_err(
                |e| match e {
                    crate::wire::Error::CeOnNotEct => DropReason::CeOnNotEct,
                    _ => DropReason::Malformed,
                },
            )?;
        }
        hop(&mut data[ETH_LEN + outer_len..len], inner_proto)?;
        let ethertype = if inner_proto == IpProtocol::Ipv4 {
            EtherType::Ipv4
        } else {
            EtherType::Ipv6
        };
        write_eth(&mut data[outer_len..], mac, self.cfg.gateway_mac, ethertype);
        Ok((outer_len, port))
    }
}

/// IPv4-in or IPv6-in (protocol / next header 4 or 41).
fn is_tunnel(proto: IpProtocol) -> bool {
    matches!(proto, IpProtocol::Ipv4 | IpProtocol::Ipv6)
}

impl Pipeline for Access {
    type Update = SwitchUpdate;

    fn apply(&mut self, update: SwitchUpdate) {
        // The access switch's next hop (the edge) is configured, not resolved.
        if let SwitchUpdate::Rule(rule) = update {
            self.tables.apply(&rule);
        }
    }

    fn tick(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
    }

    fn process<M: FrameMemory>(
        &mut self,
        in_port: PortId,
        memory: &mut M,
        frames: &mut [M::Frame],
        verdicts: &mut Vec<Verdict>,
    ) {
        let mut first_seen = std::mem::take(&mut self.first_seen);
        let this = &*self;
        // Every lookup of the burst starts loading before the first one waits (tables/map.rs).
        for frame in frames.iter_mut() {
            let len = memory.len(frame);
            let data = &memory.data_mut(frame);
            if in_port < this.cfg.client_ports {
                this.prefetch_upstream(data, len);
            } else if in_port == this.cfg.uplink {
                this.prefetch_downstream(data, len);
            }
        }
        each_frame(memory, frames, verdicts, |memory, frame, len| {
            if in_port < this.cfg.client_ports {
                this.upstream(in_port, &mut memory.data_mut(frame), len, &mut first_seen)
                    .unwrap_or_else(Verdict::Drop)
            } else if in_port == this.cfg.uplink {
                this.downstream_verdict(memory, frame, len)
            } else {
                Verdict::Drop(DropReason::NoSuchPort)
            }
        });
        for ip in first_seen.drain(..) {
            // Several packets of a burst may name one binding: it is reported once.
            let unseen = match ip {
                IpAddr::V4(a) => self.tables.binding_v4(u32::from(a), self.now_ms),
                IpAddr::V6(a) => self.tables.binding_v6(u128::from(a), self.now_ms),
            }
            .is_some_and(|b| !b.seen);
            let reported = match &mut self.seen_tx {
                Some(tx) => unseen && tx.push(ip).is_ok(),
                None => true,
            };
            if reported {
                self.tables.mark_seen(ip);
            }
        }
        self.first_seen = first_seen;
    }
}

impl Access {
    /// Starts loading the binding a client's frame will be checked against (its source's).
    #[inline(always)]
    fn prefetch_upstream(&self, data: &[u8], len: usize) {
        let Some(packet) = data.get(ETH_LEN..len) else {
            return;
        };
        if ethertype(data) == EtherType::Ipv4 {
            if let Some(ip) = ipv4_header(packet) {
                self.tables.prefetch_v4(u32::from(ip.src_addr()));
            }
        } else if let Some(ip) = ipv6_header(packet) {
            self.tables.prefetch_v6(u128::from(ip.src_addr()));
        }
    }

    /// Starts loading the binding a tunnelled frame's inner destination will be delivered by.
    #[inline(always)]
    fn prefetch_downstream(&self, data: &[u8], len: usize) {
        let Some(outer) = data.get(ETH_LEN..len) else {
            return;
        };
        let (outer_len, proto) = if self.outer_v4 {
            match ipv4_header(outer) {
                Some(ip) => (usize::from(ip.header_len()), ip.next_header()),
                None => return,
            }
        } else {
            match ipv6_header(outer) {
                Some(ip) => (IPV6_LEN, ip.next_header()),
                None => return,
            }
        };
        let Some(inner) = outer.get(outer_len..) else {
            return;
        };
        match proto {
            IpProtocol::Ipv4 => {
                if let Some(ip) = ipv4_header(inner) {
                    self.tables.prefetch_v4(u32::from(ip.dst_addr()));
                }
            }
            IpProtocol::Ipv6 => {
                if let Some(ip) = ipv6_header(inner) {
                    self.tables.prefetch_v6(u128::from(ip.dst_addr()));
                }
            }
            _ => {}
        }
    }

    /// One frame of length `len` (at least an Ethernet header) received on the uplink.
    pub(super) fn downstream_verdict<M: FrameMemory>(
        &self,
        memory: &mut M,
        frame: &mut M::Frame,
        len: usize,
    ) -> Verdict {
        let result = self.downstream(&mut memory.data_mut(frame), len);
        match result {
            // The outer header is left behind by moving the frame's start, not the packet.
            Ok((outer_len, port)) if memory.adjust_head(frame, outer_len as isize) => {
                Verdict::Forward(port)
            }
            Ok(_) => Verdict::Drop(DropReason::Malformed),
            Err(reason) => non_ip_to_slow_path(&memory.data_mut(frame), reason),
        }
    }
}

/// Gives every frame of a burst its verdict: runts are dropped, the rest go through `verdict`
/// with their length.
fn each_frame<M: FrameMemory>(
    memory: &mut M,
    frames: &mut [M::Frame],
    verdicts: &mut Vec<Verdict>,
    mut verdict: impl FnMut(&mut M, &mut M::Frame, usize) -> Verdict,
) {
    for frame in frames.iter_mut() {
        let len = memory.len(frame);
        verdicts.push(if len < ETH_LEN {
            Verdict::Drop(DropReason::Runt)
        } else {
            verdict(memory, frame, len)
        });
    }
}

/// What the fast path does not forward but the slow path may answer (ARP, neighbour discovery
/// and other IP it does not carry) goes there; any other ethertype, and whatever else was
/// refused, is dropped and counted: a storm of junk frames never reaches the slow path's ring.
fn non_ip_to_slow_path(frame: &[u8], reason: DropReason) -> Verdict {
    if reason == DropReason::NotIp
        && matches!(
            ethertype(frame),
            EtherType::Arp | EtherType::Ipv4 | EtherType::Ipv6
        )
    {
        Verdict::ToSlowPath
    } else {
        Verdict::Drop(reason)
    }
}

/// The EtherType of the frame at the start of `frame`.
#[inline(always)]
fn ethertype(frame: &[u8]) -> EtherType {
    EthernetFrame::new_unchecked(frame).ethertype()
}

/// ICMPv6 router/neighbour solicitation, advertisement or redirect (133..=137), without
/// extension headers.
fn is_neighbor_discovery(ipv6: &[u8]) -> bool {
    Ipv6Packet::new_unchecked(ipv6).next_header() == IpProtocol::Icmpv6
        && ipv6.get(IPV6_LEN).is_some_and(|t| (133..=137).contains(t))
}

/// Decrements the TTL or hop limit of the IP packet (`version` 4 or 6, as the tunnel's inner
/// protocol names it) at the start of `packet`.
#[inline(always)]
fn hop(packet: &mut [u8], version: IpProtocol) -> Result<(), DropReason> {
    let result = if version == IpProtocol::Ipv4 {
        decrement_ipv4_ttl(packet)
    } else {
        decrement_ipv6_hop_limit(packet)
    };
    result.map(|_| ()).map_err(|e| match e {
        crate::wire::Error::HopLimitExceeded => DropReason::HopLimitExceeded,
        _ => DropReason::Malformed,
    })
}

/// The IPv4 header at the start of `packet`: version 4 and the fixed header there (the fields
/// the roles read are all in it).
#[inline(always)]
fn ipv4_header(packet: &[u8]) -> Option<Ipv4Packet<&[u8]>> {
    let ip = Ipv4Packet::new_unchecked(packet);
    (packet.len() >= IPV4_MIN && ip.version() == 4).then_some(ip)
}

/// The IPv6 header at the start of `packet`: version 6 and the 40 bytes there.
#[inline(always)]
fn ipv6_header(packet: &[u8]) -> Option<Ipv6Packet<&[u8]>> {
    let ip = Ipv6Packet::new_unchecked(packet);
    (packet.len() >= IPV6_LEN && ip.version() == 6).then_some(ip)
}

/// The UDP destination port after an IP header of `header_len` bytes (0 if cut short).
fn udp_dst_port(ip: &[u8], header_len: usize) -> u16 {
    UdpPacket::new_unchecked(ip.get(header_len..).unwrap_or_default()).dst_port()
}

fn as_16(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The outer header towards one access switch, built once: per packet only the length, the
/// inner protocol, the traffic class and (IPv4) the checksum change.
#[derive(Debug, Clone, Copy)]
struct Tunnel {
    mac: [u8; 6],
    header: [u8; IPV6_LEN],
    len: usize,
    ethertype: EtherType,
}

impl Tunnel {
    fn new(src: IpAddr, access: &AccessSwitch) -> Tunnel {
        let mut header = [0u8; IPV6_LEN];
        let (len, ethertype) = match (src, access.internal) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let mut ip = Ipv4Packet::new_unchecked(&mut header[..IPV4_MIN]);
                ip.set_version_and_header_len(IPV4_MIN as u8);
                ip.set_unfragmented(true);
                ip.set_ttl(crate::wire::ipip::DEFAULT_OUTER_HOP_LIMIT);
                ip.set_src_addr(src);
                ip.set_dst_addr(dst);
                (IPV4_MIN, EtherType::Ipv4)
            }
            // Config validation keeps the families equal; IPv6 otherwise.
            (src, dst) => {
                let mut ip = Ipv6Packet::new_unchecked(&mut header);
                ip.set_version_tc_flow(0, 0);
                ip.set_hop_limit(crate::wire::ipip::DEFAULT_OUTER_HOP_LIMIT);
                ip.set_src_addr(as_16(src).into());
                ip.set_dst_addr(as_16(dst).into());
                (IPV6_LEN, EtherType::Ipv6)
            }
        };
        Tunnel {
            mac: access.mac,
            header,
            len,
            ethertype,
        }
    }

    /// Writes the outer header for an inner packet of `inner_len` bytes, protocol `inner`
    /// and traffic class (DSCP and ECN) `tclass`. `outer` is `self.len` bytes long (the caller
    /// slices it so).
    #[inline(always)]
    fn write(&self, outer: &mut [u8], inner_len: u16, inner: IpProtocol, tclass: u8) {
        // Fixed-size views, so the copies compile to a few vector moves rather than a memcpy
        // call and the field writes need no bounds checks.
        if let Ok(v6) = <&mut [u8; IPV6_LEN]>::try_from(&mut *outer) {
            *v6 = self.header;
            let mut ip = Ipv6Packet::new_unchecked(v6);
            // Flow label 0 (RFC 8200 §3).
            ip.set_version_tc_flow(tclass, 0);
            ip.set_payload_len(inner_len);
            ip.set_next_header(inner);
        } else if let Ok(v4) = <&mut [u8; IPV4_MIN]>::try_from(outer) {
            v4.copy_from_slice(&self.header[..IPV4_MIN]);
            let mut ip = Ipv4Packet::new_unchecked(&mut *v4);
            ip.set_dscp_ecn(tclass >> 2, tclass & 0b11);
            ip.set_total_len(inner_len + IPV4_MIN as u16);
            ip.set_next_header(inner);
            // Over the fixed 20 bytes (fill_checksum would read the length from the header).
            let sum = crate::wire::checksum::checksum(&v4[..]);
            Ipv4Packet::new_unchecked(v4).set_checksum(sum);
        }
    }
}

/// Writes an Ethernet header at the start of `data` (which the callers have checked is at
/// least that long: one length check here, and inlined, since it runs once per packet).
#[inline(always)]
fn write_eth(data: &mut [u8], dst: [u8; 6], src: [u8; 6], ethertype: EtherType) {
    if let Some(header) = data.first_chunk_mut::<ETH_LEN>() {
        let mut eth = EthernetFrame::new_unchecked(header);
        eth.set_dst_addr(EthernetAddress(dst));
        eth.set_src_addr(EthernetAddress(src));
        eth.set_ethertype(ethertype);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port::mem::{MemFrame, MemMemory};
    use etherparse::{Ipv4Header, NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
    use mimiq_allocator::lease::RuleUpdate;
    use mimiq_allocator::Mac;

    const CLIENT: [u8; 6] = [2, 0, 0, 0, 0, 0xc1];
    const OTHER_CLIENT: [u8; 6] = [2, 0, 0, 0, 0, 0xc2];
    const GW: [u8; 6] = [2, 0, 0, 0, 0, 0x01];
    const ACCESS_UP: [u8; 6] = [2, 0, 0, 0, 0, 0xa1];
    const EDGE_IN: [u8; 6] = [2, 0, 0, 0, 0, 0xe1];
    const EDGE_OUT: [u8; 6] = [2, 0, 0, 0, 0, 0xe2];
    const OUT_HOP: [u8; 6] = [2, 0, 0, 0, 0, 0x99];
    const SID: Sid = 7;
    const NOW: u64 = 1_000_000;

    fn edge_internal() -> IpAddr {
        "fd00:ffff::e".parse().unwrap()
    }
    fn access_internal() -> IpAddr {
        "fd00:ffff::a".parse().unwrap()
    }
    /// A client IPv6 address: pool fd00:1::/64, alias 0x0101 in the 16 bits after it.
    fn client_v6() -> Ipv6Addr {
        "fd00:1::101:0:0:10".parse().unwrap()
    }

    fn rules() -> Vec<Sequenced> {
        let add = |ip: &str, until| RuleUpdate::BindingAdd {
            ip: ip.parse().unwrap(),
            mac: Mac(CLIENT),
            sid: SID,
            port: 0,
            valid_until_ms: until,
        };
        let updates = vec![
            add("198.18.1.10", NOW + 5_000),
            add("fd00:1::101:0:0:10", NOW + 5_000),
            RuleUpdate::AliasEpoch {
                epoch: 1,
                aliases: vec![(SID, vec![0x0101])],
                valid_until_ms: NOW + 5_000,
            },
        ];
        Sequenced::snapshot(3, updates)
    }

    fn edge() -> Edge {
        let mut e = Edge::new(EdgeConfig {
            inside: 0,
            outside: 1,
            inside_mac: EDGE_IN,
            outside_mac: EDGE_OUT,
            outside_next_hop_mac: Some(OUT_HOP),
            internal: edge_internal(),
            access: vec![AccessSwitch {
                sid: SID,
                internal: access_internal(),
                mac: ACCESS_UP,
            }],
            v6_prefix: "fd00:1::".parse().unwrap(),
            v6_prefix_len: 64,
            alias_bits: 16,
            alias_k: 3,
            v4_pools: vec![V4Prefix {
                addr: Ipv4Addr::new(198, 18, 1, 0),
                len: 24,
            }],
        });
        rules().into_iter().for_each(|r| e.apply(r.into()));
        e.tick(NOW);
        e
    }

    fn access() -> Access {
        access_with_ports(1)
    }

    /// An access switch with `n` client ports (0 to n - 1) and its uplink on port n.
    fn access_with_ports(n: PortId) -> Access {
        let mut a = Access::new(AccessConfig {
            sid: SID,
            client_ports: n,
            uplink: n,
            gateway_mac: GW,
            gateway_v4: Some(Ipv4Addr::new(198, 18, 1, 1)),
            gateway_v6: vec!["fe80::1".parse().unwrap()],
            uplink_mac: ACCESS_UP,
            edge_mac: EDGE_IN,
            internal: access_internal(),
            edge_internal: edge_internal(),
            v6_prefix_len: 64,
            alias_bits: 16,
        });
        rules().into_iter().for_each(|r| a.apply(r.into()));
        a.tick(NOW);
        a
    }

    fn run<P: Pipeline>(p: &mut P, port: PortId, bytes: &[u8]) -> (Verdict, Vec<u8>) {
        let mut frame = MemFrame::from_bytes(bytes);
        let mut verdicts = Vec::new();
        p.process(
            port,
            &mut MemMemory,
            std::slice::from_mut(&mut frame),
            &mut verdicts,
        );
        (verdicts[0], frame.bytes().to_vec())
    }

    fn udp_v4(
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
        src: [u8; 4],
        dst: [u8; 4],
        dport: u16,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(src_mac, dst_mac)
            .ipv4(src, dst, 64)
            .udp(40000, dport)
            .write(&mut out, b"payload")
            .unwrap();
        out
    }

    fn udp_v6(src_mac: [u8; 6], dst_mac: [u8; 6], src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(src_mac, dst_mac)
            .ipv6(src.octets(), dst.octets(), 64)
            .udp(443, 40000)
            .write(&mut out, b"hello")
            .unwrap();
        out
    }

    /// A UDP packet from outside to the bound client's IPv4 address, and one to its IPv6
    /// address (alias 0x0101).
    fn return_traffic() -> [Vec<u8>; 2] {
        [
            udp_v4(OUT_HOP, EDGE_OUT, [203, 0, 113, 5], [198, 18, 1, 10], 40000),
            udp_v6(
                OUT_HOP,
                EDGE_OUT,
                "2001:db8::5".parse().unwrap(),
                client_v6(),
            ),
        ]
    }

    #[test]
    fn return_traffic_reaches_the_bound_client_through_edge_and_access_v4_and_v6() {
        let (mut e, mut a) = (edge(), access());
        let cases = return_traffic();
        for original in cases {
            let (v, encapsulated) = run(&mut e, 1, &original);
            assert_eq!(v, Verdict::Forward(0), "edge sends it inside");
            assert_eq!(encapsulated.len(), original.len() + 40);
            assert_eq!(&encapsulated[0..6], &ACCESS_UP);
            let outer = SlicedPacket::from_ethernet(&encapsulated).unwrap();
            let Some(NetSlice::Ipv6(o)) = outer.net else {
                panic!("outer IPv6")
            };
            assert_eq!(o.header().source_addr(), edge_internal());
            assert_eq!(o.header().destination_addr(), access_internal());
            let (v, delivered) = run(&mut a, 1, &encapsulated);
            assert_eq!(v, Verdict::Forward(0), "access delivers to the client port");
            assert_eq!(&delivered[0..6], &CLIENT);
            assert_eq!(&delivered[6..12], &GW);
            assert_eq!(delivered.len(), original.len());
            // The same packet, two router hops later: TTL − 2, checksums valid (etherparse
            // checks the IPv4 header checksum on slicing the payload's lengths).
            let p = SlicedPacket::from_ethernet(&delivered).unwrap();
            match p.net {
                Some(NetSlice::Ipv4(ip)) => {
                    assert_eq!(ip.header().ttl(), 62);
                    let h = ip.header().to_header();
                    assert_eq!(h.header_checksum, h.calc_header_checksum());
                }
                Some(NetSlice::Ipv6(ip)) => assert_eq!(ip.header().hop_limit(), 62),
                _ => panic!("not IP"),
            }
            assert!(matches!(p.transport, Some(TransportSlice::Udp(_))));
            assert_eq!(
                &delivered[delivered.len() - 5..],
                &original[original.len() - 5..]
            );
        }
    }

    #[test]
    fn the_single_box_in_one_pass_sends_the_bytes_the_two_roles_send_over_their_link() {
        use crate::pipeline::single_box::SingleBox;
        // Ports: client 0, uplink 1, edge inside 2, edge outside 3.
        let mut one = SingleBox::new(access(), 1, edge());
        let (mut e, mut a) = (edge(), access());
        let down = return_traffic();
        for original in down {
            let (v, tunnelled) = run(&mut e, 1, &original);
            assert_eq!(v, Verdict::Forward(0));
            let two_passes = run(&mut a, 1, &tunnelled);
            assert_eq!(two_passes.0, Verdict::Forward(0));
            assert_eq!(run(&mut one, 3, &original), two_passes, "downstream");
        }
        let up = udp_v4(CLIENT, GW, [198, 18, 1, 10], [203, 0, 113, 5], 443);
        let (v, on_link) = run(&mut a, 0, &up);
        assert_eq!(v, Verdict::Forward(1));
        let two_passes = run(&mut e, 0, &on_link);
        assert_eq!(two_passes.0, Verdict::Forward(1));
        let (v, bytes) = run(&mut one, 0, &up);
        assert_eq!((v, bytes), (Verdict::Forward(3), two_passes.1), "upstream");

        // Each stage's refusals keep their reasons, whichever stage refuses.
        let spoofed = udp_v4(CLIENT, GW, [198, 18, 1, 99], [203, 0, 113, 5], 443);
        assert_eq!(
            run(&mut one, 0, &spoofed).0,
            run(&mut a, 0, &spoofed).0,
            "first stage"
        );
        let mut expiring = up.clone();
        expiring[14 + 8] = 1; // TTL 1: the access stage takes it to 0, the edge refuses it.
        let expected = run(&mut e, 0, &run(&mut a, 0, &expiring).1).0;
        assert!(matches!(expected, Verdict::Drop(_)), "{expected:?}");
        assert_eq!(run(&mut one, 0, &expiring).0, expected, "second stage");
        let unbound = udp_v4(OUT_HOP, EDGE_OUT, [203, 0, 113, 5], [198, 18, 1, 11], 1);
        assert_eq!(
            run(&mut one, 3, &unbound).0,
            Verdict::Drop(DropReason::NoRoute)
        );
        // What arrives on the internal link from outside the process is handled as before.
        let forged = udp_v4(EDGE_IN, ACCESS_UP, [203, 0, 113, 5], [198, 18, 1, 10], 1);
        assert_eq!(run(&mut one, 1, &forged).0, run(&mut a, 1, &forged).0);
        let mut arp = unbound.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(run(&mut one, 3, &arp).0, Verdict::ToSlowPath);
        assert_eq!(run(&mut one, 0, &arp).0, Verdict::ToSlowPath);
    }

    #[test]
    fn the_edge_drops_what_is_in_no_pool_or_has_no_live_route() {
        let mut e = edge();
        let not_pool = udp_v4(OUT_HOP, EDGE_OUT, [203, 0, 113, 5], [198, 51, 100, 1], 1);
        assert_eq!(
            run(&mut e, 1, &not_pool).0,
            Verdict::Drop(DropReason::NotInPool)
        );
        let unbound = udp_v4(OUT_HOP, EDGE_OUT, [203, 0, 113, 5], [198, 18, 1, 11], 1);
        assert_eq!(
            run(&mut e, 1, &unbound).0,
            Verdict::Drop(DropReason::NoRoute)
        );
        let other_alias = udp_v6(
            OUT_HOP,
            EDGE_OUT,
            "2001:db8::5".parse().unwrap(),
            "fd00:1::202:0:0:10".parse().unwrap(),
        );
        assert_eq!(
            run(&mut e, 1, &other_alias).0,
            Verdict::Drop(DropReason::NoRoute)
        );
        // After lifetime + t_remove (valid_until), nothing routes.
        e.tick(NOW + 5_000);
        let bound = udp_v4(OUT_HOP, EDGE_OUT, [203, 0, 113, 5], [198, 18, 1, 10], 1);
        assert_eq!(run(&mut e, 1, &bound).0, Verdict::Drop(DropReason::NoRoute));
        let mut arp = bound.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(
            run(&mut e, 1, &arp).0,
            Verdict::ToSlowPath,
            "neighbour resolution is the slow path's"
        );
    }

    #[test]
    fn the_edge_forwards_upstream_to_the_next_hop() {
        let mut e = edge();
        let up = udp_v4(ACCESS_UP, EDGE_IN, [198, 18, 1, 10], [203, 0, 113, 5], 443);
        let (v, out) = run(&mut e, 0, &up);
        assert_eq!(v, Verdict::Forward(1));
        assert_eq!((&out[0..6], &out[6..12]), (&OUT_HOP[..], &EDGE_OUT[..]));
        assert_eq!(out[14 + 8], 63, "TTL decremented");
    }

    #[test]
    fn access_upstream_forwards_only_live_bindings_of_this_switch() {
        let mut a = access();
        let good = udp_v4(CLIENT, GW, [198, 18, 1, 10], [203, 0, 113, 5], 443);
        let (v, out) = run(&mut a, 0, &good);
        assert_eq!(v, Verdict::Forward(1));
        assert_eq!((&out[0..6], &out[6..12]), (&EDGE_IN[..], &ACCESS_UP[..]));
        let wrong_mac = udp_v4(OTHER_CLIENT, GW, [198, 18, 1, 10], [203, 0, 113, 5], 443);
        assert_eq!(
            run(&mut a, 0, &wrong_mac).0,
            Verdict::Drop(DropReason::SpoofedSource)
        );
        let wrong_ip = udp_v4(CLIENT, GW, [198, 18, 1, 11], [203, 0, 113, 5], 443);
        assert_eq!(
            run(&mut a, 0, &wrong_ip).0,
            Verdict::Drop(DropReason::SpoofedSource)
        );
        let good_v6 = udp_v6(CLIENT, GW, client_v6(), "2001:db8::5".parse().unwrap());
        assert_eq!(run(&mut a, 0, &good_v6).0, Verdict::Forward(1));
        let spoof_v6 = udp_v6(
            CLIENT,
            GW,
            "fd00:1::101:0:0:11".parse().unwrap(),
            "2001:db8::5".parse().unwrap(),
        );
        assert_eq!(
            run(&mut a, 0, &spoof_v6).0,
            Verdict::Drop(DropReason::SpoofedSource)
        );
        a.tick(NOW + 5_000);
        assert_eq!(
            run(&mut a, 0, &good).0,
            Verdict::Drop(DropReason::SpoofedSource),
            "expired binding"
        );
    }

    #[test]
    fn allocator_requests_and_arp_go_to_the_slow_path_even_without_a_binding() {
        let mut a = access();
        let request = udp_v4(OTHER_CLIENT, GW, [0, 0, 0, 0], [198, 18, 1, 1], ALLOC_PORT);
        assert_eq!(run(&mut a, 0, &request).0, Verdict::ToSlowPath);
        let other_port = udp_v4(OTHER_CLIENT, GW, [0, 0, 0, 0], [198, 18, 1, 1], 53);
        assert_eq!(
            run(&mut a, 0, &other_port).0,
            Verdict::Drop(DropReason::SpoofedSource)
        );
        let mut arp = request.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(run(&mut a, 0, &arp).0, Verdict::ToSlowPath);
    }

    #[test]
    fn access_with_several_client_ports_accepts_and_delivers_a_client_on_its_own_port_only() {
        let (mut e, mut a) = (edge(), access_with_ports(3));
        // OTHER_CLIENT holds 198.18.1.20 through port 2; a binding naming a port the switch
        // does not have delivers nowhere.
        for (seq, (ip, port)) in [("198.18.1.20", 2), ("198.18.1.30", 7)]
            .into_iter()
            .enumerate()
        {
            let update = Sequenced {
                seq: 4 + seq as u64,
                update: RuleUpdate::BindingAdd {
                    ip: ip.parse().unwrap(),
                    mac: Mac(OTHER_CLIENT),
                    sid: SID,
                    port,
                    valid_until_ms: NOW + 5_000,
                },
            };
            a.apply(update.clone().into());
            e.apply(update.into());
        }
        let from_other = udp_v4(OTHER_CLIENT, GW, [198, 18, 1, 20], [203, 0, 113, 5], 443);
        assert_eq!(run(&mut a, 2, &from_other).0, Verdict::Forward(3));
        for wrong_port in [0, 1] {
            assert_eq!(
                run(&mut a, wrong_port, &from_other).0,
                Verdict::Drop(DropReason::SpoofedSource),
                "its address and MAC, from port {wrong_port}"
            );
        }
        let c1 = udp_v4(CLIENT, GW, [198, 18, 1, 10], [203, 0, 113, 5], 443);
        assert_eq!(run(&mut a, 0, &c1).0, Verdict::Forward(3));
        assert_eq!(
            run(&mut a, 2, &c1).0,
            Verdict::Drop(DropReason::SpoofedSource)
        );
        // Downstream: each to the port of its binding.
        for (dst, want) in [
            ([198, 18, 1, 10], Verdict::Forward(0)),
            ([198, 18, 1, 20], Verdict::Forward(2)),
            ([198, 18, 1, 30], Verdict::Drop(DropReason::NoRoute)),
        ] {
            let original = udp_v4(OUT_HOP, EDGE_OUT, [203, 0, 113, 5], dst, 40000);
            let (_, encapsulated) = run(&mut e, 1, &original);
            assert_eq!(run(&mut a, 3, &encapsulated).0, want, "to {dst:?}");
        }
    }

    #[test]
    fn the_first_packet_forwarded_from_each_binding_is_reported_once() {
        let (tx, mut rx) = rtrb::RingBuffer::new(1);
        let mut a = access().report_seen_to(tx);
        a.apply(
            Sequenced {
                seq: 4,
                update: RuleUpdate::BindingAdd {
                    ip: "198.18.1.11".parse().unwrap(),
                    mac: Mac(CLIENT),
                    sid: SID,
                    port: 0,
                    valid_until_ms: NOW + 5_000,
                },
            }
            .into(),
        );
        let v4 = udp_v4(CLIENT, GW, [198, 18, 1, 10], [203, 0, 113, 5], 443);
        let spoofed = udp_v4(OTHER_CLIENT, GW, [198, 18, 1, 10], [203, 0, 113, 5], 443);
        for frame in [&spoofed, &v4, &v4] {
            run(&mut a, 0, frame);
        }
        assert_eq!(rx.pop(), Ok("198.18.1.10".parse().unwrap()));
        assert!(rx.pop().is_err(), "reported once");
        // The IPv6 binding's report fills the ring; the next binding's waits for a packet
        // after the ring has room.
        let v6 = udp_v6(CLIENT, GW, client_v6(), "2001:db8::5".parse().unwrap());
        let other = udp_v4(CLIENT, GW, [198, 18, 1, 11], [203, 0, 113, 5], 443);
        run(&mut a, 0, &v6);
        assert_eq!(run(&mut a, 0, &other).0, Verdict::Forward(1));
        assert_eq!(rx.pop(), Ok(IpAddr::V6(client_v6())));
        assert!(rx.pop().is_err());
        run(&mut a, 0, &other);
        assert_eq!(rx.pop(), Ok("198.18.1.11".parse().unwrap()));
    }

    /// `frame` (IPv4) with its TOS byte set to `tos` and the header checksum made right.
    fn with_tos(mut frame: Vec<u8>, tos: u8) -> Vec<u8> {
        frame[ETH_LEN + 1] = tos;
        frame[ETH_LEN + 10..ETH_LEN + 12].fill(0);
        let sum = crate::wire::checksum::checksum(&frame[ETH_LEN..ETH_LEN + IPV4_MIN]);
        frame[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&sum.to_be_bytes());
        frame
    }

    #[test]
    fn the_tunnel_carries_dscp_and_ecn_out_and_congestion_back_in_per_rfc_6040() {
        let (mut e, mut a) = (edge(), access());
        let to_c1 = |tos| {
            let f = udp_v4(OUT_HOP, EDGE_OUT, [203, 0, 113, 5], [198, 18, 1, 10], 40000);
            with_tos(f, tos)
        };
        // DSCP EF (46) with ECT(0): the outer IPv6 traffic class is the same byte.
        let (v, tunnelled) = run(&mut e, 1, &to_c1(46 << 2 | 0b10));
        assert_eq!(v, Verdict::Forward(0));
        let outer = etherparse::Ipv6HeaderSlice::from_slice(&tunnelled[ETH_LEN..]).unwrap();
        assert_eq!(outer.traffic_class(), 46 << 2 | 0b10);
        // Congestion marked on the tunnel reaches the client's packet, checksum right.
        let mut marked = tunnelled.clone();
        marked[ETH_LEN + 1] |= 0b11 << 4;
        let (v, delivered) = run(&mut a, 1, &marked);
        assert_eq!(v, Verdict::Forward(0));
        let inner = etherparse::Ipv4HeaderSlice::from_slice(&delivered[ETH_LEN..]).unwrap();
        assert_eq!((inner.dcp().value(), inner.ecn().value()), (46, 0b11));
        let header = inner.to_header();
        assert_eq!(header.header_checksum, header.calc_header_checksum());
        // Unmarked: the inner packet keeps its ECN field.
        let (_, delivered) = run(&mut a, 1, &tunnelled);
        assert_eq!(delivered[ETH_LEN + 1], 46 << 2 | 0b10);
        // CE on the tunnel over a packet that is not ECN-capable: dropped (RFC 6040 §4.2).
        let (_, mut not_ect) = run(&mut e, 1, &to_c1(0));
        not_ect[ETH_LEN + 1] |= 0b11 << 4;
        assert_eq!(
            run(&mut a, 1, &not_ect).0,
            Verdict::Drop(DropReason::CeOnNotEct)
        );
    }

    #[test]
    fn access_downstream_accepts_only_the_edge_and_only_its_own_clients() {
        let (mut e, mut a) = (edge(), access());
        let original = udp_v4(OUT_HOP, EDGE_OUT, [203, 0, 113, 5], [198, 18, 1, 10], 40000);
        let (_, mut encapsulated) = run(&mut e, 1, &original);
        let mut forged = encapsulated.clone();
        forged[14 + 8 + 15] ^= 1; // outer source: not the edge
        assert_eq!(
            run(&mut a, 1, &forged).0,
            Verdict::Drop(DropReason::NotFromEdge)
        );
        let plain = udp_v4(EDGE_IN, ACCESS_UP, [203, 0, 113, 5], [198, 18, 1, 10], 1);
        assert_eq!(
            run(&mut a, 1, &plain).0,
            Verdict::ToSlowPath,
            "not encapsulated: not ours to forward"
        );
        // Inner destination unknown.
        encapsulated[14 + 40 + 19] = 99;
        assert_eq!(
            run(&mut a, 1, &encapsulated).0,
            Verdict::Drop(DropReason::NoRoute)
        );
    }

    /// The internal addresses of [`roles_with_ipv4_outer`].
    fn ipv4_internals() -> (IpAddr, IpAddr) {
        (
            "198.18.250.1".parse().unwrap(),
            "198.18.250.2".parse().unwrap(),
        )
    }

    /// The edge and access switch of an IPv4-only internal network (IPv4 outer headers).
    fn roles_with_ipv4_outer() -> (Edge, Access) {
        let (e_int, a_int) = ipv4_internals();
        let mut cfg = edge().cfg.clone();
        cfg.internal = e_int;
        cfg.access[0].internal = a_int;
        let mut e = Edge::new(cfg);
        rules().into_iter().for_each(|r| e.apply(r.into()));
        e.tick(NOW);
        let mut a = access();
        a.cfg.internal = a_int;
        a.cfg.edge_internal = e_int;
        a.internal = as_16(a_int);
        a.edge_internal = as_16(e_int);
        a.outer_v4 = true;
        (e, a)
    }

    #[test]
    fn tunnelled_frames_of_every_size_cross_the_headroom_byte_exact() {
        let (out_v4, out_v6) = (edge(), access());
        let (in_v4, a_v4) = roles_with_ipv4_outer();
        let mut pairs = [(out_v4, out_v6, IPV6_LEN), (in_v4, a_v4, IPV4_MIN)];
        for size in 64..=1514usize {
            for inner_v6 in [false, true] {
                let mut original = Vec::new();
                let builder = PacketBuilder::ethernet2(OUT_HOP, EDGE_OUT);
                let payload: Vec<u8> = (0..size).map(|i| (i * 7) as u8).collect();
                if inner_v6 {
                    builder
                        .ipv6(
                            [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5],
                            client_v6().octets(),
                            64,
                        )
                        .udp(443, 40000)
                        .write(&mut original, &payload[..size - 62])
                        .unwrap();
                    // Traffic class 0x09 (ECT(1)): carried out, and merged back unchanged.
                    original[15] |= 0x90;
                } else {
                    builder
                        .ipv4([203, 0, 113, 5], [198, 18, 1, 10], 64)
                        .udp(443, 40000)
                        .write(&mut original, &payload[..size - 42])
                        .unwrap();
                }
                assert_eq!(original.len(), size);
                // What the client must get: the same packet two router hops later.
                let mut expected = original.clone();
                expected[0..6].copy_from_slice(&CLIENT);
                expected[6..12].copy_from_slice(&GW);
                if inner_v6 {
                    expected[14 + 7] -= 2;
                } else {
                    expected[14 + 8] -= 2;
                    let mut h = Ipv4Header::from_slice(&expected[14..]).unwrap().0;
                    h.header_checksum = h.calc_header_checksum();
                    expected[14..34].copy_from_slice(&h.to_bytes());
                }
                for (e, a, outer_len) in &mut pairs {
                    let (v, tunnelled) = run(e, 1, &original);
                    assert_eq!(v, Verdict::Forward(0), "{size} bytes");
                    assert_eq!(tunnelled.len(), size + *outer_len);
                    assert_eq!(
                        (&tunnelled[0..6], &tunnelled[6..12]),
                        (&ACCESS_UP[..], &EDGE_IN[..])
                    );
                    let inner = &tunnelled[14 + *outer_len..];
                    match SlicedPacket::from_ethernet(&tunnelled).unwrap().net {
                        Some(NetSlice::Ipv6(o)) => {
                            let h = o.header();
                            assert_eq!(usize::from(h.payload_length()), inner.len());
                            assert_eq!(h.next_header().0, if inner_v6 { 41 } else { 4 });
                            let inner_tclass = if inner_v6 {
                                (u16::from_be_bytes([inner[0], inner[1]]) >> 4) as u8
                            } else {
                                inner[1]
                            };
                            assert_eq!(h.traffic_class(), inner_tclass, "RFC 6040 §4.1");
                        }
                        Some(NetSlice::Ipv4(o)) => {
                            let h = o.header().to_header();
                            assert_eq!(h.header_checksum, h.calc_header_checksum());
                            assert_eq!(usize::from(h.total_len), *outer_len + inner.len());
                            assert_eq!(h.protocol.0, if inner_v6 { 41 } else { 4 });
                        }
                        _ => panic!("no outer IP header"),
                    }
                    // The inner packet, one hop on, its transport header and payload untouched.
                    let ip_len = if inner_v6 { IPV6_LEN } else { IPV4_MIN };
                    assert_eq!(inner[ip_len..], original[ETH_LEN + ip_len..]);
                    let (v, delivered) = run(a, 1, &tunnelled);
                    assert_eq!(v, Verdict::Forward(0), "{size} bytes");
                    assert_eq!(delivered, expected, "{size} bytes, inner IPv6 {inner_v6}");
                }
            }
        }
    }

    #[test]
    fn an_ipv4_outer_header_carries_the_return_path_on_ipv4_only_internal_networks() {
        let (e_int, a_int) = ipv4_internals();
        let (mut e, mut a) = roles_with_ipv4_outer();
        for original in return_traffic() {
            let (v, encapsulated) = run(&mut e, 1, &original);
            assert_eq!(v, Verdict::Forward(0));
            assert_eq!(encapsulated.len(), original.len() + 20);
            let outer = SlicedPacket::from_ethernet(&encapsulated).unwrap();
            let Some(NetSlice::Ipv4(o)) = outer.net else {
                panic!("outer IPv4")
            };
            let h = o.header().to_header();
            assert_eq!(
                h.header_checksum,
                h.calc_header_checksum(),
                "outer checksum"
            );
            assert_eq!(IpAddr::from(o.header().source_addr()), e_int);
            assert_eq!(IpAddr::from(o.header().destination_addr()), a_int);
            let (v, delivered) = run(&mut a, 1, &encapsulated);
            assert_eq!(v, Verdict::Forward(0));
            assert_eq!(delivered.len(), original.len());
            assert_eq!(&delivered[0..6], &CLIENT);
            let mut forged = encapsulated.clone();
            forged[14 + 15] ^= 1; // outer source: not the edge
            assert_eq!(
                run(&mut a, 1, &forged).0,
                Verdict::Drop(DropReason::NotFromEdge)
            );
        }
    }

    #[test]
    fn every_other_drop_reason_of_the_roles_is_counted_not_panicked() {
        let (mut e, mut a) = (edge(), access());
        // TTL 1: not forwarded.
        let mut ttl1 = udp_v4(OUT_HOP, EDGE_OUT, [203, 0, 113, 5], [198, 18, 1, 10], 1);
        ttl1[14 + 8] = 1;
        assert_eq!(
            run(&mut e, 1, &ttl1).0,
            Verdict::Drop(DropReason::HopLimitExceeded)
        );
        // A truncated IPv4 header.
        let short = &udp_v4(OUT_HOP, EDGE_OUT, [203, 0, 113, 5], [198, 18, 1, 10], 1)[..20];
        assert_eq!(
            run(&mut e, 1, short).0,
            Verdict::Drop(DropReason::Malformed)
        );
        // Shorter than an Ethernet header.
        assert_eq!(
            run(&mut e, 1, &[0u8; 10]).0,
            Verdict::Drop(DropReason::Runt)
        );
        // No room in front of the packet for the outer header.
        let bound = udp_v4(OUT_HOP, EDGE_OUT, [203, 0, 113, 5], [198, 18, 1, 10], 1);
        let mut frame = MemFrame::with_headroom(&bound, IPV6_LEN - 1);
        let mut verdicts = Vec::new();
        e.process(
            1,
            &mut MemMemory,
            std::slice::from_mut(&mut frame),
            &mut verdicts,
        );
        assert_eq!(verdicts, [Verdict::Drop(DropReason::NoHeadroom)]);
        let mut frame = MemFrame::with_headroom(&bound, IPV6_LEN);
        verdicts.clear();
        e.process(
            1,
            &mut MemMemory,
            std::slice::from_mut(&mut frame),
            &mut verdicts,
        );
        assert_eq!(verdicts, [Verdict::Forward(0)], "exactly enough room");
        // Upstream before the next hop is resolved.
        let mut unresolved = Edge::new(EdgeConfig {
            outside_next_hop_mac: None,
            ..e.cfg.clone()
        });
        let up = udp_v4(ACCESS_UP, EDGE_IN, [198, 18, 1, 10], [203, 0, 113, 5], 443);
        assert_eq!(
            run(&mut unresolved, 0, &up).0,
            Verdict::Drop(DropReason::NoNeighbor)
        );
        unresolved.apply(SwitchUpdate::NextHopMac(OUT_HOP));
        assert_eq!(
            run(&mut unresolved, 0, &up).0,
            Verdict::Forward(1),
            "forwards once resolved"
        );
        // Link-scoped IPv6 from a client is not forwarded, and not counted as spoofing.
        let ll = udp_v6(
            CLIENT,
            GW,
            "fe80::42".parse().unwrap(),
            "2001:db8::5".parse().unwrap(),
        );
        assert_eq!(run(&mut a, 0, &ll).0, Verdict::Drop(DropReason::LinkLocal));
        // A port the role does not have.
        assert_eq!(run(&mut a, 5, &up).0, Verdict::Drop(DropReason::NoSuchPort));
        // Neither IP nor ARP (LLDP, a junk ethertype), on any port of either role: dropped and
        // counted in the fast path, never queued for the slow path.
        for ethertype in [[0x88, 0xcc], [0x12, 0x34]] {
            let mut junk = up.clone();
            junk[12..14].copy_from_slice(&ethertype);
            for port in [0, 1] {
                let dropped = Verdict::Drop(DropReason::NotIp);
                assert_eq!(run(&mut a, port, &junk).0, dropped, "access port {port}");
                assert_eq!(run(&mut e, port, &junk).0, dropped, "edge port {port}");
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn random_frames_never_panic_either_role(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            ethertype in proptest::sample::select(vec![[0x08u8, 0x00], [0x86, 0xdd], [0x08, 0x06]]),
            port in 0u16..5,
            headroom in 0usize..64,
        ) {
            let mut frame = bytes.clone();
            if frame.len() >= 14 {
                frame[12..14].copy_from_slice(&ethertype);
            }
            let (mut e, mut a) = (edge(), access());
            run(&mut e, port, &frame);
            run(&mut a, port, &frame);
            // Both roles in one pass (ports 0 to 3; 4 is none of them).
            let mut one = crate::pipeline::single_box::SingleBox::new(access(), 1, edge());
            run(&mut one, port, &frame);
            // Any headroom, too little for an outer header included.
            let mut short = MemFrame::with_headroom(&frame, headroom);
            let mut verdicts = Vec::new();
            e.process(1, &mut MemMemory, std::slice::from_mut(&mut short), &mut verdicts);
            // Valid outer header, random inner bytes.
            let mut enc = udp_v4(OUT_HOP, EDGE_OUT, [203, 0, 113, 5], [198, 18, 1, 10], 1);
            enc = run(&mut e, 1, &enc).1;
            enc.truncate(54);
            enc.extend_from_slice(&bytes);
            run(&mut a, 1, &enc);
            run(&mut one, 1, &enc);
        }
    }
}
