//! Tunnel mode (seed 000 §3.1 with seed 004): the agent is the CONNECT-IP client, all
//! host traffic routed into its TUN device goes through one QUIC connection to the MASQUE proxy,
//! and that connection hops between the agent's addresses as its [`HopStrategy`] says.
//!
//! The MASQUE client ([`mimiq_masque::client`]) does the hops (a new socket on the address,
//! `probe_path`, `migrate` once the probe is answered, and both ends forget the path left);
//! [`TunnelHops`] is its [`HopPolicy`]: it counts the QUIC datagrams sent, asks the connection's
//! [`ConnectionHopper`] where the next one should leave from, and keeps the [`AddressSet`]
//! supplied — from a fixed list of addresses already on the host ([`AddressSource::Static`]), or
//! from the allocator through the access switch's relay ([`AddressSource::Allocator`]), with the
//! addresses put on the host interface over netlink ([`HostAddresses`]) and released on exit.
//!
//! Threading: everything runs on the caller's thread (the MASQUE client's event loop); the
//! policy's state is shared with [`run`] through an `Rc<RefCell<_>>` so that `run` can release
//! the addresses and report once the client returns. Nothing here panics on input: a bad config
//! is a [`TunnelError`], a failed hop is counted and logged and the connection stays where it was.

use std::cell::RefCell;
use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mimiq_masque::capsule::IpPrefix;
use mimiq_masque::client::hop::{HopOutcome, HopPolicy};
use mimiq_masque::client::{
    run_reconnecting, Client, ClientConfig, ClientError, ClientStats, Mode, Reconnect,
};
use mimiq_masque::netcfg::Route;
use mimiq_masque::quic::QuicSettings;
use mimiq_masque::template::IpScope;
use serde::{Deserialize, Serialize};

use crate::addr::{host_prefix_len, HostAddresses};
use crate::addrset::AddressSet;
use crate::alloc_client::{AllocClientConfig, AllocDriver, AllocEvent};
use crate::config::AgentConfig;
use crate::hopper::{ConnectionHopper, HopStats, PacketAction};
use crate::metrics::AgentMetrics;
use crate::rng::{HopRng, Seed, ADDRESS_STREAM, IDLE_STREAM};
use crate::strategy::HopStrategy;
use hdrhistogram::Histogram;
use mimiq_metrics::hlog::{duration_histogram, DumpTimer, IntervalLog};

/// While the connection sends nothing, how often the agent checks that its address is still on
/// the host.
const PRESENCE_CHECK: Duration = Duration::from_millis(100);

/// The `[tunnel]` table: where the proxy is and how the tunnel looks on the host.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    /// The proxy's UDP address.
    pub proxy: SocketAddr,
    /// TLS server name and `:authority`. Default "proxy".
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// TUN device name. Default "mqagent0".
    #[serde(default = "default_tun")]
    pub tun: String,
    /// Bearer token for `proxy-authorization`; none by default.
    #[serde(default)]
    pub token: Option<String>,
    /// CA file to verify the proxy with; without it the proxy is not verified (test setups).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Prefixes routed into the tunnel ("198.18.20.0/24", "fd00:20::/64"); absent: the ranges
    /// the proxy advertises (minus the proxy's own address).
    #[serde(default)]
    pub routes: Option<Vec<String>>,
    /// Largest UDP payload sent, bytes (≥ 1350). Default 1452.
    #[serde(default = "default_payload")]
    pub max_udp_payload_bytes: usize,
    /// Give up when the tunnel is not up within this long, milliseconds. Default 10,000.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// The connection's idle timeout, milliseconds: a proxy that is gone is noticed after it
    /// (a keep-alive goes every third of it). Default 30,000.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_ms: u64,
    /// Pad every QUIC packet the agent sends to a multiple of this many bytes (as the proxy's
    /// `quic.pad_to_bytes`; docs/PRIVACY.md); 0, the default: no padding.
    #[serde(default)]
    pub pad_to_bytes: usize,
    /// Before each hop, stay quiet (send nothing) for a random time drawn uniformly from
    /// 0..=this many milliseconds, so that the new address does not appear just as the old one
    /// goes quiet (docs/PRIVACY.md); at most 10,000. 0, the default: no idle.
    #[serde(default)]
    pub hop_idle_max_ms: u64,
    /// When the tunnel is lost: new connections tried (each from a fresh address, keeping the
    /// TUN device and asking the proxy for the tunnel's addresses again, RFC 9484 §4.7.2)
    /// before the agent gives up; 0: it exits at once. Default 10.
    #[serde(default = "default_reconnect_attempts")]
    pub reconnect_attempts: u32,
    /// The wait before the first of them, milliseconds; doubled after each failed one, up to
    /// `reconnect_backoff_max_ms`. Defaults 200 and 5,000.
    #[serde(default = "default_reconnect_backoff_initial")]
    pub reconnect_backoff_initial_ms: u64,
    /// The longest wait between two attempts, milliseconds.
    #[serde(default = "default_reconnect_backoff_max")]
    pub reconnect_backoff_max_ms: u64,
    /// Counters as JSON ([`TunnelReport`]), rewritten every `stats_interval_ms` while the
    /// tunnel is up and at exit; none by default.
    #[serde(default)]
    pub stats_file: Option<PathBuf>,
    /// Serve the counters (Prometheus text at `/metrics`) and `/healthz` over HTTP here, renewed
    /// every `stats_interval_ms`; none by default.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// How often `stats_file` is rewritten, milliseconds (≥ 10). Default 1,000.
    #[serde(default = "default_stats_interval")]
    pub stats_interval_ms: u64,
    /// An HdrHistogram interval log (ns): tag `hop` (a hop's probe sent to the path validated)
    /// and tag `allocation` (an allocation request to its reply), an interval every
    /// `stats_interval_ms` and one at once on SIGUSR1; none by default.
    #[serde(default)]
    pub hlog_file: Option<PathBuf>,
    /// One line per hop (`time_ms,outcome,from,to,latency_us`); none by default.
    #[serde(default)]
    pub hop_log: Option<PathBuf>,
    /// One line per address event (`unix_ms,event,address,expires_unix_ms`; events
    /// `allocated`, `removed`, `released`), so a capture can be checked against the
    /// addresses' lifetimes; none by default.
    #[serde(default)]
    pub address_log: Option<PathBuf>,
    /// Directory for the connection's qlog (`client-<connection ID>.sqlog`, created if
    /// missing), to read a failed hop afterwards; none by default.
    #[serde(default)]
    pub qlog_dir: Option<PathBuf>,
    /// File the connection's TLS secrets are appended to (NSS key log format, for Wireshark);
    /// the `SSLKEYLOGFILE` environment variable does the same. None by default.
    #[serde(default)]
    pub keylog_file: Option<PathBuf>,
}

fn default_server_name() -> String {
    "proxy".into()
}
fn default_tun() -> String {
    "mqagent0".into()
}
fn default_payload() -> usize {
    1452
}
fn default_connect_timeout() -> u64 {
    10_000
}
fn default_idle_timeout() -> u64 {
    QuicSettings::default().idle_timeout_ms
}
fn default_reconnect_attempts() -> u32 {
    Reconnect::default().attempts
}
fn default_reconnect_backoff_initial() -> u64 {
    Reconnect::default().backoff_initial.as_millis() as u64
}
fn default_reconnect_backoff_max() -> u64 {
    Reconnect::default().backoff_max.as_millis() as u64
}
/// `[source] gateway`, with an error that says what is expected (serde's names neither the
/// field nor the form inside the tagged `[source]` table).
fn gateway_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "source.gateway = {text:?}: expected address:port, e.g. \"198.18.1.1:6363\" or \"[fe80::1]:6363\" (a link-local address takes its scope from `interface`)"
        ))
    })
}

fn default_stats_interval() -> u64 {
    1_000
}
fn default_true() -> bool {
    true
}

/// The `[source]` table: where the agent's addresses come from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AddressSource {
    /// Addresses already on the host, used for as long as the agent runs.
    Static {
        /// The addresses (at least one; all of the proxy's family).
        addresses: Vec<IpAddr>,
    },
    /// Address sets from the allocator, through the access switch's relay.
    Allocator {
        /// The gateway's relay address (the access switch, UDP port 6363). A link-local IPv6
        /// address without a scope (`"[fe80::1]:6363"`) is taken on `interface`.
        #[serde(deserialize_with = "gateway_addr")]
        gateway: SocketAddr,
        /// The host interface the addresses go on.
        interface: String,
        /// Route the proxy through the gateway the allocator names (a host route on
        /// `interface`, removed on exit), as a DHCP client installs its router. Default true.
        #[serde(default = "default_true")]
        route_proxy: bool,
        /// The family of the addresses asked for: "v4" or "v6".
        family: FamilyName,
        /// How long to wait for the first allocation, milliseconds. Default 10,000.
        #[serde(default = "default_connect_timeout")]
        first_allocation_timeout_ms: u64,
        /// The allocator client's timers.
        #[serde(default)]
        client: AllocClientConfig,
    },
}

/// An address family in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FamilyName {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// Why the tunnel could not run. Each message is one line.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The config has no `[tunnel]` or `[source]` table, or a value there is impossible.
    #[error("config: {0}")]
    Config(String),
    /// No address to start from (the allocator did not answer in time, or the list is empty).
    #[error("no address: {0}")]
    NoAddress(String),
    /// The host interface could not be managed.
    #[error("interface: {0}")]
    Interface(String),
    /// The MASQUE client failed.
    #[error("{0}")]
    Client(#[from] mimiq_masque::client::ClientError),
}

/// What the agent did, written to `stats_file` and returned by [`run`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct TunnelReport {
    /// The tunnel's own counters (datagrams, bytes, hops started/done/failed/deferred).
    pub client: ClientStats,
    /// QUIC datagrams the hop strategy counted.
    pub datagrams_counted: u64,
    /// Hops the strategy wanted but no other usable address was there.
    pub hops_without_address: u64,
    /// Distinct local addresses the connection sent from.
    pub addresses_used: u64,
    /// Addresses received from the allocator (0 for a static source).
    pub addresses_allocated: u64,
    /// Allocations that failed (unreachable, pool exhausted, bad reply).
    pub allocation_failures: u64,
    /// Addresses the allocator acknowledged as released on exit.
    pub addresses_released: u64,
    /// Addresses on the host interface now (allocator source) or held (static source).
    pub addresses_in_use: u64,
    /// Hop latency (request to switch), microseconds: median and largest.
    pub hop_latency_p50_us: u64,
    /// Largest hop latency, microseconds.
    pub hop_latency_max_us: u64,
}

/// Validates the tunnel part of `config` without touching the host (for `mimiq-agent check`).
pub fn check(config: &AgentConfig) -> Result<(), TunnelError> {
    let (tunnel, source) = parts(config)?;
    routes(tunnel)?;
    match source {
        AddressSource::Static { addresses } => {
            if addresses.is_empty() {
                return Err(TunnelError::Config("source.addresses: empty".into()));
            }
            if let Some(a) = addresses
                .iter()
                .find(|a| a.is_ipv4() != tunnel.proxy.is_ipv4())
            {
                return Err(TunnelError::Config(format!(
                    "source.addresses: {a} cannot reach the proxy at {} (address family)",
                    tunnel.proxy
                )));
            }
        }
        AddressSource::Allocator { family, .. } => {
            if (*family == FamilyName::V4) != tunnel.proxy.is_ipv4() {
                return Err(TunnelError::Config(format!(
                    "source.family: {family:?} addresses cannot reach the proxy at {} (address family)",
                    tunnel.proxy
                )));
            }
        }
    }
    if !mimiq_masque::netcfg::is_interface_name(&tunnel.tun) {
        return Err(TunnelError::Config(format!(
            "tunnel.tun = {:?}: not an interface name (1 to 15 bytes, no '/', ':' or whitespace)",
            tunnel.tun
        )));
    }
    if tunnel.reconnect_backoff_initial_ms == 0
        || tunnel.reconnect_backoff_max_ms < tunnel.reconnect_backoff_initial_ms
    {
        return Err(TunnelError::Config(format!(
            "tunnel.reconnect_backoff_initial_ms = {} and reconnect_backoff_max_ms = {}: need 0 < initial <= max",
            tunnel.reconnect_backoff_initial_ms, tunnel.reconnect_backoff_max_ms
        )));
    }
    if tunnel.hop_idle_max_ms > MAX_HOP_IDLE_MS {
        return Err(TunnelError::Config(format!(
            "tunnel.hop_idle_max_ms: {} is above {MAX_HOP_IDLE_MS}",
            tunnel.hop_idle_max_ms
        )));
    }
    if tunnel.stats_interval_ms < 10 {
        return Err(TunnelError::Config(format!(
            "tunnel.stats_interval_ms: {} is below 10",
            tunnel.stats_interval_ms
        )));
    }
    let quic = quic_settings(tunnel);
    quic.validate().map_err(TunnelError::Config)?;
    Ok(())
}

/// The longest idle before a hop that `tunnel.hop_idle_max_ms` may ask for.
const MAX_HOP_IDLE_MS: u64 = 10_000;

/// Runs the tunnel until `stop` is set or the connection ends; `on_ready` gets the tunnel's
/// counters once it carries traffic. Releases allocated addresses on the way out.
pub fn run(
    config: &AgentConfig,
    seed: Seed,
    stop: &AtomicBool,
    on_ready: impl FnMut(&ClientStats),
) -> Result<TunnelReport, TunnelError> {
    check(config)?;
    let (tunnel, source) = parts(config)?;
    let epoch = Instant::now();
    let set = AddressSet::new(config.addresses.clone(), seed.derive(ADDRESS_STREAM))
        .map_err(|e| TunnelError::Config(e.to_string()))?;
    let strategy = HopStrategy::for_connection(&config.hop, seed, 0)
        .map_err(|e| TunnelError::Config(e.to_string()))?;
    let metrics = Arc::new(AgentMetrics::new(Duration::from_millis(
        tunnel.stats_interval_ms,
    )));
    let _endpoint = match tunnel.metrics_listen {
        Some(addr) => Some(
            mimiq_metrics::serve(addr, Arc::clone(&metrics) as _).map_err(TunnelError::Config)?,
        ),
        None => None,
    };
    let mut state = TunnelState {
        set,
        hopper: ConnectionHopper::new(0, strategy),
        alloc: None,
        host: None,
        epoch,
        used: Vec::new(),
        latencies_us: Vec::new(),
        report: TunnelReport::default(),
        client: ClientStats::default(),
        hop_log: create_log(&tunnel.hop_log, "hop_log")?,
        hlog: match &tunnel.hlog_file {
            Some(path) => Some(Latencies::create(
                path,
                Duration::from_millis(tunnel.stats_interval_ms),
            )?),
            None => {
                // SIGUSR1 asks for a dump; without a log it must not end the agent.
                DumpTimer::new(Duration::MAX).map_err(|e| TunnelError::Config(e.to_string()))?;
                None
            }
        },
        address_log: create_log(&tunnel.address_log, "address_log")?,
        stats_file: tunnel.stats_file.clone(),
        metrics: tunnel.metrics_listen.map(|_| metrics),
        stats_every: Duration::from_millis(tunnel.stats_interval_ms),
        next_stats: epoch,
        route_proxy: None,
        presence_checked: None,
        hop_idle: (tunnel.hop_idle_max_ms > 0).then(|| {
            (
                HopRng::new(seed.derive(IDLE_STREAM)),
                tunnel.hop_idle_max_ms,
            )
        }),
        routes: Vec::new(),
    };
    match source {
        AddressSource::Static { addresses } => {
            // Held for as long as the agent runs (a century, in the set's milliseconds).
            let forever = Duration::from_secs(100 * 365 * 24 * 3600);
            let list: Vec<(IpAddr, Duration)> = addresses.iter().map(|&a| (a, forever)).collect();
            state.set.add_allocation(0, &list);
        }
        AddressSource::Allocator {
            gateway,
            interface,
            route_proxy,
            family,
            first_allocation_timeout_ms,
            client,
        } => {
            let family = match family {
                FamilyName::V4 => mimiq_allocator::Family::V4,
                FamilyName::V6 => mimiq_allocator::Family::V6,
            };
            let host = HostAddresses::open(interface)
                .map_err(|e| TunnelError::Interface(format!("{interface}: {e}")))?;
            let mut gateway = *gateway;
            if let SocketAddr::V6(g) = &mut gateway {
                // fe80::/10 needs a scope; the relay is on the interface the addresses go on.
                if g.scope_id() == 0 && (g.ip().segments()[0] & 0xffc0) == 0xfe80 {
                    g.set_scope_id(host.backend().link().index());
                }
            }
            let driver = AllocDriver::new(gateway, family, client.clone())
                .map_err(|e| TunnelError::NoAddress(e.to_string()))?;
            state.alloc = Some(driver);
            state.host = Some(host);
            if *route_proxy {
                state.route_proxy = Some(tunnel.proxy.ip());
            }
            let deadline = Instant::now() + Duration::from_millis(*first_allocation_timeout_ms);
            while state.set.usable_count(state.now_ms(Instant::now())) == 0 {
                if Instant::now() > deadline {
                    let c = state.alloc.as_ref().map(|a| a.counters());
                    state.release();
                    return Err(TunnelError::NoAddress(format!(
                        "no allocation from {gateway} within {first_allocation_timeout_ms} ms ({c:?})"
                    )));
                }
                state.housekeeping(Instant::now());
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    let now_ms = state.now_ms(Instant::now());
    let mut first = match state.hopper.on_packet(&mut state.set, now_ms) {
        PacketAction::Migrate { to, .. } => to,
        PacketAction::Send { from } => from,
        PacketAction::NoAddress => {
            state.release();
            return Err(TunnelError::NoAddress(
                "the address set holds no usable address".into(),
            ));
        }
    };
    state.used.push(first);
    let client_cfg = ClientConfig {
        proxy: tunnel.proxy,
        server_name: tunnel.server_name.clone(),
        bind: vec![first],
        token: tunnel.token.clone(),
        ca: tunnel.ca.clone(),
        quic: quic_settings(tunnel),
        hop_every: None,
        connect_timeout: Duration::from_millis(tunnel.connect_timeout_ms),
        template: None,
    };
    let scope = IpScope::ANY;
    let mode = Mode::Ip {
        scope,
        tun: tunnel.tun.clone(),
        routes: routes(tunnel)?,
    };
    let reconnect = Reconnect {
        attempts: tunnel.reconnect_attempts,
        backoff_initial: Duration::from_millis(tunnel.reconnect_backoff_initial_ms),
        backoff_max: Duration::from_millis(tunnel.reconnect_backoff_max_ms),
    };
    let state = Rc::new(RefCell::new(state));
    let mut connections = 0u32;
    let result = run_reconnecting(
        reconnect,
        stop,
        || {
            connections += 1;
            if connections > 1 {
                // A new connection starts from a fresh address.
                first = state.borrow_mut().fresh_address()?;
            }
            let cfg = ClientConfig {
                bind: vec![first],
                ..client_cfg.clone()
            };
            let policy = TunnelHops(Rc::clone(&state));
            Client::with_policy(cfg, mode.clone(), Box::new(policy))
        },
        on_ready,
    );
    let mut state = state.borrow_mut();
    state.release();
    state.client = result?;
    let report = state.snapshot();
    state.write_stats(&report);
    if let Some(Err(e)) = state.hlog.as_mut().map(Latencies::write) {
        tracing::warn!("hlog_file: {e}");
    }
    Ok(report)
}

/// The agent's `.hlog`: hop and allocation latencies of the interval so far.
struct Latencies {
    log: IntervalLog,
    timer: DumpTimer,
    hop: Histogram<u64>,
    allocation: Histogram<u64>,
}

impl Latencies {
    fn create(path: &std::path::Path, every: Duration) -> Result<Latencies, TunnelError> {
        let fail =
            |e: std::io::Error| TunnelError::Config(format!("hlog_file {}: {e}", path.display()));
        Ok(Latencies {
            log: IntervalLog::create(
                path,
                "mimiq-agent latency, ns: hop = probe sent to path validated, allocation = request to reply",
            )
            .map_err(fail)?,
            timer: DumpTimer::new(every).map_err(fail)?,
            hop: duration_histogram(),
            allocation: duration_histogram(),
        })
    }

    /// Appends the interval when it is due (or SIGUSR1 asked), and starts the next.
    fn write_if_due(&mut self) -> std::io::Result<()> {
        if !self.timer.due() {
            return Ok(());
        }
        self.write()
    }

    fn write(&mut self) -> std::io::Result<()> {
        self.log
            .write(&[("hop", &self.hop), ("allocation", &self.allocation)])?;
        self.hop.reset();
        self.allocation.reset();
        Ok(())
    }
}

fn create_log(path: &Option<PathBuf>, what: &str) -> Result<Option<File>, TunnelError> {
    match path {
        Some(p) => File::create(p)
            .map(Some)
            .map_err(|e| TunnelError::Config(format!("{what} {}: {e}", p.display()))),
        None => Ok(None),
    }
}

/// Milliseconds since the Unix epoch (the address log's clock, comparable with a capture's).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The MASQUE client's hop policy in tunnel mode (see the module docs).
pub struct TunnelHops(Rc<RefCell<TunnelState>>);

/// What [`TunnelHops`] and [`run`] share.
pub struct TunnelState {
    set: AddressSet,
    hopper: ConnectionHopper,
    alloc: Option<AllocDriver>,
    host: Option<HostAddresses>,
    epoch: Instant,
    used: Vec<IpAddr>,
    latencies_us: Vec<u64>,
    report: TunnelReport,
    /// The client's counters, as last published.
    client: ClientStats,
    hop_log: Option<File>,
    /// The latency log (`hlog_file`).
    hlog: Option<Latencies>,
    address_log: Option<File>,
    stats_file: Option<PathBuf>,
    /// What the metrics endpoint serves (`metrics_listen`).
    metrics: Option<Arc<AgentMetrics>>,
    stats_every: Duration,
    next_stats: Instant,
    /// The proxy, to be routed through the allocator's gateway (allocator source only).
    route_proxy: Option<IpAddr>,
    /// When the connection's address was last checked to be on the host (while idle).
    presence_checked: Option<Instant>,
    /// The idle before each hop: its random stream and its maximum, ms (`hop_idle_max_ms`).
    hop_idle: Option<(HopRng, u64)>,
    /// The routes put on the host interface, taken off on exit.
    routes: Vec<Route>,
}

impl HopPolicy for TunnelHops {
    fn poll_hop(&mut self, now: Instant, current: IpAddr, sent: u64) -> Option<IpAddr> {
        let mut guard = self.0.borrow_mut();
        let s = &mut *guard;
        let now_ms = s.now_ms(now);
        s.report.datagrams_counted += sent;
        // After a failed hop the set still believes the connection moved: it is on `current`.
        let conn = s.hopper.connection();
        if s.set.connection_address(conn, now_ms) != Some(current) {
            s.set.set_connection_address(conn, current);
        }
        // While nothing is sent, no datagram counts toward a hop; if the address left the host
        // meanwhile (an operator removed it) nothing will be: leave it.
        if sent == 0 && s.left_host(now, current) {
            tracing::warn!("{current} left the host; the connection moves");
            return s.hopper.leave(&mut s.set, current, now_ms);
        }
        // One decision per datagram sent since the last pass; the first hop asked for wins
        // (the client probes it while the datagrams keep leaving from `current`).
        for _ in 0..sent {
            match s.hopper.on_packet(&mut s.set, now_ms) {
                PacketAction::Migrate { to, .. } if to != current => return Some(to),
                _ => {}
            }
        }
        None
    }

    fn idle_before_hop(&mut self) -> Duration {
        let mut s = self.0.borrow_mut();
        match s.hop_idle.as_mut() {
            Some((rng, max_ms)) => Duration::from_millis(rng.range_inclusive(0, *max_ms)),
            None => Duration::ZERO,
        }
    }

    fn on_hop(&mut self, outcome: HopOutcome, now: Instant) {
        let mut s = self.0.borrow_mut();
        let t = s.now_ms(now);
        let line = match outcome {
            HopOutcome::Done { from, to, latency } => {
                let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                if s.latencies_us.len() < 1_000_000 {
                    s.latencies_us.push(us);
                }
                if let Some(h) = s.hlog.as_mut() {
                    h.hop.saturating_record(latency.as_nanos() as u64);
                }
                if !s.used.contains(&to) {
                    s.used.push(to);
                }
                format!("{t},done,{from},{to},{us}\n")
            }
            HopOutcome::Failed { to } => {
                tracing::info!("hop to {to} failed; the connection stays where it was");
                format!("{t},failed,,{to},\n")
            }
        };
        if let Some(f) = s.hop_log.as_mut() {
            let _ = f.write_all(line.as_bytes());
        }
    }

    fn poll(&mut self, now: Instant) -> Option<Duration> {
        self.0.borrow_mut().housekeeping(now)
    }

    fn on_stats(&mut self, stats: &ClientStats, now: Instant) {
        let mut s = self.0.borrow_mut();
        if (s.stats_file.is_none() && s.metrics.is_none()) || now < s.next_stats {
            return;
        }
        s.next_stats = now + s.stats_every;
        s.client = stats.clone();
        let report = s.snapshot();
        s.write_stats(&report);
    }
}

impl TunnelState {
    /// Whether `addr` is gone from the host: a socket can no longer be bound to it (checked at
    /// most every [`PRESENCE_CHECK`]).
    fn left_host(&mut self, now: Instant, addr: IpAddr) -> bool {
        if self
            .presence_checked
            .is_some_and(|t| now.saturating_duration_since(t) < PRESENCE_CHECK)
        {
            return false;
        }
        self.presence_checked = Some(now);
        matches!(
            std::net::UdpSocket::bind(SocketAddr::new(addr, 0)),
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
        )
    }

    fn now_ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// Allocator replies and requests, expired addresses off the host; when to come back.
    /// An address for a new connection of the tunnel, not the one the last was on when the
    /// set has another.
    fn fresh_address(&mut self) -> Result<IpAddr, ClientError> {
        let now = Instant::now();
        self.housekeeping(now);
        let now_ms = self.now_ms(now);
        let addr = self.set.assign_connection(0, now_ms).map_err(|e| {
            ClientError::Connection(format!("no usable address for a new connection: {e:?}"))
        })?;
        self.used.push(addr);
        Ok(addr)
    }

    fn housekeeping(&mut self, now: Instant) -> Option<Duration> {
        let now_ms = self.now_ms(now);
        if let Some(h) = self.hlog.as_mut() {
            if let Err(e) = h.write_if_due() {
                tracing::warn!("hlog_file: {e}");
            }
        }
        if let Some(alloc) = self.alloc.as_mut() {
            for ev in alloc.poll(now_ms, &mut self.set) {
                match ev {
                    AllocEvent::Allocated {
                        addrs,
                        gateway,
                        requested_ms,
                        round_trip,
                        ..
                    } => {
                        self.report.addresses_allocated += addrs.len() as u64;
                        if let (Some(h), Some(rtt)) = (self.hlog.as_mut(), round_trip) {
                            h.allocation.saturating_record(rtt.as_nanos() as u64);
                        }
                        tracing::info!("allocated {} addresses", addrs.len());
                        let now_unix = unix_ms();
                        // Lifetimes count from the request (AllocEvent::Allocated).
                        let requested_unix =
                            now_unix.saturating_sub(now_ms.saturating_sub(requested_ms));
                        for (a, life) in &addrs {
                            let until = requested_unix.saturating_add(
                                u64::try_from(life.as_millis()).unwrap_or(u64::MAX),
                            );
                            self.log_address(&format!("{now_unix},allocated,{a},{until}\n"));
                        }
                        self.install_routes(gateway);
                    }
                    AllocEvent::Failed { error, retry_at_ms } => {
                        self.report.allocation_failures += 1;
                        tracing::warn!(
                            "allocation failed: {error}; next attempt at {retry_at_ms} ms"
                        );
                    }
                    AllocEvent::Releasing { addrs } => {
                        let now_unix = unix_ms();
                        for a in addrs {
                            self.log_address(&format!("{now_unix},released,{a},\n"));
                        }
                    }
                    AllocEvent::Released { .. } => {}
                }
            }
        }
        if let Some(host) = self.host.as_mut() {
            let report = host.sync(now_ms, &mut self.set);
            if !report.errors.is_empty() {
                tracing::warn!("host addresses: {:?}", report.errors);
            }
            self.log_removed(&report.removed);
        }
        let next = [
            self.set.next_timeout_ms(now_ms),
            self.alloc.as_ref().and_then(|a| a.next_timeout_ms()),
        ]
        .into_iter()
        .flatten()
        .min()?;
        Some(Duration::from_millis(next.saturating_sub(now_ms)))
    }

    /// Gives allocated addresses back and takes them off the host.
    fn release(&mut self) {
        let now_ms = self.now_ms(Instant::now());
        if let Some(alloc) = self.alloc.as_mut() {
            match alloc.release_all(now_ms, &mut self.set) {
                Ok(n) => self.report.addresses_released += n as u64,
                Err(e) => tracing::warn!("release: {e}"),
            }
        }
        if let Some(host) = self.host.as_mut() {
            for r in std::mem::take(&mut self.routes) {
                if let Err(e) = host.backend().net().delete_route(host.backend().link(), &r) {
                    tracing::warn!("{r}: {e}");
                }
            }
            let removed = host.remove_all().removed;
            self.log_removed(&removed);
        }
    }

    /// Routes the proxy through `gateway` on the host interface, once (see
    /// [`AddressSource::Allocator`]'s `route_proxy`). An IPv4 gateway gets an on-link host
    /// route first: the interface holds only /32 addresses, so no subnet route reaches it.
    fn install_routes(&mut self, gateway: IpAddr) {
        let (Some(proxy), Some(host)) = (self.route_proxy, self.host.as_ref()) else {
            return;
        };
        if !self.routes.is_empty() {
            return;
        }
        let mut wanted = Vec::new();
        if gateway.is_ipv4() {
            wanted.push(Route {
                destination: gateway,
                prefix_len: 32,
                gateway: None,
            });
        }
        wanted.push(Route {
            destination: proxy,
            prefix_len: host_prefix_len(proxy),
            gateway: Some(gateway),
        });
        for r in wanted {
            match host.backend().net().add_route(host.backend().link(), &r) {
                Ok(()) => {
                    tracing::info!("{r} on {}", host.backend().link().name());
                    self.routes.push(r);
                }
                Err(e) => tracing::warn!("{r}: {e}; the proxy may be unreachable"),
            }
        }
    }

    fn log_address(&mut self, line: &str) {
        if let Some(f) = self.address_log.as_mut() {
            let _ = f.write_all(line.as_bytes());
        }
    }

    fn log_removed(&mut self, removed: &[IpAddr]) {
        let now_unix = unix_ms();
        for a in removed {
            self.log_address(&format!("{now_unix},removed,{a},\n"));
        }
    }

    /// The report as of now (the client's counters as last published).
    fn snapshot(&self) -> TunnelReport {
        let HopStats { failed_hops, .. } = self.hopper.stats();
        let mut r = self.report.clone();
        r.client = self.client.clone();
        r.hops_without_address = failed_hops;
        r.addresses_used = self.used.len() as u64;
        r.addresses_in_use = match &self.host {
            Some(host) => host.installed().count() as u64,
            None => self.set.addresses().count() as u64,
        };
        let mut l = self.latencies_us.clone();
        l.sort_unstable();
        r.hop_latency_p50_us = l.get(l.len() / 2).copied().unwrap_or(0);
        r.hop_latency_max_us = l.last().copied().unwrap_or(0);
        r
    }

    /// Writes `report` to the stats file (whole: a temporary file renamed over it) and hands it
    /// to the metrics endpoint.
    fn write_stats(&self, report: &TunnelReport) {
        if let Some(m) = &self.metrics {
            m.update(report);
        }
        let Some(path) = &self.stats_file else {
            return;
        };
        let tmp = path.with_extension("tmp");
        let json = serde_json::to_string_pretty(report).unwrap_or_default();
        if let Err(e) = std::fs::write(&tmp, json).and_then(|()| std::fs::rename(&tmp, path)) {
            tracing::warn!("stats_file {}: {e}", path.display());
        }
    }
}

fn parts(config: &AgentConfig) -> Result<(&TunnelConfig, &AddressSource), TunnelError> {
    let tunnel = config
        .tunnel
        .as_ref()
        .ok_or_else(|| TunnelError::Config("no [tunnel] table".into()))?;
    let source = config
        .source
        .as_ref()
        .ok_or_else(|| TunnelError::Config("no [source] table".into()))?;
    Ok((tunnel, source))
}

fn quic_settings(tunnel: &TunnelConfig) -> QuicSettings {
    QuicSettings {
        max_udp_payload_bytes: tunnel.max_udp_payload_bytes,
        qlog_dir: tunnel.qlog_dir.clone(),
        keylog_file: tunnel.keylog_file.clone(),
        idle_timeout_ms: tunnel.idle_timeout_ms,
        pad_to_bytes: tunnel.pad_to_bytes,
        ..QuicSettings::default()
    }
}

/// The configured routes as prefixes (`None`: the advertised ones).
fn routes(tunnel: &TunnelConfig) -> Result<Option<Vec<IpPrefix>>, TunnelError> {
    let Some(list) = &tunnel.routes else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(list.len());
    for r in list {
        let bad = |why: &str| TunnelError::Config(format!("tunnel.routes: {r:?}: {why}"));
        let (addr, len) = r
            .split_once('/')
            .ok_or_else(|| bad("expected address/length"))?;
        let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
        let len: u8 = len.parse().map_err(|_| bad("bad prefix length"))?;
        out.push(IpPrefix::new(addr, len).map_err(|e| bad(&e.to_string()))?);
    }
    Ok(Some(out))
}
