//! The QUIC migration driver (seed 000 §3.1; issue 7): moves one live client
//! `quiche::Connection` from local address to local address without interrupting its streams.
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
//! trips) is sent again ([`mimiq_masque::quic::probe_retry_after`] says why quiche alone would
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
//!   the connection leaves an address, the path is forgotten ([`mimiq_masque::quic::LeftPaths`],
//!   the vendored quiche's `abandon_path`) once everything sent there has been acknowledged, or
//!   after four round trips (at least [`MigrationConfig::forget_after_min_ms`], 100 ms) with what
//!   is still unacknowledged retransmitted on the new path. Forgetting retires the destination CID
//!   used there, so a CID seen on the wire from one address never appears from another, and frees
//!   quiche's path slot, so the connection can hop to any number of fresh addresses. The wait is
//!   there because datagrams sent just before the hop can arrive after the RETIRE_CONNECTION_ID
//!   (the kernel reorders datagrams of different sockets): the peer drops what comes with a
//!   retired CID (upstream quiche closed the connection for it; the vendored one drops and
//!   counts it), so the wait keeps those datagrams from being lost. A hop back within the wait uses the path (and its CID)
//!   again, from the same address (allowed: RFC 9000 §9.5 forbids one CID from two addresses, not
//!   twice from one).
//! - The server side: `mimiq-proxy` forgets the paths a client left too (the same `LeftPaths`),
//!   so it never sends one client CID to two client addresses and keeps accepting new ones. A
//!   stock quiche server keeps a path, and one of the client's CIDs, per client address for the
//!   life of the connection: against it a connection hops among at most the server's
//!   `active_connection_id_limit` addresses ([`Migrator::path_budget`]; a hop to one more is
//!   refused with [`HopError::PathBudget`]) unless [`MigrationConfig::server_forgets_paths`] says
//!   the server is one that forgets.

//! Threading: one `Migrator` belongs to one thread (the connection's event loop). Nothing here
//! panics on input: malformed datagrams are quiche errors returned to the caller, refused or
//! impossible hops are [`HopError`]s and counters.

use std::collections::VecDeque;
use std::net::SocketAddr;

use mimiq_masque::quic::{self, LeftPaths};
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};

/// Migration settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationConfig {
    /// How long a hop may take from request to switch before it is abandoned (the connection
    /// stays on its current address), in milliseconds. Default 2000.
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
            hop_timeout_ms: 2_000,
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
    /// Paths left that the connection came back to before they were forgotten.
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
    /// counts it and carries on.
    pub fn recv(
        &mut self,
        buf: &mut [u8],
        from: SocketAddr,
        to: SocketAddr,
        now: Instant,
    ) -> Result<usize, quiche::Error> {
        let result = self.conn.recv(buf, quiche::RecvInfo { from, to });
        self.drive(now);
        result
    }

    /// The next datagram to send, and where from/to; `None` when there is nothing to send now.
    /// Probes for a hop in progress come out of here too, with `SendInfo::from` = the new
    /// address. An error means the connection failed (it is then closed).
    pub fn send(
        &mut self,
        out: &mut [u8],
        now: Instant,
    ) -> Result<Option<(usize, quiche::SendInfo)>, quiche::Error> {
        self.drive(now);
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::direct::h3::{issue_server_scids, random_cid, TestCert};

    const SERVER: &str = "198.18.1.1:4433";
    const ALPN: &[u8] = b"mimiq-test";

    fn client_addr(i: usize) -> SocketAddr {
        let (hi, lo) = ((i / 200) as u8, (i % 200) as u8);
        SocketAddr::from(([198, 18, hi, 10 + lo], 40_000 + i as u16))
    }

    fn quic_config(limit: u64) -> quiche::Config {
        let mut c = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
        c.set_application_protos(&[ALPN]).unwrap();
        c.set_max_idle_timeout(30_000);
        c.set_max_recv_udp_payload_size(1350);
        c.set_max_send_udp_payload_size(1350);
        c.set_initial_max_data(10_000_000);
        c.set_initial_max_stream_data_bidi_local(2_000_000);
        c.set_initial_max_stream_data_bidi_remote(2_000_000);
        c.set_initial_max_streams_bidi(16);
        c.set_active_connection_id_limit(limit);
        c
    }

    /// A client `Migrator` and a quiche server connection exchanging datagrams in memory.
    /// The server does what quiche-server does: accept, keep issuing CIDs, echo stream data.
    struct Pair {
        client: Migrator,
        server: quiche::Connection,
        /// The server forgets the paths the client left (as mimiq-proxy does), or keeps them
        /// all (a stock quiche server).
        server_left: Option<LeftPaths>,
        server_addr: SocketAddr,
        rng: SystemRandom,
        /// Client source addresses whose datagrams are dropped (an unreachable address).
        blackholed: HashSet<SocketAddr>,
        /// One server datagram to each address listed is lost (each entry counts once).
        lose_once_to: Vec<SocketAddr>,
        /// Source addresses of every datagram the server received.
        seen_from: Vec<SocketAddr>,
        client_sent: u64,
        /// What the echo still has to send back, per stream.
        backlog: std::collections::HashMap<u64, Backlog>,
        /// Datagrams each side sends per round (a crude pacing: more rounds, more hops).
        max_burst: usize,
        /// Client datagrams from this address are held back (delivered late by `release`).
        hold_from: Option<SocketAddr>,
        held: Vec<(Vec<u8>, quiche::SendInfo)>,
        _cert: TestCert,
    }

    #[derive(Default)]
    struct Backlog {
        data: Vec<u8>,
        sent: usize,
        fin: bool,
    }

    impl Pair {
        fn new(disable_migration: bool, config: MigrationConfig) -> Self {
            Self::with_cid_limit(disable_migration, config, recommended_active_cid_limit(4))
        }

        /// [`Pair::new`] with both ends' `active_connection_id_limit` (which is also how many
        /// paths quiche keeps at once).
        fn with_cid_limit(disable_migration: bool, config: MigrationConfig, limit: u64) -> Self {
            let cert = TestCert::new().unwrap();
            let rng = SystemRandom::new();
            let server_addr: SocketAddr = SERVER.parse().unwrap();
            let mut ccfg = quic_config(limit);
            ccfg.verify_peer(false);
            let mut scfg = quic_config(limit);
            cert.load_into(&mut scfg).unwrap();
            scfg.set_disable_active_migration(disable_migration);
            let cscid = random_cid(&rng, 16).unwrap();
            let sscid = random_cid(&rng, 16).unwrap();
            let conn = quiche::connect(
                Some("quic.tech"),
                &cscid,
                client_addr(0),
                server_addr,
                &mut ccfg,
            )
            .unwrap();
            let server =
                quiche::accept(&sscid, None, server_addr, client_addr(0), &mut scfg).unwrap();
            let mut pair = Self {
                client: Migrator::new(conn, client_addr(0), server_addr, config),
                server,
                server_left: config.server_forgets_paths.then(LeftPaths::default),
                server_addr,
                rng,
                blackholed: HashSet::new(),
                lose_once_to: Vec::new(),
                seen_from: Vec::new(),
                client_sent: 0,
                backlog: Default::default(),
                max_burst: usize::MAX,
                hold_from: None,
                held: Vec::new(),
                _cert: cert,
            };
            for _ in 0..50 {
                pair.exchange(&mut |_| {});
                if pair.client.connection().is_established() && pair.server.is_established() {
                    break;
                }
            }
            assert!(pair.client.connection().is_established(), "handshake");
            pair
        }

        /// One round: everything the client has goes to the server, everything the server
        /// has goes back; `before_client_packet` runs before each client datagram (the hop
        /// schedule). Returns the datagrams moved.
        fn exchange(&mut self, before_client_packet: &mut dyn FnMut(&mut Self)) -> usize {
            let mut moved = 0;
            let mut out = [0u8; 1500];
            for _ in 0..self.max_burst {
                before_client_packet(self);
                let now = Instant::now();
                let Some((len, info)) = self.client.send(&mut out, now).unwrap() else {
                    break;
                };
                self.client_sent += 1;
                moved += 1;
                if self.blackholed.contains(&info.from) {
                    continue;
                }
                if self.hold_from == Some(info.from) {
                    self.held.push((out[..len].to_vec(), info));
                    continue;
                }
                assert_eq!(info.to, self.server_addr);
                self.seen_from.push(info.from);
                let ri = quiche::RecvInfo {
                    from: info.from,
                    to: info.to,
                };
                let _ = self.server.recv(&mut out[..len], ri);
            }
            issue_server_scids(&mut self.server, &self.rng);
            while self.server.retired_scid_next().is_some() {}
            while let Some(ev) = self.server.path_event_next() {
                if let Some(left) = self.server_left.as_mut() {
                    left.on_event(&ev, Instant::now());
                }
            }
            if let Some(left) = self.server_left.as_mut() {
                left.forget(&mut self.server, Instant::now());
            }
            self.echo();
            for _ in 0..self.max_burst.saturating_mul(2) {
                let (len, info) = match self.server.send(&mut out) {
                    Ok(v) => v,
                    Err(quiche::Error::Done) => break,
                    Err(e) => panic!("server send: {e:?}"),
                };
                moved += 1;
                if self.blackholed.contains(&info.to) {
                    continue;
                }
                if let Some(i) = self.lose_once_to.iter().position(|a| *a == info.to) {
                    self.lose_once_to.swap_remove(i);
                    continue;
                }
                let _ = self
                    .client
                    .recv(&mut out[..len], info.from, info.to, Instant::now());
            }
            if moved == 0 {
                let wait = [self.client.timeout(Instant::now()), self.server.timeout()]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or(Duration::from_millis(1))
                    .min(Duration::from_millis(5));
                std::thread::sleep(wait);
                self.client.on_timeout(Instant::now());
                self.server.on_timeout();
            }
            moved
        }

        /// Delivers the held-back datagrams now, late.
        fn release(&mut self) {
            for (mut d, info) in std::mem::take(&mut self.held) {
                let ri = quiche::RecvInfo {
                    from: info.from,
                    to: info.to,
                };
                let _ = self.server.recv(&mut d, ri);
            }
        }

        /// The server echoes every stream byte back, and the fin, reading only what it can
        /// send on (the client's stream window bounds the backlog).
        fn echo(&mut self) {
            let mut buf = [0u8; 65_535];
            for id in [0u64, 4] {
                let backlog = self.backlog.entry(id).or_default();
                loop {
                    while backlog.sent < backlog.data.len() {
                        match self.server.stream_send(
                            id,
                            &backlog.data[backlog.sent..],
                            backlog.fin,
                        ) {
                            Ok(k) if k > 0 => backlog.sent += k,
                            _ => break,
                        }
                    }
                    if backlog.sent < backlog.data.len() {
                        break;
                    }
                    backlog.data.clear();
                    backlog.sent = 0;
                    match self.server.stream_recv(id, &mut buf) {
                        Ok((n, fin)) => {
                            backlog.data.extend_from_slice(&buf[..n]);
                            backlog.fin = fin;
                            if n == 0 && fin {
                                let _ = self.server.stream_send(id, b"", true);
                            }
                        }
                        Err(_) => break,
                    }
                }
            }
        }

        /// Sends `len` pattern bytes on stream 0, reads the echo, checks it byte for byte;
        /// `hop_every` client packets, asks for a hop to the next of `addresses` addresses.
        fn transfer(
            &mut self,
            len: usize,
            hop_every: u64,
            addresses: usize,
        ) -> Vec<Result<(), HopError>> {
            let data: Vec<u8> = (0..len as u64).map(crate::direct::h3::body_byte).collect();
            let mut sent = 0;
            let mut received = Vec::with_capacity(len);
            let mut fin = false;
            let mut results = Vec::new();
            let mut next = 1;
            let started = Instant::now();
            while !fin {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "transfer stalled"
                );
                if sent < len {
                    match self
                        .client
                        .connection_mut()
                        .stream_send(0, &data[sent..], true)
                    {
                        Ok(n) => sent += n,
                        Err(quiche::Error::Done) => {}
                        Err(e) => panic!("stream_send: {e:?}"),
                    }
                }
                let mut hop = |p: &mut Pair| {
                    if hop_every > 0
                        && p.client_sent > 0
                        && p.client_sent.is_multiple_of(hop_every)
                        && p.client.hop_in_progress().is_none()
                    {
                        let to = client_addr(next % addresses);
                        next += 1;
                        if to == p.client.local_addr() {
                            return;
                        }
                        // One request per packet count.
                        p.client_sent += 1;
                        results.push(p.client.request_hop(to, Instant::now()));
                    }
                };
                self.exchange(&mut hop);
                let mut buf = [0u8; 65_535];
                while let Ok((n, f)) = self.client.connection_mut().stream_recv(0, &mut buf) {
                    received.extend_from_slice(&buf[..n]);
                    fin |= f;
                }
                assert!(
                    !self.client.connection().is_closed(),
                    "connection closed: timed out {}, client {:?} / {:?}, server {:?} / {:?}, {:?}",
                    self.client.connection().is_timed_out(),
                    self.client.connection().local_error(),
                    self.client.connection().peer_error(),
                    self.server.local_error(),
                    self.server.peer_error(),
                    self.client.stats()
                );
            }
            assert_eq!(received.len(), len, "echo length");
            assert!(received == data, "echo is byte-exact");
            results
        }
    }

    #[test]
    fn hundreds_of_hops_during_a_transfer_keep_it_byte_exact() {
        let mut pair = Pair::new(false, MigrationConfig::default());
        pair.max_burst = 8;
        let results = pair.transfer(2_000_000, 6, 4);
        let stats = pair.client.stats();
        let summary = pair.client.latency_summary();
        eprintln!("{stats:?}\nhop latency: {summary}");
        assert!(stats.hops_completed >= 200, "{stats:?}");
        assert_eq!(stats.hops_failed, 0, "{stats:?}");
        // A stock server keeps a path per address, and so does the client: one each.
        assert_eq!(stats.paths_forgotten, 0, "{stats:?}");
        assert!(pair.client.connection().path_stats().count() <= 4);
        assert!(
            results.iter().all(|r| r.is_ok()),
            "every hop requested was started"
        );
        let distinct: HashSet<_> = pair.seen_from.iter().collect();
        assert_eq!(distinct.len(), 4, "the server saw all four addresses");
        assert_eq!(summary.count as u64, stats.hops_completed);
    }

    #[test]
    fn a_connection_hops_to_hundreds_of_fresh_addresses_when_the_server_forgets_paths() {
        // MIMIQ's case: every hop goes to an address the connection never used, far more of
        // them than either side's active_connection_id_limit, against a server that forgets
        // the paths a client left (as mimiq-proxy does). The limit (16, mimiq-proxy's default
        // is 8) bounds how many paths left can wait at once: a hop every 6 packets in memory
        // is hundreds per second, and a path left waits at least two of its round trips (more
        // under the load of a parallel test run).
        let config = MigrationConfig {
            server_forgets_paths: true,
            ..MigrationConfig::default()
        };
        let mut pair = Pair::with_cid_limit(false, config, 16);
        pair.max_burst = 8;
        let results = pair.transfer(2_000_000, 6, 100_000);
        let stats = pair.client.stats();
        eprintln!("{stats:?}");
        assert!(stats.hops_completed >= 200, "{stats:?}");
        assert_eq!(stats.hops_failed, 0, "{stats:?}");
        assert!(results.iter().all(|r| r.is_ok()), "every hop was started");
        let distinct: HashSet<_> = pair.seen_from.iter().collect();
        assert!(
            distinct.len() as u64 > stats.hops_completed,
            "each hop went to a fresh address: {} addresses, {stats:?}",
            distinct.len()
        );
        // Both ends keep only the paths still waiting, however many addresses were used.
        let waiting = pair.client.pending_forgets();
        assert!(pair.client.connection().path_stats().count() <= waiting + 2);
        assert_eq!(
            stats.paths_forgotten + waiting as u64,
            stats.hops_completed,
            "{stats:?}"
        );
    }

    #[test]
    fn each_destination_cid_is_sent_from_one_address_only() {
        // Record (DCID, source address) of every client datagram while hopping among three
        // addresses: a DCID must never appear from two addresses.
        // No wait (beyond four in-memory RTTs): forget paths as soon as possible, so that many
        // CIDs are retired and replaced while the hops go on.
        let config = MigrationConfig {
            forget_after_min_ms: 0,
            server_forgets_paths: true,
            ..MigrationConfig::default()
        };
        // Room for the paths left that wait (see the test above).
        let mut pair = Pair::with_cid_limit(false, config, 16);
        let mut owner: std::collections::HashMap<Vec<u8>, SocketAddr> = Default::default();
        let mut out = [0u8; 1500];
        let mut next = 1;
        let data = vec![7u8; 400_000];
        let mut sent = 0;
        for round in 0..4_000 {
            if sent < data.len() {
                if let Ok(n) = pair
                    .client
                    .connection_mut()
                    .stream_send(4, &data[sent..], true)
                {
                    sent += n;
                }
            }
            if round % 3 == 0 && pair.client.hop_in_progress().is_none() {
                let to = client_addr(next % 3);
                next += 1;
                let _ = pair.client.request_hop(to, Instant::now());
            }
            while let Some((len, info)) = pair.client.send(&mut out, Instant::now()).unwrap() {
                let hdr = quiche::Header::from_slice(&mut out[..len], 16).unwrap();
                let dcid = hdr.dcid.to_vec();
                let from = *owner.entry(dcid.clone()).or_insert(info.from);
                assert_eq!(from, info.from, "DCID {dcid:02x?} sent from two addresses");
                let ri = quiche::RecvInfo {
                    from: info.from,
                    to: info.to,
                };
                let _ = pair.server.recv(&mut out[..len], ri);
            }
            pair.exchange(&mut |_| {});
            let mut buf = [0u8; 65_535];
            while pair
                .client
                .connection_mut()
                .stream_recv(4, &mut buf)
                .is_ok()
            {}
        }
        let stats = pair.client.stats();
        assert!(stats.hops_completed >= 100, "{stats:?}");
        assert!(stats.paths_forgotten > 0, "{stats:?}");
        assert!(
            owner.len() as u64 > stats.paths_forgotten,
            "each retirement brings a fresh DCID: {} seen, {stats:?}",
            owner.len()
        );
    }

    /// Hops from address 0 to 1 while data flows, holding back what was sent from address 0
    /// meanwhile; delivers it `late_rounds` rounds after the switch. Returns whether the
    /// server's connection survived.
    fn late_datagrams_after_a_hop(config: MigrationConfig, late_rounds: usize) -> (Pair, bool) {
        late_datagrams(config, late_rounds, false)
    }

    /// As [`late_datagrams_after_a_hop`]; with `until_retired`, the rounds go on until the old
    /// CID has been retired (a few seconds at most).
    fn late_datagrams(
        config: MigrationConfig,
        late_rounds: usize,
        until_retired: bool,
    ) -> (Pair, bool) {
        let mut pair = Pair::new(false, config);
        pair.hold_from = Some(client_addr(0));
        let data = vec![1u8; 30_000];
        pair.client
            .connection_mut()
            .stream_send(4, &data, false)
            .unwrap();
        pair.client
            .request_hop(client_addr(1), Instant::now())
            .unwrap();
        for _ in 0..50 {
            if pair.client.local_addr() == client_addr(1) {
                break;
            }
            pair.exchange(&mut |_| {});
        }
        assert_eq!(
            pair.client.local_addr(),
            client_addr(1),
            "the hop completed"
        );
        assert!(
            !pair.held.is_empty(),
            "datagrams from the old address were in flight"
        );
        pair.hold_from = None;
        // Data keeps flowing on the new path (and the retirement, when due).
        let round = |pair: &mut Pair| {
            let _ = pair
                .client
                .connection_mut()
                .stream_send(4, &data[..1_000], false);
            pair.exchange(&mut |_| {});
        };
        for _ in 0..late_rounds {
            round(&mut pair);
        }
        if until_retired {
            mimiq_testkit::eventually(Duration::from_secs(10), || {
                round(&mut pair);
                match pair.client.stats() {
                    s if s.paths_forgotten > 0 => Ok(()),
                    s => Err(format!("not retired yet: {s:?}")),
                }
            })
            .unwrap_or_else(|e| panic!("the old CID was never retired: {e}"));
            // The RETIRE_CONNECTION_ID goes out with the client's next datagrams.
            for _ in 0..3 {
                pair.exchange(&mut |_| {});
            }
        }
        pair.release();
        let alive = !pair.server.is_closed() && pair.server.local_error().is_none();
        (pair, alive)
    }

    #[test]
    fn datagrams_sent_before_a_hop_and_delivered_after_it_do_not_break_the_connection() {
        // The wait: the old path (and its CID) is not forgotten while what was sent there is
        // unacknowledged, for at least forget_after_min_ms. 3 s rather than the default 100 ms,
        // so that the few rounds before the late delivery fit in it whatever the machine's load.
        const WAIT_MS: u64 = 3_000;
        let config = MigrationConfig {
            forget_after_min_ms: WAIT_MS,
            server_forgets_paths: true,
            ..MigrationConfig::default()
        };
        let (mut pair, alive) = late_datagrams_after_a_hop(config, 5);
        assert!(alive, "server closed: {:?}", pair.server.local_error());
        assert_eq!(pair.client.stats().paths_forgotten, 0, "still held");
        mimiq_testkit::eventually(
            Duration::from_millis(WAIT_MS) + Duration::from_secs(5),
            || {
                pair.exchange(&mut |_| {});
                match pair.client.stats() {
                    s if s.paths_forgotten > 0 => Ok(s.paths_forgotten),
                    s => Err(format!("not forgotten yet: {s:?}")),
                }
            },
        )
        .map(|forgotten| assert_eq!(forgotten, 1, "the one path left, once"))
        .unwrap_or_else(|e| panic!("not forgotten once acknowledged or after the wait: {e}"));
        pair.transfer(100_000, 0, 1);
        assert!(pair.server.local_error().is_none());
    }

    #[test]
    fn a_packet_overtaken_by_hundreds_of_newer_ones_is_still_read() {
        // All paths share one packet number space, so what a slower old path delivers after a
        // hop arrives behind the new path's packets. Upstream quiche takes a packet more than
        // 128 numbers older than the newest for a duplicate and drops it unread; the vendored
        // copy remembers 4096 (vendor/quiche/MIMIQ-PATCH.md).
        let cert = TestCert::new().unwrap();
        let rng = SystemRandom::new();
        let server_addr: SocketAddr = SERVER.parse().unwrap();
        let (to_server, to_client) = (
            quiche::RecvInfo {
                from: client_addr(0),
                to: server_addr,
            },
            quiche::RecvInfo {
                from: server_addr,
                to: client_addr(0),
            },
        );
        let mut ccfg = quic_config(4);
        ccfg.verify_peer(false);
        let mut scfg = quic_config(4);
        cert.load_into(&mut scfg).unwrap();
        let cid = random_cid(&rng, 16).unwrap();
        let mut client = quiche::connect(
            Some("quic.tech"),
            &cid,
            client_addr(0),
            server_addr,
            &mut ccfg,
        )
        .unwrap();
        let cid = random_cid(&rng, 16).unwrap();
        let mut server =
            quiche::accept(&cid, None, server_addr, client_addr(0), &mut scfg).unwrap();
        let (mut out, mut sink) = ([0u8; 1500], vec![0u8; 1 << 20]);
        let data = vec![7u8; 1 << 20];
        for _ in 0..100 {
            if client.is_established() {
                // Slow start doubles the window per round: rounds grow to hundreds of packets.
                let _ = client.stream_send(4, &data, false);
            }
            let mut round = Vec::new();
            while let Ok((len, _)) = client.send(&mut out) {
                round.push(out[..len].to_vec());
            }
            if round.len() >= 400 {
                // The 200th packet of the round arrives after the 200 sent behind it. Its packet
                // number is long enough to decode that far back (RFC 9000 §17.1: the sender
                // sizes it by what is unacknowledged).
                let mut late = round.remove(199);
                for mut p in round {
                    let _ = server.recv(&mut p, to_server);
                }
                let read = server.stats().recv;
                let _ = server.recv(&mut late, to_server);
                assert_eq!(server.stats().recv, read + 1, "the late packet was dropped");
                assert!(!server.is_closed());
                return;
            }
            for mut p in round {
                let _ = server.recv(&mut p, to_server);
            }
            while server.stream_recv(4, &mut sink).is_ok() {}
            while let Ok((len, _)) = server.send(&mut out) {
                let _ = client.recv(&mut out[..len], to_client);
            }
        }
        panic!("no round of 400 packets: the congestion window never grew");
    }

    #[test]
    fn a_lost_path_response_is_probed_for_again_and_the_hop_completes() {
        let mut pair = Pair::new(false, MigrationConfig::default());
        let to = client_addr(1);
        // The server's first datagram to the new address carries its PATH_RESPONSE. The server
        // acknowledges the probe on the path the connection still uses, so quiche never
        // declares the probe lost: only the driver's own retry can complete the hop.
        pair.lose_once_to.push(to);
        pair.client.request_hop(to, Instant::now()).unwrap();
        // Bounded by the hop deadline (2 s), after which the hop fails.
        while pair.client.hop_in_progress().is_some() {
            pair.exchange(&mut |_| {});
        }
        let stats = pair.client.stats();
        assert!(pair.lose_once_to.is_empty(), "the response was lost");
        assert_eq!(stats.hops_completed, 1, "{stats:?}");
        assert!(stats.probes_resent >= 1, "{stats:?}");
        assert_eq!(pair.client.local_addr(), to);
    }

    #[test]
    fn a_late_datagram_to_a_retired_cid_is_dropped_and_counted_and_the_connection_lives() {
        // Forget at once (no minimum; four in-memory RTTs are microseconds), let the retirement
        // reach the server, then deliver the datagrams held from the old address: each is to a
        // connection ID the server no longer has (vendor/quiche/MIMIQ-PATCH.md, the third fix).
        // The same holds for a client (what a server sends it late, to an ID it retired):
        //= https://www.rfc-editor.org/rfc/rfc9000#section-5.2.1
        //# Packets that do not match an existing connection -- based on
        //# Destination Connection ID or, if this value is zero length, local IP
        //# address and port -- are discarded.
        let config = MigrationConfig {
            forget_after_min_ms: 0,
            server_forgets_paths: true,
            ..MigrationConfig::default()
        };
        let (pair, alive) = late_datagrams(config, 5, true);
        assert!(pair.client.stats().paths_forgotten >= 1);
        assert!(alive, "server closed: {:?}", pair.server.local_error());
        assert!(
            pair.server.stats().unknown_dcid_dropped_count >= 1,
            "the late datagrams were dropped and counted: {:?}",
            pair.server.stats()
        );
    }

    #[test]
    fn a_server_that_disables_active_migration_gets_no_hop_and_a_counted_refusal() {
        let mut pair = Pair::new(true, MigrationConfig::default());
        assert!(pair.client.migration_disabled());
        let results = pair.transfer(300_000, 5, 3);
        let stats = pair.client.stats();
        assert!(!results.is_empty());
        assert!(results
            .iter()
            .all(|r| *r == Err(HopError::MigrationDisabled)));
        assert_eq!(stats.hops_refused, results.len() as u64);
        assert_eq!(stats.hops_completed, 0);
        assert!(
            pair.seen_from.iter().all(|&a| a == client_addr(0)),
            "never left its address"
        );
    }

    #[test]
    fn an_unreachable_address_fails_the_hop_and_the_connection_stays() {
        let config = MigrationConfig {
            hop_timeout_ms: 300,
            ..MigrationConfig::default()
        };
        let mut pair = Pair::new(false, config);
        pair.blackholed.insert(client_addr(1));
        pair.client
            .request_hop(client_addr(1), Instant::now())
            .unwrap();
        let (to, reason) = mimiq_testkit::eventually(
            Duration::from_millis(config.hop_timeout_ms) + Duration::from_secs(5),
            || {
                pair.exchange(&mut |_| {});
                match pair.client.poll_event() {
                    Some(HopEvent::Failed { to, reason }) => Ok((to, reason)),
                    other => Err(format!("event: {other:?}")),
                }
            },
        )
        .unwrap_or_else(|e| panic!("the hop fails: {e}"));
        assert_eq!(to, client_addr(1));
        assert!(
            matches!(reason, HopFailure::TimedOut | HopFailure::ValidationFailed),
            "{reason:?}"
        );
        assert_eq!(pair.client.local_addr(), client_addr(0));
        assert_eq!(pair.client.stats().hops_failed, 1);
        // The connection still works, and can hop elsewhere.
        pair.blackholed.clear();
        pair.transfer(50_000, 0, 1);
        pair.client
            .request_hop(client_addr(2), Instant::now())
            .unwrap();
        for _ in 0..20 {
            pair.exchange(&mut |_| {});
        }
        assert_eq!(pair.client.local_addr(), client_addr(2));
    }

    #[test]
    fn bad_requests_and_bad_datagrams_are_errors_not_panics() {
        let server_addr: SocketAddr = SERVER.parse().unwrap();
        let rng = SystemRandom::new();
        let mut cfg = quic_config(4);
        let cid = random_cid(&rng, 16).unwrap();
        let conn = quiche::connect(None, &cid, client_addr(0), server_addr, &mut cfg).unwrap();
        let mut early = Migrator::new(
            conn,
            client_addr(0),
            server_addr,
            MigrationConfig::default(),
        );
        assert_eq!(
            early.request_hop(client_addr(1), Instant::now()),
            Err(HopError::NotEstablished)
        );

        let mut pair = Pair::new(false, MigrationConfig::default());
        let now = Instant::now();
        assert_eq!(
            pair.client.request_hop(client_addr(0), now),
            Err(HopError::AlreadyThere(client_addr(0)))
        );
        let v6: SocketAddr = "[fd00::1]:4000".parse().unwrap();
        assert!(matches!(
            pair.client.request_hop(v6, now),
            Err(HopError::FamilyMismatch { .. })
        ));
        for garbage in [
            &[][..],
            &[0u8; 1][..],
            &[0xffu8; 1200][..],
            &[0x40u8; 40][..],
        ] {
            let mut g = garbage.to_vec();
            // quiche drops what it cannot use (an error, or Ok for a packet it discards).
            let _ = pair.client.recv(&mut g, server_addr, client_addr(0), now);
            assert!(!pair.client.connection().is_closed());
        }
        pair.client.request_hop(client_addr(1), now).unwrap();
        assert_eq!(
            pair.client.request_hop(client_addr(2), now),
            Err(HopError::HopInProgress(client_addr(1)))
        );
        assert_eq!(pair.client.stats().hops_busy, 1);
        // Still a working connection after all that.
        pair.transfer(20_000, 0, 1);
    }

    #[test]
    fn latency_summary_uses_nearest_rank_percentiles() {
        let samples: Vec<u32> = (1..=100).rev().collect();
        let s = LatencySummary::from_samples(&samples);
        assert_eq!(
            (s.count, s.min_us, s.p50_us, s.p90_us, s.p99_us, s.max_us),
            (100, 1, 50, 90, 99, 100)
        );
        assert_eq!(s.mean_us, 50);
        assert_eq!(LatencySummary::from_samples(&[]), LatencySummary::default());
    }
}
