//! The proxy: an HTTP/3 server on quiche that serves CONNECT-IP (egress through a TUN device) and
//! CONNECT-UDP (one connected UDP socket per session), built to serve hopping clients.
//!
//! Workers (`workers`, one thread each, pinned with `cores`) each own a QUIC socket of one
//! SO_REUSEPORT group (or an AF_XDP socket on one NIC queue: `server/xdp.rs`), a queue of the
//! multi-queue TUN device, their connections, sessions and CONNECT-UDP sockets; nothing on the
//! per-packet path is shared or locked. Steering programs (`masque-fastpath/bpf/`) bring each
//! short-header datagram to the worker its connection ID names (`server/route.rs`) and each TUN
//! packet to the worker serving its destination; what arrives elsewhere anyway is handed to its
//! owner through a ring (`server/handoff.rs`). `server/proxy.rs` builds them and merges their
//! counters. A worker reads and writes only through the traits of `server/endpoints.rs`, so the
//! unit tests (`server/tests.rs`) run it in memory.
//!
//! A worker runs a poll loop over its QUIC socket, its TUN queue and its CONNECT-UDP sockets.
//! Each pass: a burst of QUIC datagrams in (`recvmmsg`), each routed to its connection by
//! destination connection ID (never by address: a hopping client changes address every few
//! packets); then, per connection touched, HTTP/3 events, QUIC datagrams through the sessions, new
//! connection IDs while `scids_left() > 0`; then a burst from the TUN device and the UDP sockets;
//! then every connection's packets out (`sendmmsg` with GSO trains).
//!
//! Bad input never stops the loop: a malformed datagram, capsule or request is a counted drop, an
//! HTTP error status or a stream reset, as the RFCs say, and other clients are served on.

pub mod admission;
pub mod config;
mod endpoints;
pub mod generation;
mod handoff;
pub mod metrics;
mod peer;
mod proxy;
pub mod route;
mod xdp;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use ring::rand::SystemRandom;
use serde::Serialize;

use self::admission::{Admission, Gate, Policy, Refused, RetryTokens};
use self::endpoints::{Connect, Datagrams, Packets, UdpTarget};
use self::handoff::{Handoff, Rings};
use self::peer::PeerLink;
use self::proxy::{Published, Shared};
use crate::capsule::{Capsule, CapsuleDecoder, CapsuleRepr, Decoded, IpPrefix};
use crate::datagram::{self, Datagram, H3Datagram};
use crate::policy::{self, Guard, OwnAddresses, Policies};
use crate::quic::{self, Tls, CID_LEN};
use crate::request::{self, Rejection, Target};
use crate::session::connect_ip::{self, ConnectIpSession, SessionConfig, Verdict};
use crate::session::connect_udp::{self, ConnectUdpSession};
use crate::template::{Host, IpTarget};
use crate::tundev::{TcpCoalescer, TunDevice, TunSegments, VNET_HDR_LEN};
use crate::udp::UdpIo;
use mimiq_metrics::hlog::duration_histogram;

pub use config::ProxyConfig;
pub use proxy::{run_from_file, stats_table, Proxy};

/// Bytes of headroom kept in front of an inner packet so the datagram header is written in place.
const HEADROOM: usize = 16;
/// Largest inner packet handled (TUN reads, UDP payloads).
const MAX_INNER: usize = 65_535;
/// Packets read from the TUN device or one UDP socket per pass.
const EGRESS_BURST: usize = 64;
/// H3_MESSAGE_ERROR (RFC 9114 §8.1): the stream error for a malformed request.
const H3_MESSAGE_ERROR: u64 = quiche::h3::WireErrorCode::MessageError as u64;
/// H3_DATAGRAM_ERROR (RFC 9297 §2.1): the connection error for a malformed HTTP/3 datagram.
const H3_DATAGRAM_ERROR: u64 = 0x33;

/// A worker's counters (`stats_file` holds their sums and each worker's, `server/proxy.rs`).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Stats {
    /// QUIC datagrams received.
    pub udp_rx: u64,
    /// QUIC datagrams sent (GSO segments counted one by one).
    pub udp_tx: u64,
    /// Passes of the loop: one per return from `poll` (a wake-up or a timer).
    pub passes: u64,
    /// Received datagrams quiche refused (undecryptable, malformed).
    pub quic_recv_errors: u64,
    /// Datagrams for no known connection (whatever they got: see the next counters).
    pub unknown_connection: u64,
    /// Of those, dropped unanswered, by reason (`server/admission.rs`).
    pub unknown_dropped: HashMap<&'static str, u64>,
    /// Retry packets sent (RFC 9000 §8.1.2).
    pub retries_sent: u64,
    /// Stateless resets sent (RFC 9000 §10.3).
    pub stateless_resets_sent: u64,
    /// Version Negotiation packets sent.
    pub version_negotiations_sent: u64,
    /// Connections dropped because their handshake did not finish in `quic.handshake_timeout_ms`.
    pub handshake_timeouts: u64,
    /// Connections in their handshake now.
    pub half_open: u64,
    /// Datagrams for a live connection that quiche read no packet of: undecryptable (garbled
    /// or forged with a connection's ID, RFC 9001 §5.5 says to drop them), duplicates. Counted
    /// per burst (datagrams taken less packets read), so a datagram of several packets during
    /// the handshake can hide a dropped one.
    pub quic_packets_dropped: u64,
    /// Connections accepted / refused at `max_connections` / closed.
    pub connections_accepted: u64,
    /// Initials dropped because `max_connections` connections, or `quic.max_half_open`
    /// handshakes, were open.
    pub connections_refused: u64,
    /// Connections that ended.
    pub connections_closed: u64,
    /// Connections open now.
    pub connections_open: u64,
    /// Connections visited to send (those something happened to in a pass; idle ones are
    /// not visited).
    pub connections_flushed: u64,
    /// Migrations: a client moved its connection to a new, validated address (quiche's
    /// `PathEvent::PeerMigrated`; a probe alone, or a forged datagram, is not one).
    pub peer_migrations: u64,
    /// Connection IDs issued after the handshake.
    pub cids_issued: u64,
    /// Paths forgotten after a client migrated away from them.
    pub paths_abandoned: u64,
    /// The most paths one connection had at once (quiche's limit is `active_connection_id_limit`;
    /// a probe beyond it is dropped unanswered).
    pub paths_peak: u64,
    /// Sessions started, by protocol.
    pub sessions_ip: u64,
    /// CONNECT-UDP sessions started.
    pub sessions_udp: u64,
    /// Requests refused, by HTTP status.
    pub refused: HashMap<u16, u64>,
    /// Requests refused by `[policy]`, by reason (`masque-fastpath/src/policy.rs`).
    pub policy_refused: HashMap<&'static str, u64>,
    /// HTTP/3 datagrams received / sent.
    pub dgram_rx: u64,
    /// HTTP/3 datagrams sent.
    pub dgram_tx: u64,
    /// Datagrams with a bad Quarter Stream ID (the connection is closed with H3_DATAGRAM_ERROR)
    /// or for no session (dropped).
    pub dgram_unknown_stream: u64,
    /// Datagrams dropped because the connection's send queue was full (back-pressure).
    pub dgram_queue_full: u64,
    /// Datagrams quiche received that were never read: discarded because the connection's
    /// receive queue (`quic.dgram_queue_len`) was full (the oldest waiting one goes; a packet can
    /// carry hundreds of small datagrams), or still queued when the connection closed.
    pub dgram_recv_queue_full: u64,
    /// Inner packets larger than the connection can carry in a datagram.
    pub dgram_too_big: u64,
    /// Capsule-stream errors (the request stream is reset).
    pub capsule_errors: u64,
    /// Capsules of unknown types skipped.
    pub capsules_skipped: u64,
    /// Addresses asked for in ADDRESS_REQUEST capsules (RFC 9484 §4.7.2).
    pub addresses_requested: u64,
    /// Of those, refused (answered with the all-zero address).
    pub addresses_refused: u64,
    /// Addresses a session gave up for the one its ADDRESS_REQUEST asked for (a request sent
    /// with the CONNECT request starts the session on it instead).
    pub addresses_exchanged: u64,
    /// Packets written to / read from the TUN device.
    pub tun_tx: u64,
    /// Packets read from the TUN device (after cutting the large TCP segments the device hands
    /// over with its offloads into packets).
    pub tun_rx: u64,
    /// `read`s from the TUN device (one may carry up to 64 KB of a TCP flow).
    pub tun_reads: u64,
    /// TUN reads that could not be cut into packets (`tundev::SegmentError`).
    pub tun_bad_reads: u64,
    /// TUN packets for no session's address.
    pub tun_no_session: u64,
    /// TUN write errors.
    pub tun_errors: u64,
    /// CONNECT-IP drops by reason (sum over sessions, including closed ones).
    pub ip_drops: HashMap<&'static str, u64>,
    /// ICMP errors generated.
    pub icmp_errors: u64,
    /// CONNECT-UDP drops by reason.
    pub udp_drops: HashMap<&'static str, u64>,
    /// CONNECT-UDP payloads to targets / to clients.
    pub udp_to_target: u64,
    /// CONNECT-UDP payloads from targets.
    pub udp_to_client: u64,
    /// Socket send failures and drops (full buffers).
    pub socket_send_errors: u64,
    /// Datagrams dropped by a full socket send buffer.
    pub socket_send_dropped: u64,
    /// Received messages that carried a UDP GRO train (several QUIC datagrams); 0 without GRO.
    pub socket_rx_trains: u64,
    /// AF_XDP datapath: frames the socket received that were no UDP datagram to the proxy's
    /// port (malformed headers or checksums).
    pub xdp_rx_malformed: u64,
    /// Short-header datagrams that reached this worker although their connection ID names
    /// another (the steering program missed them); handed to the owner. Socket datapath only:
    /// on the AF_XDP one the NIC picks the queue by address, and handing over is expected.
    pub misrouted: u64,
    /// Packets passed to another worker: misrouted datagrams, and TUN packets read from this
    /// worker's queue for an address another worker serves.
    pub handoffs: u64,
    /// Of those, TUN packets.
    pub tun_handoffs: u64,
    /// Packets handed over that were dropped because the owner's ring was full.
    pub handoff_drops: u64,
    /// Packets other workers handed to this one.
    pub handoffs_received: u64,
    /// Updates of the TUN steering map that failed (the address's packets may then reach
    /// another worker first, and be handed over).
    pub steering_errors: u64,
    /// Datagrams and TUN packets passed to the other live generation's process, whose
    /// connections and addresses they belong to (`server/peer.rs`).
    pub peer_forwarded: u64,
    /// Of those, the ones that could not be passed (that process gone, its socket full).
    pub peer_drops: u64,
    /// Datagrams and TUN packets the other generation's process passed to this one.
    pub peer_received: u64,
    /// Nanoseconds per burst of QUIC datagrams through the proxy (recv → sessions, the inner
    /// packets written to the TUN device), percentiles.
    pub burst_ns: Percentiles,
    /// Nanoseconds per burst of TUN packets through the proxy (read → the datagrams carrying
    /// them sent), percentiles.
    pub tun_burst_ns: Percentiles,
}

/// A latency summary.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
        }
    }
}

// A CONNECT-IP session is larger than a CONNECT-UDP one; it stays inline, as every packet of
// the tunnel reads it, and there is one per client request.
#[allow(clippy::large_enum_variant)]
enum Kind {
    Ip(ConnectIpSession),
    Udp {
        session: ConnectUdpSession,
        socket: Box<dyn UdpTarget>,
    },
}

/// The addresses asked for by the ADDRESS_REQUEST capsules at the start of `stream` (the
/// request stream's first bytes); decoding stops at anything else.
fn requested_addresses(stream: &[u8]) -> Vec<IpPrefix> {
    let mut decoder = CapsuleDecoder::default();
    let mut out = Vec::new();
    let mut at = 0;
    while let Ok(Decoded::Capsule { capsule, consumed }) = decoder.decode(&stream[at..]) {
        let Capsule::AddressRequest(req) = capsule else {
            break;
        };
        out.extend(req.iter().map(|e| e.prefix));
        at += consumed;
    }
    out
}

struct Session {
    kind: Kind,
    decoder: CapsuleDecoder,
    /// Capsule bytes received and not yet consumed.
    inbuf: Vec<u8>,
    /// Capsule bytes waiting for stream capacity.
    outbuf: Vec<u8>,
}

struct Client {
    conn: quiche::Connection,
    h3: Option<quiche::h3::Connection>,
    sessions: HashMap<u64, Session>,
    /// Connection IDs routed to this client.
    cids: Vec<quiche::ConnectionId<'static>>,
    peer: SocketAddr,
    /// Paths the client migrated away from, to forget.
    left_paths: quic::LeftPaths,
    /// In the burst being read: quiche's count of packets read before its first datagram for
    /// this client, and the datagrams quiche took without an error since.
    burst: Option<(usize, u64)>,
    /// The handshake has not finished (counted in `Proxy::half_open`).
    handshaking: bool,
    /// quiche's next timer for this connection as last read (`Proxy::timers` holds an entry
    /// at or before it).
    timer: Option<Instant>,
}

/// One worker: its socket, TUN queue, connections and sessions; `D` and `P` are the socket and
/// the TUN queue in the proxy, in-memory ones in the unit tests (`server/endpoints.rs`).
struct Worker<D = UdpIo, P = TunDevice> {
    cfg: ProxyConfig,
    /// This worker's index (its connection IDs' route values name it).
    index: usize,
    /// What the workers share: route table, reset key, address pool, steering maps.
    shared: Arc<Shared>,
    /// Rings to and from the other workers.
    rings: Rings,
    /// A datagram another worker handed over, while it is read.
    handed: Handed,
    /// The way to the other generation's process, and (worker 0) what it passes to this one.
    peer: Option<PeerLink>,
    peer_rx: Option<UnixDatagram>,
    /// What is being served came from the other generation's process: never passed back.
    from_peer: bool,
    peer_buf: Vec<u8>,
    /// Where clients may go (`[policy]`), and the proxy's own addresses (refreshed every
    /// second).
    policies: Policies,
    own: OwnAddresses,
    /// The URI templates served.
    templates: request::Templates,
    io: D,
    quic: quiche::Config,
    h3: quiche::h3::Config,
    rng: SystemRandom,
    clients: HashMap<u64, Client>,
    next_client: u64,
    by_cid: HashMap<quiche::ConnectionId<'static>, u64>,
    /// This worker's queue of the TUN device.
    tun: Option<P>,
    tunnel_mtu: usize,
    /// The addresses of this worker's sessions.
    by_addr: AddressBook,
    /// CONNECT-UDP socket fd → (client, request stream).
    by_fd: HashMap<RawFd, (u64, u64)>,
    /// Opens CONNECT-UDP targets.
    connect: Connect,
    /// The CONNECT-UDP sockets `poll` found readable (empty: read every one).
    targets_ready: Vec<RawFd>,
    stats: Stats,
    burst_hist: Histogram<u64>,
    /// TUN read → datagrams sent, per burst, ns.
    tun_hist: Histogram<u64>,
    buf: Vec<u8>,
    reply: Vec<u8>,
    /// Consecutive TCP segments for the TUN device, written as one GSO packet (`datagrams`).
    coalescer: TcpCoalescer,
    /// Cuts the TUN device's large reads into packets.
    tun_segments: TunSegments,
    dirty: Vec<u64>,
    /// Connections that may have something to send this pass: read from, given datagrams,
    /// or their timer fired. Only these are visited: an idle connection costs nothing.
    to_flush: Vec<u64>,
    /// Connections' timers, earliest first; an entry whose time is not its connection's
    /// `timer` any more is stale and skipped (lazy deletion).
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Datagrams quiche received on connections that have closed (for `dgram_recv_queue_full`).
    closed_dgram_recv: u64,
    /// What datagrams for no known connection get.
    gate: Gate,
    retry_tokens: RetryTokens,
    /// Connections in their handshake, and their deadlines in the order they were accepted.
    half_open: usize,
    handshakes: VecDeque<(Instant, u64)>,
}

impl<D: Datagrams, P: Packets> Worker<D, P> {
    /// Worker `index` on its socket `io` and TUN queue `tun`; limits of `cfg` that are
    /// proxy-wide (`max_connections`, `quic.max_half_open`, `quic.retry_threshold`,
    /// `quic.unsolicited_per_second`) are shared out evenly.
    fn new(
        cfg: ProxyConfig,
        index: usize,
        shared: Arc<Shared>,
        io: D,
        tun: Option<P>,
        rings: Rings,
    ) -> Result<Self, String> {
        let quic = cfg.quic.transport_config(Tls::Server {
            cert: &cfg.cert,
            key: &cfg.key,
        })?;
        let rng = SystemRandom::new();
        let now = Instant::now();
        let n = shared.routes.workers();
        let policy = Policy {
            retry: cfg.quic.retry,
            retry_threshold: cfg.quic.retry_threshold.div_ceil(n),
            max_half_open: cfg.quic.max_half_open.div_ceil(n),
            max_connections: cfg.max_connections.div_ceil(n),
        };
        let unsolicited = cfg.quic.unsolicited_per_second.div_ceil(n as u32);
        let peer = match &shared.peer {
            Some(p) => {
                Some(PeerLink::new(p.other.clone()).map_err(|e| format!("peer socket: {e}"))?)
            }
            None => None,
        };
        let peer_rx = match &shared.peer {
            Some(p) if index == 0 => {
                p.rx.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take()
            }
            _ => None,
        };
        Ok(Worker {
            index,
            rings,
            peer,
            peer_rx,
            from_peer: false,
            peer_buf: Vec::new(),
            handed: Handed {
                data: Vec::new(),
                from: io.local_addr(),
                to: io.local_addr(),
            },
            policies: Policies::from_config(&cfg.policy)?,
            own: OwnAddresses::read(),
            templates: cfg.templates()?,
            gate: Gate::new(policy, unsolicited, now),
            retry_tokens: RetryTokens::new(&rng, now),
            half_open: 0,
            handshakes: VecDeque::new(),
            h3: quic::h3_config()?,
            quic,
            io,
            rng,
            clients: HashMap::new(),
            next_client: 0,
            by_cid: HashMap::new(),
            tun,
            tunnel_mtu: shared.tunnel_mtu,
            by_addr: AddressBook {
                map: HashMap::new(),
                worker: index as u32,
                shared: Arc::clone(&shared),
                errors: 0,
            },
            shared,
            by_fd: HashMap::new(),
            targets_ready: Vec::new(),
            connect: Box::new(|addr| {
                connect_udp_target(addr).map(|s| Box::new(s) as Box<dyn UdpTarget>)
            }),
            stats: Stats::default(),
            burst_hist: duration_histogram(),
            tun_hist: duration_histogram(),
            buf: vec![0; HEADROOM + MAX_INNER],
            reply: vec![0; 2048],
            coalescer: TcpCoalescer::default(),
            tun_segments: TunSegments::default(),
            dirty: Vec::new(),
            to_flush: Vec::new(),
            timers: BinaryHeap::new(),
            closed_dgram_recv: 0,
            cfg,
        })
    }

    /// Counters so far.
    pub fn stats(&mut self) -> Stats {
        self.stats.connections_open = self.clients.len() as u64;
        self.stats.half_open = self.half_open as u64;
        // quiche drops datagrams from a full receive queue without telling: what it received,
        // less what was read and what still waits, is what it dropped.
        let (received, waiting) =
            self.clients
                .values()
                .fold((self.closed_dgram_recv, 0), |(r, w), c| {
                    (
                        r + c.conn.stats().dgram_recv as u64,
                        w + c.conn.dgram_recv_queue_len() as u64,
                    )
                });
        self.stats.dgram_recv_queue_full = received.saturating_sub(self.stats.dgram_rx + waiting);
        let io = self.io.counters();
        self.stats.socket_send_errors = io.send_errors;
        self.stats.socket_send_dropped = io.send_dropped;
        self.stats.socket_rx_trains = io.rx_trains;
        self.stats.xdp_rx_malformed = io.rx_malformed;
        self.stats.steering_errors = self.by_addr.errors;
        self.stats.burst_ns = Percentiles::of(&self.burst_hist);
        self.stats.tun_burst_ns = Percentiles::of(&self.tun_hist);
        let mut ip = HashMap::new();
        let mut udp = HashMap::new();
        let (mut icmp, mut to_t, mut to_c) = (0, 0, 0);
        for c in self.clients.values() {
            for s in c.sessions.values() {
                match &s.kind {
                    Kind::Ip(x) => {
                        for r in connect_ip::DropReason::ALL {
                            *ip.entry(r.label()).or_insert(0) += x.counters().drops(r);
                        }
                        icmp += x.counters().icmp_errors;
                    }
                    Kind::Udp { session, .. } => {
                        for r in connect_udp::DropReason::ALL {
                            *udp.entry(r.label()).or_insert(0) +=
                                session.counters().drops[r as usize];
                        }
                        to_t += session.counters().to_target;
                        to_c += session.counters().to_client;
                    }
                }
            }
        }
        let mut s = self.stats.clone();
        for (k, v) in ip {
            *s.ip_drops.entry(k).or_insert(0) += v;
        }
        for (k, v) in udp {
            *s.udp_drops.entry(k).or_insert(0) += v;
        }
        s.icmp_errors += icmp;
        s.udp_to_target += to_t;
        s.udp_to_client += to_c;
        s
    }

    /// One pass of the loop: everything `ready` says is readable is read, every connection's
    /// timers run and its packets go out; nothing blocks.
    fn pass(&mut self, ready: Ready) -> io::Result<()> {
        self.stats.passes += 1;
        // Bursts until one comes back short: the socket is drained.
        if ready.quic {
            loop {
                let n = self.io.recv_burst()?;
                if n == 0 {
                    break;
                }
                let t0 = Instant::now();
                for i in 0..n {
                    self.on_udp(Source::Burst(i));
                }
                self.stats.udp_rx += n as u64;
                self.service_dirty();
                let _ = self.burst_hist.record(t0.elapsed().as_nanos() as u64);
                if !self.io.burst_full() {
                    break;
                }
            }
        }
        if ready.handoff {
            self.on_handoffs();
        }
        if ready.peer {
            self.on_peer();
        }
        // TUN packets wait for the flush below to leave as datagrams.
        let tun_read = ready.tun.then(Instant::now);
        if ready.tun {
            self.on_tun();
        }
        if ready.targets {
            self.on_udp_targets();
        }
        self.fire_timers(Instant::now());
        self.flush_all();
        if let Some(t0) = tun_read {
            let _ = self.tun_hist.record(t0.elapsed().as_nanos() as u64);
        }
        self.expire_handshakes(Instant::now());
        Ok(())
    }

    fn on_udp(&mut self, src: Source) {
        let index = self.index;
        let (pkt, from, local) = src.datagram(&mut self.io, &mut self.handed);
        let len = pkt.len();
        // A short header's destination ID names its worker (`server/route.rs`): one that
        // reached this worker anyway goes to its owner, which holds the connection, or knows
        // to reset it.
        if len > CID_LEN && pkt[0] & 0x80 == 0 {
            let owner = self.shared.routes.owner(&pkt[1..=CID_LEN]);
            if let Some(owner) = owner.filter(|&o| o != index) {
                let data = pkt.to_vec();
                if self.shared.steered {
                    self.stats.misrouted += 1;
                }
                self.hand_off(
                    owner,
                    Handoff::Quic {
                        from,
                        to: local,
                        data,
                    },
                );
                return;
            }
        }
        let hdr = match quiche::Header::from_slice(pkt, quic::CID_LEN) {
            Ok(h) => h,
            Err(_) => {
                self.stats.unknown_connection += 1;
                self.count_refused(Refused::Unparsable);
                return;
            }
        };
        let id = match self.by_cid.get(&hdr.dcid) {
            Some(&id) => id,
            None => {
                self.stats.unknown_connection += 1;
                match self.admit(&hdr, len, from, local, src) {
                    Some(id) => id,
                    None => return,
                }
            }
        };
        let (pkt, from, _) = src.datagram(&mut self.io, &mut self.handed);
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        // quiche drops what it cannot decrypt without an error (RFC 9001 §5.5): the datagrams
        // of a burst that its count of packets read does not account for were dropped
        // (`service` counts them, once per burst: the count costs ~100 instructions).
        if c.burst.is_none() {
            c.burst = Some((c.conn.stats().recv, 0));
        }
        match c.conn.recv(pkt, quiche::RecvInfo { from, to: local }) {
            Err(_) => self.stats.quic_recv_errors += 1,
            Ok(_) => {
                if let Some((_, taken)) = &mut c.burst {
                    *taken += 1;
                }
            }
        }
        note(&mut self.dirty, id);
    }

    /// A datagram for no known connection, whose first packet has header `hdr`: answered as
    /// `server/admission.rs` decides; the new connection's id if one was accepted.
    fn admit(
        &mut self,
        hdr: &quiche::Header<'_>,
        len: usize,
        from: SocketAddr,
        local: SocketAddr,
        src: Source,
    ) -> Option<u64> {
        // A connection ID the server chose (short and Handshake headers) of the other live
        // generation: that connection may live in the other process. Passed on, or dropped;
        // never reset, and before the reset rate limit.
        let routes = &self.shared.routes;
        let ours = matches!(hdr.ty, quiche::Type::Short | quiche::Type::Handshake);
        let other = ours
            && routes
                .generation_of(&hdr.dcid)
                .is_some_and(|g| g != routes.generation());
        if other && self.shared.generation.other_live() {
            if !self.pass_to_peer(src) {
                self.count_refused(Refused::OtherGeneration);
            }
            return None;
        }
        // Draining for a newer process: its new connections are that process's to serve.
        if self.shared.draining() && hdr.ty == quiche::Type::Initial && self.pass_to_peer(src) {
            return None;
        }
        let now = Instant::now();
        self.retry_tokens.rotate(&self.rng, now);
        let open = self.clients.len();
        let decision = self.gate.admit(
            hdr,
            len,
            from,
            open,
            self.half_open,
            &self.retry_tokens,
            now,
        );
        let odcid = match decision {
            Admission::Accept { odcid } => odcid,
            Admission::Drop(reason) => {
                self.count_refused(reason);
                return None;
            }
            Admission::Reset => {
                let out = self.io.send_buf();
                if let Some(n) = self.shared.reset_key.reset(&hdr.dcid, len, &self.rng, out) {
                    self.io.commit(n, local, from);
                    self.stats.stateless_resets_sent += 1;
                }
                return None;
            }
            Admission::VersionNegotiation => {
                let out = self.io.send_buf();
                if let Ok(n) = quiche::negotiate_version(&hdr.scid, &hdr.dcid, out) {
                    self.io.commit(n, local, from);
                    self.stats.version_negotiations_sent += 1;
                }
                return None;
            }
            Admission::Retry => {
                let new_scid = self.shared.routes.new_cid(self.index, &self.rng);
                let token = self.retry_tokens.mint(from, &hdr.dcid, &new_scid, now);
                let out = self.io.send_buf();
                if let Ok(n) =
                    quiche::retry(&hdr.scid, &hdr.dcid, &new_scid, &token, hdr.version, out)
                {
                    self.io.commit(n, local, from);
                    self.stats.retries_sent += 1;
                }
                return None;
            }
        };
        // After a Retry the connection's first ID is the one the Retry gave (bound into the
        // token); otherwise a fresh random one.
        let scid = match &odcid {
            Some(_) => hdr.dcid.clone().into_owned(),
            None => self.shared.routes.new_cid(self.index, &self.rng),
        };
        self.quic
            .set_stateless_reset_token(Some(self.shared.reset_key.token(&scid)));
        let odcid = odcid.map(quiche::ConnectionId::from_vec);
        let conn = match quiche::accept(&scid, odcid.as_ref(), local, from, &mut self.quic) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%from, "quiche refused a connection: {e}");
                self.stats.quic_recv_errors += 1;
                return None;
            }
        };
        let id = self.next_client;
        self.next_client += 1;
        // The client's retransmitted Initials still carry the DCID it chose: route them to this
        // connection too, or each would open another.
        let first_dcid = hdr.dcid.clone().into_owned();
        self.by_cid.insert(first_dcid.clone(), id);
        let mut client = Client {
            conn,
            h3: None,
            sessions: HashMap::new(),
            cids: vec![scid.clone(), first_dcid],
            peer: from,
            left_paths: self.cfg.quic.left_paths(),
            burst: None,
            handshaking: true,
            timer: None,
        };
        if let Err(e) = self.cfg.quic.instrument(&mut client.conn, "proxy") {
            tracing::warn!("qlog/keylog: {e}");
        }
        self.by_cid.insert(scid, id);
        self.clients.insert(id, client);
        self.half_open += 1;
        let deadline = now + Duration::from_millis(self.cfg.quic.handshake_timeout_ms);
        self.handshakes.push_back((deadline, id));
        self.stats.connections_accepted += 1;
        Some(id)
    }

    fn count_refused(&mut self, reason: Refused) {
        if matches!(reason, Refused::ConnectionsFull | Refused::HalfOpenFull) {
            self.stats.connections_refused += 1;
        }
        *self
            .stats
            .unknown_dropped
            .entry(reason.label())
            .or_insert(0) += 1;
    }

    /// Drops the connections whose handshake is past its deadline (the oldest first: the
    /// queue is in deadline order, so this looks at no connection that is not due).
    fn expire_handshakes(&mut self, now: Instant) {
        while let Some(&(deadline, id)) = self.handshakes.front() {
            if deadline > now {
                break;
            }
            self.handshakes.pop_front();
            if self.clients.get(&id).is_some_and(|c| c.handshaking) {
                self.stats.handshake_timeouts += 1;
                self.remove_client(id);
            }
        }
    }

    fn service_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for &id in &dirty {
            self.service(id);
        }
        self.to_flush.extend_from_slice(&dirty);
        dirty.clear();
        self.dirty = dirty;
    }

    /// HTTP/3 events, datagrams, and connection IDs for one client.
    fn service(&mut self, id: u64) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if let Some((read_before, taken)) = c.burst.take() {
            let read = c.conn.stats().recv.saturating_sub(read_before) as u64;
            self.stats.quic_packets_dropped += taken.saturating_sub(read);
        }
        let now = Instant::now();
        if c.handshaking && c.conn.is_established() {
            c.handshaking = false;
            self.half_open -= 1;
        }
        // New connection IDs so a hopping client always has spares.
        while c.conn.is_established() && c.conn.scids_left() > 0 {
            let cid = self.shared.routes.new_cid(self.index, &self.rng);
            let token = self.shared.reset_key.token(&cid);
            if c.conn.new_scid(&cid, token, false).is_err() {
                break;
            }
            self.by_cid.insert(cid.clone(), id);
            c.cids.push(cid);
            self.stats.cids_issued += 1;
        }
        while let Some(old) = c.conn.retired_scid_next() {
            self.by_cid.remove(&old);
            c.cids.retain(|x| *x != old);
        }
        // A hopping client leaves a path behind at every hop: forget those with nothing in
        // flight (quic::LeftPaths).
        while let Some(ev) = c.conn.path_event_next() {
            if let quiche::PathEvent::PeerMigrated(_, peer) = ev {
                c.peer = peer;
                self.stats.peer_migrations += 1;
            }
            c.left_paths.on_event(&ev, now);
        }
        self.stats.paths_abandoned += c.left_paths.forget(&mut c.conn, now) as u64;
        self.stats.paths_peak = self
            .stats
            .paths_peak
            .max(c.conn.path_stats().count() as u64);
        if c.h3.is_none() && (c.conn.is_established() || c.conn.is_in_early_data()) {
            match quiche::h3::Connection::with_transport(&mut c.conn, &self.h3) {
                Ok(h) => c.h3 = Some(h),
                Err(e) => {
                    tracing::debug!("h3 setup failed: {e}");
                    let _ = c.conn.close(true, 0x101, b"h3 setup failed");
                    return;
                }
            }
        }
        self.h3_events(id);
        self.datagrams(id);
    }

    fn h3_events(&mut self, id: u64) {
        // Requests are started once this pass's events are read, with the capsules that came
        // with them: an ADDRESS_REQUEST sent with a CONNECT-IP request (a client resuming a
        // lost tunnel asks for the addresses its applications use) then chooses the session's
        // first addresses, before two clients resuming at once are each given the other's.
        let mut requests: Vec<(u64, Vec<quiche::h3::Header>, Vec<u8>)> = Vec::new();
        loop {
            let Some(c) = self.clients.get_mut(&id) else {
                return;
            };
            let Some(h3) = c.h3.as_mut() else {
                return;
            };
            let (sid, ev) = match h3.poll(&mut c.conn) {
                Ok(x) => x,
                Err(quiche::h3::Error::Done) => break,
                Err(e) => {
                    tracing::debug!("h3 error: {e}");
                    // H3_GENERAL_PROTOCOL_ERROR (RFC 9114 §8.1).
                    let _ = c.conn.close(true, 0x101, b"h3 error");
                    break;
                }
            };
            if let Some(at) = requests.iter().position(|r| r.0 == sid) {
                match ev {
                    quiche::h3::Event::Data => {
                        while let Ok(n) = h3.recv_body(&mut c.conn, sid, &mut self.reply) {
                            if n == 0 {
                                break;
                            }
                            requests[at].2.extend_from_slice(&self.reply[..n]);
                        }
                        continue;
                    }
                    // The stream ends (or is reset) before the pass does: start it first.
                    _ => {
                        let (sid, list, early) = requests.remove(at);
                        self.on_request(id, sid, &list, early);
                    }
                }
            }
            match ev {
                quiche::h3::Event::Headers { list, .. } => requests.push((sid, list, Vec::new())),
                quiche::h3::Event::Data => self.on_stream_data(id, sid),
                quiche::h3::Event::Finished => self.on_finished(id, sid),
                quiche::h3::Event::Reset(_) => self.end_session(id, sid),
                _ => {}
            }
        }
        for (sid, list, early) in requests {
            self.on_request(id, sid, &list, early);
        }
        // Capsules that waited for stream capacity.
        if let Some(c) = self.clients.get_mut(&id) {
            if let Some(h3) = c.h3.as_mut() {
                for (&sid, s) in c.sessions.iter_mut() {
                    if !s.outbuf.is_empty() {
                        if let Ok(n) = h3.send_body(&mut c.conn, sid, &s.outbuf, false) {
                            s.outbuf.drain(..n);
                        }
                    }
                }
            }
        }
    }

    /// Starts (or refuses) the request on stream `sid`; `early` holds the capsule bytes that
    /// came with it, the start of the session's capsule stream.
    fn on_request(&mut self, id: u64, sid: u64, list: &[quiche::h3::Header], early: Vec<u8>) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        let preferred = requested_addresses(&early);
        let policy = self.policies.for_token(request::bearer_token(list)).clone();
        let verdict = request::validate(list, &self.cfg.tokens, &self.templates).and_then(|t| {
            if c.sessions.len() >= self.cfg.max_sessions_per_connection {
                Err(Rejection {
                    status: 429,
                    reason: "max_sessions_per_connection reached",
                })
            } else if datagram::quarter_stream_id(sid).is_err() {
                Err(Rejection {
                    status: 400,
                    reason: "not a request stream",
                })
            } else {
                Ok(t)
            }
        });
        let session = verdict.and_then(|t| match t {
            Target::Ip(scope) => {
                let Some(ip) = &self.cfg.ip else {
                    return Err(Rejection {
                        status: 501,
                        reason: "CONNECT-IP is not configured",
                    });
                };
                // A scope naming one host is checked now; every packet is checked too.
                if let IpTarget::Prefix(p) = &scope.target {
                    if *p == IpPrefix::host(p.addr()) {
                        policy
                            .check_addr(p.addr(), &self.own)
                            .map_err(|r| refused_by_policy(&mut self.stats, r))?;
                    }
                }
                let scfg = SessionConfig {
                    tunnel_mtu_bytes: self.tunnel_mtu,
                    decrement_ttl_from_client: false,
                    icmp_source_v4: ip.icmp_source_v4,
                    icmp_source_v6: ip.icmp_source_v6,
                    guard: Some(Arc::new(Guard {
                        policy,
                        own: self.own.clone(),
                    })),
                };
                let mut pool = self.shared.pool();
                let s = ConnectIpSession::preferring(scope, scfg, &mut *pool, &preferred);
                if s.assigned().is_empty() {
                    s.close(&mut *pool);
                    return Err(Rejection {
                        status: 503,
                        reason: "address pool exhausted",
                    });
                }
                Ok(Kind::Ip(s))
            }
            Target::Udp(t) => {
                if !self.cfg.udp.enabled {
                    return Err(Rejection {
                        status: 501,
                        reason: "CONNECT-UDP is disabled",
                    });
                }
                let unreachable = |e: io::Error| {
                    tracing::info!("CONNECT-UDP to {:?}:{}: {e}", t.host, t.port);
                    Rejection {
                        status: 502,
                        reason: "target unreachable or unresolvable",
                    }
                };
                let addr = resolve(&t.host, t.port).map_err(unreachable)?;
                policy
                    .check_udp(addr.ip(), addr.port(), &self.own)
                    .map_err(|r| refused_by_policy(&mut self.stats, r))?;
                let socket = (self.connect)(addr).map_err(unreachable)?;
                tracing::info!(stream = sid, target = %addr, "CONNECT-UDP session");
                Ok(Kind::Udp {
                    session: ConnectUdpSession::new(),
                    socket,
                })
            }
        });
        let h3 = c.h3.as_mut().expect("events come from h3");
        match session {
            Err(r) => {
                *self.stats.refused.entry(r.status).or_insert(0) += 1;
                tracing::info!(stream = sid, "request refused: {r}");
                let status = r.status.to_string();
                let hdrs = [quiche::h3::Header::new(b":status", status.as_bytes())];
                let _ = h3.send_response(&mut c.conn, sid, &hdrs, true);
            }
            Ok(kind) => {
                let hdrs = [
                    quiche::h3::Header::new(b":status", b"200"),
                    quiche::h3::Header::new(b"capsule-protocol", b"?1"),
                ];
                if h3.send_response(&mut c.conn, sid, &hdrs, false).is_err() {
                    // Stream blocked or gone: nothing started; the client will retry or reset.
                    if let Kind::Ip(s) = kind {
                        s.close(&mut *self.shared.pool());
                    }
                    return;
                }
                let mut session = Session {
                    kind,
                    decoder: CapsuleDecoder::default(),
                    inbuf: early,
                    outbuf: Vec::new(),
                };
                match &session.kind {
                    Kind::Ip(s) => {
                        self.stats.sessions_ip += 1;
                        for a in s.assigned() {
                            self.by_addr.bind(a.prefix.addr(), (id, sid));
                        }
                        let mut out = vec![0u8; 4096];
                        if let Ok(n) = s.emit_start(&mut out) {
                            session.outbuf.extend_from_slice(&out[..n]);
                        }
                        tracing::info!(stream = sid, assigned = ?s.assigned(), "CONNECT-IP session");
                    }
                    Kind::Udp { socket, .. } => {
                        self.stats.sessions_udp += 1;
                        self.by_fd.insert(socket.fd(), (id, sid));
                    }
                }
                if let Ok(n) = h3.send_body(&mut c.conn, sid, &session.outbuf, false) {
                    session.outbuf.drain(..n);
                }
                let early = !session.inbuf.is_empty();
                c.sessions.insert(sid, session);
                if early {
                    self.on_stream_data(id, sid);
                }
            }
        }
    }

    fn on_stream_data(&mut self, id: u64, sid: u64) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        let h3 = c.h3.as_mut().expect("events come from h3");
        let Some(s) = c.sessions.get_mut(&sid) else {
            // Body on a refused request: read and discard.
            while let Ok(n) = h3.recv_body(&mut c.conn, sid, &mut self.reply) {
                if n == 0 {
                    break;
                }
            }
            return;
        };
        let mut error = false;
        // What is buffered already (the capsules that came with the request) is decoded even
        // when nothing new arrived.
        loop {
            let n = h3.recv_body(&mut c.conn, sid, &mut self.reply).unwrap_or(0);
            s.inbuf.extend_from_slice(&self.reply[..n]);
            // Decode every whole capsule buffered.
            loop {
                match s.decoder.decode(&s.inbuf) {
                    Ok(Decoded::NeedMore { .. }) => break,
                    Ok(Decoded::Skipped { consumed, .. }) => {
                        self.stats.capsules_skipped += 1;
                        s.inbuf.drain(..consumed);
                    }
                    Ok(Decoded::Capsule { capsule, consumed }) => {
                        let mut answer: Option<Vec<u8>> = None;
                        match (&mut s.kind, capsule) {
                            (Kind::Ip(ip), Capsule::AddressRequest(req)) => {
                                let had: Vec<IpAddr> =
                                    ip.assigned().iter().map(|a| a.prefix.addr()).collect();
                                let answered =
                                    ip.on_address_request(&req, &mut *self.shared.pool());
                                match answered {
                                    Ok(entries) => {
                                        self.stats.addresses_requested += req.iter().count() as u64;
                                        self.stats.addresses_refused += entries
                                            .iter()
                                            .filter(|e| {
                                                e.request_id != 0
                                                    && e.prefix.addr().is_unspecified()
                                            })
                                            .count()
                                            as u64;
                                        // An address exchanged for the one asked for is
                                        // routed to the session no more.
                                        for gone in had.iter().filter(|a| {
                                            !ip.assigned().iter().any(|b| b.prefix.addr() == **a)
                                        }) {
                                            self.by_addr.unbind(*gone);
                                            self.stats.addresses_exchanged += 1;
                                        }
                                        let mut out = vec![0u8; 64 + 40 * entries.len()];
                                        if let Ok(n) =
                                            CapsuleRepr::AddressAssign(&entries).emit(&mut out)
                                        {
                                            out.truncate(n);
                                            answer = Some(out);
                                        }
                                        for a in ip.assigned() {
                                            self.by_addr.bind(a.prefix.addr(), (id, sid));
                                        }
                                    }
                                    Err(_) => error = true,
                                }
                            }
                            // DATAGRAM capsules: datagrams over the stream (RFC 9297 §3.5).
                            (_, Capsule::Datagram(_)) => {}
                            // A client may not assign addresses or routes to the proxy in
                            // mimiq's deployment; ignore them.
                            _ => {}
                        }
                        s.inbuf.drain(..consumed);
                        if let Some(a) = answer {
                            s.outbuf.extend_from_slice(&a);
                        }
                    }
                    Err(_) => {
                        error = true;
                        break;
                    }
                }
                if error {
                    break;
                }
            }
            if error || n == 0 {
                break;
            }
        }
        if error {
            // A malformed capsule is a stream error (RFC 9297 §3.3): reset this request only.
            //= https://www.rfc-editor.org/rfc/rfc9114#section-4.1.2
            //# Malformed requests or responses that are
            //# detected MUST be treated as a stream error of type H3_MESSAGE_ERROR.
            self.stats.capsule_errors += 1;
            let _ = c
                .conn
                .stream_shutdown(sid, quiche::Shutdown::Write, H3_MESSAGE_ERROR);
            let _ = c
                .conn
                .stream_shutdown(sid, quiche::Shutdown::Read, H3_MESSAGE_ERROR);
            self.end_session(id, sid);
        }
    }

    /// The client ended its request stream: the session ends, and a capsule cut short by the end
    /// of the stream is a malformed request.
    fn on_finished(&mut self, id: u64, sid: u64) {
        let truncated = self
            .clients
            .get(&id)
            .and_then(|c| c.sessions.get(&sid))
            .is_some_and(|s| s.decoder.finish(&s.inbuf).is_err());
        if truncated {
            //= https://www.rfc-editor.org/rfc/rfc9297#section-3.3
            //# If the receive side of a stream carrying capsules is terminated
            //# cleanly (for example, in HTTP/3 this is defined as receiving a QUIC
            //# STREAM frame with the FIN bit set) and the last capsule on the stream
            //# was truncated, this MUST be treated as if it were a malformed or
            //# incomplete message.
            self.stats.capsule_errors += 1;
            if let Some(c) = self.clients.get_mut(&id) {
                let _ = c
                    .conn
                    .stream_shutdown(sid, quiche::Shutdown::Write, H3_MESSAGE_ERROR);
            }
        }
        self.end_session(id, sid);
    }

    fn end_session(&mut self, id: u64, sid: u64) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        let Some(s) = c.sessions.remove(&sid) else {
            return;
        };
        retire_session(s, &mut self.by_addr, &mut self.by_fd, &mut self.stats);
    }

    fn datagrams(&mut self, id: u64) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        let tun = self.tun.as_ref();
        // Each datagram is taken as the buffer quiche already holds it in (no copy out); the
        // coalescer copies TCP payloads into its batch.
        while let Ok(mut buf) = c.conn.dgram_recv_buf() {
            let len = buf.len();
            self.stats.dgram_rx += 1;
            let Ok(h) = H3Datagram::parse(&buf[..len]) else {
                //= https://www.rfc-editor.org/rfc/rfc9297#section-2.1
                //# Receipt of a QUIC DATAGRAM frame whose payload is too short to allow
                //# parsing the Quarter Stream ID field MUST be treated as an HTTP/3
                //# connection error of type H3_DATAGRAM_ERROR (0x33).
                // (A Quarter Stream ID above 2^60-1 too: `H3Datagram::parse`.)
                self.stats.dgram_unknown_stream += 1;
                let _ = c
                    .conn
                    .close(true, H3_DATAGRAM_ERROR, b"malformed HTTP/3 datagram");
                break;
            };
            let sid = h.stream_id();
            let qsid = h.quarter_stream_id;
            let off = len - h.payload.len();
            let Some(s) = c.sessions.get_mut(&sid) else {
                // RFC 9297 §2.1: datagrams for unknown streams are dropped (or buffered).
                self.stats.dgram_unknown_stream += 1;
                continue;
            };
            match &mut s.kind {
                Kind::Ip(ip) => {
                    let Ok(ctx) = crate::datagram::ContextPayload::parse(&buf[off..len]) else {
                        *self
                            .stats
                            .ip_drops
                            .entry("truncated_context_id")
                            .or_insert(0) += 1;
                        continue;
                    };
                    if ctx.context_id != datagram::CONTEXT_ID_PAYLOAD {
                        *self.stats.ip_drops.entry("unknown_context").or_insert(0) += 1;
                        continue;
                    }
                    let start = len - ctx.payload.len();
                    let pkt = &mut buf[start..len];
                    match ip.on_datagram(pkt, &mut self.reply) {
                        Verdict::Forward(n) => {
                            let Some(t) = tun else { continue };
                            let co = &mut self.coalescer;
                            if co.push(&pkt[..n]) {
                                continue;
                            }
                            write_batch(t, co, &mut self.stats);
                            if co.push(&pkt[..n]) {
                                continue;
                            }
                            // Not TCP data: written on its own behind an all-zero vnet header.
                            let out = &mut self.buf[..VNET_HDR_LEN + n];
                            out[..VNET_HDR_LEN].fill(0);
                            out[VNET_HDR_LEN..].copy_from_slice(&pkt[..n]);
                            match t.send(out) {
                                Ok(_) => self.stats.tun_tx += 1,
                                Err(_) => self.stats.tun_errors += 1,
                            }
                        }
                        Verdict::Reply(n) => {
                            send_datagram(&mut c.conn, qsid, &self.reply[..n], &mut self.stats)
                        }
                        Verdict::Drop(_) => {}
                    }
                }
                Kind::Udp { session, socket } => {
                    if let Ok(p) = session.on_datagram(&buf[off..len]) {
                        let _ = socket.send(p);
                    }
                }
            }
        }
        if let Some(t) = tun {
            write_batch(t, &mut self.coalescer, &mut self.stats);
        }
    }

    fn on_tun(&mut self) {
        for _ in 0..EGRESS_BURST {
            let Some(tun) = self.tun.as_ref() else {
                return;
            };
            // With the device's TCP offloads a read is up to 64 KB of one flow; it is cut into
            // packets of the flow's MSS, each written behind the headroom.
            let n = match tun.recv(self.tun_segments.buffer()) {
                Ok(n) => n,
                Err(_) => break,
            };
            self.stats.tun_reads += 1;
            if self.tun_segments.start(n).is_err() {
                self.stats.tun_bad_reads += 1;
                continue;
            }
            while let Some(len) = self.tun_segments.next_into(&mut self.buf[HEADROOM..]) {
                self.egress(len);
            }
        }
    }

    /// One packet from the TUN device, at `self.buf[HEADROOM..HEADROOM + n]`, to the session
    /// its destination is assigned to.
    fn egress(&mut self, n: usize) {
        self.stats.tun_rx += 1;
        let pkt = &self.buf[HEADROOM..HEADROOM + n];
        let dst = match pkt.first().map(|b| b >> 4) {
            Some(4) if n >= 20 => IpAddr::from(<[u8; 4]>::try_from(&pkt[16..20]).unwrap()),
            Some(6) if n >= 40 => IpAddr::from(<[u8; 16]>::try_from(&pkt[24..40]).unwrap()),
            _ => {
                self.stats.tun_no_session += 1;
                return;
            }
        };
        let Some((id, sid)) = self.by_addr.get(dst) else {
            // Another worker's address (the steering map was being updated): handed over.
            match self.by_addr.owner(dst).filter(|&o| o != self.index) {
                Some(owner) => {
                    let data = pkt.to_vec();
                    self.stats.tun_handoffs += 1;
                    self.hand_off(owner, Handoff::Tun(data));
                }
                // The other generation's process may serve the address.
                None if !self.from_peer && self.shared.generation.other_live() => {
                    let pkt = &self.buf[HEADROOM..HEADROOM + n];
                    if self.peer.as_mut().is_some_and(|p| p.send_tun(pkt)) {
                        self.stats.peer_forwarded += 1;
                    } else {
                        self.stats.peer_drops += 1;
                    }
                }
                None => self.stats.tun_no_session += 1,
            }
            return;
        };
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        let Some(Session {
            kind: Kind::Ip(ip), ..
        }) = c.sessions.get_mut(&sid)
        else {
            return;
        };
        let qsid = sid / 4;
        match ip.on_egress(&mut self.buf[HEADROOM..HEADROOM + n], &mut self.reply) {
            Verdict::Forward(len) => {
                // Write the datagram header into the headroom: no copy of the packet here.
                let hl = datagram::header_len(qsid, 0);
                let start = HEADROOM - hl;
                let _ = datagram::emit_header(qsid, 0, &mut self.buf[start..HEADROOM]);
                send_datagram(
                    &mut c.conn,
                    u64::MAX,
                    &self.buf[start..HEADROOM + len],
                    &mut self.stats,
                );
                note(&mut self.to_flush, id);
            }
            Verdict::Reply(len) => {
                // An ICMP error the proxy built: rare, copied behind a vnet header.
                let sent = self
                    .tun
                    .as_ref()
                    .map(|t| t.send(&vnet_framed(&self.reply[..len])));
                if !matches!(sent, Some(Ok(_))) {
                    self.stats.tun_errors += 1;
                }
            }
            Verdict::Drop(_) => {}
        }
    }

    /// Reads the CONNECT-UDP sockets `poll` found readable (every one when it did not say).
    fn on_udp_targets(&mut self) {
        let fds = match std::mem::take(&mut self.targets_ready) {
            ready if ready.is_empty() => self.by_fd.keys().copied().collect(),
            ready => ready,
        };
        for fd in fds {
            let Some(&(id, sid)) = self.by_fd.get(&fd) else {
                continue;
            };
            let Some(c) = self.clients.get_mut(&id) else {
                continue;
            };
            let Some(Session {
                kind: Kind::Udp { session, socket },
                ..
            }) = c.sessions.get_mut(&sid)
            else {
                continue;
            };
            let qsid = sid / 4;
            let hl = datagram::header_len(qsid, 0);
            for _ in 0..EGRESS_BURST {
                let n = match socket.recv(&mut self.buf[HEADROOM..]) {
                    Ok(n) => n,
                    Err(_) => break,
                };
                let start = HEADROOM - hl;
                let _ = datagram::emit_header(qsid, 0, &mut self.buf[start..HEADROOM]);
                session.on_target_payload();
                send_datagram(
                    &mut c.conn,
                    u64::MAX,
                    &self.buf[start..HEADROOM + n],
                    &mut self.stats,
                );
                note(&mut self.to_flush, id);
            }
        }
    }

    /// Runs the timers that are due (quiche's `on_timeout`); their connections are flushed.
    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((t, id))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(c) = self.clients.get_mut(&id) else {
                continue;
            };
            match c.timer {
                Some(due) if due <= now => {
                    c.timer = None;
                    c.conn.on_timeout();
                    self.to_flush.push(id);
                }
                // The timer moved later since this entry was pushed: keep one entry for it.
                Some(later) if later != t => self.timers.push(Reverse((later, id))),
                _ => {}
            }
        }
    }

    /// Sends what the connections touched this pass have to send, re-arms their timers and
    /// forgets those that closed. Connections nothing happened to are not visited.
    fn flush_all(&mut self) {
        self.service_dirty();
        let mut ids = std::mem::take(&mut self.to_flush);
        ids.sort_unstable();
        ids.dedup();
        let mut closed = Vec::new();
        for &id in &ids {
            let Some(c) = self.clients.get_mut(&id) else {
                continue;
            };
            self.stats.connections_flushed += 1;
            loop {
                let out = self.io.send_buf();
                match c.conn.send(out) {
                    Ok((len, info)) => {
                        self.io.commit(len, info.from, info.to);
                        self.stats.udp_tx += 1;
                    }
                    Err(quiche::Error::Done) => break,
                    Err(_) => {
                        let _ = c.conn.close(false, 0x1, b"send failed");
                        break;
                    }
                }
            }
            if c.conn.is_closed() {
                closed.push(id);
                continue;
            }
            // A timer earlier than the one the heap holds an entry for gets its own entry; a
            // later one is found when the earlier entry pops (`fire_timers`).
            let next = c.conn.timeout_instant();
            if let Some(t) = next {
                if c.timer.is_none_or(|old| t < old) {
                    self.timers.push(Reverse((t, id)));
                }
            }
            c.timer = next;
        }
        self.io.flush();
        for id in closed {
            self.remove_client(id);
        }
        ids.clear();
        self.to_flush = ids;
    }

    /// Forgets a connection: its IDs, its sessions (their addresses and sockets go back).
    fn remove_client(&mut self, id: u64) {
        let Some(c) = self.clients.remove(&id) else {
            return;
        };
        if c.handshaking {
            self.half_open -= 1;
        }
        for cid in &c.cids {
            self.by_cid.remove(cid);
        }
        for (_, s) in c.sessions {
            retire_session(s, &mut self.by_addr, &mut self.by_fd, &mut self.stats);
        }
        self.stats.connections_closed += 1;
        self.closed_dgram_recv += c.conn.stats().dgram_recv as u64;
        tracing::info!(stats = ?c.conn.stats(), "connection closed");
    }

    /// Gives the counters to `server/proxy.rs`, which writes the stats file.
    fn publish(&mut self) {
        let s = self.stats();
        self.shared.publish(
            self.index,
            Published {
                stats: s,
                up: self.burst_hist.clone(),
                down: self.tun_hist.clone(),
            },
        );
    }

    /// Passes a packet to worker `owner`.
    fn hand_off(&mut self, owner: usize, h: Handoff) {
        if self.rings.send(owner, h) {
            self.stats.handoffs += 1;
        } else {
            self.stats.handoff_drops += 1;
        }
    }

    /// Passes the datagram being read (at `src`) to the other generation's process, unless it
    /// came from there; true if it was passed.
    fn pass_to_peer(&mut self, src: Source) -> bool {
        if self.from_peer || !self.shared.generation.other_live() {
            return false;
        }
        let Some(peer) = self.peer.as_mut() else {
            return false;
        };
        let (data, from, to) = src.datagram(&mut self.io, &mut self.handed);
        let sent = peer.send_quic(from, to, data);
        if sent {
            self.stats.peer_forwarded += 1;
        } else {
            self.stats.peer_drops += 1;
        }
        sent
    }

    /// Serves what the other generation's process passed over (worker 0 reads it, and hands
    /// what another worker owns to it).
    fn on_peer(&mut self) {
        let mut buf = std::mem::take(&mut self.peer_buf);
        buf.resize(peer::MAX_ITEM, 0);
        for _ in 0..EGRESS_BURST {
            let Some(rx) = self.peer_rx.as_ref() else {
                break;
            };
            let Ok(n) = rx.recv(&mut buf) else {
                break;
            };
            let Some(item) = peer::decode(&buf[..n]) else {
                self.stats.peer_drops += 1;
                continue;
            };
            self.stats.peer_received += 1;
            self.from_peer = true;
            match item {
                Handoff::Quic { from, to, data } => {
                    let owner = (data.len() > CID_LEN && data[0] & 0x80 == 0)
                        .then(|| self.shared.routes.owner(&data[1..=CID_LEN]))
                        .flatten()
                        .unwrap_or(self.index);
                    if owner == self.index {
                        self.handed = Handed { data, from, to };
                        self.on_udp(Source::Handed);
                    } else {
                        self.hand_off(owner, Handoff::Quic { from, to, data });
                    }
                }
                Handoff::Tun(data) => {
                    let n = data.len().min(self.buf.len() - HEADROOM);
                    self.buf[HEADROOM..HEADROOM + n].copy_from_slice(&data[..n]);
                    self.egress(n);
                }
            }
            self.from_peer = false;
        }
        self.peer_buf = buf;
        self.service_dirty();
    }

    /// Serves what other workers handed over.
    fn on_handoffs(&mut self) {
        while let Some(h) = self.rings.take() {
            self.stats.handoffs_received += 1;
            match h {
                Handoff::Quic { from, to, data } => {
                    self.handed = Handed { data, from, to };
                    self.on_udp(Source::Handed);
                    self.stats.udp_rx += 1;
                }
                Handoff::Tun(data) => {
                    let n = data.len().min(self.buf.len() - HEADROOM);
                    self.buf[HEADROOM..HEADROOM + n].copy_from_slice(&data[..n]);
                    self.egress(n);
                }
            }
        }
        self.service_dirty();
    }
}

impl<D: Datagrams> Worker<D, TunDevice> {
    /// Serves until `stop` is set; then closes every connection and publishes the final
    /// counters.
    fn run(&mut self, stop: &AtomicBool) -> io::Result<()> {
        let mut pollfds: Vec<libc::pollfd> = Vec::new();
        // Serving: the stats file is written once every worker has published.
        self.publish();
        let mut last_stats = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            // The earliest timer (a stale entry only wakes the loop early).
            let timeout = self
                .timers
                .peek()
                .map_or(Duration::from_millis(100), |Reverse((t, _))| {
                    t.saturating_duration_since(Instant::now())
                })
                .min(Duration::from_millis(100));
            pollfds.clear();
            pollfds.push(pollfd(self.io.poll_fd()));
            pollfds.push(pollfd(self.rings.wake_fd()));
            if let Some(t) = &self.tun {
                pollfds.push(pollfd(t.as_raw_fd()));
            }
            if let Some(p) = &self.peer_rx {
                pollfds.push(pollfd(p.as_raw_fd()));
            }
            pollfds.extend(self.by_fd.keys().map(|&fd| pollfd(fd)));
            // SAFETY: pollfds is a live array of initialised pollfd structs.
            let n = unsafe {
                libc::poll(
                    pollfds.as_mut_ptr(),
                    pollfds.len() as _,
                    quic::poll_timeout_ms(timeout),
                )
            };
            let ready = if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
                Ready::ALL
            } else {
                // Only what poll found readable is read: no read per pass that can only say
                // EAGAIN (error and hang-up events count as readable, so the read reports them).
                let tun = usize::from(self.tun.is_some());
                let peer = usize::from(self.peer_rx.is_some());
                let targets = 2 + tun + peer;
                self.targets_ready.clear();
                self.targets_ready.extend(
                    pollfds[targets..]
                        .iter()
                        .filter(|p| p.revents != 0)
                        .map(|p| p.fd),
                );
                Ready {
                    quic: pollfds[0].revents != 0,
                    handoff: pollfds[1].revents != 0,
                    tun: tun == 1 && pollfds[2].revents != 0,
                    peer: peer == 1 && pollfds[2 + tun].revents != 0,
                    targets: pollfds[targets..].iter().any(|p| p.revents != 0),
                }
            };
            self.pass(ready)?;
            if last_stats.elapsed() >= Duration::from_secs(1) {
                last_stats = Instant::now();
                self.own = OwnAddresses::read();
                self.publish();
            }
        }
        for (&id, c) in self.clients.iter_mut() {
            let _ = c.conn.close(true, 0x100, b"proxy shutting down");
            self.to_flush.push(id);
        }
        self.flush_all();
        self.publish();
        Ok(())
    }
}

/// Where the datagram being read is.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// In the socket's receive burst, at this index.
    Burst(usize),
    /// Handed over by another worker (`Worker::handed`).
    Handed,
}

/// A datagram another worker handed over.
struct Handed {
    data: Vec<u8>,
    from: SocketAddr,
    to: SocketAddr,
}

impl Source {
    /// The datagram, its sender and the address it was sent to.
    fn datagram<'a>(
        self,
        io: &'a mut impl Datagrams,
        handed: &'a mut Handed,
    ) -> (&'a mut [u8], SocketAddr, SocketAddr) {
        match self {
            Source::Burst(i) => io.datagram(i),
            Source::Handed => (&mut handed.data[..], handed.from, handed.to),
        }
    }
}

/// The inner addresses of a worker's CONNECT-IP sessions, kept in step with the TUN steering
/// map (`masque-fastpath/bpf/tun_steer.c`) so the device hands their packets to this worker.
struct AddressBook {
    /// Address → (client, request stream).
    map: HashMap<IpAddr, (u64, u64)>,
    worker: u32,
    shared: Arc<Shared>,
    /// Steering map updates that failed.
    errors: u64,
}

impl AddressBook {
    fn bind(&mut self, addr: IpAddr, to: (u64, u64)) {
        self.map.insert(addr, to);
        if let Some(s) = &self.shared.tun_steering {
            if let Err(e) = s.assign(addr, self.shared.tun_queue_offset + self.worker) {
                tracing::warn!(%addr, "TUN steering: {e}");
                self.errors += 1;
            }
        }
    }

    fn unbind(&mut self, addr: IpAddr) {
        if self.map.remove(&addr).is_some() {
            if let Some(s) = &self.shared.tun_steering {
                s.release(addr);
            }
        }
    }

    #[inline]
    fn get(&self, addr: IpAddr) -> Option<(u64, u64)> {
        self.map.get(&addr).copied()
    }

    /// The worker serving `addr` (a map lookup in the kernel: only for packets this worker has
    /// no session for).
    fn owner(&self, addr: IpAddr) -> Option<usize> {
        let s = self.shared.tun_steering.as_ref()?;
        let queue = s.owner(addr)?.checked_sub(self.shared.tun_queue_offset)?;
        Some(queue as usize).filter(|&w| w < self.shared.routes.workers())
    }
}

/// Adds connection `id` to a list of connections to visit this pass, unless it is the last one
/// there already (a burst's packets mostly come for one connection; the list is deduplicated
/// before use).
fn note(list: &mut Vec<u64>, id: u64) {
    if list.last() != Some(&id) {
        list.push(id);
    }
}

/// Writes the coalescer's pending batch, if any; `tun_tx` counts its segments.
fn write_batch(tun: &impl Packets, co: &mut TcpCoalescer, stats: &mut Stats) {
    let segments = co.segments() as u64;
    if let Some(out) = co.take() {
        match tun.send(out) {
            Ok(_) => stats.tun_tx += segments,
            Err(_) => stats.tun_errors += segments,
        }
    }
}

/// `pkt` behind an all-zero vnet header (control path: ICMP errors the proxy builds).
fn vnet_framed(pkt: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; VNET_HDR_LEN + pkt.len()];
    v[VNET_HDR_LEN..].copy_from_slice(pkt);
    v
}

/// Sends one HTTP datagram. `qsid` `u64::MAX` means `payload` is already framed; otherwise the
/// header is prepended (control-path replies only).
fn send_datagram(conn: &mut quiche::Connection, qsid: u64, payload: &[u8], stats: &mut Stats) {
    let r = if qsid == u64::MAX {
        conn.dgram_send(payload)
    } else {
        let mut v = vec![0u8; payload.len() + 16];
        match (Datagram {
            quarter_stream_id: qsid,
            context_id: 0,
            payload,
        })
        .emit(&mut v)
        {
            Ok(n) => conn.dgram_send(&v[..n]),
            Err(_) => return,
        }
    };
    match r {
        Ok(()) => stats.dgram_tx += 1,
        Err(quiche::Error::BufferTooShort) => stats.dgram_too_big += 1,
        Err(_) => stats.dgram_queue_full += 1,
    }
}

fn retire_session(
    s: Session,
    by_addr: &mut AddressBook,
    by_fd: &mut HashMap<RawFd, (u64, u64)>,
    stats: &mut Stats,
) {
    match s.kind {
        Kind::Ip(ip) => {
            for a in ip.assigned() {
                by_addr.unbind(a.prefix.addr());
            }
            for r in connect_ip::DropReason::ALL {
                *stats.ip_drops.entry(r.label()).or_insert(0) += ip.counters().drops(r);
            }
            stats.icmp_errors += ip.counters().icmp_errors;
            ip.close(&mut *by_addr.shared.pool());
        }
        Kind::Udp { session, socket } => {
            by_fd.remove(&socket.fd());
            for r in connect_udp::DropReason::ALL {
                *stats.udp_drops.entry(r.label()).or_insert(0) +=
                    session.counters().drops[r as usize];
            }
            stats.udp_to_target += session.counters().to_target;
            stats.udp_to_client += session.counters().to_client;
        }
    }
}

/// The address of a CONNECT-UDP target (a name is resolved: the policy judges the address).
fn resolve(host: &Host, port: u16) -> io::Result<SocketAddr> {
    match host {
        Host::Ip(ip) => Ok(SocketAddr::new(*ip, port)),
        Host::Name(n) => (n.as_str(), port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address")),
    }
}

/// Counts a refusal of `[policy]` and gives the request's answer: 403 (RFC 9110 §15.5.4).
fn refused_by_policy(stats: &mut Stats, refusal: policy::Refusal) -> Rejection {
    *stats.policy_refused.entry(refusal.label()).or_insert(0) += 1;
    Rejection {
        status: 403,
        reason: "destination refused by the proxy's policy",
    }
}

fn connect_udp_target(addr: SocketAddr) -> io::Result<UdpSocket> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let s = UdpSocket::bind(bind)?;
    s.connect(addr)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Which of the proxy's descriptors to read in a pass.
#[derive(Debug, Clone, Copy)]
struct Ready {
    /// The QUIC socket.
    quic: bool,
    /// Packets other workers handed over.
    handoff: bool,
    /// The TUN device.
    tun: bool,
    /// The other generation's process passed something over.
    peer: bool,
    /// Any CONNECT-UDP target socket.
    targets: bool,
}

impl Ready {
    /// Everything (when poll said nothing useful, e.g. interrupted).
    const ALL: Ready = Ready {
        quic: true,
        handoff: true,
        tun: true,
        peer: true,
        targets: true,
    };
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

#[cfg(test)]
mod tests;
