//! The QUIC migration driver (seed 000 §3.1): moves one live client `quiche::Connection` from
//! local address to local address without interrupting its streams. Both of the client's modes
//! run it: the MASQUE client ([`crate::client`], tunnel mode: a fresh port every hop, against a
//! proxy that forgets the paths left) and the agent's direct mode (a socket per address,
//! against any HTTP/3 server).
//!
//! [`Migrator`] wraps the connection. The caller owns the sockets: it hands every received
//! datagram to [`Migrator::recv`] with the addresses it travelled between, sends what
//! [`Migrator::send`] returns from the socket named by `SendInfo::from`, in the order returned
//! (all paths share one packet number space, and a quiche peer takes a packet more than 4096
//! numbers older than the newest it has for a duplicate, 128 in upstream quiche: a probe batched
//! behind the active socket's burst was lost that way), calls
//! [`Migrator::on_timeout`] when [`Migrator::timeout`] expires, and asks for hops with
//! [`Migrator::request_hop`]. Time is passed in (`now`) for everything the driver measures
//! itself (hop latency, hop deadlines); quiche keeps reading its own clock for recovery, so the
//! in-memory tests run on the real clock, just fast.
//!
//! # How a hop happens: probe first, then migrate (make-before-break)
//!
//! quiche offers two ways to move: [`quiche::Connection::migrate`] / `migrate_source` switch
//! the active path at once, before the new path is validated (the server then validates it,
//! and until it has, RFC 9000 §8 limits what it may send there to three times what it received);
//! [`quiche::Connection::probe_path`] only sends a padded PATH_CHALLENGE from the new address
//! while all traffic stays on the current path. The driver probes first and calls `migrate`
//! once the new path has answered, so a hop never stalls a transfer on an unreachable or
//! amplification-limited path: if the probe fails or times out the connection simply stays
//! where it was and the hop is counted as failed. A probe whose answer is late (three round
//! trips) is sent again ([`crate::quic::probe_retry_after`] says why quiche alone would
//! not). The cost is one round trip between the
//! request and the switch, which is what [`MigrationStats`] reports as hop latency. Right after
//! the switch the driver queues an ack-eliciting packet (a PING if nothing else is due), so the
//! server sees a non-probing packet from the new address and follows at once (RFC 9000 §9.2),
//! even when the client is only waiting for data.
//!
//! # Connection IDs
//!
//! - Both sides keep spare IDs: the driver issues new source CIDs (random, from ring's
//!   `SystemRandom`, with a random stateless-reset token) while `scids_left() > 0`; the server
//!   must do the same (a quiche server does it in its application loop, as quiche-server does).
//! - Each local address gets its own quiche path, and each path its own destination CID. When
//!   the connection leaves an address, the path is forgotten ([`crate::quic::LeftPaths`],
//!   the vendored quiche's `abandon_path`) once everything sent there has been acknowledged, or
//!   after four round trips (at least [`MigrationConfig::forget_after_min_ms`], 100 ms) with what
//!   is still unacknowledged retransmitted on the new path. Forgetting retires the destination CID
//!   used there, so a CID seen on the wire from one address never appears from another, and frees
//!   quiche's path slot, so the connection can hop to any number of fresh addresses. The wait is
//!   there because datagrams sent just before the hop can arrive after the RETIRE_CONNECTION_ID
//!   (the kernel reorders datagrams of different sockets): the peer drops what comes with a
//!   retired CID (upstream quiche closed the connection for it; the vendored one drops and
//!   counts it), so the wait keeps those datagrams from being lost. A hop back within the wait
//!   uses the path (and its CID) again, from the same address (allowed: RFC 9000 §9.5 forbids one
//!   CID from two addresses, not twice from one), and takes it off the list to forget
//!   ([`LeftPaths::reuse`]): forgotten under the probe, it dropped the PATH_RESPONSE and the hop
//!   waited for its next probe.
//! - The server side: `mimiq-proxy` forgets the paths a client left too (the same `LeftPaths`),
//!   so it never sends one client CID to two client addresses and keeps accepting new ones. A
//!   stock quiche server keeps a path, and one of the client's CIDs, per client address for the
//!   life of the connection: against it a connection hops among at most the server's
//!   `active_connection_id_limit` addresses ([`Migrator::path_budget`]; a hop to one more is
//!   refused with [`HopError::PathBudget`]) unless [`MigrationConfig::server_forgets_paths`] says
//!   the server is one that forgets.
//!
//! Threading: one `Migrator` belongs to one thread (the connection's event loop). Nothing here
//! panics on input: malformed datagrams are quiche errors returned to the caller, refused or
//! impossible hops are [`HopError`]s and counters.

use std::collections::VecDeque;
use std::net::SocketAddr;

use crate::quic::{self, LeftPaths};
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};

/// Migration settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationConfig {
    /// How long a hop may take from request to switch before it is abandoned (the connection
    /// stays on its current address), in milliseconds. Default 1000: a probe whose answer is
    /// late is sent again within that time ([`MigrationConfig::probe_retry_min_ms`]).
    pub hop_timeout_ms: u64,
    /// The most hop latencies kept for [`Migrator::latency_summary`]; later hops are counted
    /// but not sampled. Default 1,000,000 (4 MB).
    pub max_latency_samples: usize,
    /// The least time between leaving an address and forgetting its path (retiring the CID
    /// used there) while packets sent there are unacknowledged, in milliseconds; the wait is the
    /// larger of this and four smoothed RTTs. Default 100.
    pub forget_after_min_ms: u64,
    /// The server forgets the paths a client left (`mimiq-proxy` does): the connection may then
    /// use any number of addresses. `false` (the default) for a stock quiche server, which keeps
    /// a path per client address: the connection then uses at most the server's
    /// `active_connection_id_limit` addresses ([`Migrator::path_budget`]).
    pub server_forgets_paths: bool,
    /// The least time a hop's probe waits for its answer before a new PATH_CHALLENGE is sent
    /// (the wait is the larger of this and three round trips of the current path), in
    /// milliseconds. Default 20.
    pub probe_retry_min_ms: u64,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            hop_timeout_ms: 1_000,
            max_latency_samples: 1_000_000,
            forget_after_min_ms: 100,
            server_forgets_paths: false,
            probe_retry_min_ms: 20,
        }
    }
}

/// The `active_connection_id_limit` both ends should configure for a connection that hops among
/// `addresses` local addresses: one path (and CID) per address, one spare for the next new
/// address, one for the replacement in flight. At least 4, as ARCHITECTURE.md §6 asks of the server.
pub fn recommended_active_cid_limit(addresses: usize) -> u64 {
    (addresses as u64).saturating_add(2).max(4)
}

/// Why a hop was not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HopError {
    /// The handshake has not completed: there are no spare IDs and no peer parameters yet.
    #[error("the connection is not established yet")]
    NotEstablished,
    /// The connection is closed or draining.
    #[error("the connection is closed")]
    Closed,
    /// The server sent `disable_active_migration`; the connection stays where it is.
    #[error("the server disabled active migration (disable_active_migration)")]
    MigrationDisabled,
    /// The connection already uses this address.
    #[error("the connection already uses {0}")]
    AlreadyThere(SocketAddr),
    /// A hop is still validating; one hop at a time.
    #[error("a hop to {0} is still in progress")]
    HopInProgress(SocketAddr),
    /// The connection already has a path on as many addresses as the server gives it
    /// connection IDs for ([`Migrator::path_budget`]); hop to one of those instead.
    #[error("no path budget left for {to}: the server's active_connection_id_limit is {budget}")]
    PathBudget {
        /// The requested local address.
        to: SocketAddr,
        /// Addresses the connection can use.
        budget: usize,
    },
    /// The new local address and the server's address are of different families.
    #[error("{to} cannot reach the server at {peer} (address family)")]
    FamilyMismatch {
        /// The requested local address.
        to: SocketAddr,
        /// The server's address.
        peer: SocketAddr,
    },
}

/// What happened to a hop, in order ([`Migrator::poll_event`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HopEvent {
    /// The connection now sends from `to`.
    Completed {
        /// The address left.
        from: SocketAddr,
        /// The new address.
        to: SocketAddr,
        /// From the request to the switch.
        latency: Duration,
    },
    /// The hop was abandoned; the connection stays on its current address.
    Failed {
        /// The address that could not be reached.
        to: SocketAddr,
        /// Why.
        reason: HopFailure,
    },
}

/// Why a started hop did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HopFailure {
    /// quiche reported that path validation failed (the probes were lost).
    ValidationFailed,
    /// No answer within [`MigrationConfig::hop_timeout_ms`] (or no spare CID came in time).
    TimedOut,
    /// quiche refused to probe or to migrate (its error).
    Refused(quiche::Error),
    /// The caller could not send from the new address ([`Migrator::abandon_hop`]).
    SendFailed,
}

/// Counters for one connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrationStats {
    /// Hops asked for with [`Migrator::request_hop`], accepted or not.
    pub hops_requested: u64,
    /// Hops that switched the connection to the new address.
    pub hops_completed: u64,
    /// Hops started and abandoned: the sum of the four `failed_*` counters.
    pub hops_failed: u64,
    /// ... because quiche reported the path validation failed.
    pub failed_validation: u64,
    /// ... because the hop deadline passed.
    pub failed_timeout: u64,
    /// ... because quiche refused to probe or migrate.
    pub failed_refused: u64,
    /// ... because the caller could not send from the new address.
    pub failed_send: u64,
    /// Hops refused because the server sent `disable_active_migration`.
    pub hops_refused: u64,
    /// Requests that arrived while another hop was in progress (not started).
    pub hops_busy: u64,
    /// Requests for a new address beyond [`Migrator::path_budget`] (not started).
    pub hops_over_budget: u64,
    /// Times a hop had to wait for a spare connection ID before it could probe.
    pub cid_waits: u64,
    /// PATH_CHALLENGEs asked for again because the answer to the last one had not come within
    /// three round trips.
    pub probes_resent: u64,
    /// Source CIDs issued to the server after the handshake.
    pub scids_issued: u64,
    /// Paths left and forgotten (their destination CIDs retired).
    pub paths_forgotten: u64,
    /// Paths left that the connection came back to, or probed again, before they were forgotten.
    pub paths_returned: u64,
}

/// Hop latency distribution (request → switch), in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencySummary {
    /// Hops sampled.
    pub count: usize,
    /// Fastest.
    pub min_us: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Slowest.
    pub max_us: u64,
    /// Mean.
    pub mean_us: u64,
}

impl LatencySummary {
    /// The summary of `samples_us` (any order); all zero when empty.
    pub fn from_samples(samples_us: &[u32]) -> Self {
        if samples_us.is_empty() {
            return Self::default();
        }
        let mut sorted = samples_us.to_vec();
        sorted.sort_unstable();
        let n = sorted.len();
        // Nearest-rank percentile; `n >= 1`, so the index is in 0..n.
        let rank = |p: usize| u64::from(sorted[((n * p).div_ceil(100)).clamp(1, n) - 1]);
        let sum: u64 = sorted.iter().map(|&v| u64::from(v)).sum();
        Self {
            count: n,
            min_us: u64::from(sorted[0]),
            p50_us: rank(50),
            p90_us: rank(90),
            p99_us: rank(99),
            max_us: u64::from(sorted[n - 1]),
            mean_us: sum / n as u64,
        }
    }
}

impl std::fmt::Display for LatencySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={} min={}us p50={}us p90={}us p99={}us max={}us mean={}us",
            self.count,
            self.min_us,
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.max_us,
            self.mean_us
        )
    }
}

/// A client connection that hops between local addresses. See the module docs.
pub struct Migrator {
    conn: quiche::Connection,
    config: MigrationConfig,
    local: SocketAddr,
    peer: SocketAddr,
    pending: Option<PendingHop>,
    /// Paths left, to forget.
    left: LeftPaths,
    /// Local addresses the connection has used (what a stock server keeps a path for).
    paths: Vec<SocketAddr>,
    rng: SystemRandom,
    scid_len: usize,
    stats: MigrationStats,
    latencies_us: Vec<u32>,
    events: VecDeque<HopEvent>,
    /// Datagrams arrived since the last [`Self::drive`].
    received: bool,
}

#[derive(Debug, Clone, Copy)]
struct PendingHop {
    to: SocketAddr,
    requested: Instant,
    state: PendingState,
    /// Already counted in `cid_waits`.
    waited: bool,
}

#[derive(Debug, Clone, Copy)]
enum PendingState {
    /// No spare CID on one side yet; probe as soon as there is one.
    AwaitingIds,
    /// PATH_CHALLENGE requested at `probed`; `recv_before` packets had arrived on that path
    /// by then.
    Probing { recv_before: usize, probed: Instant },
}

impl Migrator {
    /// Drives `conn`, a client connection created with `quiche::connect` from `local` to
    /// `peer` (the addresses its first path uses).
    pub fn new(
        conn: quiche::Connection,
        local: SocketAddr,
        peer: SocketAddr,
        config: MigrationConfig,
    ) -> Self {
        let scid_len = conn.source_id().len();
        Self {
            conn,
            config,
            local,
            peer,
            pending: None,
            left: LeftPaths::new(Duration::from_millis(config.forget_after_min_ms)),
            paths: vec![local],
            rng: SystemRandom::new(),
            scid_len,
            stats: MigrationStats::default(),
            latencies_us: Vec::new(),
            events: VecDeque::new(),
            received: false,
        }
    }

    /// The connection, for the application's streams and datagrams.
    pub fn connection(&self) -> &quiche::Connection {
        &self.conn
    }

    /// The connection, for the application's streams and datagrams. Do not call `recv`,
    /// `send`, `migrate` or `probe_path` on it directly: the driver would lose track.
    pub fn connection_mut(&mut self) -> &mut quiche::Connection {
        &mut self.conn
    }

    /// Gives the connection back (when it is closed, say).
    pub fn into_connection(self) -> quiche::Connection {
        self.conn
    }

    /// The local address the connection currently sends from.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The server's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The address a hop in progress is moving to.
    pub fn hop_in_progress(&self) -> Option<SocketAddr> {
        self.pending.map(|p| p.to)
    }

    /// Whether the server forbids active migration (`disable_active_migration`); `false`
    /// until its transport parameters are known.
    pub fn migration_disabled(&self) -> bool {
        self.conn
            .peer_transport_params()
            .is_some_and(|tp| tp.disable_active_migration)
    }

    /// Counters so far.
    pub fn stats(&self) -> MigrationStats {
        self.stats
    }

    /// Whether the connection has used local address `addr` (it has been there, or a probe
    /// from it is under way).
    pub fn has_path(&self, addr: SocketAddr) -> bool {
        self.paths.contains(&addr)
    }

    /// How many local addresses the connection can use: any number when the server forgets the
    /// paths a client left ([`MigrationConfig::server_forgets_paths`]); otherwise the server's
    /// `active_connection_id_limit`, as a stock quiche server keeps a path (and one of the
    /// client's CIDs) per address for the life of the connection (the client's own limit must
    /// be at least as large: [`recommended_active_cid_limit`]). 1 until the handshake has
    /// completed.
    pub fn path_budget(&self) -> usize {
        if self.config.server_forgets_paths && self.conn.is_established() {
            return usize::MAX;
        }
        self.conn
            .peer_transport_params()
            .map_or(1, |tp| {
                usize::try_from(tp.active_conn_id_limit).unwrap_or(usize::MAX)
            })
            .max(1)
    }

    /// Whether a hop to `addr` would stay within [`Self::path_budget`].
    pub fn can_use(&self, addr: SocketAddr) -> bool {
        self.has_path(addr) || self.paths.len() < self.path_budget()
    }

    /// Paths left and not forgotten yet.
    pub fn pending_forgets(&self) -> usize {
        self.left.pending()
    }

    /// Whether `local` is a path left and not forgotten yet: its socket must stay open for the
    /// acknowledgements still due there.
    pub fn holds_left(&self, local: SocketAddr) -> bool {
        self.left.holds(local)
    }

    /// Keeps the paths left as `left` says instead of [`LeftPaths::new`] with
    /// [`MigrationConfig::forget_after_min_ms`] ([`LeftPaths::at_once`], say).
    pub fn with_left_paths(mut self, left: LeftPaths) -> Self {
        self.left = left;
        self
    }

    /// Hop latencies sampled so far (request → switch), in microseconds, in hop order.
    pub fn latencies_us(&self) -> &[u32] {
        &self.latencies_us
    }

    /// The hop latency distribution so far.
    pub fn latency_summary(&self) -> LatencySummary {
        LatencySummary::from_samples(&self.latencies_us)
    }

    /// The next hop event, if any.
    pub fn poll_event(&mut self) -> Option<HopEvent> {
        self.events.pop_front()
    }

    /// Gives up the hop in progress (the caller could not send its probe: the address is gone
    /// from the host). Counted as failed with [`HopFailure::SendFailed`]; `false` if no hop
    /// was in progress.
    pub fn abandon_hop(&mut self) -> bool {
        let pending = self.pending.is_some();
        self.fail_hop(HopFailure::SendFailed);
        pending
    }

    /// Asks the connection to move to the local address `to` (the caller must be able to send
    /// from it and receive on it). The hop completes later, inside `recv`/`send`/`on_timeout`,
    /// and is reported by [`Self::poll_event`]; until then traffic stays on the current address.
    pub fn request_hop(&mut self, to: SocketAddr, now: Instant) -> Result<(), HopError> {
        self.stats.hops_requested += 1;
        if self.conn.is_closed() || self.conn.is_draining() {
            return Err(HopError::Closed);
        }
        if !self.conn.is_established() {
            return Err(HopError::NotEstablished);
        }
        //= https://www.rfc-editor.org/rfc/rfc9000#section-9
        //# If the peer sent the disable_active_migration transport parameter, an endpoint
        //# also MUST NOT send packets (including probing packets; see Section 9.1) from a
        //# different local address to the address the peer used during the handshake, unless
        //# the endpoint has acted on a preferred_address transport parameter from the peer.
        if self.migration_disabled() {
            self.stats.hops_refused += 1;
            return Err(HopError::MigrationDisabled);
        }
        if let Some(p) = self.pending {
            self.stats.hops_busy += 1;
            return Err(HopError::HopInProgress(p.to));
        }
        if to == self.local {
            return Err(HopError::AlreadyThere(to));
        }
        if to.is_ipv4() != self.peer.is_ipv4() {
            return Err(HopError::FamilyMismatch {
                to,
                peer: self.peer,
            });
        }
        if !self.can_use(to) {
            self.stats.hops_over_budget += 1;
            return Err(HopError::PathBudget {
                to,
                budget: self.path_budget(),
            });
        }
        self.pending = Some(PendingHop {
            to,
            requested: now,
            state: PendingState::AwaitingIds,
            waited: false,
        });
        self.drive(now);
        Ok(())
    }

    /// Feeds one received datagram (`buf` is decrypted in place). Errors are quiche's: a
    /// malformed or undecryptable datagram is dropped by quiche and reported here; the caller
    /// counts it and carries on. What it changed (a validated path, retired IDs, acknowledged
    /// paths left) is acted on at the next [`Self::send`] or [`Self::on_timeout`], once per
    /// burst rather than once per datagram.
    pub fn recv(
        &mut self,
        buf: &mut [u8],
        from: SocketAddr,
        to: SocketAddr,
    ) -> Result<usize, quiche::Error> {
        self.received = true;
        self.conn.recv(buf, quiche::RecvInfo { from, to })
    }

    /// The next datagram to send, and where from/to; `None` when there is nothing to send now.
    /// Probes for a hop in progress come out of here too, with `SendInfo::from` = the new
    /// address. An error means the connection failed (it is then closed).
    pub fn send(
        &mut self,
        out: &mut [u8],
        now: Instant,
    ) -> Result<Option<(usize, quiche::SendInfo)>, quiche::Error> {
        if self.received || self.pending.is_some() {
            self.drive(now);
        }
        match self.conn.send(out) {
            Ok(v) => Ok(Some(v)),
            Err(quiche::Error::Done) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// When to call [`Self::on_timeout`]: the connection's timer, a hop's deadline or its next
    /// probe, or a path left to forget.
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        let hop = self.pending.map(|p| {
            let deadline = p.requested + Duration::from_millis(self.config.hop_timeout_ms);
            let next = match p.state {
                PendingState::Probing { probed, .. } => deadline.min(probed + self.probe_retry()),
                PendingState::AwaitingIds => deadline,
            };
            next.saturating_duration_since(now)
        });
        [self.conn.timeout(), hop, self.left.timeout(now)]
            .into_iter()
            .flatten()
            .min()
    }

    /// Runs the connection's timers (quiche ignores the call when none is due) and the hop
    /// deadline.
    pub fn on_timeout(&mut self, now: Instant) {
        self.conn.on_timeout();
        self.drive(now);
    }

    /// Housekeeping after anything happened: keeps spare source CIDs issued, collects path
    /// events, and moves a pending hop forward (probe when IDs allow, switch when the new path
    /// answered, give up at the deadline).
    fn drive(&mut self, now: Instant) {
        self.received = false;
        if !self.conn.is_established() || self.conn.is_closed() {
            return;
        }
        self.issue_scids();
        while self.conn.retired_scid_next().is_some() {}
        while let Some(event) = self.conn.path_event_next() {
            if self.config.server_forgets_paths {
                self.left.on_event(&event, now);
            }
            if let quiche::PathEvent::FailedValidation(local, peer) = event {
                if self
                    .pending
                    .is_some_and(|p| p.to == local && peer == self.peer)
                {
                    self.fail_hop(HopFailure::ValidationFailed);
                }
            }
        }
        if self.config.server_forgets_paths {
            self.stats.paths_forgotten += self.left.forget(&mut self.conn, now) as u64;
            self.stats.paths_returned = self.left.returned();
        }
        let Some(mut pending) = self.pending else {
            return;
        };
        if now.saturating_duration_since(pending.requested)
            >= Duration::from_millis(self.config.hop_timeout_ms)
        {
            self.fail_hop(HopFailure::TimedOut);
            return;
        }
        if let PendingState::AwaitingIds = pending.state {
            self.left.reuse(pending.to, self.peer);
            match self.conn.probe_path(pending.to, self.peer) {
                Ok(_dcid_seq) => {
                    // Only a stock server's path budget needs the list (a server that forgets
                    // has none, and the list would grow by one address per hop).
                    if !self.config.server_forgets_paths && !self.paths.contains(&pending.to) {
                        self.paths.push(pending.to);
                    }
                    pending.state = PendingState::Probing {
                        recv_before: self.path_recv(pending.to),
                        probed: now,
                    };
                    self.pending = Some(pending);
                }
                // No spare CID for a new path (OutOfIdentifiers), or a path we left has none
                // yet: its CID was retired when we left and the server's replacement has not
                // arrived (InvalidState). Either way the ID comes with the server's next
                // NEW_CONNECTION_ID; retried on every call until the deadline, counted once.
                Err(e)
                    if e == quiche::Error::OutOfIdentifiers
                        || (e == quiche::Error::InvalidState
                            && self.paths.contains(&pending.to)) =>
                {
                    if !pending.waited {
                        pending.waited = true;
                        self.stats.cid_waits += 1;
                        self.pending = Some(pending);
                    }
                    return;
                }
                Err(e) => {
                    self.fail_hop(HopFailure::Refused(e));
                    return;
                }
            }
        }
        if let PendingState::Probing {
            recv_before,
            probed,
        } = pending.state
        {
            // For a new path quiche reports it validated when the PATH_RESPONSE arrives; a
            // path used before stays validated, so also require that something came back on
            // it since the probe (the PATH_RESPONSE, or the server's own challenge).
            let validated = self.conn.is_path_validated(pending.to, self.peer) == Ok(true);
            if validated && self.path_recv(pending.to) > recv_before {
                self.complete_hop(pending, now);
            } else if now.saturating_duration_since(probed) >= self.probe_retry() {
                self.probe_again(pending, recv_before, now);
            }
        }
    }

    fn probe_retry(&self) -> Duration {
        quic::probe_retry_after(
            &self.conn,
            Duration::from_millis(self.config.probe_retry_min_ms),
        )
    }

    /// Asks for a new PATH_CHALLENGE on the path being probed: its answer is late
    /// ([`quic::probe_retry_after`]).
    fn probe_again(&mut self, mut pending: PendingHop, recv_before: usize, now: Instant) {
        match self.conn.probe_path(pending.to, self.peer) {
            Ok(_dcid_seq) => {
                self.stats.probes_resent += 1;
                pending.state = PendingState::Probing {
                    recv_before,
                    probed: now,
                };
                self.pending = Some(pending);
            }
            Err(e) => self.fail_hop(HopFailure::Refused(e)),
        }
    }

    fn complete_hop(&mut self, pending: PendingHop, now: Instant) {
        let from = self.local;
        match self.conn.migrate(pending.to, self.peer) {
            Ok(_dcid_seq) => {
                self.pending = None;
                self.local = pending.to;
                // Held from now, not from the next `drive`: the caller closes the sockets of
                // paths not held, and the server keeps sending here for a round trip yet.
                if self.config.server_forgets_paths {
                    self.left.leave(from, self.peer, now);
                }
                //= https://www.rfc-editor.org/rfc/rfc9000#section-9.2
                //# An endpoint can migrate a connection to a new local address by sending
                //# packets containing non-probing frames from that address.
                // Make sure one goes out now (a PING if there is nothing else): a client that
                // only waits for the server's data would otherwise send nothing, and the server
                // would keep sending to the address it left (maybe gone from the host).
                let _ = self.conn.send_ack_eliciting();
                //= https://www.rfc-editor.org/rfc/rfc9000#section-9.5
                //# An endpoint MUST NOT reuse a connection ID when sending from more than one
                //# local address -- for example, when initiating connection migration as
                //# described in Section 9.2 or when probing a new network path as described
                //# in Section 9.1.
                // Only the path of `from` uses the CID it used (quiche keeps one per path), and
                // that path is forgotten (its CID retired) once what was sent there is
                // acknowledged, or after a wait (LeftPaths, noted in `drive`): the CID is never
                // sent from another address.
                let latency = now.saturating_duration_since(pending.requested);
                self.stats.hops_completed += 1;
                if self.latencies_us.len() < self.config.max_latency_samples {
                    let us = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
                    self.latencies_us.push(us);
                }
                self.events.push_back(HopEvent::Completed {
                    from,
                    to: pending.to,
                    latency,
                });
            }
            Err(e) => self.fail_hop(HopFailure::Refused(e)),
        }
    }

    fn fail_hop(&mut self, reason: HopFailure) {
        if let Some(p) = self.pending.take() {
            self.stats.hops_failed += 1;
            match reason {
                HopFailure::ValidationFailed => self.stats.failed_validation += 1,
                HopFailure::TimedOut => self.stats.failed_timeout += 1,
                HopFailure::Refused(_) => self.stats.failed_refused += 1,
                HopFailure::SendFailed => self.stats.failed_send += 1,
            }
            if self.config.server_forgets_paths {
                // A server that forgets paths gets a fresh address every hop: forget the one
                // that failed now (quiche would go on probing it, carrying frames of the active
                // path from a socket the caller may close).
                let _ = self.conn.abandon_path(p.to, self.peer, true);
            }
            // A probe timeout on the probed path makes quiche send a PING there, which is not
            // a probing frame (RFC 9000 §9.1): the server may have taken it for a migration
            // (§9.3). A non-probing packet from the address in use brings it back at once.
            let _ = self.conn.send_ack_eliciting();
            self.events.push_back(HopEvent::Failed { to: p.to, reason });
        }
    }

    /// Packets received so far on the path from `local` to the server.
    fn path_recv(&self, local: SocketAddr) -> usize {
        self.conn
            .path_stats()
            .find(|p| p.local_addr == local && p.peer_addr == self.peer)
            .map_or(0, |p| p.recv)
    }

    /// Issues source CIDs while the server accepts more (`scids_left() > 0`).
    fn issue_scids(&mut self) {
        if self.scid_len == 0 {
            return;
        }
        while self.conn.scids_left() > 0 {
            let mut cid = [0u8; quiche::MAX_CONN_ID_LEN];
            let mut token = [0u8; 16];
            let len = self.scid_len.min(quiche::MAX_CONN_ID_LEN);
            if self.rng.fill(&mut cid[..len]).is_err() || self.rng.fill(&mut token).is_err() {
                return;
            }
            let scid = quiche::ConnectionId::from_ref(&cid[..len]);
            if self
                .conn
                .new_scid(&scid, u128::from_be_bytes(token), false)
                .is_err()
            {
                return;
            }
            self.stats.scids_issued += 1;
        }
    }
}
