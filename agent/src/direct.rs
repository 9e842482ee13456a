//! Direct mode (ARCHITECTURE.md §1; issue 7): makes any quiche client connection hop between
//! the host's local addresses, against an unmodified QUIC server.
//!
//! [`DirectConnection`] is the I/O shell around [`Migrator`]: it owns one UDP socket per local
//! address (each bound to that address), hands every datagram received on any of them to the
//! migrator with the right `RecvInfo` (`to` = the socket's address), sends each outgoing
//! datagram from the socket that `SendInfo::from` names, and asks a [`HopStrategy`] before every
//! datagram it sends whether to hop; on `Hop` it picks another local address (at random, from
//! the run's seed) and requests the hop. The hop starts at once (a probe from the new
//! address) and the connection switches when the probe is answered, about one round trip
//! later (see [`crate::migrate`]); strategy hops that come while one is in progress are
//! counted as not started. The application drives it with [`DirectConnection::poll`]
//! and uses the quiche connection for its streams (`connection_mut`), e.g. with quiche's h3.
//!
//! # Threads and sockets
//!
//! This crate is `#![forbid(unsafe_code)]`, and std has no safe way to wait on several sockets at
//! once (`poll(2)` needs `unsafe`). So each socket gets a reader thread that blocks in
//! `recv_from` (with a short read timeout so it notices shutdown) and passes datagrams over a
//! bounded channel to the connection's thread, which does everything else — quiche, sends,
//! hop decisions — and hands the buffers back for reuse (no allocation per datagram in steady
//! state). Sends go straight out of the connection's thread on the shared socket. The reader
//! threads stop and are joined when the `DirectConnection` is dropped.
//!
//! Addresses leave: [`DirectConnection::withdraw_address`] (or [`DirectControl::withdraw`] from
//! another thread) stops using one and moves the connection off it. Keep the address on the
//! host for a drain period after that (the allocator's t_remove): quiche 0.30 retransmits data
//! that was in flight on a path only when that path's packets are acknowledged or declared
//! lost, and it declares them lost only from that path's acknowledgements, so data in flight
//! towards an address that vanished at once can stall until the idle timeout. As a fallback,
//! an address that vanished from the host anyway is noticed (a failed send from it, or a check
//! while nothing arrives) and withdrawn the same way.
//!
//! Nothing here panics on input: malformed datagrams are counted ([`DirectStats`]), a hop to an
//! address without a socket is a [`DirectError`], a refused migration is counted by the
//! migrator and the connection carries on from its current address.

pub mod h3;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::migrate::{HopError, HopEvent, MigrationConfig, MigrationStats, Migrator};
use crate::rng::SplitMix64;
use crate::strategy::{Decision, HopStrategy, HopStrategyConfig, StrategyConfigError};

/// Largest UDP payload read from a socket.
pub const MAX_DATAGRAM_BYTES: usize = 65_535;

/// How long a reader thread blocks before checking for shutdown.
const READER_TICK: Duration = Duration::from_millis(50);

/// While nothing arrives, how often the shell checks that its addresses are still on the host.
const ADDRESS_CHECK: Duration = Duration::from_millis(100);

/// Mixed into the seed for the stream that picks the next address ("direct").
const ADDRESS_STREAM: u64 = 0x6469_7265_6374;

/// Datagrams queued from the reader threads to the connection's thread before readers wait.
const RX_QUEUE: usize = 1_024;

/// Direct-mode settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectConfig {
    /// When to hop (every N packets, random \[a, b\] packets, random time, once after N, never).
    pub strategy: HopStrategyConfig,
    /// Seeds the strategy and the choice of the next address; fixes a run hop for hop.
    pub seed: u64,
    /// The connection's number in the run (each gets its own random stream).
    pub connection: u64,
    /// Hop deadlines and latency sampling.
    pub migration: MigrationConfig,
}

/// Why the direct mode could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    /// No local addresses were given.
    #[error("direct mode needs at least one local address")]
    NoAddresses,
    /// The connection must leave `0` but has no other usable address.
    #[error("no usable address other than {0}")]
    NoOtherAddress(SocketAddr),
    /// The same local address was given twice.
    #[error("local address {0} given twice")]
    DuplicateAddress(SocketAddr),
    /// A socket could not be bound to a local address (not on this host?).
    #[error("cannot bind a UDP socket to {addr}: {error}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the kernel said.
        error: std::io::Error,
    },
    /// A socket option or the reader thread could not be set up.
    #[error("socket setup for {addr}: {error}")]
    Socket {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        error: std::io::Error,
    },
    /// The hop strategy config is invalid.
    #[error(transparent)]
    Strategy(#[from] StrategyConfigError),
    /// quiche refused to create the connection.
    #[error("quiche connect: {0}")]
    Connect(quiche::Error),
    /// A hop to a local address this connection has no socket for.
    #[error("no socket bound to {0}: add the address first")]
    UnknownAddress(SocketAddr),
    /// A hop to an address that was withdrawn.
    #[error("{0} was withdrawn")]
    Withdrawn(SocketAddr),
    /// The migrator refused the hop.
    #[error(transparent)]
    Hop(#[from] HopError),
    /// quiche failed the connection while sending (it is closed now).
    #[error("connection failed: {0}")]
    Connection(quiche::Error),
    /// All reader threads are gone.
    #[error("every socket reader stopped")]
    ReadersGone,
}

/// Counters of the I/O shell (the migrator keeps the hop counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectStats {
    /// Datagrams sent.
    pub tx_datagrams: u64,
    /// Datagrams received and handed to quiche.
    pub rx_datagrams: u64,
    /// Datagrams quiche refused (malformed, undecryptable, not for this connection).
    pub rx_rejected: u64,
    /// Datagrams quiche wanted to send from an address without a socket (dropped).
    pub tx_unroutable: u64,
    /// `send_to` failures (the datagram is lost; QUIC recovers).
    pub tx_errors: u64,
    /// Hops the strategy asked for.
    pub strategy_hops: u64,
    /// Strategy hops not started (one in progress, migration disabled, ...).
    pub strategy_hops_not_started: u64,
    /// Local addresses withdrawn (by the caller, or because sending from them failed).
    pub addresses_withdrawn: u64,
    /// Hops forced because the current address was withdrawn.
    pub forced_hops: u64,
}

/// A quiche client connection that hops between local addresses. See the module docs.
pub struct DirectConnection {
    migrator: Migrator,
    sockets: Vec<LocalSocket>,
    rx: Receiver<Received>,
    strategy: HopStrategy,
    rng: SplitMix64,
    stats: DirectStats,
    withdrawn: Vec<SocketAddr>,
    started: Instant,
    /// When datagrams last arrived.
    last_rx: Instant,
    /// When [`Self::check_addresses`] last looked.
    last_address_check: Instant,
    out: Vec<u8>,
    control_tx: Sender<ControlRequest>,
    control_rx: Receiver<ControlRequest>,
    /// Last field: dropped (stopped and joined) after everything else.
    _readers: Readers,
}

struct LocalSocket {
    addr: SocketAddr,
    socket: Arc<UdpSocket>,
    /// Hands buffers back to this socket's reader.
    recycle: Sender<Vec<u8>>,
}

struct Received {
    socket: usize,
    buf: Vec<u8>,
    len: usize,
    from: SocketAddr,
}

impl DirectConnection {
    /// Binds one socket to each of `locals` (specific ports, or port 0 for any), and starts a
    /// connection to `peer` from the first one with `quic` (the application's quiche config:
    /// ALPN, verification, and an `active_connection_id_limit` of at least
    /// [`crate::migrate::recommended_active_cid_limit`]`(locals.len())`). `server_name` is the
    /// TLS SNI.
    pub fn connect(
        locals: &[SocketAddr],
        peer: SocketAddr,
        server_name: Option<&str>,
        quic: &mut quiche::Config,
        config: &DirectConfig,
    ) -> Result<Self, DirectError> {
        if locals.is_empty() {
            return Err(DirectError::NoAddresses);
        }
        let strategy =
            HopStrategy::for_connection(&config.strategy, config.seed, config.connection)?;
        let mut readers = Readers {
            stop: Arc::new(AtomicBool::new(false)),
            handles: Vec::new(),
        };
        let (tx, rx) = mpsc::sync_channel(RX_QUEUE);
        let mut sockets: Vec<LocalSocket> = Vec::with_capacity(locals.len());
        for &addr in locals {
            if sockets.iter().any(|s| s.addr == addr) {
                return Err(DirectError::DuplicateAddress(addr));
            }
            let socket = bind_socket(sockets.len(), addr, &tx, &mut readers)?;
            sockets.push(socket);
        }
        drop(tx);
        // `locals` is not empty and each one was bound, so there is a first socket.
        let first = sockets[0].addr;
        let (control_tx, control_rx) = mpsc::channel();
        let rng = ring::rand::SystemRandom::new();
        let scid = h3::random_cid(&rng, quiche::MAX_CONN_ID_LEN)
            .ok_or(DirectError::Connect(quiche::Error::CryptoFail))?;
        let conn =
            quiche::connect(server_name, &scid, first, peer, quic).map_err(DirectError::Connect)?;
        Ok(Self {
            migrator: Migrator::new(conn, first, peer, config.migration),
            sockets,
            rx,
            strategy,
            rng: SplitMix64::new(crate::rng::derive_seed(
                config.seed ^ ADDRESS_STREAM,
                config.connection,
            )),
            stats: DirectStats::default(),
            withdrawn: Vec::new(),
            started: Instant::now(),
            last_rx: Instant::now(),
            last_address_check: Instant::now(),
            out: vec![0; MAX_DATAGRAM_BYTES],
            control_tx,
            control_rx,
            _readers: readers,
        })
    }

    /// The migration driver (hop counters, latencies, current address).
    pub fn migrator(&self) -> &Migrator {
        &self.migrator
    }

    /// The quiche connection, for the application's streams (and quiche's h3).
    pub fn connection(&self) -> &quiche::Connection {
        self.migrator.connection()
    }

    /// The quiche connection, for the application's streams (and quiche's h3). Leave `recv`,
    /// `send` and the path calls to the shell.
    pub fn connection_mut(&mut self) -> &mut quiche::Connection {
        self.migrator.connection_mut()
    }

    /// The bound local addresses (with the ports the kernel chose for port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets.iter().map(|s| s.addr).collect()
    }

    /// Shell counters.
    pub fn stats(&self) -> DirectStats {
        self.stats
    }

    /// Hop counters.
    pub fn migration_stats(&self) -> MigrationStats {
        self.migrator.stats()
    }

    /// Stops using local address `addr` (it expired, or is about to be removed from the
    /// host): it is never chosen again, a hop to it in progress is abandoned, and if the
    /// connection is on it, it hops to another address now. Its socket stays open so that
    /// datagrams still in flight to it are received. `false` if it was already withdrawn.
    pub fn withdraw_address(&mut self, addr: SocketAddr) -> Result<bool, DirectError> {
        if !self.sockets.iter().any(|s| s.addr == addr) {
            return Err(DirectError::UnknownAddress(addr));
        }
        if self.withdrawn.contains(&addr) {
            return Ok(false);
        }
        self.withdrawn.push(addr);
        self.stats.addresses_withdrawn += 1;
        if self.migrator.hop_in_progress() == Some(addr) {
            self.migrator.abandon_hop();
        }
        if self.migrator.local_addr() == addr {
            self.stats.forced_hops += 1;
            // A hop already under way moves the connection off it anyway.
            if self.migrator.hop_in_progress().is_none() {
                let to = self
                    .next_address()
                    .ok_or(DirectError::NoOtherAddress(addr))?;
                self.migrator.request_hop(to, Instant::now())?;
            }
        }
        Ok(true)
    }

    /// The local addresses withdrawn so far.
    pub fn withdrawn_addresses(&self) -> &[SocketAddr] {
        &self.withdrawn
    }

    /// A handle for other threads (the agent's address manager) to withdraw addresses or
    /// request hops; the requests are carried out by the next [`Self::poll`].
    pub fn control(&self) -> DirectControl {
        DirectControl {
            tx: self.control_tx.clone(),
        }
    }

    /// Moves the connection to `to` now, whatever the strategy says (it must be one of the
    /// bound addresses).
    pub fn hop_to(&mut self, to: SocketAddr) -> Result<(), DirectError> {
        if !self.sockets.iter().any(|s| s.addr == to) {
            return Err(DirectError::UnknownAddress(to));
        }
        if self.withdrawn.contains(&to) {
            return Err(DirectError::Withdrawn(to));
        }
        self.migrator.request_hop(to, Instant::now())?;
        Ok(())
    }

    /// One turn of the event loop: sends everything quiche has (asking the strategy before
    /// each datagram), waits up to `max_wait` (or the connection's timer, if sooner) for
    /// datagrams, feeds all that arrived, runs timers, and sends again.
    pub fn poll(&mut self, max_wait: Duration) -> Result<(), DirectError> {
        self.flush()?;
        let wait = self
            .migrator
            .timeout(Instant::now())
            .map_or(max_wait, |t| t.min(max_wait));
        match self.rx.recv_timeout(wait) {
            Ok(first) => {
                self.feed(first);
                while let Ok(more) = self.rx.try_recv() {
                    self.feed(more);
                }
                self.last_rx = Instant::now();
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Err(DirectError::ReadersGone),
        }
        while let Ok(request) = self.control_rx.try_recv() {
            // Errors here are the caller's (an unknown address, a refused hop) and are
            // counted by the migrator; the connection carries on.
            let _ = match request {
                ControlRequest::Withdraw(addr) => self.withdraw_address(addr).map(|_| ()),
                ControlRequest::HopTo(addr) => self.hop_to(addr),
            };
        }
        self.check_addresses(Instant::now());
        self.migrator.on_timeout(Instant::now());
        self.log_hop_events();
        self.flush()
    }

    /// Logs what became of each hop (`RUST_LOG=mimiq_agent=debug` for the completed ones), and
    /// keeps the migrator's event queue empty.
    fn log_hop_events(&mut self) {
        while let Some(event) = self.migrator.poll_event() {
            match event {
                HopEvent::Completed { from, to, latency } => {
                    tracing::debug!(%from, %to, ?latency, "hop completed");
                }
                HopEvent::Failed { to, reason } => tracing::info!(%to, ?reason, "hop failed"),
            }
        }
    }

    /// Closes the connection (application close, code 0) and sends the CONNECTION_CLOSE.
    pub fn close(&mut self) -> Result<(), DirectError> {
        match self.connection_mut().close(true, 0, b"") {
            Ok(()) | Err(quiche::Error::Done) => {}
            Err(e) => return Err(DirectError::Connection(e)),
        }
        self.flush()
    }

    /// While nothing arrives, checks now and then that the address in use (and the one a hop
    /// is moving to) are still on the host: a connection that only waits for data sends
    /// nothing, so a send error would never tell it that its address is gone.
    fn check_addresses(&mut self, now: Instant) {
        if now.duration_since(self.last_rx) < ADDRESS_CHECK
            || now.duration_since(self.last_address_check) < ADDRESS_CHECK
        {
            return;
        }
        self.last_address_check = now;
        let candidates = [
            Some(self.migrator.local_addr()),
            self.migrator.hop_in_progress(),
        ];
        for addr in candidates.into_iter().flatten() {
            if !self.withdrawn.contains(&addr) && address_gone(addr) {
                // A bound address, so this cannot fail for want of a socket; with no other
                // address left there is nothing to do but wait.
                let _ = self.withdraw_address(addr);
            }
        }
    }

    fn feed(&mut self, mut d: Received) {
        let Some(to) = self.sockets.get(d.socket).map(|s| s.addr) else {
            return;
        };
        let len = d.len.min(d.buf.len());
        match self.migrator.recv(&mut d.buf[..len], d.from, to) {
            Ok(_) => self.stats.rx_datagrams += 1,
            Err(_) => self.stats.rx_rejected += 1,
        }
        // The reader may be gone (shutting down); then the buffer is simply freed.
        let _ = self.sockets[d.socket].recycle.send(d.buf);
    }

    fn flush(&mut self) -> Result<(), DirectError> {
        loop {
            let now = Instant::now();
            // Elapsed ms since the connection started: the strategy's clock.
            let now_ms =
                u64::try_from(now.duration_since(self.started).as_millis()).unwrap_or(u64::MAX);
            let (len, info) = match self.migrator.send(&mut self.out, now) {
                Ok(Some(v)) => v,
                Ok(None) => return Ok(()),
                Err(e) => return Err(DirectError::Connection(e)),
            };
            if self.connection().is_established()
                && self.strategy.on_packet(now_ms) == Decision::Hop
            {
                self.stats.strategy_hops += 1;
                let started = match self.next_address() {
                    Some(to) => self.migrator.request_hop(to, now).is_ok(),
                    None => false,
                };
                if !started {
                    self.stats.strategy_hops_not_started += 1;
                }
            }
            match self.sockets.iter().find(|s| s.addr == info.from) {
                Some(s) => match s.socket.send_to(&self.out[..len], info.to) {
                    Ok(_) => self.stats.tx_datagrams += 1,
                    Err(_) => {
                        self.stats.tx_errors += 1;
                        // Linux says ENETUNREACH when the source address has left the host,
                        // which a downed link says too: ask the kernel whether the address
                        // is still there. If not, stop using it. Other errors (a full
                        // buffer, a link flap) lose one datagram, which QUIC recovers.
                        if !self.withdrawn.contains(&info.from) && address_gone(info.from) {
                            // `info.from` is a bound address, so this cannot fail.
                            let _ = self.withdraw_address(info.from);
                        }
                    }
                },
                None => self.stats.tx_unroutable += 1,
            }
        }
    }

    /// A bound address other than the current one, chosen at random among those within the
    /// connection's path budget (the first ones it visits; see `Migrator::path_budget`).
    fn next_address(&mut self) -> Option<SocketAddr> {
        let current = self.migrator.local_addr();
        let others: Vec<SocketAddr> = self
            .sockets
            .iter()
            .map(|s| s.addr)
            .filter(|&a| a != current && a.is_ipv4() == current.is_ipv4())
            .filter(|&a| self.migrator.can_use(a) && !self.withdrawn.contains(&a))
            .collect();
        if others.is_empty() {
            return None;
        }
        Some(others[self.rng.index(others.len())])
    }
}

/// Whether `addr`'s IP is no longer an address of this host (a fresh socket cannot bind it).
fn address_gone(addr: SocketAddr) -> bool {
    match UdpSocket::bind(SocketAddr::new(addr.ip(), 0)) {
        Ok(_) => false,
        Err(e) => {
            e.kind() == std::io::ErrorKind::AddrNotAvailable
                || e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
        }
    }
}

/// Requests to a [`DirectConnection`] from other threads ([`DirectConnection::control`]).
#[derive(Debug, Clone)]
pub struct DirectControl {
    tx: Sender<ControlRequest>,
}

#[derive(Debug, Clone, Copy)]
enum ControlRequest {
    Withdraw(SocketAddr),
    HopTo(SocketAddr),
}

impl DirectControl {
    /// Asks for [`DirectConnection::withdraw_address`]; `false` if the connection is gone.
    pub fn withdraw(&self, addr: SocketAddr) -> bool {
        self.tx.send(ControlRequest::Withdraw(addr)).is_ok()
    }

    /// Asks for [`DirectConnection::hop_to`]; `false` if the connection is gone.
    pub fn hop_to(&self, addr: SocketAddr) -> bool {
        self.tx.send(ControlRequest::HopTo(addr)).is_ok()
    }
}

/// The reader threads; stopped and joined when dropped (also when `connect` fails halfway).
struct Readers {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl Drop for Readers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for reader in self.handles.drain(..) {
            let _ = reader.join();
        }
    }
}

/// Binds a socket to `addr` and starts its reader thread (socket number `index`).
fn bind_socket(
    index: usize,
    addr: SocketAddr,
    tx: &SyncSender<Received>,
    readers: &mut Readers,
) -> Result<LocalSocket, DirectError> {
    let socket = UdpSocket::bind(addr).map_err(|error| DirectError::Bind { addr, error })?;
    let addr = socket
        .local_addr()
        .map_err(|error| DirectError::Socket { addr, error })?;
    socket
        .set_read_timeout(Some(READER_TICK))
        .map_err(|error| DirectError::Socket { addr, error })?;
    let socket = Arc::new(socket);
    let (recycle, pool) = mpsc::channel();
    let reader = {
        let socket = Arc::clone(&socket);
        let stop = Arc::clone(&readers.stop);
        let tx = tx.clone();
        std::thread::Builder::new()
            .name(format!("mimiq-rx-{index}"))
            .spawn(move || read_loop(index, &socket, &pool, &tx, &stop))
            .map_err(|error| DirectError::Socket { addr, error })?
    };
    readers.handles.push(reader);
    Ok(LocalSocket {
        addr,
        socket,
        recycle,
    })
}

/// A reader thread: blocks on one socket and passes datagrams on, until told to stop or the
/// connection's thread is gone.
fn read_loop(
    socket_index: usize,
    socket: &UdpSocket,
    pool: &Receiver<Vec<u8>>,
    tx: &SyncSender<Received>,
    stop: &AtomicBool,
) {
    let mut buf = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if buf.is_empty() {
            buf = pool
                .try_recv()
                .unwrap_or_else(|_| vec![0; MAX_DATAGRAM_BYTES]);
        }
        // Timeouts (WouldBlock/TimedOut) and transient errors (ICMP-induced ConnectionRefused
        // on Linux) just come back here: check `stop` and read again.
        if let Ok((len, from)) = socket.recv_from(&mut buf) {
            let d = Received {
                socket: socket_index,
                buf: std::mem::take(&mut buf),
                len,
                from,
            };
            if tx.send(d).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use super::h3::{
        client_config, run_gets, run_gets_until_hops, H3Server, H3ServerConfig, H3ServerStats,
        TestCert,
    };
    use super::*;

    /// An `H3Server` on 127.0.0.1 on its own thread; stopped and joined by `finish`.
    struct Server {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        thread: JoinHandle<H3ServerStats>,
    }

    impl Server {
        fn start(config: H3ServerConfig) -> Self {
            let stop = Arc::new(AtomicBool::new(false));
            let (tx, rx) = mpsc::channel();
            let thread = {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let cert = TestCert::new().unwrap();
                    let mut server =
                        H3Server::bind("127.0.0.1:0".parse().unwrap(), &cert, config).unwrap();
                    drop(cert);
                    tx.send(server.local_addr()).unwrap();
                    server.run(&stop).unwrap();
                    server.stats()
                })
            };
            let addr = rx.recv().unwrap();
            Self { addr, stop, thread }
        }

        fn finish(self) -> H3ServerStats {
            self.stop.store(true, Ordering::Relaxed);
            self.thread.join().unwrap()
        }
    }

    /// Three loopback addresses (all of 127/8 is local on Linux, no root needed).
    fn locals() -> Vec<SocketAddr> {
        ["127.0.0.2:0", "127.0.0.3:0", "127.0.0.4:0"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect()
    }

    fn direct(server: SocketAddr, strategy: HopStrategyConfig) -> DirectConnection {
        let mut quic = client_config(3).unwrap();
        let config = DirectConfig {
            strategy,
            seed: 7,
            connection: 0,
            migration: MigrationConfig::default(),
        };
        DirectConnection::connect(&locals(), server, Some("quic.tech"), &mut quic, &config).unwrap()
    }

    /// Body sizes from tiny to a few dozen packets, so hops land between requests and
    /// inside responses.
    fn sizes(n: usize) -> Vec<u64> {
        (0..n as u64).map(|i| 1 + (i * 7_919) % 40_000).collect()
    }

    #[test]
    fn gets_over_loopback_hop_hundreds_of_times_and_stay_byte_exact() {
        let server = Server::start(H3ServerConfig::default());
        let mut client = direct(
            server.addr,
            HopStrategyConfig::RandomPackets {
                min_packets: 3,
                max_packets: 10,
            },
        );
        let sizes = sizes(300);
        let deadline = Duration::from_secs(60);
        let report = run_gets_until_hops(&mut client, "quic.tech", &sizes, 100, deadline).unwrap();
        client.close().unwrap();
        let hops = client.migration_stats();
        let shell = client.stats();
        let summary = client.migrator().latency_summary();
        drop(client);
        let server_stats = server.finish();
        eprintln!("{report:?}\n{hops:?}\n{shell:?}\nhop latency: {summary}\n{server_stats:?}");
        assert!(report.responses >= 300, "{report:?}");
        let expected: u64 = sizes.iter().cycle().take(report.responses as usize).sum();
        assert_eq!(report.body_bytes, expected);
        assert!(hops.hops_completed >= 100, "{hops:?}");
        assert_eq!(hops.hops_failed, 0, "{hops:?}");
        assert_eq!(shell.tx_unroutable, 0);
        assert_eq!(
            server_stats.client_addresses, 3,
            "the server saw every address"
        );
        assert_eq!(server_stats.reused_cids, 0, "no CID from two addresses");
        // The server followed (how often it saw each hop is a rate of loss: see
        // perf/tests/direct_hop.rs).
        assert!(
            server_stats.peer_migrations > 0 && server_stats.peer_migrations <= hops.hops_completed,
            "{server_stats:?}"
        );
        assert_eq!(server_stats.responses_completed, report.responses);
    }

    #[test]
    fn a_server_without_migration_gets_no_hop_and_the_gets_complete() {
        let server = Server::start(H3ServerConfig {
            disable_active_migration: true,
            ..H3ServerConfig::default()
        });
        let mut client = direct(server.addr, HopStrategyConfig::EveryPackets { packets: 4 });
        let report = run_gets(
            &mut client,
            "quic.tech",
            &sizes(40),
            Duration::from_secs(30),
        )
        .unwrap();
        let hops = client.migration_stats();
        let shell = client.stats();
        drop(client);
        let server_stats = server.finish();
        assert_eq!(report.responses, 40);
        assert_eq!(hops.hops_completed, 0);
        assert!(hops.hops_refused > 10, "{hops:?}");
        assert_eq!(shell.strategy_hops_not_started, shell.strategy_hops);
        assert_eq!(server_stats.client_addresses, 1);
        assert_eq!(server_stats.peer_migrations, 0);
    }

    #[test]
    fn more_addresses_than_the_server_gives_cids_for_stay_within_its_limit() {
        let server = Server::start(H3ServerConfig {
            active_cid_limit: 4,
            ..H3ServerConfig::default()
        });
        let locals: Vec<SocketAddr> = (2..=8)
            .map(|i| SocketAddr::from(([127, 0, 0, i], 0)))
            .collect();
        let mut quic = client_config(locals.len()).unwrap();
        let config = DirectConfig {
            strategy: HopStrategyConfig::EveryPackets { packets: 3 },
            seed: 3,
            connection: 0,
            migration: MigrationConfig::default(),
        };
        let mut client =
            DirectConnection::connect(&locals, server.addr, None, &mut quic, &config).unwrap();
        // Enough hops to reach the budget (about 60 are due in 100 GETs; fewer complete on
        // busy cores, where a request arriving while the previous hop validates is not started).
        let report = run_gets_until_hops(
            &mut client,
            "quic.tech",
            &sizes(100),
            8,
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(client.migrator().path_budget(), 4);
        let hops = client.migration_stats();
        // A hop beyond the budget is refused with an error and counted.
        while client.migrator().hop_in_progress().is_some() {
            client.poll(Duration::from_millis(10)).unwrap();
        }
        let unused = client
            .local_addrs()
            .into_iter()
            .find(|a| !client.migrator().has_path(*a))
            .unwrap();
        let refused = client.hop_to(unused);
        assert!(
            matches!(
                refused,
                Err(DirectError::Hop(HopError::PathBudget { budget: 4, .. }))
            ),
            "{refused:?}"
        );
        drop(client);
        let server_stats = server.finish();
        assert!(report.responses >= 100, "{report:?}");
        assert!(hops.hops_completed >= 8, "{hops:?}");
        assert_eq!(hops.hops_failed, 0, "{hops:?}");
        assert_eq!(server_stats.client_addresses, 4, "{server_stats:?}");
    }

    #[test]
    fn garbage_datagrams_on_a_client_socket_are_counted_and_ignored() {
        let server = Server::start(H3ServerConfig::default());
        let mut client = direct(server.addr, HopStrategyConfig::EveryPackets { packets: 5 });
        let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
        for target in client.local_addrs() {
            for garbage in [
                &[0u8; 0][..],
                &[0xc0; 1][..],
                &[0x41; 60][..],
                &[0xff; 1400][..],
            ] {
                attacker.send_to(garbage, target).unwrap();
            }
        }
        let report = run_gets(
            &mut client,
            "quic.tech",
            &sizes(50),
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(report.responses, 50);
        assert!(client.stats().rx_rejected >= 1, "{:?}", client.stats());
        drop(client);
        server.finish();
    }

    #[test]
    fn withdrawing_the_current_address_forces_a_hop_and_it_is_never_used_again() {
        let server = Server::start(H3ServerConfig::default());
        let mut client = direct(server.addr, HopStrategyConfig::Never {});
        run_gets(&mut client, "quic.tech", &[1_000], Duration::from_secs(10)).unwrap();
        let first = client.migrator().local_addr();
        assert!(client.withdraw_address(first).unwrap());
        assert!(!client.withdraw_address(first).unwrap(), "once");
        for _ in 0..200 {
            if client.migrator().local_addr() != first {
                break;
            }
            client.poll(Duration::from_millis(5)).unwrap();
        }
        assert_ne!(
            client.migrator().local_addr(),
            first,
            "forced off the withdrawn address"
        );
        assert!(matches!(client.hop_to(first), Err(DirectError::Withdrawn(a)) if a == first));
        let stats = client.stats();
        assert_eq!((stats.addresses_withdrawn, stats.forced_hops), (1, 1));
        // Withdrawing the rest leaves nowhere to go: an error, and the connection stays.
        let second = client.migrator().local_addr();
        let third = client
            .local_addrs()
            .into_iter()
            .find(|a| *a != first && *a != second)
            .unwrap();
        client.withdraw_address(third).unwrap();
        assert!(matches!(
            client.withdraw_address(second),
            Err(DirectError::NoOtherAddress(a)) if a == second
        ));
        drop(client);
        server.finish();
    }

    #[test]
    fn bad_addresses_are_errors() {
        let server = Server::start(H3ServerConfig::default());
        let mut quic = client_config(3).unwrap();
        let config = DirectConfig {
            strategy: HopStrategyConfig::Never {},
            seed: 1,
            connection: 0,
            migration: MigrationConfig::default(),
        };
        let none = DirectConnection::connect(&[], server.addr, None, &mut quic, &config);
        assert!(matches!(none, Err(DirectError::NoAddresses)));
        let twice: Vec<SocketAddr> = vec!["127.0.0.2:41999".parse().unwrap(); 2];
        let dup = DirectConnection::connect(&twice, server.addr, None, &mut quic, &config);
        assert!(matches!(dup, Err(DirectError::DuplicateAddress(_))));
        // 198.18.255.254 is not on this host: binding fails with an error.
        let foreign = ["198.18.255.254:0".parse().unwrap()];
        let bind = DirectConnection::connect(&foreign, server.addr, None, &mut quic, &config);
        assert!(matches!(bind, Err(DirectError::Bind { .. })));
        let mut client = direct(server.addr, HopStrategyConfig::Never {});
        let stranger: SocketAddr = "127.0.0.9:5555".parse().unwrap();
        assert!(
            matches!(client.hop_to(stranger), Err(DirectError::UnknownAddress(a)) if a == stranger)
        );
        let report =
            run_gets(&mut client, "quic.tech", &[10, 20], Duration::from_secs(10)).unwrap();
        assert_eq!(report.responses, 2);
        let other = client.local_addrs()[1];
        client.hop_to(other).unwrap();
        for _ in 0..100 {
            if client.migrator().local_addr() == other {
                break;
            }
            client.poll(Duration::from_millis(10)).unwrap();
        }
        assert_eq!(client.migrator().local_addr(), other, "a manual hop");
        drop(client);
        server.finish();
    }
}
