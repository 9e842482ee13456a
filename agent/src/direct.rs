//! Direct mode (ARCHITECTURE.md §1): makes any quiche client connection hop between
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

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::migrate::{HopError, HopEvent, MigrationConfig, MigrationStats, Migrator};
use crate::rng::{HopRng, Seed, ADDRESS_STREAM};
use crate::strategy::{Decision, HopStrategy, HopStrategyConfig, StrategyConfigError};

/// Largest UDP payload read from a socket.
pub const MAX_DATAGRAM_BYTES: usize = 65_535;

/// How long a reader thread blocks before checking for shutdown.
const READER_TICK: Duration = Duration::from_millis(50);

/// While nothing arrives, how often the shell checks that its addresses are still on the host.
const ADDRESS_CHECK: Duration = Duration::from_millis(100);

/// Datagrams queued from the reader threads to the connection's thread before readers wait.
const RX_QUEUE: usize = 1_024;

/// Direct-mode settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectConfig {
    /// When to hop (every N packets, random \[a, b\] packets, random time, once after N, never).
    pub strategy: HopStrategyConfig,
    /// Keys the strategy and the choice of the next address ([`Seed::experiment`] fixes a run
    /// hop for hop).
    pub seed: Seed,
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
    rng: HopRng,
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
        let mut scid = [0u8; quiche::MAX_CONN_ID_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut scid)
            .map_err(|_| DirectError::Connect(quiche::Error::CryptoFail))?;
        let scid = quiche::ConnectionId::from_ref(&scid);
        let conn =
            quiche::connect(server_name, &scid, first, peer, quic).map_err(DirectError::Connect)?;
        Ok(Self {
            migrator: Migrator::new(conn, first, peer, config.migration),
            sockets,
            rx,
            strategy,
            rng: HopRng::new(config.seed.derive(ADDRESS_STREAM).derive(config.connection)),
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
