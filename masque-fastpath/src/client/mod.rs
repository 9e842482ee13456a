//! The MASQUE client: one QUIC connection to the proxy, one CONNECT-IP or CONNECT-UDP request on
//! it, and a relay between HTTP/3 datagrams and the host.
//!
//! - CONNECT-IP: a TUN device configured from ADDRESS_ASSIGN (its addresses) and
//!   ROUTE_ADVERTISEMENT (routes through it, minus the proxy's own address so the tunnel never
//!   carries itself), with the MTU one datagram can carry.
//! - CONNECT-UDP: a local UDP port; whatever an application sends there reaches the target, and
//!   the target's answers go back to the last local sender.
//!
//! The client can move its connection between local addresses while the tunnel runs, when and
//! where a [`hop::HopPolicy`] says ([`hop::TimerHops`] from [`ClientConfig::hop_every`] for the
//! CLI; the agent's hop strategies in its tunnel mode): each hop binds a new socket (a fresh
//! port) and hands it to the migration driver ([`crate::migrate::Migrator`], which the agent's
//! direct mode runs too). The driver validates the new path with `probe_path` while traffic
//! continues on the current one, then migrates (RFC 9000 §9). Both ends forget the path left
//! ([`quic::LeftPaths`]), which retires the connection IDs used there: any number of hops to
//! fresh addresses, and no ID ever sent from two addresses.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use quiche::h3::NameValue;
use ring::rand::SystemRandom;
use serde::Serialize;

use crate::capsule::{
    AddressEntry, Capsule, CapsuleDecoder, CapsuleRepr, Decoded, IpAddressRange, IpPrefix,
};
use crate::datagram::{self, Datagram};
use crate::netcfg::{NetConfig, Route};
use crate::quic::{self, QuicSettings, Tls};
use crate::request::{self, Target};
use crate::tundev::TunDevice;
use crate::udp::UdpIo;

pub mod hop;
mod reconnect;

use reconnect::previous_addresses_request;
pub use reconnect::{run_reconnecting, Local, Reconnect};

use crate::migrate::{HopEvent, MigrationConfig, Migrator};
use hop::{HopOutcome, HopPolicy};

const HEADROOM: usize = 16;
const MAX_INNER: usize = 65_535;
/// Packets read from the TUN device (or the local UDP socket) per pass: longer GSO trains, so
/// the proxy gets more per wake-up and costs less per GB (docs/PERFORMANCE.md). It takes
/// `flush` keeping quiche's order: with upstream quiche's 128-packet duplicate window a probe
/// sent behind a burst this long was dropped (the vendored window is 4096).
const BURST: usize = 256;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The proxy's UDP address.
    pub proxy: SocketAddr,
    /// TLS server name and `:authority`.
    pub server_name: String,
    /// Local addresses to use, first one first; more than one lets the client hop.
    pub bind: Vec<IpAddr>,
    /// Bearer token for `proxy-authorization`.
    pub token: Option<String>,
    /// CA to verify the proxy with; `None`: no verification (test setups).
    pub ca: Option<PathBuf>,
    /// QUIC settings.
    pub quic: QuicSettings,
    /// Move the connection to the next local address (new port) this often.
    pub hop_every: Option<Duration>,
    /// Give up if the tunnel is not up within this time.
    pub connect_timeout: Duration,
    /// The proxy's URI template for the request's `:path`; `None`: the protocol's well-known
    /// default (RFC 9298 §3, RFC 9484 §3).
    pub template: Option<crate::template::UriTemplate>,
}

/// What to tunnel.
#[derive(Debug, Clone)]
pub enum Mode {
    /// CONNECT-IP with this scope into a TUN device of this name.
    Ip {
        /// The request's scope.
        scope: crate::template::IpScope,
        /// TUN device name.
        tun: String,
        /// Routes through the TUN device: `None` installs the advertised ones (minus the proxy's
        /// address); `Some(list)` installs only these prefixes (empty: none).
        routes: Option<Vec<IpPrefix>>,
    },
    /// CONNECT-UDP to this target, exposed on a local UDP address.
    Udp {
        /// The target.
        target: crate::template::UdpTarget,
        /// Local address applications send to.
        listen: SocketAddr,
    },
}

/// Client counters, printed as JSON at exit.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ClientStats {
    /// HTTP/3 datagrams sent / received.
    pub dgram_tx: u64,
    /// HTTP/3 datagrams received.
    pub dgram_rx: u64,
    /// Inner bytes sent / received.
    pub bytes_tx: u64,
    /// Inner bytes received.
    pub bytes_rx: u64,
    /// Datagrams dropped: send queue full or too big.
    pub dgram_dropped: u64,
    /// Datagrams received for another stream or context.
    pub dgram_unknown: u64,
    /// Hops started / completed / failed.
    pub hops_started: u64,
    /// Hops completed (migrated to the validated path).
    pub hops_done: u64,
    /// Hops that failed (no spare CID, validation failed).
    pub hops_failed: u64,
    /// Hops postponed because no spare connection ID had arrived yet.
    pub hops_deferred: u64,
    /// Milliseconds spent quiet before hops ([`HopPolicy::idle_before_hop`]: the defence that
    /// leaves a random gap between an address's last packet and the next one's first).
    pub hop_idle_ms: u64,
    /// PATH_CHALLENGEs asked for again because the answer to the last one was late.
    pub probes_resent: u64,
    /// Hops not made because the proxy sent `disable_active_migration`.
    pub hops_refused: u64,
    /// Paths forgotten after hops (their connection IDs retired).
    pub paths_abandoned: u64,
    /// QUIC packets quiche built for a path whose socket was already closed (dropped).
    pub tx_unroutable: u64,
    /// Passes where quiche's `send` failed with an error other than `Done` (nothing was sent).
    pub quic_send_errors: u64,
    /// Keep-alives sent on a quiet connection (`quic::KeepAlive`).
    pub keepalives: u64,
    /// Connections after the first that carried the tunnel on ([`run_reconnecting`]).
    pub reconnects: u64,
    /// Of those, the ones the proxy gave other addresses than the tunnel had (ADDRESS_REQUEST
    /// refused): the applications' flows did not survive them.
    pub addresses_changed: u64,
    /// Assigned addresses.
    pub addresses: Vec<String>,
    /// Tunnel MTU: CONNECT-IP, the TUN device's (`quic::tunnel_mtu`, which the proxy enforces
    /// too); CONNECT-UDP, the largest UDP payload the connection carries now (one more byte is
    /// refused by quiche's `dgram_send` and counted in `dgram_dropped`).
    pub mtu: usize,
}

/// Errors that end the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Settings or local setup.
    #[error("{0}")]
    Setup(String),
    /// The proxy refused the request with this status.
    #[error("proxy refused the request: HTTP {0}")]
    Refused(u16),
    /// The connection failed or closed.
    #[error("connection: {0}")]
    Connection(String),
    /// The tunnel was up and its connection ended without being asked to (the proxy is gone,
    /// or closed it); [`Client::take_local`] keeps what the applications use for the next one.
    #[error("connection: {0}")]
    Lost(String),
    /// Socket or device I/O.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
}

struct Path {
    io: UdpIo,
}

/// A running client.
pub struct Client {
    cfg: ClientConfig,
    /// The connection, inside the migration driver that moves it between local addresses.
    mig: Migrator,
    h3: Option<quiche::h3::Connection>,
    h3cfg: quiche::h3::Config,
    paths: Vec<Path>,
    policy: Box<dyn HopPolicy>,
    /// QUIC datagrams sent since the policy was last asked.
    sent_since_poll: u64,
    /// An address the policy asked for that could not be probed yet (no spare ID, or the quiet
    /// before it is not over).
    wanted_hop: Option<IpAddr>,
    /// Until then the client sends nothing: the idle before a hop
    /// ([`HopPolicy::idle_before_hop`]).
    quiet_until: Option<Instant>,
    stream: Option<u64>,
    status: Option<u16>,
    decoder: CapsuleDecoder,
    inbuf: Vec<u8>,
    assigned: Vec<IpPrefix>,
    routes: Vec<IpAddressRange>,
    got_routes: bool,
    tun: Option<TunDevice>,
    local_udp: Option<(UdpSocket, Option<SocketAddr>)>,
    /// The device or socket of a lost connection of the same tunnel, adopted once this one is
    /// ready ([`Client::resume`]).
    resume: Option<Local>,
    /// The Request IDs of the ADDRESS_REQUEST for the addresses the tunnel had, and whether
    /// the proxy has answered it.
    address_request: Option<(Vec<u64>, bool)>,
    /// Capsules still to write on the request stream.
    outbuf: Vec<u8>,
    mode: Mode,
    stats: ClientStats,
    buf: Vec<u8>,
    tmp: Vec<u8>,
}

impl Client {
    /// Connects (the handshake runs in [`Client::run`]); hops as [`ClientConfig::hop_every`]
    /// says, over [`ClientConfig::bind`].
    pub fn new(cfg: ClientConfig, mode: Mode) -> Result<Client, ClientError> {
        let policy: Box<dyn HopPolicy> = match cfg.hop_every {
            Some(every) => Box::new(hop::TimerHops::new(cfg.bind.clone(), every)),
            None => Box::new(hop::NoHops),
        };
        Self::with_policy(cfg, mode, policy)
    }

    /// Connects from the first of [`ClientConfig::bind`] and hops when and where `policy` says
    /// ([`ClientConfig::hop_every`] is ignored).
    pub fn with_policy(
        cfg: ClientConfig,
        mode: Mode,
        policy: Box<dyn HopPolicy>,
    ) -> Result<Client, ClientError> {
        let mut qc = cfg
            .quic
            .transport_config(Tls::Client {
                ca: cfg.ca.as_deref(),
            })
            .map_err(ClientError::Setup)?;
        let first = *cfg
            .bind
            .first()
            .ok_or_else(|| ClientError::Setup("no local address to bind".into()))?;
        let mut io = UdpIo::bind(SocketAddr::new(first, 0))?;
        io.set_max_payload(cfg.quic.max_udp_payload_bytes);
        let (scid, _) = quic::new_cid(&SystemRandom::new());
        let mut conn = quiche::connect(
            Some(&cfg.server_name),
            &scid,
            io.local_addr(),
            cfg.proxy,
            &mut qc,
        )
        .map_err(|e| ClientError::Connection(e.to_string()))?;
        cfg.quic
            .instrument(&mut conn, "client")
            .map_err(|e| ClientError::Setup(format!("qlog/keylog: {e}")))?;
        let migration = MigrationConfig {
            // mimiq-proxy forgets the paths a client left, and every hop binds a fresh port.
            server_forgets_paths: true,
            ..MigrationConfig::default()
        };
        let mig = Migrator::new(conn, io.local_addr(), cfg.proxy, migration)
            .with_left_paths(cfg.quic.left_paths());
        Ok(Client {
            h3cfg: quic::h3_config().map_err(ClientError::Setup)?,
            mig,
            h3: None,
            paths: vec![Path { io }],
            policy,
            sent_since_poll: 0,
            wanted_hop: None,
            quiet_until: None,
            stream: None,
            status: None,
            decoder: CapsuleDecoder::default(),
            inbuf: Vec::new(),
            assigned: Vec::new(),
            routes: Vec::new(),
            got_routes: false,
            tun: None,
            local_udp: None,
            resume: None,
            address_request: None,
            outbuf: Vec::new(),
            mode,
            stats: ClientStats::default(),
            buf: vec![0; HEADROOM + MAX_INNER],
            tmp: vec![0; 65_536],
            cfg,
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// Runs until `stop` is set or the connection ends; `on_ready` is called once when the tunnel
    /// carries traffic (TUN configured, or the local UDP port bound).
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        mut on_ready: impl FnMut(&ClientStats),
    ) -> Result<ClientStats, ClientError> {
        let started = Instant::now();
        let mut ready = false;
        let mut pollfds: Vec<libc::pollfd> = Vec::new();
        let mut keepalive = quic::KeepAlive::new(
            Duration::from_millis(self.cfg.quic.idle_timeout_ms),
            started,
        );
        self.flush();
        while !stop.load(Ordering::Relaxed) {
            if self.mig.connection().is_closed() {
                break;
            }
            if !ready && started.elapsed() > self.cfg.connect_timeout {
                return Err(ClientError::Connection(format!(
                    "tunnel not up after {:?} (handshake {}, status {:?})",
                    self.cfg.connect_timeout,
                    if self.mig.connection().is_established() {
                        "done"
                    } else {
                        "not done"
                    },
                    self.status
                )));
            }
            let now = Instant::now();
            let policy_timeout = self.policy.poll(now);
            let quiet = self.quiet_until.map(|t| t.saturating_duration_since(now));
            let timeout = [self.mig.timeout(now), policy_timeout, quiet]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(Duration::from_millis(50))
                .min(Duration::from_millis(50));
            pollfds.clear();
            for p in &self.paths {
                pollfds.push(pollfd(p.io.socket().as_raw_fd()));
            }
            // While quiet, what the applications send waits where it is (and is not polled for).
            let quiet = self.quiet();
            if let Some(t) = self.tun.as_ref().filter(|_| !quiet) {
                pollfds.push(pollfd(t.as_raw_fd()));
            }
            if let Some((s, _)) = self.local_udp.as_ref().filter(|_| !quiet) {
                pollfds.push(pollfd(s.as_raw_fd()));
            }
            // SAFETY: pollfds is a live array of initialised pollfd structs.
            unsafe {
                libc::poll(
                    pollfds.as_mut_ptr(),
                    pollfds.len() as _,
                    quic::poll_timeout_ms(timeout),
                )
            };
            self.recv_quic()?;
            // quiche's timers and the hop's deadline and probe retry (each only when due).
            self.mig.on_timeout(Instant::now());
            if keepalive.on_tick(self.mig.connection_mut(), Instant::now()) {
                self.stats.keepalives = keepalive.sent();
            }
            self.on_quic_events()?;
            if !ready && self.tunnel_ready() {
                match self.resume.take() {
                    Some(local) => self.adopt_local(local)?,
                    None => self.setup_local()?,
                }
                ready = true;
                on_ready(&self.stats);
            }
            if ready && !self.quiet() {
                self.local_to_datagrams();
            }
            if ready {
                self.maybe_hop();
                self.abandon_old_paths();
            }
            if !self.quiet() {
                self.flush();
            }
            if ready {
                self.policy.on_stats(&self.stats, Instant::now());
            }
        }
        if !self.mig.connection().is_closed() {
            let _ = self.mig.connection_mut().close(true, 0x100, b"client done");
            self.flush();
        } else if ready && !stop.load(Ordering::Relaxed) {
            // The tunnel was up and ended without being asked to.
            return Err(ClientError::Lost(format!(
                "tunnel lost after {:.1} s: {}",
                started.elapsed().as_secs_f64(),
                quic::close_reason(self.mig.connection())
            )));
        }
        if let Some(e) = self.mig.connection().peer_error() {
            if !ready {
                return Err(ClientError::Connection(format!("peer closed: {e:?}")));
            }
        }
        if let Some(s) = self.status.filter(|&s| s != 200) {
            return Err(ClientError::Refused(s));
        }
        Ok(self.stats.clone())
    }

    fn tunnel_ready(&self) -> bool {
        match self.mode {
            Mode::Ip { .. } => {
                self.status == Some(200)
                    && !self.assigned.is_empty()
                    && self.got_routes
                    && !self.awaiting_addresses()
            }
            Mode::Udp { .. } => self.status == Some(200),
        }
    }

    /// Reads every socket, one burst each in turn, newest first (a probe's answer arrives on
    /// the newest), until all are drained. Draining the active socket first would let hundreds
    /// of newer packets through before the answer, and quiche drops a packet more than 4096
    /// numbers older than the newest it received as a duplicate, without a word (128 in
    /// upstream quiche, where the hop then timed out; vendor/quiche/MIMIQ-PATCH.md).
    /// [`Client::flush`] keeps the same order on the way out.
    fn recv_quic(&mut self) -> Result<(), ClientError> {
        loop {
            let mut more = false;
            for p in self.paths.iter_mut().rev() {
                let n = p.io.recv_burst()?;
                let to = p.io.local_addr();
                for i in 0..n {
                    let (pkt, from) = p.io.datagram(i);
                    if let Err(e) = self.mig.recv(pkt, from, to) {
                        tracing::debug!("recv on {to}: {e}");
                    }
                }
                more |= p.io.burst_full();
            }
            if !more {
                return Ok(());
            }
        }
    }

    fn on_quic_events(&mut self) -> Result<(), ClientError> {
        // (Spare source connection IDs, which each new path needs, are the driver's.)
        if self.h3.is_none() && self.mig.connection().is_established() {
            let h3 = quiche::h3::Connection::with_transport(self.mig.connection_mut(), &self.h3cfg)
                .map_err(|e| ClientError::Connection(e.to_string()))?;
            self.h3 = Some(h3);
        }
        let Some(h3) = self.h3.as_mut() else {
            return Ok(());
        };
        if self.stream.is_none() {
            let target = match &self.mode {
                Mode::Ip { scope, .. } => Target::Ip(scope.clone()),
                Mode::Udp { target, .. } => Target::Udp(target.clone()),
            };
            let hdrs = request::request_headers(
                &target,
                &self.cfg.server_name,
                self.cfg.token.as_deref(),
                self.cfg.template.as_ref(),
            );
            match h3.send_request(self.mig.connection_mut(), &hdrs, false) {
                Ok(sid) => self.stream = Some(sid),
                Err(quiche::h3::Error::StreamBlocked) => {}
                Err(e) => return Err(ClientError::Connection(e.to_string())),
            }
        }
        let mut capsule_data = false;
        loop {
            match h3.poll(self.mig.connection_mut()) {
                Ok((sid, quiche::h3::Event::Headers { list, .. })) if Some(sid) == self.stream => {
                    self.status = request::response_status(&list);
                    let capsules = list
                        .iter()
                        .any(|h| h.name() == b"capsule-protocol" && h.value() == b"?1");
                    if self.status != Some(200) || !capsules {
                        let s = self.status.unwrap_or(0);
                        let _ = self
                            .mig
                            .connection_mut()
                            .close(true, 0x100, b"request refused");
                        return Err(ClientError::Refused(s));
                    }
                }
                Ok((sid, quiche::h3::Event::Data)) if Some(sid) == self.stream => {
                    while let Ok(n) = h3.recv_body(self.mig.connection_mut(), sid, &mut self.tmp) {
                        if n == 0 {
                            break;
                        }
                        self.inbuf.extend_from_slice(&self.tmp[..n]);
                    }
                    capsule_data = true;
                }
                Ok((sid, quiche::h3::Event::Finished | quiche::h3::Event::Reset(_)))
                    if Some(sid) == self.stream =>
                {
                    let _ = self
                        .mig
                        .connection_mut()
                        .close(true, 0x100, b"request stream ended");
                    return Err(ClientError::Connection(
                        "the proxy ended the request stream".into(),
                    ));
                }
                Ok(_) => {}
                Err(quiche::h3::Error::Done) => break,
                Err(e) => return Err(ClientError::Connection(e.to_string())),
            }
        }
        if capsule_data {
            self.on_capsules()?;
        }
        if let (Some(sid), Some(h3)) = (self.stream, self.h3.as_mut()) {
            // Sent with the request, not after the response: the proxy then starts the session
            // on these addresses if they are free (mimiq-proxy does), before another client
            // resuming at the same moment is given one of them.
            if self.address_request.is_none() {
                self.outbuf = previous_addresses_request(&self.resume, &mut self.address_request);
            }
            if !self.outbuf.is_empty() {
                if let Ok(n) = h3.send_body(self.mig.connection_mut(), sid, &self.outbuf, false) {
                    self.outbuf.drain(..n);
                }
            }
        }
        // Datagrams from the proxy.
        let Some(sid) = self.stream else {
            return Ok(());
        };
        while let Ok(len) = self.mig.connection_mut().dgram_recv(&mut self.buf) {
            let Ok(d) = Datagram::parse(&self.buf[..len]) else {
                self.stats.dgram_unknown += 1;
                continue;
            };
            if d.quarter_stream_id * 4 != sid || d.context_id != datagram::CONTEXT_ID_PAYLOAD {
                self.stats.dgram_unknown += 1;
                continue;
            }
            self.stats.dgram_rx += 1;
            self.stats.bytes_rx += d.payload.len() as u64;
            match (&self.tun, &self.local_udp) {
                (Some(t), _) => {
                    let _ = t.send(d.payload);
                }
                (None, Some((s, Some(app)))) => {
                    let _ = s.send_to(d.payload, app);
                }
                _ => {}
            }
        }
        self.on_hop_events();
        Ok(())
    }

    /// What became of the hops the driver made: counted and told to the policy.
    fn on_hop_events(&mut self) {
        let now = Instant::now();
        while let Some(event) = self.mig.poll_event() {
            let outcome = match event {
                HopEvent::Completed { from, to, latency } => {
                    self.stats.hops_done += 1;
                    HopOutcome::Done {
                        from: from.ip(),
                        to: to.ip(),
                        latency,
                    }
                }
                HopEvent::Failed { to, reason } => {
                    tracing::info!("hop to {to}: {reason:?}");
                    self.stats.hops_failed += 1;
                    HopOutcome::Failed { to: to.ip() }
                }
            };
            self.policy.on_hop(outcome, now);
        }
        let m = self.mig.stats();
        self.stats.probes_resent = m.probes_resent;
        self.stats.paths_abandoned = m.paths_forgotten;
    }

    fn on_capsules(&mut self) -> Result<(), ClientError> {
        loop {
            match self.decoder.decode(&self.inbuf) {
                Ok(Decoded::NeedMore { .. }) => return Ok(()),
                Ok(Decoded::Skipped { consumed, .. }) => {
                    self.inbuf.drain(..consumed);
                }
                Ok(Decoded::Capsule { capsule, consumed }) => {
                    match capsule {
                        Capsule::AddressAssign(a) => {
                            if let Some((ids, answered)) = self.address_request.as_mut() {
                                *answered |= a.iter().any(|e| ids.contains(&e.request_id));
                            }
                            self.assigned = a
                                .iter()
                                .map(|e| e.prefix)
                                .filter(|p| !p.addr().is_unspecified())
                                .collect();
                        }
                        Capsule::RouteAdvertisement(r) => {
                            self.routes = r.iter().collect();
                            self.got_routes = true;
                        }
                        _ => {}
                    }
                    self.inbuf.drain(..consumed);
                }
                Err(e) => {
                    // The request stream is the whole tunnel: a malformed capsule from the proxy
                    // ends the connection, with the code of a malformed message.
                    //= https://www.rfc-editor.org/rfc/rfc9114#section-4.1.2
                    //# Malformed requests or responses that are
                    //# detected MUST be treated as a stream error of type H3_MESSAGE_ERROR.
                    let code = quiche::h3::WireErrorCode::MessageError as u64;
                    let _ = self
                        .mig
                        .connection_mut()
                        .close(true, code, b"malformed capsule");
                    return Err(ClientError::Connection(format!("malformed capsule: {e}")));
                }
            }
        }
    }

    /// Opens the TUN device or the local UDP socket.
    fn setup_local(&mut self) -> Result<(), ClientError> {
        let qsid = self.stream.unwrap_or(0) / 4;
        let now = self
            .mig
            .connection()
            .dgram_max_writable_len()
            .map_or(0, |n| n.saturating_sub(datagram::header_len(qsid, 0)));
        let fits = quic::tunnel_mtu(self.cfg.quic.max_udp_payload_bytes).min(now);
        match &self.mode {
            Mode::Ip { tun, routes, .. } => {
                let mtu = fits;
                if mtu < 1280 {
                    tracing::warn!(
                        mtu,
                        "a datagram carries less than 1280 bytes: raise quic.max_udp_payload_bytes"
                    );
                }
                let dev = TunDevice::create(tun, mtu)?;
                let nc = NetConfig::new().map_err(|e| ClientError::Setup(e.to_string()))?;
                let link = nc
                    .link(tun)
                    .map_err(|e| ClientError::Setup(e.to_string()))?;
                for p in &self.assigned {
                    nc.add_address(&link, p.addr(), p.prefix_len(), None)
                        .map_err(|e| ClientError::Setup(e.to_string()))?;
                    self.stats
                        .addresses
                        .push(format!("{}/{}", p.addr(), p.prefix_len()));
                }
                let prefixes: Vec<(IpAddr, u8)> = match routes {
                    None => self
                        .routes
                        .iter()
                        .flat_map(|r| range_to_prefixes(r.start, r.end, Some(self.cfg.proxy.ip())))
                        .collect(),
                    Some(list) => list.iter().map(|p| (p.addr(), p.prefix_len())).collect(),
                };
                for (destination, prefix_len) in prefixes {
                    let route = Route {
                        destination,
                        prefix_len,
                        gateway: None,
                    };
                    nc.add_route(&link, &route)
                        .map_err(|e| ClientError::Setup(e.to_string()))?;
                }
                self.stats.mtu = mtu;
                self.tun = Some(dev);
            }
            Mode::Udp { listen, .. } => {
                let s = UdpSocket::bind(listen)
                    .map_err(|e| ClientError::Setup(format!("bind {listen}: {e}")))?;
                s.set_nonblocking(true)?;
                self.stats.mtu = now;
                self.stats.addresses.push(s.local_addr()?.to_string());
                self.local_udp = Some((s, None));
            }
        }
        Ok(())
    }

    /// Packets from the TUN device or the local UDP socket into datagrams.
    fn local_to_datagrams(&mut self) {
        let Some(sid) = self.stream else {
            return;
        };
        let qsid = sid / 4;
        let hl = datagram::header_len(qsid, 0);
        let start = HEADROOM - hl;
        for _ in 0..BURST {
            let r = match (&self.tun, &mut self.local_udp) {
                (Some(t), _) => t.recv(&mut self.buf[HEADROOM..]),
                (None, Some((s, app))) => {
                    s.recv_from(&mut self.buf[HEADROOM..]).map(|(n, from)| {
                        *app = Some(from);
                        n
                    })
                }
                _ => return,
            };
            let Ok(n) = r else {
                break;
            };
            let _ = datagram::emit_header(qsid, 0, &mut self.buf[start..HEADROOM]);
            match self
                .mig
                .connection_mut()
                .dgram_send(&self.buf[start..HEADROOM + n])
            {
                Ok(()) => {
                    self.stats.dgram_tx += 1;
                    self.stats.bytes_tx += n as u64;
                }
                Err(_) => self.stats.dgram_dropped += 1,
            }
        }
    }

    /// Starts a hop when the policy asks for one: a new socket on that address, handed to the
    /// driver, which probes it and migrates once the probe is answered (or gives up after
    /// [`MigrationConfig::hop_timeout_ms`]).
    fn maybe_hop(&mut self) {
        let now = Instant::now();
        if self.mig.hop_in_progress().is_some() || self.quiet() {
            return;
        }
        let current = self.mig.local_addr().ip();
        let sent = std::mem::take(&mut self.sent_since_poll);
        let asked = self.policy.poll_hop(now, current, sent);
        let Some(addr) = asked.or(self.wanted_hop.take()) else {
            return;
        };
        //# RFC 9000 §9: If the peer sent the disable_active_migration transport parameter, an
        //# endpoint also MUST NOT send packets (including probing packets) from a different
        //# local address to the address the peer used during the handshake.
        if self.mig.migration_disabled() {
            if self.stats.hops_refused == 0 {
                tracing::warn!("the proxy sent disable_active_migration: no hops, the connection stays on {current}");
            }
            self.stats.hops_refused += 1;
            return;
        }
        // Every path left holds one connection ID each way until both ends forget it (a few
        // round trips); a probe the proxy has no spare ID for goes unanswered for a second.
        // So at most a quarter of the IDs may be held by paths left (the proxy holds its side
        // of each a little longer): beyond that the hop waits.
        let held_limit = (self.cfg.quic.active_connection_id_limit / 4).max(1) as usize;
        if self.mig.connection().available_dcids() == 0 || self.mig.pending_forgets() >= held_limit
        {
            // No spare connection ID from the proxy yet (it replaces retired ones within a round
            // trip), or too many paths left still held: try again on the next pass.
            self.stats.hops_deferred += 1;
            self.wanted_hop = Some(addr);
            return;
        }
        // The idle before the hop: nothing leaves until it is over, then the probe does.
        if self.quiet_until.take().is_none() {
            let idle = self.policy.idle_before_hop();
            if !idle.is_zero() {
                self.quiet_until = Some(now + idle);
                self.stats.hop_idle_ms += idle.as_millis() as u64;
                self.wanted_hop = Some(addr);
                return;
            }
        }
        let io = match UdpIo::bind(SocketAddr::new(addr, 0)) {
            Ok(mut io) => {
                io.set_max_payload(self.cfg.quic.max_udp_payload_bytes);
                io
            }
            Err(e) => {
                tracing::warn!("hop: {e}");
                self.stats.hops_failed += 1;
                self.policy.on_hop(HopOutcome::Failed { to: addr }, now);
                return;
            }
        };
        let local = io.local_addr();
        match self.mig.request_hop(local, now) {
            Ok(()) => {
                self.stats.hops_started += 1;
                self.paths.push(Path { io });
            }
            Err(e) => {
                let c = self.mig.connection();
                tracing::info!(
                    "hop to {local}: {e} (spare proxy IDs {}, our IDs active {}, paths {})",
                    c.available_dcids(),
                    c.active_scids(),
                    c.path_stats().count()
                );
                self.stats.hops_failed += 1;
                self.policy.on_hop(HopOutcome::Failed { to: addr }, now);
            }
        }
    }

    /// Whether the client is in the idle before a hop (it sends nothing).
    fn quiet(&self) -> bool {
        self.quiet_until.is_some_and(|t| Instant::now() < t)
    }

    /// Closes the sockets of paths the driver no longer needs: not in use, not being probed,
    /// not a path left that is still waiting to be forgotten.
    fn abandon_old_paths(&mut self) {
        let (active, pending, mig) = (self.mig.local_addr(), self.mig.hop_in_progress(), &self.mig);
        self.paths.retain(|p| {
            let local = p.io.local_addr();
            local == active || Some(local) == pending || mig.holds_left(local)
        });
    }

    /// Sends what quiche has, each packet from its path's socket, in quiche's order.
    fn flush(&mut self) {
        // The path whose socket queued the last packet.
        let mut last: Option<usize> = None;
        loop {
            match self.mig.send(&mut self.tmp, Instant::now()) {
                Ok(Some((len, info))) => {
                    // A handful of paths: a scan, no map built per pass.
                    let Some(i) = self
                        .paths
                        .iter()
                        .position(|p| p.io.local_addr() == info.from)
                    else {
                        // A path whose socket is gone (a failed probe quiche still retries).
                        self.stats.tx_unroutable += 1;
                        continue;
                    };
                    // What one socket queued goes out before another socket's packet, so the
                    // peer sees quiche's numbering (see `recv_quic`): a probe built before the
                    // active path's burst would otherwise leave behind it, and a peer with a
                    // narrow duplicate window (upstream quiche: 128) drops it. Only a change of
                    // path costs a flush.
                    if let Some(j) = last.filter(|&j| j != i) {
                        self.paths[j].io.flush();
                    }
                    last = Some(i);
                    let io = &mut self.paths[i].io;
                    let out = io.send_buf();
                    out[..len].copy_from_slice(&self.tmp[..len]);
                    io.commit(len, info.to);
                    self.sent_since_poll += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    // Nothing goes out while this lasts: counted, and said once.
                    if self.stats.quic_send_errors == 0 {
                        tracing::warn!("quiche send: {e}");
                    }
                    self.stats.quic_send_errors += 1;
                    break;
                }
            }
        }
        for p in &mut self.paths {
            p.io.flush();
        }
    }
}

fn pollfd(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// The CIDR blocks covering `start..=end` (one family), leaving out `exclude`.
pub fn range_to_prefixes(start: IpAddr, end: IpAddr, exclude: Option<IpAddr>) -> Vec<(IpAddr, u8)> {
    let v4 = start.is_ipv4();
    if v4 != end.is_ipv4() {
        return Vec::new();
    }
    let bits: u32 = if v4 { 32 } else { 128 };
    let to_u = |a: IpAddr| match a {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    };
    let from_u = |u: u128| -> IpAddr {
        if v4 {
            IpAddr::V4((u as u32).into())
        } else {
            IpAddr::V6(u.into())
        }
    };
    let (s, e) = (to_u(start), to_u(end));
    if s > e {
        return Vec::new();
    }
    let mut spans = vec![(s, e)];
    if let Some(x) = exclude.filter(|x| x.is_ipv4() == v4).map(to_u) {
        if (s..=e).contains(&x) {
            spans.clear();
            if x > s {
                spans.push((s, x - 1));
            }
            if x < e {
                spans.push((x + 1, e));
            }
        }
    }
    let mut out = Vec::new();
    for (mut lo, hi) in spans {
        loop {
            // The largest aligned block starting at lo that stays within hi.
            let mut size_bits = if lo == 0 {
                bits
            } else {
                lo.trailing_zeros().min(bits)
            };
            while size_bits > 0 {
                let span = if size_bits >= 128 {
                    u128::MAX
                } else {
                    (1u128 << size_bits) - 1
                };
                if lo.checked_add(span).is_some_and(|last| last <= hi) {
                    break;
                }
                size_bits -= 1;
            }
            out.push((from_u(lo), (bits - size_bits) as u8));
            let span = if size_bits >= 128 {
                u128::MAX
            } else {
                (1u128 << size_bits) - 1
            };
            match lo.checked_add(span) {
                Some(last) if last < hi => lo = last + 1,
                _ => break,
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn whole_space_minus_one_address() {
        let v = range_to_prefixes(p("0.0.0.0"), p("255.255.255.255"), Some(p("198.18.0.1")));
        assert_eq!(v.len(), 32);
        // Nothing covers the excluded address; everything else is covered exactly once.
        let cover = |a: u32| {
            v.iter()
                .filter(|(n, l)| {
                    let n = match n {
                        IpAddr::V4(n) => u32::from(*n),
                        _ => unreachable!(),
                    };
                    let mask = if *l == 0 { 0 } else { u32::MAX << (32 - l) };
                    a & mask == n
                })
                .count()
        };
        let x = u32::from(std::net::Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(cover(x), 0);
        for a in [0, x - 1, x + 1, u32::MAX, 1 << 31] {
            assert_eq!(cover(a), 1, "{a:#x}");
        }
    }

    #[test]
    fn aligned_and_odd_ranges() {
        assert_eq!(
            range_to_prefixes(p("10.0.0.0"), p("10.0.0.255"), None),
            vec![(p("10.0.0.0"), 24)]
        );
        assert_eq!(
            range_to_prefixes(p("10.0.0.1"), p("10.0.0.2"), None),
            vec![(p("10.0.0.1"), 32), (p("10.0.0.2"), 32)]
        );
        assert_eq!(
            range_to_prefixes(p("::"), p("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), None),
            vec![(p("::"), 0)]
        );
        assert_eq!(
            range_to_prefixes(
                p("::"),
                p("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
                Some(p("fd00::1"))
            )
            .len(),
            128
        );
        assert!(range_to_prefixes(p("10.0.0.2"), p("10.0.0.1"), None).is_empty());
        assert!(range_to_prefixes(p("10.0.0.2"), p("::1"), None).is_empty());
    }
}
