//! The I/O shell: UDP request server, TCP rule publisher, HTTP metrics (ARCHITECTURE §5).
//!
//! # Threads
//!
//! * **Core thread** ([`Server::run`], the caller's thread) owns the [`Allocator`] and the
//!   [`Store`]. Each turn it waits up to 10 ms for a datagram on the relay socket, drains up to
//!   `batch_max` more without blocking, handles them all, advances timers, commits the batch's
//!   journal in one transaction (group commit), then publishes the batch's rule updates and only
//!   then sends the replies. A commit failure stops the server (the process restarts from the
//!   store; nothing unacknowledged was sent).
//! * **Acceptor thread**: accepts rule-stream connections and starts one **subscriber thread**
//!   each, which authenticates the switch's `Hello`, registers a bounded queue with the core
//!   thread, and encodes, signs and writes what arrives on it. The core thread sends a new
//!   subscriber a snapshot first, consistent with the updates queued after it. A subscriber whose
//!   queue is full is dropped (its connection closes; it reconnects and gets a fresh snapshot).
//! * **Metrics endpoint** (`mimiq_metrics::serve`): answers `GET /metrics` from atomic counters,
//!   `GET /healthz` from the core loop's latest turn, and `GET /leases` by asking the core thread.
//!
//! Bad input never stops the server: every rejected datagram is counted by [`DropReason`].

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam::channel::{self, Receiver, Sender};
use hdrhistogram::Histogram;
use mimiq_metrics::hlog::{duration_histogram, DumpTimer, IntervalLog};
use mimiq_metrics::{Families, Health, Source};
use ring::hmac;

use crate::config::{self, Role, SwitchKey};
use crate::lease::{self, AllocError, AllocParams, Allocator, Lease, LeaseState};
use crate::proto::{
    self, AllocReply, ClientMsg, ParseError, Relay, RelayReply, ReleaseReply, Status, StreamMsg,
};
use crate::publish::{Batch, Fanout};
use crate::store::{CommitError, LoadError, Store};
use crate::{Family, Sid};

/// Longest wait for a datagram before the core thread advances timers anyway.
const TICK: Duration = Duration::from_millis(10);
/// Largest datagram accepted.
const MAX_DATAGRAM: usize = 2048;
/// How long a new subscriber has to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// A core loop that has not turned for this long makes `/healthz` answer not ready (a turn
/// takes at most `TICK` plus one batch's commit).
const STALL_MS: u64 = 2_000;

/// What the server needs besides the core's policy.
#[derive(Debug, Clone)]
pub struct Settings {
    /// UDP address for relayed requests.
    pub relay_listen: SocketAddr,
    /// TCP address of the rule stream.
    pub publish_listen: SocketAddr,
    /// HTTP address of the metrics endpoint.
    pub metrics_listen: SocketAddr,
    /// The latency log.
    pub hlog_file: Option<std::path::PathBuf>,
    /// Replay window (ms).
    pub replay_window_ms: u64,
    /// Datagrams per batch.
    pub batch_max: usize,
    /// Queue length per subscriber (batches).
    pub subscriber_queue: usize,
    /// The switches and their keys.
    pub switches: Vec<SwitchKey>,
    /// IPv4 gateway and client prefix length.
    pub v4_gateway: Option<config::Gateway>,
    /// IPv6 gateway and client prefix length.
    pub v6_gateway: Option<config::Gateway>,
}

impl Settings {
    /// The settings of a validated configuration file.
    pub fn from_config(cfg: &config::Config) -> Result<Self, config::ConfigError> {
        let (v4_gateway, v6_gateway) = cfg.gateways();
        Ok(Settings {
            relay_listen: cfg.server.relay_listen,
            publish_listen: cfg.server.publish_listen,
            metrics_listen: cfg.server.metrics_listen,
            hlog_file: cfg.server.hlog_file.clone(),
            replay_window_ms: cfg.server.replay_window_ms,
            batch_max: cfg.server.batch_max,
            subscriber_queue: cfg.server.subscriber_queue,
            switches: cfg.switch_keys()?,
            v4_gateway,
            v6_gateway,
        })
    }
}

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A socket could not be bound.
    #[error("cannot bind the {what} socket on {addr}: {source}")]
    Bind {
        /// Which socket.
        what: &'static str,
        /// Address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The store could not be read.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The core refused the configuration.
    #[error(transparent)]
    Core(#[from] lease::ConfigError),
    /// Committing the restore (deleting leases that ended while down) failed.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// The metrics endpoint could not be served (its address in use, or not local).
    #[error("{0}")]
    Metrics(String),
    /// A thread or socket option failed.
    #[error("starting the server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A batch could not be committed; the process must restart from the store.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// The relay socket failed.
    #[error("relay socket: {0}")]
    Io(#[from] std::io::Error),
}

/// Why a datagram or subscriber was dropped (a metrics label each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    /// Shorter than its fields.
    Truncated,
    /// Not "MQ".
    BadMagic,
    /// Unknown version.
    BadVersion,
    /// A type not accepted here.
    UnexpectedType,
    /// HMAC tag does not verify.
    BadHmac,
    /// No key for the claimed switch (or an edge switch relaying).
    UnknownSwitch,
    /// An invalid field value.
    BadField,
    /// Bytes after the message.
    TrailingBytes,
    /// Timestamp outside the replay window.
    Stale,
    /// Already seen.
    Replay,
    /// A rule-stream connection without a valid Hello.
    BadHello,
    /// A rule-stream connection over the connection cap.
    TooManyConnections,
}

const DROP_REASONS: [DropReason; 12] = [
    DropReason::Truncated,
    DropReason::BadMagic,
    DropReason::BadVersion,
    DropReason::UnexpectedType,
    DropReason::BadHmac,
    DropReason::UnknownSwitch,
    DropReason::BadField,
    DropReason::TrailingBytes,
    DropReason::Stale,
    DropReason::Replay,
    DropReason::BadHello,
    DropReason::TooManyConnections,
];

impl DropReason {
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::BadMagic => "bad_magic",
            DropReason::BadVersion => "bad_version",
            DropReason::UnexpectedType => "unexpected_type",
            DropReason::BadHmac => "bad_hmac",
            DropReason::UnknownSwitch => "unknown_switch",
            DropReason::BadField => "bad_field",
            DropReason::TrailingBytes => "trailing_bytes",
            DropReason::Stale => "stale",
            DropReason::Replay => "replay",
            DropReason::BadHello => "bad_hello",
            DropReason::TooManyConnections => "too_many_connections",
        }
    }
}

impl From<ParseError> for DropReason {
    fn from(e: ParseError) -> Self {
        match e {
            ParseError::Truncated => DropReason::Truncated,
            ParseError::BadMagic => DropReason::BadMagic,
            ParseError::BadVersion => DropReason::BadVersion,
            ParseError::UnexpectedType => DropReason::UnexpectedType,
            ParseError::BadTag => DropReason::BadHmac,
            ParseError::UnknownSwitch => DropReason::UnknownSwitch,
            ParseError::BadField => DropReason::BadField,
            ParseError::Trailing => DropReason::TrailingBytes,
        }
    }
}

const STATUSES: [Status; 5] = [
    Status::Ok,
    Status::PoolExhausted,
    Status::RateLimited,
    Status::BadRequest,
    Status::ClientCap,
];

/// Counters and gauges, written by the server threads, read by the metrics endpoint.
#[derive(Debug, Default)]
pub struct Metrics {
    allocations: [AtomicU64; 2],
    releases: AtomicU64,
    expiries: AtomicU64,
    freed: AtomicU64,
    expired_while_down: AtomicU64,
    refused_port_rate: AtomicU64,
    refused_port_cap: AtomicU64,
    reclaimed_silent: AtomicU64,
    seen_reports: AtomicU64,
    replies: [AtomicU64; 5],
    drops: [AtomicU64; 12],
    leases: AtomicU64,
    pool_size_v4: AtomicU64,
    pool_in_use_v4: AtomicU64,
    pool_in_use_v6: AtomicU64,
    subscribers: AtomicU64,
    subscribers_dropped: AtomicU64,
    rule_updates: AtomicU64,
    commits: AtomicU64,
    commit_ops: AtomicU64,
    commit_us: AtomicU64,
    seq: AtomicU64,
    /// Wall-clock ms of the core loop's latest turn (0 before the first).
    turn_ms: AtomicU64,
}

impl Metrics {
    /// Counts a drop.
    pub fn count_drop(&self, r: DropReason) {
        self.drops[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Drops counted for `r` so far.
    pub fn drops(&self, r: DropReason) -> u64 {
        self.drops[r as usize].load(Ordering::Relaxed)
    }

    /// Replies sent with `s` so far.
    pub fn replies(&self, s: Status) -> u64 {
        STATUSES
            .iter()
            .position(|x| *x == s)
            .map_or(0, |i| self.replies[i].load(Ordering::Relaxed))
    }

    /// Records a turn of the core loop (the allocator is serving while turns keep coming).
    fn turn(&self, now_ms: u64) {
        self.turn_ms.store(now_ms, Ordering::Relaxed);
    }
}

impl Source for Metrics {
    fn collect(&self, out: &mut Families) {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.counter("mimiq_allocator_allocations", "Addresses granted")
            .sample(&[("family", "4")], g(&self.allocations[0]))
            .sample(&[("family", "6")], g(&self.allocations[1]));
        for (name, help, v) in [
            (
                "releases",
                "Addresses released by their client",
                &self.releases,
            ),
            ("expiries", "Leases whose lifetime ended", &self.expiries),
            (
                "freed",
                "Addresses returned to the pool after t_remove",
                &self.freed,
            ),
            (
                "expired_while_down",
                "Leases found ended at restart",
                &self.expired_while_down,
            ),
            (
                "reclaimed_silent",
                "Leases ended early because their client had sent nothing through its access \
                 switch (reclaim_silent_after_ms)",
                &self.reclaimed_silent,
            ),
            (
                "seen_reports",
                "Reports from access switches of addresses they forwarded a first packet from",
                &self.seen_reports,
            ),
        ] {
            out.counter(format!("mimiq_allocator_{name}"), help)
                .value(g(v));
        }
        out.counter(
            "mimiq_allocator_port_refusals",
            "Requests refused by port security: too many new MACs on the port, or its clients \
             at their cap",
        )
        .sample(&[("reason", "new_mac_rate")], g(&self.refused_port_rate))
        .sample(&[("reason", "port_cap")], g(&self.refused_port_cap));
        let replies = out.counter("mimiq_allocator_replies", "Replies sent, by status code");
        for (s, v) in STATUSES.iter().zip(&self.replies) {
            replies.sample(&[("code", s.label())], g(v));
        }
        let drops = out.counter(
            "mimiq_allocator_drops",
            "Messages dropped unanswered, by reason",
        );
        for (r, v) in DROP_REASONS.iter().zip(&self.drops) {
            drops.sample(&[("reason", r.label())], g(v));
        }
        out.gauge("mimiq_allocator_leases", "Leases assigned or draining")
            .value(g(&self.leases));
        out.gauge("mimiq_allocator_pool_size", "Usable IPv4 pool addresses")
            .sample(&[("family", "4")], g(&self.pool_size_v4));
        out.gauge(
            "mimiq_allocator_pool_in_use",
            "Pool addresses assigned or draining",
        )
        .sample(&[("family", "4")], g(&self.pool_in_use_v4))
        .sample(&[("family", "6")], g(&self.pool_in_use_v6));
        out.gauge("mimiq_allocator_subscribers", "Rule-stream subscribers")
            .value(g(&self.subscribers));
        for (name, help, v) in [
            (
                "subscribers_dropped",
                "Subscribers dropped for a full queue",
                &self.subscribers_dropped,
            ),
            ("rule_updates", "Rule updates published", &self.rule_updates),
            (
                "store_commits",
                "Store commits (one per batch)",
                &self.commits,
            ),
            (
                "store_ops",
                "Journal operations committed",
                &self.commit_ops,
            ),
            (
                "store_commit_microseconds",
                "Time spent committing, microseconds",
                &self.commit_us,
            ),
        ] {
            out.counter(format!("mimiq_allocator_{name}"), help)
                .value(g(v));
        }
        out.gauge(
            "mimiq_allocator_rule_seq",
            "Sequence number of the latest rule update",
        )
        .value(g(&self.seq));
    }

    fn health(&self) -> Health {
        let turn = self.turn_ms.load(Ordering::Relaxed);
        let since = wall_ms().saturating_sub(turn);
        if turn == 0 {
            Health::NotReady("the core loop has not started".into())
        } else if since > STALL_MS {
            Health::NotReady(format!("the core loop has not turned for {since} ms"))
        } else {
            Health::Ready("serving requests".into())
        }
    }
}

/// The allocator's `.hlog` (`hlog_file`): request and commit latencies of the interval so far.
/// Without a file nothing is recorded, and SIGUSR1 is still caught (it must not end the
/// allocator).
struct Latencies {
    log: Option<IntervalLog>,
    timer: DumpTimer,
    request: Histogram<u64>,
    commit: Histogram<u64>,
}

impl Latencies {
    fn open(path: Option<&std::path::Path>) -> std::io::Result<Latencies> {
        let log = match path {
            Some(p) => Some(IntervalLog::create(
                p,
                "mimiq-allocator latency, ns: request = datagram received to reply sent, commit = one group commit",
            )?),
            None => None,
        };
        Ok(Latencies {
            log,
            timer: DumpTimer::new(Duration::from_secs(1))?,
            request: duration_histogram(),
            commit: duration_histogram(),
        })
    }

    fn record_request(&mut self, took: Duration) {
        if self.log.is_some() {
            self.request.saturating_record(took.as_nanos() as u64);
        }
    }

    fn record_commit(&mut self, took: Duration) {
        if self.log.is_some() {
            self.commit.saturating_record(took.as_nanos() as u64);
        }
    }

    /// Appends the interval when it is due (or SIGUSR1 asked).
    fn write_if_due(&mut self) -> std::io::Result<()> {
        let Some(log) = self.log.as_mut() else {
            return Ok(());
        };
        if self.timer.due() {
            log.write(&[("request", &self.request), ("commit", &self.commit)])?;
            self.request.reset();
            self.commit.reset();
        }
        Ok(())
    }
}

/// The allocator's metrics endpoint: its [`Metrics`], and `/leases` asked of the core thread.
struct Endpoint {
    metrics: Arc<Metrics>,
    requests: Sender<CoreRequest>,
}

impl Source for Endpoint {
    fn collect(&self, out: &mut Families) {
        self.metrics.collect(out);
    }

    fn health(&self) -> Health {
        self.metrics.health()
    }

    fn page(&self, path: &str) -> Option<Result<String, String>> {
        if path != "/leases" {
            return None;
        }
        let (tx, rx) = channel::bounded(1);
        let _ = self.requests.send(CoreRequest::Leases(tx));
        Some(
            rx.recv_timeout(Duration::from_secs(2))
                .map_err(|_| "allocator busy".to_string()),
        )
    }
}

/// One lease as printed by `/leases` and `mimiq-allocator leases`.
pub fn format_lease(l: &Lease, state: LeaseState) -> String {
    let st = match state {
        LeaseState::Assigned => "assigned",
        LeaseState::Draining => "draining",
    };
    format!(
        "{} {} sid={} port={} {} assigned_ms={} expires_ms={}",
        l.ip, l.mac, l.sid, l.port, st, l.assigned_ms, l.expires_ms
    )
}

/// Milliseconds since the Unix epoch (the allocator's clock).
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Relays seen within the window: (SID, MAC, txid, timestamp) → timestamp.
type ReplayCache = HashMap<(Sid, [u8; 6], u32, u64), u64>;

enum CoreRequest {
    Subscribe { switch_id: u16, tx: Sender<Batch> },
    Leases(Sender<String>),
}

/// The addresses the server actually bound (useful with port 0).
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    /// Relay UDP socket.
    pub relay: SocketAddr,
    /// Rule-stream TCP listener.
    pub publish: SocketAddr,
    /// Metrics HTTP listener.
    pub metrics: SocketAddr,
}

/// A bound, restored server, ready to [`run`](Server::run).
pub struct Server {
    settings: Settings,
    keys: Arc<HashMap<u16, (Role, hmac::Key)>>,
    udp: UdpSocket,
    tcp: TcpListener,
    endpoint: mimiq_metrics::Endpoint,
    requests: (Sender<CoreRequest>, Receiver<CoreRequest>),
    core: Allocator,
    store: Box<dyn Store>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
}

impl Server {
    /// Loads the store, rebuilds the core at the current time (committing the deletion of leases
    /// that ended while the allocator was down) and binds the sockets.
    pub fn start(
        settings: Settings,
        core_cfg: lease::Config,
        mut store: Box<dyn Store>,
    ) -> Result<Self, StartError> {
        let loaded = store.load()?;
        let mut core = Allocator::restore(core_cfg, loaded, wall_ms())?;
        let journal = core.take_journal();
        store.commit(&journal)?;
        let bind_err = |what, addr| move |source| StartError::Bind { what, addr, source };
        let udp = UdpSocket::bind(settings.relay_listen)
            .map_err(bind_err("relay (UDP)", settings.relay_listen))?;
        let tcp = TcpListener::bind(settings.publish_listen)
            .map_err(bind_err("rule stream (TCP)", settings.publish_listen))?;
        let metrics = Arc::new(Metrics::default());
        let requests = channel::unbounded::<CoreRequest>();
        let endpoint = Endpoint {
            metrics: Arc::clone(&metrics),
            requests: requests.0.clone(),
        };
        let endpoint = mimiq_metrics::serve(settings.metrics_listen, Arc::new(endpoint))
            .map_err(StartError::Metrics)?;
        let keys = settings
            .switches
            .iter()
            .map(|s| (s.id, (s.role, proto::key(&s.secret))))
            .collect();
        metrics
            .expired_while_down
            .store(core.stats().expired_while_down, Ordering::Relaxed);
        Ok(Server {
            settings,
            keys: Arc::new(keys),
            udp,
            tcp,
            endpoint,
            requests,
            core,
            store,
            metrics,
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The bound addresses.
    pub fn local_addrs(&self) -> std::io::Result<BoundAddrs> {
        Ok(BoundAddrs {
            relay: self.udp.local_addr()?,
            publish: self.tcp.local_addr()?,
            metrics: self.endpoint.local_addr(),
        })
    }

    /// Set it to stop the server (within about 10 ms).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// The counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Serves until the stop flag is set or the store fails. Runs the core loop on this thread.
    pub fn run(mut self) -> Result<(), RunError> {
        let (req_tx, req_rx) = self.requests.clone();
        self.tcp.set_nonblocking(true)?;
        let acceptor = {
            let (tcp, keys, stop, metrics, req_tx) = (
                self.tcp.try_clone()?,
                self.keys.clone(),
                self.stop.clone(),
                self.metrics.clone(),
                req_tx.clone(),
            );
            let (window, queue) = (
                self.settings.replay_window_ms,
                self.settings.subscriber_queue,
            );
            std::thread::Builder::new()
                .name("alloc-accept".into())
                .spawn(move || accept_loop(tcp, keys, stop, metrics, req_tx, window, queue))?
        };
        let result = self.core_loop(req_rx);
        self.stop.store(true, Ordering::Relaxed);
        let _ = acceptor.join();
        result
    }

    fn core_loop(&mut self, req_rx: Receiver<CoreRequest>) -> Result<(), RunError> {
        let mut bufs = vec![[0u8; MAX_DATAGRAM]; self.settings.batch_max];
        let mut batch: Vec<(usize, SocketAddr)> = Vec::with_capacity(self.settings.batch_max);
        // When each datagram of the batch arrived (for the `request` latency).
        let mut arrived: Vec<Instant> = Vec::with_capacity(self.settings.batch_max);
        let mut latencies = Latencies::open(self.settings.hlog_file.as_deref())?;
        let mut replies: Vec<(Vec<u8>, SocketAddr, Instant)> = Vec::new();
        let mut fanout = Fanout::new(self.settings.subscriber_queue);
        let mut replay: ReplayCache = HashMap::new();
        let mut next_replay_prune = 0u64;
        self.udp.set_read_timeout(Some(TICK))?;
        while !self.stop.load(Ordering::Relaxed) {
            self.metrics.turn(wall_ms());
            if let Err(e) = latencies.write_if_due() {
                tracing::warn!("hlog_file: {e}");
            }
            batch.clear();
            arrived.clear();
            match self.udp.recv_from(&mut bufs[0]) {
                Ok((n, from)) => {
                    batch.push((n, from));
                    arrived.push(Instant::now());
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                // ICMP errors of earlier sends surface here on Linux; they are not fatal.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e.into()),
            }
            if !batch.is_empty() {
                self.udp.set_nonblocking(true)?;
                while batch.len() < self.settings.batch_max {
                    match self.udp.recv_from(&mut bufs[batch.len()]) {
                        Ok((n, from)) => {
                            batch.push((n, from));
                            arrived.push(Instant::now());
                        }
                        Err(_) => break,
                    }
                }
                self.udp.set_nonblocking(false)?;
                self.udp.set_read_timeout(Some(TICK))?;
            }
            let now = wall_ms();
            if now >= next_replay_prune {
                let w = self.settings.replay_window_ms;
                // Keep an entry until its timestamp is stale (now - ts > w), never a moment
                // less, so a replay is always caught by one check or the other.
                replay.retain(|_, ts| ts.saturating_add(w) >= now);
                next_replay_prune = now + 1000;
            }
            for (i, &(n, from)) in batch.iter().enumerate() {
                if let Some(reply) = self.handle(&bufs[i][..n], now, &mut replay) {
                    replies.push((reply, from, arrived[i]));
                }
            }
            self.core.advance(now);
            // Group commit: everything this batch changed, in one durable transaction.
            let journal = self.core.take_journal();
            if !journal.is_empty() {
                let t = Instant::now();
                self.store.commit(&journal)?;
                self.metrics.commits.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .commit_ops
                    .fetch_add(journal.len() as u64, Ordering::Relaxed);
                let took = t.elapsed();
                self.metrics
                    .commit_us
                    .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
                latencies.record_commit(took);
            }
            // Publish before answering, so switches learn a binding before its client uses it.
            let updates = self.core.take_updates();
            self.metrics
                .rule_updates
                .fetch_add(updates.len() as u64, Ordering::Relaxed);
            fanout.publish(updates);
            // Gauges before replies, so a client that saw its reply sees the metrics after it.
            self.metrics
                .subscribers_dropped
                .store(fanout.dropped(), Ordering::Relaxed);
            self.export_gauges(fanout.len());
            for (bytes, to, arrived) in replies.drain(..) {
                // A failed send (e.g. the switch vanished) loses one reply; the client retries.
                let _ = self.udp.send_to(&bytes, to);
                latencies.record_request(arrived.elapsed());
            }
            while let Ok(req) = req_rx.try_recv() {
                match req {
                    CoreRequest::Subscribe { switch_id, tx } => {
                        tracing::info!(
                            switch_id,
                            "rule-stream subscriber connected; sending snapshot"
                        );
                        fanout.attach(&self.core, tx);
                    }
                    CoreRequest::Leases(tx) => {
                        let mut rows: Vec<(Lease, LeaseState)> = self.core.leases().collect();
                        rows.sort_by_key(|(l, _)| l.ip);
                        let mut s = String::new();
                        for (l, st) in rows {
                            s.push_str(&format_lease(&l, st));
                            s.push('\n');
                        }
                        let _ = tx.send(s);
                    }
                }
            }
            self.metrics
                .subscribers
                .store(fanout.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Handles one datagram; returns the reply to send, if any.
    fn handle(&mut self, buf: &[u8], now: u64, replay: &mut ReplayCache) -> Option<Vec<u8>> {
        let keys = &self.keys;
        let relay = match Relay::parse(buf, |sid| {
            keys.get(&sid)
                .filter(|(r, _)| *r == Role::Access)
                .map(|(_, k)| k)
        }) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.count_drop(e.into());
                return None;
            }
        };
        if relay.timestamp_ms.abs_diff(now) > self.settings.replay_window_ms {
            self.metrics.count_drop(DropReason::Stale);
            return None;
        }
        let id = (
            relay.info.sid,
            relay.info.mac.0,
            relay.txid,
            relay.timestamp_ms,
        );
        if replay.insert(id, relay.timestamp_ms).is_some() {
            self.metrics.count_drop(DropReason::Replay);
            return None;
        }
        let inner_reply = match ClientMsg::parse(relay.inner) {
            Ok((_, ClientMsg::AllocRequest(req))) => {
                let res = self.core.allocate(
                    now,
                    AllocParams {
                        mac: relay.info.mac,
                        sid: relay.info.sid,
                        port: relay.info.ingress_port,
                        family: req.family,
                        count: u32::from(req.count),
                    },
                );
                let (gateway, prefix_len) = match req.family {
                    Family::V4 => self.settings.v4_gateway,
                    Family::V6 => self.settings.v6_gateway,
                }
                .unwrap_or((
                    match req.family {
                        Family::V4 => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                        Family::V6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                    },
                    0,
                ));
                let (status, addrs) = match res {
                    Ok(grants) => {
                        let fam = usize::from(req.family == Family::V6);
                        self.metrics.allocations[fam]
                            .fetch_add(grants.len() as u64, Ordering::Relaxed);
                        let addrs = grants
                            .iter()
                            .map(|g| (g.ip, u32::try_from(g.lifetime_ms).unwrap_or(u32::MAX)))
                            .collect();
                        (Status::Ok, addrs)
                    }
                    Err(e) => (status_of(e), Vec::new()),
                };
                ClientMsg::AllocReply(AllocReply {
                    status,
                    family: req.family,
                    prefix_len,
                    nonce: req.nonce,
                    gateway,
                    addrs,
                })
            }
            Ok((_, ClientMsg::Release(rel))) => {
                let n = self.core.release(now, relay.info.mac, &rel.addrs);
                ClientMsg::ReleaseReply(ReleaseReply {
                    status: Status::Ok,
                    released: n as u8,
                })
            }
            Ok((_, ClientMsg::Seen(seen))) => {
                self.metrics.seen_reports.fetch_add(1, Ordering::Relaxed);
                let n = self.core.seen(now, relay.info.sid, &seen.addrs);
                ClientMsg::ReleaseReply(ReleaseReply {
                    status: Status::Ok,
                    released: n as u8, // at most the 255 addresses of a message
                })
            }
            // Authentic relay, malformed or unexpected client message: say so (no state).
            Ok(_) | Err(_) => ClientMsg::ReleaseReply(ReleaseReply {
                status: Status::BadRequest,
                released: 0,
            }),
        };
        let status = match &inner_reply {
            ClientMsg::AllocReply(r) => r.status,
            ClientMsg::ReleaseReply(r) => r.status,
            _ => Status::BadRequest,
        };
        if let Some(i) = STATUSES.iter().position(|s| *s == status) {
            self.metrics.replies[i].fetch_add(1, Ordering::Relaxed);
        }
        let mut inner = Vec::new();
        // Emit cannot fail: at most 255 grants (max_per_request <= 255) of the request's family.
        inner_reply.emit(relay.txid, &mut inner).ok()?;
        let key = &self.keys.get(&relay.info.sid)?.1;
        let mut out = Vec::new();
        RelayReply {
            txid: relay.txid,
            info: relay.info,
            inner: &inner,
        }
        .emit(key, &mut out)
        .ok()?;
        Some(out)
    }

    fn export_gauges(&self, subscribers: usize) {
        let st = self.core.stats();
        let m = &self.metrics;
        m.releases.store(st.releases, Ordering::Relaxed);
        m.expiries.store(st.expiries, Ordering::Relaxed);
        m.freed.store(st.freed, Ordering::Relaxed);
        m.refused_port_rate
            .store(st.refused_port_rate, Ordering::Relaxed);
        m.refused_port_cap
            .store(st.refused_port_cap, Ordering::Relaxed);
        m.reclaimed_silent
            .store(st.reclaimed_silent, Ordering::Relaxed);
        m.leases
            .store(self.core.lease_count() as u64, Ordering::Relaxed);
        if let Some(p) = self.core.v4_pool() {
            m.pool_size_v4.store(p.capacity(), Ordering::Relaxed);
            m.pool_in_use_v4.store(p.in_use(), Ordering::Relaxed);
        }
        if let Some(p) = self.core.v6_pool() {
            m.pool_in_use_v6.store(p.in_use(), Ordering::Relaxed);
        }
        m.subscribers.store(subscribers as u64, Ordering::Relaxed);
        m.seq.store(self.core.seq(), Ordering::Relaxed);
    }
}

fn status_of(e: AllocError) -> Status {
    match e {
        AllocError::BadCount(_)
        | AllocError::FamilyNotConfigured(_)
        | AllocError::UnknownSid(_) => Status::BadRequest,
        AllocError::RateLimited => Status::RateLimited,
        AllocError::ClientCap { .. } => Status::ClientCap,
        // For the port's clients, its share of the pool is exhausted.
        AllocError::PoolExhausted | AllocError::PortCap { .. } => Status::PoolExhausted,
        AllocError::PortRateLimited => Status::RateLimited,
    }
}

fn accept_loop(
    tcp: TcpListener,
    keys: Arc<HashMap<u16, (Role, hmac::Key)>>,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    req_tx: Sender<CoreRequest>,
    window_ms: u64,
    queue: usize,
) {
    // Each connection costs a thread until it authenticates (or for good, if it does): cap them
    // well above what the configured switches need, so stray connections cannot exhaust threads.
    let max_conns = keys.len() * 4 + 16;
    let live = Arc::new(AtomicU64::new(0));
    while !stop.load(Ordering::Relaxed) {
        match tcp.accept() {
            Ok((stream, _)) => {
                if live.load(Ordering::Relaxed) >= max_conns as u64 {
                    metrics.count_drop(DropReason::TooManyConnections);
                    continue;
                }
                live.fetch_add(1, Ordering::Relaxed);
                let (keys, stop, metrics, req_tx, done) = (
                    keys.clone(),
                    stop.clone(),
                    metrics.clone(),
                    req_tx.clone(),
                    live.clone(),
                );
                let spawned =
                    std::thread::Builder::new()
                        .name("alloc-sub".into())
                        .spawn(move || {
                            subscriber(stream, keys, stop, metrics, req_tx, window_ms, queue);
                            done.fetch_sub(1, Ordering::Relaxed);
                        });
                if spawned.is_err() {
                    // Out of threads: the connection closes; the switch retries later.
                    live.fetch_sub(1, Ordering::Relaxed);
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn subscriber(
    mut stream: TcpStream,
    keys: Arc<HashMap<u16, (Role, hmac::Key)>>,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    req_tx: Sender<CoreRequest>,
    window_ms: u64,
    queue: usize,
) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(HELLO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    let hello = match proto::read_frame(&mut stream, &mut buf) {
        Ok(true) => StreamMsg::parse(&buf, |id| keys.get(&id).map(|(_, k)| k)),
        _ => Err(ParseError::Truncated),
    };
    let switch_id = match hello {
        Ok(StreamMsg::Hello {
            switch_id,
            timestamp_ms,
        }) if timestamp_ms.abs_diff(wall_ms()) <= window_ms => switch_id,
        Ok(StreamMsg::Hello { .. }) => {
            metrics.count_drop(DropReason::Stale);
            return;
        }
        Ok(_) | Err(_) => {
            metrics.count_drop(DropReason::BadHello);
            return;
        }
    };
    let Some((_, key)) = keys.get(&switch_id) else {
        return;
    };
    let (tx, rx) = channel::bounded(queue);
    if req_tx
        .send(CoreRequest::Subscribe { switch_id, tx })
        .is_err()
    {
        return;
    }
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(batch) => {
                out.clear();
                for u in batch.iter() {
                    if StreamMsg::Update(u.clone())
                        .emit_frame(key, &mut out)
                        .is_err()
                    {
                        return;
                    }
                }
                if stream.write_all(&out).is_err() {
                    return;
                }
            }
            Err(channel::RecvTimeoutError::Timeout) => {}
            Err(channel::RecvTimeoutError::Disconnected) => return,
        }
    }
}
