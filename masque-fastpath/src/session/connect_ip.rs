//! The proxy side of a CONNECT-IP session (RFC 9484), sans-IO.
//!
//! A [`ConnectIpSession`] is built once the request is accepted, from its parsed [`IpScope`] and
//! an [`AddressPool`] the caller owns (shared by every session of a proxy). It then:
//!
//! - says what to send first ([`ConnectIpSession::start_capsules`]): ADDRESS_ASSIGN with the
//!   session's addresses (one IPv4 and/or one IPv6 host), then ROUTE_ADVERTISEMENT with the ranges
//!   the scope allows, in the order RFC 9484 §4.7.3 requires;
//! - answers ADDRESS_REQUEST ([`ConnectIpSession::on_address_request`]) with the entries of an
//!   ADDRESS_ASSIGN (request IDs echoed, refusals as `0.0.0.0/32` or `::/128`);
//! - checks every inner packet from the client ([`ConnectIpSession::on_datagram`]) and from the
//!   egress towards the client ([`ConnectIpSession::on_egress`]) and gives a [`Verdict`]: forward
//!   (the packet rewritten in place), reply with an ICMP error built into a caller buffer, or drop
//!   with a [`DropReason`], counted in [`Counters`].
//!
//! Hop limits follow RFC 9484 §7: the TTL / Hop Limit is decremented when a packet is encapsulated
//! (egress → client), not when it is decapsulated, because the proxy's egress (the kernel behind
//! a TUN device) routes, and so decrements, the packet itself. A proxy whose egress does not route
//! (an AF_XDP port writing frames straight to a link) sets
//! [`SessionConfig::decrement_ttl_from_client`] so this session acts as the router on that path.
//! A packet whose TTL would reach zero is answered with ICMP Time Exceeded (RFC 1812 §5.3.1,
//! RFC 4443 §3.3) and counted as [`DropReason::TtlExpired`].
//!
//! No ICMP error is sent about an ICMP error or about a non-initial IPv4 fragment (RFC 1122
//! §3.2.2, RFC 4443 §2.4 (e)); such packets are counted drops. Spoofed sources are dropped without
//! an ICMP answer: RFC 9484 §7 lists Destination Unreachable code 5 as one choice the endpoint is
//! free to make, and an error addressed to a forged source has no one to inform.
//!
//! Scope: destinations (and protocols) are checked with [`IpScope::allows`]; ICMP to a target
//! address is allowed whatever the scoped protocol (RFC 9484 §4.7.3). A hostname target cannot be
//! checked here (the proxy resolves it): its packets are counted [`DropReason::ScopeUnresolved`]
//! drops and no route is advertised for it.
//!
//! Threading: plain values, `Send`, no interior mutability. Per packet: no allocation, no panic on
//! any input (a property test feeds random bytes). ADDRESS_REQUEST handling allocates a small
//! `Vec` (control path).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::capsule::{self, AddressEntry, AddressRequest, CapsuleRepr, IpAddressRange, IpPrefix};
use crate::policy::Guard;
use crate::template::{IpProtocolScope, IpScope, IpTarget};
use mimiq_wire::checksum::{decrement_ipv4_ttl, decrement_ipv6_hop_limit, PseudoHeader};
use mimiq_wire::{
    Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, IpProtocol, Ipv4Packet, Ipv4Repr,
    Ipv6Packet, Ipv6Repr,
};

/// The smallest MTU IPv6 allows on a link (RFC 8200 §5), and the floor for the tunnel MTU.
pub const MIN_TUNNEL_MTU: usize = 1280;

/// IP protocol numbers used here.
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
const IPV6_HEADER_LEN: usize = mimiq_wire::ipv6::HEADER_LEN;

/// Hands out the addresses of CONNECT-IP sessions. The proxy owns one and lends it to each session
/// call that assigns or releases addresses.
pub trait AddressPool {
    /// A prefix of `requested`'s family for one session: `requested` itself when the address is
    /// set and free, any free one when the address is all-zero (the prefix length is then only a
    /// preference, RFC 9484 §4.7.2); `None` when nothing can be granted.
    fn allocate(&mut self, requested: IpPrefix) -> Option<IpPrefix>;
    /// Returns a prefix handed out by [`AddressPool::allocate`].
    fn release(&mut self, prefix: IpPrefix);
}

/// An [`AddressPool`] over one IPv4 and/or one IPv6 prefix, handing out single addresses (/32,
/// /128), lowest free first. The prefix's own (all-host-bits-zero) address is never handed out,
/// nor the IPv4 broadcast address.
#[derive(Debug, Clone, Default)]
pub struct HostPool {
    v4: Option<IpPrefix>,
    v6: Option<IpPrefix>,
    in_use: HashSet<IpAddr>,
    /// Addresses another holder has handed out (another process of the proxy): never handed
    /// out here.
    reserved: HashSet<IpAddr>,
}

impl HostPool {
    /// A pool over these prefixes (either may be absent).
    pub fn new(v4: Option<IpPrefix>, v6: Option<IpPrefix>) -> Self {
        HostPool {
            v4: v4.filter(|p| p.addr().is_ipv4()),
            v6: v6.filter(|p| p.addr().is_ipv6()),
            in_use: HashSet::new(),
            reserved: HashSet::new(),
        }
    }

    /// Addresses currently handed out.
    pub fn in_use(&self) -> usize {
        self.in_use.len()
    }

    /// The addresses handed out, sorted.
    pub fn handed_out(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self.in_use.iter().copied().collect();
        v.sort();
        v
    }

    /// From now on `taken` (and only it, of what an earlier call gave) is not handed out.
    pub fn reserve(&mut self, taken: HashSet<IpAddr>) {
        self.reserved = taken;
    }

    fn free(&self, addr: &IpAddr) -> bool {
        !self.in_use.contains(addr) && !self.reserved.contains(addr)
    }

    fn base(&self, v4: bool) -> Option<IpPrefix> {
        if v4 {
            self.v4
        } else {
            self.v6
        }
    }

    /// Whether `addr` may be handed out from `base`.
    fn usable(base: IpPrefix, addr: IpAddr) -> bool {
        if !base.contains(addr) {
            return false;
        }
        let off = addr_to_u128(addr) - addr_to_u128(base.addr());
        let host_bits = addr_bits(addr) - u32::from(base.prefix_len());
        let last = if host_bits >= 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        off != 0 && !(addr.is_ipv4() && host_bits >= 2 && off == last)
    }
}

impl AddressPool for HostPool {
    fn allocate(&mut self, requested: IpPrefix) -> Option<IpPrefix> {
        let v4 = requested.addr().is_ipv4();
        let base = self.base(v4)?;
        if addr_to_u128(requested.addr()) != 0 {
            let addr = requested.addr();
            if Self::usable(base, addr) && self.free(&addr) {
                self.in_use.insert(addr);
                return Some(IpPrefix::host(addr));
            }
            return None;
        }
        // Linear probe from the first host: among the first `in_use + 1` candidates at least one
        // is free, so this ends quickly; it stops at the prefix's end.
        let start = addr_to_u128(base.addr());
        let limit = (self.in_use.len() + self.reserved.len()) as u128 + 2;
        for off in 1..=limit {
            let addr = u128_to_addr(start.checked_add(off)?, v4)?;
            if !Self::usable(base, addr) {
                return None;
            }
            if self.free(&addr) {
                self.in_use.insert(addr);
                return Some(IpPrefix::host(addr));
            }
        }
        None
    }

    fn release(&mut self, prefix: IpPrefix) {
        self.in_use.remove(&prefix.addr());
    }
}

/// Session settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// Largest inner packet carried in either direction, in bytes; at least
    /// [`MIN_TUNNEL_MTU`] (smaller values are raised to it). Default 1280.
    pub tunnel_mtu_bytes: usize,
    /// Decrement the TTL / Hop Limit of packets from the client too (see the module docs).
    /// Default false: the egress routes and decrements.
    pub decrement_ttl_from_client: bool,
    /// Source of the ICMPv4 errors this session generates (the proxy's address on the tunnel).
    /// Default 192.0.2.1 (TEST-NET-1); set it.
    pub icmp_source_v4: Ipv4Addr,
    /// Source of the ICMPv6 errors this session generates. Default 2001:db8::1; set it.
    pub icmp_source_v6: Ipv6Addr,
    /// Where the client's packets may go beyond the scope (`crate::policy`); `None`: wherever
    /// the scope allows.
    pub guard: Option<Arc<Guard>>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            tunnel_mtu_bytes: MIN_TUNNEL_MTU,
            decrement_ttl_from_client: false,
            icmp_source_v4: Ipv4Addr::new(192, 0, 2, 1),
            icmp_source_v6: Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
            guard: None,
        }
    }
}

/// What to do with one inner packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send the first `len` bytes of the (rewritten) packet on: to the egress for
    /// [`ConnectIpSession::on_datagram`], to the client in an HTTP datagram for
    /// [`ConnectIpSession::on_egress`].
    Forward(usize),
    /// The packet is dropped (counted under the reason) and the first `len` bytes of the reply
    /// buffer hold an ICMP error to send back where it came from: to the client for
    /// `on_datagram`, to the egress for `on_egress`.
    Reply(usize),
    /// The packet is dropped, counted under this reason.
    Drop(DropReason),
}

/// Why an inner packet was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Shorter than the fixed IP header, or than the header chain it announces.
    Truncated,
    /// Version neither 4 nor 6.
    BadVersion,
    /// IPv4 IHL below 5, or a total / payload length outside the buffer or the header (IPv6
    /// jumbograms included).
    BadLength,
    /// IPv4 header checksum wrong.
    BadChecksum,
    /// From the client: source outside the addresses assigned to it.
    SpoofedSource,
    /// From the client: destination or protocol outside the request's scope (answered with
    /// Destination Unreachable, administratively prohibited, when allowed).
    OutOfScope,
    /// The scope names a host the session cannot match addresses against.
    ScopeUnresolved,
    /// Link-local destination (or link-local source from the egress): never forwarded off-link
    /// (RFC 9484 §7).
    LinkLocal,
    /// Larger than the tunnel MTU (answered with Packet Too Big / Fragmentation Needed when
    /// allowed; an IPv4 packet without DF is dropped, as this session does not fragment).
    TooBig,
    /// TTL / Hop Limit would reach zero (answered with Time Exceeded when allowed).
    TtlExpired,
    /// From the egress: destination not assigned to this client.
    NotForClient,
    /// From the egress: source or protocol outside the request's scope (ICMP excepted).
    SourceOutOfScope,
    /// From the client: a destination the proxy's policy refuses (its own addresses, its
    /// loopback, private ranges not allowed...; answered like [`DropReason::OutOfScope`]).
    Policy,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 13] = [
        DropReason::Truncated,
        DropReason::BadVersion,
        DropReason::BadLength,
        DropReason::BadChecksum,
        DropReason::SpoofedSource,
        DropReason::OutOfScope,
        DropReason::ScopeUnresolved,
        DropReason::LinkLocal,
        DropReason::TooBig,
        DropReason::TtlExpired,
        DropReason::NotForClient,
        DropReason::SourceOutOfScope,
        DropReason::Policy,
    ];

    /// A stable label for metrics (`mimiq_masque_ip_drops_total{reason=...}`).
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::BadVersion => "bad_version",
            DropReason::BadLength => "bad_length",
            DropReason::BadChecksum => "bad_checksum",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::OutOfScope => "out_of_scope",
            DropReason::ScopeUnresolved => "scope_unresolved",
            DropReason::LinkLocal => "link_local",
            DropReason::TooBig => "too_big",
            DropReason::TtlExpired => "ttl_expired",
            DropReason::NotForClient => "not_for_client",
            DropReason::SourceOutOfScope => "source_out_of_scope",
            DropReason::Policy => "policy",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Per-session packet counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets forwarded from the client to the egress.
    pub forwarded_from_client: u64,
    /// Packets forwarded from the egress to the client.
    pub forwarded_to_client: u64,
    /// ICMP errors generated (each also counts a drop).
    pub icmp_errors: u64,
    drops: [u64; DropReason::ALL.len()],
}

impl Counters {
    /// Packets dropped for `reason` (with or without an ICMP answer).
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    /// All drops.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }
}

/// Why an ADDRESS_REQUEST cannot be answered; the caller aborts the request stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// A Request ID this session has already seen.
    ReusedRequestId(u64),
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::ReusedRequestId(id) => write!(f, "request ID {id} reused"),
        }
    }
}

impl std::error::Error for RequestError {}

/// The proxy side of one CONNECT-IP session.
#[derive(Debug, Clone)]
pub struct ConnectIpSession {
    scope: IpScope,
    config: SessionConfig,
    /// At most one entry per address family, IPv4 first.
    assigned: Vec<AddressEntry>,
    routes: Vec<IpAddressRange>,
    seen_request_ids: HashSet<u64>,
    counters: Counters,
}

impl ConnectIpSession {
    /// A session for a request with this scope, taking one IPv4 and one IPv6 host address from
    /// `pool` (each when the pool has one).
    pub fn new(scope: IpScope, config: SessionConfig, pool: &mut impl AddressPool) -> Self {
        Self::preferring(scope, config, pool, &[])
    }

    /// [`ConnectIpSession::new`], taking for each family the first of `preferred` that `pool`
    /// has free, if any: the addresses an ADDRESS_REQUEST sent with the request asks for (a
    /// client resuming a lost tunnel), so that the session does not start on the lowest free
    /// address, which may be the one another resuming client is about to ask for.
    pub fn preferring(
        scope: IpScope,
        config: SessionConfig,
        pool: &mut impl AddressPool,
        preferred: &[IpPrefix],
    ) -> Self {
        let mut config = config;
        config.tunnel_mtu_bytes = config.tunnel_mtu_bytes.max(MIN_TUNNEL_MTU);
        let mut assigned = Vec::with_capacity(2);
        for any in [
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ] {
            let wanted = preferred
                .iter()
                .filter(|p| p.addr().is_ipv4() == any.is_ipv4())
                .find_map(|&p| pool.allocate(p));
            if let Some(prefix) = wanted.or_else(|| pool.allocate(IpPrefix::host(any))) {
                if prefix.addr().is_ipv4() == any.is_ipv4() {
                    //= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.1
                    //# If this address
                    //# assignment is in response to an Address Request (see Section 4.7.2), then
                    //# this field SHALL contain the value of the corresponding field in the
                    //# request. Otherwise, this field SHALL be zero.
                    assigned.push(AddressEntry {
                        request_id: 0,
                        prefix,
                    });
                }
            }
        }
        let mut session = ConnectIpSession {
            scope,
            config,
            assigned,
            routes: Vec::new(),
            seen_request_ids: HashSet::new(),
            counters: Counters::default(),
        };
        session.routes = session.compute_routes();
        session
    }

    /// The addresses assigned to the client.
    pub fn assigned(&self) -> &[AddressEntry] {
        &self.assigned
    }

    /// The ranges advertised to the client.
    pub fn routes(&self) -> &[IpAddressRange] {
        &self.routes
    }

    /// The request's scope.
    pub fn scope(&self) -> &IpScope {
        &self.scope
    }

    /// The session's settings (tunnel MTU raised to the floor).
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Packet counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The capsules to send when the session starts, in order: ADDRESS_ASSIGN, then
    /// ROUTE_ADVERTISEMENT.
    pub fn start_capsules(&self) -> [CapsuleRepr<'_>; 2] {
        [
            CapsuleRepr::AddressAssign(&self.assigned),
            CapsuleRepr::RouteAdvertisement(&self.routes),
        ]
    }

    /// Writes [`ConnectIpSession::start_capsules`] at the front of `buf`; returns the bytes
    /// written.
    pub fn emit_start(&self, buf: &mut [u8]) -> Result<usize, capsule::Error> {
        let mut pos = 0;
        for c in self.start_capsules() {
            pos += c.emit(buf.get_mut(pos..).ok_or(capsule::Error::BufferTooSmall)?)?;
        }
        Ok(pos)
    }

    /// Answers an ADDRESS_REQUEST: returns the Assigned Addresses of the ADDRESS_ASSIGN to send
    /// (`CapsuleRepr::AddressAssign(&entries)`), which lists every address the client now holds
    /// plus one entry per Requested Address.
    ///
    /// Policy: one address per family. A request for a family the client already holds is granted
    /// that address when it asks for any address (all-zero) or for exactly it; for another
    /// address, the held one is exchanged for it when `pool` has it free (a client that lost its
    /// connection asks for the address its applications still use), else refused. A request
    /// for a family it does not hold goes to `pool`.
    pub fn on_address_request(
        &mut self,
        request: &AddressRequest<'_>,
        pool: &mut impl AddressPool,
    ) -> Result<Vec<AddressEntry>, RequestError> {
        for entry in request.iter() {
            //= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.2
            //# Request IDs MUST NOT be reused by an endpoint,
            //# and MUST NOT be zero.
            if !self.seen_request_ids.insert(entry.request_id) {
                return Err(RequestError::ReusedRequestId(entry.request_id));
            }
        }
        let mut answers: Vec<AddressEntry> = Vec::new();
        for entry in request.iter() {
            let wanted = entry.prefix;
            let v4 = wanted.addr().is_ipv4();
            let held = self
                .assigned
                .iter()
                .position(|a| a.prefix.addr().is_ipv4() == v4);
            let granted = match held {
                Some(i) => {
                    let have = self.assigned[i].prefix;
                    let any = addr_to_u128(wanted.addr()) == 0;
                    if any || wanted == have {
                        Some(have)
                    } else {
                        let swapped = pool.allocate(wanted);
                        if let Some(prefix) = swapped {
                            pool.release(have);
                            self.assigned[i].prefix = prefix;
                        }
                        swapped
                    }
                }
                None => pool
                    .allocate(wanted)
                    .filter(|p| p.addr().is_ipv4() == v4)
                    .inspect(|&prefix| {
                        // Stored with Request ID 0: later ADDRESS_ASSIGN capsules list it
                        // unprompted; this request's answer carries the ID.
                        self.assigned.push(AddressEntry {
                            request_id: 0,
                            prefix,
                        });
                        self.assigned.sort_by_key(|a| !a.prefix.addr().is_ipv4());
                    }),
            };
            //= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.2
            //# For each Requested Address, the receiver of the ADDRESS_REQUEST capsule SHALL
            //# respond with an Assigned Address with a matching Request ID.
            let prefix = match granted {
                Some(p) => p,
                //= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.2
                //# If the requested address was not assigned, the IP address
                //# SHALL be all-zero and the IP Prefix Length SHALL be the maximum length
                //# (0.0.0.0/32 or ::/128) to indicate that no address was assigned.
                //= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.2
                //# These address
                //# rejections SHOULD NOT be included in subsequent ADDRESS_ASSIGN capsules.
                // (Refusals are not stored in `assigned`.)
                None => IpPrefix::host(if v4 {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                } else {
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                }),
            };
            answers.push(AddressEntry {
                request_id: entry.request_id,
                prefix,
            });
        }
        // A newly assigned family may widen the routes.
        self.routes = self.compute_routes();
        //= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.1
        //# If an ADDRESS_ASSIGN capsule does not contain an address that was previously
        //# transmitted in another ADDRESS_ASSIGN capsule, that indicates that the address
        //# has been removed.
        // So the capsule carries the full list of what the client holds: held addresses not
        // already answered above keep their own request ID.
        let mut out: Vec<AddressEntry> = self
            .assigned
            .iter()
            .filter(|a| !answers.iter().any(|b| b.prefix == a.prefix))
            .copied()
            .collect();
        out.extend(answers);
        Ok(out)
    }

    /// Returns the session's addresses to `pool` (when the request stream ends).
    pub fn close(self, pool: &mut impl AddressPool) {
        for a in &self.assigned {
            pool.release(a.prefix);
        }
    }

    /// Checks a packet from the client (the payload of an HTTP datagram with context ID 0) and
    /// rewrites it in place for the egress. ICMP errors for the client are built in `reply`
    /// (1280 bytes always suffice).
    pub fn on_datagram(&mut self, packet: &mut [u8], reply: &mut [u8]) -> Verdict {
        let verdict = self.check_from_client(packet, reply);
        self.count(verdict, true)
    }

    /// Checks a packet from the egress towards the client and rewrites it in place (TTL / Hop
    /// Limit decremented); on [`Verdict::Forward`] the caller frames it as an HTTP datagram.
    /// ICMP errors for the packet's source are built in `reply`.
    pub fn on_egress(&mut self, packet: &mut [u8], reply: &mut [u8]) -> Verdict {
        let verdict = self.check_from_egress(packet, reply);
        self.count(verdict, false)
    }

    // ---- helpers ----

    fn count(&mut self, verdict: Result<usize, Refusal>, from_client: bool) -> Verdict {
        match verdict {
            Ok(len) => {
                if from_client {
                    self.counters.forwarded_from_client += 1;
                } else {
                    self.counters.forwarded_to_client += 1;
                }
                Verdict::Forward(len)
            }
            Err(Refusal { reason, reply }) => {
                self.counters.drops[reason.index()] += 1;
                match reply {
                    Some(len) => {
                        self.counters.icmp_errors += 1;
                        Verdict::Reply(len)
                    }
                    None => Verdict::Drop(reason),
                }
            }
        }
    }

    fn check_from_client(&self, packet: &mut [u8], reply: &mut [u8]) -> Result<usize, Refusal> {
        let ip = IpView::parse(packet)?;
        //= https://www.rfc-editor.org/rfc/rfc9484#section-7
        //# If a received IP packet fails any correctness or policy
        //# checks, that is a forwarding error, not a protocol violation as far as IP
        //# proxying is concerned
        if !self.assigned.iter().any(|a| a.prefix.contains(ip.src)) {
            return Err(Refusal::drop(DropReason::SpoofedSource));
        }
        //= https://www.rfc-editor.org/rfc/rfc9484#section-7
        //# Implementers need to ensure that they do not forward any link-local traffic beyond
        //# the IP proxying interface that it was received on.
        if is_link_local(ip.dst) {
            return Err(Refusal::drop(DropReason::LinkLocal));
        }
        //= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.3
        //# ICMP traffic is always allowed, regardless of the value of this field.
        let is_icmp = is_icmp(ip.v4, ip.protocol);
        let allowed = if is_icmp {
            IpScope {
                target: self.scope.target.clone(),
                ipproto: IpProtocolScope::Any,
            }
            .allows(ip.dst, ip.protocol)
        } else {
            self.scope.allows(ip.dst, ip.protocol)
        };
        match allowed {
            Some(true) => {}
            None => return Err(Refusal::drop(DropReason::ScopeUnresolved)),
            Some(false) => {
                //= https://www.rfc-editor.org/rfc/rfc9484#section-7
                //# For unroutable destination addresses, send Destination Unreachable
                //# (Section 3.1 of [ICMPv6]) with a code 0, "No route to destination", or code
                //# 1, "Communication with destination administratively prohibited".
                let kind = IcmpKind::Prohibited;
                return Err(self.icmp_refusal(DropReason::OutOfScope, kind, &ip, packet, reply));
            }
        }
        if self
            .config
            .guard
            .as_ref()
            .is_some_and(|g| g.check(ip.dst).is_err())
        {
            let kind = IcmpKind::Prohibited;
            return Err(self.icmp_refusal(DropReason::Policy, kind, &ip, packet, reply));
        }
        if ip.len > self.config.tunnel_mtu_bytes {
            //= https://www.rfc-editor.org/rfc/rfc9484#section-7
            //# For packets that cannot fit within the MTU of the outgoing link, send Packet
            //# Too Big (Section 3.2 of [ICMPv6]).
            return Err(self.too_big(&ip, packet, reply));
        }
        if self.config.decrement_ttl_from_client {
            self.decrement(&ip, packet, reply)?;
        }
        Ok(ip.len)
    }

    fn check_from_egress(&self, packet: &mut [u8], reply: &mut [u8]) -> Result<usize, Refusal> {
        let ip = IpView::parse(packet)?;
        if !self.assigned.iter().any(|a| a.prefix.contains(ip.dst)) {
            return Err(Refusal::drop(DropReason::NotForClient));
        }
        if is_link_local(ip.src) {
            return Err(Refusal::drop(DropReason::LinkLocal));
        }
        //= https://www.rfc-editor.org/rfc/rfc9484#section-7
        //# Note that ICMP messages
        //# can originate from a source address different from that of the IP proxying
        //# peer, and also from outside the target if scoping is in use (see Section 4.6).
        if !is_icmp(ip.v4, ip.protocol) {
            match self.scope.allows(ip.src, ip.protocol) {
                Some(true) => {}
                None => return Err(Refusal::drop(DropReason::ScopeUnresolved)),
                Some(false) => return Err(Refusal::drop(DropReason::SourceOutOfScope)),
            }
        }
        if ip.len > self.config.tunnel_mtu_bytes {
            return Err(self.too_big(&ip, packet, reply));
        }
        //= https://www.rfc-editor.org/rfc/rfc9484#section-7
        //# Note that endpoints will decrement the IP Hop Count (or TTL) upon encapsulation
        //# but not decapsulation. In other words, the Hop Count is decremented right
        //# before an IP packet is transmitted in an HTTP Datagram.
        self.decrement(&ip, packet, reply)?;
        Ok(ip.len)
    }

    /// Decrements the TTL / Hop Limit (fixing the IPv4 checksum), or refuses with Time Exceeded.
    fn decrement(&self, ip: &IpView, packet: &mut [u8], reply: &mut [u8]) -> Result<(), Refusal> {
        if ip.ttl <= 1 {
            let kind = IcmpKind::TimeExceeded;
            return Err(self.icmp_refusal(DropReason::TtlExpired, kind, ip, packet, reply));
        }
        // IpView::parse checked the header is within `packet`: these cannot fail (the TTL was
        // checked above), and an error would be a drop, not a panic.
        let decremented = if ip.v4 {
            decrement_ipv4_ttl(packet)
        } else {
            decrement_ipv6_hop_limit(packet)
        };
        decremented
            .map(|_| ())
            .map_err(|_| Refusal::drop(DropReason::TtlExpired))
    }

    fn too_big(&self, ip: &IpView, packet: &[u8], reply: &mut [u8]) -> Refusal {
        if ip.v4 && !ip.dont_fragment {
            // RFC 1191 asks for Fragmentation Needed only when DF is set; this session does not
            // fragment, so the packet is a counted drop.
            return Refusal::drop(DropReason::TooBig);
        }
        let kind = IcmpKind::TooBig(self.config.tunnel_mtu_bytes.min(u32::MAX as usize) as u32);
        self.icmp_refusal(DropReason::TooBig, kind, ip, packet, reply)
    }

    /// Builds an ICMP error about `packet` into `reply` when the rules allow one.
    fn icmp_refusal(
        &self,
        reason: DropReason,
        kind: IcmpKind,
        ip: &IpView,
        packet: &[u8],
        reply: &mut [u8],
    ) -> Refusal {
        if !ip.may_answer_with_icmp_error(packet) {
            return Refusal::drop(reason);
        }
        let original = &packet[..ip.len];
        let len = if ip.v4 {
            build_icmpv4(self.config.icmp_source_v4, ip, kind, original, reply)
        } else {
            build_icmpv6(self.config.icmp_source_v6, ip, kind, original, reply)
        };
        Refusal { reason, reply: len }
    }

    fn compute_routes(&self) -> Vec<IpAddressRange> {
        let proto = match self.scope.ipproto {
            IpProtocolScope::Any => 0,
            IpProtocolScope::Protocol(p) => p,
        };
        let mut routes = Vec::with_capacity(2);
        match &self.scope.target {
            IpTarget::Any => {
                for a in &self.assigned {
                    let (start, end) = if a.prefix.addr().is_ipv4() {
                        (
                            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                            IpAddr::V4(Ipv4Addr::BROADCAST),
                        )
                    } else {
                        (
                            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                            IpAddr::V6(Ipv6Addr::from(u128::MAX)),
                        )
                    };
                    routes.push(IpAddressRange {
                        start,
                        end,
                        ip_protocol: proto,
                    });
                }
            }
            IpTarget::Prefix(p) => {
                let start = addr_to_u128(p.addr());
                let host_bits = addr_bits(p.addr()) - u32::from(p.prefix_len());
                let span = if host_bits >= 128 {
                    u128::MAX
                } else {
                    (1u128 << host_bits) - 1
                };
                let v4 = p.addr().is_ipv4();
                if let Some(end) = u128_to_addr(start | span, v4) {
                    routes.push(IpAddressRange {
                        start: p.addr(),
                        end,
                        ip_protocol: proto,
                    });
                }
            }
            // A hostname: the proxy resolves it; until then nothing is advertised.
            IpTarget::Name(_) => {}
        }
        //= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.3
        //# IP Version of A MUST be less than or equal to IP Version of B
        routes.sort_by_key(|r| (!r.start.is_ipv4(), r.ip_protocol, addr_to_u128(r.start)));
        routes
    }
}

/// A refused packet: the reason, and the length of an ICMP error built in the reply buffer.
#[derive(Debug, Clone, Copy)]
struct Refusal {
    reason: DropReason,
    reply: Option<usize>,
}

impl Refusal {
    fn drop(reason: DropReason) -> Self {
        Refusal {
            reason,
            reply: None,
        }
    }
}

impl From<DropReason> for Refusal {
    fn from(reason: DropReason) -> Self {
        Refusal::drop(reason)
    }
}

/// The fields of a checked IPv4 or IPv6 header.
#[derive(Debug, Clone, Copy)]
struct IpView {
    v4: bool,
    src: IpAddr,
    dst: IpAddr,
    /// Upper-layer protocol (IPv6: after the extension headers this walks).
    protocol: u8,
    ttl: u8,
    /// IPv4 header length in bytes; 40 for IPv6.
    header_len: usize,
    /// Packet length from the header (trailing bytes past it are ignored).
    len: usize,
    dont_fragment: bool,
    /// IPv4 fragment offset non-zero, or an IPv6 Fragment header with a non-zero offset.
    later_fragment: bool,
    /// Offset of the upper-layer header.
    upper_offset: usize,
}

impl IpView {
    fn parse(p: &[u8]) -> Result<IpView, DropReason> {
        let first = *p.first().ok_or(DropReason::Truncated)?;
        match first >> 4 {
            4 => Self::parse_v4(p),
            6 => Self::parse_v6(p),
            _ => Err(DropReason::BadVersion),
        }
    }

    fn parse_v4(p: &[u8]) -> Result<IpView, DropReason> {
        let ip = Ipv4Packet::new_checked(p).map_err(|e| match e {
            mimiq_wire::Error::Truncated => DropReason::Truncated,
            _ => DropReason::BadLength,
        })?;
        if !ip.verify_checksum() {
            return Err(DropReason::BadChecksum);
        }
        let header_len = usize::from(ip.header_len());
        Ok(IpView {
            v4: true,
            src: ip.src_addr().into(),
            dst: ip.dst_addr().into(),
            protocol: ip.next_header().into(),
            ttl: ip.ttl(),
            header_len,
            len: usize::from(ip.total_len()),
            dont_fragment: ip.dont_frag(),
            later_fragment: ip.frag_offset() != 0,
            upper_offset: header_len,
        })
    }

    fn parse_v6(p: &[u8]) -> Result<IpView, DropReason> {
        let ip = Ipv6Packet::new_checked(p).map_err(|_| DropReason::Truncated)?;
        if ip.payload_len() == 0 {
            // A jumbogram (RFC 2675) or an empty payload: neither belongs in a tunnel.
            return Err(DropReason::BadLength);
        }
        let len = IPV6_HEADER_LEN + usize::from(ip.payload_len());
        // Walk the extension headers to the upper-layer protocol (bounded).
        let mut next = u8::from(ip.next_header());
        let mut off = IPV6_HEADER_LEN;
        let mut later_fragment = false;
        for _ in 0..8 {
            let ext_len = match next {
                0 | 43 | 60 => {
                    let l = *p.get(off + 1).ok_or(DropReason::Truncated)?;
                    (usize::from(l) + 1) * 8
                }
                44 => {
                    let hi = *p.get(off + 2).ok_or(DropReason::Truncated)?;
                    let lo = *p.get(off + 3).ok_or(DropReason::Truncated)?;
                    if u16::from_be_bytes([hi, lo]) & 0xfff8 != 0 {
                        later_fragment = true;
                    }
                    8
                }
                51 => {
                    let l = *p.get(off + 1).ok_or(DropReason::Truncated)?;
                    (usize::from(l) + 2) * 4
                }
                _ => break,
            };
            let n = *p.get(off).ok_or(DropReason::Truncated)?;
            if off + ext_len > len {
                return Err(DropReason::Truncated);
            }
            next = n;
            off += ext_len;
            if later_fragment {
                break;
            }
        }
        Ok(IpView {
            v4: false,
            src: ip.src_addr().into(),
            dst: ip.dst_addr().into(),
            protocol: next,
            ttl: ip.hop_limit(),
            header_len: IPV6_HEADER_LEN,
            len,
            dont_fragment: true,
            later_fragment,
            upper_offset: off,
        })
    }

    /// RFC 1122 §3.2.2 and RFC 4443 §2.4 (e): no ICMP error about an ICMP error, a non-initial
    /// fragment, or a packet from an unspecified or multicast source.
    fn may_answer_with_icmp_error(&self, p: &[u8]) -> bool {
        if self.later_fragment || self.src.is_unspecified() || self.src.is_multicast() {
            return false;
        }
        if self.v4 && self.src == IpAddr::V4(Ipv4Addr::BROADCAST) {
            return false;
        }
        let icmp_type = p.get(self.upper_offset).copied();
        match (self.v4, self.protocol, icmp_type) {
            // ICMPv4 errors: Destination Unreachable, Source Quench, Redirect, Time Exceeded,
            // Parameter Problem.
            (true, PROTO_ICMP, Some(t)) => !matches!(t, 3 | 4 | 5 | 11 | 12),
            (true, PROTO_ICMP, None) => false,
            // ICMPv6 error messages have types below 128 (RFC 4443 §2.1).
            (false, PROTO_ICMPV6, Some(t)) => t >= 128,
            (false, PROTO_ICMPV6, None) => false,
            _ => true,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum IcmpKind {
    /// Destination Unreachable, administratively prohibited.
    Prohibited,
    /// IPv4 Fragmentation Needed / IPv6 Packet Too Big, with the MTU.
    TooBig(u32),
    /// Time Exceeded in transit.
    TimeExceeded,
}

/// Builds an IPv4 + ICMPv4 error into `out`, quoting as much of `original` as fits in 576 bytes
/// (RFC 1812 §4.3.2.3); `None` when `out` cannot hold the header plus 8 bytes of payload.
fn build_icmpv4(
    src: Ipv4Addr,
    ip: &IpView,
    kind: IcmpKind,
    original: &[u8],
    out: &mut [u8],
) -> Option<usize> {
    const HDR: usize = 20 + 8;
    let quote_min = (ip.header_len + 8).min(original.len());
    let quote = original
        .len()
        .min(576 - HDR)
        .min(out.len().checked_sub(HDR)?);
    if quote < quote_min {
        return None;
    }
    let IpAddr::V4(dst) = ip.src else {
        return None;
    };
    let data = &original[..quote];
    let icmp = match kind {
        IcmpKind::Prohibited => Icmpv4Repr::DstUnreachable {
            code: 13,
            next_hop_mtu: 0,
            data,
        },
        IcmpKind::TooBig(mtu) => Icmpv4Repr::DstUnreachable {
            code: 4,
            next_hop_mtu: mtu.min(u32::from(u16::MAX)) as u16,
            data,
        },
        IcmpKind::TimeExceeded => Icmpv4Repr::TimeExceeded { code: 0, data },
    };
    let header = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Icmp,
        payload_len: icmp.buffer_len() as u16,
        ttl: 64,
        dscp: 0,
        ecn: 0,
        ident: 0,
        dont_frag: false,
    };
    let (head, body) = out[..HDR + quote].split_at_mut(header.buffer_len());
    header.emit(&mut Ipv4Packet::new_unchecked(head)).ok()?;
    icmp.emit(&mut Icmpv4Packet::new_unchecked(body)).ok()?;
    Some(HDR + quote)
}

/// Builds an IPv6 + ICMPv6 error into `out`, quoting as much of `original` as fits in 1280 bytes
/// (RFC 4443 §2.4 (c)); `None` when `out` cannot hold the headers plus the original IPv6 header.
fn build_icmpv6(
    src: Ipv6Addr,
    ip: &IpView,
    kind: IcmpKind,
    original: &[u8],
    out: &mut [u8],
) -> Option<usize> {
    const HDR: usize = IPV6_HEADER_LEN + 8;
    let quote = original
        .len()
        .min(MIN_TUNNEL_MTU - HDR)
        .min(out.len().checked_sub(HDR)?);
    if quote < IPV6_HEADER_LEN.min(original.len()) {
        return None;
    }
    let IpAddr::V6(dst) = ip.src else {
        return None;
    };
    let data = &original[..quote];
    let icmp = match kind {
        IcmpKind::Prohibited => Icmpv6Repr::DstUnreachable { code: 1, data },
        IcmpKind::TooBig(mtu) => Icmpv6Repr::PacketTooBig { mtu, data },
        IcmpKind::TimeExceeded => Icmpv6Repr::TimeExceeded { code: 0, data },
    };
    let header = Ipv6Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Icmpv6,
        payload_len: icmp.buffer_len() as u16,
        hop_limit: 64,
        traffic_class: 0,
        flow_label: 0,
    };
    let (head, body) = out[..HDR + quote].split_at_mut(header.buffer_len());
    header.emit(&mut Ipv6Packet::new_unchecked(head)).ok()?;
    // RFC 4443 §2.3: the checksum covers the pseudo-header (RFC 8200 §8.1).
    let pseudo = PseudoHeader::V6 { src, dst };
    icmp.emit(&mut Icmpv6Packet::new_unchecked(body), &pseudo)
        .ok()?;
    Some(HDR + quote)
}

fn is_icmp(v4: bool, protocol: u8) -> bool {
    protocol == if v4 { PROTO_ICMP } else { PROTO_ICMPV6 }
}

fn is_link_local(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
    }
}

fn addr_bits(addr: IpAddr) -> u32 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

fn addr_to_u128(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn u128_to_addr(v: u128, v4: bool) -> Option<IpAddr> {
    if v4 {
        u32::try_from(v).ok().map(|v| IpAddr::V4(Ipv4Addr::from(v)))
    } else {
        Some(IpAddr::V6(Ipv6Addr::from(v)))
    }
}

#[cfg(test)]
mod tests;
